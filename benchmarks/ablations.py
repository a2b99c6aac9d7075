"""The paper's ablations on the digits task, same budget each, several seeds.

  python benchmarks/ablations.py [--iterations 300] [--seeds 0 1 2] [--eval-images 1000]

Variants (each a set of config overrides on configs/digits.yaml):
  full             the method as configured
  no_refresh       pool.refresh_rate=0
  no_dynamic_pool  one static head per slot (pool.candidates=1, no refresh)
  no_multiscale    global heads only (pool.kinds=[global_cond])
  no_uncond        no unconditional heads (pool.kinds=[global_cond, local_cond])
Each run trains single-process (loop.train) for --iterations and evaluates FID-digits and
alignment at 1 and 4 steps on --eval-images images. Prints mean +- std over seeds and writes
benchmarks/results/ablations.{md,csv,png}. The default budget takes about 40-50 minutes on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "full": [],
    "no_refresh": ["pool.refresh_rate=0.0"],
    "no_dynamic_pool": ["pool.candidates=1", "pool.refresh_rate=0.0"],
    "no_multiscale": ["pool.kinds=[global_cond]"],
    "no_uncond": ["pool.kinds=[global_cond, local_cond]"],
}
METRICS = ["fid_digits_1step", "alignment_1step", "fid_digits_4step", "alignment_4step"]


def run_one(variant: str, seed: int, args) -> dict:
    from nitro_dist.config import load_config
    from nitro_dist.loop import train

    overrides = [
        *VARIANTS[variant],
        f"seed={seed}",
        f"train.iterations={args.iterations}",
        "train.eval_every=0",
        "train.sample_every=0",
        "train.checkpoint_every=0",
        f"train.eval_images={args.eval_images}",
        "logging.wandb=false",
        "logging.progress=false",
    ]
    cfg = load_config("digits", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        final = train(cfg, Path(tmp))
    row = {"variant": variant, "seed": seed, "seconds": round(time.time() - t0, 1)}
    row.update({k: final[k] for k in METRICS})
    return row


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        s = {"variant": variant, "seeds": len(mine)}
        for k in METRICS:
            vals = [r[k] for r in mine]
            s[k] = statistics.mean(vals)
            s[f"{k}_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(s)
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [s["variant"] for s in summary]
    for ax, k in zip(axes, ["fid_digits_1step", "fid_digits_4step"], strict=True):
        ax.bar(names, [s[k] for s in summary], yerr=[s[f"{k}_sd"] for s in summary], capsize=4)
        ax.set_ylabel(k)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the table and plot go")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            rows.append(run_one(variant, seed, args))
            print(rows[-1], flush=True)
    summary = summarise(rows)
    header = (
        "| variant | FID-digits 1 step | alignment 1 step | FID-digits 4 steps "
        "| alignment 4 steps |"
    )
    lines = [
        f"# Ablations (digits, {args.iterations} iterations each, seeds {args.seeds}, "
        f"{args.eval_images} evaluation images)",
        "",
        header,
        "|---|---|---|---|---|",
    ]
    for s in summary:
        cells = [f"{s[k]:.2f} +- {s[f'{k}_sd']:.2f}" for k in METRICS]
        lines.append(f"| {s['variant']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablations.md").write_text(table + "\n")
    with (args.out / "ablations.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(summary, args.out / "ablations.png")


if __name__ == "__main__":
    main()
