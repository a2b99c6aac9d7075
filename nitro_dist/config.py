"""One typed config tree: defaults -> YAML preset -> ``key=value`` overrides.

Every component is handed only its own sub-config. Unknown keys and values of the wrong type are
rejected with a ``ValueError`` that names the dotted key, so a typo in a preset or a Tune search
space fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nitro_dist.data.prompts import CaptionKey  # light: no webdataset, no torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
HEAD_KINDS = ("global_cond", "local_cond", "local_uncond")
# SDXL-family noise schedules have 1000 training timesteps; build_run checks the model's own.
MAX_TIMESTEPS = 1000


@dataclass(kw_only=True)
class ModelConfig:
    # "task": the task's own models (digits: the shipped teacher); "tiny_sdxl": a tiny
    # SDXL-architecture model built from configs (tests); "diffusers": a diffusers folder (unet/,
    # text_encoder[_2]/, tokenizer[_2]/, scheduler/, optional vae/) at ``teacher_path``.
    source: Literal["task", "tiny_sdxl", "diffusers"] = "task"
    # A diffusers folder, or a single-file SDXL checkpoint (.safetensors, original key layout).
    teacher_path: str | None = None
    # Student initialisation: a diffusers UNet folder (e.g. DMD2-1step), a single-file SDXL
    # checkpoint or a bare diffusers-layout UNet state dict (.safetensors, loaded into the
    # teacher's UNet architecture); None copies the teacher.
    student_path: str | None = None
    # Required when teacher_path is a single file: a local diffusers folder with its configs
    # (unet/, text_encoder*/ config.json, tokenizer*/, scheduler/, vae/config.json).
    config_path: str | None = None
    # Pixel-space tasks (digits) need no VAE; latent tasks decode samples with it when present.
    use_vae: bool = False
    gradient_checkpointing: bool = False


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters on the student (diffusers' peft path: ``UNet2DConditionModel.add_adapter``).
    rank 0 trains the whole student; rank > 0 freezes it and trains, optimizes, syncs,
    checkpoints and EMAs only the adapters (the base is found again from ``model``)."""

    rank: int = 0
    alpha: int = 0  # adapter scale alpha / rank; 0 = rank (scale 1)
    # Module names (suffixes) that get adapters: diffusers' SDXL LoRA training default, the
    # attention projections. Any nn.Linear / nn.Conv2d name of the UNet works (e.g. proj_in).
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])


@dataclass(kw_only=True)
class StudentConfig:
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(kw_only=True)
class SamplerConfig:
    """The student's shifted-LCM sampler (DESIGN.md §2 "Timestep shift")."""

    shift: int = 250  # UNet is told t' = floor(t * shift / 1000); 250 realism, 500 vibrant
    original_inference_steps: int = 4


@dataclass(kw_only=True)
class TeacherConfig:
    mode: Literal["online", "offline"] = "online"
    # Any diffusers scheduler class name; its config comes from the teacher's scheduler/ folder
    # (or the task default) with ``scheduler_overrides`` applied on top.
    scheduler: str = "DDIMScheduler"
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)
    num_steps: int = 4
    guidance_scale: float = 0.0
    # Fixed timesteps, e.g. [999, 749, 499, 249] for DMD2's 4-step LCM; empty = scheduler's own.
    timesteps: list[int] = field(default_factory=list)
    # offline mode: number of teacher pairs precomputed once per run (digits; shards later).
    offline_pairs: int = 4096
    batch_size: int = 256
    # The sample's last step returns the scheduler's clean estimate (pred_original_sample) instead
    # of its prev_sample, which keeps sqrt(1 - abar_prev) eps_hat of noise where the schedule's
    # final abar is not 1 (DDIM with set_alpha_to_one false: ~0.03 eps at abar_0 = 0.99915).
    clean_x0: bool = False


@dataclass(kw_only=True)
class InitConfig:
    """The one-step starting stage (nitro_dist/init_stage.py): a fresh run first regresses G's
    1-step output onto the teacher's x0 from the same x_T, then the GAN stage fine-tunes it."""

    iterations: int = 0  # regression steps of train.batch_size; 0 = off (G starts as loaded)
    lr: float = 1e-3  # AdamW, cosine decay to 0 over the stage
    # refinement steps k (1-based, of the 4-step schedule) trained, drawn uniformly per sample
    steps: list[int] = field(default_factory=lambda: [1])
    # keep the stage's result and load it in a run that would compute the same one (the key hashes
    # every input: nitro_dist/init_stage.py); the digits task ships its default run's
    cache: bool = True


@dataclass(kw_only=True)
class RefinementConfig:
    """Bottom-up refinement: step k (1-based) joins the sampled set at ``enable_at[k-1]``."""

    enable_at: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    # how often each step k is drawn per sample, relative to the others enabled at the iteration
    # (one weight per entry of enable_at); empty = uniformly
    k_weights: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class PoolConfig:
    kinds: list[str] = field(default_factory=lambda: list(HEAD_KINDS))
    t_buckets: list[int] = field(default_factory=lambda: [10, 250, 500, 750])
    t_jitter: int = 0  # t* drawn uniformly within +-jitter of the bucket centre
    # how t* is drawn: "iteration" one bucket per iteration for the whole batch (its slots'
    # heads active); "sample" a bucket per sample, every bucket's heads active, each judging
    # only its bucket's samples (every bucket's slots active each iteration, not one bucket's)
    t_star_per: Literal["iteration", "sample"] = "iteration"
    levels: list[int] = field(default_factory=list)  # backbone levels with heads; empty = all
    candidates: int = 4  # heads per slot (kind, bucket, level)
    heads_per_slot: int = 1  # active heads per slot each iteration
    refresh_rate: float = 0.01  # per-head probability of re-initialisation per iteration
    # which heads the refresh draw may take: "iteration" any head after any iteration; "use" only
    # the iteration's active heads after their update (a head lives 1/refresh_rate of its own
    # updates on average, and none is replaced before it was used)
    refresh_by: Literal["iteration", "use"] = "iteration"
    width: int = 256  # hidden width of every head (with width_ratio > 0: the least width)
    # > 0: each head's width is this fraction of its level's channels (rounded to a multiple of
    # 8, at least ``width``): light heads on SDXL's 1280-channel levels, where one width 256
    # makes the 480-head pool ~1.9G parameters, 74% of the UNet (0 = ``width`` everywhere).
    width_ratio: float = 0.0
    depth: int = 2
    crop_frac: float = 0.5  # side of the local heads' random crop, as a fraction of the map
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    weight_decay: float = 0.0
    fused: bool = False  # the heads' AdamW as torch's fused kernel (fewer launches on GPU)
    state_bits: Literal[32, 8] = 32  # 8: the heads' AdamW state in 8 bits (torchao AdamW8bit)
    # Multi-rank: the heads' gather runs while the batch is made (teacher, data), and their
    # gradients are all-reduced in buckets of ~bucket_mb, each as soon as the D backward has
    # finished it. Off: one blocking collective each, after the compute (the same numbers).
    overlap_comm: bool = True
    bucket_mb: float = 25.0


@dataclass(kw_only=True)
class LossConfig:
    type: Literal["hinge", "non_saturating"] = "hinge"
    g_weight: float = 1.0
    # G's loss adds regression_weight x the paired regression of its 1-step samples (k = 1) onto
    # the teacher's x0 from the same x_T (step.paired_k1_loss; metric g_regression_k1); 0 = off
    regression_weight: float = 0.0


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 = no EMA of G
    # the EMA's decay ramps linearly from 0 (the EMA follows G) to ema_decay over this many
    # iterations (optim.ema_decay_at); 0 = ema_decay from the first iteration
    ema_warmup_iterations: int = 0
    # G's learning rate over the run (optim.scheduled_lr): a linear warm-up over
    # warmup_iterations, then "constant" lr or "cosine" down to 0 at train.iterations
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_iterations: int = 0
    d_steps_per_g_step: int = 1
    # G's AdamW as torch's fused kernel: one pass over weights, gradients and state and no
    # full-size temporaries (the default foreach AdamW allocates one as large as G's fp32
    # weights). Same maths; CPU and GPU.
    fused: bool = False
    # 8: G's AdamW state (exp_avg, exp_avg_sq) block-quantised to 8 bits, torchao's AdamW8bit
    # (2 bytes per parameter instead of 8; not with ``fused``). Runs on CPU and GPU; torch.compile
    # builds its kernel once per parameter shape (ZeRO 1-3 hand it one flat partition).
    state_bits: Literal[32, 8] = 32
    # "cpu": ZeRO-Offload under DeepSpeed (Ray Train workers): G's AdamW state and fp32 master
    # partition live in host memory and the step runs there (torch AdamW on the CPU, not
    # DeepSpeedCPUAdam's compiled op). Needs distributed.zero_stage >= 1.
    offload: Literal["none", "cpu"] = "none"


@dataclass(kw_only=True)
class DataConfig:
    # "task": the task's built-in prompts (digits: the ten digit prompts) with seeded noise;
    # "shards": WebDataset prompt / teacher-pair shards at ``shards`` (local path or fsspec URL such
    # as s3://bucket/pairs-{000000..000099}.tar). The image size is the UNet's (its config).
    source: Literal["task", "shards"] = "task"
    # A folder/URL with a manifest.json, or a brace pattern of tar shards from any tool (their
    # sample counts are read once from the tar headers and cached: nitro_dist/data/index.py).
    shards: str = ""
    # The sample member holding the caption: MEMBER (prompt.txt, txt) or JSONMEMBER:FIELD
    # (json:caption: field "caption" of KEY.json; img2dataset shards: txt or json:caption).
    caption_key: str = "prompt.txt"
    num_workers: int = 2  # loader processes per rank (0: read in the training process)
    shuffle_buffer: int = 1000  # samples per loader worker's shuffle buffer (1: no shuffle)
    # Audit: each rank appends "<epoch> <iteration> <sample key>" for every sample it trains on
    # to <audit_dir>/rank_<r>.txt (a local folder); empty = off. With data.source=task the key is
    # task-<index of the training prompt> and the epoch 0 (each iteration draws its own batch).
    audit_dir: str = ""


@dataclass(kw_only=True)
class TrainConfig:
    iterations: int = 1000
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda
    # bf16: frozen teacher/text encoders stored in bf16 and the step under bf16 autocast, G's
    # master weights and optimizer state stay fp32 (GPU); fp32 everywhere on CPU.
    precision: Literal["fp32", "bf16"] = "fp32"
    num_threads: int = 0  # 0 = torch default
    log_every: int = 25
    sample_every: int = 250
    grid_per_prompt: int = 8  # sample-grid columns: images per prompt
    # Grid rows (and the evaluation prompts of task "prompts"): a list, or a prompt file
    # (.txt/.jsonl/.csv/.parquet); empty = the task's own.
    sample_prompts: list[str] | str = field(default_factory=list)
    eval_every: int = 0  # 0 = only at the end
    eval_images: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # Steps with a NaN/inf loss or gradient are skipped (no update anywhere, metric
    # skipped_steps); this many in a row stop the run with an error.
    max_nonfinite_steps: int = 5
    # Micro-batches per iteration: the local batch is split, G and head gradients accumulate.
    grad_accum: int = 1
    # Student and teacher UNets in channels-last (NHWC) memory format for the convolutions. Under
    # DeepSpeed (Ray Train workers) the student stays NCHW: DeepSpeed reads weights as flat bytes;
    # the teacher/backbone keeps NHWC. CUDA's eager GroupNorm runs NCHW (a transpose each way), so
    # measure before turning it on (benchmarks/gpu_sdxl.sh does).
    channels_last: bool = False
    # torch.compile the student UNet (its forward and, through AOTAutograd, its backward).
    # The first iterations compile (minutes at SDXL scale; the backward simulation's varying
    # batch makes one dynamic-shape recompile). Not with ZeRO-3 (partitioned weights).
    compile: bool = False
    compile_backend: str = "inductor"  # any torch.compile backend (aot_eager: no codegen)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"


@dataclass(kw_only=True)
class DistributedConfig:
    """How ``python -m nitro_dist.train`` runs on Ray Train (DeepSpeed ZeRO for G)."""

    # Ranks: a number, or [min, max] for elastic training (Ray Train V2): the run starts with as
    # many workers as the cluster has room for (up to max) and, after a worker or node is lost,
    # continues from the last checkpoint on the workers that remain (at least min), with the
    # same global batch (train.batch_size is split over the ranks there are). The pool and the
    # data of data.source=task do not depend on the number of ranks; shard data
    # (data.source=shards) continues at the start of the next epoch after a resize.
    num_workers: int | list[int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0  # fractional is fine (2-core machines)
    gpus_per_worker: float = 1.0  # only with use_gpu
    resources_per_worker: dict[str, Any] = field(default_factory=dict)  # custom Ray resources
    # How Ray places the workers (Ray's placement group strategies): PACK fills a node first;
    # SPREAD puts them on different nodes where it can (a lost node then takes fewer ranks).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 for the generator
    # Where checkpoints, metrics and samples go: a local folder (relative to the launching
    # directory; must be shared by the nodes of a multi-node cluster) or s3://bucket/prefix.
    storage_path: str = "runs"
    max_failures: int = 0  # worker-group restarts Ray Train may do (from the last checkpoint)
    # Fault injection (testing recovery): the worker of rank ``fail_rank`` exits abruptly when it
    # reaches this iteration, once per run. -1 = off. Env NITRO_FAIL_AT=iteration[:rank] also works.
    fail_at_iteration: int = -1
    fail_rank: int = 0
    # Fault injection (testing node loss): the worker of rank ``fail_rank`` stops its node's
    # raylet (SIGTERM, as ``ray stop`` on that machine or a preempted instance) at this iteration,
    # once per run: the node leaves the cluster with every process on it. Refused on the head
    # node. -1 = off.
    node_loss_at_iteration: int = -1
    # Fault injection (testing the numeric guard): rank ``fail_rank`` makes its G loss NaN at
    # these iterations (local runs too). Empty = off.
    nan_at_iterations: list[int] = field(default_factory=list)
    # Fault injection (testing a full disk): the checkpoint of this iteration is written onto a
    # full disk (a file of it goes to /dev/full: the kernel's ENOSPC). -1 = off.
    disk_full_at_iteration: int = -1

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[-1]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)


@dataclass(kw_only=True)
class StorageConfig:
    """Retries of storage calls (shard reads, run-file and checkpoint uploads, checkpoint
    downloads; nitro_dist/retry.py): transient errors (dropped connections, timeouts, HTTP 5xx,
    429/SlowDown) are retried with exponential backoff before anything is called unreadable."""

    retries: int = 5  # tries after the first one
    retry_max_s: float = 120.0  # no retry starts after this many seconds (waits included)


@dataclass(kw_only=True)
class TuneConfig:
    """``python -m nitro_dist.tune``: what to sweep and how (ignored by plain training).

    ``search_space`` maps dotted config keys to one of {"grid": [...]}, {"choice": [...]},
    {"uniform": [lo, hi]}, {"loguniform": [lo, hi]}, {"randint": [lo, hi]}.
    """

    metric: str = "fid_digits_1step"
    mode: Literal["min", "max"] = "min"
    num_samples: int = 1  # repeats of the grid (or random draws of the other domains)
    search_space: dict[str, Any] = field(default_factory=dict)
    grace_period: int = 100  # ASHA: iterations before a trial can be stopped
    reduction_factor: int = 2
    max_concurrent: int = 1  # trials at once (each runs distributed.num_workers workers)
    storage_path: str = "tune_runs"  # the sweep's folder (local or s3://)


@dataclass(kw_only=True)
class EvalConfig:
    """Weights for the task-free metrics (nitro_dist.image_metrics), local files only: with
    them every evaluation (training's, the eval CLI's default) adds ``fid_teacher`` (FID of
    student against teacher images, clean-fid) and ``clip_score``; ``python -m nitro_dist.tune``
    then watches fid_teacher_1step for a task without its own FID (task ``prompts``)."""

    inception: str = ""  # clean-fid's TorchScript Inception, inception-2015-12-05.pt
    clip: str = ""  # a transformers CLIP folder (CLIPModel + CLIPProcessor)


@dataclass(kw_only=True)
class LoggingConfig:
    wandb: bool = True  # offline unless wandb_mode says otherwise; false turns it off
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "nitro_dist"
    progress: bool = True


@dataclass(kw_only=True)
class Config:
    seed: int = 0
    run_name: str = "digits"
    # What the run is about (nitro_dist.tasks): "digits" (built in), "prompts" (any other run:
    # shards + train.sample_prompts), or a package.module:Class of your own.
    task: str = "digits"
    model: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    init: InitConfig = field(default_factory=InitConfig)
    refinement: RefinementConfig = field(default_factory=RefinementConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Return ``value`` coerced to ``tp`` or raise ValueError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(key, arg, value)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")  # internal: a new field type


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by dotted name."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown config key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(prefix + name, tp, value)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


REPLACED_MAPPINGS = {"search_space"}  # mappings an override replaces instead of merging


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if k in REPLACED_MAPPINGS:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and k in out:
            # free-form dict fields (scheduler_overrides) merge too; that is what users expect
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML: 3, 0.5, true, [1, 2], null)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {key}: cannot parse value {raw!r}: {e}") from e
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def resolve_preset(name_or_path: str) -> Path:
    """``digits`` -> configs/digits.yaml; a path is used as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ValueError(f"config file {p} does not exist")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        presets = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"no preset named {name_or_path!r}; presets: {', '.join(presets)}")
    return candidate


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults -> YAML preset (may say ``base: other``) -> ``key=value`` overrides."""
    data = to_dict(Config())
    if preset is not None:
        data = _merge(data, _load_yaml(resolve_preset(preset)))
    for item in overrides or []:
        path, value = parse_override(item)
        data = _merge(data, _nest(path, value))
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_load_yaml(resolve_preset(str(base))), data)
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    """For Ray: workers receive dicts; this is the first line of every worker function."""
    cfg = from_dict(Config, _merge(to_dict(Config()), data))
    validate(cfg)
    return cfg


def get_key(cfg: Config, key: str) -> Any:
    """The value at a dotted key; ValueError naming the key when there is none."""
    node: Any = cfg
    for i, part in enumerate(key.split(".")):
        if not dataclasses.is_dataclass(node) or part not in {
            f.name for f in dataclasses.fields(node)
        }:
            where = ".".join(key.split(".")[:i]) or "config"
            raise ValueError(f"unknown config key {key} (no {part!r} in {where})")
        node = getattr(node, part)
    return node


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with dotted keys set (type-checked and validated like overrides)."""
    data = to_dict(cfg)
    for key, value in values.items():
        get_key(cfg, key)
        data = _merge(data, _nest(key.split("."), value))
    out = from_dict(Config, data)
    validate(out)
    return out


def validate(cfg: Config) -> None:
    """Range checks that types cannot express; each error names its key."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"{key}: {msg}")

    p = cfg.pool
    need(len(p.kinds) > 0, "pool.kinds", "at least one head kind is needed")
    for i, k in enumerate(p.kinds):
        need(k in HEAD_KINDS, f"pool.kinds[{i}]", f"{k!r} is not one of {list(HEAD_KINDS)}")
    need(len(set(p.kinds)) == len(p.kinds), "pool.kinds", "kinds repeat")
    need(len(p.t_buckets) > 0, "pool.t_buckets", "at least one t* bucket is needed")
    for i, b in enumerate(p.t_buckets):
        need(
            0 <= b < MAX_TIMESTEPS, f"pool.t_buckets[{i}]", f"{b} is not in 0..{MAX_TIMESTEPS - 1}"
        )
    need(p.t_jitter >= 0, "pool.t_jitter", "must be >= 0")
    need(p.candidates >= 1, "pool.candidates", "must be >= 1")
    need(
        1 <= p.heads_per_slot <= p.candidates,
        "pool.heads_per_slot",
        f"must be in 1..pool.candidates ({p.candidates})",
    )
    need(0.0 <= p.refresh_rate <= 1.0, "pool.refresh_rate", "must be in [0, 1]")
    need(p.width >= 1, "pool.width", "must be >= 1")
    need(0.0 <= p.width_ratio <= 4.0, "pool.width_ratio", "must be in [0, 4] (0: pool.width)")
    need(p.depth >= 1, "pool.depth", "must be >= 1")
    need(0.0 < p.crop_frac <= 1.0, "pool.crop_frac", "must be in (0, 1]")
    need(p.bucket_mb > 0, "pool.bucket_mb", "must be > 0")
    need(len(p.betas) == 2, "pool.betas", "needs two values")
    need(len(cfg.optim.betas) == 2, "optim.betas", "needs two values")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.loss.regression_weight >= 0, "loss.regression_weight", "must be >= 0 (0 = off)")
    need(p.lr > 0, "pool.lr", "must be > 0")
    need(0.0 <= cfg.optim.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
    need(cfg.optim.d_steps_per_g_step >= 1, "optim.d_steps_per_g_step", "must be >= 1")
    need(cfg.optim.warmup_iterations >= 0, "optim.warmup_iterations", "must be >= 0 (0 = none)")
    need(cfg.optim.ema_warmup_iterations >= 0, "optim.ema_warmup_iterations", "must be >= 0")
    for sec, section in (("optim", cfg.optim), ("pool", p)):
        need(
            not (section.fused and section.state_bits == 8),
            f"{sec}.state_bits",
            f"8-bit AdamW (torchao AdamW8bit) has no fused kernel: set {sec}.fused=false",
        )
    s = cfg.sampler
    need(1 <= s.shift <= MAX_TIMESTEPS, "sampler.shift", f"must be in 1..{MAX_TIMESTEPS}")
    need(s.original_inference_steps >= 1, "sampler.original_inference_steps", "must be >= 1")
    r = cfg.refinement.enable_at
    need(1 <= len(r) <= 4, "refinement.enable_at", "one start iteration per step k, 1 to 4 of them")
    need(r[0] == 0, "refinement.enable_at", "step 1 must be enabled from iteration 0")
    need(all(x >= 0 for x in r), "refinement.enable_at", "iterations must be >= 0")
    kw = cfg.refinement.k_weights
    need(
        not kw or (len(kw) == len(r) and all(x > 0 for x in kw)),
        "refinement.k_weights",
        f"one weight > 0 per entry of refinement.enable_at ({len(r)}), or [] for uniform",
    )
    t = cfg.teacher
    need(t.num_steps >= 1, "teacher.num_steps", "must be >= 1")
    need(t.guidance_scale >= 0, "teacher.guidance_scale", "must be >= 0")
    need(t.offline_pairs >= 1, "teacher.offline_pairs", "must be >= 1")
    need(t.batch_size >= 1, "teacher.batch_size", "must be >= 1")
    need(cfg.init.iterations >= 0, "init.iterations", "must be >= 0")
    need(cfg.init.lr > 0, "init.lr", "must be > 0")
    need(
        len(cfg.init.steps) > 0 and all(1 <= k <= 4 for k in cfg.init.steps),
        "init.steps",
        "one or more refinement steps in 1..4",
    )
    need(
        cfg.init.iterations == 0 or cfg.data.source == "task",
        "init.iterations",
        "the one-step stage trains on the task's teacher pairs (data.source=task); with shards, "
        "set init.iterations=0 and start from a one-step model (model.student_path)",
    )
    tr = cfg.train
    need(tr.iterations >= 0, "train.iterations", "must be >= 0")
    need(tr.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(tr.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
    for key in ("log_every", "sample_every", "eval_every", "checkpoint_every"):
        need(getattr(tr, key) >= 0, f"train.{key}", "must be >= 0")
    need(tr.grid_per_prompt >= 1, "train.grid_per_prompt", "must be >= 1")
    need(tr.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(tr.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    need(tr.eval_images >= 10, "train.eval_images", "must be >= 10")
    need(tr.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    d = cfg.distributed
    need(
        isinstance(d.num_workers, int) or len(d.num_workers) == 2,
        "distributed.num_workers",
        f"a number of workers or [min, max] for elastic training, got {d.num_workers}",
    )
    need(d.min_workers >= 1, "distributed.num_workers", "must be >= 1")
    need(d.min_workers <= d.max_workers, "distributed.num_workers", "[min, max] needs min <= max")
    for w in range(d.min_workers, d.max_workers + 1):  # an elastic run may resize to any of them
        need(
            tr.batch_size % (w * tr.grad_accum) == 0,
            "train.batch_size",
            f"{tr.batch_size} must divide evenly over distributed.num_workers ({w}"
            f"{' of ' + str(d.num_workers) if d.elastic else ''}) x train.grad_accum "
            f"({tr.grad_accum})",
        )
    need(d.zero_stage in (0, 1, 2, 3), "distributed.zero_stage", "must be 0, 1, 2 or 3")
    lo = cfg.student.lora
    need(lo.rank >= 0, "student.lora.rank", "must be >= 0 (0: train the whole student)")
    need(lo.alpha >= 0, "student.lora.alpha", "must be >= 0 (0: alpha = rank)")
    need(
        lo.rank == 0 or len(lo.target_modules) > 0,
        "student.lora.target_modules",
        "needs at least one module name when student.lora.rank > 0",
    )
    need(
        lo.rank == 0 or d.zero_stage < 3,
        "student.lora.rank",
        "LoRA adapters are not supported with distributed.zero_stage=3 (use ZeRO 0-2: the "
        "adapters' optimizer state is what ZeRO 1-2 shard)",
    )
    need(
        cfg.optim.offload == "none" or d.zero_stage >= 1,
        "optim.offload",
        "ZeRO-Offload needs distributed.zero_stage 1, 2 or 3 (stage 0 keeps G's state whole)",
    )
    need(
        cfg.optim.offload == "none" or cfg.optim.state_bits == 32,
        "optim.offload",
        "offloads a 32-bit AdamW state: not with optim.state_bits=8",
    )
    need(
        cfg.optim.state_bits == 32 or d.zero_stage == 0,
        "optim.state_bits",
        "8-bit AdamW for G needs distributed.zero_stage=0: ZeRO 1-3 hand the optimizer one flat "
        "buffer whose 8-bit blocks span parameters, so its state could not be saved per parameter",
    )
    need(
        not (cfg.train.compile and d.zero_stage == 3),
        "train.compile",
        "is not supported with distributed.zero_stage=3 (partitioned weights): use ZeRO 0-2",
    )
    if cfg.train.compile:
        import torch._dynamo

        backends = [b for b in torch._dynamo.list_backends(exclude_tags=()) if "TEST" not in b]
        need(
            cfg.train.compile_backend in backends,
            "train.compile_backend",
            f"{cfg.train.compile_backend!r} is not a torch.compile backend ({', '.join(backends)})",
        )
    need(d.cpus_per_worker > 0, "distributed.cpus_per_worker", "must be > 0")
    need(d.gpus_per_worker > 0, "distributed.gpus_per_worker", "must be > 0")
    need(d.max_failures >= -1, "distributed.max_failures", "must be >= 0 (or -1: unlimited)")
    need(0 <= d.fail_rank < d.max_workers, "distributed.fail_rank", "must be a rank of this run")
    need(bool(d.storage_path), "distributed.storage_path", "must not be empty")
    need(cfg.storage.retries >= 0, "storage.retries", "must be >= 0")
    need(cfg.storage.retry_max_s >= 0, "storage.retry_max_s", "must be >= 0")
    need(cfg.tune.num_samples >= 1, "tune.num_samples", "must be >= 1")
    need(cfg.tune.max_concurrent >= 1, "tune.max_concurrent", "must be >= 1")
    need(cfg.tune.grace_period >= 1, "tune.grace_period", "must be >= 1")
    need(cfg.tune.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2")
    if cfg.model.source == "diffusers":
        need(bool(cfg.model.teacher_path), "model.teacher_path", "required for source=diffusers")
    teacher_file = str(cfg.model.teacher_path).endswith(".safetensors")
    single = cfg.model.source == "diffusers" and teacher_file
    need(
        single or not cfg.model.config_path,
        "model.config_path",
        "only read when model.teacher_path is a single .safetensors file (source=diffusers)",
    )
    need(
        not single or bool(cfg.model.config_path),
        "model.config_path",
        f"required when model.teacher_path is a single file ({cfg.model.teacher_path}): a local "
        "diffusers folder with its configs (unet/, text_encoder*/, tokenizer*/, scheduler/, vae/)",
    )
    need(bool(cfg.task), "task", "must name a task (digits, prompts, or package.module:Class)")
    if cfg.data.source == "shards":
        need(bool(cfg.data.shards), "data.shards", "required for data.source=shards")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    CaptionKey.parse(cfg.data.caption_key)  # a ValueError naming data.caption_key
    need(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
