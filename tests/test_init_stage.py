"""The one-step starting stage (init_stage) and the teacher's clean final x0 (teacher.clean_x0)."""

import pytest
import torch

from nitro_dist.build import build_run
from nitro_dist.diffusion import TeacherSampler, seeded_noise
from nitro_dist.init_stage import INIT_BATCH_OFFSET, one_step_init, regression_loss
from nitro_dist.step import make_batch, paired_k1_loss


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
    cfg = tiny_cfg(
        "init.iterations=4",
        "init.lr=3e-3",
        "optim.ema_decay=0.9",
        "teacher.mode=offline",
        "teacher.offline_pairs=8",
        "train.batch_size=8",
        "pool.levels=[0]",
    )
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
