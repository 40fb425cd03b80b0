"""Datasets by name or path: every loader returns a list of `Example`."""

from __future__ import annotations

from pathlib import Path

from vlmlab.config import ConfigError, DataConfig
from vlmlab.data import synthetic
from vlmlab.data.example import Example
from vlmlab.data.jsonl import DatasetError, read_jsonl

SPLITS = ("train", "val", "test")


def _synthetic(data: DataConfig, split: str) -> list[Example]:
    images = data.train_images if split == "train" else data.eval_images
    return synthetic.make_split(
        split, images, seed=data.seed, questions_per_image=data.questions_per_image, captions=data.captions
    )


DATASETS = {"synthetic": _synthetic}


def load_examples(spec: str, split: str, data: DataConfig) -> list[Example]:
    """`spec` is a dataset name (its `split` is taken) or a path to a JSONL file (the file is the split)."""
    if spec in DATASETS:
        return DATASETS[spec](data, split)
    if spec.endswith(".jsonl") or Path(spec).exists():
        return read_jsonl(spec)
    raise ConfigError(f"unknown dataset {spec!r}; valid: {', '.join(DATASETS)}, or a path to a .jsonl file")


__all__ = ["DATASETS", "SPLITS", "DatasetError", "Example", "load_examples"]
