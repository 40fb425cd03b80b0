"""One run's report: `RUN/report/*.png` and `RUN/report/index.html`, drawn from what the run directory holds.

Reads `config.yaml`, `train_log.jsonl`, `metrics.json` and `predictions.jsonl`; never runs the model, so
`vlmlab report RUN` redraws it any time. Each piece is drawn only when its input is there (a run without periodic
eval has no validation curve, a captions-only run no per-type bars), so a partial run still gets a page. The study
report of many runs is `vlmlab.report`; its reading and figure helpers are shared.
"""

from __future__ import annotations

import html
import json
import textwrap
from pathlib import Path

import numpy as np

from vlmlab.diagnose import COLLAPSE_RATE, MIN_LOSS_GAP, UNCHANGED_RATE
from vlmlab.log import warn
from vlmlab.report import batch_size, new_figure, one_line, read_jsonl

RATE_SIGNALS = {  # alarm signal -> (legend label, line colour, the level from which it counts against the model)
    "unchanged_with_shuffled_images": ("unchanged with shuffled images", "tab:blue", UNCHANGED_RATE),
    "identical_output_rate": ("identical outputs", "tab:purple", None),
    "empty_output_rate": ("empty outputs", "tab:olive", COLLAPSE_RATE),
    "eos_first_rate": ("EOS most likely first token", "tab:cyan", COLLAPSE_RATE),
}
VERDICT_COLORS = {"uses_image": "tab:green", "ignores_image": "tab:orange", "collapsed": "tab:red"}
PLOT_NAMES = ("training.png", "validation.png", "conditioning.png", "by_type.png", "samples.png")
SAMPLE_QUESTIONS, SAMPLE_CAPTIONS = 6, 2


# ------------------------------------------------------------------------------------------------ reading


def read_json(path: Path) -> dict:
    """A JSON object file, or {} when it is missing or unreadable (the page then leaves that part out)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


# ------------------------------------------------------------------------------------------------ plots


def examples_axis(axes, batch: int | None) -> None:
    """A second x axis on top in examples seen, so runs of different batch sizes can be read against each other."""
    if batch:
        top = axes.secondary_xaxis("top", functions=(lambda s: s * batch, lambda e: e / batch))
        top.set_xlabel("examples seen", fontsize=8)
        top.tick_params(labelsize=8)


def training_plot(path: Path, log: list[dict], batch: int | None) -> bool:
    """Loss and learning rate against step (bottom) and examples seen (top), side by side."""
    records = [r for r in log if is_number(r.get("loss"))]
    if not records:
        return False
    steps = [r["step"] for r in records]
    figure = new_figure(10, 3.8)
    loss_axes, lr_axes = figure.subplots(1, 2)
    loss_axes.plot(steps, [r["loss"] for r in records], marker="." if len(steps) < 50 else None)
    loss_axes.set(xlabel="step", ylabel="training loss (mean since last log)", title="training loss")
    lr_axes.plot(steps, [r.get("lr", np.nan) for r in records], color="tab:purple")
    lr_axes.set(xlabel="step", ylabel="learning rate", title="learning rate")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for axes in (loss_axes, lr_axes):
        examples_axis(axes, batch)
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    return True


def validation_plot(path: Path, log: list[dict], batch: int | None) -> bool:
    """Periodic validation VQA accuracy beside the same eval with shuffled images: the gap is what the image adds."""
    records = [r for r in log if isinstance(r.get("eval"), dict) and is_number(r["eval"].get("vqa_accuracy"))]
    if not records:
        return False
    steps = [r["step"] for r in records]
    figure = new_figure(6.4, 4.0)
    axes = figure.add_subplot()
    axes.plot(steps, [r["eval"]["vqa_accuracy"] for r in records], marker="o", label="real images")
    shuffled = [r["eval"].get("vqa_accuracy_shuffled_images") for r in records]
    if any(is_number(value) for value in shuffled):
        axes.plot(steps, [v if is_number(v) else np.nan for v in shuffled], marker="o", linestyle="--",
                  color="tab:gray", label="shuffled images (control)")
    axes.set(xlabel="step", ylabel="validation VQA accuracy", ylim=(-0.02, 1.02),
             title="validation accuracy and its shuffled-image control")
    examples_axis(axes, batch)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=110)
    return True


def conditioning_plot(path: Path, log: list[dict], batch: int | None) -> bool:
    """The training-time alarm's signals at each check, each threshold dashed, the verdict as a coloured dot."""
    records = [r for r in log if isinstance(r.get("conditioning"), dict)]
    if not records:
        return False
    steps = [r["step"] for r in records]
    figure = new_figure(10, 3.8)
    rate_axes, gap_axes = figure.subplots(1, 2)
    for index, (name, (label, color, threshold)) in enumerate(RATE_SIGNALS.items()):
        values = [r["conditioning"].get(name) for r in records]
        if not any(is_number(v) for v in values):
            continue
        rate_axes.plot(steps, [v if is_number(v) else np.nan for v in values], marker=".", label=label,
                       color=color, zorder=3 - index * 0.1)
        if threshold is not None:
            rate_axes.axhline(threshold, color=color, linestyle=":", linewidth=1)
    for verdict, color in VERDICT_COLORS.items():  # one dot per check above the lines: which verdict it gave
        at = [s for s, r in zip(steps, records) if r["conditioning"].get("verdict") == verdict]
        if at:
            rate_axes.scatter(at, [1.08] * len(at), color=color, marker="s", s=25, label=f"verdict: {verdict}")
    rate_axes.set(xlabel="step", ylabel="fraction of alarm examples", ylim=(-0.03, 1.15),
                  title="image-reliance alarm (dotted: thresholds)")
    rate_axes.legend(fontsize=7, loc="center left")
    gaps = [r["conditioning"].get("reference_loss_gap") for r in records]
    gap_axes.plot(steps, [v if is_number(v) else np.nan for v in gaps], marker=".", color="tab:brown",
                  label="reference loss gap")
    gap_axes.axhline(MIN_LOSS_GAP, color="tab:brown", linestyle=":", linewidth=1,
                     label=f"below {MIN_LOSS_GAP}: image ignored")
    gap_axes.set(xlabel="step", ylabel="nats per token (shuffled - real)",
                 title="how much more likely the reference is with its image")
    gap_axes.legend(fontsize=7)
    for axes in (rate_axes, gap_axes):
        examples_axis(axes, batch)
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    return True


def by_type_plot(path: Path, metrics: dict) -> bool:
    """Test VQA accuracy per question type, the shuffled-image control beside each bar."""
    real = {k: v for k, v in (metrics.get("vqa_accuracy_by_type") or {}).items() if is_number(v)}
    if not real:
        return False
    shuffled = metrics.get("vqa_accuracy_by_type_shuffled_images") or {}
    types, positions = sorted(real), np.arange(len(real))
    figure = new_figure(max(5.0, 0.9 * len(types) + 2), 4.0)
    axes = figure.add_subplot()
    has_control = any(is_number(shuffled.get(t)) for t in types)
    width = 0.4 if has_control else 0.7
    bars = [axes.bar(positions - (width / 2 if has_control else 0), [real[t] for t in types], width,
                     label="real images")]
    if has_control:
        bars += [axes.bar(positions + width / 2, [shuffled.get(t) if is_number(shuffled.get(t)) else np.nan for t in types],
                 width, color="tab:gray", label="shuffled images (control)")]
    for bar in bars:  # the value on each bar: a zero bar is otherwise invisible
        axes.bar_label(bar, labels=[fraction(v) for v in bar.datavalues], fontsize=7, padding=2)
    axes.set_xticks(positions, types, rotation=30 if len(types) > 6 else 0)
    axes.set(xlabel="question type", ylabel="test VQA accuracy", ylim=(0, 1.05), title="test accuracy by question type")
    axes.legend()
    figure.savefig(path, dpi=110)
    return True


def short(text, width: int = 60) -> str:
    text = " ".join(str(text).split()) if text is not None else "-"
    # an untrained model's bytes may be control characters: shown escaped, not as a glyph the font lacks
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= width else text[: width - 1] + "…"


def sample_lines(record: dict) -> list[tuple[str, str]]:
    """(label, text) of one sample: what was asked, what the model said, the reference, what it said blind."""
    answers = record.get("answers") or []
    return [("Q", record.get("question") or "(caption)"), ("model", record.get("prediction")),
            ("reference", answers[0] if answers else None),
            ("shuffled image", record.get("prediction_shuffled_images"))]


def pick_samples(predictions: list[dict]) -> list[dict]:
    """The first questions and a caption or two: the same examples every time the report is drawn."""
    questions = [r for r in predictions if r.get("question")][:SAMPLE_QUESTIONS]
    captions = [r for r in predictions if not r.get("question")][:SAMPLE_CAPTIONS]
    return questions + captions


def sample_images(run_dir: Path, samples: list[dict], examples=None) -> dict:
    """example id -> PIL image, regenerated from the run's eval data (predictions hold only ids); {} if not found."""
    from vlmlab.images import load_image

    if examples is None:
        try:
            from vlmlab.config import load_config
            from vlmlab.data import load_examples

            cfg = load_config(run_dir / "config.yaml")
            examples = load_examples(cfg.data.eval, cfg.eval.split, cfg.data)
        except Exception as err:  # noqa: BLE001 - the grid is still worth drawing as text
            warn(f"run report: sample images unavailable ({one_line(str(err)) or type(err).__name__})")
            return {}
    by_id, images = {e.example_id: e for e in examples}, {}
    for record in samples:
        example = by_id.get(record.get("id"))
        if example is not None:
            try:
                images[record["id"]] = load_image(example.image)
            except Exception:  # noqa: BLE001, S112 - one unreadable image leaves one blank panel
                continue
    return images


def samples_plot(path: Path, samples: list[dict], images: dict) -> bool:
    """A grid of test images, each with its question, answer, reference and answer under a shuffled image."""
    if not samples:
        return False
    columns = min(4, len(samples))
    rows = -(-len(samples) // columns)
    figure = new_figure(3.0 * columns, 4.4 * rows)
    figure.suptitle("test samples: question, model answer, reference, answer with a shuffled image")
    for index, record in enumerate(samples):
        axes = figure.add_subplot(rows, columns, index + 1)
        image = images.get(record.get("id"))
        if image is not None:
            axes.imshow(image)
        else:
            axes.text(0.5, 0.5, "image not available", ha="center", va="center", color="gray")
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(short(record.get("id"), 30), fontsize=8)
        text = "\n".join(textwrap.fill(f"{label}: {short(value, 48)}", 30, max_lines=2, placeholder="…")
                         for label, value in sample_lines(record))  # at most 8 lines: rows stay apart
        axes.set_xlabel(text, fontsize=7.5, loc="left")
    figure.savefig(path, dpi=100)
    return True


# ------------------------------------------------------------------------------------------------ the page


def fraction(value) -> str:
    return f"{value:.1%}" if is_number(value) else "-"


def score(value) -> str:
    return f"{value:.3f}" if is_number(value) else "-"


def headline_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """(metric, real images, shuffled images) for the numbers a reader looks at first."""
    rows = []
    if is_number(metrics.get("vqa_accuracy")):
        rows.append(("VQA accuracy", fraction(metrics["vqa_accuracy"]),
                     fraction(metrics.get("vqa_accuracy_shuffled_images"))))
    caption, control = metrics.get("caption") or {}, metrics.get("caption_shuffled_images") or {}
    for name in ("CIDEr", "BLEU-4"):
        if is_number(caption.get(name)):
            rows.append((f"caption {name}", score(caption[name]), score(control.get(name))))
    if is_number(metrics.get("empty_output_rate")):
        rows.append(("empty outputs", fraction(metrics["empty_output_rate"]), ""))
    for key, label in (("num_eval_examples", "test examples"), ("train_steps", "training steps"),
                       ("train_seconds", "training seconds")):
        if is_number(metrics.get(key)):
            rows.append((label, f"{metrics[key]:.4g}", ""))
    return rows


def cells(tag: str, row) -> str:
    return "".join(f"<{tag}>{html.escape(str(cell))}</{tag}>" for cell in row)


def table(header: list[str], rows: list) -> list[str]:
    return ["<table>", f"<tr>{cells('th', header)}</tr>", *(f"<tr>{cells('td', row)}</tr>" for row in rows),
            "</table>"]


SECTIONS = {  # plot -> (heading, one sentence on how to read it)
    "training.png": ("Training", "Loss and learning rate against step (bottom axis) and examples seen (top)."),
    "validation.png": ("Validation", "The gap between the two lines is what the image adds to the answers."),
    "conditioning.png": ("Image-reliance alarm", ("The alarm's signals at each check; crossing a dotted threshold "
                                                  "marks the model as ignoring the image or collapsed.")),
    "by_type.png": ("By question type", "Test accuracy per question type beside its shuffled-image control."),
    "samples.png": ("Samples", ("Test examples with the model's answer, the reference and the answer the model "
                                "gives when the image is swapped for another.")),
}


STYLE = ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}</style>")


def page(run_dir: Path, metrics: dict, log: list[dict], plots: list[str], samples: list[dict]) -> str:
    title = f"vlmlab run report: {run_dir.resolve().name}"
    lines = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
             STYLE,
             "</head><body>", f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(str(run_dir))}</p>"]
    rows = headline_rows(metrics)
    lines += ["<h2>Test metrics</h2>", *table(["metric", "real images", "shuffled images (control)"], rows)] if rows \
        else ["<p>No metrics.json: the run has not finished its test evaluation.</p>"]
    verdicts = [r["conditioning"].get("verdict") for r in log if isinstance(r.get("conditioning"), dict)]
    if verdicts:
        lines.append(f"<p>Last alarm verdict: <b>{html.escape(str(verdicts[-1]))}</b> "
                     f"({len(verdicts)} checks).</p>")
    for name in plots:
        heading, text = SECTIONS[name]
        lines += [f"<h2>{html.escape(heading)}</h2>", f"<p>{html.escape(text)}</p>",
                  f"<img src=\"{html.escape(name)}\" alt=\"{html.escape(heading)}\">"]
    if samples:
        lines += ["<h3>Sample answers</h3>", *table(["id", "question", "model", "reference", "shuffled image"],
                                                     [[r.get("id"), *(short(v, 200) for _, v in sample_lines(r))]
                                                      for r in samples])]
    lines.append("</body></html>")
    return "\n".join(lines) + "\n"


def write_run_report(run_dir: Path, examples=None) -> Path:
    """Draws `run_dir/report/*.png` and writes `run_dir/report/index.html`; returns the HTML path.

    `examples` (the run's test examples, as `train` has them at hand) saves regenerating them for the sample grid.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not any((run_dir / name).is_file() for name in ("config.yaml", "metrics.json", "train_log.jsonl")):
        raise ValueError(f"{run_dir}: not a run directory (no config.yaml, metrics.json or train_log.jsonl)")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    for name in PLOT_NAMES:  # a plot whose input is gone must not stay behind from an earlier drawing
        (out / name).unlink(missing_ok=True)
    log, metrics = read_jsonl(run_dir / "train_log.jsonl"), read_json(run_dir / "metrics.json")
    batch = batch_size(run_dir)
    samples = pick_samples(read_jsonl(run_dir / "predictions.jsonl"))
    drawn = {
        "training.png": training_plot(out / "training.png", log, batch),
        "validation.png": validation_plot(out / "validation.png", log, batch),
        "conditioning.png": conditioning_plot(out / "conditioning.png", log, batch),
        "by_type.png": by_type_plot(out / "by_type.png", metrics),
        "samples.png": bool(samples) and samples_plot(out / "samples.png", samples,
                                                       sample_images(run_dir, samples, examples)),
    }
    path = out / "index.html"
    path.write_text(page(run_dir, metrics, log, [name for name, done in drawn.items() if done], samples))
    return path
