"""The sweep end to end on tiny runs: ordinary run folders, skipped when done, refused when changed, resumed
when cut, a failure recorded while the others go on, dependency order, the shared feature cache, submitit."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from vlmlab.cli import main
from vlmlab.study import load_study
from vlmlab.sweep import RUN_RECORD, estimate, plan_lines, plan_runs
from vlmlab.test_model import SMALL

TINY = [*SMALL, "vision.train=frozen", "data.train_images=16", "data.eval_images=4", "train.batch_size=8",
        "train.max_steps=3", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2",
        "train.eval_examples=8", "train.save_every=2", "train.alarm_every=0", "eval.caption_metrics=false"]


def study_file(tmp_path, axes: str, seeds: str = "[0, 1]", extra: str = "") -> str:
    path = tmp_path / "study.yaml"
    path.write_text(f"name: tiny\nbase:\n  preset: tiny-qformer\n  overrides: {json.dumps(TINY)}\n"
                    f"seeds: {seeds}\n{extra}axes:\n{axes}")
    return str(path)


TWO_LEVELS = "  queries:\n    q4: []\n    q2: [connector.num_queries=2]\n"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A study of two variants x two seeds, run with --jobs 2."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    study, out = study_file(tmp_path, TWO_LEVELS), tmp_path / "out"
    assert main(["sweep", study, "--out", str(out), "--jobs", "2"]) == 0
    return study, out


def test_each_run_is_an_ordinary_run_folder_and_the_report_is_written(swept):
    study, out = swept
    for variant in ("reference", "q2"):
        for seed in (0, 1):
            run = out / "runs" / variant / f"seed{seed}"
            metrics = json.loads((run / "metrics.json").read_text())
            assert (run / "model" / "config.yaml").is_file() and (run / "predictions.jsonl").is_file()
            assert metrics["visual_tokens_per_image"] == (4 if variant == "reference" else 2)
            assert metrics["environment"]["torch"] == torch.__version__  # what the figures were computed with
            assert json.loads((run / RUN_RECORD).read_text())["status"] == "done"
            assert main(["eval", "--model", str(run), "eval.max_examples=2", "eval.shuffled_control=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"reference", "q2"} and summary["ci_method"]
    assert summary["variants"]["q2"]["metrics"]["vqa_accuracy"]["n"] == 2
    assert (out / "report.md").is_file() and (out / "results.csv").is_file() and list((out / "plots").glob("*.png"))


def test_runs_of_one_seed_share_the_frozen_towers_features(swept):
    _, out = swept
    # Frozen tiny towers differ by seed (their random weights), not by connector: one cache folder per seed.
    assert len([p for p in (out / "feature_cache").iterdir() if p.is_dir()]) == 2


def test_a_second_invocation_trains_nothing(swept, capsys):
    study, out = swept
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json")}
    assert main(["sweep", study, "--out", str(out)]) == 0
    assert "4 already done, 0 to run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json")} == before


def test_a_changed_config_for_a_finished_run_is_an_error_naming_it(swept, tmp_path, capsys):
    study, out = swept
    changed = study_file(tmp_path, TWO_LEVELS.replace("connector.num_queries=2", "connector.num_queries=3"))
    assert main(["sweep", changed, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "run q2/seed0 was trained with another config" in error and len(error.strip().splitlines()) == 1
    assert "connector.num_queries: 2 -> 3" in error


def test_report_only_redraws_from_finished_runs(swept):
    study, out = swept
    (out / "report.md").unlink()
    assert main(["sweep", study, "--out", str(out), "--report"]) == 0
    assert (out / "report.md").is_file()


def test_plan_lists_runs_in_order_with_time_and_disk(swept, capsys):
    study, out = swept
    assert main(["sweep", study, "--out", str(out), "--plan"]) == 0
    text = capsys.readouterr().out
    assert "reference/seed0  done" in text and "to run: 0 runs" in text and "disk: about" in text


def test_a_failed_run_is_recorded_and_the_others_go_on(tmp_path, capsys):
    axes = "  data:\n    synthetic: []\n    missing: [data.train=nowhere.jsonl]\n"
    out = tmp_path / "out"
    assert main(["sweep", study_file(tmp_path, axes, seeds="[0]"), "--out", str(out)]) == 1
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["runs"]["reference/seed0"]["status"] == "done"
    failed = ledger["runs"]["missing/seed0"]
    assert failed["status"] == "failed" and "nowhere.jsonl" in failed["error"] and failed["error"].startswith("error:")
    summary = json.loads((out / "summary.json").read_text())
    assert "nowhere.jsonl" in summary["variants"]["missing"]["failed"]["0"]
    assert "nowhere.jsonl" in (out / "report.md").read_text()


def test_a_variant_starts_from_another_and_waits_for_it(tmp_path):
    axes = ("  start:\n    scratch: []\n    adapted: [train.init_from=@captions]\n"
            "    captions: [data.questions_per_image=0]\n")
    study_path, out = study_file(tmp_path, axes, seeds="[0]"), tmp_path / "out"
    assert [run.key for run in plan_runs(load_study(study_path), out)] == [
        "reference/seed0", "captions/seed0", "adapted/seed0"]
    assert main(["sweep", study_path, "--out", str(out), "--jobs", "2"]) == 0
    adapted = (out / "runs" / "adapted" / "seed0" / "config.yaml").read_text()
    assert str(out / "runs" / "captions" / "seed0") in adapted  # its parts' weights began there


def test_an_interrupted_run_is_resumed_from_its_checkpoint(tmp_path):
    study_path, out = study_file(tmp_path, "  only:\n    a: []\n", seeds="[0]"), tmp_path / "out"
    assert main(["sweep", study_path, "--out", str(out)]) == 0
    run = out / "runs" / "reference" / "seed0"
    record = json.loads((run / RUN_RECORD).read_text())
    (run / RUN_RECORD).write_text(json.dumps({**record, "status": "running"}))  # as a killed sweep leaves it
    (run / "metrics.json").unlink()
    assert main(["sweep", study_path, "--out", str(out)]) == 0
    commands = [line for line in (run / "sweep.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and commands[-1].endswith(f"--out {run} --resume")
    assert (run / "metrics.json").is_file()


def test_submitits_local_executor_runs_the_same_commands(tmp_path):
    study_path, out = study_file(tmp_path, "  only:\n    a: []\n", seeds="[0]"), tmp_path / "out"
    assert main(["sweep", study_path, "--out", str(out), "--launcher", "submitit-local", "--cpus", "1"]) == 0
    assert (out / "runs" / "reference" / "seed0" / "metrics.json").is_file()
    assert list((out / "submitit").iterdir())  # the executor's own job folder


LM = ["language.hidden_size=32", "language.num_layers=1", "language.num_heads=2", "language.vocab_size=400"]


def prepared_study(tmp_path, lm_words: list[str]) -> str:
    """Two levels that load a tiny LM the sweep makes first with pretrain-lm, and one that builds its own."""
    words = json.dumps(["pretrain-lm", "--family", "t5", "--steps", "2", "--scenes", "4", *lm_words])
    extra = ("scales:\n  tiny:\n    overrides: [data.world.generator=scatter, language.pretrain_steps=0]\n"
             f"    prepare: {{lm: {words}}}\n")
    axes = ("  lm:\n    own: []\n    prepared: [language.model=@prepared/lm]\n"
            "    prepared_lora: [language.model=@prepared/lm, language.train=lora]\n")
    return study_file(tmp_path, axes, seeds="[0]", extra=extra)


@pytest.fixture(scope="module")
def prepared_sweep(tmp_path_factory):
    """The prepared study's plan, printed before anything ran, and the study swept once."""
    tmp_path = tmp_path_factory.mktemp("prepared")
    study_path, out = prepared_study(tmp_path, LM), tmp_path / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["sweep", study_path, "--out", str(out), "--plan"]) == 0
    assert main(["sweep", study_path, "--out", str(out)]) == 0
    return study_path, out, printed.getvalue()


def test_a_prepared_part_is_made_once_before_the_runs_that_load_it(prepared_sweep, tmp_path, capsys):
    study_path, out, plan = prepared_sweep
    assert "made first, once: lm (vlmlab pretrain-lm --family t5" in plan
    assert "2 runs wait for their prepared parts" in plan
    assert any(line.startswith("prepared/seed0") and "?" in line for line in plan.splitlines())
    lm = out / "prepared" / "lm"
    assert json.loads((out / "prepared" / "lm.json").read_text())["status"] == "done"
    assert (lm / "config.json").is_file() and (lm / "recipe.json").is_file()
    for variant in ("prepared", "prepared_lora"):
        assert f"model: {lm}" in (out / "runs" / variant / "seed0" / "config.yaml").read_text()
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["scale"] == "tiny" and ledger["prepared"]["lm"].startswith("vlmlab pretrain-lm --out")
    report = (out / "report.md").read_text()
    assert "scale `tiny`" in report and ledger["prepared"]["lm"] in report and "--scale tiny" in report
    made = (lm / "config.json").stat().st_mtime_ns
    assert main(["sweep", study_path, "--out", str(out)]) == 0  # made once: nothing to do the second time
    assert (lm / "config.json").stat().st_mtime_ns == made
    changed = tmp_path / "study.yaml"  # the same study with another command for the same prepared name
    changed.write_text(Path(study_path).read_text().replace('"--steps", "2"', '"--steps", "3"'))
    assert main(["sweep", str(changed), "--out", str(out)]) == 2  # refused
    assert "prepared part lm was made by" in capsys.readouterr().err
    assert (lm / "config.json").stat().st_mtime_ns == made


def test_a_failed_prepared_part_fails_the_runs_that_load_it_and_no_other(tmp_path):
    study_path, out = prepared_study(tmp_path, [*LM, "language.model=gpt2"]), tmp_path / "out"
    assert main(["sweep", study_path, "--out", str(out)]) == 1
    runs = json.loads((out / "ledger.json").read_text())["runs"]
    assert runs["reference/seed0"]["status"] == "done"
    for key in ("prepared/seed0", "prepared_lora/seed0"):
        assert runs[key]["status"] == "failed" and "its prepared part lm failed" in runs[key]["error"]
        assert "language.model='gpt2' is not allowed here" in runs[key]["error"]


def test_plan_says_whether_one_seeds_gpu_runs_fit_a_colab_session(tmp_path):
    study = load_study(study_file(tmp_path, TWO_LEVELS))
    source = "GPU time on one t4, from plan"
    row = {"state": "new", "after": None, "examples": 1000, "parameters": 6e8, "trainable": 6e7, "bytes": 0,
           "cache_bytes": 0, "source": source}
    hours = {"reference": 5.0, "q2": 4.0}
    rows = [{**row, "run": f"{variant}/seed{seed}", "seconds": hours[variant] * 3600}
            for variant in hours for seed in (0, 1)]
    text = "\n".join(plan_lines(study, rows, jobs=1))
    assert "one seed's runs on one GPU: about 9.0 h of training" in text and "within a Colab session" in text
    rows[0]["seconds"] = 9 * 3600
    text = "\n".join(plan_lines(study, rows, jobs=1))
    assert "about 13.0 h" in text and "more than a Colab session" in text and "resumes a cut one" in text


def test_the_disk_estimate_counts_what_the_run_folders_hold(prepared_sweep):
    # A part saved by reference (here the prepared LM with LoRA) keeps only its adapter in the run folder.
    study_path, out, _ = prepared_sweep
    study = load_study(study_path)
    runs = plan_runs(study, out)
    estimated = {row["run"]: row["bytes"] for row in estimate(study, runs, out)}
    held = {run.key: sum(path.stat().st_size for part in ("model", "checkpoint")
                         for path in (run.directory / part).rglob("*") if path.suffix in (".safetensors", ".pt"))
            for run in runs}
    assert held["prepared_lora/seed0"] < 0.7 * held["prepared/seed0"]
    for key, size in held.items():
        assert 0.8 * size < estimated[key] < 1.2 * size, key
