"""Building examples record by record: a bad record is reported in one line and skipped, the rest goes on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from vlmlab.data.example import Example
from vlmlab.log import warn

MAX_REPORTED = 10  # bad records reported one by one; past this, one line counts the rest


class DatasetError(ValueError):
    """A dataset that cannot be read at all (missing file, nothing usable in it)."""


class MissingFiles(DatasetError):
    """A folder that lacks the files of a dataset's official layout."""


class Collector:
    """Gathers the examples of many records; `where` names the dataset in every message."""

    def __init__(self, where: str):
        self.where = where
        self.examples: list[Example] = []
        self.skipped = 0

    def add(self, label: str, build: Callable[[], list[Example]]) -> None:
        """Adds what `build` returns; a record it cannot build (ValueError and the like) is skipped."""
        try:
            self.examples.extend(build())
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            self.skip(label, f"missing field {err}" if isinstance(err, KeyError) else str(err))

    def skip(self, label: str, reason: str) -> None:
        self.skipped += 1
        if self.skipped <= MAX_REPORTED:
            warn(f"{self.where}: {label}: skipped, {reason}")

    def result(self) -> list[Example]:
        if self.skipped > MAX_REPORTED:
            warn(f"{self.where}: {self.skipped} records skipped in all")
        if not self.examples:
            raise DatasetError(f"{self.where}: no usable example ({self.skipped} records skipped)")
        return self.examples


def read_json(path: Path):
    if not path.is_file():
        raise MissingFiles(f"{path}: no such file")
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


def require_folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise MissingFiles(f"{path}: no such folder ({what})")
    return path
