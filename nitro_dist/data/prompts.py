"""Prompt files: .txt (one a line), .jsonl, .csv or .parquet (one named field)."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def read_prompts(path: str, column: str, what: str = "--prompts") -> list[str]:
    """Prompts from .txt (one a line), .jsonl / .csv / .parquet (field ``column``); errors name
    ``what`` (the flag or config key that gave the path)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} {path}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        rows = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    elif suffix == ".jsonl":
        rows = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(str(json.loads(line)[column]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{what} {path} line {i + 1}: no field {column!r} ({e})") from e
    elif suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{what} {path}: no column {column!r} ({reader.fieldnames})")
            rows = [r[column] for r in reader]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        if column not in table.column_names:
            raise ValueError(f"{what} {path}: no column {column!r} ({table.column_names})")
        rows = [str(x) for x in table.column(column).to_pylist()]
    else:
        raise ValueError(f"{what} {path}: use .txt, .jsonl, .csv or .parquet")
    prompts = [r.strip() for r in rows if r and r.strip()]
    if not prompts:
        raise ValueError(f"{what} {path}: no prompts in it")
    return prompts
