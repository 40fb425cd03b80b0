"""Benchmark of what `vlmlab sweep` adds to the runs it launches: its own start-up, the study's checks, the run
records and ledger, and the report (tables and plots), against the same training run launched by hand.

Both sides train the offline default at `train.max_steps=STEPS` (600 unless told) with evaluation, the
shuffled-image control and the caption metrics (Java's METEOR included: both sides pay it), one after the other
on the same machine, each in a fresh process. Then it times a second `vlmlab sweep` of the finished study (what
a rerun costs) and `--report` alone. Prints one JSON object; the target is an overhead under 5% of the run.

    python benchmarks/sweep_overhead.py [--steps 600] [--runs 1]
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

TARGET = 0.05  # overhead per run / one run's wall time


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps of each run (default 600)")
    parser.add_argument("--runs", type=int, default=1,
                        help="seeds of the study (default 1: the sweep's start-up and report on a single run)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vlmlab-sweep-bench-"))
    steps = f"train.max_steps={args.steps}"
    by_hand = sum(timed([sys.executable, "-m", "vlmlab", "train", "--out", str(work / f"hand{seed}"), steps,
                         f"train.seed={seed}"]) for seed in range(args.runs))
    study = work / "study.yaml"
    study.write_text(f"name: overhead\nbase:\n  overrides: [{steps}]\nseeds: {list(range(args.runs))}\n")
    sweep = [sys.executable, "-m", "vlmlab", "sweep", str(study), "--out", str(work / "sweep")]
    swept = timed(sweep)
    rerun, report = timed(sweep), timed([*sweep, "--report"])
    overhead = (swept - by_hand) / args.runs
    result = {
        "steps": args.steps, "runs": args.runs, "cpu_threads": os.cpu_count(),
        "by_hand_seconds": round(by_hand, 1), "sweep_seconds": round(swept, 1),
        "overhead_seconds_per_run": round(overhead, 1),
        "overhead_per_run_vs_one_run": round(overhead / (by_hand / args.runs), 4),
        "second_invocation_seconds": round(rerun, 1), "report_only_seconds": round(report, 1),
        "target_overhead_vs_one_run_max": TARGET,
    }
    result["target_met"] = result["overhead_per_run_vs_one_run"] <= TARGET
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
