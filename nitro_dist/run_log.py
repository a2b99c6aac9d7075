"""What a training run tells its user: progress lines on stdout, metrics.jsonl, wandb."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nitro_dist.config import Config, to_dict


def say(line: str) -> None:
    """One line to stdout (job logs). Not print(): Ray Train patches print into its logger,
    which shows every line twice in the driver's output."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet_libraries() -> None:
    """Library chatter off, warnings that matter kept: one progress line per ``train.log_every``
    is what the console should show. Called in the driver and first thing in each worker."""
    os.environ.setdefault("WANDB_SILENT", "true")  # wandb's ~30 lines per run
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars
    if "deepspeed" not in sys.modules:  # read at import: "Setting accelerator to CPU" warning
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # e.g. "accelerate was not found"
    transformers.utils.logging.set_verbosity_error()
    # Ray Train V2 echoes every ray.train.report as "Reporting training result N: ..." at INFO on
    # a logger named by its file path (outside "ray.train", so Train's LoggingConfig misses it)
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )  # "Token authentication is enabled" on every start (auth stays on)
    # torch's CUDA build on a CPU machine, when DeepSpeed loads its CPU shared-memory op:
    # "No CUDA runtime is found, using CUDA_HOME=..." once per rank
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


@contextlib.contextmanager
def drop_printed_lines(*prefixes: str) -> Iterator[None]:
    """Lines the block prints to stdout that start with one of ``prefixes`` are dropped, the
    rest are written out when it ends (libraries that announce with a bare print)."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        kept = [x for x in buf.getvalue().splitlines(keepends=True) if not x.startswith(prefixes)]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


def progress_line(done: int, total: int, m: dict[str, float]) -> str:
    lr = f" g_lr={m['g_lr']:.2e}" if "g_lr" in m else ""  # G's lr, when a schedule sets it
    return (
        f"[iteration {done}/{total}] g_loss={m['g_loss']:.4f} d_loss={m['d_loss']:.4f} "
        f"d_acc={m['d_acc_real']:.2f}/{m['d_acc_fake']:.2f} t*={m['t_star']:g}{lr} "
        f"refreshed={m['refreshed_heads']} images/s={m['images_per_s']:.1f}"
    )


class MetricsLogger:
    """metrics.jsonl always; wandb (offline by default) when ``logging.wandb`` is on."""

    def __init__(self, run_dir: Path, cfg: Config) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.project,
                name=cfg.run_name,
                dir=str(run_dir),
                mode=cfg.logging.wandb_mode,
                config=to_dict(cfg),
                resume="allow",
            )

    def log(self, iteration: int, images_seen: int, metrics: dict[str, Any]) -> None:
        if not metrics:
            return
        row = {"iteration": iteration, "images_seen": images_seen, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=iteration)

    def images(self, iteration: int, paths: list[Path]) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log(
                {p.stem.split("_")[-1]: wandb.Image(str(p)) for p in paths}, step=iteration
            )

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
