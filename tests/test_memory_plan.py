"""The memory plan (nitro_dist/memory_plan.py, benchmarks/memory_plan.py): the fake-tensor
estimate of an iteration's peak against the same count on a real CPU iteration, every preset's
plan without weights, the fit verdict and bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from nitro_dist import memory_plan as MP
from nitro_dist.build import build_run
from nitro_dist.config import CONFIG_DIR, load_config
from nitro_dist.step import train_step

ROOT = Path(__file__).resolve().parent.parent
# SDXL-size meta models: 12-20 s on a busy 2-core machine
PRESETS = [
    pytest.param(p, marks=pytest.mark.slow) if p.startswith("sdxl") else p
    for p in sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
]
TOLERANCE = 0.25  # measured on tiny: the estimate is within about 5% of the real peak


def cli():
    spec = importlib.util.spec_from_file_location(
        "memory_plan_cli", ROOT / "benchmarks/memory_plan.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.slow  # ~25 s: a fake and two real tiny iterations
def test_estimate_matches_a_real_cpu_iteration():
    cfg = load_config("tiny", ["train.device=cpu"])
    p = MP.plan(cfg)
    run = build_run(cfg, progress=False)
    train_step(run, 0)  # AdamW state exists from here on, as in a running job
    tracker = MP.LiveBytes()
    hooks = tracker.exclude_grads(run.models.student)
    with tracker:
        train_step(run, 1)
    for h in hooks:
        h.remove()
    estimate = max(p.activations, p.optimizer_temp)
    error = estimate / tracker.peak - 1
    print(f"iteration peak: measured {tracker.peak} B, estimated {estimate} B, error {error:+.1%}")
    assert abs(error) < TOLERANCE


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_plans_without_weights(preset):
    p = MP.plan(load_config(preset), activations=False)
    assert p.total(0) > p.shared["G weights (fp32)"] > 0
    assert 0 < p.pool_numel and "head pool:" in p.pool_line()
    if preset.startswith("sdxl"):
        assert "SDXL base 1.0" in p.arch  # placeholder paths: SDXL's own configs
        assert 2.5e9 < p.shared["G weights (fp32)"] / 4 < 2.7e9  # SDXL's 2.6B-parameter UNet
        # the paper's 480 light heads: a small fraction of the UNet (width 256 made it 74%)
        assert p.num_heads == 480 and p.pool_numel < 0.1 * p.unet_numel
    if preset == "sdxl_1gpu":  # the paper's one-GPU recipe; its activations: results/*_1gpu.md
        assert p.world_size == 1 and p.micro_batch == 5 and p.fits(80 * MP.GiB - 17 * MP.GiB)
        assert p.host["G AdamW state (2 x fp32)"] > 0  # ZeRO-Offload: on the host, not the GPU


def test_zero_stage_and_workers_shard_the_student():
    cfg = ["distributed.num_workers=4", "train.batch_size=8", "train.precision=bf16"]
    p0 = MP.plan(load_config("tiny", cfg), activations=False)
    p3 = MP.plan(load_config("tiny", [*cfg, "distributed.zero_stage=3"]), activations=False)
    for key in ("G weights (fp32)", "G gradients (fp32)", "G AdamW state (2 x fp32)"):
        assert p3.shared[key] == p0.shared[key] // 4
    heads = [r["heads owned (weights, grads, AdamW)"] for r in p0.per_rank]
    assert len(heads) == 4 and sum(heads) > 0
    assert p0.shared["teacher = backbone (frozen)"] * 2 == p0.shared["G weights (fp32)"]  # bf16


def test_offload_and_8bit_adamw_move_and_shrink_the_optimizer_state():
    """optim.offload=cpu: G's AdamW state (and DeepSpeed's fp32 master and gradient partitions)
    in host rows, none on the device; state_bits=8: ~2 bytes of state per parameter, G's and
    the heads'."""
    base = ["distributed.num_workers=2", "train.batch_size=8", "distributed.zero_stage=2"]
    p32 = MP.plan(load_config("tiny", base), activations=False)
    off = MP.plan(load_config("tiny", [*base, "optim.offload=cpu"]), activations=False)
    state32 = p32.shared["G AdamW state (2 x fp32)"]
    assert state32 > 0 and not p32.host
    assert off.shared["G AdamW state (2 x fp32)"] == 0 and off.optimizer_temp == 0
    assert off.host["G AdamW state (2 x fp32)"] == state32
    assert off.host["G fp32 master partition"] == state32 // 2
    assert off.total(0) == p32.total(0) - state32 - p32.optimizer_temp
    assert off.host_total() >= 2 * state32 and "host: total" in off.table()
    eight = ["optim.state_bits=8", "pool.state_bits=8", "distributed.zero_stage=0"]
    p8 = MP.plan(load_config("tiny", [*base[:2], *eight]), activations=False)
    p0 = MP.plan(load_config("tiny", base[:2]), activations=False)
    ratio = p8.shared["G AdamW state (8-bit)"] / p0.shared["G AdamW state (2 x fp32)"]
    assert ratio == pytest.approx(2.03125 / 8, rel=1e-3)
    heads = "heads owned (weights, grads, AdamW)"
    assert p8.per_rank[0][heads] < 0.7 * p0.per_rank[0][heads]  # 10.03 of 16 bytes


def test_fit_verdict_and_exit_status(capsys):
    main = cli()
    assert main(["--config", "tiny", "--skip-activations", "--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "fits:" in out and "head pool: 36 heads" in out and "% of the UNet's" in out
    assert main(["--config", "tiny", "--skip-activations", "--device-memory", "1MiB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_bad_input_is_a_clear_error(capsys):
    main = cli()
    assert main(["--config", "tiny", "pool.nope=1"]) == 2
    assert "pool.nope" in capsys.readouterr().err
    assert main(["--config", "tiny", "--workers", "3"]) == 2  # batch 4 over 3 ranks
    assert "distributed.num_workers" in capsys.readouterr().err
    assert main(["--config", "tiny", "--device-memory", "lots"]) == 2
    assert "--device-memory" in capsys.readouterr().err
