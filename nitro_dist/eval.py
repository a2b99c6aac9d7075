"""Evaluate a checkpoint at 1-4 steps against its own teacher: the task's metrics, FID of
student against teacher images (clean-fid), CLIP score.

Examples:
  python -m nitro_dist.eval --checkpoint runs/digits                       # digits: FID-digits
  python -m nitro_dist.eval --checkpoint runs/sdxl --inception /w/inception-2015-12-05.pt \
      --clip /w/clip-vit-large-patch14 --num-images 1000           # held-out prompts, 1/2/4 steps
  python -m nitro_dist.eval --checkpoint runs/x --preset coco5k --prompts coco5k_captions.txt \
      --inception /w/inception-2015-12-05.pt --reference coco_val2014_5k/   # paper's COCO-5k

Prompts: --prompts FILE, else the task's evaluation prompts (task ``prompts``: the run's
train.sample_prompts, cycled); seeds from the evaluation range (never a training seed).
Rows: one per student step count (--steps, default 1 2 4) and, with --inception, one for the
teacher (its own sampler, the same prompts and seeds). Columns:
- the task's metrics (digits: FID-digits and prompt alignment; prompts: diversity, pixel_std);
- fid_teacher (--inception PATH): FID of the student's images against the teacher's, through
  clean-fid's "clean" path (PIL bicubic resize to 299, its Inception) with clean-fid's
  TorchScript Inception file at PATH; nothing is downloaded;
- clip_score (--clip PATH): 100 x cosine of CLIP image and prompt embeddings, floored at 0, with
  a local transformers CLIP folder;
- fid (--reference DIR or STATS.npz with mu, sigma; needs --inception): FID against real images.
--inception and --clip default to the run's eval.inception / eval.clip (the keys that add the
same figures to training's evaluations and to Tune). clean-fid is the extra `pip install -e
.[eval]` and needs torchvision. Student images are made locally or over Ray tasks (--workers N,
--gpus-per-worker G), the teacher's locally. Writes <out>/eval.md, eval.csv and eval.json (the
table), grids grid_<k>step.png and grid_teacher.png; --wandb logs them.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nitro_dist.config import Config
from nitro_dist.tasks import Task

PRESETS = {"coco5k": {"num_images": 5000, "steps": [1, 4]}}


def prompt_set(path: str | None, num_images: int, task: Task) -> list[str]:
    """``--prompts`` cycled to ``num_images``, else the task's evaluation prompts."""
    if path is None:
        return task.eval_prompts(num_images)
    from nitro_dist.data.prompts import read_prompts

    prompts = read_prompts(path, "prompt")
    return [prompts[i % len(prompts)] for i in range(num_images)]


def generate(ckpt: str, prompts: list[str], seeds: list[int], steps: int, args) -> torch.Tensor:
    """Images in [-1, 1]; locally, or in --workers Ray tasks (one chunk each)."""
    if args.workers <= 0:
        return _generate_chunk(ckpt, prompts, seeds, steps, args.device, args.batch_size)
    import ray

    if not ray.is_initialized():
        ray.init()
    task = ray.remote(num_gpus=args.gpus_per_worker, num_cpus=1)(_generate_chunk)
    n = args.workers
    parts = [
        task.remote(ckpt, prompts[i::n], seeds[i::n], steps, args.device, args.batch_size)
        for i in range(n)
    ]
    chunks = ray.get(parts)
    out = torch.empty((len(prompts), *chunks[0].shape[1:]))
    for i, c in enumerate(chunks):
        out[i::n] = c
    return out


def _generate_chunk(ckpt, prompts, seeds, steps, device, batch_size) -> torch.Tensor:
    from nitro_dist.inference import Generator

    return Generator.from_checkpoint(ckpt, device=device, batch_size=batch_size)(
        prompts, seeds, steps
    )


# ---------------------------------------------------------------------------------------------
# the command


def eval_task(cfg: Config, args) -> Task:
    """The checkpoint's task, with the teacher comparison the flags ask for (each flag defaults
    to the run's own ``eval.*`` key)."""
    from nitro_dist.image_metrics import TeacherComparison
    from nitro_dist.tasks import EVAL_SEED_OFFSET, WithImageMetrics, load_task

    task = load_task(cfg.task, cfg.train.sample_prompts)
    inception = args.inception or cfg.eval.inception
    clip = args.clip or cfg.eval.clip
    if not (inception or clip):
        return task
    named = lambda flag, key, given: flag if given else f"{flag} (default: the run's {key})"
    comparison = TeacherComparison(
        cfg,
        inception=inception,
        clip=clip,
        device=args.device,
        first_seed=EVAL_SEED_OFFSET + args.seed,  # the student's seeds below
        batch_size=args.batch_size,
        task_dir=task.model_dir() if cfg.model.source == "task" else None,
        what=(
            named("--inception", "eval.inception", args.inception),
            named("--clip", "eval.clip", args.clip),
        ),
    )
    return WithImageMetrics(task, comparison)


def evaluate(args) -> list[dict[str, Any]]:
    from nitro_dist.inference import Generator
    from nitro_dist.remote import open_checkpoint
    from nitro_dist.tasks import EVAL_SEED_OFFSET, WithImageMetrics

    path = open_checkpoint(args.checkpoint)  # a run or checkpoint folder, local or s3://
    cfg = Generator.checkpoint_config(path)
    task = eval_task(cfg, args)
    comparison = task.comparison if isinstance(task, WithImageMetrics) else None
    inception = comparison.inception if comparison is not None else None
    if args.reference and inception is None:
        raise ValueError(
            "--reference: FID against reference images needs --inception PATH (clean-fid's "
            "inception-2015-12-05.pt; nothing is downloaded)"
        )
    prompts = prompt_set(args.prompts, args.num_images, task)
    seeds = [EVAL_SEED_OFFSET + args.seed + i for i in range(len(prompts))]
    out = Path(args.out or Path(path) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    ref_feats = reference_features(inception, args.reference) if args.reference else None

    def score(row: dict[str, Any], images: torch.Tensor, metrics: dict[str, float]) -> None:
        row.update(metrics)
        if ref_feats is not None:
            assert inception is not None  # checked above
            feats = inception.features(images)
            row["fid"] = (
                inception.fid_to_stats(feats, args.reference)
                if isinstance(ref_feats, str)
                else inception.fid_from_features(feats, ref_feats)
            )
        save_grid_of(images, len(prompts), out / grid_name(row))
        rows.append(row)
        print(json.dumps(row), flush=True)

    rows: list[dict[str, Any]] = []
    if comparison is not None and comparison.inception_path:
        # the reference the student is measured against: its teacher on the same prompts/seeds
        assert isinstance(task, WithImageMetrics)
        teacher_images, _ = comparison.teacher(prompts)
        metrics = task.task.metrics(teacher_images, prompts)
        if comparison.clip is not None:
            metrics["clip_score"] = comparison.clip(teacher_images, prompts)
        t = cfg.teacher
        steps = len(t.timesteps) or t.num_steps
        score({"model": "teacher", "steps": steps, "images": len(prompts)}, teacher_images, metrics)
    for steps in args.steps:
        images = generate(str(path), prompts, seeds, steps, args)
        row = {"model": "student", "steps": steps, "images": len(prompts)}
        score(row, images, task.metrics(images, prompts))
    write_table(rows, out, str(path))
    if args.wandb:
        log_wandb(rows, out)
    return rows


def reference_features(inception, reference: str) -> np.ndarray | str:
    """Features of a reference image folder, or the path of a stats .npz (mu, sigma)."""
    if reference.endswith(".npz"):
        if not Path(reference).is_file():
            raise ValueError(f"--reference {reference}: no such file")
        return reference
    if not Path(reference).is_dir():
        raise ValueError(f"--reference {reference}: not an image folder or a stats .npz")
    feats = inception.folder_features(reference)
    if len(feats) < 2:
        raise ValueError(f"--reference {reference}: needs at least 2 images, found {len(feats)}")
    return feats


def grid_name(row: dict[str, Any]) -> str:
    return "grid_teacher.png" if row["model"] == "teacher" else f"grid_{row['steps']}step.png"


def save_grid_of(images: torch.Tensor, n: int, path: Path) -> None:
    from nitro_dist.images import save_grid

    per_row = min(8, n)
    scale = max(1, 64 // images.shape[-1])
    save_grid(images[: min(n, 8 * per_row)], per_row, path, scale=scale)


def write_table(rows: list[dict[str, Any]], out: Path, checkpoint: str) -> None:
    """eval.csv, eval.json and eval.md (a Markdown table, one row per model and step count)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    (out / "eval.json").write_text(json.dumps({"checkpoint": checkpoint, "rows": rows}, indent=2))
    with (out / "eval.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [
        f"# Evaluation of {checkpoint}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows),
    ]
    (out / "eval.md").write_text("\n".join(lines) + "\n")


def log_wandb(rows: list[dict[str, Any]], out: Path) -> None:
    import wandb

    run = wandb.init(project="nitro_dist", job_type="eval", dir=str(out), mode="offline")
    run.log({"eval": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
    for r in rows:
        run.log({grid_name(r).removesuffix(".png"): wandb.Image(str(out / grid_name(r)))})
    run.finish()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m nitro_dist.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--checkpoint", required=True, help="checkpoint, or run dir (latest)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 3, 4])
    ap.add_argument("--prompts", help="prompt file (.txt/.jsonl/.csv/.parquet, 'prompt' field)")
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument(
        "--inception",
        help="clean-fid's Inception weights, the TorchScript file inception-2015-12-05.pt: "
        "FID of the student against its teacher (default: the run's eval.inception)",
    )
    ap.add_argument(
        "--clip", help="local transformers CLIP folder: CLIP score (default: the run's eval.clip)"
    )
    ap.add_argument(
        "--reference", help="reference image folder or stats .npz (mu, sigma): FID (--inception)"
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), help="coco5k: 5,000 images, 1 and 4 steps")
    ap.add_argument("--out", help="output folder (default: <checkpoint>/eval)")
    ap.add_argument("--seed", type=int, default=0, help="offset of the evaluation seeds")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0, help="Ray tasks for generation (0: local)")
    ap.add_argument("--gpus-per-worker", type=float, default=0.0)
    ap.add_argument("--wandb", action="store_true", help="log the table and grids (offline)")
    args = ap.parse_args(argv)
    if args.preset:
        for k, v in PRESETS[args.preset].items():
            setattr(args, k, v)
    if not 1 <= args.num_images <= 100_000:
        ap.error("--num-images must be in 1..100000")
    try:
        evaluate(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
