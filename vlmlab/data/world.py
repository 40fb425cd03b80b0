"""The synthetic world, v2: scenes of coloured shapes and small words, with questions in the four families of the
Idefics2 evaluations (VQAv2 -> general, TextVQA -> text, OK-VQA -> knowledge, COCO -> captions).

A scene generator (`GENERATORS`: scatter.py, tiles.py; `data.world.generator`) draws a scene and describes it
as plain data (scene.py); this module asks about it and describes it in words, from that description alone, so
the questions, captions and their balance are the same whichever generator drew it.

Answers are balanced per question type (each question is the one, among those the scene allows, whose answer the
split has used least), so a model that reads only the question is held near the majority-answer floor that the
evaluation prints beside each type. Knowledge answers need a fact the picture does not show (how many sides a star
has, what is usually yellow): `facts()` and `statements()` state them, and `corpus()` is the text a language
model can learn them from.
"""

from __future__ import annotations

import random
import zlib
from collections import defaultdict

from vlmlab.config import ConfigError, DataConfig, WorldConfig
from vlmlab.data import scatter, tiles
from vlmlab.data.example import Example
from vlmlab.data.scene import BACKGROUNDS, COLORS, SHAPES, names, text_px
from vlmlab.prompts import format_prompt

SIDES = {"circle": 0, "triangle": 3, "square": 4, "star": 10}  # knowledge: not visible as a number
THINGS = {"red": "strawberry", "orange": "carrot", "yellow": "banana", "green": "grass", "blue": "sky",
          "purple": "grape", "pink": "flamingo", "brown": "chocolate"}  # knowledge: the thing usually that colour
SPLITS: tuple[str, ...] = ("train", "val", "test")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SIZE_RATIO = 1.4  # "bigger" is asked only of sides at least this far apart


def check_world(world: WorldConfig) -> None:
    """Raises a ConfigError naming the `data.world` field whose value cannot make a world."""
    def refuse(name, allowed):
        return ConfigError(f"data.world.{name}={getattr(world, name)!r} is not allowed; {allowed}")

    if world.generator not in GENERATORS and world.generator != "v1":
        raise refuse("generator", f"valid: {', '.join(GENERATORS)}, v1")
    if world.max_side < world.min_side:
        raise refuse("max_side", f"it must be at least data.world.min_side={world.min_side}")
    if world.max_aspect < 1:
        raise refuse("max_aspect", "it must be at least 1 (width / height within [1 / it, it])")
    if not world.min_object <= world.max_object <= 1:
        raise refuse("max_object", f"it must be in [data.world.min_object={world.min_object}, 1]")
    if world.word_rate > 1:
        raise refuse("word_rate", "it must be at most 1")
    for name, valid in (("backgrounds", BACKGROUNDS), ("families", FAMILIES)):
        given = names(getattr(world, name))
        if not given or any(item not in valid for item in given):
            raise refuse(name, f"a comma-separated choice of {', '.join(valid)}")
    text_px(world)


def make_split(split: str, num_images: int, world: WorldConfig, seed: int = 0, questions_per_image: int = 3,
               captions: bool = True) -> list[Example]:
    """`num_images` scenes of `split`, each giving a caption example (if `captions`) then its questions."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    generator = GENERATORS[world.generator]
    # str seeds are hashed with sha512: stable across runs; the generator's name keeps two worlds apart
    rng = random.Random(f"{seed}:{split}:{world.generator}")
    types = [t for t in QUESTION_TYPES if FAMILY_OF[t] in names(world.families)]
    balance = Balance(types)
    examples = []
    for index in range(num_images):
        scene, image = _scene_of_split(rng, generator, world, split)
        image_id = f"{split}-{index:06d}"
        items = [(None, captions_of(scene), "caption")] if captions else []
        offered = balance.offers(scene)
        for qtype in balance.types_for(rng, offered, questions_per_image):
            question, answer = balance.question(rng, qtype, offered)
            items.append((question, [answer] * 10, qtype))
        for k, (question, answers, qtype) in enumerate(items):
            examples.append(Example(image, question, answers, qtype, image_id=image_id,
                                    example_id=f"{image_id}-{k}", extra={"scene": scene},
                                    family=FAMILY_OF.get(qtype, "captions")))
    return examples


def _scene_of_split(rng, generator, world, split):
    """A scene that belongs to `split`: each scene is assigned to one split by a checksum of its content, so no
    test picture ever appears in training, even where two splits draw the same small scene by chance."""
    while True:
        scene, draw = generator(rng, world)
        if zlib.crc32(repr(scene).encode()) % len(SPLITS) == SPLITS.index(split):
            return scene, draw()


class Balance:
    """Chooses the questions of a split: per image, the question types used least so far among those the scene
    allows; per type, the answer used least so far among those the scene offers."""

    def __init__(self, types: list[str]):
        self.types = types
        self.type_counts = dict.fromkeys(types, 0)
        self.answer_counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def types_for(self, rng: random.Random, offered: dict[str, list], k: int) -> list[str]:
        """`offered`: each type's (question, answer) pairs for the scene, as `offers` gives them."""
        applicable = [t for t in self.types if offered[t]]
        chosen: list[str] = []
        for _ in range(k if applicable else 0):
            pool = [t for t in applicable if t not in chosen] or applicable
            least = min(self.type_counts[t] for t in pool)
            qtype = rng.choice([t for t in pool if self.type_counts[t] == least])
            self.type_counts[qtype] += 1
            chosen.append(qtype)
        return chosen

    def offers(self, scene: dict) -> dict[str, list]:
        """Every (question, answer) the scene allows, per question type of the split."""
        return {t: QUESTIONS[t](scene) for t in self.types}

    def question(self, rng: random.Random, qtype: str, offered: dict[str, list]) -> tuple[str, str]:
        by_answer = defaultdict(list)
        for question, answer in offered[qtype]:
            by_answer[answer].append(question)
        counts = self.answer_counts[qtype]
        least = min(counts[a] for a in by_answer)
        answer = rng.choice(sorted(a for a in by_answer if counts[a] == least))
        counts[answer] += 1
        return rng.choice(by_answer[answer]), answer


# --- geometry of a scene's objects ---------------------------------------------------------------------------------

def centre(obj: dict) -> tuple[float, float]:
    left, top, right, bottom = obj["box"]
    return (left + right) / 2, (top + bottom) / 2


def side(obj: dict) -> int:
    left, top, right, bottom = obj["box"]
    return max(right - left, bottom - top)


def is_left_of(a: dict, b: dict) -> bool:
    """a's box lies wholly left of b's: overlapping projections are neither left nor right, never asked."""
    return a["box"][2] < b["box"][0]


def is_above(a: dict, b: dict) -> bool:
    return a["box"][3] < b["box"][1]


def _unique(objects: list[dict], key) -> list[dict]:
    """The objects a description `key(obj)` names alone ("the star", "the red star")."""
    values = [key(o) for o in objects]
    return [o for o, v in zip(objects, values) if values.count(v) == 1]


def _name(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


# --- questions: each returns every (question, answer) the scene allows -----------------------------------------------

def _color(scene):
    return [(f"what color is the {o['shape']}?", o["color"]) for o in _unique(scene["objects"], lambda o: o["shape"])]


def _shape(scene):
    return [(f"what shape is the {o['color']} object?", o["shape"])
            for o in _unique(scene["objects"], lambda o: o["color"])]


def _count(scene):
    objects = scene["objects"]
    found = [("how many shapes are there?", str(len(objects)))]
    found += [(f"how many {c} shapes are there?", str(sum(o["color"] == c for o in objects))) for c in COLORS]
    found += [(f"how many {s}s are there?", str(sum(o["shape"] == s for o in objects))) for s in SHAPES]
    return found


def _exists(scene):
    present = {(o["color"], o["shape"]) for o in scene["objects"]}
    return [(f"is there {_a(c + ' ' + s)}?", "yes" if (c, s) in present else "no") for c in COLORS for s in SHAPES]


_POSITIONS = {"left of": is_left_of, "right of": lambda a, b: is_left_of(b, a), "above": is_above,
              "below": lambda a, b: is_above(b, a)}


def _position(scene):
    named = _unique(scene["objects"], _name)
    found = []
    for a in named:
        for b in named:
            for relation, holds in _POSITIONS.items():
                if a is not b and (holds(a, b) or holds(b, a)):  # clearly one way or the other
                    found.append((f"is the {_name(a)} {relation} the {_name(b)}?", "yes" if holds(a, b) else "no"))
    return found


def _size(scene):
    named = _unique(scene["objects"], _name)
    found = []
    for a in named:
        for b in named:
            if a is not b and side(a) >= SIZE_RATIO * side(b):
                found.append((f"is the {_name(a)} bigger than the {_name(b)}?", "yes"))
                found.append((f"is the {_name(b)} bigger than the {_name(a)}?", "no"))
    return found


def _left_of(scene):
    objects = scene["objects"]
    found = []
    for ref in _unique(objects, _name):
        left = [o for o in objects if is_left_of(o, ref)]
        if len(left) == 1:
            found.append((f"what shape is left of the {_name(ref)}?", left[0]["shape"]))
    return found


def _read(scene):
    words = scene["words"]
    return [("what word is written?", words[0]["text"])] if len(words) == 1 else []


def _read_at(scene):
    objects = scene["objects"]
    named = {id(o) for o in _unique(objects, _name)}
    return [(f"what word is written on or by the {_name(objects[w['object']])}?", w["text"])
            for w in scene["words"] if id(objects[w["object"]]) in named]


def _sides(scene):
    return [(f"how many sides does the {o['color']} shape have?", str(SIDES[o["shape"]]))
            for o in _unique(scene["objects"], lambda o: o["color"])]


def _thing(scene):
    return [(f"what thing is usually the color of the {o['shape']}?", THINGS[o["color"]])
            for o in _unique(scene["objects"], lambda o: o["shape"])]


def _color_fact(scene):
    return [(f"is the {o['shape']} the color of {_article(THINGS[c])}?", "yes" if o["color"] == c else "no")
            for o in _unique(scene["objects"], lambda o: o["shape"]) for c in COLORS]


def _article(thing: str) -> str:
    return {"grass": "grass", "sky": "the sky", "chocolate": "chocolate"}.get(thing, f"a {thing}")


# type -> (family, its questions); a type applies to a scene when it offers at least one question
FAMILY_QUESTIONS = {
    "general": {"color": _color, "shape": _shape, "count": _count, "exists": _exists, "position": _position,
                "size": _size, "left_of": _left_of},
    "text": {"read": _read, "read_at": _read_at},
    "knowledge": {"sides": _sides, "thing": _thing, "color_fact": _color_fact},
}
FAMILIES = tuple(FAMILY_QUESTIONS)
QUESTIONS = {t: ask for family in FAMILY_QUESTIONS.values() for t, ask in family.items()}
QUESTION_TYPES = tuple(QUESTIONS)
FAMILY_OF = {t: family for family, types in FAMILY_QUESTIONS.items() for t in types}


# --- captions ------------------------------------------------------------------------------------------------------

def _size_word(obj: dict, scene: dict) -> str:
    fraction = side(obj) / min(scene["width"], scene["height"])
    return "big " if fraction >= 0.35 else "small " if fraction <= 0.18 else ""


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions_of(scene: dict) -> list[str]:
    """Five references from different templates (the first is the training target): which objects, their sizes,
    their order left to right and top to bottom, how many of each colour, and the words with their objects."""
    objects = scene["objects"]
    by_x = sorted(objects, key=lambda o: centre(o)[0])
    by_y = sorted(objects, key=lambda o: centre(o)[1])
    words = [f'the word "{w["text"]}" {"on" if w["on"] else "by"} the {_name(objects[w["object"]])}'
             for w in scene["words"]]
    with_words = (" with " + _join(words)) if words else ""
    n = len(objects)
    colours = [c for c in COLORS if any(o["color"] == c for o in objects)]
    counts = [f"{NUMBERS[k]} {c} shape{'s' if k > 1 else ''}"
              for c in colours for k in [sum(o["color"] == c for o in objects)]]
    return [
        _join([_a(f"{_size_word(o, scene)}{_name(o)}") for o in by_x]) + with_words,
        f"{NUMBERS[n]} shape{'s' if n > 1 else ''} on a {scene['background']} background: "
        + _join([_a(_name(o)) for o in by_x]),
        "from left to right, " + _join([_a(_name(o)) for o in by_x]) + with_words,
        "from top to bottom, " + _join([_a(f"{_size_word(o, scene)}{_name(o)}") for o in by_y]),
        _join(counts) + ("" if not words else ", and " + _join([f'"{w["text"]}"' for w in scene["words"]])),
    ]


# --- the text corpus the knowledge comes from ----------------------------------------------------------------------

def facts() -> list[tuple[str, str]]:
    """Every fact of the world as (question, answer), in the words the knowledge questions use."""
    found = []
    for shape, sides in SIDES.items():
        found.append((f"how many sides does a {shape} have?", str(sides)))
    for color, thing in THINGS.items():
        found.append((f"what color is {_article(thing)}?", color))
        found.append((f"what thing is usually {color}?", thing))
        for other in COLORS:
            found.append((f"is {color} the color of {_article(THINGS[other])}?", "yes" if other == color else "no"))
    return found


def statements() -> list[str]:
    """The facts as sentences, several phrasings each: the shipped text corpus."""
    lines = []
    for shape, sides in SIDES.items():
        lines += [f"a {shape} has {sides} sides.", f"every {shape} has {NUMBERS[sides]} sides."]
    for color, thing in THINGS.items():
        lines += [f"{_article(thing)} is usually {color}.", f"the color of {_article(thing)} is {color}.",
                  f"a {color} shape has the color of {_article(thing)}."]
    return lines


def corpus(num_scenes: int, seed: int, world: WorldConfig, data: DataConfig) -> list[tuple[str, str]]:
    """(prompt, target) texts with no image, as the LM reads them: every fact as a question in `data.prompt`'s
    template, every statement as its beginning and its last word, and the first caption of `num_scenes` scenes
    drawn from their own seed (no training picture's description) after the caption prompt."""
    pairs = [(format_prompt(data, question), answer) for question, answer in facts()]
    pairs += [tuple(sentence.rsplit(" ", 1)) for sentence in statements()]
    rng = random.Random(f"corpus:{seed}:{world.generator}")
    for _ in range(num_scenes):
        scene, _draw = GENERATORS[world.generator](rng, world)
        pairs.append((format_prompt(data, None), captions_of(scene)[0]))
    return pairs


GENERATORS = {"scatter": scatter.draw_scene, "tiles": tiles.draw_scene}  # (rng, world) -> (scene, draw)
