"""Evaluate a checkpoint at 1-4 steps: the task's metrics, FID (clean-fid), CLIP score.

Examples:
  python -m nitro_dist.eval --checkpoint runs/digits                       # digits: FID-digits
  python -m nitro_dist.eval --checkpoint runs/x --prompts captions.txt --reference ref_imgs/ \\
      --clip /models/clip-vit-l-14 --steps 1 4 --num-images 5000
  python -m nitro_dist.eval --checkpoint runs/x --preset coco5k --prompts coco5k_captions.txt \\
      --reference coco_val2014_5k/          # the paper's COCO-5k protocol (files you supply)

Metrics per step count:
- the metrics of the checkpoint's task (its config's ``task``): digits: FID-digits and prompt
  alignment (the shipped metric network); prompts: diversity and pixel spread;
- --reference DIR (images) or STATS.npz (mu, sigma): FID with clean-fid ("clean" mode). clean-fid
  is the optional extra `pip install -e .[eval]`; its Inception weights must already be in its
  cache (offline machines: copy them there; the error names the place);
- --clip PATH: CLIP score (100 x cosine of image and prompt embeddings, floored at 0) with a local
  transformers CLIP model folder.
Generation runs locally, or spread over Ray tasks with --workers N (--gpus-per-worker G on a
cluster). Writes <out>/eval.md and eval.csv (a table like the paper's Table 1), grids
<out>/grid_<k>step.png, and logs them to wandb with --wandb.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
# metrics


def clean_fid(images: torch.Tensor, reference: str) -> float:
    try:
        from cleanfid import fid
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision failing inside it
        raise ValueError(
            f"--reference: FID needs clean-fid, which does not import here ({e}); install it "
            "with `pip install -e .[eval]` on a machine whose torchvision matches torch"
        ) from None
    from nitro_dist.images import to_pil, to_uint8_hwc

    with tempfile.TemporaryDirectory() as tmp:
        for i, img in enumerate(to_uint8_hwc(images)):
            to_pil(img, 1).save(Path(tmp) / f"{i:06d}.png")
        try:
            if reference.endswith(".npz"):
                stats = np.load(reference)
                feats = fid.get_folder_features(tmp, mode="clean")
                mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
                return float(fid.frechet_distance(mu, sigma, stats["mu"], stats["sigma"]))
            return float(fid.compute_fid(tmp, reference, mode="clean"))
        except OSError as e:  # urllib errors are OSErrors: the weights download failed
            raise ValueError(
                "clean-fid could not load its Inception weights (no network here?): put "
                "inception-2015-12-05.pt in clean-fid's cache folder (see cleanfid/features.py, "
                f"usually /tmp or ~/.cache) and rerun ({e})"
            ) from None


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], model_path: str) -> float:
    from transformers import CLIPModel, CLIPProcessor

    if not Path(model_path).exists():
        raise ValueError(f"--clip {model_path}: no such folder (a transformers CLIP model)")
    model = CLIPModel.from_pretrained(model_path).eval()
    processor = CLIPProcessor.from_pretrained(model_path)
    from nitro_dist.images import to_uint8_hwc

    pil = [img for img in to_uint8_hwc(images)]
    if pil[0].shape[-1] == 1:  # grey -> RGB for CLIP
        pil = [np.repeat(a, 3, axis=-1) for a in pil]
    scores = []
    for s in range(0, len(pil), 64):
        inputs = processor(
            text=prompts[s : s + 64],
            images=pil[s : s + 64],
            return_tensors="pt",
            padding=True,
            truncation=True,
        )
        out = model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        scores.append((100 * (img * txt).sum(-1)).clamp(min=0))
    return float(torch.cat(scores).mean())


# ---------------------------------------------------------------------------------------------
# the command


def evaluate(args) -> list[dict[str, Any]]:
    from nitro_dist import checkpoint_layout as ckpt
    from nitro_dist.images import save_grid
    from nitro_dist.inference import Generator
    from nitro_dist.tasks import EVAL_SEED_OFFSET, task_of

    path = ckpt.resolve(args.checkpoint, parts=ckpt.INFERENCE_PARTS)
    task = task_of(Generator.checkpoint_config(path))
    prompts = prompt_set(args.prompts, args.num_images, task)
    seeds = [EVAL_SEED_OFFSET + args.seed + i for i in range(len(prompts))]
    out = Path(args.out or Path(path) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for steps in args.steps:
        images = generate(str(path), prompts, seeds, steps, args)
        row: dict[str, Any] = {"steps": steps, "images": len(prompts)}
        row.update(task.metrics(images, prompts))
        if args.reference:
            row["fid"] = clean_fid(images, args.reference)
        if args.clip:
            row["clip_score"] = clip_score(images, prompts, args.clip)
        per_row = min(8, len(prompts))
        grid_n = min(len(prompts), 8 * per_row)
        scale = max(1, 64 // images.shape[-1])
        save_grid(images[:grid_n], per_row, out / f"grid_{steps}step.png", scale=scale)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_table(rows, out, str(path))
    if args.wandb:
        log_wandb(rows, out)
    return rows


def write_table(rows: list[dict[str, Any]], out: Path, checkpoint: str) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
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
        run.log({f"grid_{r['steps']}step": wandb.Image(str(out / f"grid_{r['steps']}step.png"))})
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
    ap.add_argument("--reference", help="reference image folder or stats .npz (mu, sigma)")
    ap.add_argument("--clip", help="local transformers CLIP model folder (CLIP score)")
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
