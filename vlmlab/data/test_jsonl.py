import json

import pytest

from vlmlab.config import DataConfig
from vlmlab.data import load_examples
from vlmlab.data.jsonl import DatasetError, read_jsonl, write_jsonl
from vlmlab.data.synthetic import make_split


def test_round_trip_through_files(tmp_path):
    examples = make_split("test", 4, questions_per_image=2)
    path = write_jsonl(examples, tmp_path)
    loaded = load_examples(str(path), "test", DataConfig())
    assert [(e.question, e.answers, e.question_type, e.image_id) for e in loaded] == [
        (e.question, e.answers, e.question_type, e.image_id) for e in examples
    ]
    assert all((tmp_path / "images" / f"{e.image_id}.png").is_file() for e in examples)


def test_bad_lines_are_reported_and_skipped(tmp_path, capsys):
    lines = [
        {"image": "a.png", "question": "what color?", "answers": ["red"]},
        {"image": "b.png", "question": "   ", "answers": ["red"]},
        {"question": "no image", "answers": ["x"]},
        {"image": "c.png", "caption": "a dog"},
        {"image": "d.png", "question": "how many?", "answer": "2"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n\n"
    (tmp_path / "d.jsonl").write_text(text)
    examples = read_jsonl(tmp_path / "d.jsonl")
    assert [e.question for e in examples] == ["what color?", None, "how many?"]
    assert examples[2].answers == ["2"] and examples[1].answers == ["a dog"]
    assert examples[0].image == str(tmp_path / "a.png")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "d.jsonl:2" in err[0] and "empty" in err[0] and "d.jsonl:6" in err[2]


def test_missing_or_empty_files_are_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset file"):
        read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no usable example"):
        read_jsonl(tmp_path / "empty.jsonl")
