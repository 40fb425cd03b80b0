"""The study report on a sweep directory built by hand: three variants x three seeds whose predictions are chosen so
every mean is known exactly (one failed run, one marked done without its metrics, diagnose reports on two variants),
and a caption-only sweep that has none of the optional files."""

import csv
import json

import numpy as np
import pytest

from vlmlab import stats
from vlmlab.metrics import accuracy_by, vqa_accuracy
from vlmlab.report import summary_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TYPES = ("color", "count", "relation")  # question i has type TYPES[i % 3]
ANSWER_TYPES = {"color": "other", "count": "number", "relation": "yes/no"}
RIGHT = {"color": "red", "count": "2", "relation": "yes"}
WRONG = {"color": "blue", "count": "3", "relation": "no"}
NUM_QUESTIONS, NUM_CAPTIONS = 36, 4
FAILED_ERROR = "error: connector.num_queries=0 is not allowed; it must be at least 1"


def predictions(correct, shuffled_correct, unusable=()) -> list[dict]:
    """36 questions (three references each, so a score is exactly 0 or 1) answered right where their index is in
    `correct` (`shuffled_correct` with shuffled images), and 4 captions of which the first is empty."""
    records = []
    for i in range(NUM_QUESTIONS):
        kind = TYPES[i % 3]
        answer = {True: RIGHT[kind], False: WRONG[kind]}
        records.append({"id": f"q{i}", "image_id": f"img{i % 12}", "question": f"question {i}?", "type": kind,
                        "answer_type": ANSWER_TYPES[kind], "answers": [RIGHT[kind]] * 3,
                        "prediction": None if i in unusable else answer[i in correct],
                        "prediction_shuffled_images": None if i in unusable else answer[i in shuffled_correct]})
    for i in range(NUM_CAPTIONS):
        records.append({"id": f"c{i}", "image_id": f"img{i}", "question": None, "type": "caption",
                        "answer_type": None, "answers": ["a red cube on the floor"],
                        "prediction": "" if i == 0 else "a red cube", "prediction_shuffled_images": "a blue ball"})
    return records


def metrics_of(records: list[dict], cider: float, costs: dict) -> dict:
    """metrics.json as evaluate and train write it for these records."""
    metrics = {}
    for suffix, field in (("", "prediction"), ("_shuffled_images", "prediction_shuffled_images")):
        scored = [(r, vqa_accuracy(r[field], r["answers"])) for r in records
                  if r["question"] is not None and r[field] is not None]
        metrics[f"vqa_accuracy{suffix}"] = sum(s for _, s in scored) / len(scored)
        metrics[f"vqa_accuracy_by_type{suffix}"] = accuracy_by((r["type"], s) for r, s in scored)
        metrics[f"vqa_accuracy_by_answer_type{suffix}"] = accuracy_by((r["answer_type"], s) for r, s in scored)
    answered = [r for r in records if r["prediction"] is not None]
    metrics["caption"] = {"BLEU-4": 0.2, "METEOR": 0.2, "ROUGE-L": 0.4, "CIDEr": cider}
    metrics["caption_shuffled_images"] = {"BLEU-4": 0.05, "METEOR": 0.1, "ROUGE-L": 0.2, "CIDEr": cider / 4}
    metrics["empty_output_rate"] = sum(not r["prediction"] for r in answered) / len(answered)
    metrics["num_eval_examples"] = len(answered)
    metrics["prompt"] = "Question: {question} Answer:"
    return {**metrics, **costs}


def write_run(directory, records, cider, costs, diagnose=None, validation=(0.3, 0.4), alarms=()):
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text("train:\n  seed: 0\n  batch_size: 8\n  max_steps: 600\n")
    log = [{"step": 100 * (i + 1), "loss": 2.0 - i, "lr": 1e-4} for i in range(len(validation))]
    log += [{"step": 100 * (i + 1), "eval": {"vqa_accuracy": accuracy}} for i, accuracy in enumerate(validation)]
    log += [{"step": 100 * (i + 1), "conditioning": {"verdict": verdict}} for i, verdict in enumerate(alarms)]
    (directory / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log) + '{"step": 3')
    (directory / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "metrics.json").write_text(json.dumps(metrics_of(records, cider, costs)))
    if diagnose:
        (directory / "diagnose.json").write_text(json.dumps(diagnose))


def diagnose_report(verdict: str, real_loss: float, causes=()) -> dict:
    return {"verdict": verdict, "suspected_causes": [{"cause": cause, "why": "...", "try": "..."} for cause in causes], "reason": "the outputs follow the image", "signals_fired": [],
            "example_outputs": ["red", "2"], "empty_output_rate": 0.025, "eos_first_rate": 0.0,
            "unchanged_with_shuffled_images": 0.3, "shuffled_image_gap": 0.25, "score_name": "vqa_accuracy",
            "score": {"real": 0.5, "shuffled": 0.25, "blank": 0.2},
            "reference_loss": {"real": real_loss, "shuffled": 2.0, "blank": 2.2}, "reference_loss_gap": 2.0 - real_loss}


def costs(trainable: int, seconds: float, **more) -> dict:
    return {"parameters_total": 1_200_000, "parameters_trainable": trainable, "visual_tokens_per_image": 16,
            "train_examples_seen": 4800, "train_tokens_seen": 96_000, "train_seconds": seconds, **more}


def ledger_entry(sweep, variant, seed, overrides, status="done", error=None) -> dict:
    command = (f"vlmlab train --out {sweep}/runs/{variant}/seed{seed} --preset default train.max_steps=600 "
               + " ".join([*overrides, f"train.seed={seed}"]))
    return {"variant": variant, "seed": seed, "dir": f"runs/{variant}/seed{seed}", "status": status, "error": error,
            "seconds": 40.0 + seed, "command": command}


OVERRIDES = {"reference": [], "q64": ["connector.num_queries=64"], "same": ["train.lr=0.0001"]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """reference: seed k answers questions 0..17+k; q64: 0..29+k, seed 1 failed, seed 2 lost the image of q35 and
    wrote its records in reverse; same: the reference's answers with q0 missed and q35 hit instead, its seed 2 marked
    done without metrics.json. Shuffled images: questions 0..8 right everywhere."""
    sweep = tmp_path_factory.mktemp("sweep")
    runs = {}
    for seed in range(3):
        runs[f"reference/seed{seed}"] = ledger_entry(sweep, "reference", seed, [])
        write_run(sweep / f"runs/reference/seed{seed}", predictions(range(18 + seed), range(9)), 0.5 + 0.05 * seed,
                  costs(100_000, 40.0 + seed, peak_memory_bytes=3 * 2**30),
                  diagnose_report("uses_image", 1.0 + 0.1 * seed), validation=(0.3, 0.4 + 0.01 * seed),
                  alarms=("ignores_image", "uses_image") if seed == 1 else ("uses_image", "uses_image"))
    for seed in (0, 2):
        runs[f"q64/seed{seed}"] = ledger_entry(sweep, "q64", seed, OVERRIDES["q64"])
        records = predictions(range(30 + seed), range(9), unusable={35} if seed == 2 else ())
        write_run(sweep / f"runs/q64/seed{seed}", records[::-1] if seed == 0 else records, 0.9 + 0.1 * seed / 2,
                  costs(150_000, 50.0, peak_memory_bytes=4 * 2**30),
                  diagnose_report("uses_image" if seed == 0 else "ignores_image", 0.8,
                                  causes=("too little data",) if seed == 0 else ("too little data", "high learning rate")),
                  validation=(0.4, 0.6))
    runs["q64/seed1"] = ledger_entry(sweep, "q64", 1, OVERRIDES["q64"], status="failed",
                                     error=f"Traceback (most recent call last):\n  ...\n{FAILED_ERROR}\n")
    for seed in range(3):
        runs[f"same/seed{seed}"] = ledger_entry(sweep, "same", seed, OVERRIDES["same"])
    for seed in (0, 1):  # an older run: no peak memory recorded
        write_run(sweep / f"runs/same/seed{seed}", predictions(set(range(1, 18 + seed)) | {35}, range(9)),
                  0.5 + 0.05 * seed, costs(100_000, 40.0 + seed))
    (sweep / "runs/same/seed2").mkdir(parents=True)
    ledger = {"name": "queries", "design": "one-at-a-time", "seeds": [0, 1, 2], "reference": "reference",
              "variants": {name: {"overrides": overrides, "levels": {"queries": name}}
                           for name, overrides in OVERRIDES.items()},
              "runs": runs}
    (sweep / "ledger.json").write_text(json.dumps(ledger))
    return sweep, write_report(sweep)


def test_means_and_values_are_the_runs_own_in_seed_order(sweep):
    _, summary = sweep
    reference = summary["variants"]["reference"]["metrics"]
    assert reference["vqa_accuracy"]["values"] == pytest.approx([18 / 36, 19 / 36, 20 / 36])
    assert reference["vqa_accuracy"]["mean"] == pytest.approx(19 / 36)
    assert reference["vqa_accuracy"]["n"] == 3
    assert reference["vqa_accuracy"]["ci_low"] < 19 / 36 < reference["vqa_accuracy"]["ci_high"]
    assert reference["vqa_accuracy_shuffled_images"]["mean"] == pytest.approx(0.25)
    assert reference["shuffled_image_gap"]["values"] == pytest.approx([9 / 36, 10 / 36, 11 / 36])
    assert reference["vqa_accuracy_by_type.color"]["values"] == pytest.approx([6 / 12, 7 / 12, 7 / 12])
    assert reference["vqa_accuracy_by_answer_type.yes/no"]["values"] == pytest.approx([6 / 12, 6 / 12, 6 / 12])
    assert reference["vqa_accuracy_by_type_shuffled_images.count"]["mean"] == pytest.approx(3 / 12)
    assert reference["empty_output_rate"]["values"] == pytest.approx([1 / 40] * 3)
    q64 = summary["variants"]["q64"]["metrics"]
    # seed 2 could not use q35's image: its score is over the 35 questions it answered
    assert q64["vqa_accuracy"]["values"] == pytest.approx([30 / 36, 32 / 35])
    assert q64["empty_output_rate"]["values"] == pytest.approx([1 / 40, 1 / 39])


def test_run_level_metrics_get_the_interval_over_seeds(sweep):
    _, summary = sweep
    cider = summary["variants"]["reference"]["metrics"]["caption.CIDEr"]
    assert cider["values"] == pytest.approx([0.5, 0.55, 0.6])
    half_width = 4.302653 * 0.05 / np.sqrt(3)  # t(0.975, df 2) x the standard error of three values 0.05 apart
    assert (cider["ci_low"], cider["ci_high"]) == pytest.approx((0.55 - half_width, 0.55 + half_width))
    assert summary["variants"]["reference"]["metrics"]["caption_shuffled_images.CIDEr"]["mean"] == pytest.approx(
        0.55 / 4)
    assert summary["variants"]["reference"]["costs"]["train_seconds"]["mean"] == pytest.approx(41.0)
    assert "peak_memory_bytes" not in summary["variants"]["same"]["costs"]


def test_failed_runs_are_recorded_and_left_out(sweep):
    _, summary = sweep
    q64, same = summary["variants"]["q64"], summary["variants"]["same"]
    assert q64["runs"] == {"0": "runs/q64/seed0", "2": "runs/q64/seed2"}
    assert q64["failed"] == {"1": FAILED_ERROR}
    assert same["runs"] == {"0": "runs/same/seed0", "1": "runs/same/seed1"}
    assert same["failed"] == {"2": "marked done but metrics.json is missing"}
    assert summary["variants"]["reference"]["failed"] == {}


def test_a_large_difference_excludes_zero_and_an_identical_variant_does_not(sweep):
    _, summary = sweep
    assert "vs_reference" not in summary["variants"]["reference"]["metrics"]["vqa_accuracy"]
    large = summary["variants"]["q64"]["metrics"]["vqa_accuracy"]["vs_reference"]
    # paired on seeds 0 and 2 over the 35 questions both answered: 12 more right in each
    assert large["difference"] == pytest.approx(12 / 35)
    assert 0 < large["ci_low"] < 12 / 35 < large["ci_high"]
    assert large["probability_of_improvement"] > 0.99
    same = summary["variants"]["same"]["metrics"]["vqa_accuracy"]["vs_reference"]
    assert same["difference"] == pytest.approx(0.0)
    assert same["ci_low"] < 0 < same["ci_high"]
    assert same["probability_of_improvement"] == pytest.approx(0.5)


def test_the_difference_is_paired_example_by_example(sweep):
    """The interval comes from the variant-minus-reference matrix on shared seeds and shared example ids."""
    _, summary = sweep
    shared = [i for i in range(NUM_QUESTIONS) if i != 35]
    variant = np.array([[float(i < 30 + seed) for i in shared] for seed in (0, 2)])
    reference = np.array([[float(i < 18 + seed) for i in shared] for seed in (0, 2)])
    assert summary["variants"]["q64"]["metrics"]["vqa_accuracy"]["vs_reference"] == pytest.approx(
        stats.compare(variant, reference))


def test_diagnose_scalars_and_verdicts(sweep):
    _, summary = sweep
    metrics = summary["variants"]["reference"]["metrics"]
    assert metrics["diagnose.reference_loss.real"]["values"] == pytest.approx([1.0, 1.1, 1.2])
    assert metrics["diagnose.reference_loss_gap"]["mean"] == pytest.approx(0.9)
    assert "diagnose.verdict" not in metrics and "diagnose.example_outputs.0" not in metrics
    q64 = summary["variants"]["q64"]
    assert q64["verdicts"] == {"ignores_image": 1, "uses_image": 1}
    assert q64["suspected_causes"] == {"too little data": 2, "high learning rate": 1}
    assert summary["variants"]["reference"]["alarms"] == {"0": "--", "1": "i-", "2": "--"}
    assert "alarms" not in q64 and summary["variants"]["reference"]["suspected_causes"] == {}
    # seeds 0 and 2: gaps 1.2 and 1.2 against 1.0 and 0.8
    assert q64["metrics"]["diagnose.reference_loss_gap"]["vs_reference"]["difference"] == pytest.approx(0.3)
    assert "verdicts" not in summary["variants"]["same"]
    assert "diagnose.reference_loss_gap" not in summary["variants"]["same"]["metrics"]


def test_summary_json_is_what_is_returned_and_a_second_report_is_the_same(sweep):
    directory, summary = sweep
    written = (directory / "summary.json").read_text()
    assert json.loads(written) == summary
    assert summary["ci_method"] == stats.CI_METHOD and summary["seeds"] == [0, 1, 2]
    assert summary["variants"]["q64"]["overrides"] == ["connector.num_queries=64"]
    assert write_report(directory) == summary
    assert (directory / "summary.json").read_text() == written


def test_results_csv_has_a_row_per_run(sweep):
    directory, _ = sweep
    with (directory / "results.csv").open() as rows:
        rows = {(row["variant"], row["seed"]): row for row in csv.DictReader(rows)}
    assert len(rows) == 9
    assert rows[("q64", "1")]["status"] == "failed" and rows[("q64", "1")]["error"] == FAILED_ERROR
    assert rows[("same", "2")]["status"] == "failed" and rows[("same", "2")]["vqa_accuracy"] == ""
    assert float(rows[("reference", "1")]["vqa_accuracy"]) == pytest.approx(19 / 36)
    assert float(rows[("reference", "1")]["caption.CIDEr"]) == pytest.approx(0.55)
    assert float(rows[("q64", "0")]["parameters_trainable"]) == 150_000
    assert float(rows[("q64", "0")]["seconds"]) == 40.0
    assert rows[("same", "0")]["peak_memory_bytes"] == ""


def table_row(report: str, section: str, variant: str) -> str:
    """The line of `variant` in the first table after the heading `section`."""
    after = report.split(f"\n## {section}\n", 1)[1]
    return next(line for line in after.splitlines() if line.startswith(f"| `{variant}` |"))


def test_report_md_has_the_tables_marks_and_commands(sweep):
    directory, _ = sweep
    report = (directory / "report.md").read_text()
    assert report.startswith("# Study: queries")
    assert "## How to read this" in report and stats.ASSUMPTIONS in report
    assert "**" in table_row(report, "vqa_accuracy", "q64")
    assert "**" not in table_row(report, "vqa_accuracy", "same")
    assert "0.528 [" in table_row(report, "vqa_accuracy", "reference")  # 19/36 with its interval
    assert "0.250 [" in table_row(report, "vqa_accuracy", "reference")  # beside its shuffled-image control
    assert "| 2/3 |" in table_row(report, "vqa_accuracy", "q64")
    assert "## caption.CIDEr" in report and "## diagnose.reference_loss_gap" in report
    assert "## VQA accuracy by question type" in report and "| relation | `q64` |" in report
    assert "## VQA accuracy by answer type" in report
    assert "uses_image x1" in table_row(report, "Diagnose verdicts", "q64")
    assert "too little data x2" in table_row(report, "Diagnose verdicts", "q64")
    assert "-- i- --" in table_row(report, "Diagnose verdicts", "reference")
    costs_row = table_row(report, "Costs (mean over finished seeds)", "reference")
    assert "100k" in costs_row and "3.00 GiB" in costs_row and "41.0" in costs_row
    assert f"- `q64/seed1`: {FAILED_ERROR}" in report
    assert f"vlmlab train --out {directory}/runs/q64/seed0 --preset default" in report
    assert "# same/seed2 (failed)" in report  # marked done in the ledger, but without its metrics
    assert f"vlmlab sweep STUDY.yaml --out {directory} --report" in report
    assert "![vqa_accuracy](plots/vqa_accuracy.png)" in report


def test_plots_are_png_files(sweep):
    directory, _ = sweep
    names = {path.name for path in (directory / "plots").iterdir()}
    assert {"vqa_accuracy.png", "caption_CIDEr.png", "validation.png", "cost.png",
            "diagnose_reference_loss_gap.png"} <= names
    for name in names:
        assert (directory / "plots" / name).read_bytes()[:8] == PNG_SIGNATURE


def test_summary_table_marks_the_real_difference(sweep):
    _, summary = sweep
    lines = summary_table(summary)
    assert lines[0].split()[:3] == ["variant", "done/failed", "vqa_accuracy"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert rows["q64"].startswith("q64") and "2/1" in rows["q64"] and rows["q64"].endswith("*")
    assert "*" not in rows["same"] and "3/0" in rows["reference"]
    assert "0.528 [" in rows["reference"] and "0.250 [" in rows["reference"]


def test_a_caption_only_sweep_without_optional_files(tmp_path):
    """vqa_accuracy null, no predictions, log, config, costs or diagnose; a broken metrics.json; a pending run."""
    (tmp_path / "runs/reference/seed0").mkdir(parents=True)
    (tmp_path / "runs/reference/seed0/metrics.json").write_text(json.dumps(
        {"vqa_accuracy": None, "vqa_accuracy_by_type": {}, "caption": {"CIDEr": 0.8}, "empty_output_rate": 0.0}))
    (tmp_path / "runs/broken/seed0").mkdir(parents=True)
    (tmp_path / "runs/broken/seed0/metrics.json").write_text('{"vqa_accuracy": 0.')
    runs = {"reference/seed0": ledger_entry(tmp_path, "reference", 0, []),
            "reference/seed1": ledger_entry(tmp_path, "reference", 1, [], status="pending"),
            "broken/seed0": ledger_entry(tmp_path, "broken", 0, ["train.lr=1"])}
    ledger = {"name": "captions", "design": "grid", "seeds": [0, 1], "reference": "reference",
              "variants": {"reference": {"overrides": []}, "broken": {"overrides": ["train.lr=1"]}}, "runs": runs}
    (tmp_path / "ledger.json").write_text(json.dumps(ledger))
    summary = write_report(tmp_path)
    reference = summary["variants"]["reference"]
    assert set(reference["metrics"]) == {"caption.CIDEr", "empty_output_rate"}
    assert reference["metrics"]["caption.CIDEr"] == {"mean": 0.8, "ci_low": None, "ci_high": None, "n": 1,
                                                     "values": [0.8]}
    assert reference["costs"] == {} and reference["failed"] == {}
    assert summary["variants"]["broken"]["failed"]["0"].startswith("marked done but metrics.json is unreadable")
    assert {path.name for path in (tmp_path / "plots").iterdir()} == {"caption_CIDEr.png"}
    report = (tmp_path / "report.md").read_text()
    assert "## caption.CIDEr" in report and "## Costs" not in report and "## vqa_accuracy" not in report
    assert "# reference/seed1 (pending)" in report
    with (tmp_path / "results.csv").open() as rows:
        assert [row["status"] for row in csv.DictReader(rows)] == ["done", "pending", "failed"]
    assert summary_table(summary)[1].split()[:3] == ["reference", "1/0", "0.800"]
