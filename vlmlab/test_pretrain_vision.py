"""The world-pretrained tiny tower: it learns which (colour, shape) pairs a scene holds, is saved as a tower a run
loads by path, and the command says what it learned."""

import json

import pytest
import torch

from vlmlab.cli import main
from vlmlab.config import ConfigError, apply_overrides
from vlmlab.presets import get_preset
from vlmlab.pretrain_vision import _scenes, pretrain_vision
from vlmlab.vision import build_vision

TOWER = ["data.world.generator=scatter", "vision.hidden_size=32", "vision.num_layers=2"]


def test_the_tower_learns_the_scenes_pairs_and_loads_back_by_path(tmp_path):
    cfg = apply_overrides(get_preset("default"), TOWER)
    recipe = pretrain_vision(cfg, tmp_path / "tower", steps=150, scenes=600)
    assert json.loads((tmp_path / "tower" / "recipe.json").read_text()) == recipe
    untrained = pretrain_vision(apply_overrides(get_preset("default"), TOWER), tmp_path / "untrained", steps=1,
                                scenes=600)
    # the pairs a scene holds are scored above those it does not, far beyond chance (0.5) and one step's tower
    assert recipe["label_auc"] > 0.8 and recipe["label_auc"] > untrained["label_auc"] + 0.15
    assert recipe["label_accuracy"] >= recipe["label_base_rate"]  # never below saying "absent" to every pair
    loaded = build_vision(apply_overrides(get_preset("default"), [*TOWER, f"vision.model={tmp_path / 'tower'}"])
                          .vision).eval()
    again = build_vision(apply_overrides(get_preset("default"), [*TOWER, f"vision.model={tmp_path / 'tower'}"])
                         .vision).eval()
    pixels, labels = _scenes(cfg, 4, "val")
    with torch.no_grad():
        assert torch.equal(loaded(pixels), again(pixels))
    assert labels.shape == (4, 32) and set(labels.flatten().tolist()) <= {0.0, 1.0}
    assert (labels.sum(dim=1) >= 1).all()  # every scene holds at least one object


def test_the_pretrain_vision_command_and_its_refusals(tmp_path, capsys):
    folder = tmp_path / "tower"
    assert main(["pretrain-vision", "--out", str(folder), "--steps", "2", "--scenes", "8",
                 "vision.hidden_size=16", "vision.num_layers=1"]) == 0
    printed = capsys.readouterr().out
    assert "tiny resnet tower trained 2 steps on 8 scatter scenes" in printed
    assert f"vision.model={folder}" in printed and (folder / "preprocessor_config.json").is_file()
    assert main(["pretrain-vision", "--out", str(tmp_path / "v1"), "data.world.generator=v1"]) == 2
    assert "data.world.generator='v1' is not allowed here" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="vision.model='x' is not allowed here"):
        pretrain_vision(apply_overrides(get_preset("default"), [*TOWER, "vision.model=x"]), tmp_path / "x", 1, 1)
