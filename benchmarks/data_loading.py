"""Benchmark of dataset loading at VQAv2's full size: is reading the official files and drawing a subset practical?

Writes VQAv2-format questions and annotations JSON for `--questions` questions (default: val2014's 214,354, 10
answers each, the official answer-type mix) into a temporary folder, then times reading them into examples, a
stratified subset of `--subset` questions, and preparing `--images` images for the tower (decode, squash to 224,
and with image splitting). Prints one JSON object of seconds and sizes.

    python benchmarks/data_loading.py [--questions N] [--subset N] [--images N]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

from PIL import Image

from vlmlab.data.mixture import subset
from vlmlab.data.vqa import read_vqav2
from vlmlab.images import ImagePrep, load_image

ANSWER_TYPES = {"yes/no": 0.38, "number": 0.12, "other": 0.50}  # VQAv2 val2014's approximate shares


def write_vqav2(root: Path, questions: int, images: int) -> None:
    rng = random.Random(0)
    (root / "val2014").mkdir(parents=True)
    for image_id in range(1, images + 1):  # a few real photos-sized images; the rest of the ids need no file
        Image.effect_noise((640, 480), 64).convert("RGB").save(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    kinds = rng.choices(list(ANSWER_TYPES), weights=list(ANSWER_TYPES.values()), k=questions)
    records, annotations = [], []
    for question_id, kind in enumerate(kinds):
        image_id = question_id // 5 + 1
        answers = {"yes/no": ["yes", "no"], "number": ["2", "3"], "other": ["red", "blue"]}[kind]
        answers = [rng.choice(answers) for _ in range(10)]
        records.append({"question_id": question_id, "image_id": image_id, "question": f"question {question_id}?"})
        annotations.append({"question_id": question_id, "image_id": image_id, "answer_type": kind,
                            "question_type": "what", "multiple_choice_answer": answers[0],
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                        for i, a in enumerate(answers)]})
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": records}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=214_354)
    parser.add_argument("--subset", type=int, default=20_000)
    parser.add_argument("--images", type=int, default=50)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vlmlab-data-bench-"))
    write_vqav2(root, args.questions, args.images)

    started = time.perf_counter()
    examples = read_vqav2(root, "val")
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    picked = subset(examples, args.subset, seed=0)
    subset_seconds = time.perf_counter() - started
    paths = [str(root / "val2014" / f"COCO_val2014_{i:012d}.jpg") for i in range(1, args.images + 1)]
    timings = {}
    for name, prep in (("squash", ImagePrep(224)), ("split", ImagePrep(224, split=True))):
        started = time.perf_counter()
        for path in paths:
            prep(load_image(path))
        timings[name] = (time.perf_counter() - started) / len(paths) * 1000
    print(json.dumps({
        "questions": len(examples),
        "read_official_files_seconds": round(read_seconds, 2),
        "subset": len(picked),
        "subset_seconds": round(subset_seconds, 3),
        "subset_answer_types": dict(Counter(e.answer_type for e in picked)),
        "all_answer_types": dict(Counter(e.answer_type for e in examples)),
        "image_prep_ms_per_640x480_jpeg": {name: round(ms, 1) for name, ms in timings.items()},
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
