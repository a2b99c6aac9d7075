"""Write prompts into WebDataset shards (local folder or any fsspec URL such as s3://bucket/x).

Examples:
  python -m nitro_dist.data.write_shards --prompts captions.txt --out s3://bucket/prompts
  python -m nitro_dist.data.write_shards --prompts coco.parquet --column caption --out data/coco
  python -m nitro_dist.data.write_shards --prompts my_images/ --out data/mine   # img.png + img.txt
  python -m nitro_dist.data.write_shards --digits 2048 --out data/digits   # the digits task

Prompts come from .txt (one a line), .jsonl, .csv or .parquet (--column names the field), or a
folder of images with a .txt caption beside each (img.png + img.txt, searched recursively; only
the captions are written: distillation never reads the images, the teacher makes its own).
Shards that other tools wrote (img2dataset: KEY.jpg + KEY.txt + KEY.json) need no rewriting:
train on them directly with a brace pattern and data.caption_key (txt or json:caption).
Each sample gets a noise seed (meta.json) so the teacher's x_T is regenerated bit-exactly from
it. S3 endpoint and credentials come from the usual AWS_* environment variables. Writes
<out>/<prefix>-000000.tar ... and <out>/manifest.json (per-shard counts).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from tqdm import tqdm

from nitro_dist.data.prompts import read_prompts
from nitro_dist.data.shards import (
    DataError,
    encode,
    join,
    shard_name,
    write_manifest,
    write_shard,
)

SEED_BASE = 1_000_000  # the training seed range (evaluation seeds start at 10,000,000)


def digits_prompts(n: int) -> list[str]:
    """``n`` training prompts of the built-in digits task."""
    from nitro_dist.tasks import load_task

    return load_task("digits").train_prompts(n)


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
    src.add_argument(
        "--prompts", help="a .txt, .jsonl, .csv or .parquet file, or a folder of images + .txt"
    )
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
