"""From examples to batches: pixels cached per image, prompts and targets as text, a resumable sampler."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import Dataset

from vlmlab.config import ConfigError, DataConfig
from vlmlab.data.example import Example
from vlmlab.images import ImageError, ImagePrep, load_image, random_resize
from vlmlab.log import warn
from vlmlab.prompts import format_prompt


class ExampleDataset(Dataset):
    """Items are (pixels uint8 `[3, S, S]` or `[5, 3, S, S]`, prompt, target, example); an unusable image gives None.

    Pixels are cached per image id: each image of the synthetic world carries ~3 questions and a caption, and
    decoding + resizing it once instead of every epoch is most of the data loading time on a CPU. A broken image
    is reported once, counted in `failed`, and its examples are left out of their batches. With `augment`
    (training), `data.random_resize` is applied to the cached pixels on every visit.
    """

    def __init__(self, examples: list[Example], data: DataConfig, image_size: int, augment: bool = False):
        if not 0 < data.random_resize <= 1:
            raise ConfigError(f"data.random_resize must be in (0, 1] (1: off), got {data.random_resize}")
        self.examples = examples
        self.data = data
        self.prep = ImagePrep.from_config(data, image_size)
        self.min_scale = data.random_resize if augment else 1.0
        self._pixels: dict[str, torch.Tensor] = {}
        self.failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.examples)

    def pixels(self, example: Example) -> torch.Tensor | None:
        key = example.image_id or str(id(example.image))
        if key not in self._pixels and key not in self.failed:
            try:
                self._pixels[key] = self.prep(load_image(example.image))
            except ImageError as err:
                self.failed.add(key)
                warn(f"image skipped: {err}")
        return self._pixels.get(key)

    def __getitem__(self, index: int | tuple[int, int]):
        """Example `index`; for `(index, seed)` (training: `with_draw_seeds`), its augmentation drawn from `seed`."""
        index, seed = index if isinstance(index, tuple) else (index, None)
        example = self.examples[index]
        pixels = self.pixels(example)
        if pixels is None:
            return None
        prompt = format_prompt(self.data, example.question)
        generator = torch.Generator().manual_seed(seed) if seed is not None and self.min_scale < 1.0 else None
        return random_resize(pixels, self.min_scale, generator), prompt, example.target, example


def collate(items: list) -> dict | None:
    """Stacks the usable items of a batch; None when none is usable (the caller skips the batch).

    Each distinct image is stacked once: `pixels` is `[U, 3, S, S]` and `image_index` `[B]` says which of them
    each example shows, so the vision tower and connector run once per image, not once per question;
    `image_keys` names the U images (what `images.views_read` draws from).
    """
    items = [item for item in items if item is not None]
    if not items:
        return None
    slots: dict[str, int] = {}
    pixels, image_index = [], []
    for item_pixels, _, _, example in items:
        key = example.image_id or str(id(example.image))
        if key not in slots:
            slots[key] = len(pixels)
            pixels.append(item_pixels)
        image_index.append(slots[key])
    return {
        "pixels": torch.stack(pixels),
        "image_index": torch.tensor(image_index),
        "image_keys": list(slots),
        "prompts": [item[1] for item in items],
        "targets": [item[2] for item in items],
        "examples": [item[3] for item in items],
    }


def with_draw_seeds(batches: Iterable[list[int]], seed: int, first: int) -> Iterator[list[tuple[int, int]]]:
    """Each index of each batch paired with the seed of its augmentation draws, a function of the run's seed, the
    batch's number (`first` for the first batch given: micro-batches already trained) and the index alone. So the
    draws do not depend on which process or DataLoader worker makes the item, or on what it made before: a run
    resumed with `train.num_workers > 0` draws exactly what the uninterrupted run drew."""
    for number, batch in enumerate(batches, start=first):
        yield [(index, ((seed * 1_000_003 + number) * 1_000_003 + index) % 2**63) for index in batch]


def image_groups(examples: list[Example]) -> list[list[int]]:
    """Indices of the examples of each image, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(example.image_id or str(id(example.image)), []).append(index)
    return list(groups.values())


class StepBatches:
    """Endless batches of example indices that keep each image's examples together.

    Each epoch visits the images in a fresh order fixed by (seed, epoch) and fills a batch with whole images
    until it holds `batch_size` examples. Starting at `start_step` yields exactly the batches an uninterrupted
    run would have seen from there on, which is what makes `--resume` continue the same data order.
    """

    def __init__(self, groups: list[list[int]], batch_size: int, seed: int, start_step: int = 0):
        if not groups:
            raise ValueError("no training examples")
        self.groups = groups
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step

    def _epoch(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(len(self.groups), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        batches, batch = [], []
        for group in order.tolist():
            batch.extend(self.groups[group])
            if len(batch) >= self.batch_size:
                batches.append(batch)
                batch = []
        return batches or [batch]  # the ragged tail is dropped unless it is all there is

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = 0, self.start_step
        while True:
            batches = self._epoch(epoch)
            if skip >= len(batches):
                skip -= len(batches)
            else:
                yield from batches[skip:]
                skip = 0
            epoch += 1
