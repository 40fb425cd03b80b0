"""Benchmark of the offline default: `vlmlab train --out DIR` with no other argument, timed end to end.

Prints one JSON object: wall-clock seconds (data, training and the final evaluation with the shuffled-image
control and caption metrics), test-set VQA accuracy with real and shuffled images, per-type accuracy, caption
scores, and whether the targets hold (within 600 s, vqa_accuracy >= 0.90, shuffled <= 0.50).

    python benchmarks/offline_default.py [--out DIR] [override ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"wall_seconds_max": 600.0, "vqa_accuracy_min": 0.90, "vqa_accuracy_shuffled_images_max": 0.50}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="run directory to keep (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, to benchmark a variant")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="vlmlab-bench-")) / "run"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlmlab", "train", "--out", str(out), *args.overrides], check=True,
                   env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    result = {
        "wall_seconds": round(wall, 1),
        "train_seconds": round(metrics["train_seconds"], 1),
        "train_samples_per_second": round(metrics["train_samples_per_second"], 1),
        "cpu_threads": os.cpu_count(),
        "vqa_accuracy": metrics["vqa_accuracy"],
        "vqa_accuracy_shuffled_images": metrics["vqa_accuracy_shuffled_images"],
        "vqa_accuracy_by_type": metrics["vqa_accuracy_by_type"],
        "caption": metrics["caption"],
        "caption_shuffled_images": metrics["caption_shuffled_images"],
        "empty_output_rate": metrics["empty_output_rate"],
        "overrides": args.overrides,
        "targets": TARGETS,
    }
    result["targets_met"] = (
        wall <= TARGETS["wall_seconds_max"]
        and metrics["vqa_accuracy"] >= TARGETS["vqa_accuracy_min"]
        and metrics["vqa_accuracy_shuffled_images"] <= TARGETS["vqa_accuracy_shuffled_images_max"]
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
