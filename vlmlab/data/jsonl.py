"""The generic dataset format: a JSONL file, one example per line.

    {"image": "images/0001.jpg", "question": "what color is the car?", "answers": ["red", "red", ...]}
    {"image": "images/0002.jpg", "caption": "a dog runs on the beach"}        # or "captions": [...]

`image` paths are relative to the file's folder (or absolute); `answer` may stand for a one-element `answers`;
`question_type`, `answer_type`, `image_id` and `question_id` are optional. A bad line is reported in one line and
skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmlab.data.example import Example
from vlmlab.data.records import DatasetError
from vlmlab.log import warn


def _example(record: dict, root: Path, number: int) -> Example:
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        raise ValueError('needs an "image" path')
    image = str(root / record["image"])
    image_id = str(record.get("image_id", record["image"]))
    example_id = str(record.get("question_id", record.get("id", number)))
    if "question" in record:
        question = record["question"]
        answers = record.get("answers", [record["answer"]] if "answer" in record else None)
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        if not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError('a question needs "answers" (a list of strings) or "answer"')
        kind = str(record.get("question_type", "vqa"))
        answer_type = str(record.get("answer_type", ""))
        return Example(image, question, list(answers), kind, image_id, example_id, answer_type=answer_type)
    captions = record.get("captions", [record["caption"]] if "caption" in record else None)
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError('needs "question" + "answers", or "caption" / "captions"')
    return Example(image, None, list(captions), "caption", image_id, example_id)


def read_jsonl(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    examples, skipped = [], 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                examples.append(_example(json.loads(line), path.parent, number))
            except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
                skipped += 1
                warn(f"{path}:{number}: skipped, {err}")
    if not examples:
        raise DatasetError(f"{path}: no usable example ({skipped} lines skipped)")
    return examples


def write_jsonl(examples: list[Example], directory: str | Path) -> Path:
    """Writes examples with in-memory images as PNG files plus `data.jsonl`; returns the JSONL path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    with (directory / "data.jsonl").open("w", encoding="utf-8") as out:
        for example in examples:
            image = f"images/{example.image_id}.png"
            if not (directory / image).exists():
                example.image.save(directory / image)
            record = {"image": image, "image_id": example.image_id, "question_id": example.example_id}
            if example.is_caption:
                record["captions"] = example.answers
            else:
                record.update(question=example.question, answers=example.answers, question_type=example.question_type)
                if example.answer_type:
                    record["answer_type"] = example.answer_type
            out.write(json.dumps(record) + "\n")
    return directory / "data.jsonl"
