"""World v2's main scene generator: shapes of any size placed anywhere on canvases of any shape.

1 to `max_objects` objects of up to four colours per scene (so colours repeat and counting means something),
each a square-bounded circle, square, upward triangle or five-pointed star, its side drawn log-uniformly between
`min_object` and `max_object` of the canvas's short side (smaller when there are many), placed uniformly where it
fits: no object is cut off by the border or overlaps another (2 px apart at least). Words, in small type, are
written on their object when it is large enough to hold them (black or white, whichever reads), else centred just
under it where that is free; a word that fits nowhere is left out.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from vlmlab.config import WorldConfig
from vlmlab.data.scene import COLORS, SHAPES, canvas_size, draw_words, inside, names, overlaps, word_choices

GAP = 2  # pixels between any two things drawn
PLACEMENT_TRIES = 60


def draw_scene(rng: random.Random, world: WorldConfig):
    """(scene, draw): the scene's description and a function that draws its picture."""
    width, height = canvas_size(rng, world)
    short = min(width, height)
    wanted = rng.randint(1, world.max_objects)
    palette = rng.sample(list(COLORS), rng.randint(1, min(4, wanted)))
    # many objects must share the canvas: the largest side shrinks as 1 / sqrt(n)
    largest = max(world.min_object, min(world.max_object, 0.9 / math.sqrt(wanted)))
    boxes: list[list[int]] = []
    objects = []
    for _ in range(wanted):
        fraction = math.exp(rng.uniform(math.log(world.min_object), math.log(largest)))
        box = _place(rng, max(4, round(short * fraction)), width, height, boxes)
        if box is not None:
            boxes.append(box)
            objects.append({"color": rng.choice(palette), "shape": rng.choice(SHAPES), "box": box})
    words = _words(rng, world, objects, boxes, width, height)
    scene = {"width": width, "height": height, "background": rng.choice(names(world.backgrounds)),
             "texture": rng.randrange(2**31), "objects": objects, "words": words}
    return scene, lambda: render(scene)


def _place(rng, side, width, height, taken):
    for _ in range(PLACEMENT_TRIES):
        if side > min(width, height) - 2:
            return None
        left, top = rng.randint(1, width - side - 1), rng.randint(1, height - side - 1)
        box = [left, top, left + side, top + side]
        if not any(overlaps(box, other, GAP) for other in taken):
            return box
    return None


def _words(rng, world, objects, boxes, width, height):
    """0 to 2 words (fewer when they do not fit), each on or under a different object."""
    words = []
    for index, text, px, w, h in word_choices(rng, world, objects):
        left, top, right, bottom = objects[index]["box"]
        cx = (left + right) / 2
        # the triangle's and the star's middles are narrower than their boxes: they hold less
        room = (right - left) * (0.55 if objects[index]["shape"] in ("triangle", "star") else 0.85)
        if w + 2 <= room and h + 2 <= room:
            cy = (top + bottom) / 2 + (0.15 * (bottom - top) if objects[index]["shape"] == "triangle" else 0)
            box = [round(cx - w / 2), round(cy - h / 2), round(cx + w / 2), round(cy + h / 2)]
            words.append({"text": text, "object": index, "on": True, "box": box, "px": px})
            continue
        box = [round(cx - w / 2), bottom + GAP, round(cx + w / 2), bottom + GAP + h]
        if inside(box, width, height) and not any(overlaps(box, b, 1) for b in boxes if b != objects[index]["box"]):
            boxes.append(box)
            words.append({"text": text, "object": index, "on": False, "box": box, "px": px})
    return words


def background(scene: dict) -> np.ndarray:
    """[H, W, 3] uint8: a light plain colour, light noise, or a gradient between two light colours."""
    rng = np.random.default_rng(scene["texture"])
    height, width = scene["height"], scene["width"]
    light = rng.integers(205, 256, size=(2, 3)).astype(np.float32)
    if scene["background"] == "plain":
        pixels = np.broadcast_to(light[0], (height, width, 3))
    elif scene["background"] == "noise":
        pixels = light[0] + rng.normal(0, 14, size=(height, width, 3))
    else:
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        t = (np.cos(angle) * xs / width + np.sin(angle) * ys / height)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
        pixels = light[0] + t[..., None] * (light[1] - light[0])
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render(scene: dict) -> Image.Image:
    image = Image.fromarray(background(scene))
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        _shape(draw, obj["shape"], obj["box"], COLORS[obj["color"]])
    draw_words(draw, scene)
    return image


def _shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    else:  # a five-pointed star, one point up, inner radius 0.45 of the outer
        cx, cy, radius = (left + right) / 2, (top + bottom) / 2, (right - left) / 2
        points = [(cx + r * math.sin(k * math.pi / 5), cy - r * math.cos(k * math.pi / 5))
                  for k in range(10) for r in [radius if k % 2 == 0 else 0.45 * radius]]
        draw.polygon(points, fill=fill)
