"""Read training records from a file or a saved dataset folder into `Row`s that remember where they came from.

Accepted inputs, chosen by suffix:
  .jsonl     one JSON object per line (blank lines skipped)          source "train.jsonl:12" (line, 1-based)
  .json      a top-level list of JSON objects                        source "train.json:row 3"
  .csv       a header row, then one record per row (csv module)      source "train.csv:line 5"
  .parquet   a table (pyarrow)                                       source "train.parquet:row 7"
  a folder   written by `datasets`' save_to_disk (a DatasetDict's "train" split)  source "folder:row 7"

Every problem with the input raises `DataError` naming the file and line or row and saying what to do.
pyarrow and datasets are imported only when a parquet file or a folder is read.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import DataError

ACCEPTED = ".jsonl, .json, .csv, .parquet, or a folder saved with datasets' save_to_disk"


@dataclass(frozen=True)
class Row:
    """One record and where it came from (for messages), e.g. source="data/train.jsonl:12"."""
    data: dict
    source: str


def read_rows(path, columns: dict[str, str] | None = None) -> list[Row]:
    """All records of `path` as Rows, in file order. Raises DataError for a missing, unreadable or empty input.

    columns: lorakit's field name -> the file's column name ({"prompt": "question", "completion": "answer"}),
    for data whose columns are named otherwise; each row's named columns are read under lorakit's names.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}. Check the path (--data).")
    if path.is_dir():
        rows = _read_saved_dataset(path)
    else:
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{path}: unknown data format '{path.suffix}'. Use {ACCEPTED}.")
        rows = reader(path)
    if not rows:
        raise DataError(f"{path} holds no rows. Add at least one record.")
    return rename_columns(rows, columns) if columns else rows


def rename_columns(rows: list[Row], columns: dict[str, str]) -> list[Row]:
    """Rows with column `columns[field]` read as `field`; a row lacking a named column is a DataError."""
    renamed = []
    for row in rows:
        missing = [column for column in columns.values() if column not in row.data]
        if missing:
            flags = ", ".join(f"--{field}-column {column}" for field, column in columns.items() if column in missing)
            raise DataError(f"{row.source}: no column {missing[0]!r} (asked for by {flags}); the row's columns are "
                            f"{', '.join(map(str, row.data)) or 'none'}")
        data = {key: value for key, value in row.data.items() if key not in columns and key not in columns.values()}
        data.update({field: row.data[column] for field, column in columns.items()})
        renamed.append(Row(data, row.source))
    return renamed


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}). Save the file as UTF-8.") from None


def _kind(value) -> str:
    """How a JSON value reads in a message: 'a list', 'a string', ..."""
    names = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: not valid JSON ({e.msg}, column {e.colno}). "
                            "Each line must be one JSON object.") from None
        if not isinstance(record, dict):
            raise DataError(f"{source}: the line holds {_kind(record)}, not a JSON object. "
                            'Write one object per line, e.g. {"prompt": "...", "completion": "..."}.')
        rows.append(Row(record, source))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}). Fix the file.") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: the file holds {_kind(records)}; a .json data file must hold a list of "
                        "objects, [{...}, {...}]. (For one object per line, name it .jsonl.)")
    rows = []
    for number, record in enumerate(records, start=1):
        source = f"{path}:row {number}"
        if not isinstance(record, dict):
            raise DataError(f"{source}: the row is {_kind(record)}, not a JSON object. Make every row an object.")
        rows.append(Row(record, source))
    return rows


def _read_csv(path: Path) -> list[Row]:
    rows = []
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        try:
            for record in reader:
                source = f"{path}:line {reader.line_num}"
                if None in record or None in record.values():
                    raise DataError(f"{source}: the row has a different number of fields from the header "
                                    f"({len(reader.fieldnames)}: {', '.join(reader.fieldnames)}). "
                                    "Quote fields that contain commas.")
                rows.append(Row(record, source))
        except csv.Error as e:
            raise DataError(f"{path}:line {reader.line_num}: not valid CSV ({e}). Fix the row.") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason}). Save the file as UTF-8.") from None
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow
    import pyarrow.parquet

    try:
        records = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e}).") from None
    return [Row(record, f"{path}:row {number}") for number, record in enumerate(records, start=1)]


def _read_saved_dataset(path: Path) -> list[Row]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} is a folder but not a dataset saved with datasets' save_to_disk. "
                        f"Point --data at a data file ({ACCEPTED}).") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: the saved DatasetDict has no 'train' split (it has: "
                            f"{', '.join(sorted(dataset))}). Save the split to train on as 'train'.")
        dataset = dataset["train"]
    return [Row(record, f"{path}:row {number}") for number, record in enumerate(dataset, start=1)]
