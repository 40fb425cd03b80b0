"""Rows of a dataset on the Hugging Face hub (or a local copy in the hub's layout), through `datasets`.

Only the text columns are read into memory; each image stays in the memory-mapped table until a batch needs it
(`HubImage`), so a subset of 50k VQAv2 questions costs no 50k decoded photos. The rows are turned into examples by
the same record builders as the official files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmlab.data.records import DatasetError


@dataclass(frozen=True, eq=False)
class HubImage:
    """One image of a hub table, decoded by `datasets` when `open()` is called."""

    table: Any  # datasets.Dataset holding only the image column
    column: str
    index: int
    name: str

    def open(self):
        return self.table[self.index][self.column]

    def __str__(self) -> str:
        return f"{self.name} row {self.index}"


def load_rows(name: str, split: str) -> tuple[list[dict], list[HubImage]]:
    """(text columns of each row, its image) for `split` of hub dataset `name` (an id or a local folder)."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{name}: reading hub datasets needs `datasets` (pip install 'vlmlab[hub]')") from None
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - network, missing dataset, unknown split, ...: one line whatever it is
        raise DatasetError(f"{name}: cannot load split {split!r} ({type(err).__name__}: {err})") from None
    columns = [column for column, kind in table.features.items() if isinstance(kind, datasets.Image)]
    if not columns:
        raise DatasetError(f"{name}: no image column (columns: {', '.join(table.column_names)})")
    images = table.select_columns(columns[:1])
    rows = table.remove_columns(columns).to_list()
    return rows, [HubImage(images, columns[0], index, f"{name}:{split}") for index in range(len(rows))]
