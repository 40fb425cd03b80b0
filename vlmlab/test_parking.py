"""Parking a frozen tower: its weights leave memory and come back exactly, and a run that parks it trains,
evaluates and saves as one that does not."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vlmlab.config import apply_overrides
from vlmlab.parking import SPILL_FILE, TowerParking
from vlmlab.presets import get_preset
from vlmlab.test_model import SMALL, small
from vlmlab.train import train
from vlmlab.vision import build_vision


def _tower(trained: bool = False):
    vision = build_vision(small("tiny-qformer").vision)
    return vision.requires_grad_(trained).eval()


def _stored_bytes(module) -> list[int]:
    return [param.untyped_storage().nbytes() for param in module.parameters()]


def test_parked_weights_leave_and_come_back_exactly(tmp_path):
    vision = _tower()
    before = {name: param.clone() for name, param in vision.model.named_parameters()}
    pixels = torch.randint(0, 256, (2, 3, vision.image_size, vision.image_size), dtype=torch.uint8)
    expected = vision(pixels)
    parking = TowerParking(vision.model, tmp_path)

    parking.park()
    assert set(_stored_bytes(vision.model)) == {0}  # every parameter's memory given up ...
    spilled = tmp_path / SPILL_FILE
    assert load_file(spilled).keys() == before.keys()  # ... after it went to the file beside the cache
    written = spilled.stat().st_mtime_ns
    with parking.unparked():
        assert all(torch.equal(param, before[name]) for name, param in vision.model.named_parameters())
        assert torch.equal(vision(pixels), expected)
    assert set(_stored_bytes(vision.model)) == {0}  # parked again after the block
    assert spilled.stat().st_mtime_ns == written  # the same tower is written once

    parking.unpark()
    assert all(torch.equal(param, before[name]) for name, param in vision.model.named_parameters())
    assert min(_stored_bytes(vision.model)) > 0


def test_a_trained_tower_is_not_parked(tmp_path):
    with pytest.raises(ValueError, match="only a frozen tower can be parked"):
        TowerParking(_tower(trained=True).model, tmp_path)


def _run(out, park: bool) -> tuple[list[dict], dict]:
    overrides = [*SMALL, "vision.train=frozen", "data.train_images=16", "data.eval_images=4", "train.batch_size=4",
                 "train.max_steps=4", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2",
                 "train.eval_examples=4", "train.save_every=2", "train.alarm_every=3", "train.alarm_warmup=0",
                 "train.alarm_examples=16", "eval.max_examples=4", "eval.caption_metrics=false", "train.device=cpu",
                 f"train.park_tower={park}"]
    metrics = train(apply_overrides(get_preset("tiny-qformer"), overrides), out)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    for record in log:
        record.pop("samples_per_second", None), record.pop("elapsed_seconds", None)
    return log, metrics


def test_a_run_that_parks_the_tower_matches_one_that_does_not(tmp_path):
    # Steps read the cache with the tower parked; evaluation, the alarm and checkpoints bring it back in between.
    parked_log, parked = _run(tmp_path / "parked", True)
    kept_log, kept = _run(tmp_path / "kept", False)
    assert [r for r in parked_log if "eval" in r] and [r for r in parked_log if "conditioning" in r]
    assert parked_log == kept_log
    assert parked["vqa_accuracy"] == kept["vqa_accuracy"]
    assert list((tmp_path / "parked/feature_cache").glob(f"*/{SPILL_FILE}"))
    assert not list((tmp_path / "kept/feature_cache").glob(f"*/{SPILL_FILE}"))
    saved = load_file(tmp_path / "parked/model/vision/model.safetensors")
    expected = load_file(tmp_path / "kept/model/vision/model.safetensors")
    assert saved.keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in saved.items())
