"""Prompt files (.txt one a line, .jsonl, .csv, .parquet), image folders with .txt caption
sidecars, and where a shard sample keeps its caption (``data.caption_key``)."""

from __future__ import annotations

import csv
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# MEMBER or MEMBER:FIELD; MEMBER is the member's extension after the sample key (webdataset
# keeps everything after the first dot of the file name: "000001.prompt.txt" -> "prompt.txt")
_CAPTION_KEY = re.compile(r"^([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)(?::([^:]+))?$")


@dataclass(frozen=True)
class CaptionKey:
    """Where a sample's caption is: a text member (``prompt.txt``, ``txt``) or a string field of
    a JSON member (``json:caption`` = field ``caption`` of ``KEY.json``)."""

    member: str
    field: str | None = None

    @classmethod
    def parse(cls, text: str, what: str = "data.caption_key") -> CaptionKey:
        """``what``: the config key or flag that gave ``text`` (named in the error)."""
        m = _CAPTION_KEY.match(text.strip())
        if not m or (m.group(2) is not None and not m.group(1).endswith("json")):
            raise ValueError(
                f"{what}: {text!r} is not MEMBER (txt, prompt.txt) or "
                "JSONMEMBER:FIELD (json:caption, meta.json:caption)"
            )
        return cls(m.group(1).lower(), m.group(2))

    def __str__(self) -> str:
        return self.member if self.field is None else f"{self.member}:{self.field}"

    def extract(self, raw: dict) -> str:
        """The caption of one raw sample (member name -> bytes); ``LookupError`` says what is
        missing and what the sample has instead."""
        if self.member not in raw:
            have = ", ".join(sorted(k for k in raw if not k.startswith("__"))) or "nothing"
            raise LookupError(f"no {self.member!r} member (it has: {have})")
        try:
            text = raw[self.member].decode("utf-8")
        except UnicodeDecodeError:
            raise LookupError(f"{self.member!r} is not UTF-8") from None
        if self.field is None:
            return text.strip()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LookupError(f"{self.member!r} is not JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get(self.field), str):
            fields = ", ".join(sorted(data)) if isinstance(data, dict) else type(data).__name__
            raise LookupError(f"{self.member!r} has no string field {self.field!r} ({fields})")
        return data[self.field].strip()


def read_prompts(path: str, column: str, what: str = "--prompts") -> list[str]:
    """Prompts from .txt (one a line), .jsonl / .csv / .parquet (field ``column``), or a folder
    of images with .txt captions beside them; errors name ``what`` (the flag or config key that
    gave the path)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} {path}: no such file")
    if p.is_dir():
        return read_image_folder(p, what)
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
        raise ValueError(f"{what} {path}: use .txt, .jsonl, .csv, .parquet or an image folder")
    prompts = [r.strip() for r in rows if r and r.strip()]
    if not prompts:
        raise ValueError(f"{what} {path}: no prompts in it")
    return prompts


def read_image_folder(folder: Path, what: str = "--prompts") -> list[str]:
    """Captions of the images under ``folder`` (recursive, sorted by path): ``img.png`` takes its
    caption from ``img.txt`` beside it. The images themselves are never opened: distillation
    trains on captions (the teacher makes the images). Images without a caption are skipped
    with a warning; a folder with no image, or no captioned one, is an error."""
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{what} {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    prompts, uncaptioned = [], []
    for img in images:
        side = img.with_suffix(".txt")
        text = side.read_text(encoding="utf-8").strip() if side.is_file() else ""
        if text:
            prompts.append(text)
        else:
            uncaptioned.append(img)
    if not prompts:
        raise ValueError(
            f"{what} {folder}: {len(images)} images but none has a caption (write img.txt "
            f"beside img.png; e.g. {images[0].with_suffix('.txt')})"
        )
    if uncaptioned:
        warnings.warn(
            f"{what} {folder}: {len(uncaptioned)} of {len(images)} images have no (or an empty) "
            f".txt caption and are skipped (first: {uncaptioned[0]})",
            stacklevel=2,
        )
    return prompts
