"""One real-size training step of a preset, random weights, beside `vlmlab plan`'s simulated peak for that step.

The model is built from the preset's architectures (nothing downloaded) with random weights on the chosen device,
then trained a few steps on micro-batches at the longest prompts and targets the config allows. Prints one JSON
object: the simulated peak (the same fake-tensor step `plan` runs), the measured peak (on CUDA
`torch.cuda.max_memory_allocated`; on a CPU the process's peak resident memory above what it held before the
model was built), and samples per second over the steps after the first.

    python benchmarks/real_size_step.py --preset recommended --micro-batch 2 --steps 3            # CPU, fp32
    python benchmarks/real_size_step.py --preset recommended --micro-batch 32 --device cuda        # GPU, autocast
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vlmlab.config import apply_overrides
from vlmlab.plan import GIB, build_from_architecture, step_inputs, step_peak, to_fake, train_step, warm_optimizer
from vlmlab.presets import get_preset
from vlmlab.train import resolve_precision
from vlmlab.tuning import enable_gradient_checkpointing


def resident_bytes() -> int:
    """The process's resident memory now (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def simulated_peak(cfg, micro_batch: int, amp_dtype, checkpointing: bool) -> int:
    model = build_from_architecture(cfg).train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        to_fake(model)
        if checkpointing:
            enable_gradient_checkpointing([model.vision, model.language])
        return step_peak(model, warm_optimizer(model), cfg, micro_batch, False, amp_dtype)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="recommended")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after a first one (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (the preset's autocast precision)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on the trained LM")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args()
    cfg = apply_overrides(get_preset(args.preset), args.overrides)
    device = torch.device(args.device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    simulated = simulated_peak(cfg, args.micro_batch, amp_dtype, args.checkpointing)

    torch.manual_seed(0)
    before = resident_bytes()
    model = build_from_architecture(cfg, device=args.device).train()
    if args.checkpointing:
        enable_gradient_checkpointing([model.vision, model.language])
    optimizer = warm_optimizer(model)
    inputs = step_inputs(model, cfg, args.micro_batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_step(model, optimizer, inputs, amp_dtype)  # the first step: allocator and kernels warm up
    started = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, optimizer, inputs, amp_dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        measured, measure = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss: KiB on Linux
        measure = "peak RSS above the RSS before building the model"
    seconds = time.perf_counter() - started
    print(json.dumps({
        "preset": args.preset, "device": args.device, "precision": str(amp_dtype or "fp32"),
        "micro_batch": args.micro_batch, "gradient_checkpointing": args.checkpointing,
        "simulated_peak_gib": round(simulated / GIB, 2), "measured_peak_gib": round(measured / GIB, 2),
        "measured_as": measure, "samples_per_second": round(args.steps * args.micro_batch / seconds, 3),
        "seconds_per_step": round(seconds / args.steps, 2), "threads": torch.get_num_threads(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
