"""Benchmark of the offline default: `vlmlab train --out DIR` with no other argument, timed end to end.

Prints one JSON object: wall-clock seconds (data, training and the final evaluation with the shuffled-image
control and caption metrics), test-set VQA accuracy with real and shuffled images, per-type accuracy, caption
scores, and whether the targets hold. World v1 (the default world): within 600 s, vqa_accuracy >= 0.90,
shuffled <= 0.50. World v2 (`--world scatter` or `--world tiles`, the second generator): within 300 s, every
general question type >= 0.95, the text family >= 0.90, shuffled-image VQA <= the majority floor + 0.10, and
knowledge >= 0.90 when the run starts from `vlmlab pretrain-lm`'s LM (`language.model=DIR`); each family and type
is in the JSON beside its shuffled-image score and its majority-answer floor (the run's own summary prints them
as a table too), and one line says which targets hold.

    python benchmarks/offline_default.py [--out DIR] [--world v1|scatter|tiles] [override ...]
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
WORLD_V2_TARGETS = {"wall_seconds_max": 300.0, "general_type_min": 0.95, "text_min": 0.90,
                    "shuffled_above_floor_max": 0.10, "knowledge_min_from_pretrained_lm": 0.90}


def world_v1_targets(metrics: dict, wall: float) -> dict:
    return {"targets": TARGETS, "targets_met": (
        wall <= TARGETS["wall_seconds_max"]
        and metrics["vqa_accuracy"] >= TARGETS["vqa_accuracy_min"]
        and metrics["vqa_accuracy_shuffled_images"] <= TARGETS["vqa_accuracy_shuffled_images_max"])}


def world_v2_targets(metrics: dict, wall: float, overrides: list[str]) -> dict:
    """Each family and question type beside its shuffled-image score and floor, and each target's verdict."""
    real, shuffled = metrics["vqa_accuracy_by_type"], metrics["vqa_accuracy_by_type_shuffled_images"]
    floor = metrics["majority_floor_by_type"]
    families = {family: {"accuracy": metrics["vqa_accuracy_by_family"][family],
                         "shuffled_images": metrics["vqa_accuracy_by_family_shuffled_images"][family],
                         "types": {t: {"accuracy": real[t], "shuffled_images": shuffled[t], "floor": floor[t]}
                                   for t in types}}
                for family, types in metrics["question_types_by_family"].items()}
    pretrained = any(o.startswith("language.model=") and o != "language.model=" for o in overrides)
    met = {"wall_seconds": wall <= WORLD_V2_TARGETS["wall_seconds_max"],
           "shuffled_images": metrics["vqa_accuracy_shuffled_images"]
           <= metrics["majority_floor"] + WORLD_V2_TARGETS["shuffled_above_floor_max"]}
    if "general" in families:
        met["general"] = all(t["accuracy"] >= WORLD_V2_TARGETS["general_type_min"]
                              for t in families["general"]["types"].values())
    if "text" in families:
        met["text"] = families["text"]["accuracy"] >= WORLD_V2_TARGETS["text_min"]
    if "knowledge" in families and pretrained:  # from scratch it is reported, not judged
        met["knowledge"] = families["knowledge"]["accuracy"] >= WORLD_V2_TARGETS["knowledge_min_from_pretrained_lm"]
    return {"majority_floor": metrics["majority_floor"], "families": families,
            "family_average": metrics["family_average"],
            "family_average_shuffled_images": metrics["family_average_shuffled_images"],
            "targets": WORLD_V2_TARGETS, "target_met": met, "targets_met": all(met.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="run directory to keep (default: a temporary one)")
    parser.add_argument("--world", choices=["v1", "scatter", "tiles"], default="v1",
                        help="the synthetic world: v1 (the default world) or a world v2 generator")
    parser.add_argument("overrides", nargs="*", help="section.field=value, to benchmark a variant")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="vlmlab-bench-")) / "run"
    overrides = ([] if args.world == "v1" else [f"data.world.generator={args.world}"]) + args.overrides
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vlmlab", "train", "--out", str(out), *overrides], check=True,
                   env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    result = {
        "world": args.world,
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
        "overrides": overrides,
    }
    if args.world == "v1":
        result.update(world_v1_targets(metrics, wall))
    else:
        result.update(world_v2_targets(metrics, wall, overrides))
        print("world v2 targets: " + ", ".join(f"{name} {'met' if held else 'NOT met'}"
                                               for name, held in result["target_met"].items()), file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
