"""Reading benchmark files in their public formats (JSONL, JSON or parquet) from a local path.

Nothing is downloaded. Every mistake is one :class:`R3Error` line naming the file and, where it
applies, the record (numbered from 1, in file order) and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r3.errors import R3Error


def read_records(path: str | Path) -> list[dict]:
    """The records of a ``.jsonl`` (one object per line), ``.json`` (a list of objects, or an
    object holding one such list) or ``.parquet`` file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise R3Error(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records = _read_parquet(path)
    elif suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8-sig", errors="strict") as f:  # (a byte-order mark is not data)
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise R3Error(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except UnicodeDecodeError:
                raise R3Error(f"{path}: not UTF-8 text") from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            raise R3Error(f"{path}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise R3Error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise R3Error(f"{path}: expected a list of records, or an object holding exactly one list")
            data = lists[0]
        if not isinstance(data, list):
            raise R3Error(f"{path}: expected a list of records")
        records = data
    else:
        raise R3Error(f"{path}: unknown format {suffix or '(no suffix)'!r}; expected .jsonl, .json or .parquet")
    for i, r in enumerate(records, 1):  # (numbered from 1, as every message about a record)
        if not isinstance(r, dict):
            raise R3Error(f"{path}: record {i} is not an object")
    if not records:
        raise R3Error(f"{path}: no records")
    return records


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise R3Error(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert the file to JSONL") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise R3Error(f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return table.to_pylist()


def field(record: dict, name: str, kind, path, index: int) -> Any:
    """``record[name]``, checked to be of ``kind`` (a type or tuple of types)."""
    if name not in record:
        raise R3Error(f"{path}: record {index} has no field {name!r}")
    value = record[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise R3Error(f"{path}: record {index}: field {name!r} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise R3Error(f"{path}: record {index}: field {name!r} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)
