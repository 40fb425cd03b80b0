"""End to end through the command line: a few training steps in seconds, then eval, ask, caption, errors."""

import json

import pytest
from safetensors.torch import load_file

from vlmlab import VLM
from vlmlab.cli import main
from vlmlab.data.synthetic import make_split
from vlmlab.test_model import SMALL

FAST = [*SMALL, "data.train_images=24", "data.eval_images=6", "train.batch_size=8", "train.max_steps=4",
        "train.log_every=1", "train.eval_every=2", "train.eval_examples=8", "train.save_every=2",
        "train.warmup_steps=1", "eval.caption_metrics=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--out", str(out), *FAST]) == 0
    return out


def test_train_writes_the_run_directory(run):
    for name in ("config.yaml", "metrics.json", "train_log.jsonl", "predictions.jsonl", "model/config.yaml",
                 "model/connector.safetensors", "model/vision/model.safetensors", "model/language/tokenizer.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("vqa_accuracy", "vqa_accuracy_shuffled_images", "caption", "caption_shuffled_images",
                "empty_output_rate", "num_eval_examples", "train_seconds", "train_samples_per_second"):
        assert key in metrics, key
    assert 0 <= metrics["vqa_accuracy"] <= 1 and metrics["num_eval_examples"] == 6 * 4
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "eval" in r] == [2]


def test_eval_ask_caption(run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--out", str(tmp_path / "m.json"), "eval.shuffled_control=false"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "m.json").read_text()) and "vqa_accuracy_shuffled_images" not in printed

    image = tmp_path / "img.png"
    make_split("test", 1)[0].image.save(image)
    assert main(["ask", "--model", str(run), str(image), "what color is the circle?"]) == 0
    answer = capsys.readouterr().out
    assert answer.endswith("\n") and answer.strip() == VLM.load(run).ask(image, "what color is the circle?")

    (tmp_path / "broken.jpg").write_bytes(b"nope")
    assert main(["caption", "--model", str(run), str(image), str(tmp_path / "broken.jpg"), str(image)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [("caption" in r, "error" in r) for r in lines] == [(True, False), (False, True), (True, False)]
    assert lines[0]["caption"] == lines[2]["caption"] and "broken.jpg" in lines[1]["error"]


def test_errors_are_one_line_and_non_zero(run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "x"), "train.max_step=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "max_steps" in err[0]
    assert main(["ask", "--model", str(tmp_path / "nothing"), "x.png", "q?"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["ask", "--model", str(run), str(tmp_path / "missing.png"), "q?"]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "y"), "--preset", "huge"]) == 2
    assert "valid: default" in capsys.readouterr().err


def test_a_huge_image_is_one_error_line_and_caption_goes_on(run, tmp_path, capsys):
    from vlmlab.test_images import png_header

    image, bomb = tmp_path / "img.png", tmp_path / "bomb.png"
    make_split("test", 1)[0].image.save(image)
    bomb.write_bytes(png_header(30_000, 30_000))  # 65 bytes whose header says 900 megapixels
    capsys.readouterr()
    for explain in ([], ["--explain", str(tmp_path / "heat.png")]):
        assert main(["ask", "--model", str(run), *explain, str(bomb), "what color is the circle?"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == (
            f"error: {bomb}: refused, too many pixels (900,000,000; the limit is 90,000,000, against decompression "
            f"bombs)\n")
    assert main(["caption", "--model", str(run), str(bomb), str(image)]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"image": str(bomb), "error": f"{bomb}: refused, too many pixels (900,000,000; the limit is "
                                                      f"90,000,000, against decompression bombs)"}
    assert lines[1] == {"image": str(image), "caption": VLM.load(run).caption(image)}


def test_presets_lists_every_preset(capsys):
    from vlmlab.presets import PRESETS

    assert main(["presets"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(PRESETS)


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_ends(run, tmp_path, monkeypatch):
    import vlmlab.train as training

    real_append = training.append_log

    def interrupt_at_step_three(path, record):
        if record.get("step") == 3 and "loss" in record:
            raise KeyboardInterrupt
        real_append(path, record)

    monkeypatch.setattr(training, "append_log", interrupt_at_step_three)
    assert main(["train", "--out", str(tmp_path), *FAST]) == 130  # the checkpoint of step 2 is on disk
    monkeypatch.setattr(training, "append_log", real_append)
    assert main(["train", "--out", str(tmp_path), "--resume"]) == 0
    resumed = load_file(tmp_path / "model" / "connector.safetensors")
    uninterrupted = load_file(run / "model" / "connector.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)
    assert json.loads((tmp_path / "metrics.json").read_text())["vqa_accuracy"] == json.loads(
        (run / "metrics.json").read_text())["vqa_accuracy"]
