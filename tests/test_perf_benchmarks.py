"""The performance benchmarks run end to end on the CPU: benchmarks/train_throughput.py, and
benchmarks/gpu_sdxl*.py with --smoke (the tiny SDXL look-alike), so the code paths of the one
prepared GPU run (benchmarks/gpu_sdxl.sh) are exercised before it. The gpu_sdxl train phase puts
G under DeepSpeed: the first DeepSpeed run on a machine compiles its CPU shm op (~1.5 min,
cached in ~/.cache/torch_extensions, shared with tests/test_ray_train.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # each starts Python processes that import torch


def run(args: list[str], timeout: int = 300) -> str:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gpu_benchmark_imports_nothing_the_gpu_machine_lacks():
    """The GPU machine has torch/transformers but no ray, webdataset, s3fs or wandb (diffusers,
    deepspeed and pydantic travel as wheels): the benchmark's import chain must not need them."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks')\n"
        "import gpu_sdxl, gpu_sdxl_gen, gpu_sdxl_report, train_throughput\n"
        "import deepspeed, nitro_dist.distributed.g_update, nitro_dist.perf\n"
        "bad = {'ray', 'webdataset', 's3fs', 'wandb'} & {m.split('.')[0] for m in sys.modules}\n"
        "print('IMPORTED', sorted(bad))\n"
    )
    assert "IMPORTED []" in run(["-c", code])


def test_train_throughput_prints_the_breakdown_offline_and_online(tmp_path):
    out = run(
        [
            "benchmarks/train_throughput.py",
            "--config",
            "tiny",
            "--engine",
            "torch",
            "--iters",
            "1",
            "--breakdown-iters",
            "1",
            "--json",
            str(tmp_path / "t.json"),
        ]
    )
    assert "| | teacher offline | teacher online |" in out
    for row in ("images/s per worker", "g_backward ms", "backbone ms", "heads_optimizer ms"):
        assert f"| {row} |" in out, row
    teacher_row = next(line for line in out.splitlines() if line.startswith("| teacher ms |"))
    offline, online = (float(v) for v in teacher_row.strip("| ").split("|")[1:])
    assert offline == 0.0 < online  # the online teacher samples inside the iteration
    (rank0,) = json.loads((tmp_path / "t.json").read_text())
    assert [r["mode"] for r in rank0] == ["offline", "online"]


def test_train_throughput_rejects_a_bad_override():
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--config", "tiny", "optim.fused=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "optim.fused" in proc.stderr


def test_gpu_sdxl_smoke_runs_every_phase_and_reports(tmp_path):
    out = ["--out", str(tmp_path), "--smoke"]
    run(["benchmarks/gpu_sdxl.py", "flops", "--resolutions", "64", *out])
    run(["benchmarks/gpu_sdxl_gen.py", "--tag", "gen", *out])
    run(
        [
            "benchmarks/gpu_sdxl.py",
            "train",
            "--resolution",
            "64",
            "--batch",
            "2",
            "--iters",
            "2",
            "--settings",
            "opt",
            "--then-batch",
            "auto",
            "--budget",
            "600",
            "--tag",
            "512_opt",
            *out,
        ]
    )
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    kinds = [r["phase"] for r in rows]
    assert "error" not in kinds, [r for r in rows if r["phase"] == "error"]
    assert kinds.count("components") == 2 and kinds.count("generation") == 2
    train = [r for r in rows if r["phase"] == "train"]
    assert [r["batch"] for r in train] == [2, 4]  # the fixed batch, then the chosen one
    assert train[0]["settings"]["optim.fused"] is True
    assert train[0]["model_tflop_per_iteration"] < train[0]["hardware_tflop_per_iteration"]
    report = run(["benchmarks/gpu_sdxl_report.py", "--out", str(tmp_path)])
    assert "| 512_opt | 64 | 4 |" in report
    assert "eager_bf16 (gen)" in report and "AdamW step" in report
    assert (tmp_path / "gpu_sdxl.md").exists()
