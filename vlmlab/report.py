"""A study's report from its finished runs: `summary.json`, `results.csv`, `report.md` and `plots/*.png`.

Reads `ledger.json` and the run directories it names, never trains or runs a model, so `vlmlab sweep STUDY --out DIR
--report` redraws everything from what is on disk. Each metric is summarised per variant with an interval over
seeds and a paired difference against the reference variant (`vlmlab.stats`). Where a metric has per-example scores
(`predictions.jsonl`), the statistics get the [seeds, examples] matrix aligned by example id, so the interval also
covers the eval set being a sample; caption scores and diagnose values exist only per run and go as [seeds].
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure

from vlmlab import stats
from vlmlab.log import warn
from vlmlab.metrics import vqa_accuracy

# metrics.json key -> (the per-example column it averages, the record field splitting it into one metric per value),
# or None for a metric that exists only per run. A dict value in metrics.json becomes one metric per key (KEY.SUB).
METRICS = {
    "vqa_accuracy": ("real", None),
    "vqa_accuracy_shuffled_images": ("shuffled", None),
    "vqa_accuracy_by_type": ("real", "type"),
    "vqa_accuracy_by_type_shuffled_images": ("shuffled", "type"),
    "vqa_accuracy_by_answer_type": ("real", "answer_type"),
    "vqa_accuracy_by_answer_type_shuffled_images": ("shuffled", "answer_type"),
    "shuffled_image_gap": ("gap", None),  # not in metrics.json: vqa_accuracy - vqa_accuracy_shuffled_images
    "empty_output_rate": ("empty", None),
    "caption": None,
    "caption_shuffled_images": None,
}
# The metrics a reader looks at first, each with its shuffled-image control (None: it is a control itself).
MAIN_METRICS = {
    "vqa_accuracy": "vqa_accuracy_shuffled_images",
    "caption.CIDEr": "caption_shuffled_images.CIDEr",
    "diagnose.shuffled_image_gap": None,
    "diagnose.reference_loss_gap": None,
    "diagnose.unchanged_with_shuffled_images": None,
}
BREAKDOWNS = {"vqa_accuracy_by_type": "question type", "vqa_accuracy_by_answer_type": "answer type"}


def _count(value: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def _bytes(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


# metrics.json key -> (column header, how its mean is written)
COSTS = {
    "parameters_total": ("parameters (total)", _count),
    "parameters_trainable": ("parameters (trainable)", _count),
    "visual_tokens_per_image": ("visual tokens / image", _count),
    "train_examples_seen": ("examples seen", _count),
    "train_tokens_seen": ("tokens seen", _count),
    "train_seconds": ("train seconds", lambda value: f"{value:.1f}"),
    "peak_memory_bytes": ("peak memory", _bytes),
}
COST_AXES = ("parameters_trainable", "train_seconds")  # what the score-against-cost plot puts the score against


@dataclass
class Run:
    """One ledger entry and, when it finished, what its directory holds."""

    variant: str
    seed: int
    ledger_entry: dict
    status: str
    error: str | None
    values: dict = field(default_factory=dict)  # metric -> the run's value, from its files
    examples: dict = field(default_factory=dict)  # metric -> {example id: score}, from predictions.jsonl
    costs: dict = field(default_factory=dict)
    verdict: str | None = None
    causes: list = field(default_factory=list)  # the suspected causes diagnose named
    alarms: str = ""  # the training-time alarm at each check: "-" uses the image, "i" ignores it, "c" collapsed
    curve: list = field(default_factory=list)  # (training examples seen, validation VQA accuracy)


# ------------------------------------------------------------------------------------------------ reading runs


def one_line(text: str | None) -> str | None:
    """The last non-empty line: a traceback's or a CLI's `error: ...` line, the one that says what went wrong."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()] if text else []
    return lines[-1] if lines else None


def flatten(values: dict, prefix: str = "") -> dict:
    """The numeric scalars of `values`, nested dicts' keys joined with dots; strings, lists, bools, None dropped."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; none when it is missing. A line cut by a killed writer is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [record for record in records if isinstance(record, dict)]


def read_metrics(directory: Path) -> dict:
    """A run's metrics.json; ValueError with a one-line reason when it is missing or unreadable."""
    path = directory / "metrics.json"
    if not path.is_file():
        raise ValueError(f"marked done but {path.name} is missing")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"marked done but {path.name} is unreadable: {one_line(str(err))}") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"marked done but {path.name} is not a JSON object")
    return metrics


def read_diagnose(directory: Path) -> dict:
    """The run's `vlmlab diagnose --json` report, or {} when it has none (a broken one is warned about)."""
    path = directory / "diagnose.json"
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warn(f"{path}: left out of the report, unreadable ({one_line(str(err))})")
        return {}
    return report if isinstance(report, dict) else {}


def run_values(metrics: dict, diagnose: dict) -> dict:
    """Every scalar metric of a run, by its flattened name."""
    values = flatten({key: metrics.get(key) for key in METRICS})
    if "vqa_accuracy" in values and "vqa_accuracy_shuffled_images" in values:
        values["shuffled_image_gap"] = values["vqa_accuracy"] - values["vqa_accuracy_shuffled_images"]
    values.update(flatten(diagnose, "diagnose."))
    return values


def vqa_score(record: dict, prediction_field: str) -> float | None:
    """The VQA accuracy of one answer, None for a caption example or an unusable image."""
    prediction = record.get(prediction_field)
    if record.get("question") is None or prediction is None or not record.get("answers"):
        return None
    return vqa_accuracy(prediction, record["answers"])


def example_columns(record: dict) -> dict:
    """The per-example scores the metrics average (each VQA answer scored once, however many metrics use it)."""
    real, shuffled = vqa_score(record, "prediction"), vqa_score(record, "prediction_shuffled_images")
    prediction = record.get("prediction")
    return {
        "real": real,
        "shuffled": shuffled,
        "gap": None if real is None or shuffled is None else real - shuffled,
        "empty": None if prediction is None else float(not prediction),  # as evaluate counts: answered examples
    }


def example_scores(records: list[dict]) -> dict:
    """metric -> {example id: score} for the metrics of METRICS that have per-example scores."""
    scores: dict[str, dict] = {}
    for record in records:
        columns = example_columns(record)
        for name, definition in METRICS.items():
            if definition is None or columns[definition[0]] is None:
                continue
            column, split = definition
            if split is not None:
                if not record.get(split):
                    continue
                name = f"{name}.{record[split]}"
            scores.setdefault(name, {})[record["id"]] = columns[column]
    return scores


def batch_size(run_dir: Path) -> int | None:
    """train.batch_size from a run's config.yaml, or None: examples seen = step x batch size (every step draws a
    full batch). The study report and a run's report both put steps on that axis."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        return int(config["train"]["batch_size"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None


def validation_curve(directory: Path) -> list[tuple[int, float]]:
    """(training examples seen, validation VQA accuracy) at each evaluation the training log holds."""
    batch = batch_size(directory)
    if batch is None:
        return []  # without the batch size the steps cannot be put on the examples-seen axis
    return [
        (record["step"] * batch, record["eval"]["vqa_accuracy"])
        for record in read_jsonl(directory / "train_log.jsonl")
        if isinstance(record.get("eval"), dict) and record["eval"].get("vqa_accuracy") is not None
    ]


def alarm_marks(log: list[dict]) -> str:
    """The training-time alarm's verdict at each of its checks, one letter each (train_log.jsonl's records)."""
    verdicts = [record["conditioning"].get("verdict", "") for record in log
                if isinstance(record.get("conditioning"), dict)]
    return "".join("-" if verdict == "uses_image" else verdict[:1] for verdict in verdicts)


def load_run(sweep_dir: Path, entry: dict) -> Run:
    """A ledger entry as a Run; one marked done whose metrics cannot be read counts as failed."""
    run = Run(entry["variant"], entry["seed"], entry, entry.get("status", "pending"), one_line(entry.get("error")))
    if run.status != "done":
        return run
    directory = sweep_dir / entry["dir"]
    try:
        metrics = read_metrics(directory)
    except ValueError as err:
        run.status, run.error = "failed", str(err)
        return run
    diagnose = read_diagnose(directory)
    run.values = run_values(metrics, diagnose)
    run.examples = example_scores(read_jsonl(directory / "predictions.jsonl"))
    run.costs = flatten({key: metrics.get(key) for key in COSTS})
    run.verdict = diagnose.get("verdict")
    run.causes = [cause["cause"] for cause in diagnose.get("suspected_causes", []) if isinstance(cause, dict)]
    run.alarms = alarm_marks(read_jsonl(directory / "train_log.jsonl"))
    run.curve = validation_curve(directory)
    return run


def load_runs(sweep_dir: Path, ledger: dict) -> list[Run]:
    """Every run of the ledger, in the ledger's variant order and then by seed."""
    order = {name: index for index, name in enumerate(ledger["variants"])}
    runs = [load_run(sweep_dir, entry) for entry in ledger["runs"].values() if entry["variant"] in order]
    return sorted(runs, key=lambda run: (order[run.variant], run.seed))


# ------------------------------------------------------------------------------------------------ statistics


def samples(runs: list[Run], metric: str) -> np.ndarray:
    """[K, N] per-example scores on the example ids every run scored, when every run has them; else the [K] run
    values (an older run without predictions.jsonl, a caption score, a diagnose value)."""
    per_example = [run.examples.get(metric) for run in runs]
    if all(per_example):
        common = sorted(set.intersection(*(set(scores) for scores in per_example)), key=str)
        if common:
            return np.array([[scores[i] for i in common] for scores in per_example])
    return np.array([run.values[metric] for run in runs])


def metric_summary(metric: str, runs: list[Run], reference_runs: list[Run] | None) -> dict:
    """The metric over a variant's finished runs; `vs_reference` on the seeds it shares with `reference_runs`
    (None for the reference itself)."""
    scored = [run for run in runs if metric in run.values]
    summary = {
        **stats.summarize(samples(scored, metric)),
        "mean": float(np.mean([run.values[metric] for run in scored])),  # the runs' own numbers, all examples
        "values": [run.values.get(metric) for run in runs],
    }
    reference_by_seed = {run.seed: run for run in reference_runs or [] if metric in run.values}
    paired = [run for run in scored if run.seed in reference_by_seed]
    if paired:
        both = samples([*paired, *(reference_by_seed[run.seed] for run in paired)], metric)
        summary["vs_reference"] = stats.compare(both[: len(paired)], both[len(paired):])
    return summary


def variant_summary(spec: dict, runs: list[Run], reference_runs: list[Run] | None) -> dict:
    finished = [run for run in runs if run.status == "done"]
    metric_names = dict.fromkeys(name for run in finished for name in run.values)
    cost_names = dict.fromkeys(name for run in finished for name in run.costs)
    summary = {
        "overrides": spec.get("overrides", []),
        "levels": spec.get("levels", {}),
        "runs": {str(run.seed): run.ledger_entry["dir"] for run in finished},
        "failed": {str(run.seed): run.error for run in runs if run.status == "failed"},
        "costs": {
            name: stats.summarize(np.array([run.costs[name] for run in finished if name in run.costs]))
            for name in cost_names
        },
        "metrics": {name: metric_summary(name, finished, reference_runs) for name in metric_names},
    }
    verdicts = Counter(run.verdict for run in finished if run.verdict)
    if verdicts:
        summary["verdicts"] = dict(sorted(verdicts.items()))
        summary["suspected_causes"] = dict(Counter(cause for run in finished for cause in run.causes))
    if any(run.alarms for run in finished):
        summary["alarms"] = {str(run.seed): run.alarms for run in finished}
    return summary


def summarize_study(ledger: dict, runs: list[Run]) -> dict:
    reference = ledger.get("reference")
    reference_runs = [run for run in runs if run.variant == reference and run.status == "done"]
    return {
        "name": ledger.get("name"),
        "design": ledger.get("design"),
        "seeds": ledger.get("seeds", []),
        "ci_method": stats.CI_METHOD,
        "reference": reference,
        "variants": {
            name: variant_summary(spec, [run for run in runs if run.variant == name],
                                  None if name == reference else reference_runs)
            for name, spec in ledger["variants"].items()
        },
    }


# ------------------------------------------------------------------------------------------------ text


def excludes_zero(comparison: dict | None) -> bool:
    if not comparison or comparison["ci_low"] is None:
        return False
    return comparison["ci_low"] > 0 or comparison["ci_high"] < 0


def with_interval(value: float | None, low: float | None, high: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    number = "{:+.3f}" if signed else "{:.3f}"
    text = number.format(value)
    if low is not None:
        text += f" [{number.format(low)}, {number.format(high)}]"
    return text


def mean_text(entry: dict | None) -> str:
    return with_interval(entry["mean"], entry["ci_low"], entry["ci_high"]) if entry else "n/a"


def difference_text(entry: dict | None, mark) -> str:
    """The difference vs reference with its interval, passed through `mark` where the interval excludes zero."""
    comparison = (entry or {}).get("vs_reference")
    if not comparison:
        return ""
    text = with_interval(comparison["difference"], comparison["ci_low"], comparison["ci_high"], signed=True)
    return mark(text) if excludes_zero(comparison) else text


def main_metrics(summary: dict) -> list[str]:
    """The main metrics some variant has, in MAIN_METRICS' order."""
    present = {name for variant in summary["variants"].values() for name in variant["metrics"]}
    return [name for name in MAIN_METRICS if name in present]


def aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def summary_table(summary: dict) -> list[str]:
    """The terminal table the sweep ends with: per variant, seeds done/failed and the first main metric beside its
    shuffled-image control and its difference vs the reference ("*": the interval excludes zero)."""
    metrics = main_metrics(summary)
    metric = metrics[0] if metrics else None
    control = MAIN_METRICS.get(metric)
    rows = [["variant", "done/failed"] + ([metric, control or "", f"vs {summary['reference']}"] if metric else [])]
    for name, variant in summary["variants"].items():
        row = [name, f"{len(variant['runs'])}/{len(variant['failed'])}"]
        if metric:
            entry = variant["metrics"].get(metric)
            row += [mean_text(entry), mean_text(variant["metrics"].get(control)) if control else "",
                    difference_text(entry, lambda text: f"{text} *")]
        rows.append(row)
    lines = aligned(rows)
    if metric:
        lines.append(f"mean [95% CI] over seeds; * the difference's interval excludes zero ({summary['ci_method']})")
    return lines


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def metric_header(control: str | None) -> list[str]:
    return ["mean [95% CI]", *(["shuffled-image control [95% CI]"] if control else []),
            "difference vs reference [95% CI]", "P(improvement)", "seeds"]


def metric_cells(summary: dict, variant: dict, metric: str, control: str | None) -> list[str]:
    """mean [CI] | control [CI] (where there is one) | difference [CI] (bold where it excludes zero) |
    P(improvement) | seeds."""
    entry = variant["metrics"].get(metric)
    comparison = (entry or {}).get("vs_reference") or {}
    probability = comparison.get("probability_of_improvement")
    return [
        mean_text(entry),
        *([mean_text(variant["metrics"].get(control))] if control else []),
        difference_text(entry, lambda text: f"**{text}**"),
        "" if probability is None else f"{probability:.2f}",
        f"{entry['n'] if entry else 0}/{len(summary['seeds'])}",
    ]

HOW_TO_READ = """\
Is this difference real? Each mean is over the seeds that finished; its interval is a 95% interval for the value
a new seed would give on average, on new examples like this eval set. The difference column is paired: the
variant's seed k against the reference's seed k, example by example, so what both share (the examples' difficulty,
the data order of a seed) cancels. A difference in **bold** has an interval that excludes zero: seed-to-seed and
example-to-example variation alone would rarely produce it. An unbolded difference is not evidence of no effect; it
says this study, with this many seeds and examples, cannot tell it from noise. P(improvement) is the probability
that the variant's true mean is above the reference's (0.5: no evidence either way; for a loss or an error rate,
lower is better, read it the other way). Beside each score stands its shuffled-image control, the same model
asked with another image: a score not above its control is not using the image, and a gain that the control shows
too came from the text. Many comparisons are made here: at 95% about one in twenty bold marks on a difference that
is not there is to be expected, so rerun a single surprising one with more seeds before trusting it."""


def study_header(summary: dict, ledger: dict) -> list[str]:
    absent = ledger.get("not_at_this_scale") or {}  # level -> axis
    seeds = ", ".join(str(seed) for seed in summary["seeds"])
    rows = [[f"`{name}`", ", ".join(f"`{o}`" for o in variant["overrides"]) or "(the base)",
             str(len(variant["runs"])), str(len(variant["failed"]))] for name, variant in summary["variants"].items()]
    return [
        f"# Study: {summary['name']}", "",
        f"Design: {summary['design']}; seeds {seeds}; reference variant `{summary['reference']}`; "
        f"{len(ledger['runs'])} runs in the ledger" + (f"; scale `{ledger['scale']}`" if ledger.get("scale") else "")
        + ".", "",
        *markdown_table(["variant", "overrides", "finished", "failed"], rows),
        *([f"Not run at this scale: {', '.join(f'`{level}` ({axis})' for level, axis in absent.items())}.", ""]
          if absent else []),
        "## How to read this", "", HOW_TO_READ, "",
        f"Intervals: {summary['ci_method']}. {stats.ASSUMPTIONS}", "",
    ]


def main_sections(summary: dict, plots: set[str]) -> list[str]:
    lines = []
    for metric in main_metrics(summary):
        control = MAIN_METRICS[metric]
        rows = [[f"`{name}`", *metric_cells(summary, variant, metric, control)]
                for name, variant in summary["variants"].items() if metric in variant["metrics"]]
        lines += [f"## {metric}", "", *markdown_table(["variant", *metric_header(control)], rows)]
        if plot_name(metric) in plots:
            lines += [f"![{metric}](plots/{plot_name(metric)})", ""]
    return lines


def breakdown_sections(summary: dict) -> list[str]:
    lines = []
    for prefix, kind in BREAKDOWNS.items():
        control = f"{prefix}_shuffled_images"
        groups = dict.fromkeys(name.split(".", 1)[1] for variant in summary["variants"].values()
                               for name in variant["metrics"] if name.startswith(f"{prefix}."))
        rows = [[group, f"`{name}`", *metric_cells(summary, variant, f"{prefix}.{group}", f"{control}.{group}")]
                for group in groups for name, variant in summary["variants"].items()
                if f"{prefix}.{group}" in variant["metrics"]]
        if rows:
            header = [kind, "variant", *metric_header(control)]
            lines += [f"## VQA accuracy by {kind}", "", *markdown_table(header, rows)]
    return lines


def verdict_section(summary: dict) -> list[str]:
    rows = [[f"`{name}`", ", ".join(f"{verdict} x{count}" for verdict, count in variant["verdicts"].items()),
             ", ".join(f"{cause} x{count}" for cause, count in variant["suspected_causes"].items()) or "none",
             " ".join(variant.get("alarms", {}).values()) or "n/a"]
            for name, variant in summary["variants"].items() if "verdicts" in variant]
    header = ["variant", "verdicts (runs)", "suspected causes named (runs)", "training alarm per check, per seed"]
    legend = ("Alarm: one letter per check of the training-time alarm, `-` the outputs depend on the image, `i` "
              "ignores the image, `c` collapsed.")
    return ["## Diagnose verdicts", "", *markdown_table(header, rows), legend, ""] if rows else []


def cost_section(summary: dict) -> list[str]:
    present = [name for name in COSTS if any(name in v["costs"] for v in summary["variants"].values())]
    if not present:
        return []
    rows = [[f"`{name}`", *(COSTS[cost][1](variant["costs"][cost]["mean"]) if cost in variant["costs"] else "n/a"
                            for cost in present)]
            for name, variant in summary["variants"].items()]
    return ["## Costs (mean over finished seeds)", "",
            *markdown_table(["variant", *(COSTS[cost][0] for cost in present)], rows)]


def failure_section(runs: list[Run]) -> list[str]:
    failed = [f"- `{run.variant}/seed{run.seed}`: {run.error}" for run in runs if run.status == "failed"]
    return ["## Failed runs", "", *failed, ""] if failed else []


def reproduce_section(sweep_dir: Path, ledger: dict, runs: list[Run]) -> list[str]:
    commands = [line for run in runs for line in (f"# {run.variant}/seed{run.seed} ({run.status})",
                                                  run.ledger_entry.get("command") or "(no command recorded)")]
    study = ledger.get("study", "STUDY.yaml")  # the ledger names its study file where the sweep recorded it
    prepared = [line for name, command in ledger.get("prepared", {}).items() for line in (f"# {name}", command)]
    return ["## Reproduce", "",
            *(["The prepared parts, made once before the runs:", "", "```", *prepared, "```", ""] if prepared else []),
            "Each run:", "", "```", *commands, "```", "",
            "This report, redrawn from the finished runs without training:", "",
            "```", f"vlmlab sweep {study}" + (f" --scale {ledger['scale']}" if ledger.get("scale") else "")
            + f" --out {sweep_dir} --report", "```", ""]


def write_markdown(path: Path, summary: dict, ledger: dict, runs: list[Run], plots: set[str]) -> None:
    lines = [*study_header(summary, ledger), *main_sections(summary, plots), *breakdown_sections(summary),
             *verdict_section(summary), *cost_section(summary), *failure_section(runs)]
    if "validation.png" in plots:
        lines += ["## Validation curves", "", "![validation curves](plots/validation.png)", ""]
    if "cost.png" in plots:
        lines += ["## Score against cost", "", "![score against cost](plots/cost.png)", ""]
    lines += reproduce_section(path.parent, ledger, runs)
    path.write_text("\n".join(lines))


def write_results(path: Path, runs: list[Run]) -> None:
    """One row per ledger run: who it is, how it ended, every metric and cost it has."""
    metric_names = dict.fromkeys(name for run in runs for name in run.values)
    cost_names = dict.fromkeys(name for run in runs for name in run.costs)
    columns = ["variant", "seed", "status", "error", "seconds", *metric_names, *cost_names]
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        for run in runs:
            writer.writerow({"variant": run.variant, "seed": run.seed, "status": run.status, "error": run.error or "",
                             "seconds": run.ledger_entry.get("seconds"), **run.values, **run.costs})


# ------------------------------------------------------------------------------------------------ plots


def plot_name(metric: str) -> str:
    return metric.replace(".", "_") + ".png"


def whiskers(entries: list[dict | None]) -> np.ndarray:
    """[2, M] distances from each mean down and up to its interval (0 without one). The mean is the runs' own and
    the interval comes from the examples all runs share, so it can sit just outside: clipped at 0."""
    return np.array([[max(0.0, e["mean"] - e["ci_low"]) if e and e["ci_low"] is not None else 0.0 for e in entries],
                     [max(0.0, e["ci_high"] - e["mean"]) if e and e["ci_high"] is not None else 0.0 for e in entries]])


def new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    # A Figure without pyplot renders with Agg and leaves no global backend or open-figure state behind.
    return Figure(figsize=(width, height), layout="constrained")


def bar_chart(path: Path, summary: dict, metric: str, control: str | None) -> bool:
    """One bar per variant with its interval, the shuffled-image control beside it."""
    variants = {name: v["metrics"] for name, v in summary["variants"].items() if metric in v["metrics"]}
    if not variants:
        return False
    series = [(metric, "real images")]
    if control and any(control in metrics for metrics in variants.values()):
        series.append((control, "shuffled images"))
    figure = new_figure(max(5.0, 1.1 * len(variants) + 2))
    axes = figure.add_subplot()
    positions, width = np.arange(len(variants)), 0.8 / len(series)
    for index, (name, label) in enumerate(series):
        entries = [metrics.get(name) for metrics in variants.values()]
        heights = [entry["mean"] if entry else np.nan for entry in entries]
        axes.bar(positions + (index - (len(series) - 1) / 2) * width, heights, width, yerr=whiskers(entries),
                 capsize=4, label=label)
    axes.set_xticks(positions, list(variants), rotation=30 if len(variants) > 4 else 0)
    axes.set_ylabel(metric)
    axes.set_title(f"{summary['name']}: {metric}\nmean over seeds, 95% interval", fontsize=10)
    axes.legend()
    figure.savefig(path, dpi=120)
    return True


def validation_plot(path: Path, runs: list[Run]) -> bool:
    """Validation VQA accuracy against training examples seen, one line per seed, one colour per variant."""
    curves = [run for run in runs if run.curve]
    if not curves:
        return False
    colours = {variant: f"C{index % 10}" for index, variant in enumerate(dict.fromkeys(r.variant for r in curves))}
    figure = new_figure()
    axes = figure.add_subplot()
    labelled = set()
    for run in curves:
        seen, accuracy = zip(*run.curve)
        axes.plot(seen, accuracy, color=colours[run.variant], marker=".", alpha=0.8,
                  label=None if run.variant in labelled else run.variant)
        labelled.add(run.variant)
    axes.set_xlabel("training examples seen")
    axes.set_ylabel("validation VQA accuracy")
    axes.set_title("validation during training (one line per seed)")
    axes.legend()
    figure.savefig(path, dpi=120)
    return True


def cost_plot(path: Path, summary: dict) -> bool:
    """The first main metric against each cost of COST_AXES: one point per variant, its interval as a whisker."""
    metrics = [name for name in main_metrics(summary) if MAIN_METRICS[name]]  # a score, not a diagnose signal
    if not metrics:
        return False
    metric = metrics[0]
    scored = {name: v for name, v in summary["variants"].items() if metric in v["metrics"]}
    axes_costs = [cost for cost in COST_AXES if any(cost in v["costs"] for v in scored.values())]
    if not axes_costs:
        return False
    figure = new_figure(5.0 * len(axes_costs), 4.0)
    for index, cost in enumerate(axes_costs):
        axes = figure.add_subplot(1, len(axes_costs), index + 1)
        points = {name: v for name, v in scored.items() if cost in v["costs"]}
        for name, variant in points.items():
            entry = variant["metrics"][metric]
            axes.errorbar(variant["costs"][cost]["mean"], entry["mean"], yerr=whiskers([entry]), fmt="o", capsize=4)
            axes.annotate(name, (variant["costs"][cost]["mean"], entry["mean"]), textcoords="offset points",
                          xytext=(5, 5))
        axes.set_xlabel(COSTS[cost][0])
        axes.set_ylabel(metric)
    figure.suptitle(f"{summary['name']}: {metric} against cost")
    figure.savefig(path, dpi=120)
    return True


def draw_plots(plot_dir: Path, summary: dict, runs: list[Run]) -> set[str]:
    """Draws every plot whose data are there; returns the file names drawn."""
    plot_dir.mkdir(exist_ok=True)
    for stale in plot_dir.glob("*.png"):  # a plot whose data are gone must not outlive them
        stale.unlink()
    drawn = {plot_name(metric) for metric, control in MAIN_METRICS.items()
             if bar_chart(plot_dir / plot_name(metric), summary, metric, control)}
    if validation_plot(plot_dir / "validation.png", runs):
        drawn.add("validation.png")
    if cost_plot(plot_dir / "cost.png", summary):
        drawn.add("cost.png")
    return drawn


# ------------------------------------------------------------------------------------------------ entry point


def write_report(sweep_dir: Path) -> dict:
    """Reads `sweep_dir/ledger.json` and its finished runs; writes summary.json, results.csv, report.md and
    plots/*.png there and returns the summary."""
    sweep_dir = Path(sweep_dir)
    ledger = json.loads((sweep_dir / "ledger.json").read_text())
    runs = load_runs(sweep_dir, ledger)
    summary = summarize_study(ledger, runs)
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_results(sweep_dir / "results.csv", runs)
    plots = draw_plots(sweep_dir / "plots", summary, runs)
    write_markdown(sweep_dir / "report.md", summary, ledger, runs, plots)
    return summary
