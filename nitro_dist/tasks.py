"""What a run is about: its prompts, its own models, its evaluation (STYLE.md 13).

The core (loop, checkpoints, evaluation, serving) knows tasks only through ``Task``; the built-in
digits task lives in ``nitro_dist/digits/`` and is found by name like any other, through the
``nitro_dist.tasks`` entry-point group (pyproject.toml) or a ``package.module:Class`` path, so
nothing outside ``nitro_dist/digits/`` imports it.

Any run that is not a built-in task uses ``task: prompts``: grids and evaluation draw on
``train.sample_prompts`` (a list, or a prompt file), and its training prompts come from shards.

When the config names local metric weights (``eval.inception``, ``eval.clip``), ``task_of``
wraps the task in ``WithImageMetrics``: every evaluation of the run (training's, the eval CLI's)
then also reports ``fid_teacher`` (student against teacher images) and ``clip_score``, whatever
the task, and ``python -m nitro_dist.tune`` can watch them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from nitro_dist.data.prompts import read_prompts

if TYPE_CHECKING:
    from nitro_dist.config import Config
    from nitro_dist.image_metrics import TeacherComparison

ENTRY_POINT_GROUP = "nitro_dist.tasks"
EVAL_SEED_OFFSET = 10_000_000  # evaluation never reuses a training seed
TRAIN_SEED_OFFSET = 1_000_000  # built-in training prompts use noise seeds offset + i

# prompts, seeds, steps -> images N x C x H x W in [-1, 1] (inference.Generator is one)
GenerateFn = Callable[[list[str], list[int], int], torch.Tensor]


@runtime_checkable
class Task(Protocol):
    name: str

    def model_dir(self) -> Path | None:
        """The task's own diffusers folder (``model.source=task``), or None when it has none."""
        ...

    def train_prompts(self, n: int) -> list[str]:
        """``n`` training prompts for ``data.source=task`` (prompts made in memory)."""
        ...

    def sample_prompts(self) -> list[str]:
        """One grid row per prompt."""
        ...

    def eval_prompts(self, n: int) -> list[str]:
        """The prompts of ``n`` evaluation images."""
        ...

    def metrics(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Quality figures of generated images (N x C x H x W in [-1, 1]) for their prompts."""
        ...


class PromptTask:
    """Any run without a built-in task: prompts from ``train.sample_prompts``, no models of its
    own, training prompts from shards. Its metrics need no weights: ``diversity`` (mean pixel
    distance between images of the same prompt from different seeds; 0 = the seed is ignored,
    mode collapse) and ``pixel_std``. FID against the teacher and CLIP score come with the
    weights the user supplies (``eval.inception``, ``eval.clip``: ``WithImageMetrics``)."""

    name = "prompts"

    def __init__(self, sample_prompts: list[str]) -> None:
        self.prompts = list(sample_prompts)

    def model_dir(self) -> Path | None:
        return None

    def train_prompts(self, n: int) -> list[str]:
        raise ValueError(
            "data.source=task: task 'prompts' has no built-in training prompts; set "
            "data.source=shards and data.shards (python -m nitro_dist.data.write_shards makes them)"
        )

    def sample_prompts(self) -> list[str]:
        if not self.prompts:
            raise ValueError(
                "train.sample_prompts: task 'prompts' needs prompts for its sample grids and "
                "evaluation (a list, or a .txt/.jsonl/.csv/.parquet prompt file)"
            )
        return self.prompts

    def eval_prompts(self, n: int) -> list[str]:
        prompts = self.sample_prompts()
        return [prompts[i % len(prompts)] for i in range(n)]

    def metric_names(self) -> list[str]:
        """What ``metrics`` reports (diversity only when a prompt has two images)."""
        return ["pixel_std", "diversity"]

    def metrics(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        flat = images.flatten(1).double()
        by_prompt: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            by_prompt.setdefault(p, []).append(i)
        dists = [
            torch.pdist(flat[idx]).mean() / flat.shape[1] ** 0.5
            for idx in by_prompt.values()
            if len(idx) > 1
        ]
        out = {"pixel_std": float(images.double().std())}
        if dists:
            out["diversity"] = float(torch.stack(dists).mean())
        return out


def task_names() -> list[str]:
    return sorted({"prompts", *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def load_task(name: str, sample_prompts: Sequence[str] | str = ()) -> Task:
    """The task called ``name`` (an entry point of ``nitro_dist.tasks``, ``prompts``, or a
    ``package.module:Class`` path), made with the run's sample prompts (a list or a file)."""
    prompts = _read_sample_prompts(sample_prompts)
    if name == "prompts":
        return PromptTask(prompts)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"task: cannot load {name!r} ({e})") from None
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise ValueError(
                f"task: no task named {name!r}; known: {', '.join(task_names())} (or a "
                "package.module:Class path; a fresh checkout needs `pip install -e .` to register "
                "the built-in tasks)"
            )
        cls = found[0].load()
    task = cls(prompts)
    if not isinstance(task, Task):
        raise ValueError(f"task: {name!r} does not implement nitro_dist.tasks.Task")
    return task


class WithImageMetrics:
    """``task`` with the task-free image metrics of ``comparison`` added to its own:
    ``fid_teacher`` and/or ``clip_score`` (nitro_dist.image_metrics.TeacherComparison)."""

    def __init__(self, task: Task, comparison: TeacherComparison) -> None:
        self.task, self.comparison, self.name = task, comparison, task.name

    def model_dir(self) -> Path | None:
        return self.task.model_dir()

    def train_prompts(self, n: int) -> list[str]:
        return self.task.train_prompts(n)

    def sample_prompts(self) -> list[str]:
        return self.task.sample_prompts()

    def eval_prompts(self, n: int) -> list[str]:
        return self.task.eval_prompts(n)

    def metrics(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        return {**self.task.metrics(images, prompts), **self.comparison(images, prompts)}

    def metric_names(self) -> list[str] | None:
        """None when the inner task does not list its own (e.g. digits)."""
        names = getattr(self.task, "metric_names", None)
        return None if names is None else [*names(), *self.comparison.metric_names()]


def task_of(cfg: Config) -> Task:
    """The run's task; with ``eval.inception`` / ``eval.clip`` set, wrapped in
    ``WithImageMetrics`` (the weights are checked now, loaded at the first evaluation)."""
    task = load_task(cfg.task, cfg.train.sample_prompts)
    if cfg.eval.inception or cfg.eval.clip:
        from nitro_dist.image_metrics import TeacherComparison

        task_dir = task.model_dir() if cfg.model.source == "task" else None
        comparison = TeacherComparison.from_config(cfg, EVAL_SEED_OFFSET, task_dir)
        assert comparison is not None  # a path is set
        return WithImageMetrics(task, comparison)
    return task


def _read_sample_prompts(spec: Sequence[str] | str) -> list[str]:
    if isinstance(spec, str):
        if not spec:
            return []
        return read_prompts(spec, "prompt", what="train.sample_prompts")
    return [str(p) for p in spec]


def evaluate_steps(
    task: Task,
    generate: GenerateFn,
    num_images: int,
    steps: tuple[int, ...] = (1, 2, 4),
    seed: int = 0,
) -> dict[str, float]:
    """The task's metrics of ``num_images`` evaluation images at each step count, as
    ``{metric}_{k}step``; the same seeds at every step count."""
    prompts = task.eval_prompts(num_images)
    seeds = [EVAL_SEED_OFFSET + seed + i for i in range(num_images)]
    out: dict[str, float] = {}
    for k in steps:
        for name, value in task.metrics(generate(prompts, seeds, k), prompts).items():
            out[f"{name}_{k}step"] = value
    return out
