"""Deterministic subsets stratified by answer type, and weighted mixtures of datasets."""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict

from vlmlab.data.example import Example


def stratum(example: Example) -> str:
    """What a subset keeps in proportion: VQAv2's answer type (yes/no, number, other), else the question type."""
    return example.answer_type or example.question_type


def apportion(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights` in whole numbers that sum to `total` (largest remainders)."""
    scale = sum(weights)
    exact = [total * weight / scale for weight in weights]
    counts = [int(value) for value in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def subset(examples: list[Example], count: int, seed: int) -> list[Example]:
    """`count` examples without repeats, each stratum keeping its share; fixed by `seed`, in the original order."""
    if count >= len(examples):
        return list(examples)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        groups[stratum(example)].append(index)
    keys = sorted(groups)
    quotas = apportion(count, [len(groups[key]) for key in keys])
    rng = random.Random(seed)
    chosen = sorted(index for key, quota in zip(keys, quotas) for index in rng.sample(groups[key], quota))
    return [examples[index] for index in chosen]


def resize(examples: list[Example], count: int, seed: int, repeat: bool) -> list[Example]:
    """`count` examples: whole copies of the set then a stratified subset (copies only when `repeat`)."""
    if not repeat or count <= len(examples):
        return subset(examples, count, seed)
    copies, rest = divmod(count, len(examples))
    return examples * copies + subset(examples, rest, seed)


def mix(parts: list[tuple[list[Example], float]], total: int, seed: int, repeat: bool) -> list[Example]:
    """Datasets mixed by weight: part i gets its weight's share of `total` examples (0: of all their examples).

    A part smaller than its share is repeated when `repeat` (training), else used once. With several parts, image
    and example ids are prefixed with the part's position, so two datasets' "images/0001.jpg" stay two images.
    """
    total = total or sum(len(examples) for examples, _ in parts)
    shares = apportion(total, [weight for _, weight in parts])
    if len(parts) == 1:
        return resize(parts[0][0], shares[0], seed, repeat)
    mixed = []
    for position, ((examples, _), share) in enumerate(zip(parts, shares)):
        for example in resize(examples, share, seed + position, repeat):
            mixed.append(dataclasses.replace(
                example, image_id=f"{position}:{example.image_id}", example_id=f"{position}:{example.example_id}"))
    return mixed
