"""A CSV table with a header row and a label column, read strictly.

Every non-label column is a feature in its raw units. A missing cell, or a cell that is not a
number in a numeric (continuous or integer) column, is refused with its row and column named:
imputing it silently would change the evidence. Categorical columns may hold text; their
values become integer codes in sorted order. Labels become 0..K-1 in sorted order of their
values, which are the class names.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.data.datasets import RawDataset
from pipeline.errors import UsageError

FEATURE_TYPES = ("continuous", "integer", "categorical")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            table = list(csv.reader(handle))
    except UnicodeDecodeError as error:
        raise UsageError(f"{path.name}: not valid UTF-8 text (byte {error.start})") from None
    except (OSError, csv.Error) as error:
        raise UsageError(f"{path.name}: cannot read as CSV ({error})") from None
    if len(table) < 2:
        raise UsageError(f"{path.name}: needs a header row and at least one data row")
    header = [name.strip() for name in table[0]]
    if len(set(header)) != len(header) or not all(header):
        raise UsageError(f"{path.name}: header row must name every column once (got {header})")
    return header, table[1:]


def _label_codes(values: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    numeric = [_number(v) for v in values]
    if all(n is not None and float(n).is_integer() for n in numeric):
        classes = sorted({int(n) for n in numeric})
        lookup = {c: i for i, c in enumerate(classes)}
        return np.array([lookup[int(n)] for n in numeric], np.int64), tuple(str(c) for c in classes)
    classes = sorted(set(values))
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[v] for v in values], np.int64), tuple(classes)


def load_csv(path: Path, settings) -> RawDataset:
    """`settings`: data.csv (label_column, feature_types). Row numbers are the file's lines."""
    header, rows = _rows(path)
    label = settings.label_column
    if label not in header:
        raise UsageError(f"{path.name}: data.csv.label_column = {label!r} is not a column (columns: {', '.join(header)})")
    types = dict(settings.feature_types)
    unknown = sorted(set(types) - set(header) - {label})
    if unknown:
        raise UsageError(f"data.csv.feature_types: {unknown[0]!r} is not a feature column of {path.name}")
    features = [name for name in header if name != label]
    if not features:
        raise UsageError(f"{path.name}: no feature column besides the label {label!r}")
    columns: dict[str, list[str]] = {name: [] for name in header}
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise UsageError(f"{path.name}: row {line} has {len(row)} cells, the header has {len(header)}")
        for name, cell in zip(header, row):
            cell = cell.strip()
            if cell == "" or cell.lower() in ("na", "nan", "null", "none", "?"):
                raise UsageError(f"{path.name}: row {line}, column {name!r}: missing value (refused, not imputed)")
            columns[name].append(cell)
    x = np.zeros((len(rows), len(features)), np.float32)
    for j, name in enumerate(features):
        kind = types.get(name, "continuous")
        cells = columns[name]
        if kind == "categorical" and any(_number(c) is None for c in cells):
            codes = {value: i for i, value in enumerate(sorted(set(cells)))}
            x[:, j] = [codes[c] for c in cells]
            continue
        for i, cell in enumerate(cells):
            value = _number(cell)
            if value is None:
                raise UsageError(f"{path.name}: row {i + 2}, column {name!r}: {cell!r} is not a number")
            if kind == "integer" and not value.is_integer():
                raise UsageError(f"{path.name}: row {i + 2}, column {name!r}: {cell!r} is not an integer "
                                 "(the column is declared integer)")
            x[i, j] = value
    y, class_names = _label_codes(columns[label])
    return RawDataset(x, y, True, class_names=class_names, feature_names=tuple(features),
                      feature_types=tuple(types.get(name, "continuous") for name in features))
