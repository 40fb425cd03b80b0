import pytest

from vlmlab.data.example import Example
from vlmlab.evaluate import derangement, score, summary_lines, vqa_results


def test_derangement_moves_every_image():
    ids = [f"img{i}" for i in range(7)] * 3
    swap = derangement(ids, seed=0)
    assert set(swap) == set(ids) and all(swap[k] != k for k in swap)
    assert sorted(swap.values()) == sorted(set(ids))  # a permutation: each image is used once
    assert swap == derangement(ids, seed=0) and swap != derangement(ids, seed=1)
    assert derangement(["only"], seed=0) == {}


def test_score_by_type_and_empty_outputs():
    examples = [
        Example(None, "what color?", ["red"] * 10, "color", "a", "1"),
        Example(None, "what shape?", ["circle"] * 10, "shape", "a", "2"),
        Example(None, "what color?", ["blue"] * 10, "color", "b", "3"),
        Example(None, None, ["a red circle"], "caption", "a", "4"),
    ]
    result = score(examples, ["red", "", "green", None], with_captions=False)
    assert result["vqa_accuracy"] == pytest.approx(1 / 3)
    assert result["vqa_accuracy_by_type"] == {"color": 0.5, "shape": 0.0}
    assert result["empty_output_rate"] == pytest.approx(1 / 3)  # the unusable example is not counted
    assert result["caption"] is None
    lines = summary_lines({**result, "vqa_accuracy_shuffled_images": 0.25, "num_eval_examples": 3})
    assert "33.3%" in lines[0] and "shuffled images: 25.0%" in lines[0]


def test_answer_type_breakdown_and_the_official_result_file():
    examples = [
        Example(None, "is it red?", ["yes"] * 10, "is the", "a", "11", answer_type="yes/no"),
        Example(None, "how many?", ["2"] * 10, "how many", "a", "12", answer_type="number"),
        Example(None, "is it blue?", ["no"] * 10, "is the", "b", "13", answer_type="yes/no"),
    ]
    result = score(examples, ["Yes.", "two", None], with_captions=False)
    assert result["vqa_accuracy_by_answer_type"] == {"number": 1.0, "yes/no": 1.0}
    assert result["vqa_accuracy_by_type"] == {"how many": 1.0, "is the": 1.0}
    lines = summary_lines({**result, "vqa_accuracy_by_answer_type_shuffled_images": {"yes/no": 0.5}})
    assert lines[1].split()[:2] == ["number", "100.0%"] and "shuffled images: 50.0%" in lines[2]
    records = [{"id": e.example_id, "question": e.question, "prediction": p}
               for e, p in zip(examples, ["Yes.", "two", None])]
    records.append({"id": "img-1", "question": None, "prediction": "a caption"})
    assert vqa_results(records) == [{"question_id": 11, "answer": "Yes."}, {"question_id": 12, "answer": "two"},
                                    {"question_id": 13, "answer": ""}]
