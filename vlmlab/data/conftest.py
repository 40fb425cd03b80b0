"""Tiny datasets written in each dataset's official layout, with small PIL images, for the loader tests."""

import json

import pytest
from PIL import Image

COLORS = ["red", "green", "blue", "yellow", "white", "black"]
ANSWER_TYPES = ["yes/no", "yes/no", "number", "other"]  # per question of an image, in this order


def write_image(path, color="red", size=(12, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def vqa_annotation(question_id, image_id, answer_type, answers):
    return {
        "question_id": question_id, "image_id": image_id, "answer_type": answer_type,
        "question_type": {"yes/no": "is the", "number": "how many", "other": "what color is the"}[answer_type],
        "multiple_choice_answer": max(set(answers), key=answers.count),
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


@pytest.fixture
def vqa_root(tmp_path):
    """VQAv2 (v2_ files) and OK-VQA files for val2014 and train2014 over the same COCO image folders.

    val2014 holds 6 images x 4 questions (2 yes/no, 1 number, 1 other), plus one question without annotation and
    one with an empty question text; train2014 holds 2 images x 4 questions.
    """
    for split, num_images in (("val2014", 6), ("train2014", 2)):
        questions, annotations = [], []
        for image_index in range(num_images):
            image_id = 1000 * (split == "train2014") + image_index + 1
            write_image(tmp_path / split / f"COCO_{split}_{image_id:012d}.jpg", COLORS[image_index])
            for k, answer_type in enumerate(ANSWER_TYPES):
                question_id = image_id * 10 + k
                answers = {"yes/no": ["yes"] * 7 + ["no"] * 3, "number": ["2"] * 10,
                           "other": [COLORS[image_index]] * 9 + ["dark " + COLORS[image_index]]}[answer_type]
                if k == 1:
                    answers = answers[::-1]  # the consensus answer comes last in annotator order
                questions.append({"question_id": question_id, "image_id": image_id, "question": f"q{question_id}?"})
                annotations.append(vqa_annotation(question_id, image_id, answer_type, answers))
        if split == "val2014":
            questions.append({"question_id": 99991, "image_id": 1, "question": "no annotation?"})
            questions.append({"question_id": 99992, "image_id": 1, "question": "  "})
            annotations.append(vqa_annotation(99992, 1, "other", ["x"] * 10))
        for prefix in ("v2_", ""):
            (tmp_path / f"{prefix}OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(
                {"task_type": "Open-Ended", "data_subtype": split, "questions": questions}))
            (tmp_path / f"{prefix}mscoco_{split}_annotations.json").write_text(json.dumps(
                {"data_subtype": split, "annotations": annotations}))
    return tmp_path


@pytest.fixture
def textvqa_root(tmp_path):
    data = []
    for index in range(3):
        image_id = f"{index:016x}"
        write_image(tmp_path / "train_images" / f"{image_id}.jpg", COLORS[index])
        data.append({"question_id": 500 + index, "image_id": image_id, "question": "what does the sign say?",
                     "answers": ["stop"] * 8 + ["STOP", "stop sign"], "image_classes": ["Sign"],
                     "set_name": "val"})
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(
        {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": 0.5, "data": data}))
    return tmp_path


@pytest.fixture
def karpathy_root(tmp_path):
    """dataset_coco.json: 2 train + 1 restval + 1 val + 2 test images, 5 captions each (one image with none)."""
    images = []
    for cocoid, split, folder in ((1, "train", "train2014"), (2, "train", "train2014"), (3, "restval", "val2014"),
                                  (4, "val", "val2014"), (5, "test", "val2014"), (6, "test", "val2014")):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        write_image(tmp_path / folder / filename, COLORS[cocoid - 1])
        sentences = [{"raw": f"A {COLORS[cocoid - 1]} picture number {n}.", "tokens": [], "sentid": n}
                     for n in range(5)]
        images.append({"filepath": folder, "filename": filename, "split": split, "cocoid": cocoid,
                       "sentences": sentences if cocoid != 6 else []})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    return tmp_path


@pytest.fixture
def flickr8k_root(tmp_path):
    """Flickr8k's text files and image folder: 3 train, 1 dev, 2 test images (one test image has no captions)."""
    names = [f"{1000 + i}_abc{i}.jpg" for i in range(6)]
    for i, name in enumerate(names[:5]):
        write_image(tmp_path / "Flicker8k_Dataset" / name, COLORS[i])
    lines = [f"{name}#{n}\tA dog number {i} runs , caption {n} ." for i, name in enumerate(names[:5])
             for n in range(5)]
    lines.insert(3, "a line without a tab")
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:3]) + "\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text(names[3] + "\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("\n".join(names[4:]) + "\n")
    return tmp_path
