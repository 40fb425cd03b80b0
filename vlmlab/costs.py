"""What a run costs and what it ran on, written into `metrics.json` beside its scores so that a study compares
like with like: parameters (total and trained), visual tokens per image, examples and answer tokens trained on,
peak memory; and the versions of Python and of the libraries that compute the numbers (the same code can give
other figures under another torch or transformers).
"""

from __future__ import annotations

import platform
import resource
import sys
from importlib import metadata

import torch
from PIL import Image


def peak_memory_bytes(device: torch.device) -> int:
    """`torch.cuda.max_memory_allocated` on a GPU; on a CPU the process's peak resident set (ru_maxrss: weights,
    activations, data and the libraries), which is why a run measured this way needs a process of its own."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def peak_memory_source(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak resident set (ru_maxrss)"


@torch.no_grad()
def visual_tokens_per_image(model) -> int:
    """M of the `[B, M, Dl]` visual tokens one image becomes, split views included: one blank image's pass."""
    blank = Image.new("RGB", (model.vision.image_size, model.vision.image_size))
    return model.visual_tokens(model.pixels_of([blank])).shape[1]


def run_costs(model, examples_seen: int, answer_tokens_seen: int, device: torch.device) -> dict:
    """The cost keys of `metrics.json` (train_seconds is written beside them by the trainer)."""
    return {
        "parameters_total": sum(p.numel() for p in model.parameters()),
        "parameters_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "visual_tokens_per_image": visual_tokens_per_image(model),
        "train_examples_seen": examples_seen,
        "train_tokens_seen": answer_tokens_seen,  # the answer tokens the loss was taken over, EOS included
        "peak_memory_bytes": peak_memory_bytes(device),
        "peak_memory": peak_memory_source(device),
    }


def environment() -> dict:
    """Python, the platform and the versions of vlmlab and of the libraries behind its numbers."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("vlmlab", "torch", "transformers", "peft", "tokenizers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
