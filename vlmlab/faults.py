"""What a training run does when something goes wrong.

- A kill in the middle of writing: folders (checkpoints, the final model) are written beside their place, flushed
  to disk, then renamed into it, so what sits under the real name is always complete; `recover_directory` puts
  the previous one back if a kill fell between the two renames of a swap, and drops half-written leftovers.
- A step whose loss or gradient is not finite (NaN / Inf): the update is skipped, logged and counted; after
  `train.max_bad_steps` such steps in a row the run stops with a `TrainingFault`.
- Out of GPU memory: the micro-batch is halved (again, as often as needed) and gradient accumulation raised to
  match, so the effective batch and the gradient stay what they were; the run goes on with a log line. Evaluation
  halves its generation batch by the same rule (`attempt`, `halved`); only one example that does not fit stops it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from vlmlab.log import warn


class TrainingFault(RuntimeError):
    """A fault that training cannot work around; the message says what happened and what to change."""


# -- writing that a kill cannot leave half done ----------------------------------------------------------------
def _fsync(path: Path) -> None:
    if path.is_dir() and os.name == "nt":  # Windows cannot open a folder to flush it
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def flush_directory(folder: Path) -> None:
    """Flushes every file under `folder`, and the folders' entries, to the disk."""
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders that list them
        _fsync(path)
    _fsync(folder)


def partial_of(final: Path) -> Path:
    """Where a folder that will replace `final` is written first."""
    return final.with_name(final.name + ".partial")


def fresh_partial(final: Path) -> Path:
    """`partial_of(final)`, emptied of whatever an earlier, killed write left there."""
    partial = partial_of(final)
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def _old_of(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def replace_directory(final: Path) -> None:
    """Moves the finished `partial_of(final)` into `final`'s place, flushed to disk before and after the swap."""
    partial, old = partial_of(final), _old_of(final)
    flush_directory(partial)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)  # a kill just before this leaves `old` complete: recover_directory restores it
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_directory(final: Path) -> None:
    """Undoes what a kill during `replace_directory` (or while writing the partial folder) left behind."""
    partial, old = partial_of(final), _old_of(final)
    if not final.exists() and old.exists():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a flushed temporary file and a rename: readers see old or new, never half.
    The temporary name is this writer's own, so two processes writing the same file (runs sharing a feature cache)
    each rename a whole file of their own."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def truncate_log(path: Path, step: int) -> None:
    """Keeps the records of steps up to `step`: a resumed run writes the later ones again."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_text_atomically(path, "".join(kept))


# -- out of memory ---------------------------------------------------------------------------------------------
def attempt(work: Callable[[], object], release: Callable[[], None] = lambda: None) -> tuple[object, bool]:
    """(work(), False); or (None, True) when it ran out of memory, after `release()` dropped what the failed pass
    left behind (gradients) and the device's cached blocks went back. Freed outside the except block: the
    traceback holds the failed pass's tensors until it is left."""
    try:
        return work(), False
    except torch.OutOfMemoryError:
        pass
    release()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None, True


def halved(before: int, stop: str) -> int:
    """How many examples a pass may take after `before` ran out of memory: half, rounded up. One example cannot be
    cut: the run stops with `stop`, which says what to change."""
    if before <= 1:
        raise TrainingFault(stop)
    return math.ceil(before / 2)


class GenerationBatch:
    """The examples evaluation generates for at once: `eval.batch_size`, halved each time memory runs out (one
    warning line each, counted in `events`) for the rest of the evaluation."""

    def __init__(self, size: int):
        self.size = size
        self.events = 0

    def halve(self, before: int) -> None:
        self.size = halved(before, "evaluation: out of memory generating for one example; lower eval.num_beams or "
                                   "eval.caption_max_new_tokens, or use a larger GPU (a trained model is saved before "
                                   "its evaluation: `vlmlab eval --model RUN` evaluates it again)")
        self.events += 1
        warn(f"evaluation: out of memory; generation batch {before} -> {self.size} examples")


# -- batches ---------------------------------------------------------------------------------------------------
def split_batch(batch: dict, size: int) -> list[dict]:
    """Cuts a collated batch into batches of at most `size` consecutive examples, each carrying only its images.

    `pixels` `[U, 3, S, S]` (or cached `features` `[U, N, Dv]`) holds each distinct image once and `image_index`
    `[B]` points into it; each piece gets the images its examples show (and their `image_keys`), re-indexed. Other
    list fields (prompts, targets, examples) are sliced.
    """
    pieces = []
    per_image = "features" if "features" in batch else "pixels"
    for start in range(0, len(batch["prompts"]), size):
        chosen = slice(start, start + size)
        images, index = torch.unique(batch["image_index"][chosen], return_inverse=True)
        per_example = {key: value[chosen] for key, value in batch.items() if isinstance(value, list)}
        pieces.append({**per_example, per_image: batch[per_image][images], "image_index": index,
                       "image_keys": [batch["image_keys"][image] for image in images.tolist()]})
    return pieces


# -- the guard around each optimizer step ----------------------------------------------------------------------
class FaultGuard:
    """Runs a step's forward and backward passes through out-of-memory errors and judges the step's numbers.

    `record` appends a dict to the run's log; `answer_tokens(targets)` counts the answer tokens a batch's loss is
    averaged over, so that pieces of a cut micro-batch are weighted to give exactly the uncut gradient. With several
    processes, `gather(values)` returns every process's values (distributed.Processes.gather), so that all of them
    learn that one ran out of memory and cut their micro-batches together; only the main one (`is_main`) warns.
    """

    def __init__(self, max_bad_steps: int, micro_batch: int, grad_accum: int,
                 answer_tokens: Callable[[list[str]], int], record: Callable[[dict], None],
                 gather: Callable[[list[int]], list[list[int]]] = lambda values: [values], is_main: bool = True):
        self.gather = gather
        self.warn = warn if is_main else (lambda message: None)
        self.max_bad_steps = max_bad_steps
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.answer_tokens = answer_tokens
        self.record = record
        self.piece_size: int | None = None  # most examples per forward pass, once memory ran out; None: uncut
        self.bad_steps = 0
        self.bad_in_a_row = 0
        self.out_of_memory = 0

    def resume(self, log_path: Path, step: int) -> None:
        """Takes up the counts of the run so far from its log, already cut back to `step`, the resumed step."""
        last_bad = None
        for line in log_path.read_text().splitlines() if log_path.is_file() else []:
            record = json.loads(line)
            fault = record.get("fault", "")
            if fault == "out of memory":
                self.out_of_memory, self.piece_size = self.out_of_memory + 1, record["micro_batch"]
            elif fault.startswith("non-finite"):
                self.bad_steps, last_bad = self.bad_steps + 1, record
        self.bad_in_a_row = last_bad["in_a_row"] if last_bad and last_bad["step"] == step else 0

    def _shares(self, batch: dict) -> list[tuple[dict, float]]:
        """(piece, its share of the micro-batch's loss): shares are answer-token fractions, summing to 1."""
        if self.piece_size is None or len(batch["prompts"]) <= self.piece_size:
            return [(batch, 1.0)]
        pieces = split_batch(batch, self.piece_size)
        tokens = [self.answer_tokens(piece["targets"]) for piece in pieces]
        return [(piece, count / sum(tokens)) for piece, count in zip(pieces, tokens)]

    def accumulate(self, step: int, micro_batches: list[dict], backward: Callable[[dict, float], float],
                   optimizer: torch.optim.Optimizer) -> float:
        """Gradients of one optimizer step; returns the summed loss `backward(piece, share)` reported.

        On out-of-memory the step starts over with micro-batches half as large, and twice as many of them; in every
        process when any one of them ran out (the passes hold no collective, so one that failed does not strand the
        others: they finish theirs, then all learn the outcome, one small all-reduce per step).
        """
        while True:
            optimizer.zero_grad(set_to_none=True)
            largest = max(len(batch["prompts"]) for batch in micro_batches)
            loss, failed = attempt(lambda: sum(backward(piece, share) for batch in micro_batches
                                               for piece, share in self._shares(batch)),
                                   release=lambda: optimizer.zero_grad(set_to_none=True))
            outcome = self.gather([int(failed), min(largest, self.piece_size or largest)])  # (failed, size) each
            if not any(ran_out for ran_out, _ in outcome):
                return loss
            self._cut_smaller(step, outcome)

    def _cut_smaller(self, step: int, outcome: list[list[int]]) -> None:
        """Halves the pieces of every process after those in `outcome` that ran out of memory (at their size)."""
        ran_out = [rank for rank, (failed, _) in enumerate(outcome) if failed]
        where = f" in process {', '.join(map(str, ran_out))} of {len(outcome)}" if len(outcome) > 1 else ""
        before = min(outcome[rank][1] for rank in ran_out)
        self.piece_size = halved(before, f"step {step}: out of memory{where} with one example per forward pass; use "
                                         f"a smaller model, fewer visual tokens, shorter texts, or "
                                         f"train.precision=bf16")
        self.out_of_memory += 1
        per_process = math.ceil(self.micro_batch / len(outcome))  # each process's part of a micro-batch
        accumulation = [self.grad_accum * math.ceil(per_process / size) for size in (before, self.piece_size)]
        self.warn(f"step {step}: out of memory{where}; micro-batch {before} -> {self.piece_size} examples, gradient "
                  f"accumulation {accumulation[0]} -> {accumulation[1]} (the effective batch of "
                  f"{self.micro_batch * self.grad_accum} is kept)")
        self.record({"step": step, "fault": "out of memory", "micro_batch": self.piece_size})

    def step_is_finite(self, step: int, loss: float, grad_norm: torch.Tensor) -> bool:
        """True when the step may update the weights; otherwise logs and counts it, and stops a persistent fault."""
        if math.isfinite(loss) and math.isfinite(float(grad_norm)):
            self.bad_in_a_row = 0
            return True
        what = "loss" if not math.isfinite(loss) else "gradient"
        self.bad_steps += 1
        self.bad_in_a_row += 1
        self.warn(f"step {step}: non-finite {what} (loss {loss}, gradient norm {float(grad_norm)}), update skipped "
                  f"({self.bad_in_a_row} in a row, {self.bad_steps} in all)")
        self.record({"step": step, "fault": f"non-finite {what}", "in_a_row": self.bad_in_a_row})
        if self.bad_in_a_row >= self.max_bad_steps:
            raise TrainingFault(
                f"stopped at step {step}: {self.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                f"(train.max_bad_steps={self.max_bad_steps}); try a lower train.lr, train.precision=bf16 or fp32, "
                f"or look for broken examples in the data")
        return False

    def counts(self) -> dict:
        """What metrics.json reports of the faults the run went through."""
        return {"skipped_steps": self.bad_steps, "out_of_memory_events": self.out_of_memory}

    def report(self) -> list[str]:
        """Lines for the run's final summary; none when nothing went wrong."""
        lines = []
        if self.bad_steps:
            lines.append(f"skipped steps       {self.bad_steps} (non-finite loss or gradient; see train_log.jsonl)")
        if self.out_of_memory:
            lines.append(f"out of memory       {self.out_of_memory} times; micro-batches cut to {self.piece_size} examples")
        return lines
