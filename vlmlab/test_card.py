"""`vlmlab export` writes a model card and can push to the hub (mocked); `VLM.load("user/repo")` reads the hub cache."""

import json
import shutil

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from vlmlab import VLM
from vlmlab.cli import main
from vlmlab.data.synthetic import make_split
from vlmlab.test_cli import FAST

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--out", str(run), *FAST, "train.max_steps=2", "train.eval_every=0",
                 "train.save_every=0"]) == 0
    out = tmp_path_factory.mktemp("export") / "tiny"
    assert main(["export", "--model", str(run), "--out", str(out)]) == 0
    return run, out


def test_the_card_says_what_the_model_is_and_how_to_get_it_again(exported):
    run, out = exported
    text = (out / "README.md").read_text()
    for needle in ("## Architecture", "tiny resnet tower", "`mlp`", "tiny t5 LM", "fusion**: `prefix`",
                   "**vision**: `full`", "**language**: `full`", "Question: {question} Answer:",
                   "at most 10 new tokens", "| VQA accuracy | ", "vlmlab train --out runs/", "--config train_config.yaml",
                   "transformers:", "VLM.load("):
        assert needle in text, needle
    metrics = json.loads((run / "metrics.json").read_text())
    assert (f"| VQA accuracy | {metrics['vqa_accuracy']:.3f} | {metrics['vqa_accuracy_shuffled_images']:.3f} |"
            in text)
    assert (out / "metrics.json").is_file() and (out / "train_config.yaml").is_file()
    card = ModelCard.load(out / "README.md")
    assert {"vlmlab", "vision-language", "visual-question-answering"} <= set(card.data.tags)
    assert card.data.library_name == "vlmlab"
    assert [r.metric_value for r in card.data.eval_results] == [metrics["vqa_accuracy"],
                                                                 metrics["vqa_accuracy_shuffled_images"]]


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(exported, tmp_path, monkeypatch, capsys):
    run, _ = exported
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw["private"])) or
                        f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"])))
    out = tmp_path / "pushed"
    assert main(["export", "--model", str(run), "--out", str(out), "--push-to-hub", "user/repo", "--private"]) == 0
    assert calls == [("create", "user/repo", True), ("upload", "user/repo", str(out))]
    assert 'VLM.load("user/repo")' in (out / "README.md").read_text()

    def refuse(self, repo_id, **kw):
        raise huggingface_hub.errors.LocalTokenNotFoundError("Token is required (`token=True`), but no token found."
                                                             "\nYou need to log in: `hf auth login`.")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    capsys.readouterr()
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "again"), "--push-to-hub", "user/repo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "user/repo" in err and "no token found" in err


def test_load_by_hub_id_reads_the_cache_offline(exported, tmp_path, monkeypatch):
    _, out = exported
    repo = tmp_path / "models--user--repo"
    shutil.copytree(out, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    image = make_split("test", 1)[0].image
    question = "what color is the circle?"
    assert VLM.load("user/repo", device="cpu").ask(image, question) == VLM.load(out, device="cpu").ask(image, question)
    with pytest.raises(FileNotFoundError, match="user/missing: no such folder, and not in the hub cache"):
        VLM.load("user/missing", device="cpu")
