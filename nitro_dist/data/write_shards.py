"""Write prompts into WebDataset shards (local folder or any fsspec URL such as s3://bucket/x).

Examples:
  python -m nitro_dist.data.write_shards --prompts captions.txt --out s3://bucket/prompts
  python -m nitro_dist.data.write_shards --prompts coco.parquet --column caption --out data/coco
  python -m nitro_dist.data.write_shards --digits 2048 --out data/digits   # the digits task

Prompts come from .txt (one a line), .jsonl, .csv or .parquet (--column names the field).
Each sample gets a noise seed (meta.json) so the teacher's x_T is regenerated bit-exactly from
it. S3 endpoint and credentials come from the usual AWS_* environment variables. Writes
<out>/<prefix>-000000.tar ... and <out>/manifest.json (per-shard counts).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from nitro_dist.data.shards import (
    DataError,
    encode,
    join,
    shard_name,
    write_manifest,
    write_shard,
)

SEED_BASE = 1_000_000  # the training seed range (evaluation seeds start at 10,000,000)


def read_prompts(path: str, column: str) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--prompts {path}: no such file")
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
                raise ValueError(f"--prompts {path} line {i + 1}: no field {column!r} ({e})") from e
    elif suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise ValueError(f"--prompts {path}: no column {column!r} ({reader.fieldnames})")
            rows = [r[column] for r in reader]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        if column not in table.column_names:
            raise ValueError(f"--prompts {path}: no column {column!r} ({table.column_names})")
        rows = [str(x) for x in table.column(column).to_pylist()]
    else:
        raise ValueError(f"--prompts {path}: use .txt, .jsonl, .csv or .parquet")
    prompts = [r.strip() for r in rows if r and r.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in it")
    return prompts


def digits_prompts(n: int) -> list[str]:
    from nitro_dist.digits.data import PROMPTS

    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def write_prompt_shards(
    prompts: list[str],
    out: str,
    shard_size: int = 1000,
    prefix: str = "prompts",
    seed_base: int = SEED_BASE,
    progress: bool = True,
) -> dict:
    """Shards of ``shard_size`` prompts with seeds ``seed_base + index``; returns the manifest."""
    if shard_size < 1:
        raise ValueError("--shard-size must be >= 1")
    names, counts = [], []
    starts = range(0, len(prompts), shard_size)
    for k, start in enumerate(tqdm(starts, desc="shards", unit="shard", disable=not progress)):
        name = shard_name(prefix, k)

        def samples(start: int = start) -> Iterator[dict]:
            for i in range(start, min(start + shard_size, len(prompts))):
                yield encode(f"{i:09d}", prompts[i], seed_base + i)

        counts.append(write_shard(join(out, name), samples()))
        names.append(name)
    return write_manifest(out, names, counts, {"kind": "prompts", "seed_base": seed_base})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m nitro_dist.data.write_shards",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="a .txt, .jsonl, .csv or .parquet file")
    src.add_argument("--digits", type=int, metavar="N", help="N prompts of the digits task")
    ap.add_argument("--out", required=True, help="output folder or URL (s3://bucket/prefix)")
    ap.add_argument("--column", default="prompt", help="prompt field (.jsonl/.csv/.parquet)")
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    ap.add_argument("--prefix", default="prompts", help="shard file prefix")
    ap.add_argument("--seed-base", type=int, default=SEED_BASE, help="noise seed of sample 0")
    args = ap.parse_args(argv)
    try:
        prompts = read_prompts(args.prompts, args.column) if args.prompts else None
        if prompts is None:
            if args.digits < 1:
                raise ValueError("--digits must be >= 1")
            prompts = digits_prompts(args.digits)
        manifest = write_prompt_shards(
            prompts, args.out, args.shard_size, args.prefix, args.seed_base
        )
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {manifest['total']} samples in {len(manifest['shards'])} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
