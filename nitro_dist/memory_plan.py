"""Memory plan before launch: what each rank holds, from the config alone (no device, no weights).

Per rank: the student (fp32 weights, gradients and AdamW state, sharded by the ZeRO stage over
the ranks), its EMA, the frozen teacher (= discriminator backbone), text encoders and VAE, the
heads the owner map gives the rank (weights, gradients, AdamW state), replicas of the active
heads it gathers, and the peak of one micro-batch's iteration: activations and temporaries from
the iteration's own phase functions (step.py) run on fake tensors (``FakeTensorMode``: shapes
and dtypes, no storage) under ``LiveBytes``, a dispatch mode that counts live storage bytes. The
same ``LiveBytes`` on a real CPU iteration is what the estimate is checked against
(tests/test_memory_plan.py).

Rules (bytes per element): G's weights, gradients and the EMA fp32 (bf16 autocast keeps fp32
master weights, DeepSpeed's ``torch_autocast``); AdamW two fp32 per element, or with
``state_bits: 8`` (bitsandbytes AdamW8bit) two uint8 plus one fp32 scale per 256-element block
each (``ADAM_STATE_BYTES``); ZeRO stage >= 1 divides the optimizer state by the ranks, >= 2 the
gradients, 3 the weights. ``optim.offload=cpu`` (ZeRO-Offload) moves G's AdamW state to host
memory, with the rank's fp32 master partition and its gradient partition (DeepSpeed's CPU
copies), and the step's temporaries with it; the device keeps the gradient row (upper bound: the
reduce buckets hold less at a time). Frozen models bf16 under ``train.precision=bf16`` (the VAE
stays fp32), else fp32. Not counted: the CUDA context and allocator fragmentation, DeepSpeed's
flat buffers (ZeRO 1-2 keep an fp32 copy of the rank's partition and gradient buckets), NCCL.
A LoRA student (``student.lora.rank`` > 0): gradients, AdamW state and EMA cover the adapters
only; the frozen base counts once among G's weights (the EMA shares it). Its activations are
the full student's (peft cannot add adapters to fake modules): the backward through the frozen
base keeps the same inputs, the adapters' own are rank-sized.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from nitro_dist import lora
from nitro_dist import step as S
from nitro_dist.config import Config
from nitro_dist.diffusion import StudentDenoiser
from nitro_dist.discriminator.backbone import level_shapes
from nitro_dist.discriminator.pool import Draw, PoolLayout, make_layout
from nitro_dist.distributed.owners import owned_by, owner_map
from nitro_dist.models import tiny
from nitro_dist.models.builders import is_single_file, load_schedule
from nitro_dist.models.text import Cond
from nitro_dist.tasks import task_of

GiB = 2**30
# AdamW state bytes per parameter: exp_avg + exp_avg_sq in fp32, or 8-bit codes with one fp32
# absmax per 256-element block each (bitsandbytes' block-wise quantisation)
ADAM_STATE_BYTES = {32: 8.0, 8: 2 * (1 + 4 / 256)}


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under this mode that are still alive (``now``) and
    the most at any point (``peak``). Works on real and fake tensors alike (a storage's size is
    known without its data). ``exclude`` drops a storage from the count: parameter gradients,
    which the plan counts on their own row."""

    def __init__(self, *, keep_real: bool = False) -> None:
        super().__init__()
        self.live: dict[int, int] = {}  # storage id -> bytes
        self.now = self.peak = 0
        # Under a FakeTensorMode: ops on real tensors only (the step's CPU-side draws, such as
        # ``int(k_B.max())``) run for real instead of turning into fake, data-less ones.
        self.keep_real = keep_real

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if self.keep_real and tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, s: torch.UntypedStorage) -> None:
        key = s._cdata
        if key in self.live:
            return
        self.live[key] = s.nbytes()
        self.now += s.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(s, self._free, key)  # storages keep their Python object while alive

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def exclude(self, t: torch.Tensor) -> None:
        self._free(t.untyped_storage()._cdata)

    def exclude_grads(self, module: torch.nn.Module) -> list[Any]:
        """Exclude ``module``'s parameter gradients as they are accumulated (hook handles)."""
        return [
            p.register_post_accumulate_grad_hook(lambda p: self.exclude(p.grad))
            for p in module.parameters()
            if p.requires_grad
        ]


# ---------------------------------------------------------------------------------------------
# Architecture from the config (configs only: no weights are read)


@dataclass
class Arch:
    label: str  # where the configs came from
    unet: dict[str, Any]
    text: list[tuple[type, dict[str, Any]]]  # (encoder class, CLIPTextConfig kwargs)
    vae: dict[str, Any] | None
    schedule: dict[str, Any]

    @property
    def sdxl(self) -> bool:
        return self.unet.get("addition_embed_type") == "text_time"

    def sample_shape(self) -> tuple[int, int, int]:
        side = self.unet["sample_size"]
        return (self.unet["in_channels"], side, side)

    def cond(self, device: str = "meta") -> Cond:
        """One sample's conditioning, zeros of the shapes the UNet takes."""
        u = self.unet
        hidden = torch.zeros(1, self.text[0][1].get("max_position_embeddings", 77),
                             u["cross_attention_dim"], device=device)  # fmt: skip
        if not self.sdxl:
            return Cond(hidden)
        pooled = u["projection_class_embeddings_input_dim"] - 6 * u["addition_time_embed_dim"]
        return Cond(hidden, torch.zeros(1, pooled, device=device), torch.zeros(1, 6, device=device))


def _sdxl_text(configs: list[dict[str, Any]]) -> list[tuple[type, dict[str, Any]]]:
    return [(CLIPTextModel, configs[0]), (CLIPTextModelWithProjection, configs[1])]


def _read_json(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def arch_of(cfg: Config) -> Arch:
    """The architecture ``cfg.model`` names, from config files only. A ``diffusers`` path that
    does not exist here (the SDXL presets' placeholders) plans SDXL base 1.0's architecture."""
    m = cfg.model
    vae = m.use_vae
    if m.source == "tiny_sdxl":
        text = _sdxl_text(tiny.TINY_SDXL_TEXT_ENCODERS)
        return Arch("tiny SDXL", tiny.TINY_SDXL_UNET, text, tiny.TINY_VAE if vae else None,
                    dict(tiny.SDXL_SCHEDULE))  # fmt: skip
    if m.source == "task":
        root, key = task_of(cfg).model_dir(), "task"
    else:
        single = is_single_file(str(m.teacher_path))
        root = Path(str(m.config_path if single else m.teacher_path))
        key = "model.config_path" if single else "model.teacher_path"
    if root is None or not (root / "unet" / "config.json").exists():
        text = _sdxl_text(tiny.SDXL_TEXT_ENCODERS)
        return Arch(f"SDXL base 1.0 ({key} {root} not here)", tiny.SDXL_UNET, text,
                    tiny.SDXL_VAE if vae else None, dict(tiny.SDXL_SCHEDULE))  # fmt: skip
    unet = _read_json(root / "unet" / "config.json")
    sdxl = unet.get("addition_embed_type") == "text_time"
    dirs = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    configs = [_read_json(root / d / "config.json") for d in dirs]
    text = _sdxl_text(configs) if sdxl else [(CLIPTextModel, configs[0])]
    vae_path = root / "vae" / "config.json"
    vae_cfg = _read_json(vae_path) if vae and vae_path.exists() else None
    return Arch(f"{key} {root}", unet, text, vae_cfg, load_schedule(root))


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_unet(arch: Arch) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(arch.unet)


def frozen_numels(arch: Arch) -> dict[str, int]:
    with torch.device("meta"):
        text = sum(_numel(cls(CLIPTextConfig(**c))) for cls, c in arch.text)
        vae = _numel(AutoencoderKL.from_config(arch.vae)) if arch.vae is not None else 0
    return {"text": text, "vae": vae}


# ---------------------------------------------------------------------------------------------
# Activations: one micro-batch of the iteration on fake tensors


def draws(
    cfg: Config, layout: PoolLayout, sample_shape: tuple[int, int, int], micro_batch: int
) -> tuple[Draw, S.IterationNoise]:
    """Iteration 0's active heads and one micro-batch's noise (real tensors: drawn outside any
    fake mode, which cannot give the crops' numbers)."""
    draw = S.draw_heads(cfg, layout, 0)
    steps = S.enabled_steps(cfg.refinement.enable_at, 0)
    ids = list(range(micro_batch))
    return draw, S.draw_iteration_noise(cfg.seed, 0, ids, sample_shape, steps, draw, layout)


def iteration_peak(
    cfg: Config, student: UNet2DConditionModel, teacher: UNet2DConditionModel,
    layout: PoolLayout, cond: Cond, schedule: dict[str, Any], draw: Draw,
    noise: S.IterationNoise,
) -> int:  # fmt: skip
    """Peak live bytes of one micro-batch's G turn + backward, real features and D turns (as
    ``step._train_step`` runs them), G's gradients excluded. The models may be fake or real;
    the batch (zeros) is made here on the models' device."""
    dev = next(student.parameters()).device
    micro_batch, *sample_shape = noise.eps_BCHW.shape
    denoiser = StudentDenoiser(
        schedule, shift=cfg.sampler.shift, original_steps=cfg.sampler.original_inference_steps
    )
    bf16 = cfg.train.precision == "bf16"
    with torch.device(dev):
        heads = {h: layout.build_head(h) for h in draw.head_ids}
        x = torch.zeros(micro_batch, *sample_shape)
        c = cond.to(dev).index([0] * micro_batch)
    batch = S.Batch(x, x.clone(), c, c)
    tracker = LiveBytes(keep_real=isinstance(next(student.parameters()), FakeTensor))
    hooks = tracker.exclude_grads(student)
    with tracker, torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        S.replay_phases(
            student, teacher, denoiser, heads, layout, batch, noise,
            loss_type=cfg.loss.type, d_steps=cfg.optim.d_steps_per_g_step,
            activation_checkpointing=cfg.model.gradient_checkpointing,
            grad_accum=cfg.train.grad_accum,
        )  # fmt: skip
    for hook in hooks:
        hook.remove()
    return tracker.peak


def fake_iteration_peak(cfg: Config, arch: Arch, micro_batch: int) -> tuple[int, PoolLayout]:
    """``iteration_peak`` of ``arch`` at any size on fake CPU tensors (no memory); the layout."""
    shapes = level_shapes(meta_unet(arch).eval(), arch.sample_shape(), arch.cond())
    layout = make_layout(cfg.pool, shapes)
    draw, noise = draws(cfg, layout, arch.sample_shape(), micro_batch)
    with FakeTensorMode(allow_non_fake_inputs=True):
        student = UNet2DConditionModel.from_config(arch.unet).train()
        # built in its dtype: Module.to cannot swap fake parameters
        frozen_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        default = torch.get_default_dtype()
        torch.set_default_dtype(frozen_dtype)
        try:
            teacher = UNet2DConditionModel.from_config(arch.unet).requires_grad_(False).eval()
        finally:
            torch.set_default_dtype(default)
        if cfg.model.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        peak = iteration_peak(
            cfg, student, teacher, layout, arch.cond("cpu"), arch.schedule, draw, noise
        )
    return peak, layout


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    arch: str
    world_size: int
    micro_batch: int
    shared: dict[str, int]  # bytes, the same on every rank
    per_rank: list[dict[str, int]]  # bytes that depend on the rank (heads)
    activations: int  # one micro-batch's iteration peak (fake tensors)
    optimizer_temp: int  # foreach AdamW's temporaries (not at the same time as activations)
    host: dict[str, int]  # bytes in each rank's host (CPU) memory: ZeRO-Offload
    unet_numel: int  # parameters of G (= the teacher/backbone's)
    pool_numel: int  # parameters of the whole head pool (every rank's heads)
    num_heads: int
    g_params: int = 0  # G's parameters (a LoRA student: base + adapters)
    g_trainable: int = 0  # what G's optimizer steps (a LoRA student: the adapters)

    def host_total(self) -> int:
        return sum(self.host.values())

    def total(self, rank: int) -> int:
        transient = max(self.activations, self.optimizer_temp)
        return sum(self.shared.values()) + sum(self.per_rank[rank].values()) + transient

    def fits(self, device_bytes: float) -> bool:
        return max(self.total(r) for r in range(self.world_size)) <= device_bytes

    def table(self) -> str:
        ranks = range(self.world_size)
        rows = [(k, [v] * self.world_size) for k, v in self.shared.items()]
        rows += [(k, [self.per_rank[r][k] for r in ranks]) for k in self.per_rank[0]]
        rows += [
            ("activations, one micro-batch (peak)", [self.activations] * self.world_size),
            ("G optimizer step temporaries", [self.optimizer_temp] * self.world_size),
            ("total (larger of the two above)", [self.total(r) for r in ranks]),
        ]
        rows += [
            ("G parameters (millions)", [self.g_params] * self.world_size),
            ("G trainable parameters (millions)", [self.g_trainable] * self.world_size),
        ]
        host = [(f"host: {k}", [v] * self.world_size) for k, v in self.host.items()]
        if host:
            host.append(("host: total", [self.host_total()] * self.world_size))
        unit, scale = ("GiB", GiB) if self.total(0) >= GiB else ("MiB", 2**20)
        width = max(len(k) for k, _ in rows + host)
        head = f"{unit:<{width}} " + " ".join(f"{f'rank {r}':>8}" for r in ranks)
        lines = [head, "-" * len(head)]

        def line(k: str, vs: list[int]) -> str:
            millions = k.endswith("(millions)")
            return f"{k:<{width}} " + " ".join(
                f"{v / 1e6:8.3f}" if millions else f"{v / scale:8.2f}" for v in vs
            )

        lines += [line(k, vs) for k, vs in rows]
        if host:  # not on the device: after the device total
            lines.append("-" * len(head))
            lines += [line(k, vs) for k, vs in host]
        return "\n".join(lines)

    def pool_line(self) -> str:
        """The head pool's size against the UNet's (DESIGN.md: the heads are light)."""
        return (
            f"head pool: {self.num_heads} heads, {self.pool_numel / 1e6:.1f}M parameters = "
            f"{self.pool_numel / self.unet_numel:.1%} of the UNet's {self.unet_numel / 1e6:.1f}M"
        )


def plan(cfg: Config, *, activations: bool = True) -> Plan:
    """The memory plan of ``cfg`` (``distributed.num_workers`` ranks; elastic [min, max]: min,
    where each rank holds the most). ``activations`` False skips the fake-tensor iteration
    (minutes at SDXL size on a CPU; the row is then 0)."""
    w, tr, d = cfg.distributed.min_workers, cfg.train, cfg.distributed
    arch = arch_of(cfg)
    micro = tr.batch_size // (w * tr.grad_accum)
    if activations:
        act, layout = fake_iteration_peak(cfg, arch, micro)
    else:
        act = 0
        layout = make_layout(
            cfg.pool, level_shapes(meta_unet(arch), arch.sample_shape(), arch.cond())
        )
    p = _numel(meta_unet(arch))
    # t: what G's optimizer steps, its gradients and EMA; a LoRA student's base (p) is frozen,
    # held whole on every rank (ZeRO-3, which would partition it, is refused with LoRA) and
    # shared with the EMA
    t, g = p, p
    if cfg.student.lora.rank:
        student = meta_unet(arch)
        lora.add_adapters(student, cfg.student.lora, cfg.seed)
        t = sum(q.numel() for q in lora.trainable(student))
        g = _numel(student)
    frozen = 2 if tr.precision == "bf16" else 4
    f = frozen_numels(arch)
    o = cfg.optim
    offload = o.offload == "cpu"
    g_local = t // (w if d.zero_stage >= 1 else 1)  # G's optimizer partition on this rank
    state = {32: "G AdamW state (2 x fp32)", 8: "G AdamW state (8-bit)"}[o.state_bits]
    g_state = int(ADAM_STATE_BYTES[o.state_bits] * g_local)
    shared = {
        "G weights (fp32)": 4 * (g - t) + 4 * t // (w if d.zero_stage == 3 else 1),
        "G gradients (fp32)": 4 * t // (w if d.zero_stage >= 2 else 1),
        state: 0 if offload else g_state,
        "G EMA (fp32)": 4 * t if o.ema_decay > 0 else 0,
        "teacher = backbone (frozen)": frozen * p,
        "text encoders (frozen)": frozen * f["text"],
        "VAE (frozen, fp32)": 4 * f["vae"],
    }
    if cfg.data.source == "task" and cfg.teacher.mode == "offline":
        c, h, w_ = arch.sample_shape()
        shared["teacher pairs (offline, fp32)"] = 4 * cfg.teacher.offline_pairs * c * h * w_
    owner = owner_map(layout, w)
    head_bytes = 8 + ADAM_STATE_BYTES[cfg.pool.state_bits]  # fp32 weights + grads + AdamW
    per_rank = []
    for r in range(w):
        own = sum(layout.head_numel(h) for h in owned_by(owner, r))
        per_rank.append({
            "heads owned (weights, grads, AdamW)": int(head_bytes * own),
            "active head replicas (upper bound)": 4 * _replica_numel(cfg, layout) if w > 1 else 0,
        })  # fmt: skip
    # foreach AdamW: one temporary as large as the shard; fused and 8-bit step per tensor in
    # one kernel; offloaded, the step runs in host memory
    temp = 0 if o.fused or o.state_bits == 8 or offload else 4 * g_local
    host = {}
    if offload:
        host = {
            "G AdamW state (2 x fp32)": g_state,
            "G fp32 master partition": 4 * g_local,
            "G gradient partition (fp32)": 4 * g_local,
            "G optimizer step temporaries": 0 if o.fused else 4 * g_local,
        }
    return Plan(arch.label, w, micro, shared, per_rank, act, temp, host, p, layout.numel(),
                layout.num_heads, g_params=g, g_trainable=t)  # fmt: skip


def _replica_numel(cfg: Config, layout: PoolLayout) -> int:
    """Parameters of the largest active set (one bucket's slots x heads_per_slot; every
    bucket's with pool.t_star_per=sample)."""
    c = layout.candidates
    per_bucket = [
        sum(layout.head_numel(s * c) for s in layout.slots_of_bucket(b))
        for b in range(len(layout.t_buckets))
    ]
    active = sum(per_bucket) if cfg.pool.t_star_per == "sample" else max(per_bucket)
    return active * cfg.pool.heads_per_slot


def parse_memory(text: str) -> float:
    """``80``, ``80GiB``, ``80GB`` or ``512MiB`` -> bytes (a bare number is GiB)."""
    units = {"gib": GiB, "gb": 1e9, "mib": 2**20, "mb": 1e6}
    t = text.strip().lower()
    unit = next((u for u in units if t.endswith(u)), "")
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise ValueError(
            f"--device-memory: {text!r} is not a size like 80, 80GiB or 512MiB"
        ) from None
    if value <= 0:
        raise ValueError(f"--device-memory: {text!r} must be > 0")
    return value * units.get(unit, GiB)
