"""VQA datasets in their official formats, and the one record builder their hub versions share.

- VQAv2 and OK-VQA: a questions JSON (`{"questions": [{question_id, image_id, question}]}`) and an annotations JSON
  (`{"annotations": [{question_id, answers: [{answer, ...}] x 10, answer_type, question_type,
  multiple_choice_answer}]}`) per COCO split, the images in COCO's `train2014/` and `val2014/` folders.
- TextVQA: `TextVQA_0.5.1_{train,val,test}.json` (`{"data": [{question_id, image_id, question, answers}]}`), the
  images in `train_images/` (train and val) and `test_images/`.

Our `test` split is each dataset's validation split, where the papers report (their test answers are hidden).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from vlmlab.data.example import Example
from vlmlab.data.records import Collector, MissingFiles, read_json, require_folder

COCO_SPLITS = {"train": "train2014", "val": "val2014", "test": "val2014"}
VQAV2_FILES = ("v2_OpenEnded_mscoco_{split}_questions.json", "v2_mscoco_{split}_annotations.json")
OKVQA_FILES = ("OpenEnded_mscoco_{split}_questions.json", "mscoco_{split}_annotations.json")
TEXTVQA_SPLITS = {"train": "train", "val": "val", "test": "val"}


def answers_of(record: dict) -> list[str]:
    """The reference answers, strings or official `{"answer": ...}` entries; the most common one first.

    The first answer is the training target. VQAv2's answers come in annotator order, so the consensus answer
    (`multiple_choice_answer`, else the most frequent) is moved to the front; the order does not change the score.
    """
    answers = [answer["answer"] if isinstance(answer, dict) else answer for answer in record.get("answers") or []]
    if not answers or not all(isinstance(answer, str) for answer in answers):
        raise ValueError("no reference answers")
    consensus = record.get("multiple_choice_answer")
    if consensus not in answers:
        consensus = Counter(answers).most_common(1)[0][0]
    first = answers.index(consensus)
    return [answers[first], *answers[:first], *answers[first + 1 :]]


def vqa_example(record: dict, image, image_id: str, dataset: str) -> Example:
    """One question of any VQA dataset: `record` holds question, question_id and answers, and optionally
    question_type and answer_type (the official annotation fields; a hub row has them side by side)."""
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    return Example(
        image,
        question,
        answers_of(record),
        question_type=str(record.get("question_type") or dataset),
        image_id=image_id,
        example_id=str(record["question_id"]),
        answer_type=str(record.get("answer_type") or ""),
    )


def read_vqa_files(root: Path, split: str, files: tuple[str, str], dataset: str) -> list[Example]:
    """VQAv2 / OK-VQA from `root`: the two official JSON files of the split and COCO's image folder."""
    coco_split = COCO_SPLITS[split]
    questions_file, annotations_file = (root / name.format(split=coco_split) for name in files)
    if not questions_file.is_file() or not annotations_file.is_file():
        raise MissingFiles(f"{root}: needs {questions_file.name} and {annotations_file.name} (the official files)")
    images = str(require_folder(root / coco_split, f"COCO's {coco_split} images; put or link it there"))
    annotations = {item["question_id"]: item for item in read_json(annotations_file).get("annotations", [])}
    collector = Collector(f"{dataset} {questions_file.name}")
    for number, question in enumerate(read_json(questions_file).get("questions", [])):

        def build(question=question):
            record = {**annotations[question["question_id"]], **question}
            # os.path, not pathlib: a third of the time of reading VQAv2's 443k training questions
            image = os.path.join(images, f"COCO_{coco_split}_{int(record['image_id']):012d}.jpg")
            return [vqa_example(record, image, f"coco-{record['image_id']}", dataset)]

        collector.add(f"question {question.get('question_id', number)}", build)
    return collector.result()


def read_vqav2(root: Path, split: str) -> list[Example]:
    return read_vqa_files(root, split, VQAV2_FILES, "vqav2")


def read_okvqa(root: Path, split: str) -> list[Example]:
    return read_vqa_files(root, split, OKVQA_FILES, "okvqa")


def read_textvqa(root: Path, split: str) -> list[Example]:
    """TextVQA from `root`: `TextVQA_<version>_<split>.json` (the newest version present) and its image folder."""
    name = TEXTVQA_SPLITS[split]
    candidates = sorted(root.glob(f"TextVQA_*_{name}.json"))
    if not candidates:
        raise MissingFiles(f"{root}: needs TextVQA_0.5.1_{name}.json (the official file)")
    images = require_folder(root / ("test_images" if name == "test" else "train_images"), "TextVQA's images")
    collector = Collector(f"textvqa {candidates[-1].name}")
    for number, record in enumerate(read_json(candidates[-1]).get("data", [])):

        def build(record=record):
            image_id = str(record["image_id"])
            return [vqa_example(record, str(images / f"{image_id}.jpg"), f"textvqa-{image_id}", "textvqa")]

        collector.add(f"question {record.get('question_id', number)}", build)
    return collector.result()


def vqa_rows(rows, images, split: str, dataset: str) -> list[Example]:
    """Examples from hub rows (dicts with the official fields) and their lazy images."""
    collector = Collector(f"{dataset} (hub, {split})")
    prefix = "textvqa" if dataset == "textvqa" else "coco"
    for index, (row, image) in enumerate(zip(rows, images)):
        image_id = f"{prefix}-{row['image_id']}" if row.get("image_id") is not None else f"{dataset}-{split}-{index}"
        collector.add(f"row {index}", lambda row=row, image=image, image_id=image_id: [
            vqa_example(row, image, image_id, dataset)])
    return collector.result()
