"""Data readers: TSV, CSV and JSONL with `sentence` (single) or `sentence1`+`sentence2` (pairs) and `label`.

Multi-label data (`multi_label=True`): the label column holds each text's set of labels, comma-separated names
or ids (empty: none on), or a JSON list in JSONL."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SINGLE_COLUMNS: tuple[tuple[str, ...], ...] = (("sentence",), ("text",))
PAIR_COLUMNS: tuple[tuple[str, ...], ...] = (
    ("sentence1", "sentence2"),
    ("text", "text_pair"),
    ("question", "sentence"),
)
FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


class DataError(ValueError):
    """A data file cannot be read or does not have the expected columns and labels."""


@dataclass
class Dataset:
    """Texts (and optional second texts of a pair), label ids, and the label names they index."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int] | None
    label_names: list[str]
    text_columns: list[str]
    source: str
    label_sets: list[list[int]] | None = None  # multi-label data: each text's labels on (ids), instead of `labels`

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None or self.label_sets is not None

    def targets(self) -> list[int] | list[list[float]]:
        """What training and scoring compare with: label ids, or for multi-label data one 0/1 per label."""
        if self.label_sets is not None:
            width = len(self.label_names)
            return [[1.0 if i in on else 0.0 for i in range(width)] for on in map(set, self.label_sets)]
        if self.labels is None:
            raise DataError(f"{self.source} has no labels")
        return self.labels

    def subset(self, indices: Sequence[int]) -> Dataset:
        return Dataset(
            texts=[self.texts[i] for i in indices],
            text_pairs=[self.text_pairs[i] for i in indices] if self.text_pairs is not None else None,
            labels=[self.labels[i] for i in indices] if self.labels is not None else None,
            label_names=self.label_names,
            text_columns=self.text_columns,
            source=self.source,
            label_sets=[self.label_sets[i] for i in indices] if self.label_sets is not None else None,
        )


def _read_rows(path: Path) -> list[dict[str, Any]]:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(FORMATS)}")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            if kind == "jsonl":
                rows = []
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{number}: not valid JSON: {err}") from err
                    if not isinstance(row, dict):
                        raise DataError(f"{path}:{number}: each line must be a JSON object")
                    rows.append(row)
                return rows
            # GLUE's TSV files contain bare quote characters: read them literally.
            reader = (
                csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
                if kind == "tsv"
                else csv.DictReader(handle)
            )
            rows = []
            for number, row in enumerate(reader, start=2):
                if None in row or any(value is None for value in row.values()):
                    raise DataError(f"{path}:{number}: expected {len(reader.fieldnames or [])} columns")
                rows.append(row)
            return rows
    except FileNotFoundError as err:
        raise DataError(f"data file {path} does not exist") from err
    except IsADirectoryError as err:
        raise DataError(f"data file {path} is a directory") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}") from err


def _text_columns(columns: set[str], requested: Sequence[str] | None, path: Path) -> list[str]:
    if requested:
        missing = [c for c in requested if c not in columns]
        if missing:
            raise DataError(f"{path}: unknown column(s) {missing}; columns are {sorted(columns)}")
        return list(requested)
    for candidate in PAIR_COLUMNS + SINGLE_COLUMNS:
        if all(c in columns for c in candidate):
            return list(candidate)
    raise DataError(f"{path}: no text column; expected 'sentence' or 'sentence1'+'sentence2', found {sorted(columns)}")


def map_labels(raw: Sequence[str], label_names: Sequence[str] | None, source: str) -> tuple[list[int], list[str]]:
    """Label ids and names: names are kept for string labels; integer labels index the names."""
    if label_names is not None:
        names = list(label_names)
        index = {name: i for i, name in enumerate(names)}
        if all(value in index for value in raw):
            return [index[value] for value in raw], names
        if all(_is_int(value) and 0 <= int(value) < len(names) for value in raw):
            return [int(value) for value in raw], names
        unknown = sorted({value for value in raw if value not in index})[:5]
        raise DataError(f"{source}: labels {unknown} are not among the model's labels {names}")
    if all(_is_int(value) for value in raw):
        ids = [int(value) for value in raw]
        if min(ids, default=0) < 0:
            raise DataError(f"{source}: integer labels must be >= 0")
        return ids, [str(i) for i in range(max(ids, default=1) + 1)]
    names = sorted(set(raw))
    index = {name: i for i, name in enumerate(names)}
    return [index[value] for value in raw], names


def map_label_sets(
    raw: Sequence[Any], label_names: Sequence[str] | None, source: str
) -> tuple[list[list[int]], list[str]]:
    """Multi-label: each row's labels (a list, or comma-separated text; empty for none) → ids, and the names."""
    rows = [
        [str(v).strip() for v in value] if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
        for value in raw
    ]
    rows = [[v for v in row if v] for row in rows]
    flat = [v for row in rows for v in row]
    if label_names is None:
        if flat and all(_is_int(v) for v in flat):
            names = [str(i) for i in range(max(int(v) for v in flat) + 1)]
        else:
            names = sorted(set(flat))
    else:
        names = list(label_names)
    if len(names) < 2:
        raise DataError(f"{source}: multi-label data needs at least two labels, found {names}")
    index = {name: i for i, name in enumerate(names)}

    def label_id(value: str) -> int:
        if value in index:
            return index[value]
        if _is_int(value) and 0 <= int(value) < len(names):
            return int(value)
        raise DataError(f"{source}: label {value!r} is not among the labels {names[:20]}")

    return [sorted({label_id(v) for v in row}) for row in rows], names


def _is_int(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def read_dataset(
    path: str | Path,
    label_names: Sequence[str] | None = None,
    text_columns: Sequence[str] | None = None,
    label_column: str = "label",
    require_labels: bool = True,
    multi_label: bool = False,
) -> Dataset:
    """Read a TSV/CSV/JSONL file into a Dataset (`multi_label`: a set of labels per text); clear DataError on any
    problem."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path} has no rows")
    columns = set(rows[0])
    chosen = _text_columns(columns, text_columns, path)
    if len(chosen) not in (1, 2):
        raise DataError(f"{path}: need one text column or two (a pair), got {chosen}")
    for number, row in enumerate(rows, start=1):
        for column in chosen:
            if not isinstance(row.get(column), str):
                raise DataError(f"{path}: row {number} has no text in column {column!r}")
    labels: list[int] | None = None
    label_sets: list[list[int]] | None = None
    names = list(label_names) if label_names is not None else []
    if label_column in columns and multi_label:
        label_sets, names = map_label_sets([row.get(label_column, "") for row in rows], label_names, str(path))
    elif label_column in columns:
        raw = [str(row.get(label_column, "")).strip() for row in rows]
        labels, names = map_labels(raw, label_names, str(path))
    elif require_labels:
        raise DataError(f"{path}: no {label_column!r} column; columns are {sorted(columns)}")
    return Dataset(
        texts=[row[chosen[0]] for row in rows],
        text_pairs=[row[chosen[1]] for row in rows] if len(chosen) == 2 else None,
        labels=labels,
        label_names=names,
        text_columns=chosen,
        source=str(path),
        label_sets=label_sets,
    )
