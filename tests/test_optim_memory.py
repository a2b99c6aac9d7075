"""Optimizer memory options: 8-bit AdamW (``optim.state_bits`` / ``pool.state_bits``,
bitsandbytes' AdamW8bit, which runs on this CPU) and ZeRO-Offload of G's AdamW state to host
memory (``optim.offload=cpu``) under a real DeepSpeed engine in a one-rank gloo group."""

from __future__ import annotations

import pytest
import torch

from nitro_dist import optim
from nitro_dist.build import build_run
from nitro_dist.config import load_config
from nitro_dist.discriminator.pool import HeadPool, make_layout
from nitro_dist.step import train_step


def _net() -> torch.nn.Module:
    torch.manual_seed(0)  # conv weight 32 x 16 x 3 x 3 = 4,608 elements: 8-bit state (>= 4,096)
    return torch.nn.Sequential(
        torch.nn.Conv2d(16, 32, 3), torch.nn.SiLU(), torch.nn.Conv2d(32, 1, 1)
    )


def _steps(net: torch.nn.Module, opt: torch.optim.Optimizer, first: int, n: int) -> None:
    for i in range(first, first + n):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, 16, 6, 6, generator=g)
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_adamw8bit_on_cpu_follows_adamw_and_resumes_exactly(tmp_path):
    section8 = load_config("tiny", ["optim.state_bits=8", "optim.lr=1e-2"]).optim
    section32 = load_config("tiny", ["optim.lr=1e-2"]).optim
    start = [p.detach().clone() for p in _net().parameters()]
    net8, net32 = _net(), _net()
    opt8, opt32 = (
        optim.adamw(net8.parameters(), section8),
        optim.adamw(net32.parameters(), section32),
    )
    assert type(opt8).__name__ == "AdamW8bit" and type(opt32) is torch.optim.AdamW
    _steps(net8, opt8, 0, 5)
    _steps(net32, opt32, 0, 5)
    big = next(net8.parameters())
    assert opt8.state[big]["state1"].dtype == torch.uint8  # 1 byte per moment element
    for p8, p32, p0 in zip(net8.parameters(), net32.parameters(), start, strict=True):
        moved = (p32 - p0).abs().max()
        assert moved > 0 and (p8 - p32).abs().max() < 0.1 * moved  # the same AdamW, quantised
    # checkpoint round trip through the files (safetensors + json): a resumed optimizer steps
    # identically
    params8 = list(net8.parameters())
    optim.write_state(tmp_path, optim.state_tensors(opt8, params8), opt8)
    saved = optim.read_state(tmp_path)
    resumed = _net()
    resumed.load_state_dict(net8.state_dict())
    opt_r = optim.adamw(resumed.parameters(), section8)
    optim.load_state_tensors(opt_r, list(resumed.parameters()), saved)
    optim.load_hyperparameters(opt_r, tmp_path)
    _steps(net8, opt8, 5, 2)
    _steps(resumed, opt_r, 5, 2)
    assert all(
        torch.equal(a, b) for a, b in zip(net8.parameters(), resumed.parameters(), strict=True)
    )
    # a 32-bit state cannot silently become an 8-bit one (or back)
    with pytest.raises(ValueError, match="state_bits"):
        optim.load_state_tensors(
            opt_r, params8, optim.state_tensors(opt32, list(net32.parameters()))
        )
    with pytest.raises(ValueError, match="state_bits"):
        optim.load_state_tensors(opt32, list(net32.parameters()), saved)


def test_8bit_heads_step_with_8bit_state():
    cfg = load_config("digits", ["pool.state_bits=8", "pool.width=8", "pool.candidates=1",
                                 "pool.kinds=[global_cond]", "pool.t_buckets=[10]"])  # fmt: skip
    lay = make_layout(cfg.pool, [(1280, 4, 4)])
    pool = HeadPool(lay, cfg.pool, seed=0)
    assert type(pool.optimizer).__name__ == "AdamW8bit"
    head = pool.head(0)
    before = [p.detach().clone() for p in head.parameters()]
    head(torch.randn(2, 1280, 4, 4)).mean().backward()
    pool.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, head.parameters(), strict=True))
    first = next(head.parameters())  # 8 x 1280 x 4 x 4 conv
    assert pool.optimizer.state[first]["state1"].dtype == torch.uint8
    assert pool.refresh([0], iteration=0) == [0] and first not in pool.optimizer.state


@pytest.mark.slow  # two tiny DeepSpeed engines in this process
def test_offload_and_8bit_adamw_under_deepspeed_train_and_resume(one_rank_group, tmp_path):
    """ZeRO-Offload (ZeRO-2, torch AdamW on the host copy: zero_force_ds_cpu_optimizer off)
    and 8-bit AdamW for G (ZeRO-0) and the heads: each trains G and its consolidated optimizer
    state round-trips through a checkpoint into a fresh engine."""
    from nitro_dist.distributed.parallel import parallelize

    small = ["train.batch_size=2", "pool.refresh_rate=0", "pool.levels=[0]", "pool.candidates=1"]
    options = {
        "offload": (["distributed.zero_stage=2", "optim.offload=cpu"], "AdamW", True),
        "8bit": (["optim.state_bits=8", "pool.state_bits=8"], "AdamW8bit", False),
    }
    for name, (extra, optimizer, offload) in options.items():
        cfg = load_config("tiny", small + extra)
        run = build_run(cfg, progress=False)
        parallelize(run, 0, 1)
        before = [p.detach().clone() for p in run.g.full_module().parameters()]
        for i in range(2):
            train_step(run, i)
        after = run.g.full_module().parameters()
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), name
        base = run.g._base()
        assert type(base).__name__ == optimizer, name
        dtypes = {
            v.dtype
            for st in base.state.values()
            for v in st.values()
            if torch.is_tensor(v) and v.ndim > 0
        }
        assert dtypes == ({torch.float32} if name == "offload" else {torch.float32, torch.uint8})
        assert bool(getattr(run.g.optimizer, "cpu_offload", False)) == offload, name
        run.g.save(tmp_path / name, True)
        again = build_run(cfg, progress=False)
        parallelize(again, 0, 1)
        again.g.load(tmp_path / name)
        a, b = run.g.optimizer_tensors(), again.g.optimizer_tensors()
        assert len(a) > 0 and a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
