import pytest

from vlmlab.data.example import Example
from vlmlab.evaluate import derangement, score, summary_lines


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
