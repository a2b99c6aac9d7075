"""Teacher pairs for the offline teacher: a Ray Data job over prompt shards.

Examples:
  python -m nitro_dist.prepare --config digits --prompts data/digits --out data/digits_pairs
  python -m nitro_dist.prepare --config configs/sdxl_realism.yaml \\
      --prompts s3://bucket/prompts --out s3://bucket/pairs --actors 8 --gpus-per-actor 1
  python -m nitro_dist.prepare --config configs/sdxl_realism.yaml --caption-key txt \
      --prompts 's3://bucket/laion/{00000..00999}.tar' --out s3://bucket/pairs --actors 8

Each input shard becomes one pair shard (prompt, noise seed, the teacher's x0 as fp16
teacher.npy) written by a pool of teacher actors (GPU actors on a cluster, CPU here); x_T is
regenerated bit-exactly from the stored seed; the caption is read from --caption-key (img2dataset
shards: txt) and written as prompt.txt. Shards already written are skipped, so rerunning
an interrupted job finishes it (a rerun of a finished job reads its manifest and starts no
teacher actor; an --out holding pairs of another teacher or model configuration is refused).
Then train with
  data.source=shards data.shards=<out> teacher.mode=offline
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

from nitro_dist.config import Config, config_from_dict, load_config, to_dict
from nitro_dist.data.prompts import CaptionKey
from nitro_dist.data.shards import (
    MANIFEST,
    BadData,
    DataError,
    encode,
    list_shards,
    read_shard,
    shard_name,
    write_manifest,
    write_shard,
)
from nitro_dist.data.storage import join, read_bytes, url_fs


class PairWriter:
    """A Ray Data actor: loads the teacher once, turns prompt shards into pair shards."""

    def __init__(
        self, config: dict[str, Any], out: str, batch_size: int, caption_key: str = "prompt.txt"
    ) -> None:
        from nitro_dist.build import models_of, pick_device
        from nitro_dist.diffusion import TeacherSampler

        cfg = config_from_dict(config)
        self.device = pick_device(cfg.train.device)
        self.models = models_of(cfg)
        self.models.teacher.to(self.device)
        self.models.text.to(self.device)
        self.sampler = TeacherSampler.from_config(self.models.schedule, cfg.teacher)
        self.out, self.batch_size = out, batch_size
        self.caption = CaptionKey.parse(caption_key)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import fsspec

        names, counts, skipped, bad_total = [], [], [], []
        for src, name in zip(batch["src"], batch["name"], strict=True):
            url = join(self.out, str(name))
            fs, path = fsspec.core.url_to_fs(url)
            bad = BadData()
            if fs.exists(path):  # written by an earlier run: shards are moved into place whole
                n, was_skipped = sum(1 for _ in read_shard(url, bad)), True
            else:
                n, was_skipped = write_shard(url, self._pairs(str(src), bad)), False
            names.append(str(name))
            counts.append(n)
            skipped.append(was_skipped)
            bad_total.append(json.dumps(bad.as_metrics()))
        return {"name": names, "count": counts, "skipped": skipped, "bad": bad_total}

    def _pairs(self, src: str, bad: BadData):
        from nitro_dist.data.pairs import teacher_x0

        samples = list(read_shard(src, bad, self.caption))
        for s in range(0, len(samples), self.batch_size):
            chunk = samples[s : s + self.batch_size]
            seeds = torch.tensor([x.noise_seed for x in chunk], dtype=torch.long)
            x0 = teacher_x0(
                self.models.teacher,
                self.models.text,
                self.sampler,
                [x.prompt for x in chunk],
                seeds,
                self.models.sample_shape,
                self.device,
            )
            for x, lat in zip(chunk, x0.float().cpu().numpy(), strict=True):
                yield encode(x.key.rsplit("/", 1)[-1], x.prompt, x.noise_seed, lat)


def prepare(
    cfg: Config,
    prompts: str,
    out: str,
    *,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    batch_size: int = 64,
    caption_key: str = "prompt.txt",
) -> dict:
    """Run the job; returns the output manifest (with ``written`` / ``skipped`` counts)."""
    from nitro_dist.distributed.ray_train import connect

    connect(cfg)  # first: a brace pattern of prompt shards is indexed by Ray tasks
    shards = list_shards(prompts)
    items = [{"src": u, "name": shard_name("pairs", i)} for i, u in enumerate(shards.urls)]
    meta = {"kind": "pairs", "teacher": to_dict(cfg.teacher), "model": to_dict(cfg.model)}
    done = finished_shards(out, meta)
    pending = [it for it in items if it["name"] not in done]
    rows = [(name, count, True) for name, count in done.items()]  # (name, count, skipped)
    if pending:  # a rerun of a finished job starts no teacher actor
        rows += pair_rows(
            cfg, out, pending, actors, cpus_per_actor, gpus_per_actor, batch_size, caption_key
        )
    rows.sort()
    manifest = write_manifest(out, [r[0] for r in rows], [r[1] for r in rows], meta)
    manifest["written"] = sum(not r[2] for r in rows)
    manifest["skipped"] = sum(r[2] for r in rows)
    return manifest


def finished_shards(out: str, meta: dict) -> dict[str, int]:
    """{name: count} of the pair shards a finished earlier run of this job wrote to ``out``
    (its manifest, for the shards still there). Pairs of another teacher are an error: they
    would be mixed with this one's."""
    fs, path = url_fs(join(out, MANIFEST))
    if not fs.exists(path):
        return {}
    old = json.loads(read_bytes(join(out, MANIFEST)))
    for key in ("teacher", "model"):
        if old.get(key) != meta[key]:
            raise ValueError(
                f"--out {out}: holds pairs of another {key} configuration ({MANIFEST}: "
                f"{old.get(key)}); write these pairs to a new folder"
            )
    folder = path.rsplit("/", 1)[0]
    fs.invalidate_cache(folder)  # the shards were written by actors, not through this client
    there = {p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
    return {s["name"]: int(s["count"]) for s in old["shards"] if s["name"] in there}


def pair_rows(
    cfg: Config,
    out: str,
    items: list[dict],
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    batch_size: int,
    caption_key: str,
) -> list[tuple[str, int, bool]]:
    """The Ray Data job over ``items`` (prompt shard -> pair shard): (name, count, skipped) per
    shard."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        PairWriter,
        fn_constructor_kwargs={
            "config": to_dict(cfg),
            "out": out,
            "batch_size": batch_size,
            "caption_key": caption_key,
        },
        batch_size=1,
        concurrency=actors,
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )
    return [(str(r["name"]), int(r["count"]), bool(r["skipped"])) for r in ds.take_all()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m nitro_dist.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", default="digits", help="preset or YAML (model + teacher used)")
    ap.add_argument(
        "--prompts", required=True, help="prompt shards: folder/URL with manifest, or brace pattern"
    )
    ap.add_argument(
        "--caption-key",
        default="prompt.txt",
        help="the member with the caption: txt, prompt.txt, or json:FIELD (as data.caption_key)",
    )
    ap.add_argument("--out", required=True, help="output folder or URL for the pair shards")
    ap.add_argument("--actors", type=int, default=1, help="teacher actors (one per GPU)")
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--gpus-per-actor", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=64, help="teacher batch per actor")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.actors < 1 or args.batch_size < 1:
            raise ValueError("--actors and --batch-size must be >= 1")
        CaptionKey.parse(args.caption_key, "--caption-key")
        manifest = prepare(
            cfg,
            args.prompts,
            args.out,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
            batch_size=args.batch_size,
            caption_key=args.caption_key,
        )
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{manifest['total']} pairs in {len(manifest['shards'])} shards at {args.out} "
        f"({manifest['written']} written, {manifest['skipped']} already there)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
