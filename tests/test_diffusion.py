import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from nitro_dist.diffusion import (
    NitroLCMScheduler,
    StudentDenoiser,
    TeacherSampler,
    add_noise,
    alphas_cumprod,
    lcm_timesteps,
    predict_x0,
    seeded_noise,
    shifted,
)
from nitro_dist.models import tiny


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_lcm_timesteps_match_diffusers(n):
    ref = LCMScheduler.from_config(tiny.SDXL_SCHEDULE)
    ref.set_timesteps(n, original_inference_steps=4)
    assert lcm_timesteps(n) == ref.timesteps.tolist()


def test_lcm_timesteps_design_values_and_range_check():
    assert lcm_timesteps(1) == [999]
    assert lcm_timesteps(2) == [999, 499]
    assert lcm_timesteps(3) == [999, 749, 499]
    assert lcm_timesteps(4) == [999, 749, 499, 249]
    with pytest.raises(ValueError, match="steps"):
        lcm_timesteps(5)


def test_shift_and_x0_recovery_use_the_told_timestep():
    assert shifted(999, 250) == 249
    assert shifted(749, 500) == 374
    abar = alphas_cumprod(tiny.SDXL_SCHEDULE)
    ref = DDIMScheduler.from_config(tiny.SDXL_SCHEDULE).alphas_cumprod.double()
    assert torch.allclose(abar, ref)
    x0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([249, 187, 10])
    x_t = add_noise(x0, eps, t, abar)
    assert torch.allclose(predict_x0(eps, x_t, t, abar), x0, atol=1e-8)
    # the hand formula of DESIGN.md with abar at t'
    a = abar[249]
    manual = (x_t[0] - (1 - a).sqrt() * eps[0]) / a.sqrt()
    assert torch.allclose(predict_x0(eps, x_t, t, abar)[0], manual)


def test_student_denoiser_tells_unet_the_shifted_timestep():
    seen = []

    class FakeUNet:
        def __call__(self, x, t, **kw):
            seen.append(t.tolist())
            return type("O", (), {"sample": torch.zeros_like(x)})()

    from nitro_dist.models.text import Cond

    d = StudentDenoiser(tiny.SDXL_SCHEDULE, shift=250)
    cond = Cond(torch.zeros(2, 3, 4))
    d.sample(FakeUNet(), torch.randn(2, 1, 4, 4), cond, 4)
    assert seen == [[249, 249], [187, 187], [124, 124], [62, 62]]


def test_nitro_scheduler_matches_student_sampler(tiny_models):
    """The exported diffusers scheduler and the training sampler are the same maths."""
    m = tiny_models
    d = StudentDenoiser(m.schedule, shift=500)
    sched = NitroLCMScheduler(shift=500)
    cond = m.text.encode(["a red cube", "a blue ball"], (128, 128))
    x_T = seeded_noise([1, 2], m.sample_shape)
    for n in (1, 2, 4):
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == [shifted(t, 500) for t in lcm_timesteps(n)]
        g1, g2 = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
        ours = d.sample(
            m.student, x_T, cond, n, noise_fn=lambda k, g=g1: torch.randn(x_T.shape, generator=g)
        )
        x = x_T
        for t in sched.timesteps:  # what a stock diffusers pipeline does
            out = m.student(sched.scale_model_input(x, t), t, **cond.unet_kwargs()).sample
            x = sched.step(out, t, x, generator=g2).prev_sample
        assert torch.allclose(ours, x, atol=1e-5), n


def test_seeded_noise_is_per_sample():
    a = seeded_noise([5, 6, 7], (1, 4, 4))
    b = seeded_noise([7], (1, 4, 4))
    assert torch.equal(a[2], b[0])
    assert not torch.equal(seeded_noise([7], (1, 4, 4), step=1), b)


def test_teacher_sampler_any_diffusers_scheduler(tiny_models):
    m = tiny_models
    cond = m.text.encode(["a red cube"], (128, 128))
    uncond = m.text.encode([""], (128, 128))
    x_T = seeded_noise([0], m.sample_shape)
    for name, kw in [("DDIMScheduler", {}), ("EulerDiscreteScheduler", {}), ("LCMScheduler", {})]:
        s = TeacherSampler(
            m.schedule, scheduler=name, num_steps=3, guidance_scale=2.0, overrides=kw
        )
        out = s.sample(m.teacher, x_T, cond, uncond, generator=torch.Generator().manual_seed(0))
        assert out.shape == x_T.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="teacher.scheduler"):
        TeacherSampler(m.schedule, scheduler="NoSuchScheduler", num_steps=2)
    with pytest.raises(ValueError, match="empty-prompt"):
        TeacherSampler(m.schedule, scheduler="DDIMScheduler", num_steps=2, guidance_scale=3).sample(
            m.teacher, x_T, cond
        )
