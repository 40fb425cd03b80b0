"""`vlmlab plan` for every real-size preset on every GPU it knows, as one markdown table (docs/presets.md).

Each cell is the plan's proposal: micro-batch x accumulation steps, gradient checkpointing or not, and the
simulated peak memory of that step (then what it needs with the CUDA context and allocator slack).

    python benchmarks/plan_presets.py [--gpus t4,l4,a100-40g,a100-80g] [--presets NAME,NAME]
"""

from __future__ import annotations

import argparse
import time

from vlmlab.plan import GPUS, plan
from vlmlab.presets import REAL_PRESETS, get_preset


def cell(result: dict) -> str:
    proposal = result["proposal"]
    if proposal is None:
        worst = result["tried"][-1]
        return f"does not fit (needs {worst['needed_gib']} GiB at micro-batch {worst['micro_batch']} + checkpointing)"
    row = next(row for row in result["tried"] if row["fits"])
    checkpointing = " + ckpt" if row["gradient_checkpointing"] else ""
    return (f"{row['micro_batch']} x {row['grad_accum']}{checkpointing}, {result['precision']}: peak "
            f"{row['peak_gib']} GiB, needs {row['needed_gib']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default=",".join(GPUS))
    parser.add_argument("--presets", default=",".join(REAL_PRESETS))
    args = parser.parse_args()
    gpus = args.gpus.split(",")
    print("| preset | params (M): vision / connector / LM, trainable | " + " | ".join(gpus) + " |")
    print("|---|---|" + "---|" * len(gpus))
    for name in args.presets.split(","):
        started = time.perf_counter()
        results = [plan(get_preset(name), gpu) for gpu in gpus]
        parts = results[0]["parts"]
        sizes = " / ".join(f"{parts[p]['params_m']:.0f}" for p in ("vision", "connector", "language"))
        trainable = sum(parts[p]["trainable_m"] for p in parts)
        print(f"| {name} | {sizes}, {trainable:.1f} | " + " | ".join(cell(r) for r in results) + " |", flush=True)
        print(f"<!-- {name}: planned in {time.perf_counter() - started:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
