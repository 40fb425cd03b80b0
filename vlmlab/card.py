"""A model card for a trained model: what `vlmlab export` writes to FOLDER/README.md (and the hub shows).

Built with huggingface_hub's model-card support (`ModelCard`, `ModelCardData`: tags, library name, the VQA accuracy
and its shuffled-image control as model-index results) and markdown sections: the three parts, how each trained,
the data, the prompts, the decoding, every metric beside its shuffled-image control, the environment, the command
that reproduces the run and how to load it.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from vlmlab.config import Config

TAGS = ["vlmlab", "vision-language", "visual-question-answering", "image-captioning"]
CAPTION_KEYS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
TRAIN_CONFIG = "train_config.yaml"  # the run's own config.yaml, copied beside the card by export


def run_metrics(source: Path) -> dict | None:
    """metrics.json of a run directory (or one beside a model folder), if there is one."""
    path = Path(source) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def reproduce_command(source: Path) -> str:
    """The `vlmlab train` command of a run: a sweep run's recorded one, else the run's config.yaml given back."""
    source = Path(source)
    record = source / "sweep_run.json"
    if record.is_file():
        command = json.loads(record.read_text()).get("command")
        if command:
            return command
    return f"vlmlab train --out runs/{source.name or 'model'} --config {TRAIN_CONFIG}"


def _number(value) -> str:
    return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _part_line(name: str, section, parameters: dict | None) -> str:
    counts = (parameters or {}).get(name)
    counted = f"; {counts[0]:,} parameters, {counts[1]:,} trainable" if counts else ""
    mode = getattr(section, "train", "full")
    adapter = (f" (rank {section.lora_rank}, alpha {section.lora_alpha}, targets {section.lora_targets})"
               if mode in ("lora", "dora") else "")
    return f"- **{name}**: `{mode}`{adapter}{counted}"


def _metric_rows(metrics: dict) -> list[str]:
    rows = ["| metric | real images | shuffled images (control) |", "|---|---|---|"]
    if metrics.get("vqa_accuracy") is not None:
        rows.append(f"| VQA accuracy | {_number(metrics['vqa_accuracy'])} | "
                    f"{_number(metrics.get('vqa_accuracy_shuffled_images'))} |")
    shuffled = metrics.get("vqa_accuracy_by_type_shuffled_images") or {}
    for kind, value in (metrics.get("vqa_accuracy_by_type") or {}).items():
        rows.append(f"| VQA accuracy, {kind} | {_number(value)} | {_number(shuffled.get(kind))} |")
    caption, caption_shuffled = metrics.get("caption") or {}, metrics.get("caption_shuffled_images") or {}
    for key in CAPTION_KEYS:
        if key in caption:
            rows.append(f"| caption {key} | {_number(caption[key])} | {_number(caption_shuffled.get(key))} |")
    return rows if len(rows) > 2 else []


def _eval_results(config: Config, metrics: dict | None) -> list[EvalResult] | None:
    if not metrics or metrics.get("vqa_accuracy") is None:
        return None
    common = {"task_type": "visual-question-answering", "dataset_type": config.data.eval.split(":")[0],
              "dataset_name": config.data.eval, "dataset_split": config.eval.split, "metric_type": "accuracy"}
    results = [EvalResult(metric_name="VQA accuracy", metric_value=metrics["vqa_accuracy"], **common)]
    if metrics.get("vqa_accuracy_shuffled_images") is not None:
        results.append(EvalResult(metric_name="VQA accuracy, shuffled images (control)",
                                  metric_value=metrics["vqa_accuracy_shuffled_images"], **common))
    return results


def model_card(model_dir_or_run: Path, config: Config, metrics: dict | None, command: str | None,
               repo_id: str | None = None, parameters: dict | None = None, merged: list[str] = (),
               folder: Path | None = None) -> ModelCard:
    """The card of the model saved in (or trained in) `model_dir_or_run`, whose config is `config` (as trained:
    before any merge); `metrics` is the run's metrics.json, `command` the `vlmlab train` line that reproduces it,
    `parameters` {part: (total, trainable)}, `merged` the parts whose adapters export merged into their base,
    `folder` where the card's model lies (the load example names `repo_id`, else `folder`)."""
    name = repo_id or Path(model_dir_or_run).resolve().name
    vision, connector, language = config.vision, config.connector, config.language
    data = ModelCardData(library_name="vlmlab", tags=list(TAGS), pipeline_tag="visual-question-answering",
                         model_name=name, eval_results=_eval_results(config, metrics))
    tower = vision.model or f"a tiny {vision.family} tower trained from scratch"
    lm = language.model or f"a tiny {language.family} LM trained from scratch"
    queries = f", {connector.num_queries} queries" if connector.kind in ("qformer", "perceiver") else ""
    lines = [f"# {name}", "", "A vision-language model built and trained with vlmlab.", "",
             "## Architecture", "",
             f"- **vision tower**: {tower} (family `{vision.family}`{', revision ' + vision.revision if vision.revision else ''})",
             f"- **connector**: `{connector.kind}`{queries}, {connector.num_layers} layer{'s' if connector.num_layers != 1 else ''}, width {connector.hidden_size}",
             f"- **language model**: {lm} (family `{language.family}`{', revision ' + language.revision if language.revision else ''})",
             f"- **fusion**: `{language.fusion}`", ""]
    if metrics and metrics.get("visual_tokens_per_image"):
        lines += [f"Each image reaches the LM as {metrics['visual_tokens_per_image']} visual tokens.", ""]
    lines += ["## How each part was trained", "", _part_line("vision", vision, parameters),
              f"- **connector**: `full`{'; ' + format(parameters['connector'][0], ',') + ' parameters' if parameters and 'connector' in parameters else ''}",
              _part_line("language", language, parameters)]
    if metrics and metrics.get("parameters_total") is not None:
        lines.append(f"- in all: {metrics['parameters_total']:,} parameters, "
                     f"{metrics.get('parameters_trainable', 0):,} trainable")
    if merged:
        lines.append(f"- exported with the adapters of {' and '.join(merged)} merged into their base weights")
    train = config.train
    lines += ["", (f"{train.max_steps} steps, batch {train.batch_size} x {train.grad_accum} accumulation, "
                   f"lr {train.lr}, warmup {train.warmup_steps}, seed {train.seed}."), "",
              "## Data", "", f"- **train**: `{config.data.train}`",
              f"- **eval**: `{config.data.eval}` (split `{config.eval.split}`)"]
    if "synthetic" in (config.data.train, config.data.eval):
        lines.append(f"- synthetic world: {config.data.train_images} train images, {config.data.eval_images} eval "
                     f"images, {config.data.questions_per_image} questions per image, seed {config.data.seed}")
    if metrics and metrics.get("num_eval_examples") is not None:
        lines.append(f"- evaluated on {metrics['num_eval_examples']} examples")
    prompt = (metrics or {}).get("prompt") or {}
    vqa_prompt = (prompt.get("vqa") or {}).get("template", config.data.prompt)
    caption_prompt = (prompt.get("caption") or {}).get("text", config.data.caption_prompt)
    ev = config.eval
    lines += ["", "## Prompts", "", f"- **VQA**: `{vqa_prompt}`", f"- **caption**: `{caption_prompt}`", "",
              "## Decoding", "", f"- VQA: at most {ev.max_new_tokens} new tokens, at least {ev.min_new_tokens}",
              f"- captions: at most {ev.caption_max_new_tokens} new tokens",
              f"- {'greedy' if ev.num_beams == 1 else f'beam search, {ev.num_beams} beams'}"]
    rows = _metric_rows(metrics or {})
    if rows:
        lines += ["", "## Metrics", "", ("Each beside its control: the same examples scored with another image of "
                                         "the set. A model that reads the image scores well above the control."),
                  "", *rows]
    environment = (metrics or {}).get("environment") or {}
    if environment:
        lines += ["", "## Environment", "", *(f"- {key}: {value}" for key, value in environment.items())]
    if command:
        lines += ["", "## Reproduce", "", "```bash", command, "```"]
    lines += ["", "## Load", "", "```python", "from vlmlab import VLM", "",
              f"model = VLM.load({json.dumps(repo_id or str(folder or model_dir_or_run))})",
              'model.ask("image.png", "what color is the circle?")', "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
