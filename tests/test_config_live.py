"""Every config key is live (STYLE.md 3): changing it changes what is built, not just the config.

``KEYS`` maps every leaf key of ``Config`` to a ``Case``: a changed value, the probe that shows
its effect, the part of the probe's fingerprint that must change, and a context (keys set in the
base and the changed config alike, where the key only acts in some setting, e.g. data.num_workers
with data.source=shards). The key list comes from the dataclasses, so a new key without a row
fails ``test_every_leaf_key_has_a_probe``.

A probe runs product code on a config and fingerprints what it built, never the config object:

  run        build_run: models (weights, dtype, memory format, checkpointing, torch.compile
             backend), denoiser, teacher sampler, pool layout and heads, both AdamWs, EMA,
             training prompts, offline pairs, shard loader (the samples it yields), task
  step       one train_step: metrics, batch sizes the student is called with, G's gradient norm
             as its AdamW receives it, head-AdamW steps, weights after the step, files written
  loop       loop.train (2 iterations): metrics.jsonl rows, files of the run folder, progress
             lines on stdout
  samples    loop.samples: the sample grids (files and pixel sizes)
  eval       loop.evaluate: the task's metrics
  pool_sync  the sharded pool parallelize() makes for 2 ranks: its gradient buckets and hooks
             (no process group: the collectives are not run)
  trainer    ray_train.make_trainer: the TorchTrainer's ScalingConfig, TorchConfig and RunConfig
             (Ray is not started)
  deepspeed  g_update.deepspeed_config: the dict DeepSpeedUpdate hands deepspeed.initialize
  fault      RaySession.check_fault on every rank for iterations 0-2 (os._exit intercepted)
  tune       tune.sweep up to Tuner.fit (Tuner replaced by a recorder; Ray is not started):
             the TuneConfig, ASHA's rungs, the RunConfig, the search space
  logger     run_log.MetricsLogger with a recording stand-in for the wandb module
  storage    after build_run: a shard read from a closed port; the tries its retries made

Models come from ``models_of`` once per distinct (model section, seed, task, and the train keys
build_run applies to models) and are shared with the student's weights restored; build_run
itself runs for every probe. ``test_probe_is_deterministic`` recomputes each probe's base
fingerprint after all the others ran, so a difference is neither noise nor state leaking from
one probe into the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import shutil
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from threads import intra_op_threads

from nitro_dist import loop, lora, stage_cache
from nitro_dist.build import build_run, models_of
from nitro_dist.checkpoint import DiskFullError, NonFiniteError
from nitro_dist.config import Config, get_key, load_config, to_dict, with_values
from nitro_dist.diffusion import shifted
from nitro_dist.discriminator.pool import refresh_ids, sample_active

# ---------------------------------------------------------------------------------------------
# the key table


pytestmark = pytest.mark.slow  # ~100 builds and short runs: make test runs it, test-fast not


@dataclass(frozen=True)
class Case:
    value: Any  # the changed value; strings may name fixture paths: "{shards_a}"
    probe: str
    # the fingerprint entries that must change; "error": the probe refuses the value with a
    # ValueError naming the key (any other probe failure fails the test)
    part: str | tuple[str, ...]
    context: dict[str, Any] = field(default_factory=dict)  # set in base and changed alike


SHARDS = {  # data.source=shards with in-process reading (a loader worker costs a process)
    "data.source": "shards",
    "data.shards": "{shards_a}",
    "data.num_workers": 0,
}
OFFLINE = {"teacher.mode": "offline", "teacher.offline_pairs": 8, "teacher.batch_size": 8}
PROMPT_TASK = {**SHARDS, "task": "prompts", "train.sample_prompts": ["a cat", "a dog"]}


def _cleanfid_imports() -> bool:
    try:
        import cleanfid.fid  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or torchvision failing inside it
        return False
    return True


# eval.inception: FID needs clean-fid (torchvision); without it the build refuses the key
INCEPTION_PART = "metrics" if _cleanfid_imports() else "error"
WANDB = {"logging.wandb": True}
COMPILE = {"train.compile": True}

KEYS: dict[str, Case] = {
    "seed": Case(1, "run", ("student", "heads", "train_set")),
    "run_name": Case("other", "trainer", "run_config"),
    "task": Case("prompts", "run", "task", {**SHARDS, "train.sample_prompts": ["a cat"]}),
    # model
    "model.source": Case("task", "run", "teacher", {"pool.levels": [0]}),
    "model.teacher_path": Case(
        "{alt_teacher}",
        "run",
        "teacher",
        {"model.source": "diffusers", "model.teacher_path": "{digits}", "pool.levels": [0]},
    ),
    "model.student_path": Case(
        "{alt_teacher}/unet", "run", "student", {"model.source": "task", "pool.levels": [0]}
    ),
    "model.config_path": Case(  # the single file's configs: here its scheduler's beta_end
        "{sdxl_configs_b}",
        "run",
        ("denoiser", "teacher_sampler"),
        {
            "model.source": "diffusers",
            "model.teacher_path": "{sdxl_file}",
            "model.config_path": "{sdxl_configs}",
        },
    ),
    "model.use_vae": Case(True, "run", "vae"),
    "model.gradient_checkpointing": Case(True, "run", "student"),
    # student: LoRA adapters (rank 0 = the whole student trains)
    "student.lora.rank": Case(4, "run", "student"),
    "student.lora.alpha": Case(16, "step", "g_grad_norm_at_step", {"student.lora.rank": 4}),
    "student.lora.target_modules": Case(["to_q"], "run", "student", {"student.lora.rank": 4}),
    # sampler
    "sampler.shift": Case(250, "run", ("denoiser", "student_scheduler")),
    "sampler.original_inference_steps": Case(8, "run", ("denoiser", "student_scheduler")),
    # teacher
    "teacher.mode": Case("offline", "run", "x0_offline", {"teacher.offline_pairs": 8}),
    "teacher.scheduler": Case("DDIMScheduler", "run", "teacher_sampler", {"teacher.timesteps": []}),
    "teacher.scheduler_overrides": Case(
        {"timestep_spacing": "leading"}, "run", "teacher_sampler", {"teacher.timesteps": []}
    ),
    "teacher.num_steps": Case(2, "run", "teacher_sampler", {"teacher.timesteps": []}),
    "teacher.guidance_scale": Case(3.0, "run", "teacher_sampler"),
    "teacher.timesteps": Case([999, 499], "run", "teacher_sampler"),
    "teacher.offline_pairs": Case(32, "run", "train_set"),
    "teacher.batch_size": Case(4, "run", "teacher_batches", OFFLINE),
    # a DDIM teacher whose last step ends at abar_0 < 1 (LCM returns its clean x0 anyway)
    "teacher.clean_x0": Case(
        True,
        "run",
        "x0_offline",
        {**OFFLINE, "teacher.scheduler": "DDIMScheduler", "teacher.timesteps": []},
    ),
    # init
    "init.iterations": Case(2, "step", ("init", "student")),
    "init.lr": Case(1e-2, "step", ("init", "student"), {"init.iterations": 2}),
    "init.steps": Case([2], "step", ("init", "student"), {"init.iterations": 2}),
    # the stage's result kept in the stage cache (a second run loads it: tests/test_init_stage.py)
    "init.cache": Case(False, "step", "stage_cache", {"init.iterations": 2}),
    # refinement
    "refinement.enable_at": Case([0, 1, 1, 1], "step", "student_batches"),
    "refinement.k_weights": Case([4, 1, 1, 1], "step", "student"),  # other k drawn
    # pool
    "pool.kinds": Case(["global_cond"], "run", "layout"),
    "pool.t_buckets": Case([10, 250, 750], "run", "layout"),
    "pool.t_jitter": Case(9, "step", "metrics"),
    "pool.t_star_per": Case("sample", "step", "metrics"),  # more heads active, t* per sample
    "pool.levels": Case([0, 1], "run", "layout"),
    "pool.candidates": Case(3, "run", "layout"),
    "pool.heads_per_slot": Case(2, "step", "metrics"),
    "pool.refresh_rate": Case(1.0, "step", "metrics"),
    # every head refreshed after the step, or only the active ones
    "pool.refresh_by": Case("use", "step", "metrics", {"pool.refresh_rate": 1.0}),
    "pool.width": Case(4, "run", "heads"),
    "pool.width_ratio": Case(1.0, "run", "heads"),  # level 0 has 16 channels: width 16, not 8
    "pool.depth": Case(3, "run", "heads"),
    "pool.crop_frac": Case(1.0, "run", "layout"),  # the crop the local heads see
    "pool.lr": Case(1e-3, "run", "pool_optimizer"),
    "pool.betas": Case([0.5, 0.9], "run", "pool_optimizer"),
    "pool.weight_decay": Case(0.1, "run", "pool_optimizer"),
    "pool.fused": Case(True, "run", "pool_optimizer"),
    "pool.state_bits": Case(8, "run", "pool_optimizer"),
    "pool.overlap_comm": Case(False, "pool_sync", "buckets", {"pool.bucket_mb": 1e-4}),
    "pool.bucket_mb": Case(1e-4, "pool_sync", "buckets"),
    # loss
    "loss.type": Case("non_saturating", "step", "metrics"),
    "loss.g_weight": Case(2.0, "step", "metrics"),  # g_grad_norm: before clipping
    "loss.regression_weight": Case(1.0, "step", "metrics"),  # g_loss, g_grad_norm
    # optim
    "optim.lr": Case(1e-3, "run", "g_optimizer"),
    "optim.betas": Case([0.5, 0.9], "run", "g_optimizer"),
    "optim.weight_decay": Case(0.1, "run", "g_optimizer"),
    "optim.grad_clip": Case(1e-3, "step", "g_grad_norm_at_step"),
    "optim.ema_decay": Case(0.5, "step", "ema"),
    # iteration 0 of a warm-up: decay 0, the EMA takes G's weights
    "optim.ema_warmup_iterations": Case(5, "step", "ema", {"optim.ema_decay": 0.5}),
    # iteration 0 of 1: cosine at the midpoint halves the lr; warm-up over 2 halves it too
    "optim.lr_schedule": Case("cosine", "step", ("g_lr", "student"), {"train.iterations": 1}),
    "optim.warmup_iterations": Case(2, "step", ("g_lr", "student")),
    "optim.d_steps_per_g_step": Case(2, "step", "head_optimizer_steps"),
    "optim.fused": Case(True, "run", "g_optimizer"),
    "optim.state_bits": Case(8, "run", "g_optimizer"),
    "optim.offload": Case("cpu", "deepspeed", "config", {"distributed.zero_stage": 2}),
    # data
    "data.source": Case(
        "shards", "run", "loader", {"data.shards": "{shards_a}", "data.num_workers": 0}
    ),
    "data.shards": Case("{shards_b}", "run", "loader", SHARDS),
    "data.caption_key": Case("txt", "run", "loader", {**SHARDS, "data.shards": "{shards_c}"}),
    "data.num_workers": Case(2, "run", "loader", SHARDS),
    "data.shuffle_buffer": Case(1, "run", "loader", SHARDS),
    "data.audit_dir": Case("audit", "step", "files", SHARDS),
    # train
    "train.iterations": Case(1, "loop", "metrics_rows"),
    "train.batch_size": Case(4, "step", "student_batches"),
    # the device "auto" does not pick; without CUDA the build refuses cuda, naming train.device
    "train.device": Case("cpu", "run", "device")
    if torch.cuda.is_available()
    else Case("cuda", "run", "error"),
    "train.precision": Case("bf16", "run", ("teacher", "text")),
    "train.num_threads": Case(torch.get_num_threads() + 1, "run", "threads"),
    "train.log_every": Case(2, "loop", "metrics_rows"),
    "train.sample_every": Case(1, "loop", "files"),
    "train.grid_per_prompt": Case(2, "samples", "grids"),
    "train.sample_prompts": Case(["a cat", "a dog"], "samples", "grids"),
    "train.eval_every": Case(1, "loop", "metrics_rows"),
    "train.eval_images": Case(12, "eval", "metrics", PROMPT_TASK),
    "eval.inception": Case("{inception}", "eval", INCEPTION_PART, PROMPT_TASK),
    "eval.clip": Case("{clip}", "eval", "metrics", PROMPT_TASK),
    "train.checkpoint_every": Case(0, "loop", "files"),
    "train.keep_checkpoints": Case(1, "loop", "files"),
    "train.max_nonfinite_steps": Case(1, "loop", "stopped", {"distributed.nan_at_iterations": [0]}),
    "train.grad_accum": Case(2, "step", "student_batches"),
    "train.channels_last": Case(True, "run", "student"),
    "train.compile": Case(True, "run", "student"),
    "train.compile_backend": Case("aot_eager", "run", "student", COMPILE),
    "train.compile_mode": Case("max-autotune", "run", "student", COMPILE),
    # distributed
    "distributed.num_workers": Case(2, "trainer", "scaling"),
    "distributed.use_gpu": Case(True, "trainer", "scaling"),
    "distributed.cpus_per_worker": Case(0.5, "trainer", "scaling"),
    "distributed.gpus_per_worker": Case(0.5, "trainer", "scaling", {"distributed.use_gpu": True}),
    "distributed.resources_per_worker": Case({"special": 1}, "trainer", "scaling"),
    "distributed.placement_strategy": Case("SPREAD", "trainer", "scaling"),
    "distributed.zero_stage": Case(2, "deepspeed", "config"),
    "distributed.storage_path": Case("elsewhere", "trainer", "run_config"),
    "distributed.max_failures": Case(3, "trainer", "run_config"),
    "distributed.fail_at_iteration": Case(1, "fault", "exits"),
    "distributed.fail_rank": Case(
        1, "fault", "exits", {"distributed.num_workers": 2, "distributed.fail_at_iteration": 1}
    ),
    "distributed.node_loss_at_iteration": Case(1, "fault", "exits"),
    "distributed.nan_at_iterations": Case([0], "step", "metrics"),
    "distributed.disk_full_at_iteration": Case(1, "loop", ("stopped", "files")),
    # storage
    "storage.retries": Case(1, "storage", "attempts"),
    "storage.retry_max_s": Case(0.0, "storage", "attempts"),
    # tune
    "tune.metric": Case("fid_digits_4step", "tune", "tune_config"),
    "tune.mode": Case("max", "tune", "tune_config"),
    "tune.num_samples": Case(3, "tune", "tune_config"),
    "tune.search_space": Case({"pool.width": {"choice": [4, 8]}}, "tune", "param_space"),
    "tune.grace_period": Case(50, "tune", "asha"),
    "tune.reduction_factor": Case(4, "tune", "asha"),
    "tune.max_concurrent": Case(2, "tune", "tune_config"),
    "tune.storage_path": Case("sweeps", "tune", "run_config"),
    # logging
    "logging.wandb": Case(True, "logger", "wandb"),
    "logging.wandb_mode": Case("disabled", "logger", "wandb", WANDB),
    "logging.project": Case("elsewhere", "logger", "wandb", WANDB),
    "logging.progress": Case(True, "loop", "stdout"),
}


def leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every leaf of the config tree, dotted (dicts and lists are leaves)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(leaf_keys(tp, f"{prefix}{f.name}."))
        else:
            out.append(prefix + f.name)
    return out


def test_every_leaf_key_has_a_probe():
    keys = leaf_keys()
    assert len(keys) == len(set(keys))
    missing = [k for k in keys if k not in KEYS]
    stale = [k for k in KEYS if k not in keys]
    assert not missing, f"config keys without a probe in KEYS (or remove the key): {missing}"
    assert not stale, f"KEYS rows for keys the config no longer has: {stale}"


# ---------------------------------------------------------------------------------------------
# fingerprints


def digest(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def plain(x: Any) -> Any:
    """JSON-like, floats to 6 significant digits (exact comparisons of equal runs)."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set | frozenset):
        items = [plain(v) for v in x]
        return sorted(items, key=repr) if isinstance(x, set | frozenset) else items
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() <= 16 else digest([x])
    if isinstance(x, float):
        return x if not math.isfinite(x) or x == 0 else float(f"{x:.6g}")
    if isinstance(x, bool | int | str) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    return repr(x)


def scrub(x: Any, root: str) -> Any:
    """Scratch paths differ between calls: the fingerprint names them <scratch>."""
    if isinstance(x, dict):
        return {k: scrub(v, root) for k, v in x.items()}
    if isinstance(x, list):
        return [scrub(v, root) for v in x]
    if isinstance(x, str):
        return x.replace(root, "<scratch>")
    return x


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def hyperparameters(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    keys = ("lr", "betas", "weight_decay", "eps", "amsgrad", "fused")
    return [{"class": type(opt).__name__, **{k: g.get(k) for k in keys}} for g in opt.param_groups]


def grad_norm(opt: torch.optim.Optimizer) -> float:
    grads = [p.grad.flatten() for g in opt.param_groups for p in g["params"] if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def compiled_backend(module: torch.nn.Module) -> Any:
    """The torch.compile backend and options ``module.compile`` installed (None: not compiled),
    read from the compiled callable (dynamo wraps the backend in a few layers)."""
    fn = getattr(module, "_compiled_call_impl", None)
    if fn is None:
        return None
    backend = inspect.getclosurevars(fn).nonlocals.get("callback")
    for _ in range(8):
        if backend is None or hasattr(backend, "_compiler_name"):
            break
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    if backend is None:
        return "compiled (backend not found: torch's wrappers changed, update compiled_backend)"
    return {"backend": backend._compiler_name, "options": getattr(backend, "config", None)}


def module_state(m: torch.nn.Module) -> dict[str, Any]:
    params = list(m.parameters())
    conv = next(p for p in params if p.ndim == 4)
    return {
        "class": type(m).__name__,
        # diffusers adds _class_name/_diffusers_version to the config when it saves one
        "config": {k: v for k, v in getattr(m, "config", {}).items() if not k.startswith("_")},
        "weights": digest(params),
        "dtype": str(params[0].dtype),
        "channels_last": conv.is_contiguous(memory_format=torch.channels_last)
        and not conv.is_contiguous(),
        "checkpointing": getattr(m, "is_gradient_checkpointing", None),
        "compiled": compiled_backend(m),
    }


# ---------------------------------------------------------------------------------------------
# models, built once per distinct input of models_of (plus what build_run does to them)

_MODELS: dict[str, tuple[Any, dict[str, torch.Tensor]]] = {}


def shared_models(cfg: Config):
    t = cfg.train
    key = json.dumps(
        [
            to_dict(cfg.model),
            to_dict(cfg.student),  # build_run adds a LoRA student's adapters to these models
            cfg.seed,
            cfg.task if cfg.model.source == "task" else None,  # its model_dir() is read then
            t.precision,
            t.channels_last,
            t.compile,
            t.compile_backend,
            t.compile_mode,
        ],
        sort_keys=True,
    )
    if key not in _MODELS:
        models = models_of(cfg)
        if cfg.student.lora.rank:  # as build_run does: the initial state includes the adapters
            lora.add_adapters(models.student, cfg.student.lora, cfg.seed)
        _MODELS[key] = (models, {k: v.clone() for k, v in models.student.state_dict().items()})
    models, initial = _MODELS[key]
    models.student.load_state_dict(initial)
    models.student.zero_grad(set_to_none=True)
    models.student.train()
    return models


def build(cfg: Config):
    return build_run(cfg, progress=False, models=shared_models(cfg))


@contextlib.contextmanager
def batch_sizes(modules: dict[str, torch.nn.Module]):
    """Records the batch size of every forward call of ``modules``."""
    seen: dict[str, list[int]] = {name: [] for name in modules}

    def recorder(name):
        def hook(_, args, kwargs):
            x = args[0] if args else kwargs["sample"]
            seen[name].append(int(x.shape[0]))

        return hook

    hooks = [m.register_forward_pre_hook(recorder(n), with_kwargs=True) for n, m in modules.items()]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------------------------
# probes: config -> fingerprint of what was built


def probe_run(cfg: Config, scratch: Path) -> dict[str, Any]:
    models = shared_models(cfg)
    with batch_sizes({"teacher": models.teacher}) as seen:
        run = build_run(cfg, progress=False, models=models)
    m, d, ts = run.models, run.denoiser, run.teacher_sampler
    layout = run.layout
    evals = ts.unet_evals_per_sample()  # sets the scheduler's timesteps as sample() does
    out = {
        "device": str(run.device),
        "threads": torch.get_num_threads(),
        "teacher": module_state(m.teacher),
        "student": module_state(m.student),
        "text": {
            "weights": digest(m.text.parameters()),
            "dtype": str(next(m.text.parameters()).dtype),
        },
        "vae": None if m.vae is None else dict(m.vae.config),
        "image_hw": run.conds.image_hw,
        "denoiser": {
            "abar": digest([d.abar]),
            "told": [
                [(t, int(shifted(t, d.shift, d.num_train_timesteps))) for t in d.timesteps(n)]
                for n in range(1, d.original_steps + 1)
            ],
        },
        "student_scheduler": dict(run.scheduler.config),  # samples and the exported pipeline
        "teacher_sampler": {
            "class": type(ts.scheduler).__name__,
            "config": dict(ts.scheduler.config),
            "unet_evals_per_sample": evals,
            "timesteps": ts.scheduler.timesteps.tolist(),
        },
        "teacher_batches": seen["teacher"],
        "layout": {
            "kinds": layout.kinds,
            "t_buckets": layout.t_buckets,
            "levels": layout.levels,
            "num_heads": layout.num_heads,
            "specs": [dataclasses.astuple(layout.spec(h)) for h in range(layout.num_heads)],
        },
        "heads": {
            "numel": [
                sum(p.numel() for p in run.pool.local.head(h).parameters())
                for h in range(layout.num_heads)
            ],
            "weights": digest(run.pool.local.parameters()),
        },
        "pool_optimizer": hyperparameters(run.pool.local.optimizer),
        "g_optimizer": hyperparameters(run.g.optimizer),
        "ema": None if run.ema is None else digest(run.ema.parameters()),
        "train_set": None
        if run.train_set is None
        else {
            "n": len(run.train_set),
            "prompts": run.train_set.prompts[:12],
            "seeds": digest([run.train_set.seeds]),
        },
        "x0_offline": None
        if run.x0_offline is None
        else [list(run.x0_offline.shape), digest([run.x0_offline])],
        "loader": None,
        "task": {
            "name": run.task.name,
            "sample_prompts": run.task.sample_prompts(),
            "eval_prompts": run.task.eval_prompts(3),
        },
    }
    if run.loader is not None:
        n = run.loader.epoch_length(0)
        out["loader"] = {
            "urls": run.loader.shards.urls,
            "epoch_0": [(s.key, s.prompt) for s in run.loader.next_batch(n)],  # split + shuffle
        }
    return out


def probe_step(cfg: Config, scratch: Path) -> dict[str, Any]:
    from nitro_dist.init_stage import one_step_init
    from nitro_dist.step import train_step

    run = build(cfg)
    init = one_step_init(run)  # what loop.train runs first on a fresh run (init.iterations)
    init.pop("init_seconds", None)
    init.pop("init_cached", None)  # trained, or loaded when the probe runs again: the same G
    g_norms, head_steps = [], []
    g_lrs: list[float] = []
    run.g.optimizer.register_step_pre_hook(lambda opt, *_: g_norms.append(grad_norm(opt)))
    run.g.optimizer.register_step_pre_hook(lambda opt, *_: g_lrs.append(opt.param_groups[0]["lr"]))
    run.pool.local.optimizer.register_step_pre_hook(lambda opt, *_: head_steps.append(1))
    with batch_sizes({"student": run.models.student}) as seen:
        metrics = train_step(run, 0)
    return {
        "init": init,
        "metrics": metrics,
        "student_batches": seen["student"],
        "g_grad_norm_at_step": g_norms,  # what G's AdamW receives (after clipping)
        "g_lr": g_lrs,  # the lr G's AdamW steps with
        "head_optimizer_steps": len(head_steps),
        "student": digest(run.models.student.parameters()),
        "ema": None if run.ema is None else digest(run.ema.parameters()),
        "heads": digest(run.pool.local.parameters()),
        "files": files(scratch),
        # the kinds of entries in the probe's stage cache (fingerprint() gives each its own)
        "stage_cache": sorted(
            p.parent.name for p in stage_cache.cache_dir().rglob("*.safetensors")
        ),
    }


def probe_loop(cfg: Config, scratch: Path) -> dict[str, Any]:
    run_dir = scratch / "run"
    stdout = io.StringIO()
    fast_build = lambda c, **kw: build_run(c, models=shared_models(c), **kw)
    final: dict[str, Any] = {}
    stopped = None  # the run stopped itself (train.max_nonfinite_steps)
    with mock.patch.object(loop, "build_run", fast_build), contextlib.redirect_stdout(stdout):
        try:
            final = loop.train(cfg, run_dir)
        except (NonFiniteError, DiskFullError) as e:
            stopped = str(e).split(" (")[0]  # without the free space (it varies)
    log = run_dir / "metrics.jsonl"  # none when the run stopped before its first row
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {
        "metrics_rows": [(r["iteration"], r["images_seen"], sorted(r)) for r in rows],
        "final": sorted(final),
        "stopped": stopped,
        "files": files(run_dir),
        "stdout": [line.split("]")[0] for line in stdout.getvalue().splitlines()],
    }


def probe_samples(cfg: Config, scratch: Path) -> dict[str, Any]:
    from PIL import Image

    run = build(cfg)
    paths = loop.samples(run, run.sampling_unet, scratch / "samples", "probe")
    return {"grids": [(p.name, Image.open(p).size) for p in paths]}


def probe_eval(cfg: Config, scratch: Path) -> dict[str, Any]:
    run = build(cfg)
    return {"metrics": loop.evaluate(run, run.sampling_unet)}


def probe_pool_sync(cfg: Config, scratch: Path) -> dict[str, Any]:
    """What parallelize() makes of the pool on rank 0 of 2 (ShardedPool), and how it buckets
    the active heads' gradients (the all-reduces themselves need a process group)."""
    from nitro_dist.discriminator.pool import sample_active
    from nitro_dist.distributed.pool_sync import ShardedPool

    run = build(cfg)
    sp = ShardedPool(run.layout, cfg.pool, cfg.seed, 0, 2, run.device)
    draw = sample_active(run.layout, cfg.seed, 0, 1)
    heads = {h: sp.local.head(h) if sp.owner[h] == 0 else sp._replica(h) for h in draw.head_ids}
    sp.watch_grads(heads)
    buckets = [len(b.params) for b in sp._buckets]
    hooks = sum(len(b._hooks) for b in sp._buckets)
    for b in sp._buckets:
        for h in b._hooks:
            h.remove()
    return {"buckets": {"params_per_bucket": buckets, "grad_hooks": hooks}}


def probe_trainer(cfg: Config, scratch: Path) -> dict[str, Any]:
    from nitro_dist.distributed.ray_train import make_trainer

    trainer, _, fs = make_trainer(cfg)
    s, rc = trainer.scaling_config, trainer.run_config
    return {
        "scaling": {
            "num_workers": s.num_workers,
            "use_gpu": s.use_gpu,
            "resources_per_worker": s.resources_per_worker,
            "placement_strategy": s.placement_strategy,
            "backend": trainer.backend_config.backend,
        },
        "run_config": {
            "name": rc.name,
            "storage_path": rc.storage_path,
            "filesystem": None if fs is None else type(fs).__name__,
            "max_failures": rc.failure_config.max_failures,
            "num_to_keep": rc.checkpoint_config.num_to_keep,
            "worker_storage": trainer.train_loop_config["storage"],
        },
    }


def probe_deepspeed(cfg: Config, scratch: Path) -> dict[str, Any]:
    from nitro_dist.distributed.g_update import deepspeed_config

    bf16 = cfg.train.precision == "bf16"
    return {"config": deepspeed_config(cfg, cfg.distributed.max_workers, bf16)}


class _Exit(Exception):
    pass


def probe_fault(cfg: Config, scratch: Path) -> dict[str, Any]:
    """Every rank's RaySession.check_fault at iterations 0-2; os._exit and the loss of the
    rank's node (``lose_node``) raise instead."""
    from nitro_dist.distributed import ray_train
    from nitro_dist.distributed.ray_train import FAIL_ENV, RaySession

    def fake_exit(code: int) -> None:
        raise _Exit(code)

    def fake_node_loss(node: str, who: str) -> None:
        raise _Exit(f"node lost: {who}")

    exits = []
    env = {k: v for k, v in os.environ.items() if k != FAIL_ENV}
    world = cfg.distributed.max_workers
    with (
        mock.patch.object(os, "_exit", fake_exit),
        mock.patch.object(ray_train, "lose_node", fake_node_loss),
        mock.patch.dict(os.environ, env, clear=True),
    ):
        for rank in range(world):
            session = RaySession(cfg, str(scratch / "store"), rank, world)
            for it in range(3):
                try:
                    session.check_fault(it)
                except _Exit as e:
                    exits.append((rank, it, e.args[0]))
    return {"exits": exits, "files": files(scratch)}


class _Stop(Exception):
    pass


def probe_tune(cfg: Config, scratch: Path) -> dict[str, Any]:
    """tune.sweep up to the Tuner: what it would run (no Ray, no trial)."""
    from ray import tune as ray_tune

    from nitro_dist import tune as nitro_tune
    from nitro_dist.distributed import ray_train

    made: dict[str, Any] = {}

    class RecordingTuner:
        @staticmethod
        def can_restore(path: str) -> bool:
            return False

        def __init__(self, trainable, **kwargs) -> None:
            made.update(kwargs)

        def fit(self):
            raise _Stop

    with (
        mock.patch.object(ray_tune, "Tuner", RecordingTuner),
        mock.patch.object(ray_train, "connect", lambda cfg: None),
        mock.patch.dict(os.environ),
        pytest.raises(_Stop),
    ):
        nitro_tune.sweep(cfg)
    tc, rc = made["tune_config"], made["run_config"]
    asha = tc.scheduler
    space = {k: v for k, v in made["param_space"].items() if k != "__base__"}  # __base__: cfg
    return {
        "tune_config": {
            "metric": tc.metric,
            "mode": tc.mode,
            "num_samples": tc.num_samples,
            "max_concurrent_trials": tc.max_concurrent_trials,
        },
        "asha": {
            "time_attr": asha._time_attr,
            "max_t": asha._max_t,
            "rungs": [[m for m, _ in b._rungs] for b in asha._brackets],
        },
        "run_config": {"name": rc.name, "storage_path": rc.storage_path},
        "param_space": {
            k: v if isinstance(v, dict | str) else [type(v).__name__, vars(v)]
            for k, v in space.items()
        },
    }


def probe_logger(cfg: Config, scratch: Path) -> dict[str, Any]:
    """run_log.MetricsLogger and one logged row, with the wandb module recorded."""
    from nitro_dist.run_log import MetricsLogger

    calls: list[Any] = []

    class Run:
        def log(self, row, step):
            calls.append(("log", row, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", {k: v for k, v in kwargs.items() if k != "config"}))
        return Run()

    wandb = types.SimpleNamespace(init=init)
    with mock.patch.dict(sys.modules, {"wandb": wandb}):
        logger = MetricsLogger(scratch, cfg)
        logger.log(1, 4, {"g_loss": 0.5})
        logger.close()
    return {"wandb": calls, "files": files(scratch)}


def probe_storage(cfg: Config, scratch: Path) -> dict[str, Any]:
    """After build_run (it installs the storage retry policy): a shard read from an address
    where nothing listens, retried until the policy gives up; the tries it made."""
    import logging
    import socket

    from nitro_dist.data.shards import BadData, DataError, read_shard

    build(cfg)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    retries: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: retries.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("nitro_dist.storage")
    log.addHandler(handler)
    try:
        with pytest.raises(DataError) as got:
            list(read_shard(f"http://127.0.0.1:{port}/s-000000.tar", BadData()))
    finally:
        log.removeHandler(handler)
    return {"attempts": len(retries) + 1, "raised": str(got.value).split(":")[0]}


PROBES: dict[str, tuple[str, dict[str, Any], Callable[[Config, Path], dict[str, Any]]]] = {
    # name: (preset, keys set in every config the probe sees, probe)
    # 6 heads; no EMA (a copy of G per build): optim.ema_decay is probed by a step
    "run": ("tiny", {"pool.levels": [0], "pool.candidates": 1, "optim.ema_decay": 0.0}, probe_run),
    "step": (  # 6 heads, a 2-step teacher
        "tiny",
        {"train.batch_size": 2, "pool.levels": [0], "teacher.timesteps": [999, 499]},
        probe_step,
    ),
    "loop": (  # prompts task: its metrics need no weights; small pool, 1-step teacher
        "tiny",
        {
            **PROMPT_TASK,
            "train.sample_prompts": ["a cat"],
            "train.iterations": 2,
            "train.batch_size": 2,
            "train.log_every": 1,
            "train.sample_every": 0,
            "train.eval_every": 0,
            "train.checkpoint_every": 1,
            "train.keep_checkpoints": 2,
            "refinement.enable_at": [0],
            "pool.kinds": ["global_cond"],
            "pool.t_buckets": [10],
            "pool.levels": [0],
            "pool.candidates": 1,
            "teacher.timesteps": [999],
            "teacher.num_steps": 1,
            "optim.ema_decay": 0.0,
        },
        probe_loop,
    ),
    "samples": ("tiny", {"train.sample_prompts": ["a cat"]}, probe_samples),
    "eval": ("tiny", {}, probe_eval),
    "pool_sync": ("tiny", {}, probe_pool_sync),
    "trainer": ("tiny", {}, probe_trainer),
    "deepspeed": ("tiny", {}, probe_deepspeed),
    "fault": ("tiny", {}, probe_fault),
    "tune": ("tiny", {"train.iterations": 1000}, probe_tune),
    "logger": ("tiny", {}, probe_logger),
    "storage": ("tiny", {"pool.levels": [0], "pool.candidates": 1}, probe_storage),
}


# ---------------------------------------------------------------------------------------------
# fixtures and the tests


@dataclass
class Paths:
    digits: str  # the digits task's diffusers folder
    alt_teacher: str  # the same with other UNet weights
    shards_a: str  # 2 prompt shards of 4
    shards_b: str  # 3 prompt shards of 4, other prompts
    shards_c: str  # brace pattern, no manifest: 2 shards of 4 with prompt.txt and another txt
    sdxl_file: str  # the tiny SDXL as a single-file checkpoint
    sdxl_configs: str  # its config folder
    sdxl_configs_b: str  # the same with another scheduler beta_end
    inception: str  # a random TorchScript Inception in clean-fid's form
    clip: str  # a random transformers CLIP folder


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> Paths:
    from diffusers import UNet2DConditionModel

    from nitro_dist.data.shards import encode, write_shard
    from nitro_dist.data.write_shards import write_prompt_shards
    from nitro_dist.digits.task import WEIGHTS_DIR

    root = tmp_path_factory.mktemp("live")
    alt = root / "alt_teacher"
    shutil.copytree(WEIGHTS_DIR, alt, ignore=shutil.ignore_patterns("unet"))
    unet = UNet2DConditionModel.from_pretrained(WEIGHTS_DIR / "unet", use_safetensors=True)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    unet.save_pretrained(alt / "unet", safe_serialization=True)
    a, b = root / "shards_a", root / "shards_b"
    write_prompt_shards([f"a photo of {i}" for i in range(8)], str(a), 4, progress=False)
    write_prompt_shards([f"a drawing of {i}" for i in range(12)], str(b), 4, progress=False)
    c = root / "shards_c"
    for k in range(2):
        samples = [encode(f"{i:03d}", f"a photo of {i}", i) for i in range(4 * k, 4 * k + 4)]
        for x in samples:
            x["txt"] = f"another caption {x['__key__']}".encode()
        write_shard(str(c / f"c-{k}.tar"), samples)
    from sdxl_files import write_configs, write_single_file

    from nitro_dist.image_metrics import save_tiny_clip, save_tiny_inception
    from nitro_dist.models import tiny
    from nitro_dist.models.builders import build_tiny_sdxl

    m = build_tiny_sdxl(0)
    sdxl_file = write_single_file(m, root / "sdxl.safetensors")
    configs = write_configs(m, root / "sdxl_configs")
    configs_b = write_configs(m, root / "sdxl_configs_b", {**tiny.SDXL_SCHEDULE, "beta_end": 0.02})
    return Paths(
        str(WEIGHTS_DIR),
        str(alt),
        str(a),
        str(b),
        f"{c}/c-{{0..1}}.tar",
        str(sdxl_file),
        str(configs),
        str(configs_b),
        str(save_tiny_inception(root / "inception.pt")),
        str(save_tiny_clip(root / "clip")),
    )


def resolve(value: Any, p: Paths) -> Any:
    return value.format(**dataclasses.asdict(p)) if isinstance(value, str) else value


def config_of(probe: str, context: dict[str, Any], p: Paths, change: dict[str, Any] | None = None):
    preset, common, _ = PROBES[probe]
    values = {**common, **context, **(change or {})}
    return with_values(load_config(preset), {k: resolve(v, p) for k, v in values.items()})


def fingerprint(probe: str, cfg: Config, scratch: Path) -> dict[str, Any]:
    scratch.mkdir(parents=True, exist_ok=True)
    cache = scratch.parent / f"{scratch.name}-cache"  # offline pairs are computed, not loaded
    env = {"NITRO_CACHE": str(cache)}
    try:  # a probe may change torch's thread count: the current one is restored after
        with (
            intra_op_threads(torch.get_num_threads()),
            mock.patch.dict(os.environ, env),
            chdir(scratch),
        ):
            out = PROBES[probe][2](cfg, scratch)
    except ValueError as e:  # a refused build is an effect too (train.device=cuda on a CPU box)
        out = {"error": str(e)}
    finally:
        torch.manual_seed(0)
    return scrub(plain(out), str(scratch))


@contextlib.contextmanager
def chdir(folder: Path):
    """Relative paths in configs (storage, audit) land in the probe's scratch folder."""
    old = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


_BASE: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_caches():
    yield
    _MODELS.clear()
    _BASE.clear()


def base_fingerprint(probe: str, context: dict[str, Any], p: Paths, tmp_path_factory):
    """The probe's fingerprint of its base config with ``context`` (computed once)."""
    key = json.dumps([probe, context], sort_keys=True)
    if key not in _BASE:
        cfg = config_of(probe, context, p)
        _BASE[key] = fingerprint(probe, cfg, tmp_path_factory.mktemp("base"))
        assert "error" not in _BASE[key], _BASE[key]
    return _BASE[key]


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@pytest.mark.parametrize("key", list(KEYS))
def test_changing_the_key_changes_what_is_built(key, paths, tmp_path, tmp_path_factory):
    case = KEYS[key]
    value = resolve(case.value, paths)
    base_cfg = config_of(case.probe, case.context, paths)
    assert get_key(base_cfg, key) != value, f"{key}: the changed value is the base value"
    changed_cfg = config_of(case.probe, case.context, paths, {key: value})
    assert get_key(changed_cfg, key) == value or isinstance(value, dict)  # dicts merge
    base = base_fingerprint(case.probe, case.context, paths, tmp_path_factory)
    changed = fingerprint(case.probe, changed_cfg, tmp_path)
    if "error" in changed:
        assert case.part == "error", f"{key}={value!r}: the probe failed: {changed['error']}"
        assert changed["error"].startswith(key), changed["error"]
    changed_parts = diff(base, changed)
    for part in (case.part,) if isinstance(case.part, str) else case.part:
        assert part in changed_parts, (
            f"{key}={value!r} changed {changed_parts or 'nothing'} of what the {case.probe} "
            f"probe built; expected {part}: {base.get(part)!r} -> {changed.get(part)!r}"
        )


# Every probe's base, and the contexts that add parts (loader, offline pairs), computed again.
DETERMINISM = [
    ("run", {}),
    ("run", SHARDS),
    ("run", OFFLINE),
    ("step", {}),
    ("loop", {}),
    ("samples", {}),
    ("eval", PROMPT_TASK),
    ("pool_sync", {}),
    ("trainer", {}),
    ("deepspeed", {}),
    ("fault", {"distributed.num_workers": 2, "distributed.fail_at_iteration": 1}),
    ("tune", {}),
    ("logger", WANDB),
    ("storage", {}),
]


def test_every_probe_is_checked_for_determinism():
    assert {probe for probe, _ in DETERMINISM} == set(PROBES)
    assert {case.probe for case in KEYS.values()} == set(PROBES)


# last in the file: the bases were computed before the other probes ran (shared models, globals)
@pytest.mark.parametrize(
    ("probe", "context"),
    DETERMINISM,
    ids=[p + ("+" + ",".join(sorted(c)) if c else "") for p, c in DETERMINISM],
)
def test_probe_is_deterministic(probe, context, paths, tmp_path, tmp_path_factory):
    """A base fingerprint computed again is the same: differences above are the key's doing."""
    base = base_fingerprint(probe, context, paths, tmp_path_factory)
    again = fingerprint(probe, config_of(probe, context, paths), tmp_path)
    assert diff(base, again) == [], {k: (base.get(k), again.get(k)) for k in diff(base, again)}


def swept_values() -> list[tuple[str, str, Any]]:
    """(preset, key, value) for every grid/choice value of every preset's Tune search space."""
    from nitro_dist.config import CONFIG_DIR
    from nitro_dist.tune import candidate_values

    out = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        for key, spec in load_config(str(path)).tune.search_space.items():
            domain, values = candidate_values(key, spec)
            for v in values if domain in ("grid", "choice") else values[:1]:
                out.append((path.stem, key, v))
    return out


@pytest.mark.parametrize("preset,key,value", swept_values())
def test_every_swept_value_changes_what_is_built(preset, key, value, paths, tmp_path_factory):
    """A Tune sweep compares trials that differ in what they build: every value a preset's
    search space sweeps gives its key's probe a fingerprint of its own (the classic bug is a
    swept key the code ignores: every trial would then train the same thing)."""
    case = KEYS[key]
    cfg = config_of(case.probe, case.context, paths, {key: value})
    got = fingerprint(case.probe, cfg, tmp_path_factory.mktemp("swept"))
    assert "error" not in got, got
    # a rate or a probability may leave one probed iteration alone: the pool's schedule over
    # a sweep's horizon (the production draws on the layout the run builds) shows it
    run = build(cfg)
    got["schedule"] = [
        (sample_active(run.layout, cfg.seed, it, cfg.pool.heads_per_slot).head_ids,
         refresh_ids(run.layout, cfg.seed, it, cfg.pool.refresh_rate))
        for it in range(SWEEP_HORIZON)
    ]  # fmt: skip
    _SWEPT.setdefault((preset, key), {})[json.dumps(value)] = got
    seen = _SWEPT[(preset, key)]
    others = [v for v, fp in seen.items() if v != json.dumps(value) and fp == got]
    assert not others, f"{preset}: {key}={value!r} builds the same as {key}={others[0]}"


_SWEPT: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
SWEEP_HORIZON = 225  # iterations (the digits sweep's ASHA grace period)
