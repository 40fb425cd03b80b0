"""Parking a frozen vision tower: its weights leave memory while training reads the feature cache.

Why: with the feature cache no training step runs the tower, yet its weights (CLIP ViT-L/14 up to its
second-last block: 291M parameters, 1.2 GB in fp32) would sit beside the connector's and the LM's activations,
gradients and optimizer state, on the GPU a user pays for. Parked, they wait in host memory (a GPU run) or in a
file beside the cached features (a CPU run, where host memory is the memory to save), and come back for whatever
runs the tower: evaluation, the conditioning alarm, saving, generation.

How: each parameter keeps its object, dtype and device; only its data is swapped for an empty tensor and back
(a loaded checkpoint's weights are often memory-mapped files, whose storage cannot be resized in place). So the
optimizer, DDP and `VLM.device` see no change, and nothing has to be rebuilt.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vlmlab.feature_cache import FeatureDataset
from vlmlab.log import info

SPILL_FILE = "tower.safetensors"  # in the cache folder, whose key already covers every weight of the tower


def return_free_heap() -> None:
    """Hands the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere).

    glibc keeps memory that tensors freed in its heaps, and new tensors above its mmap threshold are mapped afresh
    rather than placed there: without this, a tower brought back after training steps would add its size to the
    process's resident set on top of the steps' freed activations.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator returns memory its own way
        pass


class TowerParking:
    """Parks and brings back the parameters of a frozen `module` (`park`, `unpark`, `unparked()`)."""

    def __init__(self, module: nn.Module, spill_folder: Path):
        trained = [name for name, param in module.named_parameters() if param.requires_grad]
        if trained:
            raise ValueError(f"only a frozen tower can be parked; {trained[0]} and {len(trained) - 1} other "
                             f"parameters train")
        self.params = dict(module.named_parameters())
        self.spill_file = spill_folder / SPILL_FILE
        self.host: dict[str, torch.Tensor] = {}  # a GPU tower's weights while parked, in pinned host memory
        self.parked = False

    @property
    def on_gpu(self) -> bool:
        return any(param.device.type == "cuda" for param in self.params.values())

    def park(self) -> None:
        if self.parked:
            return
        if self.on_gpu:
            self.host = {name: torch.empty_like(param, device="cpu", pin_memory=True).copy_(param.detach())
                         for name, param in self.params.items()}
        elif not self.spill_file.is_file():  # written once per tower key; an earlier run's file is the same
            partial = self.spill_file.with_name(f"{SPILL_FILE}.{uuid.uuid4().hex}.partial")
            save_file({name: param.detach().contiguous() for name, param in self.params.items()}, partial)
            os.replace(partial, self.spill_file)  # atomic: concurrent writers (DDP) leave one whole file
        for param in self.params.values():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self.parked = True

    def unpark(self) -> None:
        if not self.parked:
            return
        if self.on_gpu:
            for name, param in self.params.items():
                param.data = self.host[name].to(param.device, non_blocking=True)
            torch.cuda.synchronize()  # the copies have landed before the pinned buffers go
            self.host = {}
        else:
            return_free_heap()  # so that the weights fill memory training left free instead of adding to it
            with safe_open(self.spill_file, framework="pt", device="cpu") as spilled:
                for name, param in self.params.items():
                    param.data = spilled.get_tensor(name)
        self.parked = False

    @contextlib.contextmanager
    def unparked(self):
        """The tower's weights in place for the block, parked again after it."""
        self.unpark()
        try:
            yield
        finally:
            self.park()


def park_if_cached(model, dataset, wanted: bool) -> TowerParking | None:
    """Parks `model`'s tower when `wanted` (`train.park_tower`) and training reads cached features (`dataset` a
    FeatureDataset); else None."""
    if not wanted or not isinstance(dataset, FeatureDataset):
        return None
    parking = TowerParking(model.vision.model, dataset.store.folder)
    parking.park()
    where = "in host memory" if parking.on_gpu else f"in {parking.spill_file}"
    info(f"vision tower parked {where} while steps read the feature cache; back for evaluation and saving")
    return parking
