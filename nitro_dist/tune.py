"""Sweep config keys (pool size, refresh rate, ...) with Ray Tune and ASHA.

Examples:
  python -m nitro_dist.tune                                   # the digits preset's tune section
  python -m nitro_dist.tune --config digits --num-samples 2 train.iterations=300
  python -m nitro_dist.tune 'tune.search_space={"pool.candidates": {"grid": [1, 2, 4]}}'

The YAML's ``tune`` section names the metric (digits: fid_digits_1step, reported at every
train.eval_every; a run of task ``prompts`` left at that default watches fid_teacher_1step,
FID of student against teacher images, which needs eval.inception: see ``pick_metric``), the
mode, and the search space: dotted config keys mapped to {"grid": [...]},
{"choice": [...]}, {"uniform": [lo, hi]}, {"loguniform": [lo, hi]} or {"randint": [lo, hi]}.
Every key is checked against the config tree before anything starts. Each trial is a real
distributed training run: a Ray Train TorchTrainer launched inside the Tune function, its
reports forwarded by TuneReportCallback; ASHA stops weak trials at eval points. Rerunning the
same command resumes an interrupted sweep (and each unfinished trial from its checkpoint).

Writes into <tune.storage_path>/<run_name>-sweep/: results.csv (one row per trial: the best
value of the metric, and at the trial's last evaluation the metric and its 2- and 4-step
siblings), metric.png (metric against each swept key), best.yaml (the best trial's resolved
config; `python -m nitro_dist.train --config .../best.yaml` accepts it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from nitro_dist.config import (
    Config,
    TuneConfig,
    config_from_dict,
    dump_yaml,
    get_key,
    load_config,
    to_dict,
    with_values,
)
from nitro_dist.distributed.address import check_ray_address

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
# The trial function only launches a TorchTrainer, whose workers hold the real resources: the
# trial reserves no CPU (Tune's head bundle needs some resource: one byte of memory). With 0.01
# CPU a preset whose workers take every CPU (digits: 2 workers x 1 CPU on a 2-core machine) never
# got its worker group: Ray Train retried its 60 s start-up timeout for ever.
TRIAL_RESOURCES = {"cpu": 0, "memory": 1}


def candidate_values(key: str, spec: Any) -> tuple[str, list]:
    """(domain, values to type-check) of one search-space entry; ValueError naming the key."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
        raise ValueError(f"tune.search_space.{key}: expected one of {{{', '.join(DOMAINS)}: ...}}")
    domain, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ValueError(f"tune.search_space.{key}.{domain}: expected a non-empty list")
    if domain in ("uniform", "loguniform", "randint") and len(values) != 2:
        raise ValueError(f"tune.search_space.{key}.{domain}: expected [low, high]")
    return domain, values


def check_space(cfg: Config) -> None:
    """Every swept key exists and every candidate value builds a valid config."""
    if not cfg.tune.search_space:
        raise ValueError("tune.search_space is empty: name at least one config key to sweep")
    for key, spec in cfg.tune.search_space.items():
        get_key(cfg, key)
        _, values = candidate_values(key, spec)
        for v in values:
            try:
                trial_config(cfg, {key: v})
            except ValueError as e:
                raise ValueError(f"tune.search_space.{key}: value {v!r}: {e}") from None


def pick_metric(cfg: Config) -> Config:
    """``cfg`` with the metric ASHA watches settled. A task that lists what it reports
    (``metric_names``: task ``prompts``, and any task wrapped by ``eval.inception``/``eval.clip``)
    has ``tune.metric`` checked against the list; left at the digits default, the metric becomes
    fid_teacher_1step (min) when eval.inception is set, else clip_score_1step (max) when
    eval.clip is; a ValueError naming the keys otherwise. Other tasks keep ``tune.metric``."""
    from nitro_dist.tasks import task_of

    t = cfg.tune
    names_fn = getattr(task_of(cfg), "metric_names", None)
    names = names_fn() if names_fn is not None else None
    if names is None:
        return cfg
    reported = [f"{n}_{k}step" for n in names for k in (1, 2, 4)]
    if t.metric in reported:
        return cfg
    if t.metric != TuneConfig().metric:
        raise ValueError(
            f"tune.metric: task {cfg.task!r} does not report {t.metric!r}; it reports "
            f"{', '.join(reported)} (fid_teacher_* need eval.inception, clip_score_* eval.clip)"
        )
    if "fid_teacher" in names:
        return with_values(cfg, {"tune.metric": "fid_teacher_1step", "tune.mode": "min"})
    if "clip_score" in names:
        return with_values(cfg, {"tune.metric": "clip_score_1step", "tune.mode": "max"})
    raise ValueError(
        f"tune.metric: {t.metric} is the digits task's metric; task {cfg.task!r} has no FID "
        "without eval.inception (clean-fid's inception-2015-12-05.pt: tunes on fid_teacher_1step) "
        f"or eval.clip (clip_score_1step), or name one of {', '.join(reported)}"
    )


def param_space(cfg: Config) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in cfg.tune.search_space.items():
        domain, values = candidate_values(key, spec)
        if domain == "grid":
            out[key] = tune.grid_search(values)
        elif domain == "choice":
            out[key] = tune.choice(values)
        else:
            out[key] = getattr(tune, domain)(*values)
    return out


def trial_config(base: Config, params: dict[str, Any], sweep_dir: str | None = None) -> Config:
    """The config a trial trains: ``base`` with the swept values, its own run name (a hash of
    the values, so a restored sweep finds the trial's checkpoints again)."""
    cfg = with_values(base, params)
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    extra: dict[str, Any] = {"run_name": f"{base.run_name}-{digest}"}
    if sweep_dir is not None:
        extra["distributed.storage_path"] = f"{sweep_dir}/trials"
    return with_values(cfg, extra)


def run_trial(config: dict[str, Any]) -> None:
    """The Tune function: one TorchTrainer run, its reports forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from nitro_dist.distributed.ray_train import make_trainer

    base = config_from_dict(config["__base__"])
    params = {k: v for k, v in config.items() if not k.startswith("__")}
    cfg = trial_config(base, params, config["__sweep_dir__"])
    trainer, _, _ = make_trainer(cfg, callbacks=[TuneReportCallback()])
    trainer.fit()


def sweep(cfg: Config) -> dict[str, Any]:
    """Run (or resume) the sweep; returns paths and the best trial's values."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from nitro_dist.distributed.ray_train import connect, resolve_storage

    check_space(cfg)
    cfg = pick_metric(cfg)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # log-only reports
    connect(cfg)
    storage = resolve_storage(cfg.tune.storage_path)
    name = f"{cfg.run_name}-sweep"
    sweep_dir = f"{storage}/{name}"
    t = cfg.tune
    trainable = tune.with_resources(run_trial, TRIAL_RESOURCES)
    if tune.Tuner.can_restore(sweep_dir):
        print(f"resuming the sweep in {sweep_dir}", flush=True)
        tuner = tune.Tuner.restore(sweep_dir, trainable, resume_errored=True)
    else:
        space = {**param_space(cfg), "__base__": to_dict(cfg), "__sweep_dir__": sweep_dir}
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=t.metric,
                mode=t.mode,
                num_samples=t.num_samples,
                max_concurrent_trials=t.max_concurrent,
                scheduler=ASHAScheduler(
                    time_attr="iteration",
                    max_t=max(cfg.train.iterations, 1),
                    grace_period=min(t.grace_period, max(cfg.train.iterations, 1)),
                    reduction_factor=t.reduction_factor,
                ),
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage),
        )
    grid = tuner.fit()
    return write_results(cfg, grid, Path(sweep_dir))


def write_results(cfg: Config, grid, out: Path) -> dict[str, Any]:
    t, keys = cfg.tune, list(cfg.tune.search_space)
    # the metric at a trial's last evaluation, and its 2- and 4-step siblings when reported
    siblings = [t.metric] + [
        t.metric.replace("_1step", f"_{k}step") for k in (2, 4) if "_1step" in t.metric
    ]
    rows = []
    for result in grid:
        if result.metrics_dataframe is None or t.metric not in result.metrics_dataframe:
            continue
        series = result.metrics_dataframe[t.metric].dropna()
        if series.empty:
            continue
        best = series.min() if t.mode == "min" else series.max()
        params = {k: result.config[k] for k in keys}
        df = result.metrics_dataframe
        last = df.loc[series.index[-1]]  # the trial's last evaluation (where ASHA left it)
        rows.append(
            {
                **params,
                t.metric: float(best),
                "last_iteration": int(df["iteration"].max()),
                **{f"last_{m}": float(last[m]) for m in siblings if m in df and last[m] == last[m]},
            }
        )
    if not rows:
        raise RuntimeError(f"no trial reported {t.metric}; check tune.metric and train.eval_every")
    rows.sort(key=lambda r: r[t.metric], reverse=t.mode == "max")
    out.mkdir(parents=True, exist_ok=True)
    import csv

    with (out / "results.csv").open("w", newline="") as f:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # a column any trial has
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, keys, t.metric, out / "metric.png")
    best = {k: rows[0][k] for k in keys}
    best_cfg = with_values(trial_config(cfg, best), {"run_name": f"{cfg.run_name}-best"})
    (out / "best.yaml").write_text(dump_yaml(best_cfg))
    return {"dir": str(out), "rows": rows, "best": best, "best_yaml": str(out / "best.yaml")}


def plot(rows: list[dict], keys: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        ax.scatter([r[key] for r in rows], [r[metric] for r in rows])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m nitro_dist.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", default="digits", help="preset name or YAML (with a tune section)")
    ap.add_argument("--num-samples", type=int, default=None, help="overrides tune.num_samples")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"tune.num_samples={args.num_samples}")
    try:
        cfg = pick_metric(load_config(args.config, overrides))
        check_space(cfg)
        check_ray_address()  # before Ray Tune's imports: a wrong address fails at once
        print(f"tune.metric: {cfg.tune.metric} ({cfg.tune.mode})", flush=True)
        out = sweep(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row in out["rows"]:
        print(json.dumps(row))
    print(f"best: {out['best']} -> {out['best_yaml']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
