import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from vlmlab.config import Config, ConfigError, WorldConfig, apply_overrides, validate
from vlmlab.data import load_examples
from vlmlab.data.scene import COLORS, SHAPES, WORDS, overlaps
from vlmlab.data.world import FAMILY_OF, SIDES, THINGS, corpus, facts, make_split, statements

GENERATORS = ("scatter", "tiles")


@pytest.fixture(scope="module", params=GENERATORS)
def split(request):
    world = WorldConfig(generator=request.param)
    return request.param, make_split("train", 600, world, seed=0), make_split("test", 300, world, seed=0)


def _objects_named(objects, name):
    words = name.split()
    return [o for o in objects if all(w in (o["color"], o["shape"]) for w in words) and len(words) > 0]


def _one(objects, name):
    found = [o for o in objects if f"{o['color']} {o['shape']}" == name]
    assert len(found) == 1, f"{name!r} names {len(found)} objects"
    return found[0]


def _expected(question, scene):
    """The answer re-derived from the scene's description alone, written apart from the question makers."""
    objects = scene["objects"]
    cx = lambda o: (o["box"][0] + o["box"][2]) / 2  # noqa: E731
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        [obj] = [o for o in objects if o["shape"] == m[1]]
        return obj["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        [obj] = [o for o in objects if o["color"] == m[1]]
        return obj["shape"]
    if question == "how many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(o["color"] == m[1] for o in objects))
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return str(sum(o["shape"] == m[1] for o in objects))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o["color"], o["shape"]) == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", question):
        a, b = _one(objects, m[1]), _one(objects, m[3])
        axis = 0 if m[2] in ("left of", "right of") else 1
        first, second = (a, b) if m[2] in ("left of", "above") else (b, a)
        if first["box"][axis + 2] < second["box"][axis]:
            return "yes"
        assert second["box"][axis + 2] < first["box"][axis], "asked of objects side by side on that axis"
        return "no"
    if m := re.fullmatch(r"is the (\w+ \w+) bigger than the (\w+ \w+)\?", question):
        a, b = _one(objects, m[1]), _one(objects, m[2])
        side = lambda o: o["box"][2] - o["box"][0]  # noqa: E731
        assert max(side(a), side(b)) >= 1.4 * min(side(a), side(b))
        return "yes" if side(a) > side(b) else "no"
    if m := re.fullmatch(r"what shape is left of the (\w+ \w+)\?", question):
        ref = _one(objects, m[1])
        [left] = [o for o in objects if o["box"][2] < ref["box"][0]]
        assert cx(left) < cx(ref)
        return left["shape"]
    if question == "what word is written?":
        [word] = scene["words"]
        return word["text"]
    if m := re.fullmatch(r"what word is written on or by the (\w+ \w+)\?", question):
        ref = _one(objects, m[1])
        [word] = [w for w in scene["words"] if objects[w["object"]] is ref]
        return word["text"]
    if m := re.fullmatch(r"how many sides does the (\w+) shape have\?", question):
        [obj] = [o for o in objects if o["color"] == m[1]]
        return str(SIDES[obj["shape"]])
    if m := re.fullmatch(r"what thing is usually the color of the (\w+)\?", question):
        [obj] = [o for o in objects if o["shape"] == m[1]]
        return THINGS[obj["color"]]
    if m := re.fullmatch(r"is the (\w+) the color of (?:a |the )?(\w+)\?", question):
        [obj] = [o for o in objects if o["shape"] == m[1]]
        return "yes" if THINGS[obj["color"]] == m[2] else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_every_answer_follows_from_the_scene(split):
    _, train, test = split
    for example in train + test:
        if not example.is_caption:
            assert _expected(example.question, example.extra["scene"]) == example.target, example.question


def test_the_picture_is_the_scene(split):
    """Canvas size as described; each object is drawn in its colour (the nearest of the palette) at its centre (triangles: nearer the base);
    nothing overlaps, nothing is cut off; words are drawn where described."""
    _, train, _ = split
    for example in [e for e in train if e.is_caption][:150]:
        scene, pixels = example.extra["scene"], np.asarray(example.image).astype(int)
        assert example.image.size == (scene["width"], scene["height"])
        boxes = [o["box"] for o in scene["objects"]]
        for i, box in enumerate(boxes):
            assert 0 <= box[0] and 0 <= box[1] and box[2] < scene["width"] and box[3] < scene["height"]
            assert not any(overlaps(box, other) for other in boxes[i + 1:])
        on = {w["object"] for w in scene["words"] if w["on"]}
        for index, obj in enumerate(scene["objects"]):
            left, top, right, bottom = obj["box"]
            if index in on or right - left < 12:
                continue
            x, y = (left + right) // 2, (top + bottom) // 2
            if obj["shape"] == "triangle":  # its widest part: the base's side (tiles' point down, too)
                y = (top + 2 * bottom) // 3 if obj.get("turn", 0) < 0.5 else (2 * top + bottom) // 3
            nearest = min(COLORS, key=lambda c: np.abs(pixels[y, x] - np.array(COLORS[c])).sum())
            assert nearest == obj["color"], (obj, pixels[y, x])
        for word in scene["words"]:
            left, top, right, bottom = word["box"]
            ink = pixels[top:bottom + 1, left:right + 1].reshape(-1, 3)
            assert np.abs(ink - np.median(ink, axis=0)).sum(axis=1).max() > 150  # letters stand out


def test_answers_are_balanced_per_type(split):
    """Within each question type no answer dominates: the majority floor stays near 1 / (answers)."""
    _, train, _ = split
    answers = defaultdict(Counter)
    for e in train:
        if not e.is_caption:
            answers[e.question_type][e.target] += 1
    assert set(answers) == set(FAMILY_OF)
    for qtype, counts in answers.items():
        share = max(counts.values()) / sum(counts.values())
        assert share <= 2.2 / len(counts), (qtype, counts)
    assert len(answers["read"]) == len(WORDS) and len(answers["color"]) == len(COLORS)
    assert set(answers["shape"]) == set(SHAPES) and set(answers["position"]) == {"yes", "no"}


def test_splits_share_no_picture_and_repeat_exactly(split):
    name, train, test = split
    pictures = lambda examples: {e.image.tobytes() for e in examples if e.is_caption}  # noqa: E731
    assert not pictures(train) & pictures(test)
    again = make_split("test", 300, WorldConfig(generator=name), seed=0)
    assert [(e.question, e.answers) for e in again] == [(e.question, e.answers) for e in test]
    assert pictures(again) == pictures(test)
    other_seed = make_split("test", 300, WorldConfig(generator=name), seed=1)
    assert pictures(other_seed) != pictures(test)


def test_canvases_vary_in_size_and_shape_within_the_settings(split):
    _, train, _ = split
    sizes = [e.image.size for e in train if e.is_caption]
    assert all(48 <= min(s) and max(s) <= 192 and max(s) / min(s) <= 2.0 + 1e-9 for s in sizes)
    assert min(w / h for w, h in sizes) < 0.7 and max(w / h for w, h in sizes) > 1.4
    counts = Counter(len(e.extra["scene"]["objects"]) for e in train if e.is_caption)
    assert set(counts) >= {1, 2, 3, 4} and max(counts) <= 6


def test_captions_are_several_and_name_every_object(split):
    _, train, _ = split
    for e in [e for e in train if e.is_caption][:100]:
        assert len(set(e.answers)) == 5
        for obj in e.extra["scene"]["objects"]:
            assert all(f"{obj['color']} {obj['shape']}" in caption for caption in e.answers[:4])
        for word in e.extra["scene"]["words"]:
            assert f'"{word["text"]}"' in e.answers[0]


def test_families_and_the_v1_world_stay_reachable():
    cfg = apply_overrides(Config(), ["data.world.generator=scatter", "data.world.families=text",
                                     "data.train_images=40", "data.captions=false"])
    examples = load_examples("synthetic", "train", cfg.data)
    assert examples and {e.family for e in examples} == {"text"}
    assert {e.question_type for e in examples} <= {"read", "read_at"}
    v1 = load_examples("synthetic", "train", apply_overrides(Config(), ["data.train_images=20"]).data)
    assert {e.image.size for e in v1} == {(64, 64)} and {e.family for e in v1} <= {"general", "text", "captions"}


@pytest.mark.parametrize("override, named", [
    ("data.world.generator=grid", "data.world.generator"),
    ("data.world.max_side=20", "data.world.max_side"),
    ("data.world.families=general,ocr", "data.world.families"),
    ("data.world.text_px=big", "data.world.text_px"),
    ("data.world.colour=red", "data.world.colour"),
])
def test_a_wrong_world_setting_is_named(override, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        apply_overrides(Config(), [override])


def test_world_settings_nest_in_the_config_and_a_file():
    cfg = Config()
    validate(cfg)
    from vlmlab.config import flat_fields, from_dict

    loaded = from_dict({"data": {"world": {"generator": "tiles", "max_objects": 3}}})
    assert (loaded.data.world.generator, loaded.data.world.max_objects) == ("tiles", 3)
    assert flat_fields(loaded)["data.world.max_objects"] == 3
    with pytest.raises(ConfigError, match="data.world is a section"):
        apply_overrides(Config(), ["data.world=tiles"])


def test_the_corpus_states_every_fact_a_knowledge_answer_needs():
    from vlmlab.config import DataConfig

    pairs = corpus(20, seed=0, world=WorldConfig(generator="scatter"), data=DataConfig())
    text = " ".join(p + " " + t for p, t in pairs)
    for shape, sides in SIDES.items():
        assert f"a {shape} has {sides} sides." in statements() and f"a {shape} have?" in text
    for color, thing in THINGS.items():
        assert any(thing in s and s.endswith(f"{color}.") for s in statements())
        assert (f"Question: what thing is usually {color}? Answer:", thing) in pairs
    assert len(facts()) == len(SIDES) + len(THINGS) * (2 + len(COLORS))
    assert sum(p == "A short caption:" for p, _ in pairs) == 20
