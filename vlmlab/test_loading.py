"""Safe loading: weights only from safetensors, no remote code unless asked, and a saved model whose config and
weights disagree is refused with one line that says where and how."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmlab import VLM
from vlmlab.config import DataConfig
from vlmlab.data.synthetic import make_split
from vlmlab.loading import CheckpointError
from vlmlab.model import build_vlm
from vlmlab.test_model import small
from vlmlab.prompts import training_texts


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model (read-only: tests copy it before breaking it)."""
    directory = tmp_path_factory.mktemp("saved") / "model"
    examples = make_split("train", 4, questions_per_image=1)
    torch.manual_seed(0)
    build_vlm(small("tiny-qformer"), training_texts(examples, DataConfig())).save(directory)
    return directory


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "model")


def _one_line_error(directory) -> str:
    with pytest.raises(CheckpointError) as err:
        VLM.load(directory, device="cpu")
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_saved_model_loads_complete(saved):
    model = VLM.load(saved, device="cpu")
    for part in (model.vision.model, model.language.model):
        assert part.loading_info == {"missing_keys": set(), "unexpected_keys": set()}


def test_connector_weights_that_do_not_fit_the_config_are_refused(copy):
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace("num_queries: 4", "num_queries: 6"))
    message = _one_line_error(copy)
    assert "connector.safetensors" in message and "connector.num_queries=6" in message
    assert "queries [4, 32] saved, [6, 32] expected" in message


def test_missing_and_unexpected_connector_keys_are_named(copy):
    weights = load_file(copy / "connector.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    weights["stray.weight"] = torch.zeros(2)
    save_file(weights, copy / "connector.safetensors")
    message = _one_line_error(copy)
    assert f"missing {dropped}" in message and "unexpected stray.weight" in message


@pytest.mark.parametrize("part", ["vision", "language"])
def test_a_part_with_missing_weights_is_refused_not_filled_at_random(copy, part):
    weights = load_file(copy / part / "model.safetensors")
    dropped = next(k for k in sorted(weights) if ".0." in k)  # a block's weight, tied to no other
    del weights[dropped]
    save_file(weights, copy / part / "model.safetensors", metadata={"format": "pt"})
    message = _one_line_error(copy)
    assert str(copy / part) in message and f"missing {dropped}" in message


def test_a_part_whose_shapes_differ_from_its_config_json_is_refused(copy):
    weights = load_file(copy / "vision" / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("fc1.weight"))
    weights[name] = torch.zeros(3, weights[name].shape[1])
    save_file(weights, copy / "vision" / "model.safetensors", metadata={"format": "pt"})
    message = _one_line_error(copy)
    assert "vision.model=" in message and f"{name} [3, 32] saved, [128, 32] expected" in message


def test_truncated_weights_are_refused(copy):
    data = (copy / "connector.safetensors").read_bytes()
    (copy / "connector.safetensors").write_bytes(data[: len(data) // 2])
    assert "not a readable safetensors file" in _one_line_error(copy)


def test_pickled_weights_are_never_loaded(copy, tmp_path):
    # A pickle can run code when loaded: the same weights as pytorch_model.bin are refused, not unpickled.
    weights = load_file(copy / "language" / "model.safetensors")
    (copy / "language" / "model.safetensors").unlink()
    torch.save(weights, copy / "language" / "pytorch_model.bin")
    message = _one_line_error(copy)
    assert "language.model=" in message and "only from safetensors" in message


def test_remote_code_runs_only_when_asked(copy, tmp_path):
    # A checkpoint of an architecture transformers does not know, whose config.json points at code of its own.
    config = (copy / "language" / "config.json").read_text().replace('"model_type": "t5"', '"model_type": "custom-lm"')
    (copy / "language" / "config.json").write_text(
        config.replace("{", '{"auto_map": {"AutoConfig": "custom_code.CustomConfig"},', 1))
    marker = tmp_path / "code-ran"
    (copy / "language" / "custom_code.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    message = _one_line_error(copy)
    assert "language.trust_remote_code=true" in message and not marker.exists()
