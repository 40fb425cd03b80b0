"""The hub path, run on local copies in the hub's layout (parquet files written by `datasets` itself)."""

import datasets
import pytest
from PIL import Image

from vlmlab.config import DataConfig
from vlmlab.data import load_examples
from vlmlab.data.records import DatasetError
from vlmlab.images import load_image


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


def write_hub_copy(folder, split, columns, features):
    (folder / "data").mkdir(parents=True)
    table = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def test_vqav2_rows_from_a_hub_copy(tmp_path):
    answer = {"answer": datasets.Value("string"), "answer_confidence": datasets.Value("string"),
              "answer_id": datasets.Value("int64")}
    features = {"image": datasets.Image(), "question_id": datasets.Value("int64"), "image_id": datasets.Value("int64"),
                "question": datasets.Value("string"), "answers": [answer], "answer_type": datasets.Value("string"),
                "question_type": datasets.Value("string"), "multiple_choice_answer": datasets.Value("string")}
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(["no"] + ["yes"] * 9)]
    columns = {
        "image": [Image.new("RGB", (8, 8), color) for color in ("red", "blue", "green")],
        "question_id": [11, 12, 13], "image_id": [1, 2, 3], "question": ["is it red?", "is it blue?", ""],
        "answers": [answers] * 3, "answer_type": ["yes/no"] * 3, "question_type": ["is it"] * 3,
        "multiple_choice_answer": ["yes"] * 3,
    }
    folder = write_hub_copy(tmp_path / "vqa", "validation", columns, features)
    examples = load_examples(f"vqav2:{folder}", "test", DataConfig())  # test -> the hub's validation split
    assert [e.example_id for e in examples] == ["11", "12"]  # the empty question is skipped
    assert examples[0].answers[0] == "yes" and examples[0].answer_type == "yes/no" and examples[0].image_id == "coco-1"
    assert load_image(examples[1].image).getpixel((0, 0)) == (0, 0, 255)  # decoded only now, from the table
    assert "row 1" in str(examples[1].image)


def test_caption_rows_from_a_hub_copy(tmp_path):
    features = {"image": datasets.Image(), **{f"caption_{i}": datasets.Value("string") for i in range(2)}}
    columns = {"image": [Image.new("RGB", (4, 4))] * 2, "caption_0": ["a b", "c d"], "caption_1": ["e f", "g h"]}
    folder = write_hub_copy(tmp_path / "flickr", "train", columns, features)
    examples = load_examples(f"flickr8k:{folder}", "train", DataConfig())
    assert [e.target for e in examples] == ["a b", "e f", "c d", "g h"]
    assert examples[0].image_id == "flickr8k-train-0" and examples[0].answers == ["a b", "e f"]


def test_hub_errors_are_one_line(tmp_path):
    folder = write_hub_copy(tmp_path / "text", "train", {"text": ["x"]}, {"text": datasets.Value("string")})
    with pytest.raises(DatasetError, match="no image column"):
        load_examples(f"flickr8k:{folder}", "train", DataConfig())
    with pytest.raises(DatasetError, match="cannot load split 'validation'"):
        load_examples(f"flickr8k:{folder}", "val", DataConfig())
