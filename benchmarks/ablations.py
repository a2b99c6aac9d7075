"""The paper's ablations on the digits task at the digits preset, several seeds, with a paired
significance test against the full method.

  python benchmarks/ablations.py [--seeds 0 1 2 3 4] [--eval-images 2000] [--max-minutes M]
  python benchmarks/ablations.py --tag long --iterations 1350 --eval-every 450 --seeds 0 1 2 \\
      --variants full no_refresh no_dynamic_pool      # does a static pool overfit over time?

Variants (each a set of config overrides on configs/digits.yaml):
  full             the method as configured
  no_refresh       pool.refresh_rate=0
  no_dynamic_pool  one static head per slot (pool.candidates=1, no refresh)
  no_multiscale    global heads only (pool.kinds=[global_cond])
  no_uncond        no unconditional heads (pool.kinds=[global_cond, local_cond])
Each run is the preset's recipe (its one-step stage, then the NitroFusion stage for
--iterations, the preset's length by default) on Ray Train as `make train` runs it (the preset's
2 workers; one local Ray for the whole study, or RAY_ADDRESS's cluster), and its final EMA is
evaluated on --eval-images images (FID-digits and alignment at 1, 2 and 4 steps).

Runs accumulate: every finished run is appended to benchmarks/results/ablations_<tag>_runs.csv
at once, and a run already there (same variant, seed, iterations and images) is not run again,
so a study of 25 runs of ~10 minutes can be filled over several sittings (--max-minutes stops
starting new runs after that long). The summary (mean +- sd over seeds, and for each variant
the paired t-test against full over the seeds both have) is rewritten from all rows every time:
ablations_<tag>.md, .png.

--eval-every N also evaluates each run every N iterations on the same images (the run's own
in-loop evaluation, read back from its metrics.jsonl): the FID of every variant over training,
ablations_<tag>_trajectory.csv (a row per run and evaluation, the final one included) and
_trajectory.png, and a table per evaluation point in the .md, with the gap of each variant to
full at every point and whether it grows from the first point to the last (the paper's claim that
a static pool overfits over long training, as a paired test over the seeds). The G learning
rate is constant at the preset, so a long run's point at the preset's length is the default
study's run of the same seed: the two must agree on one machine, and the .md's last table
checks it (a run made on another CPU differs: rounding in its kernels differs).
"""

from __future__ import annotations

import argparse
import csv
import json
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
STEPS = (1, 2, 4)
METRICS = [f"{m}_{s}step" for s in STEPS for m in ("fid_digits", "alignment")]
KEY = ("variant", "seed", "iterations", "eval_images", "overrides")


def run_one(
    variant: str,
    seed: int,
    iterations: int,
    eval_images: int,
    extra: list[str],
    eval_every: int = 0,
) -> tuple[dict, list[dict]]:
    """The run's row (its final evaluation) and its trajectory rows (every evaluation, the
    final one last; only the final one when ``eval_every`` is 0)."""
    from nitro_dist.config import load_config
    from nitro_dist.distributed.ray_train import launch

    overrides = [
        *VARIANTS[variant],
        f"seed={seed}",
        f"train.iterations={iterations}",
        f"train.eval_every={eval_every}",
        "train.sample_every=0",
        "train.checkpoint_every=0",
        f"train.eval_images={eval_images}",
        "logging.wandb=false",
        "logging.progress=false",
        *extra,
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("digits", [*overrides, f"distributed.storage_path={tmp}"])
        t0 = time.time()
        final = launch(cfg)  # as make train runs it: Ray Train, the preset's workers
        evaluations = read_evaluations(Path(final["run_dir"]) / "metrics.jsonl")
    row: dict = {"variant": variant, "seed": seed, "iterations": iterations}
    row.update({"eval_images": eval_images, "overrides": " ".join(extra)})
    row["seconds"] = round(time.time() - t0, 1)
    row.update({k: round(float(final[k]), 4) for k in METRICS})
    key = {k: row[k] for k in KEY}
    trajectory = [
        {**key, "at_iteration": it, **{k: round(float(ev[k]), 4) for k in METRICS}}
        for it, ev in evaluations
    ]
    return row, trajectory


def read_evaluations(metrics_jsonl: Path) -> list[tuple[int, dict]]:
    """(iteration, metrics) of every evaluation a run logged, in order (lines with all of
    METRICS; the progress lines between them have none)."""
    out = []
    for line in metrics_jsonl.read_text().splitlines():
        rec = json.loads(line)
        if all(k in rec for k in METRICS):
            out.append((int(rec["iteration"]), rec))
    return out


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("seed", "iterations", "eval_images", "at_iteration"):
            if k in r:
                r[k] = int(r[k])
        for k in ("seconds", *METRICS):
            if k in r:
                r[k] = float(r[k])
        r["overrides"] = r.get("overrides") or ""
    return rows


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def paired_p(a: dict[int, float], b: dict[int, float]) -> tuple[int, float | None]:
    """Seeds both have, and the two-sided paired t-test's p-value over them (None below 2)."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return len(seeds), None
    xs, ys = [a[s] for s in seeds], [b[s] for s in seeds]
    if xs == ys:
        return len(seeds), 1.0
    return len(seeds), float(ttest_rel(xs, ys).pvalue)


def mean_sd(vals: list[float]) -> tuple[float, float]:
    """Mean and sample sd (0 for a single value) of a non-empty list."""
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarise(rows: list[dict], variants: list[str]) -> list[dict]:
    by = {v: {r["seed"]: r for r in rows if r["variant"] == v} for v in variants}
    out = []
    for variant in variants:
        mine = list(by[variant].values())
        if not mine:
            continue
        s: dict = {"variant": variant, "seeds": sorted(by[variant])}
        for k in METRICS:
            s[k], s[f"{k}_sd"] = mean_sd([r[k] for r in mine])
        for step in STEPS:
            k = f"fid_digits_{step}step"
            mine_k = {seed: r[k] for seed, r in by[variant].items()}
            full_k = {seed: r[k] for seed, r in by.get("full", {}).items()}
            s[f"paired_{step}"] = paired_p(mine_k, full_k) if variant != "full" else None
        out.append(s)
    return out


def table(summary: list[dict], title: str) -> str:
    lines = [
        title,
        "",
        "FID-digits / alignment, mean +- sd over the seeds; p: two-sided paired t-test of the "
        "variant's FID against full's over the seeds both have (n), lower FID is better.",
        "",
        "| variant | seeds | 1 step | 2 steps | 4 steps | p vs full (1 / 2 / 4 steps) |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        cells = [
            f"{s[f'fid_digits_{k}step']:.2f} +- {s[f'fid_digits_{k}step_sd']:.2f} / "
            f"{100 * s[f'alignment_{k}step']:.1f}%"
            for k in STEPS
        ]
        tests = []
        for k in STEPS:
            pair = s[f"paired_{k}"]
            if pair is None:
                tests.append("-")
            else:
                n, p = pair
                tests.append(f"n={n}" if p is None else f"{p:.3f} (n={n})")
        seeds = ",".join(map(str, s["seeds"]))
        lines.append(
            f"| {s['variant']} | {seeds} | " + " | ".join(cells) + f" | {' / '.join(tests)} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STEPS), figsize=(4 * len(STEPS), 3.5))
    names = [s["variant"] for s in summary]
    for ax, step in zip(axes, STEPS, strict=True):
        k = f"fid_digits_{step}step"
        ax.bar(names, [s[k] for s in summary], yerr=[s[f"{k}_sd"] for s in summary], capsize=4)
        ax.set_ylabel(f"FID-digits, {step} step{'s' if step > 1 else ''}")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def in_study(row: dict, study: tuple[int, int, str]) -> bool:
    """Whether ``row`` is of the study (iterations, eval images, extra overrides)."""
    return (row["iterations"], row["eval_images"], row["overrides"]) == study


def trajectory_tables(rows: list[dict], variants: list[str]) -> str:
    """One table (as ``table``) per evaluation point of the trajectory rows."""
    parts = []
    for at in sorted({r["at_iteration"] for r in rows}):
        summary = summarise([r for r in rows if r["at_iteration"] == at], variants)
        parts.append(table(summary, f"## At iteration {at}"))
    return "\n\n".join(parts)


def gap_table(rows: list[dict], variants: list[str]) -> str:
    """The paper's claim as a test: does a variant's FID gap to full grow over training? Per
    variant and step count, the gap (variant - full, mean +- sd over the seeds both have) at every
    evaluation point, and its growth from the first point to the last with a paired t-test over
    the seeds (the gap at the last point against the gap at the first)."""
    points = sorted({r["at_iteration"] for r in rows})
    at = {(r["variant"], r["seed"], r["at_iteration"]): r for r in rows}
    lines = [
        "## The gap to full over training",
        "",
        "FID-digits of the variant minus full's, mean +- sd over the seeds both have (positive: "
        "the variant is worse); growth: the gap at the last point minus at the first, with the "
        "two-sided paired t-test of the two gaps over the seeds (n).",
        "",
        "| variant | steps | " + " | ".join(f"gap at {p}" for p in points) + " | growth (p) |",
        "|---|---|" + "---|" * len(points) + "---|",
    ]
    for variant in variants:
        if variant == "full":
            continue
        for step in STEPS:
            k = f"fid_digits_{step}step"
            gaps: dict[int, dict[int, float]] = {}  # point -> seed -> gap
            for p in points:
                gaps[p] = {
                    seed: at[(variant, seed, p)][k] - at[("full", seed, p)][k]
                    for (v, seed, q) in at
                    if v == variant and q == p and ("full", seed, p) in at
                }
            if not any(gaps.values()):
                continue
            cells = []
            for p in points:
                if gaps[p]:
                    mean, sd = mean_sd(list(gaps[p].values()))
                    cells.append(f"{mean:+.2f} +- {sd:.2f}")
                else:
                    cells.append("-")
            first, last = gaps[points[0]], gaps[points[-1]]
            both = set(first) & set(last)
            growth = "-"
            if both:
                mean = statistics.mean(last[s] - first[s] for s in both)
                n, p_value = paired_p(last, first)
                growth = f"{mean:+.2f}" + (
                    f" ({p_value:.3f}, n={n})" if p_value is not None else ""
                )
            lines.append(f"| {variant} | {step} | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines)


def consistency_table(points: list[dict], reference: list[dict]) -> str:
    """The check on a trajectory: a point at a length that the ``reference`` study (the default
    study's runs) also ran, with the same images and overrides, must equal that run of the same
    variant and seed, as the G learning rate is constant and a run is deterministic on one
    machine. Rounding in the CPU's kernels differs between machines (a different instruction set
    changes the last bits of the teacher pairs), and the GAN amplifies it: a point that differs
    is a run made on another machine, a different realisation of that seed. One row per point
    checked, with the largest |difference| over the FIDs; empty when nothing can be checked."""
    ref = {tuple(r[k] for k in KEY): r for r in reference}
    fids = [f"fid_digits_{s}step" for s in STEPS]
    lines = []
    for r in sorted(points, key=lambda r: (r["seed"], r["variant"], r["at_iteration"])):
        # the run of the reference study that stopped at this point
        other = ref.get(tuple(r["at_iteration"] if k == "iterations" else r[k] for k in KEY))
        if other is None:
            continue
        diff = max(abs(r[k] - other[k]) for k in fids)
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['at_iteration']} | "
            + " / ".join(f"{other[k]:.4f}" for k in fids)
            + " | "
            + " / ".join(f"{r[k]:.4f}" for k in fids)
            + f" | {'equal' if diff == 0 else f'differs by up to {diff:.4f}'} |"
        )
    if not lines:
        return ""
    head = [
        "## The check against the default study",
        "",
        "Each run's point at the default study's length against that study's run of the same "
        "variant and seed (FID-digits 1 / 2 / 4 steps). Runs are deterministic on one machine; "
        "a point that differs was made on another machine (the CPU's rounding differs), a "
        "different realisation of its seed.",
        "",
        "| variant | seed | at | default study | this study | |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines)


def plot_trajectory(rows: list[dict], variants: list[str], path: Path) -> None:
    """FID-digits against the iteration, one line per variant (mean +- sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted({r["at_iteration"] for r in rows})
    fig, axes = plt.subplots(1, len(STEPS), figsize=(4 * len(STEPS), 3.5))
    for ax, step in zip(axes, STEPS, strict=True):
        k = f"fid_digits_{step}step"
        for variant in variants:
            xs, ys, sds = [], [], []
            for at in points:
                vals = [r[k] for r in rows if r["variant"] == variant and r["at_iteration"] == at]
                if vals:
                    mean, sd = mean_sd(vals)
                    xs.append(at)
                    ys.append(mean)
                    sds.append(sd)
            if xs:
                ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, label=variant)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"FID-digits, {step} step{'s' if step > 1 else ''}")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from nitro_dist.config import load_config

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    preset = load_config("digits").train.iterations
    ap.add_argument("--iterations", type=int, default=preset, help=f"default: {preset}")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument(
        "--eval-every", type=int, default=0, help="also evaluate every N iterations (trajectory)"
    )
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tag", default="default", help="names the study's files")
    ap.add_argument("--max-minutes", type=float, default=None, help="no new run after this")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the files go")
    ap.add_argument("overrides", nargs="*", help="key=value for every run (kept with each row)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / f"ablations_{args.tag}_runs.csv"
    trajectory = args.out / f"ablations_{args.tag}_trajectory.csv"
    extra = " ".join(args.overrides)
    t0 = time.time()
    # seed-major: a partial study still pairs every variant with full
    todo = [(seed, variant) for seed in args.seeds for variant in args.variants]
    done = {tuple(r[k] for k in KEY) for r in read_rows(runs)}
    for seed, variant in todo:
        if (variant, seed, args.iterations, args.eval_images, extra) in done:
            continue
        if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
            print(f"--max-minutes {args.max_minutes} reached: no new run", flush=True)
            break
        row, points = run_one(
            variant, seed, args.iterations, args.eval_images, args.overrides, args.eval_every
        )
        append_row(runs, row)
        for point in points:
            append_row(trajectory, point)
        print(row, flush=True)
    study = (args.iterations, args.eval_images, extra)
    rows = [r for r in read_rows(runs) if in_study(r, study)]
    points = [r for r in read_rows(trajectory) if in_study(r, study)]
    if not rows:
        print("no finished run yet")
        return
    summary = summarise(rows, list(VARIANTS))
    text = table(
        summary,
        f"# Ablations, digits preset ({args.tag}: {args.iterations} iterations of the "
        f"NitroFusion stage after the preset's one-step stage, {args.eval_images} images"
        + (f"; every run with {extra}" if extra else "")
        + ")",
    )
    if any(r["at_iteration"] < args.iterations for r in points):  # a trajectory was recorded
        text += "\n\n# Over training (in-loop evaluations, same images)\n\n"
        text += trajectory_tables(points, list(VARIANTS))
        text += "\n\n" + gap_table(points, list(VARIANTS))
        if args.tag != "default":
            check = consistency_table(points, read_rows(args.out / "ablations_default_runs.csv"))
            if check:
                text += "\n\n" + check
        plot_trajectory(points, list(VARIANTS), args.out / f"ablations_{args.tag}_trajectory.png")
    print(text)
    (args.out / f"ablations_{args.tag}.md").write_text(text + "\n")
    plot(summary, args.out / f"ablations_{args.tag}.png")


if __name__ == "__main__":
    main()
