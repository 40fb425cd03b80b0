"""Training with several processes, one per GPU (DDP), launched by `accelerate`:

    accelerate launch --multi_gpu --num_processes 2 -m vlmlab train --out runs/ddp --preset recommended

`train.batch_size` stays the effective batch of one optimizer step, over all processes. Every process draws the
same micro-batches and takes its own consecutive part of each (so an image's questions mostly stay together); its
loss is weighted by its part of the micro-batch's answer tokens, so that the gradient DDP averages is exactly the
one a single process computes on the whole micro-batch. Only the main process writes checkpoints, logs, the model
and the metrics. A run started without a launcher is one process and none of this costs anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vlmlab.model import resolve_device


@dataclass(frozen=True)
class Processes:
    """This process's place among those training one model: `rank` of `world`, on `device`."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run training passes through: DDP, which averages gradients in backward, or `model`."""
        if self.world == 1:
            return model
        device_ids = [self.device] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def shard(self, batches: Iterable[list[int]]) -> ShardedBatches:
        return ShardedBatches(batches, self.rank, self.world)

    def weigh(self, micro_batches: list[dict], answer_tokens: Callable[[list[str]], int]) -> tuple[int, int]:
        """Sets each micro-batch's `loss_weight` (one entry per example, so that a cut piece keeps it); returns the
        numbers of examples and of answer tokens of the step over all processes.

        A process's loss is a mean over its own n answer tokens; weighted by world * n / N (N: the micro-batch's
        answer tokens over all processes) the DDP average of the gradients is the gradient of the mean over all N.
        """
        local = torch.tensor([[answer_tokens(batch["targets"]), len(batch["prompts"])] for batch in micro_batches],
                             dtype=torch.float64)
        total = self._sum(local)
        for batch, (tokens, _), (all_tokens, _) in zip(micro_batches, local.tolist(), total.tolist()):
            batch["loss_weight"] = [self.world * tokens / all_tokens] * len(batch["prompts"])
        return int(total[:, 1].sum()), int(total[:, 0].sum())

    def mean(self, value: float) -> float:
        """The mean of `value` over the processes (each holds its weighted part of the step's loss)."""
        return float(self._sum(torch.tensor([value], dtype=torch.float64))[0]) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return tensor
        moved = tensor.to(self.device, copy=True)  # NCCL reduces CUDA tensors only; a copy keeps `tensor` as it was
        torch.distributed.all_reduce(moved)
        return moved.cpu()


class ShardedBatches:
    """This process's consecutive part of every batch of `batches` (parts differ in size by at most one)."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if len(batch) < self.world:
                raise ValueError(f"a micro-batch of {len(batch)} examples cannot be shared by {self.world} "
                                 f"processes; raise train.batch_size or lower train.grad_accum")
            size, extra = divmod(len(batch), self.world)
            start = self.rank * size + min(self.rank, extra)
            yield batch[start : start + size + (self.rank < extra)]


def start_processes(device: str) -> Processes:
    """One process on `train.device`, or, under a launcher (WORLD_SIZE > 1), this process of the group, its
    process group started by accelerate: NCCL on GPUs, gloo on CPUs (`train.device=cpu`, or no GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(device=resolve_device(device))
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    placed = torch.device("cpu") if state.device.type == "cpu" else state.device
    return Processes(state.process_index, state.num_processes, placed)
