"""The one-step starting stage (init_stage) and the teacher's clean final x0 (teacher.clean_x0)."""

import pytest
import torch
from threads import intra_op_threads

from nitro_dist import init_stage, stage_cache
from nitro_dist.build import build_run
from nitro_dist.diffusion import TeacherSampler, seeded_noise
from nitro_dist.init_stage import INIT_BATCH_OFFSET, one_step_init, regression_loss, stage_key
from nitro_dist.step import make_batch, paired_k1_loss

STAGE = [
    "init.iterations=4",
    "init.lr=3e-3",
    "optim.ema_decay=0.9",
    "teacher.mode=offline",
    "teacher.offline_pairs=8",
    "train.batch_size=8",
    "pool.levels=[0]",
]


def test_regression_loss_is_the_mean_squared_error():
    a, b = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    want = sum(float(((a[i] - b[i]) ** 2).sum()) for i in range(3)) / a.numel()
    assert regression_loss(a, b).item() == pytest.approx(want, rel=1e-6)


def test_paired_k1_loss_counts_only_one_step_samples_over_the_whole_batch():
    """The GAN stage's paired regression (loss.regression_weight): the k = 1 samples' squared
    error summed, divided by all samples, so two halves add up to the whole batch's figure."""
    a, b = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    k_B = torch.tensor([1, 2, 1, 4])
    want = (regression_loss(a[0], b[0]) + regression_loss(a[2], b[2])).item() / 4
    assert paired_k1_loss(a, b, k_B).item() == pytest.approx(want, rel=1e-6)
    halves = paired_k1_loss(a[:2], b[:2], k_B[:2]) / 2 + paired_k1_loss(a[2:], b[2:], k_B[2:]) / 2
    assert halves.item() == pytest.approx(want, rel=1e-6)
    assert paired_k1_loss(a, b, torch.tensor([2, 3, 4, 2])).item() == 0.0


def test_stage_fits_the_teacher_pairs_and_starts_the_ema_there(tiny_cfg):
    cfg = tiny_cfg(*STAGE, "init.cache=false")  # trained here, never loaded
    run = build_run(cfg, progress=False)
    before = [p.detach().clone() for p in run.models.student.parameters()]
    batch = make_batch(run, INIT_BATCH_OFFSET)  # all 8 pairs

    def loss() -> float:  # of the 1-step sample on the pairs
        t_B = torch.full((8,), 999, dtype=torch.long)
        with torch.no_grad():
            x0 = run.denoiser(run.models.student, batch.x_T, t_B, batch.cond)
        return regression_loss(x0, batch.x0_real).item()

    start = loss()
    m = one_step_init(run)
    assert loss() < 0.97 * start, (start, loss(), m)  # the random tiny teacher: x0 ~ 15
    after = list(run.models.student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert run.ema is not None
    for pe, p in zip(run.ema.parameters(), after, strict=True):
        assert torch.equal(pe, p)
    assert all(p.grad is None for p in after)


def test_clean_x0_is_the_last_steps_clean_estimate(tiny_models):
    """DDIM's last step from t to abar_prev: prev_sample = sqrt(abar_prev) x0 + sqrt(1-abar_prev)
    eps, and x0 (pred_original_sample) does not depend on abar_prev. So the clean estimate with
    the schedule's abar_0 < 1 is exactly the plain output with a final abar of 1."""
    m = tiny_models
    cond = m.text.encode(["a red cube"], (128, 128))
    uncond = m.text.encode([""], (128, 128))
    x_T = seeded_noise([0], m.sample_shape)

    def sample(clean: bool, alpha_to_one: bool) -> torch.Tensor:
        s = TeacherSampler(
            m.schedule,
            scheduler="DDIMScheduler",
            num_steps=3,
            guidance_scale=2.0,
            overrides={"set_alpha_to_one": alpha_to_one},
            clean_x0=clean,
        )
        return s.sample(m.teacher, x_T, cond, uncond)

    noisy, clean = sample(False, False), sample(True, False)
    assert not torch.allclose(noisy, clean)
    torch.testing.assert_close(clean, sample(False, True), rtol=1e-5, atol=1e-5)


def test_a_cached_stage_loads_what_it_trained_and_a_changed_input_trains_again(
    tiny_cfg, tmp_path, monkeypatch
):
    """init.cache: a second run that would train the same stage loads its G (no batch is drawn)
    and ends with the same weights, EMA and loss figures; a changed input (init.lr, the number
    of ranks or threads, the student's weights) makes another key; init.cache=false neither
    reads nor writes; a torn entry is trained again and replaced."""
    monkeypatch.setenv("NITRO_CACHE", str(tmp_path / "cache"))
    batches: list[int] = []
    real = init_stage.make_batch
    monkeypatch.setattr(
        init_stage, "make_batch", lambda *a, **k: batches.append(1) or real(*a, **k)
    )
    entries = lambda: sorted((tmp_path / "cache" / "one_step_init").glob("*.safetensors"))

    first = build_run(tiny_cfg(*STAGE), progress=False)
    key = stage_key(first)  # of the student before the stage
    m1 = one_step_init(first)
    assert m1["init_cached"] == 0.0 and len(batches) == 4
    (entry,) = entries()
    assert entry.stem == key

    again = build_run(tiny_cfg(*STAGE), progress=False)
    m2 = one_step_init(again)
    assert m2["init_cached"] == 1.0 and len(batches) == 4  # loaded: no batch drawn
    assert (m2["init_loss_start"], m2["init_loss_end"]) == (
        m1["init_loss_start"],
        m1["init_loss_end"],
    )
    for a, b in zip(
        first.models.student.parameters(), again.models.student.parameters(), strict=True
    ):
        assert torch.equal(a, b)
    assert again.ema is not None
    for a, b in zip(again.ema.parameters(), again.models.student.parameters(), strict=True):
        assert torch.equal(a, b)
    assert again.models.student.training

    other = build_run(tiny_cfg(*STAGE, "init.lr=1e-3"), progress=False)
    assert one_step_init(other)["init_cached"] == 0.0 and len(batches) == 8
    assert len(entries()) == 2
    off = build_run(tiny_cfg(*STAGE, "init.cache=false"), progress=False)
    assert one_step_init(off)["init_cached"] == 0.0 and len(batches) == 12
    assert len(entries()) == 2

    fresh = build_run(tiny_cfg(*STAGE), progress=False)
    assert stage_key(fresh) == key
    fresh.world_size = 2  # another summation order: another key (the key only; nothing runs)
    assert stage_key(fresh) != key
    fresh.world_size = 1
    with intra_op_threads(torch.get_num_threads() + 1):  # another split of the sums: another key
        assert stage_key(fresh) != key
    with torch.no_grad():
        next(fresh.models.student.parameters()).add_(1e-3)
    assert stage_key(fresh) != key

    entry.write_bytes(entry.read_bytes()[:100])  # torn
    torn = build_run(tiny_cfg(*STAGE), progress=False)
    assert one_step_init(torn)["init_cached"] == 0.0 and len(batches) == 16
    assert stage_cache.find("one_step_init", key) is not None  # written again, whole


def test_shipped_entries_are_found_after_the_users_and_never_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("NITRO_CACHE", str(tmp_path / "mine"))
    shipped = tmp_path / "shipped"
    (shipped / "kind").mkdir(parents=True)
    stage_cache.store("kind", "k", {"x": torch.ones(2)}, {"loss": "0.5"})
    (tmp_path / "mine" / "kind" / "k.safetensors").rename(shipped / "kind" / "k.safetensors")
    tensors, meta = stage_cache.find("kind", "k", [shipped])
    assert torch.equal(tensors["x"], torch.ones(2)) and meta == {"loss": "0.5"}
    stage_cache.store("kind", "k", {"x": torch.zeros(2)})  # the user's own entry comes first
    assert torch.equal(stage_cache.find("kind", "k", [shipped])[0]["x"], torch.zeros(2))
    (shipped / "kind" / "k.safetensors").write_bytes(b"torn")
    (tmp_path / "mine" / "kind" / "k.safetensors").unlink()
    assert stage_cache.find("kind", "k", [shipped]) is None
    assert (shipped / "kind" / "k.safetensors").exists()  # read-only: a shipped file stays


def test_the_shipped_stage_cache_is_the_default_runs(monkeypatch):
    """The digits task ships its default run's teacher pairs and one-step stage (seed 0, the
    preset's workers): both must be what that run looks up now, or a fresh clone's `make train`
    computes them again (~3 minutes). After a change to either stage: `make ship-cache`."""
    from nitro_dist.config import load_config

    cfg = load_config("digits")
    asked: list[tuple[str, str]] = []
    real = stage_cache.find
    monkeypatch.setattr(
        stage_cache, "find", lambda k, key, *a: asked.append((k, key)) or real(k, key, *a)
    )
    run = build_run(cfg, progress=False)  # its pairs: the shipped ones (or the user's cache)
    run.world_size = cfg.distributed.num_workers  # the key of the Ray Train run (nothing runs)
    with intra_op_threads(int(cfg.distributed.cpus_per_worker)):  # Ray's OMP_NUM_THREADS there
        init_key = stage_key(run)
    (shipped,) = stage_cache.shipped_folders(run.task, cfg.model.source)
    ((kind, pairs_key),) = asked
    assert kind == "teacher_pairs"
    assert (shipped / kind / f"{pairs_key}.safetensors").exists(), "stale: make ship-cache"
    assert (shipped / "one_step_init" / f"{init_key}.safetensors").exists(), (
        "stale: make ship-cache"
    )
    assert sorted(p.name for p in shipped.iterdir()) == ["one_step_init", "teacher_pairs"]
    assert len(list(shipped.rglob("*.safetensors"))) == 2  # nothing stale left beside them
