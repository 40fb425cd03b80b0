"""`vlmlab report RUN` and the report `vlmlab train` draws at the end of a run: valid PNGs, a page that names them,
the headline numbers and the sample questions; a partial run still gets a page, a missing one one error line."""

import json
import shutil

import pytest

from vlmlab.cli import main
from vlmlab.test_model import SMALL

# Periodic eval and the alarm on, so every plot has its input; caption metrics off (they need Java, seconds).
RUN = [*SMALL, "data.train_images=6", "data.eval_images=3", "train.batch_size=6", "train.max_steps=4",
       "train.log_every=1", "train.eval_every=2", "train.eval_examples=8", "train.alarm_every=2",
       "train.alarm_warmup=2", "train.alarm_examples=8", "train.warmup_steps=1", "train.save_every=0",
       "eval.caption_metrics=false"]
PLOTS = ("training.png", "validation.png", "conditioning.png", "by_type.png", "samples.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--out", str(out), *RUN]) == 0
    return out


def test_train_writes_plots_and_a_page_naming_them(run):
    page = (run / "report" / "index.html").read_text()
    for name in PLOTS:
        assert (run / "report" / name).read_bytes()[:8] == PNG_SIGNATURE, name
        assert f'src="{name}"' in page
    metrics = json.loads((run / "metrics.json").read_text())
    assert f"{metrics['vqa_accuracy']:.1%}" in page and f"{metrics['vqa_accuracy_shuffled_images']:.1%}" in page
    questions = [json.loads(line)["question"] for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert next(q for q in questions if q).replace("'", "&#x27;") in page  # html.escape'd


def test_report_command_regenerates(run, capsys):
    shutil.rmtree(run / "report")
    assert main(["report", str(run)]) == 0
    assert str(run / "report" / "index.html") in capsys.readouterr().out
    assert all((run / "report" / name).is_file() for name in PLOTS)


def test_a_run_without_log_or_predictions_still_gets_a_page(run, tmp_path):
    shutil.copy(run / "metrics.json", tmp_path / "metrics.json")
    shutil.copy(run / "config.yaml", tmp_path / "config.yaml")
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert 'src="by_type.png"' in page and "training.png" not in page and "VQA accuracy" in page
    (tmp_path / "metrics.json").unlink()
    assert main(["report", str(tmp_path)]) == 0  # config.yaml alone: an empty but valid page, no stale plots
    assert not (tmp_path / "report" / "by_type.png").exists()


def test_a_missing_run_directory_is_one_error_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nothing" in err and len(err.splitlines()) == 1


def test_a_failing_report_only_warns(tmp_path, monkeypatch, capsys):
    import vlmlab.run_report

    def broken(run_dir, examples=None):
        raise RuntimeError("no fonts\nmatplotlib gave up")

    monkeypatch.setattr(vlmlab.run_report, "write_run_report", broken)
    assert main(["train", "--out", str(tmp_path), *RUN]) == 0
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "predictions.jsonl").is_file()
    warning = [line for line in capsys.readouterr().err.splitlines() if "report" in line]
    assert warning == ["warning: run report not written: RuntimeError: matplotlib gave up"]


def test_control_characters_in_an_answer_are_shown_escaped():
    from vlmlab.run_report import short

    assert short("re\x13d  and\nblue") == "re\\x13d and blue"
    assert len(short("\x00" * 40, 10)) == 10
