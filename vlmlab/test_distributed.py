"""Several processes (DDP over gloo, on CPU) train exactly as one process with the same effective batch, and
write the run directory once."""

import json
import socket
import subprocess
import sys

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


def test_two_processes_match_one(tmp_path):
    one = tmp_path / "one"
    train(apply_overrides(get_preset("default"), RUN), one)
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
