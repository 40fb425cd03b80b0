import shutil
import subprocess

import pytest

from vlmlab import metrics
from vlmlab.metrics import (
    JavaNotFoundError,
    accuracy_by,
    caption_metrics,
    normalize_answer,
    vqa_accuracy,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics need Java")


# ---------------------------------------------------------------- VQA accuracy

def test_normalize_answer_follows_official_rules():
    assert normalize_answer("  The Two dogs.\n") == "2 dogs"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("couldnt've") == "couldn't've"
    assert normalize_answer("somebody'd") == "somebodyd"  # the official table's backwards entry
    assert normalize_answer("Im") == "im"  # official "Im" key never fires: words are lowercased
    assert normalize_answer("3.5") == "3.5"  # a period before a digit stays
    assert normalize_answer("1,000") == "1000"  # digit,digit: punctuation deleted, not spaced
    assert normalize_answer("black/white") == "black white"  # no space next to it: spaced
    assert normalize_answer("yes, sir") == "yes sir"  # "," touches a space: deleted
    assert normalize_answer("none") == "0"


def test_the_prediction_is_always_normalised():
    # The official evaluation normalises the prediction whatever the references are.
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("The Yes!", ["yes"] * 10) == 1.0
    assert vqa_accuracy(" 2\n", ["2"] * 10) == 1.0


def test_identical_references_are_taken_as_they_are():
    # All ten references agree, so the official script compares them raw with the normalised prediction:
    # a reference that is not already in normalised form can never be matched.
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("a dog", ["a dog"] * 10) == 0.0


def test_differing_references_get_punctuation_processing_only():
    answers = ["2"] * 4 + ["3"] * 6
    assert vqa_accuracy("Two", answers) == 1.0
    assert vqa_accuracy("the dog", ["dog"] * 5 + ["puppy"] * 5) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 5 + ["no"] * 5) == 1.0
    assert vqa_accuracy("dont know", ["don't know"] * 5 + ["no"] * 5) == 1.0
    assert vqa_accuracy("black/white", ["black/white"] * 3 + ["black"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dog", ["dog."] * 3 + ["cat"] * 7) == pytest.approx(0.9)  # the period goes
    # "!" not next to a space becomes a space: the reference is "dog " and never equals a prediction.
    assert vqa_accuracy("dog", ["dog!"] * 3 + ["cat"] * 7) == 0.0
    # References are not lowercased, and number words and articles stay.
    assert vqa_accuracy("dog", ["Dog"] * 3 + ["cat"] * 7) == 0.0
    assert vqa_accuracy("2", ["two"] * 3 + ["3"] * 7) == 0.0
    assert vqa_accuracy("dog", ["the dog"] * 3 + ["cat"] * 7) == 0.0


def test_accuracy_by_key():
    scored = [("yes/no", 1.0), ("number", 0.0), ("yes/no", 0.5), ("other", 1.0)]
    assert accuracy_by(scored) == {"number": 0.0, "other": 1.0, "yes/no": 0.75}


def test_leave_one_out_mean_with_ten_answers():
    # 3 matches: the 3 matching references see 2 others -> 2/3 each; the other 7 see 3 -> 1.
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    # 2 matches: matching ones see 1 other -> 1/3; the other 8 see 2 -> 2/3.
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    # 1 match: only the 9 non-matching references see it, 1/3 each.
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_accuracy("green", ["red"] * 4 + ["blue"] * 6) == 0.0


def test_fewer_references():
    assert vqa_accuracy("The cat.", ["cat"]) == 1.0  # one reference: match after normalising
    assert vqa_accuracy("two", ["2"]) == 1.0
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    # k=2, threshold 1: the reference that is not "cat" sees one match -> 1, the other 0.
    assert vqa_accuracy("cat", ["cat", "dog"]) == 0.5
    assert vqa_accuracy("cat", ["cat", "cat"]) == 1.0
    # k=3, threshold 2: "cat" refs see 1 match -> 1/2 each; "dog" sees 2 -> 1.
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)
    # k=4 is already the official threshold 3: each "cat" sees 2 -> 2/3, "dog" sees 3 -> 1.
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"]) == pytest.approx(0.75)


def test_empty_answers_raise():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError):
        vqa_accuracy("yes", "yes")


# ------------------------------------------------------------ caption metrics

REFERENCES = {
    "a": ["a dog runs across the green grass", "a brown dog running on a lawn",
          "a dog is playing outside in the grass"],
    "b": ["a man rides a red bicycle down the street", "a person cycling on a city road",
          "a cyclist in a red shirt on the street"],
    "c": ["two cats sleep on a white sofa", "a pair of cats napping on the couch",
          "two kittens lying on a sofa"],
    "d": ["a plate of pasta with tomato sauce", "spaghetti with red sauce on a plate",
          "a dinner plate holding noodles and sauce"],
}


@pytest.fixture(scope="module")
def identical_scores():
    return caption_metrics({key: refs[0] for key, refs in REFERENCES.items()}, REFERENCES)


@needs_java
def test_identical_captions_score_high(identical_scores):
    assert set(identical_scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4",
                                     "METEOR", "ROUGE-L", "CIDEr"}
    assert all(type(value) is float for value in identical_scores.values())
    assert identical_scores["BLEU-4"] == pytest.approx(1.0)
    assert identical_scores["ROUGE-L"] == pytest.approx(1.0)
    assert identical_scores["METEOR"] > 0.9
    assert identical_scores["CIDEr"] > 1.0


@needs_java
def test_unrelated_and_empty_predictions_score_lower(identical_scores):
    predictions = {
        "a": "an airplane parked at the airport",
        "b": "",  # empty: must neither crash nor hang
        "c": "...",  # only punctuation: empty after tokenisation
        "d": "a plate of pasta with tomato sauce",
    }
    scores = caption_metrics(predictions, REFERENCES)
    for name, value in scores.items():
        assert 0.0 <= value < identical_scores[name], name


@needs_java
def test_empty_predictions_become_one_non_matching_word():
    gts, res = metrics._tokenize({"a": "", "b": " ...!", "c": "A dog."}, {
        "a": ["a dog"], "b": ["a dog"], "c": ["A dog runs."]})
    assert res == {"a": [metrics._EMPTY_PREDICTION], "b": [metrics._EMPTY_PREDICTION],
                   "c": ["a dog"]}
    assert gts == {"a": ["a dog"], "b": ["a dog"], "c": ["a dog runs"]}


@needs_java
def test_line_breaks_inside_captions_do_not_shift_examples():
    gts, res = metrics._tokenize({"a": "a dog\rruns", "b": "a cat\u2028sleeps"},
                                 {"a": ["a dog\r\nruns"], "b": ["a cat\nsleeps"]})
    assert res == {"a": ["a dog runs"], "b": ["a cat sleeps"]}
    assert gts == {"a": ["a dog runs"], "b": ["a cat sleeps"]}


def test_mismatched_ids_raise():
    with pytest.raises(ValueError, match="'b'"):
        caption_metrics({"a": "a dog"}, {"a": ["a dog"], "b": ["a cat"]})
    with pytest.raises(ValueError, match="'x'"):
        caption_metrics({"a": "a dog", "x": "a cat"}, {"a": ["a dog"]})
    with pytest.raises(ValueError):
        caption_metrics({"a": "a dog"}, {"a": "a dog"})  # references must be a list


def test_missing_java_raises_before_any_subprocess(monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("a subprocess was started")

    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    with pytest.raises(JavaNotFoundError, match="Java"):
        caption_metrics({"a": "a dog"}, {"a": ["a dog"]})


@needs_java
def test_meteor_process_is_stopped_even_on_failure(monkeypatch):
    started = []

    class RecordingMeteor(metrics.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

    class FailingCider:
        def compute_score(self, gts, res):
            raise RuntimeError("boom")

    monkeypatch.setattr(metrics, "Meteor", RecordingMeteor)
    monkeypatch.setattr(metrics, "Cider", FailingCider)
    with pytest.raises(RuntimeError, match="boom"):
        caption_metrics({"a": "a dog"}, {"a": ["a dog"]})
    assert len(started) == 1 and started[0].meteor_p.poll() is not None


@needs_java
def test_caption_metrics_equal_the_official_coco_caption_evaluation(identical_scores, tmp_path, monkeypatch,
                                                                    capsys):
    """The same numbers as pycocoevalcap's COCOEvalCap run on COCO-format annotation and result files (the
    predictions of `identical_scores`, so that one METEOR start serves both).

    COCOEvalCap also computes SPICE, which needs Stanford CoreNLP models downloaded on first use; SPICE is not one
    of our metrics, so it is replaced by a scorer that returns zeros and is not compared.
    """
    import json

    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(res)

        def method(self):
            return "SPICE"

    ids = {key: number for number, key in enumerate(sorted(REFERENCES), start=1)}
    annotations = {"info": {}, "licenses": [], "type": "captions", "images": [{"id": i} for i in ids.values()],
                   "annotations": [{"image_id": ids[key], "id": 10 * ids[key] + n, "caption": caption}
                                   for key, refs in REFERENCES.items() for n, caption in enumerate(refs)]}
    (tmp_path / "refs.json").write_text(json.dumps(annotations))
    (tmp_path / "results.json").write_text(json.dumps(
        [{"image_id": ids[key], "caption": refs[0]} for key, refs in REFERENCES.items()]))
    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    coco = COCO(str(tmp_path / "refs.json"))
    official = coco_eval.COCOEvalCap(coco, coco.loadRes(str(tmp_path / "results.json")))
    official.evaluate()
    capsys.readouterr()
    names = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4", "METEOR": "METEOR",
             "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}
    for ours_name, official_name in names.items():
        assert identical_scores[ours_name] == pytest.approx(official.eval[official_name], abs=1e-12), ours_name
