"""Training through Ray Train on a local Ray cluster (CPU, gloo, DeepSpeed ZeRO 0-3).

Every run trains the tiny config for 4 iterations from the same seed and global batch, so they
must all end with the same generator and the same pool (tolerance ATOL, fp32): W=1 vs W=2,
ZeRO stages 0/1/2/3, a run split by a checkpoint, an elastic W=2 -> W=1 resume, and a run whose
worker is killed at an injected iteration and restarted by Ray.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nitro_dist.checkpoint_layout import latest
from nitro_dist.config import load_config
from nitro_dist.distributed.ray_train import launch
from nitro_dist.train import main

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

# fp32 on CPU: only reduction orders differ (ZeRO partitions, 2 ranks, micro-batches); the heads'
# AdamW turns tiny gradient differences into up to ~4e-5 after its first steps
ATOL = 1e-4
BASE = [
    "train.iterations=4",
    "train.checkpoint_every=2",
    "train.batch_size=4",
    "pool.refresh_rate=0.2",
    "pool.candidates=2",
    "distributed.cpus_per_worker=0.5",
]


def run(tmp: Path, name: str, *overrides: str, resume: str | None = None) -> dict:
    cfg = load_config(
        "tiny", [*BASE, f"run_name={name}", f"distributed.storage_path={tmp}", *overrides]
    )
    return launch(cfg, resume)


def weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Generator weights + every pool head (stored by global id, from all ranks)."""
    out = {
        f"G.{k}": v
        for k, v in load_file(
            ckpt_dir / "generator" / "diffusion_pytorch_model.safetensors"
        ).items()
    }
    for f in sorted((ckpt_dir / "pool").glob("head_*.safetensors")):
        out.update({f"{f.stem}.{k}": v for k, v in load_file(f).items() if k.startswith("param.")})
    return out


def assert_same(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert any(k.startswith("head_") for k in wa)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=ATOL, msg=k)


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    out = run(tmp, "w1", "distributed.num_workers=1", "distributed.zero_stage=0")
    return tmp, Path(out["checkpoint"])


def test_w1_and_w2_zero1_give_the_same_generator_and_pool(reference):
    tmp, ref = reference
    # 2 ranks x 2 micro-batches of 1 accumulate to the reference's batch of 4
    out = run(
        tmp, "w2", "distributed.num_workers=2", "distributed.zero_stage=1", "train.grad_accum=2"
    )
    ck = Path(out["checkpoint"])
    assert ck.name == "iter_000004" and out["iteration"] == 4
    assert_same(ref, ck)
    # each rank held only the heads it owns: about half the pool's parameters each
    ranks = [json.loads((ck / "ranks" / f"rank_{r:05d}.json").read_text()) for r in range(2)]
    one = json.loads((ref / "ranks" / "rank_00000.json").read_text())
    assert sorted(ranks[0]["heads"] + ranks[1]["heads"]) == one["heads"]
    for r in ranks:
        assert r["pool_params"] / one["pool_params"] <= 0.55
        assert r["pool_numel"] < one["pool_numel"]
    # the run folder a user looks at
    run_dir = tmp / "w2"
    assert (run_dir / "config.yaml").exists() and (run_dir / "final_metrics.json").exists()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"g_loss", "d_loss", "d_acc_real", "active_heads", "images_per_s"} <= rows[0].keys()
    assert latest(run_dir) == ck


SPLIT = ["distributed.num_workers=2", "distributed.zero_stage=2"]


@pytest.fixture(scope="module")
def half_w2(cluster, tmp_path_factory):
    """The first 2 of the 4 iterations, W=2 ZeRO-2, as run "split": (storage, its checkpoint).
    Users only add checkpoints after it (a rerun of "split") or read it."""
    tmp = tmp_path_factory.mktemp("split")
    first = run(tmp, "split", *SPLIT, "train.iterations=2")
    return tmp, Path(first["checkpoint"])


def test_rerun_resumes_exactly_and_a_killed_worker_is_restarted_zero3(reference, half_w2):
    """A rerun of "split" continues from its iteration-2 checkpoint under ZeRO-3 (G's optimizer
    state is stored consolidated, so the stage may change); rank 1 is killed at iteration 3 and
    Ray restarts the worker group from that checkpoint again: the result is the uninterrupted
    run's."""
    _, ref = reference
    tmp, first = half_w2
    assert first.name == "iter_000002"
    again = run(
        tmp,
        "split",
        "distributed.num_workers=2",
        "distributed.zero_stage=3",
        "distributed.max_failures=1",
        "distributed.fail_at_iteration=3",
        "distributed.fail_rank=1",
    )
    ck = Path(again["checkpoint"])
    assert ck.name == "iter_000004" and (ck / "trainer_state.json").exists()
    assert (tmp / "split" / "faults" / "injected_at_3_rank1").exists()  # the kill happened
    assert_same(ref, ck)
    state = json.loads((ck / "deepspeed" / "engine.json").read_text())
    assert state["zero_stage"] == 3 and state["global_steps"] == 4


def test_elastic_resume_w2_checkpoint_on_w1(reference, half_w2):
    tmp, ref = reference
    _, w2_ckpt = half_w2
    assert w2_ckpt.name == "iter_000002" and w2_ckpt.exists()
    out = run(tmp, "elastic", "distributed.num_workers=1", resume=str(w2_ckpt))
    assert_same(ref, Path(out["checkpoint"]))


def test_fault_without_retries_fails_with_the_cause(cluster, tmp_path, capsys):
    code = main(
        [
            "--config",
            "tiny",
            *BASE,
            f"--run-dir={tmp_path}/nofault",
            "distributed.fail_at_iteration=1",
        ]
    )
    assert code == 1
    assert "training failed" in capsys.readouterr().err
