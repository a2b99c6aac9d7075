"""No fault loses a run (issue 17): numeric faults and checkpoint integrity, on one process.

Numeric faults are injected with ``distributed.nan_at_iterations`` (rank ``fail_rank`` makes its
G loss NaN); checkpoint faults are made by hand: a truncated file, a flipped bit, a writer killed
in the middle of a checkpoint, a checkpoint half copied into place while a reader looks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nitro_dist import checkpoint as ckpt
from nitro_dist import checkpoint_layout as layout
from nitro_dist.build import build_run
from nitro_dist.checkpoint_layout import INFERENCE_PARTS, CheckpointWarning
from nitro_dist.config import load_config
from nitro_dist.inference import Generator
from nitro_dist.loop import train
from nitro_dist.step import train_step

QUICK = ["train.sample_every=0", "train.eval_every=0", "logging.progress=false"]
G_FILE = "generator/diffusion_pytorch_model.safetensors"


def _state(run) -> dict[str, torch.Tensor]:
    """Everything a step may change: G, its AdamW state, the EMA, the heads, their AdamW state."""
    out = {f"g.{n}": p.detach().clone() for n, p in run.models.student.named_parameters()}
    for i, st in enumerate(run.g.optimizer.state.values()):
        out.update({f"g_opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    if run.ema is not None:
        out.update({f"ema.{n}": p.detach().clone() for n, p in run.ema.named_parameters()})
    out.update({f"head.{n}": p.detach().clone() for n, p in run.pool.local.named_parameters()})
    for i, st in enumerate(run.pool.local.optimizer.state.values()):
        out.update({f"h_opt.{i}.{k}": torch.as_tensor(v).clone() for k, v in st.items()})
    return out


def test_nonfinite_step_changes_nothing_and_the_next_one_trains(tiny_cfg):
    cfg = tiny_cfg(
        "distributed.nan_at_iterations=[1]",
        "optim.ema_decay=0.5",
        "pool.refresh_rate=1.0",  # a step that ran would re-initialise every head
        "train.batch_size=2",
    )
    run = build_run(cfg, progress=False)
    assert train_step(run, 0)["skipped"] == 0.0  # AdamW state exists from here on
    before = _state(run)
    m = train_step(run, 1)
    assert m["skipped"] == 1.0 and m["refreshed_heads"] == 0
    after = _state(run)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed in a skipped step"
    m = train_step(run, 2)
    assert m["skipped"] == 0.0
    moved = _state(run)
    assert any(not torch.equal(before[k], moved[k]) for k in before if k.startswith("g."))
    assert all(torch.isfinite(v.float()).all() for v in moved.values())


@pytest.mark.slow  # 6-10 s on 2 busy cores: make test, not test-fast
def test_skipped_steps_are_counted_and_too_many_in_a_row_stop_the_run(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(
        *QUICK,
        "train.iterations=6",
        "train.batch_size=2",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=10",
        "train.max_nonfinite_steps=2",
        "distributed.nan_at_iterations=[1, 3, 4]",
    )
    with pytest.raises(ckpt.NonFiniteError, match=r"train.max_nonfinite_steps: 2 steps in a row"):
        train(cfg, tmp_path)
    warned = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning:")]
    assert [x.split(":")[1].strip() for x in warned] == [
        "iteration 2",
        "iteration 4",
        "iteration 5",
    ]
    assert "3 skipped so far, 2 in a row of train.max_nonfinite_steps=2" in warned[-1]
    root = tmp_path / "checkpoints"
    # iterations 0-3 were checkpointed (1 and 3 skipped); the run stopped in iteration 4
    assert sorted(p.name for p in root.glob("iter_*")) == [f"iter_00000{i}" for i in (1, 2, 3, 4)]
    states = [
        json.loads((root / f"iter_00000{i}" / "trainer_state.json").read_text()) for i in (1, 2, 4)
    ]
    assert [s["skipped_steps"] for s in states] == [0, 1, 2]
    # the skipped iteration 1 changed no weight: checkpoints 1 and 2 hold the same G and heads
    for rel in (G_FILE, "pool/head_000000.safetensors"):
        a, b = (
            load_file(str(root / "iter_000001" / rel)),
            load_file(str(root / "iter_000002" / rel)),
        )
        assert all(torch.equal(a[k], b[k]) for k in a), rel
        c = load_file(str(root / "iter_000003" / rel))
        assert all(torch.isfinite(v).all() for v in c.values())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["skipped"], r["skipped_steps"]) for r in rows] == [
        (1, 0.0, 0),
        (2, 1.0, 1),
        (3, 0.0, 1),
        (4, 1.0, 2),
    ]


def test_weights_that_are_not_finite_are_never_written(tiny_cfg, tmp_path):
    run = build_run(tiny_cfg(), progress=False)
    with torch.no_grad():
        next(run.models.student.parameters())[0] = float("nan")
    with pytest.raises(ckpt.NonFiniteError, match="generator"):
        ckpt.write_checkpoint(run.checkpoint_parts(), tmp_path)
    assert layout.verify(tmp_path)  # nothing that counts as a checkpoint


# ---------------------------------------------------------------------------------------------
# checkpoint integrity


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A tiny run with checkpoints at iterations 1 and 2 (copy before changing it)."""
    out = tmp_path_factory.mktemp("two")
    cfg = load_config(
        "tiny", [*QUICK, "train.iterations=2", "train.batch_size=2", "train.checkpoint_every=1"]
    )
    train(cfg, out)
    return out


@pytest.fixture
def run_dir(two_checkpoints, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(two_checkpoints, dst)
    return dst


def test_parts_list_every_file_with_size_and_checksum(run_dir):
    ck = run_dir / "checkpoints" / "iter_000002"
    part = json.loads((ck / "ranks" / "rank_00000.json").read_text())
    assert part["format"] == layout.PART_FORMAT
    on_disk = {p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file()}
    assert set(part["files"]) == on_disk - {"ranks/rank_00000.json"}
    rec = part["files"][G_FILE]
    assert rec["size"] == (ck / G_FILE).stat().st_size
    assert rec["blake2b"] == layout.file_hash(ck / G_FILE)
    assert layout.verify(ck) == []


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip_bit(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_bit], ids=["truncated", "bit_flipped"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(run_dir, damage):
    root = run_dir / "checkpoints"
    damage(root / "iter_000002" / G_FILE)
    for read in (None, INFERENCE_PARTS):  # training resume, and readers of the generator
        with pytest.warns(CheckpointWarning, match=r"iter_000002: generator/diffusion"):
            assert layout.resolve(run_dir, parts=read) == root / "iter_000001"
    with pytest.warns(CheckpointWarning):
        gen = Generator.from_checkpoint(run_dir)
    assert gen.unet is not None
    with pytest.raises(ValueError, match="iter_000002 does not verify.*generator/diffusion"):
        layout.resolve(root / "iter_000002", parts=INFERENCE_PARTS)
    student = build_run(load_config("tiny"), progress=False).models.student
    with pytest.raises(ValueError, match="does not verify"):  # resuming from it, named
        ckpt.load_weights(root / "iter_000002", student, None)


def test_damage_to_a_part_a_reader_skips_only_matters_to_readers_of_it(run_dir):
    root = run_dir / "checkpoints"
    _flip_bit(root / "iter_000002" / "pool" / "head_000000.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inference: no warning, the newest
        assert layout.resolve(run_dir, parts=INFERENCE_PARTS) == root / "iter_000002"
    with pytest.warns(CheckpointWarning, match="head_000000.safetensors: checksum"):
        assert layout.latest(root) == root / "iter_000001"  # training resume falls back


def test_a_checkpoint_half_copied_into_place_is_never_picked(run_dir, tmp_path):
    """Ray Train and object storage fill ``iter_*`` in place, file by file, in any order: at every
    stage a reader of the run folder gets the previous checkpoint, then the new one."""
    root = run_dir / "checkpoints"
    src = root / "iter_000002"
    staged = tmp_path / "src"
    shutil.move(src, staged)
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    files.remove("ranks/rank_00000.json")
    files.insert(0, "ranks/rank_00000.json")  # the worst order: the part file first
    for i, rel in enumerate(files):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            if rel == G_FILE:  # half of the weights are there
                (src / rel).write_bytes((staged / rel).read_bytes()[:1000])
                assert layout.resolve(run_dir, parts=INFERENCE_PARTS) == root / "iter_000001"
            shutil.copy2(staged / rel, src / rel)
            want = "iter_000002" if i == len(files) - 1 else "iter_000001"
            assert layout.resolve(run_dir, parts=INFERENCE_PARTS).name == want, rel
            assert layout.latest(root).name == want, rel


def test_object_storage_copy_is_verified_before_it_counts(run_dir, tmp_path, monkeypatch):
    import fsspec

    from nitro_dist import remote

    monkeypatch.setattr(remote, "CACHE", tmp_path / "cache")
    fs = fsspec.filesystem("memory")
    url = f"memory://trust-{os.getpid()}/run"
    fs.put(str(run_dir / "checkpoints"), f"/trust-{os.getpid()}/run", recursive=True)
    try:
        _truncate_remote(fs, f"/trust-{os.getpid()}/run/iter_000002/{G_FILE}")
        with pytest.warns(CheckpointWarning, match="iter_000002"):
            assert remote.remote_checkpoint(url) == f"{url}/iter_000001"
        # a flip that keeps the size passes the listing; the copy's checksum catches it
        good = f"{url}/iter_000001"
        path = f"/trust-{os.getpid()}/run/iter_000001/{G_FILE}"
        data = bytearray(fs.cat_file(path))
        data[-100] ^= 1
        fs.pipe_file(path, bytes(data))
        assert remote.remote_checkpoint(good) == good
        with pytest.raises(ValueError, match="downloaded copy does not verify"):
            remote.local_checkpoint(good)
        assert not list((tmp_path / "cache").glob("*/.complete"))
    finally:
        fs.rm(f"/trust-{os.getpid()}", recursive=True)


def _truncate_remote(fs, path: str) -> None:
    fs.pipe_file(path, fs.cat_file(path)[:1000])


KILLED_WRITER = """
import os, sys
from pathlib import Path
from nitro_dist import checkpoint
from nitro_dist.config import load_config
from nitro_dist.loop import train

real = checkpoint.save_pool
def dying_save_pool(pool, folder):
    if ".tmp-iter_000002" in str(folder):
        real(pool, folder)
        os._exit(9)  # killed half way through the checkpoint: heads written, no part file
    real(pool, folder)
checkpoint.save_pool = dying_save_pool
train(load_config("tiny", sys.argv[2:]), Path(sys.argv[1]))
"""


@pytest.mark.slow
@pytest.mark.drill
def test_a_writer_killed_mid_checkpoint_leaves_the_last_one_and_is_cleaned_up(tmp_path):
    args = [*QUICK, "train.batch_size=2", "train.checkpoint_every=1"]
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path), *args, "train.iterations=3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 9, proc.stderr[-2000:]
    root = tmp_path / "checkpoints"
    stale = list(root.glob(".tmp-iter_000002-*"))
    assert len(stale) == 1 and (stale[0] / "pool").is_dir()
    assert layout.latest(root) == root / "iter_000001"
    final = train(load_config("tiny", [*args, "train.iterations=3"]), tmp_path)  # resumes
    assert final["iteration"] == 3
    assert not list(root.glob(".tmp-*")), "the dead writer's temp folder was not cleaned"
    assert layout.latest(root) == root / "iter_000003"


@pytest.mark.slow
@pytest.mark.drill
def test_serving_from_a_run_folder_while_it_trains(tmp_path):
    cfg = load_config(
        "tiny",
        [*QUICK, "train.iterations=4", "train.batch_size=2", "train.checkpoint_every=1"],
    )
    errors: list[BaseException] = []

    def trainer() -> None:
        try:
            train(cfg, tmp_path)
        except BaseException as e:  # reported by the test below
            errors.append(e)

    t = threading.Thread(target=trainer)
    t.start()
    loaded = set()
    while t.is_alive() or not loaded:
        try:
            path = layout.resolve(tmp_path, parts=INFERENCE_PARTS)
        except ValueError as e:  # nothing committed yet
            assert "no checkpoint found" in str(e)
            t.join(0.2)
            continue
        gen = Generator.from_checkpoint(path)
        img = gen(["a cat"], [0], steps=1)
        assert torch.isfinite(img).all()
        loaded.add(path.name)
    t.join()
    assert not errors, errors
    assert loaded and loaded <= {f"iter_00000{i}" for i in range(1, 5)}


@pytest.mark.slow
def test_deepspeed_skips_a_nonfinite_step_under_every_zero_stage(one_rank_group):
    """The guarded engine step: ZeRO 0 (DeepSpeed does not check) and ZeRO 2/3 (their overflow
    path) leave G's weights and AdamW state as they were; a one-rank gloo group in this
    process, the 2-level tiny SDXL UNet (ZeRO-3 gathers and releases every parameter of every
    call, and fewer tensors cost less; the guarded step does not depend on the depth)."""
    from nitro_dist.distributed.parallel import parallelize
    from nitro_dist.models import tiny
    from nitro_dist.models.builders import build_sdxl_from_configs

    linear = torch.nn.functional.linear
    for stage in (0, 2, 3):
        overrides = [f"distributed.zero_stage={stage}", "train.batch_size=2",
                     "pool.refresh_rate=0", "distributed.nan_at_iterations=[1]",
                     "teacher.timesteps=[999,499]", "pool.levels=[0]"]  # fmt: skip
        models = build_sdxl_from_configs(
            tiny.TINY_SDXL_UNET_2LEVEL, tiny.TINY_SDXL_TEXT_ENCODERS, None
        )
        run = build_run(load_config("tiny", overrides), progress=False, models=models)
        parallelize(run, 0, 1)
        train_step(run, 0)
        before = [p.detach().clone() for p in run.g.full_module().parameters()]
        steps = run.g._step_count()
        assert train_step(run, 1)["skipped"] == 1.0, stage
        after = run.g.full_module().parameters()
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), stage
        assert run.g._step_count() == steps, stage  # AdamW state untouched
        assert train_step(run, 2)["skipped"] == 0 and run.g._step_count() == steps + 1, stage
        # the process is left as it was: ZeRO-3 by default swaps torch.nn.functional.linear for
        # its own for good (TorchScript of any Linear afterwards fails, test_eval's tiny nets)
        assert torch.nn.functional.linear is linear, stage
