"""Pinned and recorded weights: `<part>.revision` reaches the hub loads, what each name resolved to (a hub commit,
or a local folder's content hash) is written into config.yaml, the model folder and metrics.json, and loading a
model whose base by reference now resolves to other weights warns in one line. Offline: the hub is a hub cache
laid out as huggingface_hub lays it out (`models--org--name/snapshots/<commit>/`, `refs/main`), read in offline
mode, so the same code resolves names as on Colab."""

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlmlab import VLM
from vlmlab.cli import main
from vlmlab.test_families import _clip, _t5, _texts
from vlmlab.weights import folder_hash, resolve

A, B, C = "a" * 40, "b" * 40, "c" * 40
LM = "org/tiny-t5"


def _snapshot(cache, repo: str, commit: str, texts, seed: int, branch: str | None = None):
    folder = cache / f"models--{repo.replace('/', '--')}"
    torch.manual_seed(seed)  # another commit, other weights
    _t5(folder / "snapshots" / commit, texts)
    if branch:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / branch).write_text(commit)
    return folder / "snapshots" / commit


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache holding org/tiny-t5 at commits A (main) and B, read offline; and a local CLIP folder."""
    cache = tmp_path_factory.mktemp("hub")
    texts = _texts()
    snapshots = {A: _snapshot(cache, LM, A, texts, seed=1, branch="main"), B: _snapshot(cache, LM, B, texts, seed=2)}
    tower = tmp_path_factory.mktemp("tower")
    torch.manual_seed(0)
    _clip(tower, texts)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield {"cache": cache, "snapshots": snapshots, "tower": tower, "texts": texts}


@pytest.fixture(scope="module")
def run(hub, tmp_path_factory):
    """A run with a frozen local tower and a LoRA-tuned LM pinned to hub commit B (main is A)."""
    out = tmp_path_factory.mktemp("run")
    overrides = [f"{key}={value}" for key, value in (
        ("vision.model", hub["tower"]), ("vision.train", "frozen"), ("language.model", LM),
        ("language.revision", B), ("language.train", "lora"), ("language.lora_rank", 4),
        ("connector.hidden_size", 32), ("connector.num_queries", 4), ("connector.num_layers", 1),
        ("connector.num_heads", 2), ("data.train_images", 6), ("data.eval_images", 2),
        ("data.questions_per_image", 1), ("data.captions", "false"), ("train.batch_size", 4),
        ("train.max_steps", 2), ("train.eval_every", 0), ("train.save_every", 0), ("train.warmup_steps", 1),
        ("train.alarm_every", 0), ("eval.caption_metrics", "false"), ("eval.shuffled_control", "false"))]
    assert main(["train", "--out", str(out), *overrides]) == 0
    return out


def _sections(path) -> dict:
    return yaml.safe_load(path.read_text())


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_folder_hash_follows_the_files_and_ignores_hidden_ones(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"\0" * 10)
    first = folder_hash(tmp_path)
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    assert folder_hash(tmp_path) == first
    (tmp_path / "sub" / "w.bin").write_bytes(b"\0" * 9 + b"\1")
    assert folder_hash(tmp_path) != first
    assert resolve(str(tmp_path)) == f"sha256:{folder_hash(tmp_path)}" and resolve("") == ""


def test_the_revision_reaches_the_hub_load_and_what_it_resolved_to_is_recorded(hub, run):
    # The LM's base weights are commit B's, not main's (A): the revision reached every load.
    model = VLM.load(run, device="cpu")
    base = model.language.model.get_base_model().state_dict()
    pinned, main_branch = (load_file(hub["snapshots"][c] / "model.safetensors") for c in (B, A))
    name = "encoder.block.0.layer.0.SelfAttention.q.base_layer.weight"
    assert torch.equal(base[name], pinned[name.replace(".base_layer", "")])
    assert not torch.equal(base[name], main_branch[name.replace(".base_layer", "")])
    recorded = {"vision": f"sha256:{folder_hash(hub['tower'])}", "language": f"commit:{B}"}
    for config in (run / "config.yaml", run / "model" / "config.yaml"):
        sections = _sections(config)
        assert {part: sections[part]["resolved"] for part in recorded} == recorded, config
        assert sections["language"]["revision"] == B
    weights = json.loads((run / "metrics.json").read_text())["weights"]
    assert {part: weights[part]["resolved"] for part in weights} == recorded
    assert weights["language"] == {"model": LM, "revision": B, "resolved": f"commit:{B}"}


def test_eval_warns_when_a_base_by_reference_now_resolves_to_other_weights(hub, run, tmp_path, capsys):
    model_dir = shutil.copytree(run / "model", tmp_path / "model")
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir)]) == 0
    assert _warnings(capsys.readouterr().err) == []  # pinned to B, the same local files: nothing to say

    # Trained on main when main was B; main has moved on to C since.
    _snapshot(hub["cache"], LM, C, hub["texts"], seed=3, branch="main")
    config = _sections(model_dir / "config.yaml")
    config["language"]["revision"] = ""
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert main(["eval", "--model", str(model_dir)]) == 0
    out, err = capsys.readouterr()
    [warning] = _warnings(err)
    assert f"language.model='{LM}' now resolves to commit:{C}, not to the commit:{B} this model was trained" in warning
    assert f"set language.revision: {B} in {model_dir / 'config.yaml'}" in warning
    assert json.loads(out)["weights"]["language"]["resolved"] == f"commit:{C}"  # what was evaluated

    # The local tower's files change: the same kind of line, for the vision part.
    tower = shutil.copytree(hub["tower"], tmp_path / "tower")
    config["language"]["revision"], config["vision"]["model"] = B, str(tower)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    VLM.load(model_dir, device="cpu")
    assert _warnings(capsys.readouterr().err) == []  # a copy holds the same files
    torch.manual_seed(5)
    _clip(tower, hub["texts"])
    VLM.load(model_dir, device="cpu")
    [warning] = _warnings(capsys.readouterr().err)
    assert f"vision.model='{tower}' now resolves to sha256:{folder_hash(tower)}" in warning
    assert "the files at that path have changed since" in warning


def test_a_model_saved_before_weights_were_recorded_loads_without_a_word(hub, run, tmp_path, capsys):
    model_dir = shutil.copytree(run / "model", tmp_path / "model")
    config = _sections(model_dir / "config.yaml")
    for part in ("vision", "language"):
        del config[part]["resolved"], config[part]["revision"]
    config["language"]["model"] = str(hub["snapshots"][B])  # an old config named its base by path
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    capsys.readouterr()
    model = VLM.load(model_dir, device="cpu")
    assert _warnings(capsys.readouterr().err) == [] and model.config.language.resolved == ""
