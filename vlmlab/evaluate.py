"""Evaluation: answers and captions for an eval set, scored, beside the same run with shuffled images.

The shuffled-image control asks every question again with the image swapped for another image of the set
(a fixed derangement of the image ids, so no example keeps its own image). A model that uses the image loses
accuracy there; one that answers from the question alone scores the same on both.
"""

from __future__ import annotations

import random
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from vlmlab.config import Config
from vlmlab.data.batching import ExampleDataset
from vlmlab.data.example import Example
from vlmlab.faults import GenerationBatch, attempt
from vlmlab.images import views_read
from vlmlab.log import warn
from vlmlab.metrics import (JavaNotFoundError, accuracy_by, caption_metrics, family_average, majority_floor_by_type,
                            vqa_accuracy)
from vlmlab.prompts import describe_prompts, format_prompt
from vlmlab.weights import described

CIDER_NOTE = ("CIDEr takes its document frequencies from the references of the examples scored here, so it is "
              "comparable only with CIDEr computed on the same examples (a subset scores differently from the full "
              "set)")


def derangement(image_ids: list[str], seed: int) -> dict[str, str]:
    """Maps each distinct image id to a different one: a random order, each id sent to the next in a cycle."""
    ids = sorted(set(image_ids))
    if len(ids) < 2:
        return {}
    random.Random(seed).shuffle(ids)
    return {ids[i]: ids[(i + 1) % len(ids)] for i in range(len(ids))}


def images_by_id(dataset: ExampleDataset) -> dict[str, Example]:
    """An example of each image id of `dataset`, to find the image a swap shows in another example's place."""
    return {example.image_id: example for example in dataset.examples}


def shown_image(dataset: ExampleDataset, by_id: dict[str, Example], example: Example,
                swap: dict | None) -> tuple[str, torch.Tensor | None]:
    """(image id, pixels or None when unusable) of the image `example` is shown: its own, or the one `swap` puts
    in its place. Pixels come from the dataset's per-image cache."""
    image_id = swap.get(example.image_id, example.image_id) if swap else example.image_id
    return image_id, dataset.pixels(by_id.get(image_id, example))


def predict(model, dataset: ExampleDataset, examples: list[Example], cfg: Config, swap: dict | None = None,
            desc: str = "eval", batch: GenerationBatch | None = None) -> list[str]:
    """Generated text for each example (None where its image is unusable); `swap` replaces image ids.

    Out of memory, the generation batch is halved and the same examples generated again (`batch`, shared by the
    passes of one evaluation, keeps the smaller size and counts the events); the outputs do not change.
    """
    batch = batch or GenerationBatch(cfg.eval.batch_size)
    by_id = images_by_id(dataset)
    outputs: list[str | None] = [None] * len(examples)
    groups = defaultdict(list)  # captions and answers differ in length budget: generate them apart
    for index, example in enumerate(examples):
        groups[example.is_caption].append(index)
    ev = cfg.eval
    bar = tqdm(total=len(examples), desc=desc, leave=False, disable=None)
    for is_caption, indices in groups.items():
        start = 0
        while start < len(indices):
            block = indices[start : start + batch.size]
            chunk, prompts, image_index = [], [], []
            slots: dict[str, int] = {}  # image id -> its row in `pixels`: each image goes through vision once
            pixels = []
            for index in block:
                example = examples[index]
                image_id, image_pixels = shown_image(dataset, by_id, example, swap)
                if image_pixels is not None:
                    key = image_id or str(index)  # examples without an image id share no image
                    if key not in slots:
                        slots[key] = len(pixels)
                        pixels.append(image_pixels)
                    chunk.append(index)
                    image_index.append(slots[key])
                    prompts.append(format_prompt(cfg.data, example.question))
            if chunk:
                texts, failed = attempt(lambda: model.generate(
                    torch.stack(pixels),
                    prompts,
                    image_index=torch.tensor(image_index),
                    views=views_read(list(slots), cfg.data, 1.0 if ev.image_split else 0.0),
                    max_new_tokens=ev.caption_max_new_tokens if is_caption else ev.max_new_tokens,
                    min_new_tokens=ev.min_new_tokens,
                    num_beams=ev.num_beams,
                ))
                if failed:
                    batch.halve(len(chunk))  # the same examples again, fewer at a time
                    continue
                for index, text in zip(chunk, texts):
                    outputs[index] = text
            bar.update(len(block))
            start += len(block)
    bar.close()
    return outputs


def score(examples: list[Example], outputs: list[str | None], with_captions: bool) -> dict:
    """VQA accuracy overall, per question type and per answer type, caption metrics, the share of empty outputs."""
    captions, references = {}, {}
    answered = [(e, o) for e, o in zip(examples, outputs) if o is not None]
    scored = [(e, vqa_accuracy(o, e.answers)) for e, o in answered if not e.is_caption]
    scores = [s for _, s in scored]
    for example, output in answered:
        if example.is_caption:
            captions[example.example_id] = output
            references[example.example_id] = example.answers
    result = {
        "vqa_accuracy": sum(scores) / len(scores) if scores else None,
        "vqa_accuracy_by_type": accuracy_by((e.question_type, s) for e, s in scored),
        "vqa_accuracy_by_answer_type": accuracy_by((e.answer_type, s) for e, s in scored if e.answer_type),
        "vqa_accuracy_by_family": accuracy_by((e.family, s) for e, s in scored if e.family),
        "empty_output_rate": sum(not o for _, o in answered) / len(answered) if answered else None,
        "caption": None,
    }
    if captions and with_captions:
        try:
            result["caption"] = caption_metrics(captions, references)
        except JavaNotFoundError as err:
            warn(f"caption metrics skipped: {err}")
    result["family_average"] = family_average(result["vqa_accuracy_by_family"], result["caption"])
    return result


def question_types_by_family(examples: list[Example]) -> dict[str, list[str]]:
    """{"general": [types...], "text": [...], "knowledge": [...]}: the VQA types of each family evaluated."""
    found: dict[str, set] = defaultdict(set)
    for example in examples:
        if example.family and not example.is_caption:
            found[example.family].add(example.question_type)
    return {family: sorted(types) for family, types in sorted(found.items())}


def evaluate(model, examples: list[Example], cfg: Config) -> tuple[dict, list[dict]]:
    """Returns (metrics, predictions): metrics as in metrics.json, one prediction record per example."""
    ev = cfg.eval
    if ev.max_examples:
        examples = examples[: ev.max_examples]
    vqa = [e for e in examples if not e.is_caption]
    dataset = ExampleDataset(examples, cfg.data, model.vision.image_size)
    was_training = model.training
    model.eval()
    batch = GenerationBatch(ev.batch_size)  # halved when memory runs out, for both passes
    outputs = predict(model, dataset, examples, cfg, batch=batch)
    real = score(examples, outputs, ev.caption_metrics)
    metrics = {
        "vqa_accuracy": real["vqa_accuracy"],
        "vqa_accuracy_by_type": real["vqa_accuracy_by_type"],
        "vqa_accuracy_by_answer_type": real["vqa_accuracy_by_answer_type"],
        "vqa_accuracy_by_family": real["vqa_accuracy_by_family"],
        "question_types_by_family": question_types_by_family(examples),
        "majority_floor_by_type": majority_floor_by_type(vqa),
        "family_average": real["family_average"],
        "caption": real["caption"],
        "empty_output_rate": real["empty_output_rate"],
        "prompt": describe_prompts(cfg.data),
        # decoding moves scores as much as the prompt does (greedy vs beam 5): recorded beside it
        "decoding": {"max_new_tokens": ev.max_new_tokens, "caption_max_new_tokens": ev.caption_max_new_tokens,
                     "min_new_tokens": ev.min_new_tokens, "num_beams": ev.num_beams, "do_sample": False},
        "notes": [CIDER_NOTE] if real["caption"] else [],
        "image_split": cfg.data.image_split and ev.image_split,  # whether the images were split (eval.image_split)
    }
    records = [
        {"id": e.example_id, "image_id": e.image_id, "question": e.question, "type": e.question_type,
         "answer_type": e.answer_type, "prediction": o, "answers": e.answers}
        for e, o in zip(examples, outputs)
    ]
    if ev.shuffled_control:
        swap = derangement([e.image_id for e in examples], seed=cfg.train.seed)
        shuffled_outputs = predict(model, dataset, examples, cfg, swap=swap, desc="eval, shuffled images",
                                   batch=batch)
        shuffled = score(examples, shuffled_outputs, ev.caption_metrics)
        metrics["vqa_accuracy_shuffled_images"] = shuffled["vqa_accuracy"]
        metrics["vqa_accuracy_by_type_shuffled_images"] = shuffled["vqa_accuracy_by_type"]
        metrics["vqa_accuracy_by_answer_type_shuffled_images"] = shuffled["vqa_accuracy_by_answer_type"]
        metrics["vqa_accuracy_by_family_shuffled_images"] = shuffled["vqa_accuracy_by_family"]
        metrics["family_average_shuffled_images"] = shuffled["family_average"]
        metrics["caption_shuffled_images"] = shuffled["caption"]
        for record, output in zip(records, shuffled_outputs):
            record["prediction_shuffled_images"] = output
    floors = metrics["majority_floor_by_type"]
    metrics["majority_floor"] = sum(floors[e.question_type] for e in vqa) / len(vqa) if vqa else None
    metrics["num_eval_examples"] = sum(o is not None for o in outputs)
    metrics["num_vqa_examples"] = sum(not e.is_caption for e, o in zip(examples, outputs) if o is not None)
    metrics["num_caption_examples"] = sum(e.is_caption for e, o in zip(examples, outputs) if o is not None)
    metrics["failed_images"] = len(dataset.failed)
    metrics["eval_out_of_memory_events"] = batch.events
    metrics["weights"] = described(model.config)  # which pretrained weights were evaluated (weights.py)
    model.train(was_training)
    return metrics, records


def vqa_results(records: list[dict]) -> list[dict]:
    """The official VQA result file's entries, `{"question_id", "answer"}`, one per question: what the evaluation
    server and the official evaluation script read. A question whose image could not be used gets "" (a miss)."""
    return [
        {"question_id": int(r["id"]) if str(r["id"]).isdigit() else r["id"], "answer": r["prediction"] or ""}
        for r in records
        if r["question"] is not None
    ]


def summary_lines(metrics: dict) -> list[str]:
    """A few lines a person reads after a run: each score beside its shuffled-image control."""

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    lines = [
        f"VQA accuracy        {pct(metrics.get('vqa_accuracy'))}   "
        f"(shuffled images: {pct(metrics.get('vqa_accuracy_shuffled_images'))}"
        + (f", majority floor: {pct(metrics['majority_floor'])})" if metrics.get("majority_floor") is not None
           else ")")
    ]
    floors = metrics.get("majority_floor_by_type") or {}

    def line(indent: str, name: str, value, shuffled, floor=None) -> str:
        tail = "" if floor is None else f", floor {pct(floor)}"
        return f"{indent}{name:<{20 - len(indent)}}{pct(value)}   (shuffled images: {pct(shuffled)}{tail})"

    by_family = metrics.get("question_types_by_family") or {}
    if len(by_family) > 1:  # the families, each with its question types beneath it
        shuffled_family = metrics.get("vqa_accuracy_by_family_shuffled_images") or {}
        shuffled_type = metrics.get("vqa_accuracy_by_type_shuffled_images") or {}
        for family, types in by_family.items():
            lines.append(line("  ", family, metrics["vqa_accuracy_by_family"].get(family),
                              shuffled_family.get(family)))
            for qtype in types:
                lines.append(line("    ", qtype, metrics["vqa_accuracy_by_type"].get(qtype),
                                  shuffled_type.get(qtype), floors.get(qtype)))
    else:
        # VQAv2 has 3 answer types and 65 question types: the answer types are the readable breakdown there.
        by = "answer_type" if metrics.get("vqa_accuracy_by_answer_type") else "type"
        shuffled_by_type = metrics.get(f"vqa_accuracy_by_{by}_shuffled_images") or {}
        for kind, value in metrics.get(f"vqa_accuracy_by_{by}", {}).items():
            lines.append(line("  ", kind, value, shuffled_by_type.get(kind), floors.get(kind) if by == "type" else None))
    caption, shuffled_caption = metrics.get("caption"), metrics.get("caption_shuffled_images") or {}
    if caption:
        lines.append(
            "captions            "
            + "  ".join(f"{k} {v:.3f}" for k, v in caption.items() if k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"))
        )
        if shuffled_caption:
            lines.append(f"  shuffled images   CIDEr {shuffled_caption['CIDEr']:.3f}")
    if metrics.get("family_average") is not None:
        lines.append(f"family average      {metrics['family_average']:.3f}   (shuffled images: "
                     f"{metrics.get('family_average_shuffled_images') or 0:.3f}; VQA families and CIDEr, as Idefics2)")
    lines.append(f"empty outputs       {pct(metrics.get('empty_output_rate'))} of {metrics.get('num_eval_examples')}")
    return lines
