"""What a scene of the synthetic world (v2) is made of, shared by its generators and its questions.

A generator (scatter.py, tiles.py) draws a scene and describes it as plain data, the same way whichever drew it:

    {"width": W, "height": H, "background": "plain" | "noise" | "gradient",
     "objects": [{"color", "shape", "box": [left, top, right, bottom]}, ...],          (boxes never overlap)
     "words": [{"text", "object": index, "on": bool, "box": [...]}, ...]}   (each written on or by its object)

world.py asks the questions and writes the captions from that description alone.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

from PIL import ImageFont

from vlmlab.config import ConfigError, WorldConfig

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 130, 20),
    "yellow": (240, 215, 20),
    "green": (40, 160, 60),
    "blue": (35, 75, 225),
    "purple": (130, 50, 170),
    "pink": (250, 120, 190),
    "brown": (120, 70, 30),
}
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "box", "hat", "cup", "pen", "map", "owl", "key", "bus", "egg")
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "gradient")


def names(text: str) -> list[str]:
    """The items of a comma-separated setting."""
    return [name.strip() for name in text.split(",") if name.strip()]


def text_px(world: WorldConfig) -> tuple[int, int]:
    """The font size range of `data.world.text_px` ("8-11", or one size "9")."""
    low, sep, high = world.text_px.partition("-")
    try:
        low, high = int(low), int(high if sep else low)
    except ValueError:
        raise ConfigError(f"data.world.text_px={world.text_px!r} is not allowed; write a size or a range, "
                          "e.g. 8-11") from None
    if not 4 <= low <= high:
        raise ConfigError(f"data.world.text_px={world.text_px!r} is not allowed; sizes of at least 4 px, low-high")
    return low, high


def canvas_size(rng: random.Random, world: WorldConfig) -> tuple[int, int]:
    """(width, height), both within [min_side, max_side]: the long side uniform, the ratio of the sides
    log-uniform up to max_aspect (less where the short side would fall below min_side), either way round."""
    long_side = rng.randint(world.min_side, world.max_side)
    most = max(1.0, min(world.max_aspect, long_side / world.min_side))
    short_side = round(long_side / math.exp(rng.uniform(0, math.log(most))))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


@lru_cache(maxsize=None)
def font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)  # loading per image would dominate drawing time


def text_box(text: str, px: int) -> tuple[int, int]:
    """(width, height) in pixels of `text` drawn at `px`, ink only."""
    left, top, right, bottom = font(px).getbbox(text, anchor="mm")
    return right - left, bottom - top


def word_choices(rng: random.Random, world: WorldConfig, objects: list[dict]) -> list[tuple[int, str, int, int, int]]:
    """The words a scene is to carry, before its generator places them: none in a share 1 - word_rate of scenes,
    else 1 or 2 different words on different objects, each `(object index, text, font px, ink width, ink height)`."""
    low, high = text_px(world)
    if not objects or rng.random() >= world.word_rate:
        return []
    count = rng.randint(1, min(2, len(objects)))
    chosen = []
    for index, text in zip(rng.sample(range(len(objects)), count), rng.sample(WORDS, count)):
        px = rng.randint(low, high)
        chosen.append((index, text, px, *text_box(text, px)))
    return chosen


def overlaps(a, b, gap: int = 0) -> bool:
    """Whether boxes (left, top, right, bottom) come closer than `gap` pixels along both axes."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def inside(box, width: int, height: int) -> bool:
    return box[0] >= 0 and box[1] >= 0 and box[2] <= width - 1 and box[3] <= height - 1


def luminance(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def draw_words(draw, scene: dict) -> None:
    """Writes the scene's words where it says: white on a dark object, black elsewhere."""
    for word in scene["words"]:
        left, top, right, bottom = word["box"]
        on = scene["objects"][word["object"]]
        ink = "white" if word["on"] and luminance(COLORS[on["color"]]) < 140 else "black"
        draw.text(((left + right) / 2, (top + bottom) / 2), word["text"], fill=ink, font=font(word["px"]),
                  anchor="mm")
