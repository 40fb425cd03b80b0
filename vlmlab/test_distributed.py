"""Several processes (DDP over gloo, on CPU) train exactly as one process with the same effective batch, and
write the run directory once."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vlmlab.config import apply_overrides
from vlmlab.distributed import Processes, ShardedBatches
from vlmlab.presets import get_preset
from vlmlab.test_model import SMALL
from vlmlab.train import train

RUN = [*SMALL, "data.train_images=24", "data.eval_images=4", "train.batch_size=8", "train.max_steps=4",
       "train.log_every=1", "train.eval_every=0", "train.save_every=2", "train.warmup_steps=1", "train.alarm_every=0",
       "eval.max_examples=4", "eval.caption_metrics=false", "vision.train=frozen", "train.device=cpu"]
# Losses agree up to float summation order (gradients all-reduced in another order than one process adds them).
TOLERANCE = 1e-4


def _losses(run_dir) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [(record["step"], record["loss"]) for record in records if "loss" in record]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_parts_of_a_batch_cover_it_in_order():
    batches = [list(range(7)), list(range(10, 18))]
    parts = [list(ShardedBatches(batches, rank, 3)) for rank in range(3)]
    assert [sum((part[i] for part in parts), []) for i in range(2)] == batches
    assert [len(part[0]) for part in parts] == [3, 2, 2]
    with pytest.raises(ValueError, match="cannot be shared"):
        list(ShardedBatches([[1]], 0, 2))


def test_one_process_weighs_nothing():
    batches = [{"targets": ["a", "bb"], "prompts": ["p", "q"]}]
    assert Processes().weigh(batches, lambda targets: sum(map(len, targets))) == (2, 3)
    assert batches[0]["loss_weight"] == [1.0, 1.0] and Processes().mean(2.5) == 2.5


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The run in one process, which every run in two must match."""
    out = tmp_path_factory.mktemp("one")
    train(apply_overrides(get_preset("default"), RUN), out)
    return out


def test_two_processes_match_one(one, tmp_path):
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "vlmlab", "train", "--out", str(two), *RUN]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    expected, got = _losses(one), _losses(two)
    assert [step for step, _ in got] == [1, 2, 3, 4]  # each step logged once, by the main process
    for (_, single), (_, double) in zip(expected, got):
        assert double == pytest.approx(single, rel=TOLERANCE)
    for name in ("metrics.json", "predictions.jsonl", "model/connector.safetensors", "checkpoint/trainer_state.pt"):
        assert (two / name).is_file(), name
    assert not list(two.glob("*.partial")) and not list(two.glob("*.old"))
    # The feature cache was filled by both processes, each its share of the images.
    assert len(list(two.glob("feature_cache/*/shard-*.npy"))) == 2


# One process of a two-process run, started as `accelerate launch` starts it (RANK, WORLD_SIZE, MASTER_* set), whose
# "GPU", in process 1 only, holds at most `limit` examples per forward pass.
RANK = """
import os, sys
import torch
from vlmlab.cli import main
from vlmlab.model import VLM

limit = int(sys.argv[1])
if os.environ["RANK"] == "1":
    real_forward = VLM.forward

    def forward(self, pixels, prompts, *args, **kwargs):
        if len(prompts) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected in process 1)")
        return real_forward(self, pixels, prompts, *args, **kwargs)

    VLM.forward = forward
sys.exit(main(sys.argv[2:]))
"""


def _two_processes(out, limit: int) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process of a two-process run over gloo; a hang fails the test, never blocks it."""
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", RANK, str(limit), "train", "--out", str(out), *RUN],
                                  env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, text=True,
                                  cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for rank in range(2)]
    try:
        return [(process.wait(timeout=300), process.stderr.read()) for process in processes]
    finally:
        for process in processes:
            process.kill()


def test_out_of_memory_in_one_process_halves_the_micro_batches_of_all(one, tmp_path):
    # Each process takes 4 of a micro-batch of 8; process 1 runs out of memory with 4, and both go on with 2.
    (main_code, main_err), (other_code, other_err) = _two_processes(tmp_path, limit=2)
    assert (main_code, other_code) == (0, 0), main_err[-3000:] + other_err[-3000:]
    warnings = [line for line in main_err.splitlines() if "out of memory" in line]
    assert warnings == ["warning: step 1: out of memory in process 1 of 2; micro-batch 4 -> 2 examples, gradient "
                        "accumulation 1 -> 2 (the effective batch of 8 is kept)"]
    assert "out of memory" not in other_err  # one line for the run, from the main process
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r for r in log if "fault" in r] == [{"step": 1, "fault": "out of memory", "micro_batch": 2}]
    assert json.loads((tmp_path / "metrics.json").read_text())["out_of_memory_events"] == 1
    for (_, single), (_, cut) in zip(_losses(one), _losses(tmp_path), strict=True):
        assert cut == pytest.approx(single, rel=TOLERANCE)  # all cut alike: the same gradient as one process


def test_out_of_memory_with_one_example_in_one_process_stops_every_process_with_one_line(tmp_path):
    outcomes = _two_processes(tmp_path, limit=0)
    assert [code for code, _ in outcomes] == [2, 2], "\n".join(err[-2000:] for _, err in outcomes)
    for _, err in outcomes:
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            "error: step 1: out of memory in process 1 of 2 with one example per forward pass; use a smaller model, "
            "fewer visual tokens, shorter texts, or train.precision=bf16"]
    assert not (tmp_path / "metrics.json").exists()
