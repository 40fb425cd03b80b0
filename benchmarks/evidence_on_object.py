"""Does the `--explain` heatmap lie on the object the question names?

Over world v1 test questions that name one object ("what color is the circle?", "what shape is the red
object?"), for each heatmap method of `vlmlab.evidence.METHODS`: the share of questions whose heatmap peaks on a
cell that overlaps the named object's box, and the mean share of the heatmap's mass on that box, each beside its
chance level (the share of cells that overlap the box; the share of the image the box covers, which is what a
flat map puts there); the share whose peak lies on another object of the scene instead; the same for the
questions answered right alone, and wrong alone (with how many wrong answers are the colour or shape of the
other object the peak lies on); and the seconds per explained answer. `--fill mean` blanks occluded cells to the
tower's mean (grey) instead of the image's background, to compare. Prints one JSON object.

    python benchmarks/evidence_on_object.py --model RUN [--questions 200] [--methods occlusion,attention]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from vlmlab import evidence
from vlmlab.data.synthetic import _SIDE, make_split
from vlmlab.evidence import METHODS, cell_box, explain
from vlmlab.model import VLM


def named_object(example) -> dict:
    """The object a colour question ("the circle") or a shape question ("the red object") names."""
    objects = example.extra["objects"]
    if example.question_type == "color":
        shape = example.question.removeprefix("what color is the ").removesuffix("?")
        return next(o for o in objects if o["shape"] == shape)
    color = example.question.removeprefix("what shape is the ").removesuffix(" object?")
    return next(o for o in objects if o["color"] == color)


def box_mask(obj: dict, image_side: int, view_side: int) -> np.ndarray:
    """[S, S] bool over the view the tower sees: the object's box (the square it is drawn in), squashed."""
    side = round(image_side * _SIDE[obj["size"]])
    left, top = obj["x"] - side // 2, obj["y"] - side // 2
    scale = view_side / image_side
    mask = np.zeros((view_side, view_side), dtype=bool)
    mask[round(top * scale):round((top + side) * scale), round(left * scale):round((left + side) * scale)] = True
    return mask


def cell_cover(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[H, W]: the share of each cell's pixels inside the box."""
    cover = np.zeros(grid)
    for row in range(grid[0]):
        for column in range(grid[1]):
            top, bottom, left, right = cell_box((row, column), grid, mask.shape[0])
            cover[row, column] = mask[top:bottom, left:right].mean()
    return cover


def summary(rows: list[dict]) -> dict:
    if not rows:
        return {"questions": 0}
    mean = lambda key: round(float(np.mean([r[key] for r in rows])), 3)  # noqa: E731
    return {"questions": len(rows), "peak_on_object": mean("peak"), "peak_chance": mean("peak_chance"),
            "peak_on_another_object": mean("peak_other"), "mass_on_object": mean("mass"),
            "mass_chance": mean("mass_chance")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained run or model folder (world v1)")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names in evidence.METHODS")
    parser.add_argument("--seed", type=int, default=0, help="the test split's seed (a run's data.seed)")
    parser.add_argument("--fill", choices=("background", "mean"), default="background",
                        help="what an occluded cell is blanked to: the image's median colour (what explain does) "
                             "or the tower's mean")
    args = parser.parse_args()
    model = VLM.load(args.model)
    if args.fill == "mean":
        grey = torch.round(model.vision.mean.flatten().cpu() * 255).to(torch.uint8)
        evidence._background = lambda view: grey
    examples = [e for e in make_split("test", args.questions, seed=args.seed) if e.question_type in ("color", "shape")]
    examples = examples[:args.questions]
    view_side = model.vision.image_size
    results, correct = {}, []
    for method in args.methods.split(","):
        rows, started = [], time.perf_counter()
        for example in examples:
            found = explain(model, example.image, example.question, method=method)
            named = named_object(example)
            cover = cell_cover(box_mask(named, example.image.width, view_side), found.grid)
            heat = found.heatmap.astype(np.float64)
            peak = np.unravel_index(heat.argmax(), heat.shape)
            others = [(o, cell_cover(box_mask(o, example.image.width, view_side), found.grid))
                      for o in example.extra["objects"] if o is not named]
            under = [o for o, c in others if c[peak] > 0] if cover[peak] == 0 else []
            key = "color" if example.question_type == "color" else "shape"
            rows.append({"peak": float(cover[peak] > 0), "peak_chance": float((cover > 0).mean()),
                         "peak_other": float(bool(under)),
                         "answer_of_peak_object": float(any(o[key] == found.answer for o in under)),
                         "mass": float((heat * cover).sum() / heat.sum()), "mass_chance": float(cover.mean()),
                         "right": found.answer == example.answers[0]})
        seconds = (time.perf_counter() - started) / len(examples)
        correct = [r["right"] for r in rows]
        wrong = [r for r in rows if not r["right"]]
        results[method] = {**summary(rows), "answered_right": summary([r for r in rows if r["right"]]),
                           "answered_wrong": {**summary(wrong), "answer_is_the_peak_objects": int(sum(
                               r["answer_of_peak_object"] for r in wrong))},
                           "seconds_per_answer": round(seconds, 3)}
    print(json.dumps({"model": args.model, "fill": args.fill, "grid": list(found.grid), "questions": len(examples),
                      "vqa_accuracy": round(float(np.mean(correct)), 3), "methods": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
