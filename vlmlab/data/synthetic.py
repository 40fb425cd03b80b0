"""A built-in synthetic world: small drawn scenes of coloured shapes and a word, with captions and questions.

It is simple enough for a tiny VLM trained on a CPU to master, yet every answer needs the image: answers are
balanced per question string (yes/no 50/50, colours, shapes and words uniform), so a model that reads only the
question gets only about a third of them right.
"""

from __future__ import annotations

import random
import zlib
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from vlmlab.data.example import Example

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 200, 30),
}
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "box", "hat", "cup", "pen", "map")
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "relation", "read")
SPLITS: tuple[str, ...] = ("train", "val", "test")

_SIDE = {"small": 1 / 6, "large": 1 / 3.5}  # object side as a fraction of the image side
_BAND = 0.25  # bottom fraction of the image reserved for the word; objects never enter it
_FONT = 0.22  # word font size as a fraction of the image side (14 px at 64 px: clearly legible)
_NUMBERS = {1: "one", 2: "two", 3: "three"}


def make_split(
    split: str,
    num_images: int,
    seed: int = 0,
    image_size: int = 64,
    questions_per_image: int = 3,
    captions: bool = True,
) -> list[Example]:
    """`num_images` scenes, each giving a caption example (if `captions`) then `questions_per_image` questions."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{seed}:{split}")  # str seeds are hashed with sha512, so this is stable across runs
    type_counts = dict.fromkeys(QUESTION_TYPES, 0)
    examples = []
    for index in range(num_images):
        objects, word = _scene(rng, split, image_size)
        image = _render(objects, word, image_size)
        image_id = f"{split}-{index:06d}"
        extra = {"objects": objects, "word": word}
        items = [(None, _captions(objects, word), "caption")] if captions else []
        for qtype in _pick_types(rng, objects, word, questions_per_image, type_counts):
            question, answer = _QUESTIONS[qtype][1](rng, objects, word)
            items.append((question, [answer] * 10, qtype))
        for k, (question, answers, qtype) in enumerate(items):
            examples.append(
                Example(image, question, answers, qtype, image_id=image_id, example_id=f"{image_id}-{k}", extra=extra,
                        family=_FAMILY.get(qtype, "general"))
            )
    return examples


def _scene(rng: random.Random, split: str, size: int) -> tuple[list[dict], str | None]:
    """A random scene that belongs to `split`.

    The world is small enough that two splits would share some scenes (one object, no word) by chance, so each
    scene is assigned to exactly one split by a checksum of its content: no test image ever appears in training.
    """
    while True:
        pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], rng.randint(1, 3))
        word = rng.choice(WORDS) if rng.random() < 0.5 else None
        objects = _place(rng, pairs, size)
        if objects and zlib.crc32(repr((objects, word)).encode()) % len(SPLITS) == SPLITS.index(split):
            return objects, word


def _place(rng: random.Random, pairs: list[tuple[str, str]], size: int) -> list[dict] | None:
    """Objects sorted left to right, not overlapping, with centres far enough apart that left/right is clear;
    None when a random layout does not fit (the caller draws a new scene)."""
    field = size - round(size * _BAND)
    min_dx = size // 8
    placed = []
    for color, shape in pairs:
        size_name = rng.choice(("small", "large"))
        side = round(size * _SIDE[size_name])
        for _ in range(50):
            left, top = rng.randint(1, size - side - 1), rng.randint(1, field - side - 1)
            obj = {"color": color, "shape": shape, "size": size_name, "x": left + side // 2, "y": top + side // 2}
            box = (left, top, side)
            if all(_apart(box, other_box) and abs(obj["x"] - other["x"]) >= min_dx for other, other_box in placed):
                placed.append((obj, box))
                break
        else:
            return None
    return sorted((obj for obj, _ in placed), key=lambda o: o["x"])


def _apart(a: tuple[int, int, int], b: tuple[int, int, int], gap: int = 2) -> bool:
    """Whether two square boxes (left, top, side) are at least `gap` pixels apart along some axis."""
    (ax, ay, aside), (bx, by, bside) = a, b
    return ax + aside + gap <= bx or bx + bside + gap <= ax or ay + aside + gap <= by or by + bside + gap <= ay


def _render(objects: list[dict], word: str | None, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        side = round(size * _SIDE[obj["size"]])
        left, top = obj["x"] - side // 2, obj["y"] - side // 2
        right, bottom = left + side - 1, top + side - 1
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    if word:
        # Anchored at the descender line so that all words share a baseline and descenders ("p") stay inside.
        draw.text((size / 2, size - 1), word, fill="black", font=_font(round(size * _FONT)), anchor="md")
    return image


@lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)  # loading per image would dominate rendering time


def _captions(objects: list[dict], word: str | None) -> list[str]:
    """The canonical caption (left to right, with sizes) first, then two paraphrases."""
    described = [f"a {o['size']} {o['color']} {o['shape']}" for o in objects]
    plain = [f"a {o['color']} {o['shape']}" for o in objects]
    n = len(objects)
    return [
        _join(described) + (f' and the word "{word}"' if word else ""),
        "a white picture with " + _join(described[::-1]) + (f' above the word "{word}"' if word else ""),
        f"{_NUMBERS[n]} shape{'s' if n > 1 else ''}: " + _join(plain) + (f', and the word "{word}"' if word else ""),
    ]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _pick_types(rng: random.Random, objects: list[dict], word: str | None, k: int, counts: dict) -> list[str]:
    """`k` question types for one image, distinct while possible, each the least used so far in the split among
    those that apply, so that every type ends up about equally frequent although some need a word or two objects."""
    applicable = [t for t in QUESTION_TYPES if _QUESTIONS[t][0](objects, word)]
    chosen = []
    for _ in range(k):
        pool = [t for t in applicable if t not in chosen] or applicable
        least = min(counts[t] for t in pool)
        qtype = rng.choice([t for t in pool if counts[t] == least])
        counts[qtype] += 1
        chosen.append(qtype)
    return chosen


def _unique(objects: list[dict], key: str) -> list[str]:
    """Values of `key` (colour or shape) held by exactly one object, so that "the {value}" names one object."""
    values = [o[key] for o in objects]
    return [v for v in values if values.count(v) == 1]


def _ask_color(rng, objects, word):
    shape = rng.choice(_unique(objects, "shape"))
    return f"what color is the {shape}?", next(o["color"] for o in objects if o["shape"] == shape)


def _ask_shape(rng, objects, word):
    color = rng.choice(_unique(objects, "color"))
    return f"what shape is the {color} object?", next(o["shape"] for o in objects if o["color"] == color)


def _ask_count(rng, objects, word):
    if rng.random() < 0.5:
        return "how many shapes are there?", str(len(objects))
    # Asking about an absent colour half the time keeps "0" from being the answer a blind model can bet on.
    present = {o["color"] for o in objects}
    absent = rng.random() < 0.5
    color = rng.choice([c for c in COLORS if (c in present) != absent])
    return f"how many {color} shapes are there?", str(sum(o["color"] == color for o in objects))


def _ask_exists(rng, objects, word):
    present = [(o["color"], o["shape"]) for o in objects]
    if rng.random() < 0.5:
        color, shape = rng.choice(present)
        return f"is there a {color} {shape}?", "yes"
    color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
    return f"is there a {color} {shape}?", "no"


def _ask_relation(rng, objects, word):
    a, b = rng.sample(objects, 2)  # random order: "yes" and "no" equally likely for every pair of objects
    question = f"is the {a['color']} {a['shape']} left of the {b['color']} {b['shape']}?"
    return question, "yes" if a["x"] < b["x"] else "no"


def _ask_read(rng, objects, word):
    return "what word is written?", word


_FAMILY = {"caption": "captions", "read": "text"}  # every other type asks about the shapes: general

# type -> (does it apply to this scene, make a (question, answer))
_QUESTIONS = {
    "color": (lambda objects, word: bool(_unique(objects, "shape")), _ask_color),
    "shape": (lambda objects, word: bool(_unique(objects, "color")), _ask_shape),
    "count": (lambda objects, word: True, _ask_count),
    "exists": (lambda objects, word: True, _ask_exists),
    "relation": (lambda objects, word: len(objects) >= 2, _ask_relation),
    "read": (lambda objects, word: word is not None, _ask_read),
}
