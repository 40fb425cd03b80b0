import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from vlmlab.data.synthetic import COLORS, QUESTION_TYPES, SHAPES, WORDS, make_split

SIZE = 64
BAND_TOP = 48  # the word band is the bottom quarter of a 64-px image


@pytest.fixture(scope="module")
def train():
    return make_split("train", 2000)


@pytest.fixture(scope="module")
def val():
    return make_split("val", 2000)


def _questions(examples):
    return [e for e in examples if e.question is not None]


def _pixels(example):
    return example.image.tobytes()


def _expected(question, objects, word):
    """(question type, answer) re-derived from the scene description alone."""
    by_pair = {(o["color"], o["shape"]): o for o in objects}
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        [obj] = [o for o in objects if o["shape"] == m[1]]  # the shape must name exactly one object
        return "color", obj["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        [obj] = [o for o in objects if o["color"] == m[1]]
        return "shape", obj["shape"]
    if question == "how many shapes are there?":
        return "count", str(len(objects))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        assert m[1] in COLORS
        return "count", str(sum(o["color"] == m[1] for o in objects))
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        assert m[1] in COLORS and m[2] in SHAPES
        return "exists", "yes" if (m[1], m[2]) in by_pair else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) left of the (\w+) (\w+)\?", question):
        a, b = by_pair[m[1], m[2]], by_pair[m[3], m[4]]
        assert a is not b
        return "relation", "yes" if a["x"] < b["x"] else "no"
    if question == "what word is written?":
        assert word is not None
        return "read", word
    raise AssertionError(f"unknown question template: {question!r}")


def test_same_arguments_give_identical_examples_and_other_seeds_or_splits_differ():
    a, b = make_split("train", 30, seed=3), make_split("train", 30, seed=3)
    assert [_pixels(e) for e in a] == [_pixels(e) for e in b]
    assert [(e.question, e.answers, e.question_type, e.example_id, e.extra) for e in a] == [
        (e.question, e.answers, e.question_type, e.example_id, e.extra) for e in b
    ]
    for other in (make_split("train", 30, seed=4), make_split("test", 30, seed=3)):
        assert [_pixels(e) for e in other] != [_pixels(e) for e in a]


def test_example_counts_order_and_ids():
    examples = make_split("val", 7, questions_per_image=3)
    assert len(examples) == 7 * 4
    assert [e.question_type == "caption" for e in examples] == [k == 0 for _ in range(7) for k in range(4)]
    assert examples[5].image_id == "val-000001" and examples[5].example_id == "val-000001-1"
    assert len({e.image_id for e in examples}) == 7
    assert len({e.example_id for e in examples}) == 28
    no_captions = make_split("val", 7, questions_per_image=2, captions=False)
    assert len(no_captions) == 14 and all(e.question is not None for e in no_captions)
    assert all(e.image.size == (SIZE, SIZE) and e.image.mode == "RGB" for e in examples)


def test_scenes_follow_the_rules_and_the_pixels_show_them(train):
    for e in train[::4 * 10]:  # one example per image, every 10th image
        objects, word = e.extra["objects"], e.extra["word"]
        assert 1 <= len(objects) <= 3 and word in (*WORDS, None)
        assert len({(o["color"], o["shape"]) for o in objects}) == len(objects)
        xs = [o["x"] for o in objects]
        assert xs == sorted(xs) and all(b - a >= 8 for a, b in zip(xs, xs[1:]))
        pixels = np.asarray(e.image)
        for o in objects:
            assert o["size"] in ("small", "large") and o["y"] < BAND_TOP
            assert tuple(pixels[o["y"], o["x"]]) == COLORS[o["color"]]  # every shape covers its centre


def test_every_answer_matches_the_scene(train):
    for e in _questions(train):
        assert e.answers == [e.answers[0]] * 10
        assert _expected(e.question, e.extra["objects"], e.extra["word"]) == (e.question_type, e.answers[0])


def test_captions_describe_the_scene_left_to_right(train):
    captions = [e for e in train if e.question is None]
    assert len(captions) == 2000
    for e in captions:
        objects, word = e.extra["objects"], e.extra["word"]
        listed = [f"a {o['size']} {o['color']} {o['shape']}" for o in objects]
        canonical = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " and " + listed[-1]
        assert e.answers[0] == canonical + (f' and the word "{word}"' if word else "")
        assert 2 <= len(e.answers) == len(set(e.answers))


def test_question_types_are_about_equally_frequent_and_yes_no_is_balanced(train):
    questions = _questions(train)
    counts = Counter(e.question_type for e in questions)
    assert set(counts) == set(QUESTION_TYPES)
    assert max(counts.values()) - min(counts.values()) <= 0.02 * len(questions)
    for qtype in ("exists", "relation"):
        answers = Counter(e.answers[0] for e in questions if e.question_type == qtype)
        assert set(answers) == {"yes", "no"}
        assert 0.45 <= answers["yes"] / sum(answers.values()) <= 0.55


def test_question_only_baseline_stays_at_or_below_half(train, val):
    # The best a blind model can do: answer each question string with its majority answer in training.
    votes = defaultdict(Counter)
    for e in _questions(train):
        votes[e.question][e.answers[0]] += 1
    majority = {q: c.most_common(1)[0][0] for q, c in votes.items()}
    scored = defaultdict(list)
    for e in _questions(val):
        scored[e.question_type].append(majority.get(e.question) == e.answers[0])
    overall = [hit for hits in scored.values() for hit in hits]
    assert sum(overall) / len(overall) <= 0.5
    # No single type can be answered blind either (yes/no sits at 0.5, the rest below).
    assert all(sum(hits) / len(hits) <= 0.55 for hits in scored.values())


def test_splits_share_no_image(train, val):
    test = make_split("test", 500)
    train_pixels = {_pixels(e) for e in train}
    assert not train_pixels & {_pixels(e) for e in val}
    assert not train_pixels & {_pixels(e) for e in test}
    assert not {_pixels(e) for e in val} & {_pixels(e) for e in test}


def test_word_band_has_ink_exactly_when_a_word_is_shown(train):
    images = [e for e in train if e.question is None]
    assert 0.4 <= np.mean([e.extra["word"] is not None for e in images]) <= 0.6
    for e in images[:300]:
        band = np.asarray(e.image)[BAND_TOP:]
        if e.extra["word"] is None:
            assert (band == 255).all()
        else:
            assert (band.max(axis=2) < 100).sum() > 15  # enough near-black pixels to spell a word


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="train.*val.*test"):
        make_split("dev", 1)
