"""The one AdamW every trainable part uses (G on one process, G under DeepSpeed, the heads):
torch's AdamW, or with ``state_bits: 8`` bitsandbytes' AdamW8bit (block-wise 8-bit moments: 2
bytes of state per parameter instead of 8; parameters under 4,096 elements keep fp32 state)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nitro_dist.config import OptimConfig

SECTION_KEYS = {"OptimConfig": "optim", "PoolConfig": "pool"}  # config section -> its key


def scheduled_lr(section: OptimConfig, iterations: int, iteration: int) -> float | None:
    """G's learning rate at ``iteration`` (0-based) of ``iterations`` from an ``OptimConfig``:
    ``lr`` x a linear warm-up over ``warmup_iterations`` x (``lr_schedule`` "cosine") half a
    cosine to 0 at the run's end, taken at the iteration's midpoint. None for a constant lr
    with no warm-up: the optimizer's lr stands (as loaded from a checkpoint). A function of the
    iteration alone, so a resumed run continues the same schedule."""
    if section.lr_schedule == "constant" and section.warmup_iterations == 0:
        return None
    f = min(1.0, (iteration + 1) / section.warmup_iterations) if section.warmup_iterations else 1.0
    if section.lr_schedule == "cosine":
        f *= 0.5 * (1 + math.cos(math.pi * min(1.0, (iteration + 0.5) / iterations)))
    return section.lr * f


def ema_decay_at(section: OptimConfig, iteration: int) -> float:
    """G's EMA decay at ``iteration`` from an ``OptimConfig``: ``ema_decay``, ramped linearly from
    0 over ``ema_warmup_iterations`` (the EMA follows G at first, then averages ever longer)."""
    w = section.ema_warmup_iterations
    return section.ema_decay * min(1.0, iteration / w) if w else section.ema_decay


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def adamw(params: Iterable[torch.nn.Parameter], section) -> torch.optim.Optimizer:
    """AdamW from a config section with ``lr``, ``betas``, ``weight_decay``, ``fused`` and
    ``state_bits`` (``OptimConfig`` for G, ``PoolConfig`` for the heads). ``fused`` off leaves
    torch choosing the implementation (foreach on GPU); on, one kernel with no full-size
    temporaries. ``state_bits`` 8: bitsandbytes' AdamW8bit (its CPU and CUDA kernels)."""
    if section.state_bits == 8:
        key = f"{SECTION_KEYS.get(type(section).__name__, 'optim')}.state_bits"
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError(
                f"{key}=8 needs bitsandbytes (pip install bitsandbytes==0.50.2): {e}"
            ) from e
        return bnb.optim.AdamW8bit(
            params, lr=section.lr, betas=tuple(section.betas), weight_decay=section.weight_decay
        )
    return torch.optim.AdamW(
        params,
        lr=section.lr,
        betas=tuple(section.betas),
        weight_decay=section.weight_decay,
        fused=section.fused or None,
    )


# ---------------------------------------------------------------------------------------------
# optimizer state <-> safetensors + json (one format for every G update and the heads)

# param_group keys that choose an implementation, not the maths: a checkpoint does not set them
IMPLEMENTATION_KEYS = ("params", "fused", "foreach", "capturable", "differentiable")
STATE_FILE, GROUPS_FILE = "state.safetensors", "param_groups.json"


def state_tensors(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """State of ``params`` (in that order) as flat tensors: ``{prefix}{i}.{name}``."""
    out = {}
    seen: set[int] = set()  # safetensors refuses shared storage: AdamW8bit's qmaps are one tensor
    for i, p in enumerate(params):
        for name, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                t = v.detach().cpu().contiguous()
                shared = t.untyped_storage().data_ptr() in seen
                seen.add(t.untyped_storage().data_ptr())
                out[f"{prefix}{i}.{name}"] = t.clone() if shared else t
            else:
                out[f"{prefix}{i}.{name}"] = torch.tensor(v)
    return out


def load_state_tensors(
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    tensors: dict[str, torch.Tensor],
    prefix: str = "",
) -> None:
    # fused (and capturable) AdamW keep the step count next to the parameter, the others on CPU
    step_on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
    eight_bit = type(opt).__module__.startswith("bitsandbytes")
    names = {key.split(".")[-1] for key in tensors if key.startswith(prefix)}
    foreign = names & ({"exp_avg", "exp_avg_sq"} if eight_bit else {"state1", "state2"})
    if foreign:
        raise ValueError(
            f"the saved optimizer state has {sorted(foreign)}, written with "
            f"state_bits={32 if eight_bit else 8}; this run's {type(opt).__name__} cannot take "
            "it: resume with the state_bits of the checkpoint (optim.state_bits, pool.state_bits)"
        )
    for i, p in enumerate(params):
        state: dict[str, torch.Tensor | int] = {}
        head = f"{prefix}{i}."
        for key, v in tensors.items():
            if key.startswith(head):
                name = key[len(head) :]
                if name == "step" and not v.is_floating_point():
                    state[name] = int(v)  # bitsandbytes counts steps in a Python int
                elif name == "step":
                    state[name] = v.to(p.device if step_on_device else "cpu", torch.float32)
                else:
                    state[name] = v.to(p.device)
        if state:
            opt.state[p] = state
        else:
            opt.state.pop(p, None)


def write_state(folder: Path, tensors: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> None:
    """``tensors`` (``state_tensors`` or a gathered equivalent) and ``opt``'s hyperparameters."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / STATE_FILE))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    (folder / GROUPS_FILE).write_text(json.dumps(groups, default=list))


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / STATE_FILE))


def load_hyperparameters(opt: torch.optim.Optimizer, folder: Path) -> None:
    """The saved hyperparameters of each group; how AdamW runs (fused, foreach) stays the
    config's choice."""
    groups = json.loads((folder / GROUPS_FILE).read_text())
    for g, saved in zip(opt.param_groups, groups, strict=True):
        for k, v in saved.items():
            if k not in IMPLEMENTATION_KEYS:
                g[k] = tuple(v) if isinstance(g.get(k), tuple) else v
