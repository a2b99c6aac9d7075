"""Table-1-style results on the digits task: FID-digits and prompt alignment of
the teacher at its full steps, the teacher at 1 step (baseline) and the student at 1/2/4 steps.

  python benchmarks/digits_quality.py [--checkpoint runs/digits] [--num-images 2000]

Prints a markdown table and writes it (plus CSV) to benchmarks/results/digits_quality.{md,csv}.
Targets (issue 2): 1-step student FID <= teacher-1-step / 3 and <= 1.5 x teacher-full;
alignment >= 95%.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from nitro_dist.build import models_of
from nitro_dist.config import load_config
from nitro_dist.data.pairs import teacher_x0
from nitro_dist.diffusion import TeacherSampler
from nitro_dist.digits.data import PROMPTS
from nitro_dist.digits.metric import DigitsEvaluator
from nitro_dist.inference import Generator
from nitro_dist.tasks import EVAL_SEED_OFFSET

RESULTS = Path(__file__).resolve().parent / "results"


def teacher_rows(cfg, prompts, seeds, labels, ev) -> list[dict]:
    models = models_of(cfg)
    t = cfg.teacher
    rows = []
    for name, steps in (
        (f"teacher ({t.scheduler}, CFG {t.guidance_scale})", t.num_steps),
        ("teacher, 1 step (baseline)", 1),
    ):
        sampler = TeacherSampler(
            models.schedule,
            scheduler=t.scheduler,
            num_steps=steps,
            guidance_scale=t.guidance_scale,
            overrides=t.scheduler_overrides,
        )
        t0 = time.time()
        imgs = torch.cat(
            [
                teacher_x0(
                    models.teacher,
                    models.text,
                    sampler,
                    prompts[i : i + 500],
                    torch.tensor(seeds[i : i + 500]),
                    models.sample_shape,
                    torch.device("cpu"),
                )
                for i in range(0, len(prompts), 500)
            ]
        ).clamp(-1, 1)
        evals = steps * (2 if t.guidance_scale > 1 else 1)
        rows.append(
            {
                "model": name,
                "steps": steps,
                "unet_evals": evals,
                **ev.evaluate(imgs, labels),
                "seconds": time.time() - t0,
            }
        )
    return rows


def student_rows(checkpoint: Path, prompts, seeds, labels, ev) -> list[dict]:
    gen = Generator.from_checkpoint(checkpoint)
    rows = []
    for steps in (1, 2, 4):
        t0 = time.time()
        imgs = torch.cat(
            [
                gen(prompts[i : i + 500], seeds[i : i + 500], steps)
                for i in range(0, len(prompts), 500)
            ]
        )
        rows.append(
            {
                "model": "NitroFusion student",
                "steps": steps,
                "unet_evals": steps,
                **ev.evaluate(imgs, labels),
                "seconds": time.time() - t0,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/digits"))
    ap.add_argument("--config", default="digits", help="preset whose teacher settings to use")
    ap.add_argument("--num-images", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS / "digits_quality")
    args = ap.parse_args()
    cfg = load_config(args.config)
    n = args.num_images
    labels = torch.arange(n) % 10
    prompts = [PROMPTS[int(y)] for y in labels]
    seeds = [EVAL_SEED_OFFSET + i for i in range(n)]
    ev = DigitsEvaluator()
    rows = teacher_rows(cfg, prompts, seeds, labels, ev) + student_rows(
        args.checkpoint, prompts, seeds, labels, ev
    )
    full, base, one = rows[0]["fid_digits"], rows[1]["fid_digits"], rows[2]["fid_digits"]
    lines = [
        f"Digits task: {n} images ({n // 10} per digit), eval seeds from {seeds[0]}, "
        f"student {args.checkpoint}",
        "",
        "| model | steps | UNet evals | FID-digits (lower better) | alignment |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['unet_evals']} | {r['fid_digits']:.2f} "
            f"| {100 * r['alignment']:.1f}% |"
        )
    lines += [
        "",
        f"1-step student vs teacher 1-step: {base / one:.2f}x better FID (target >= 3x)",
        f"1-step student vs teacher full: {one / full:.2f}x the teacher's FID (target <= 1.2x)",
        f"1-step student alignment: {100 * rows[2]['alignment']:.1f}% (target >= 95%)",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
