"""Checks on GLUE TSV files that name the file and line of the first bad row."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def check_tsv_layout(path: Path, required_columns: Sequence[str]) -> None:
    """Fail on a missing column or a row whose field count differs from the header's."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the file is empty (expected a header row)")
        missing = [column for column in required_columns if column not in header]
        if missing:
            raise ValueError(f"{path}:1: header {header!r} lacks column(s) {missing!r}")
        for line_number, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{line_number}: expected {len(header)} tab-separated columns "
                    f"({', '.join(header)}), found {len(row)}: {row!r}"
                )


def check_labels(values: Sequence[object], path: Path, num_labels: int, label_names: Sequence[str] | None) -> list[int]:
    """Map labels to class indices, failing on the first one outside the task's label set."""
    lookup = {str(index): index for index in range(num_labels)}
    if label_names:
        lookup.update({name: index for index, name in enumerate(label_names)})
    encoded = []
    for row, value in enumerate(values):
        index = lookup.get(str(value).strip())
        if index is None:
            raise ValueError(f"{path}:{row + 2}: label {value!r} is not in the task's label set {sorted(lookup)}")
        encoded.append(index)
    return encoded
