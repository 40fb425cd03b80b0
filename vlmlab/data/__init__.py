"""Datasets by name or path: every loader returns a list of `Example`.

A dataset spec (`data.train`, `data.eval`, `vlmlab eval --data`) is one part or several joined by commas:

    synthetic                      the built-in synthetic world
    train.jsonl                    a JSONL file of image, question | caption, answers (also `jsonl:PATH`)
    vqav2                          a named dataset from its default hub copy
    vqav2:/data/vqa                ... from a folder in its official layout (a folder in the hub's layout works too)
    vqav2:someone/VQAv2            ... from another hub copy
    vqav2:/data/vqa@3,coco-captions:/data/coco@1      a mixture: 3 parts VQA to 1 part captions

`data.train_size` / `data.eval_size` draw that many examples (stratified by answer type, fixed by `data.seed`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlmlab.config import ConfigError, DataConfig
from vlmlab.data import synthetic, world
from vlmlab.data.captions import caption_rows, read_flickr8k, read_karpathy
from vlmlab.data.example import Example
from vlmlab.data.hub import load_rows
from vlmlab.data.jsonl import read_jsonl
from vlmlab.data.mixture import mix
from vlmlab.data.records import DatasetError, MissingFiles
from vlmlab.data.vqa import read_okvqa, read_textvqa, read_vqav2, vqa_rows

SPLITS = ("train", "val", "test")
HUB_SPLITS = {"train": "train", "val": "validation", "test": "validation"}  # hub test splits carry no answers


def _synthetic(source: str, split: str, data: DataConfig) -> list[Example]:
    """The built-in world: the first one (synthetic.py) with data.world.generator=v1, the default; world v2
    (world.py) drawn by the generator named otherwise."""
    images = data.train_images if split == "train" else data.eval_images
    if data.world.generator == "v1":
        return synthetic.make_split(
            split, images, seed=data.seed, questions_per_image=data.questions_per_image, captions=data.captions
        )
    return world.make_split(split, images, data.world, seed=data.seed, questions_per_image=data.questions_per_image,
                            captions=data.captions)


def _jsonl(source: str, split: str, data: DataConfig) -> list[Example]:
    return read_jsonl(source)


@dataclass(frozen=True)
class Official:
    """A named dataset: its official files on disk, or its rows on the hub, built into the same examples."""

    name: str
    read_files: Callable[[Path, str], list[Example]]  # (folder or file, split) -> examples
    from_rows: Callable  # (rows, images, split, name) -> examples
    hub_id: str  # the default hub copy ("" when none is known to carry images)
    hub_splits: dict
    family: str  # the evaluation family its questions belong to (Example.family)

    def __call__(self, source: str, split: str, data: DataConfig) -> list[Example]:
        examples = self._read(source, split)
        for example in examples:
            example.family = example.family or self.family
        return examples

    def _read(self, source: str, split: str) -> list[Example]:
        source = source or self.hub_id
        if not source:
            raise ConfigError(f"{self.name} needs a source: {self.name}:FOLDER (official layout) or {self.name}:HUB_ID")
        path = Path(source).expanduser()
        if path.exists():
            try:
                return self.read_files(path, split)
            except MissingFiles:
                if not _looks_like_hub_copy(path):
                    raise
            source = str(path)
        rows, images = load_rows(source, self.hub_splits.get(split, split))
        return self.from_rows(rows, images, split, self.name)


def _looks_like_hub_copy(path: Path) -> bool:
    return path.is_dir() and any(next(path.glob(pattern), None) for pattern in ("*.parquet", "*/*.parquet"))


DATASETS = {
    "synthetic": _synthetic,
    "jsonl": _jsonl,
    "vqav2": Official("vqav2", read_vqav2, vqa_rows, "Phando/vqa_v2", HUB_SPLITS, "general"),
    "okvqa": Official("okvqa", read_okvqa, vqa_rows, "lmms-lab/OK-VQA",
                      {"train": "train", "val": "val2014", "test": "val2014"}, "knowledge"),
    "textvqa": Official("textvqa", read_textvqa, vqa_rows, "lmms-lab/textvqa", HUB_SPLITS, "text"),
    "coco-captions": Official("coco-captions", read_karpathy, caption_rows, "", HUB_SPLITS, "captions"),
    "flickr8k": Official("flickr8k", read_flickr8k, caption_rows, "jxie/flickr8k",
                         {"train": "train", "val": "validation", "test": "test"}, "captions"),
}


@dataclass(frozen=True)
class Part:
    name: str
    source: str
    weight: float


def parse_spec(spec: str) -> list[Part]:
    """`NAME[:SOURCE][@WEIGHT],...`; a part that names no dataset is a path to a JSONL file."""
    parts = []
    for text in spec.split(","):
        text, weight = text.strip(), 1.0
        body, at, tail = text.rpartition("@")
        if at:
            try:
                text, weight = body, float(tail)
            except ValueError:
                pass  # an "@" inside a path or a hub id
        if not weight > 0:
            raise ConfigError(f"dataset weight in {spec!r} must be positive")
        name, colon, source = text.partition(":")
        if colon and name in DATASETS:
            parts.append(Part(name, source, weight))
        elif text in DATASETS:
            parts.append(Part(text, "", weight))
        elif text.endswith(".jsonl") or Path(text).expanduser().exists():
            parts.append(Part("jsonl", text, weight))
        else:
            raise ConfigError(f"unknown dataset {text!r}; valid: {', '.join(DATASETS)} (NAME or NAME:SOURCE), "
                              "or a path to a .jsonl file")
    return parts


def load_examples(spec: str, split: str, data: DataConfig) -> list[Example]:
    """The examples of `split` (train | val | test) of a dataset spec, sized by data.train_size / eval_size."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    loaded = [(DATASETS[part.name](part.source, split, data), part.weight) for part in parse_spec(spec)]
    size = data.train_size if split == "train" else data.eval_size
    if len(loaded) == 1 and not size:
        return loaded[0][0]
    return mix(loaded, size, data.seed, repeat=split == "train")


__all__ = ["DATASETS", "SPLITS", "DatasetError", "Example", "load_examples", "parse_spec"]
