"""The training loop: build the run, iterate, log, sample, evaluate, checkpoint.

``train`` runs on one process (``LocalSession``) or as a Ray Train worker
(``nitro_dist.distributed.ray_train.RaySession`` shards the pool and wraps G in DeepSpeed); this
module never imports ray or deepspeed, so the library runs without them.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from nitro_dist import checkpoint as ckpt
from nitro_dist import checkpoint_layout as layout
from nitro_dist.build import Run, build_run
from nitro_dist.config import Config, dump_yaml
from nitro_dist.distributed.owners import owned_by, owner_map
from nitro_dist.images import save_sample_grids
from nitro_dist.init_stage import one_step_init
from nitro_dist.run_log import MetricsLogger, progress_line, say
from nitro_dist.step import train_step
from nitro_dist.tasks import evaluate_steps


class Session(Protocol):
    """How this process takes part in a run: ``LocalSession`` (one process) or
    ``distributed.ray_train.RaySession`` (a Ray Train worker)."""

    rank: int
    world_size: int

    def restore(
        self, resume: str | Path | None, parts: list[str]
    ) -> contextlib.AbstractContextManager[Path | None]:
        """The checkpoint to continue from, if any (a local folder while the context lasts,
        holding at least ``parts``: what this rank reads)."""
        ...

    def parallelize(self, run: Run) -> None: ...

    def check_fault(self, iteration: int) -> None: ...

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]: ...

    def report(self, metrics: dict[str, Any]) -> None: ...

    def save(self, run: Run, metrics: dict[str, Any]) -> Any: ...

    def has_checkpoint(self, iteration: int) -> bool: ...

    def sync(self) -> None: ...


class LocalSession:
    """One process: checkpoints committed into ``run_dir/checkpoints`` with a ``latest`` pointer.

    ``distributed.ray_train.RaySession`` is the same interface for Ray Train workers: it shards
    the pool, wraps G in DeepSpeed and reports checkpoints to Ray Train.
    """

    rank, world_size = 0, 1

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir, self.root, self.keep = run_dir, run_dir / "checkpoints", keep

    @contextlib.contextmanager
    def restore(self, resume: str | Path | None, parts: list[str]) -> Iterator[Path | None]:
        """``resume`` as given, else the newest checkpoint of this run that verifies."""
        yield Path(resume) if resume is not None else layout.latest(self.root, parts=parts)

    def parallelize(self, run: Run) -> None:
        pass  # the pool and G as build_run made them

    def check_fault(self, iteration: int) -> None:
        pass

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def report(self, metrics: dict[str, Any]) -> None:
        pass

    def save(self, run: Run, metrics: dict[str, Any]) -> Path:
        it = run.state["iteration"]
        tmp = layout.begin(self.root, it)
        try:
            if run.cfg.distributed.disk_full_at_iteration == it:
                ckpt.inject_disk_full(tmp)
            ckpt.write_checkpoint(run.checkpoint_parts(), tmp)
        except Exception as e:
            ckpt.failed_write(tmp, self.root, e)  # a full disk: DiskFullError
            raise
        return layout.commit(self.root, tmp, it, self.keep)

    def has_checkpoint(self, iteration: int) -> bool:
        found = layout.latest(self.root)
        return found is not None and found.name == layout.checkpoint_name(iteration)

    def sync(self) -> None:
        pass  # run files are written in place


def samples(run: Run, unet: torch.nn.Module, folder: Path, tag: str) -> list[Path]:
    """Sample grids of ``unet`` (``run.sampling_unet``: every rank reads it, collective under
    ZeRO-3) at 1, 2 and 4 steps, one row per sample prompt; rank 0 calls this."""
    gen = run.generator(unet)
    return save_sample_grids(
        gen, run.task.sample_prompts(), run.cfg.train.grid_per_prompt, folder, tag
    )


def evaluate(run: Run, unet: torch.nn.Module) -> dict[str, float]:
    """The task's metrics of ``unet`` at 1, 2 and 4 steps on ``train.eval_images`` images."""
    return evaluate_steps(run.task, run.generator(unet), run.cfg.train.eval_images)


def train(
    cfg: Config,
    run_dir: Path,
    resume: str | Path | None = None,
    session: Session | None = None,
) -> dict[str, Any]:
    """Train; returns the final metrics. Rank 0 writes into ``run_dir``: config.yaml,
    metrics.jsonl, samples/*.png, final_metrics.json (and, single-process, checkpoints/).
    ``session`` = how this process takes part (default: ``LocalSession``, one process)."""
    session = session if session is not None else LocalSession(run_dir, cfg.train.keep_checkpoints)
    rank, world = session.rank, session.world_size
    lead = rank == 0
    progress = cfg.logging.progress and lead
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    run = build_run(
        cfg,
        rank=rank,
        world_size=world,
        owned_heads=None if world == 1 else [],
        progress=progress,
    )
    owned = owned_by(owner_map(run.layout, world), rank)  # the heads this rank will hold
    parts = ckpt.resume_parts(owned)
    init_metrics: dict[str, float] = {}
    with session.restore(resume, parts) as path:
        if path is not None:  # verified, then G before DeepSpeed wraps it
            run.state = ckpt.load_weights(path, run.models.student, run.ema, parts)
            if run.loader is not None:
                run.loader.seek(run.state.get("data_cursor"))
        else:  # a fresh run: the one-step starting stage (init.iterations; every rank alike)
            init_metrics = one_step_init(run)
            if init_metrics and lead:
                how = "loaded from the cache" if init_metrics["init_cached"] else "trained"
                say(
                    f"one-step init: {cfg.init.iterations} iterations, regression loss "
                    f"{init_metrics['init_loss_start']:.4f} -> {init_metrics['init_loss_end']:.4f}"
                    f", {how} in {init_metrics['init_seconds']:.0f}s"
                )
        session.parallelize(run)
        if path is not None:
            ckpt.load_states(path, run.g, run.pool.local)
            if lead:
                say(f"resumed from {path} at iteration {run.state['iteration']}")
    logger = MetricsLogger(run_dir, cfg) if lead else None
    if logger is not None:
        logger.log(0, 0, init_metrics)  # nothing when the stage did not run
    tr = cfg.train
    if run.state["iteration"] == 0 and tr.sample_every:
        unet = run.sampling_unet
        if lead:
            samples(run, unet, run_dir / "samples", "iter_000000")
    bar = tqdm(
        range(run.state["iteration"], tr.iterations),
        desc="distill",
        unit="it",
        initial=run.state["iteration"],
        total=tr.iterations,
        disable=not (progress and sys.stderr.isatty()),
    )
    t_last, n_last = time.time(), run.state["images_seen"]
    in_a_row = 0  # consecutive skipped (non-finite) steps
    for it in bar:
        session.check_fault(it)
        metrics = train_step(run, it)
        skipped = run.state.get("skipped_steps", 0) + int(metrics["skipped"])
        in_a_row = in_a_row + 1 if metrics["skipped"] else 0
        if metrics["skipped"] and lead:  # the flag is agreed over the ranks
            say(
                f"warning: iteration {it + 1}: NaN/inf loss or gradient, step skipped (G and the "
                f"heads unchanged; {skipped} skipped so far, {in_a_row} in a row of "
                f"train.max_nonfinite_steps={tr.max_nonfinite_steps})"
            )
        run.state = {
            "iteration": it + 1,
            "images_seen": run.state["images_seen"] + tr.batch_size,
            "skipped_steps": skipped,
        }
        if in_a_row >= tr.max_nonfinite_steps:  # the flag is agreed: every rank stops here
            raise ckpt.NonFiniteError(
                f"train.max_nonfinite_steps: {in_a_row} steps in a row (iterations "
                f"{it + 1 - in_a_row}..{it}) had a NaN/inf loss or gradient and were skipped; "
                f"stopping. G and the heads are as after iteration {it - in_a_row}; the last "
                "checkpoint holds finite weights. Lower optim.lr / pool.lr or optim.grad_clip, "
                "or check the data."
            )
        done, seen = it + 1, run.state["images_seen"]
        report: dict[str, Any] = {}
        if tr.log_every and done % tr.log_every == 0:
            metrics["skipped_steps"] = skipped
            if run.loader is not None:
                metrics.update(run.loader.metrics())
            metrics = session.reduce(metrics)
            now = time.time()
            metrics["images_per_s"] = (seen - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, seen
            report.update(metrics)
            if lead:
                assert logger is not None
                logger.log(done, seen, metrics)
                bar.set_postfix(
                    g=f"{metrics['g_loss']:.3f}",
                    d=f"{metrics['d_loss']:.3f}",
                    acc=f"{metrics['d_acc_real']:.2f}/{metrics['d_acc_fake']:.2f}",
                )
                if progress and bar.disable:  # job logs: one line per log interval
                    say(progress_line(done, tr.iterations, metrics))
        if tr.sample_every and done % tr.sample_every == 0:
            unet = run.sampling_unet
            if lead:
                assert logger is not None
                logger.images(done, samples(run, unet, run_dir / "samples", f"iter_{done:06d}"))
        if tr.eval_every and done % tr.eval_every == 0 and done < tr.iterations:
            unet = run.sampling_unet
            if lead:
                assert logger is not None
                ev = evaluate(run, unet)
                logger.log(done, seen, ev)
                report.update(ev)
        if tr.checkpoint_every and done % tr.checkpoint_every == 0 and done < tr.iterations:
            session.save(run, {"iteration": done, "images_seen": seen, **report})
            session.sync()
        elif report:
            session.report({"iteration": done, "images_seen": seen, **report})
    unet = run.sampling_unet
    final: dict[str, Any] = {
        "iteration": run.state["iteration"],
        "images_seen": run.state["images_seen"],
        "skipped_steps": run.state.get("skipped_steps", 0),
    }
    if lead:
        assert logger is not None
        logger.images(run.state["iteration"], samples(run, unet, run_dir / "samples", "final"))
        final.update(evaluate(run, unet))
        logger.log(run.state["iteration"], run.state["images_seen"], final)
        (run_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        logger.close()
    if not session.has_checkpoint(run.state["iteration"]):  # a rerun of a finished run: no
        final_dir = session.save(run, final)
    else:
        final_dir = None
        session.report(final)
    session.sync()
    if final_dir is not None:
        final["checkpoint"] = str(final_dir)
    return final
