"""The data layer end to end on a local Ray and a real S3-compatible server (moto's, 127.0.0.1):
prompt shards -> `prepare` (Ray Data teacher actors) -> pair shards in S3 -> the digits task
trained from them with 2 workers, offline teacher, a corrupt shard in the set, the run's files and
checkpoints in S3 too, and a resume from there."""

import json

import pytest
import torch

from nitro_dist.build import models_of
from nitro_dist.config import load_config
from nitro_dist.data.pairs import teacher_x0
from nitro_dist.data.shards import BadData, list_shards, read_shard, write_manifest
from nitro_dist.data.write_shards import digits_prompts, write_prompt_shards
from nitro_dist.diffusion import TeacherSampler
from nitro_dist.distributed.ray_train import launch
from nitro_dist.prepare import prepare
from nitro_dist.train import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPTS, PAIRS = "s3://nitro-test/digits-prompts", "s3://nitro-test/digits-pairs"
RUNS = "s3://nitro-test/runs"


@pytest.fixture(scope="module")
def pairs(cluster):
    write_prompt_shards(digits_prompts(256), PROMPTS, shard_size=32, progress=False)
    cfg = load_config("digits")
    first = prepare(cfg, PROMPTS, PAIRS, actors=1, cpus_per_actor=1, batch_size=32)
    again = prepare(cfg, PROMPTS, PAIRS, actors=1, cpus_per_actor=1, batch_size=32)
    with pytest.raises(ValueError, match="pairs of another teacher configuration"):
        other = load_config("digits", ["teacher.num_steps=8"])
        prepare(other, PROMPTS, PAIRS, actors=1, cpus_per_actor=1, batch_size=32)
    return cfg, first, again


@pytest.mark.drill
def test_prepare_writes_teacher_pairs_and_resumes(pairs):
    cfg, first, again = pairs
    assert first["total"] == 256 and first["written"] == 8 and first["skipped"] == 0
    assert again["written"] == 0 and again["skipped"] == 8  # a rerun skips finished shards
    assert again["shards"] == first["shards"]
    shards = list_shards(PAIRS)
    got = list(read_shard(shards.urls[3], BadData()))[:12]
    assert all(s.teacher is not None and s.teacher.shape == (1, 8, 8) for s in got)
    # the stored latents are the online teacher's output for the same (prompt, seed)
    models = models_of(cfg)
    sampler = TeacherSampler.from_config(models.schedule, cfg.teacher)
    online = teacher_x0(
        models.teacher,
        models.text,
        sampler,
        [s.prompt for s in got],
        torch.tensor([s.noise_seed for s in got]),
        models.sample_shape,
        torch.device("cpu"),
    )
    stored = torch.stack([s.teacher for s in got]).float()
    torch.testing.assert_close(stored, online, rtol=0, atol=2e-3)  # fp16 storage


@pytest.mark.drill
def test_train_from_s3_pairs_two_workers_no_duplicates_and_resume(pairs, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    # a corrupt shard joins the set: the first 5,000 bytes of a good one, listed with 32 samples
    data = fs.cat(f"{PAIRS[5:]}/pairs-000000.tar")[:5000]
    fs.pipe(f"{PAIRS[5:]}/pairs-000008.tar", data)
    manifest = json.loads(fs.cat(f"{PAIRS[5:]}/manifest.json"))
    names = [s["name"] for s in manifest["shards"]] + ["pairs-000008.tar"]
    write_manifest(PAIRS, names, [32] * 9)

    audit = tmp_path / "audit"
    common = [
        "init.iterations=0",  # the one-step stage trains on the task's pairs, not on shards
        "data.source=shards",
        f"data.shards={PAIRS}",
        "data.num_workers=1",
        f"data.audit_dir={audit}",
        "teacher.mode=offline",
        "distributed.num_workers=2",
        "distributed.cpus_per_worker=0.5",
        f"distributed.storage_path={RUNS}",  # run files and checkpoints in S3 too
        "run_name=shards",
        "train.batch_size=16",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.eval_every=0",
        "train.sample_every=0",
        "train.eval_images=20",
        "train.grid_per_prompt=1",  # final grids: one image per prompt
        "logging.wandb=false",
    ]
    first = launch(load_config("digits", [*common, "train.iterations=4"]))
    assert first["checkpoint"] == f"{RUNS}/shards/iter_000004"
    out = launch(load_config("digits", [*common, "train.iterations=8"]))  # resumes at 4 from S3
    assert out["checkpoint"] == f"{RUNS}/shards/iter_000008"
    seen = {}
    for r in range(2):
        rows = [line.split() for line in (audit / f"rank_{r}.txt").read_text().splitlines()]
        assert sorted({int(it) for _, it, _ in rows}) == list(range(8))  # each iteration once
        assert len(rows) == 8 * 8 and {e for e, _, _ in rows} == {"0"}
        for _, it, key in rows:
            assert key not in seen, f"{key} seen twice in epoch 0 ({seen.get(key)}, rank {r})"
            seen[key] = (r, it)
    fs.invalidate_cache()
    run = f"{RUNS[5:]}/shards"
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(run)}
    assert {"iter_000008", "config.yaml", "metrics.jsonl", "final_metrics.json"} <= names
    assert fs.exists(f"{run}/iter_000008/ranks/rank_00001.json")
    metrics = [json.loads(x) for x in fs.cat(f"{run}/metrics.jsonl").splitlines()]
    assert [m["iteration"] for m in metrics if "g_loss" in m] == list(range(1, 9))  # kept
    assert max(m.get("data_corrupt_shards", 0) for m in metrics) >= 1
    state = json.loads(fs.cat(f"{run}/iter_000008/trainer_state.json"))
    assert state["data_cursor"] == {"epoch": 0, "position": 64, "world_size": 2}


def test_unreadable_dataset_fails_before_training(cluster, tmp_path, capsys):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.pipe("nitro-test/broken/b-000000.tar", b"\\x00garbage" * 100)
    write_manifest("s3://nitro-test/broken", ["b-000000.tar"], [10])
    code = main(
        [
            "data.source=shards",
            "data.shards=s3://nitro-test/broken",
            "init.iterations=0",  # the preset's one-step stage needs the task's pairs
            f"--run-dir={tmp_path}/x",
            "teacher.mode=online",
        ]
    )
    assert code == 2
    assert "no readable sample" in capsys.readouterr().err
