"""G's update rules side by side: one small interface, two implementations.

``TorchUpdate`` is plain torch AdamW on one process (gradients averaged over the process group
when there is more than one rank); ``DeepSpeedUpdate`` is G inside a DeepSpeed ZeRO engine (stage
0-3), applied from outside the model. The iteration calls only ``GUpdate``'s methods, so it reads
the same with or without DeepSpeed. deepspeed is imported only when a ``DeepSpeedUpdate`` is made.

Checkpoints hold G's optimizer state *consolidated*: one fp32 tensor per parameter and state key,
in parameter order, as safetensors (``optim.write_state``; no pickle). That makes the state
independent of the ZeRO stage and of the number of ranks, which is what elastic resume needs;
DeepSpeed's own ``save_checkpoint`` would pickle partitioned state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from nitro_dist import lora, optim
from nitro_dist.run_log import drop_printed_lines

if TYPE_CHECKING:
    from diffusers import ModelMixin

    from nitro_dist.config import Config


class GUpdate(Protocol):
    """What the iteration, evaluation and checkpoints need of G's update rule."""

    @property
    def module(self) -> torch.nn.Module:
        """What the G turn calls (the UNet, or the engine that forwards to it)."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, apply: bool = True) -> tuple[float, bool]:
        """Optimizer step after ``train.grad_accum`` backwards; returns (gradient norm before
        clipping, stepped). No step when ``apply`` is False or the norm is not finite: the
        gradients are dropped and G and its optimizer state stay as they were. ``apply`` must
        be the same on every rank; the norm is global, so ``stepped`` is too."""
        ...

    def set_lr(self, lr: float) -> None:
        """G's learning rate from the next step on (``optim.scheduled_lr``)."""
        ...

    def full_params(self) -> contextlib.AbstractContextManager[list[torch.nn.Parameter]]:
        """G's parameters with their full values (collective under ZeRO-3)."""
        ...

    def full_module(self) -> ModelMixin:
        """G with full fp32 weights (collective under ZeRO-3)."""
        ...

    def save(self, folder: Path, write: bool) -> None:
        """Consolidated optimizer state (every rank calls; ``write`` on one)."""
        ...

    def load(self, folder: Path) -> None: ...

    def engine_state(self) -> dict[str, Any]: ...

    def load_engine_state(self, state: dict[str, Any]) -> None: ...


def average_over_ranks(tensors: list[torch.Tensor], world_size: int) -> None:
    """Average ``tensors`` (gradients, a loss) over the process group in place: one flat
    all-reduce (a call per tensor costs ~1 ms each on gloo), divided by the number of ranks."""
    import torch.distributed as dist

    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    torch.nn.utils.vector_to_parameters(flat, tensors)


class TorchUpdate:
    """G's update in plain torch: AdamW, clipping, and on W > 1 ranks (a process group) the
    gradients averaged over ranks before the step."""

    def __init__(self, student: ModelMixin, cfg: Config, world_size: int = 1) -> None:
        o = cfg.optim
        self.student, self.grad_clip, self.accum = student, o.grad_clip, cfg.train.grad_accum
        self.params = lora.trainable(student)  # all of G, or a LoRA student's adapters
        self.optimizer = optim.adamw(self.params, o)
        self.world_size = world_size

    @property
    def module(self) -> torch.nn.Module:
        return self.student

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self, apply: bool = True) -> tuple[float, bool]:
        if self.world_size > 1:
            self._average_grads()  # the same gradients, so the same norm, on every rank
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        stepped = apply and math.isfinite(norm)
        if stepped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, stepped

    def set_lr(self, lr: float) -> None:
        optim.set_lr(self.optimizer, lr)

    def _average_grads(self) -> None:
        average_over_ranks([p.grad for p in self.params if p.grad is not None], self.world_size)

    @contextlib.contextmanager
    def full_params(self) -> Iterator[list[torch.nn.Parameter]]:
        yield list(self.student.parameters())

    def full_module(self) -> ModelMixin:
        return self.student

    def save(self, folder: Path, write: bool) -> None:
        if write:
            tensors = optim.state_tensors(self.optimizer, self.params)
            optim.write_state(folder, tensors, self.optimizer)

    def load(self, folder: Path) -> None:
        optim.load_state_tensors(self.optimizer, self.params, optim.read_state(folder))
        optim.load_hyperparameters(self.optimizer, folder)

    def engine_state(self) -> dict[str, Any]:
        return {}

    def load_engine_state(self, state: dict[str, Any]) -> None:
        pass


ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def deepspeed_config(cfg: Config, world_size: int, bf16: bool) -> dict[str, Any]:
    tr = cfg.train
    micro = tr.batch_size // (world_size * tr.grad_accum)
    offload: dict[str, Any] = {}
    if cfg.optim.offload == "cpu":  # G's AdamW state + fp32 master partition in host memory
        pin = torch.cuda.is_available()  # page-locked host buffers: async copies from the GPU
        offload = {"offload_optimizer": {"device": "cpu", "pin_memory": pin}}
    return {
        "train_batch_size": tr.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": tr.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        # memory_efficient_linear off: ZeRO-3's (the default) replaces torch.nn.functional.linear
        # for the whole process and never puts it back ("this will persist unless manually
        # reset"), so evaluation, sampling and TorchScript after it ran through DeepSpeed's
        # autograd Function (torch.jit.script of any module with a Linear then fails)
        "zero_optimization": {
            "stage": cfg.distributed.zero_stage,
            "memory_efficient_linear": False,
            **offload,
        },
        # ZeRO-Offload with our torch AdamW stepping the host copy: DeepSpeed would otherwise
        # insist on its DeepSpeedCPUAdam (a C++ op compiled on first use)
        "zero_force_ds_cpu_optimizer": False,
        # bf16: fp32 weights (the master copy) and torch autocast inside the engine, as the rest
        # of the iteration runs. DeepSpeed's own "bf16" section would cast G to bf16 and turn
        # autocast off in its forward, so the fp32 inputs would meet bf16 weights.
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedUpdate:
    """G wrapped in a DeepSpeed engine with a plain torch AdamW (no compiled DeepSpeed ops)."""

    def __init__(self, student: ModelMixin, cfg: Config, world_size: int) -> None:
        import deepspeed

        # with several CPU ranks DeepSpeed prints "DeepSpeed ...shm_comm_op built successfully"
        with drop_printed_lines("DeepSpeed deepspeed.ops.comm."):
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        # DeepSpeed reads weights as flat bytes (broadcast, ZeRO flattening): NCHW strides only
        # (train.channels_last then holds for the teacher/backbone)
        student.to(memory_format=torch.contiguous_format)
        o = cfg.optim
        # ZeRO 1/2/3 hand this AdamW one flat fp32 partition: fused steps it in one kernel with
        # no full-size temporaries (foreach allocates one as large as the partition)
        opt = optim.adamw(lora.trainable(student), o)  # a LoRA student: its adapters only
        bf16 = cfg.train.precision == "bf16"
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=student, optimizer=opt, config=deepspeed_config(cfg, world_size, bf16)
        )
        self.stage = cfg.distributed.zero_stage
        self.accum = cfg.train.grad_accum
        self.student = student
        self._pending = 0

    @property
    def module(self) -> torch.nn.Module:
        """What the G turn calls (the engine forwards to the UNet)."""
        return self.engine

    # -- one iteration ----------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/grad_accum itself
        self._pending += 1
        if self._pending < self.accum:
            self.engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter

    def step(self, apply: bool = True) -> tuple[float, bool]:
        """The engine's step with its base optimizer's step guarded: skipped unless ``apply``
        and (stage 0) the norm is finite; ZeRO 1-3 skip a non-finite norm themselves (their
        overflow path). The engine's counters advance either way."""
        assert self._pending == self.accum, "step() after exactly grad_accum backward() calls"
        norm = None
        if self.stage == 0:  # DeepSpeed clips stage-0 fp32 gradients but does not keep the norm
            grads = [p.grad.norm() for p in self.student.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
        go = apply and (norm is None or math.isfinite(norm))
        base = self._base()
        real_step = base.step

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            return real_step(*args, **kwargs) if go else None

        own = vars(base).get("step")  # an instance attribute someone set (else the class's)
        base.step = guarded_step  # type: ignore[method-assign]
        try:
            self.engine.step()
        finally:
            if own is None:
                del base.step
            else:
                base.step = own  # type: ignore[method-assign]
        self._pending = 0
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        overflow = bool(getattr(self.optimizer, "overflow", False))
        return norm, go and math.isfinite(norm) and not overflow

    @contextlib.contextmanager
    def full_params(self) -> Iterator[list[torch.nn.Parameter]]:
        """G's parameters with their full values (ZeRO-3 gathers them; collective)."""
        params = list(self.student.parameters())
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield params
        else:
            yield params

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights on every rank. Under ZeRO-3 (partitions) or bf16 (low-precision
        copies) they are gathered from DeepSpeed's fp32 master (collective: every rank calls);
        otherwise the module already holds them."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for n, p in self.student.named_parameters():
            gather = self.stage == 3 or p.dtype != torch.float32
            full = safe_get_full_fp32_param(p) if gather else None
            out[n] = (full if full is not None else p).detach().float().cpu()
        out.update({n: b.detach().cpu() for n, b in self.student.named_buffers()})
        return out

    def full_module(self) -> ModelMixin:
        """G with full fp32 weights: the module itself unless it holds ZeRO-3 partitions or bf16
        copies, else a fresh copy from the gathered master (collective: every rank calls)."""
        if self.stage != 3 and next(self.student.parameters()).dtype == torch.float32:
            return self.student
        copy = type(self.student).from_config(self.student.config)
        copy.load_state_dict(self.full_state_dict())
        return copy

    # -- optimizer state, consolidated ------------------------------------------------------

    def set_lr(self, lr: float) -> None:
        optim.set_lr(self._base(), lr)  # the torch AdamW DeepSpeed steps (ZeRO: its partition)

    def _named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]

    def _step_count(self) -> float:
        for state in self._base().state.values():
            if "step" in state:
                return float(state["step"])
        return 0.0

    def _base(self) -> torch.optim.Optimizer:
        return self.optimizer if self.stage == 0 else self.optimizer.optimizer

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """``{i}.{exp_avg,exp_avg_sq,step}`` per parameter (collective under ZeRO; every rank
        gets the full tensors)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        if self.stage == 0:
            params = [p for _, p in self._named_params()]
            return optim.state_tensors(self.optimizer, params)
        out: dict[str, torch.Tensor] = {}
        step = self._step_count()
        for i, (_, p) in enumerate(self._named_params()):
            for key in ADAM_KEYS:
                v = safe_get_full_optimizer_state(p, key)
                if v is not None:
                    out[f"{i}.{key}"] = v.detach().float().cpu().contiguous()
            if f"{i}.exp_avg" in out:
                out[f"{i}.step"] = torch.tensor(step)
        return out

    def save(self, folder: Path, write: bool) -> None:
        """All ranks call (gathers); ``write`` on one rank puts the files in ``folder``."""
        tensors = self.optimizer_tensors()
        if write:
            optim.write_state(folder, tensors, self.optimizer)

    def load(self, folder: Path) -> None:
        """Scatter a consolidated state into this rank's partitions (any stage, any world)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        tensors = optim.read_state(folder)
        named = self._named_params()
        if self.stage == 0:
            optim.load_state_tensors(self.optimizer, [p for _, p in named], tensors)
        elif tensors:
            self._materialise_state()
            for i, (_, p) in enumerate(named):
                for key in ADAM_KEYS:
                    if f"{i}.{key}" in tensors:
                        safe_set_full_optimizer_state(p, tensors[f"{i}.{key}"], key)
            steps = [v for k, v in tensors.items() if k.endswith(".step")]
            for state in self._base().state.values():
                step = steps[0].clone().float() if steps else torch.tensor(0.0)
                old = state.get("step")  # fused AdamW keeps its step count on the device
                state["step"] = step.to(old.device) if torch.is_tensor(old) else step
        optim.load_hyperparameters(self.optimizer, folder)

    @torch.no_grad()
    def _materialise_state(self) -> None:
        """torch AdamW creates its state lazily at the first step: take one step with zero
        gradients and lr 0 (a no-op on the weights) so there is state to overwrite."""
        base = self._base()
        if self.stage == 3:  # ZeRO-3 hands the base optimizer one flat partition per sub-group
            zero = self.optimizer
            pairs = [
                (zero.sub_group_to_group_id[i], flat)
                for i, flat in enumerate(zero.fp32_partitioned_groups_flat)
            ]
        else:
            pairs = [(gi, p) for gi, g in enumerate(base.param_groups) for p in g["params"]]
        saved = [(g["lr"], g["params"]) for g in base.param_groups]
        for g in base.param_groups:
            g["lr"], g["params"] = 0.0, []
        for gi, p in pairs:
            base.param_groups[gi]["params"].append(p)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        base.step()
        for g, (lr, params) in zip(base.param_groups, saved, strict=True):
            g["lr"], g["params"] = lr, params
        for _, p in pairs:
            p.grad = None
        if hasattr(self.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2
            self.optimizer._lazy_init_hp_params_optimizer_state()  # links the state it now has

    def engine_state(self) -> dict[str, Any]:
        return {
            "zero_stage": self.stage,
            "global_steps": int(self.engine.global_steps),
            "micro_steps": int(self.engine.micro_steps),
            "gradient_accumulation_steps": self.accum,
            "world_size": int(self.engine.world_size),
        }

    def load_engine_state(self, state: dict[str, Any]) -> None:
        self.engine.global_steps = int(state.get("global_steps", 0))
        self.engine.global_samples = self.engine.global_steps * self.engine.train_batch_size()
