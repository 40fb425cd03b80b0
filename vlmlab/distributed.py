"""Training with several processes, one per GPU (data parallel), launched by `accelerate`:

    accelerate launch --multi_gpu --num_processes 2 -m vlmlab train --out runs/ddp --preset recommended

`train.batch_size` stays the effective batch of one optimizer step, over all processes. Every process draws the
same micro-batches and takes its own consecutive part of each (so an image's questions mostly stay together); its
loss is weighted by its part of the micro-batch's answer tokens, so that the averaged gradient is exactly the one a
single process computes on the whole micro-batch. Only the main process writes checkpoints, logs, the model and the
metrics. A run started without a launcher is one process and none of this costs anything.

Gradients are averaged once a step, after every process has finished its passes and all have agreed that none ran
out of memory (`gather`), not inside backward as DDP does: a process that runs out of memory halfway would leave
the others waiting in a gradient all-reduce it never joins. So all processes cut their micro-batches together, or
stop together (faults.py). The cost: the all-reduce does not overlap the backward pass.
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

    def share(self, model: nn.Module) -> nn.Module:
        """Gives every process the main process's weights and buffers (as DDP does when it wraps a model); returns
        the module training passes run through, `model` itself (`average_gradients` does the rest)."""
        if self.world > 1:
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    torch.distributed.broadcast(tensor, src=0)
        return model

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Each trained parameter's gradient becomes its mean over the processes, in place (DDP's all-reduce). A
        parameter no process computed a gradient for keeps none; one that only some did gets zeros elsewhere."""
        if self.world == 1:
            return
        trained = [p for p in parameters if p.requires_grad]
        has_grad = self._sum(torch.tensor([p.grad is not None for p in trained], dtype=torch.float64))
        grads = []
        for param, anyone in zip(trained, has_grad.tolist()):
            if anyone:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                grads.append(param.grad)
        for handle in [torch.distributed.all_reduce(grad, async_op=True) for grad in grads]:
            handle.wait()
        for grad in grads:
            grad.div_(self.world)

    def gather(self, values: list[int]) -> list[list[int]]:
        """Every process's `values` (whole numbers), in rank order: what each one saw, known to all."""
        if self.world == 1:
            return [list(values)]
        table = torch.zeros(self.world, len(values), dtype=torch.float64)
        table[self.rank] = torch.tensor(values, dtype=torch.float64)
        return [[int(v) for v in row] for row in self._sum(table).tolist()]

    def shard(self, batches: Iterable[list[int]]) -> ShardedBatches:
        return ShardedBatches(batches, self.rank, self.world)

    def weigh(self, micro_batches: list[dict], answer_tokens: Callable[[list[str]], int]) -> tuple[int, int]:
        """Sets each micro-batch's `loss_weight` (one entry per example, so that a cut piece keeps it); returns the
        numbers of examples and of answer tokens of the step over all processes.

        A process's loss is a mean over its own n answer tokens; weighted by world * n / N (N: the micro-batch's
        answer tokens over all processes) the average of the gradients is the gradient of the mean over all N.
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


def end_processes(together: bool) -> None:
    """Leaves the group of processes this one joined, if any. `together`: every process ends here at the same step
    (a fault they all agreed on), so they first wait for each other: one that left while another still talked to it
    would have gloo abort that one. A finished run's other processes leave without waiting while the main process
    evaluates (waiting could outlast NCCL's timeout); a process ending alone (an error only it met) leaves the
    group as it is, for the others to time out."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_initialized():
        return  # one process (a group a caller started itself is the caller's to end)
    if together:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
