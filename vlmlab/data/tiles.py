"""A second scene generator for world v2, written apart from scatter.py to check that a recipe tuned on one
world is not tuned to its drawing: a recipe that only works on scatter's pictures fails here.

What differs: objects sit in the cells of a grid (2 to 4 columns, 1 to 3 rows, as the canvas's shape allows),
one per cell, jittered within it, their side 35-95% of the cell's (not a fraction of the canvas); shapes are
drawn anti-aliased (4x supersampled) with a dark outline, each colour's shade varies, triangles point up or down,
stars turn; the backgrounds are plain, speckled or radial; a word too large for its object goes above it, not
under. The description is the same as scatter's (scene.py), so the questions and captions are the same.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from vlmlab.config import WorldConfig
from vlmlab.data.scene import COLORS, SHAPES, canvas_size, draw_words, inside, names, overlaps, word_choices

SUPERSAMPLE = 4


def draw_scene(rng: random.Random, world: WorldConfig):
    """(scene, draw): the scene's description and a function that draws its picture."""
    width, height = canvas_size(rng, world)
    columns = max(1, min(4, round(2 * width / height) if width >= height else 2))
    rows = max(1, min(3, round(2 * height / width) if height > width else 2))
    cell_w, cell_h = width / columns, height / rows
    cells = rng.sample([(c, r) for c in range(columns) for r in range(rows)],
                       min(columns * rows, rng.randint(1, world.max_objects)))
    objects = []
    for column, row in cells:
        cell = min(cell_w, cell_h)
        side = max(4, round(cell * rng.uniform(0.35, 0.95) * min(1.0, world.max_object * 2)))
        if side > min(cell_w, cell_h) - 3:
            side = int(min(cell_w, cell_h) - 3)
        if side < 4:
            continue
        left = round(column * cell_w + rng.uniform(1, cell_w - side - 2))
        top = round(row * cell_h + rng.uniform(1, cell_h - side - 2))
        objects.append({"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES),
                        "box": [left, top, left + side, top + side],
                        "shade": rng.randint(-25, 25), "turn": rng.random()})
    objects.sort(key=lambda o: (o["box"][1], o["box"][0]))  # reading order, so indices mean the same in any run
    words = _words(rng, world, objects, width, height)
    scene = {"width": width, "height": height, "background": rng.choice(names(world.backgrounds)),
             "texture": rng.randrange(2**31), "objects": objects, "words": words}
    return scene, lambda: render(scene)


def _words(rng, world, objects, width, height):
    taken = [o["box"] for o in objects]
    words = []
    for index, text, px, w, h in word_choices(rng, world, objects):
        left, top, right, bottom = objects[index]["box"]
        cx, cy = (left + right) / 2, (top + bottom) / 2
        if objects[index]["shape"] in ("square", "circle") and max(w, h) + 3 <= 0.7 * (right - left):
            box = [round(cx - w / 2), round(cy - h / 2), round(cx + w / 2), round(cy + h / 2)]
            words.append({"text": text, "object": index, "on": True, "box": box, "px": px})
            continue
        box = [round(cx - w / 2), top - 2 - h, round(cx + w / 2), top - 2]
        if inside(box, width, height) and not any(overlaps(box, other, 1) for other in taken):
            taken.append(box)
            words.append({"text": text, "object": index, "on": False, "box": box, "px": px})
    return words


def _background(scene: dict) -> Image.Image:
    rng = np.random.default_rng(scene["texture"])
    height, width = scene["height"], scene["width"]
    base = rng.integers(210, 256, size=3).astype(np.float32)
    if scene["background"] == "plain":
        pixels = np.broadcast_to(base, (height, width, 3)).copy()
    elif scene["background"] == "noise":  # speckles: a few darker dots, not grain over every pixel
        pixels = np.broadcast_to(base, (height, width, 3)).copy()
        dots = rng.random((height, width)) < 0.04
        pixels[dots] -= rng.uniform(30, 70)
    else:  # radial, lighter or darker at a random centre
        ys, xs = np.mgrid[0:height, 0:width]
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        distance = np.hypot(xs - cx, ys - cy) / math.hypot(width, height)
        pixels = base + distance[..., None] * rng.uniform(-60, -20, size=3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def render(scene: dict) -> Image.Image:
    s = SUPERSAMPLE
    large = _background(scene).resize((scene["width"] * s, scene["height"] * s), Image.NEAREST)
    draw = ImageDraw.Draw(large)
    for obj in scene["objects"]:
        fill = tuple(int(np.clip(c + obj["shade"], 0, 255)) for c in COLORS[obj["color"]])
        outline = tuple(c // 3 for c in fill)
        _shape(draw, obj, [v * s for v in obj["box"]], fill, outline, width=s)
    image = large.resize((scene["width"], scene["height"]), Image.LANCZOS)
    draw = ImageDraw.Draw(image)
    draw_words(draw, scene)
    return image


def _shape(draw, obj, box, fill, outline, width):
    left, top, right, bottom = box
    cx, cy, radius = (left + right) / 2, (top + bottom) / 2, (right - left) / 2
    if obj["shape"] == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif obj["shape"] == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif obj["shape"] == "triangle":
        up = obj["turn"] < 0.5
        apex, base = (top, bottom) if up else (bottom, top)
        draw.polygon([(left, base), (right, base), (cx, apex)], fill=fill, outline=outline, width=width)
    else:  # a five-pointed star, fatter than scatter's (inner radius 0.5), turned by up to a fifth of a turn
        turn = obj["turn"] * 2 * math.pi / 5
        points = [(cx + r * math.sin(turn + k * math.pi / 5), cy - r * math.cos(turn + k * math.pi / 5))
                  for k in range(10) for r in [radius if k % 2 == 0 else 0.5 * radius]]
        draw.polygon(points, fill=fill, outline=outline, width=width)
