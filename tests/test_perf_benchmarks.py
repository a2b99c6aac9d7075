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
import torch

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # tiny SDXL training and generation under DeepSpeed


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


@pytest.fixture(scope="module")
def benchmarks():
    """benchmarks/ importable in this process (gpu_sdxl_gen imports gpu_sdxl as a sibling)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT / "benchmarks"))
        yield


# The train phase runs as gpu_sdxl.sh runs it, a process of its own (DeepSpeed, a process
# group), which then lists what it imported: the benchmark modules' chain and the train phase's
GPU_TRAIN = """
import sys
sys.path.insert(0, "benchmarks")
import gpu_sdxl, gpu_sdxl_gen, gpu_sdxl_report, train_throughput
import deepspeed, nitro_dist.distributed.g_update, nitro_dist.perf
gpu_sdxl.main(sys.argv[1:])
bad = {"ray", "webdataset", "s3fs", "wandb"} & {m.split(".")[0] for m in sys.modules}
print("IMPORTED", sorted(bad))
"""


@pytest.fixture(scope="module")
def gpu_smoke(benchmarks, tmp_path_factory):
    """Every gpu_sdxl.sh phase with --smoke: flops, gen and report in this process, train in
    its own. Returns the output folder and what the train process printed."""
    import gpu_sdxl
    import gpu_sdxl_gen

    tmp = tmp_path_factory.mktemp("gpu_sdxl")
    out = ["--out", str(tmp), "--smoke"]
    gpu_sdxl.main(["flops", "--resolutions", "64", *out])
    gpu_sdxl_gen.main(["--tag", "gen", *out])
    train = run(
        [
            "-c",
            GPU_TRAIN,
            "train",
            "--resolution",
            "64",
            "--batch",
            "2",
            "--warmup",
            "1",
            "--iters",
            "1",
            "--breakdown-iters",
            "1",
            "--settings",
            "opt",
            "--then-batch",
            "auto",
            "--budget",
            "3600",  # the larger batch is tried only with time left for it: a loaded CPU
            "--tag",
            "512_opt",
            *out,
        ]
    )
    return tmp, train


@pytest.mark.drill  # the prepared GPU run end to end (~70 s on 2 cores)
def test_gpu_benchmark_imports_nothing_the_gpu_machine_lacks(gpu_smoke):
    """The GPU machine has torch/transformers but no ray, webdataset, s3fs or wandb (diffusers,
    deepspeed and pydantic travel as wheels): neither the benchmark's import chain nor what its
    train phase imports while it runs may need them."""
    _, train = gpu_smoke
    assert "IMPORTED []" in train


@pytest.mark.drill  # the prepared GPU run end to end (~70 s on 2 cores)
def test_gpu_sdxl_smoke_runs_every_phase_and_reports(gpu_smoke, capsys):
    import gpu_sdxl_report

    tmp_path, _ = gpu_smoke
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    kinds = [r["phase"] for r in rows]
    assert "error" not in kinds, [r for r in rows if r["phase"] == "error"]
    assert kinds.count("components") == 2 and kinds.count("generation") == 2
    train = [r for r in rows if r["phase"] == "train"]
    assert [r["batch"] for r in train] == [2, 4]  # the fixed batch, then the chosen one
    assert train[0]["settings"]["optim.fused"] is True
    assert train[0]["model_tflop_per_iteration"] < train[0]["hardware_tflop_per_iteration"]
    capsys.readouterr()
    gpu_sdxl_report.main(["--out", str(tmp_path)])
    report = capsys.readouterr().out
    assert "| 512_opt | 64 | 4 |" in report
    assert "eager_bf16 (gen)" in report and "AdamW step" in report
    assert (tmp_path / "gpu_sdxl.md").exists()


def test_train_throughput_prints_the_breakdown_offline_and_online(
    benchmarks, tmp_path, monkeypatch, capsys
):
    """In this process: train_throughput's one worker makes (and destroys) a one-rank gloo
    group and sets the launcher's variables (put back afterwards)."""
    import train_throughput

    from nitro_dist.distributed.parallel import free_port

    one_rank = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    for k, v in {**one_rank, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)  # the values it sets, put back as they were afterwards
    threads = torch.get_num_threads()
    try:
        status = train_throughput.main(
            [
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
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    out = capsys.readouterr().out
    assert "| | teacher offline | teacher online |" in out
    for row in ("images/s per worker", "g_backward ms", "backbone ms", "heads_optimizer ms"):
        assert f"| {row} |" in out, row
    teacher_row = next(line for line in out.splitlines() if line.startswith("| teacher ms |"))
    offline, online = (float(v) for v in teacher_row.strip("| ").split("|")[1:])
    assert offline == 0.0 < online  # the online teacher samples inside the iteration
    (rank0,) = json.loads((tmp_path / "t.json").read_text())
    assert [r["mode"] for r in rank0] == ["offline", "online"]
    assert not torch.distributed.is_initialized()


def test_train_throughput_rejects_a_bad_override(benchmarks, capsys):
    """A bad override fails before anything is built (the exit status main returns)."""
    import train_throughput

    assert train_throughput.main(["--config", "tiny", "optim.fused=2"]) == 2
    assert "optim.fused" in capsys.readouterr().err
