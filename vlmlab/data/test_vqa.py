import json

import pytest

from vlmlab.config import DataConfig
from vlmlab.data import load_examples
from vlmlab.data.records import DatasetError, MissingFiles
from vlmlab.data.vqa import answers_of, read_okvqa, read_textvqa, read_vqav2
from vlmlab.images import load_image


def test_vqav2_official_files(vqa_root, capsys):
    examples = read_vqav2(vqa_root, "test")  # our test split is the official val2014
    assert len(examples) == 6 * 4
    err = capsys.readouterr().err
    assert "question 99991: skipped, missing field 99991" in err
    assert "question 99992: skipped, the question is empty" in err
    first = examples[0]
    assert (first.question, first.example_id, first.image_id) == ("q10?", "10", "coco-1")
    assert first.image == str(vqa_root / "val2014" / "COCO_val2014_000000000001.jpg")
    red, green, blue = load_image(first.image).getpixel((0, 0))
    assert red > 240 and green < 10 and blue < 10  # a red JPEG
    assert (first.answer_type, first.question_type) == ("yes/no", "is the")
    assert len(first.answers) == 10 and first.target == "yes"
    assert examples[1].target == "yes" and sorted(examples[1].answers) == sorted(first.answers)  # consensus first
    assert sorted({e.answer_type for e in examples}) == ["number", "other", "yes/no"]
    train = read_vqav2(vqa_root, "train")
    assert len(train) == 8 and train[0].image.endswith("train2014/COCO_train2014_000000001001.jpg")


def test_okvqa_reads_its_own_file_names(vqa_root):
    assert [e.example_id for e in read_okvqa(vqa_root, "val")] == [e.example_id for e in read_vqav2(vqa_root, "val")]
    (vqa_root / "mscoco_val2014_annotations.json").unlink()
    with pytest.raises(MissingFiles, match="mscoco_val2014_annotations.json"):
        read_okvqa(vqa_root, "val")


def test_missing_files_and_folders_are_one_clear_error(vqa_root, tmp_path):
    with pytest.raises(MissingFiles, match="v2_OpenEnded_mscoco_val2014_questions.json"):
        read_vqav2(tmp_path / "nowhere", "val")
    (vqa_root / "val2014").rename(vqa_root / "elsewhere")
    with pytest.raises(MissingFiles, match="val2014: no such folder"):
        read_vqav2(vqa_root, "val")
    (vqa_root / "v2_mscoco_train2014_annotations.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_vqav2(vqa_root, "train")


def test_textvqa_official_file(textvqa_root):
    examples = read_textvqa(textvqa_root, "test")  # the val file: TextVQA's test answers are hidden
    assert len(examples) == 3 and examples[0].image_id == "textvqa-0000000000000000"
    assert examples[0].answers[0] == "stop" and len(examples[0].answers) == 10
    assert examples[0].question_type == "textvqa" and examples[0].image.endswith("train_images/0000000000000000.jpg")


def test_answers_of_accepts_both_spellings():
    assert answers_of({"answers": ["b", "a", "a"]}) == ["a", "b", "a"]
    assert answers_of({"answers": [{"answer": "x"}, {"answer": "y"}], "multiple_choice_answer": "y"}) == ["y", "x"]
    with pytest.raises(ValueError, match="no reference answers"):
        answers_of({"answers": []})


def test_load_examples_by_name_and_folder(vqa_root, textvqa_root):
    data = DataConfig()
    examples = load_examples(f"vqav2:{vqa_root}", "val", data)
    assert len(examples) == 24
    data.eval_size = 8
    subset = load_examples(f"vqav2:{vqa_root}", "test", data)
    assert len(subset) == 8 and [e.answer_type for e in subset].count("yes/no") == 4  # stratified: 1/2 yes/no
    assert load_examples(f"textvqa:{textvqa_root}", "val", DataConfig())[0].question == "what does the sign say?"


def test_results_of_a_skipped_record_do_not_stop_the_others(vqa_root, capsys):
    path = vqa_root / "v2_OpenEnded_mscoco_train2014_questions.json"
    data = json.loads(path.read_text())
    data["questions"][0]["image_id"] = "not a number"
    path.write_text(json.dumps(data))
    examples = read_vqav2(vqa_root, "train")
    assert len(examples) == 7 and "question 10010: skipped" in capsys.readouterr().err


def test_eval_command_on_official_files_writes_the_result_file(vqa_root, tmp_path, capsys):
    from vlmlab.cli import main
    from vlmlab.config import apply_overrides
    from vlmlab.model import build_vlm
    from vlmlab.presets import get_preset
    from vlmlab.test_model import SMALL
    from vlmlab.prompts import training_texts

    examples = read_vqav2(vqa_root, "val")
    model = build_vlm(apply_overrides(get_preset("default"), SMALL), training_texts(examples, DataConfig()))
    model.save(tmp_path / "model")
    capsys.readouterr()
    results = tmp_path / "vqa_results.json"
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", f"vqav2:{vqa_root}", "--results", str(results),
                 "data.eval_size=12", "eval.max_new_tokens=2"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["data"] == f"vqav2:{vqa_root}" and metrics["num_vqa_examples"] == 12
    assert set(metrics["vqa_accuracy_by_answer_type"]) == {"yes/no", "number", "other"}
    assert set(metrics["vqa_accuracy_by_answer_type_shuffled_images"]) == {"yes/no", "number", "other"}
    assert metrics["prompt"]["vqa"] == {"name": "qa", "template": "Question: {question} Answer:"}
    entries = json.loads(results.read_text())
    assert len(entries) == 12 and all(set(e) == {"question_id", "answer"} for e in entries)
    assert all(isinstance(e["question_id"], int) and isinstance(e["answer"], str) for e in entries)
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", "vqa2"]) == 2
    assert "unknown dataset 'vqa2'" in capsys.readouterr().err
