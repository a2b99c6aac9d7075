"""The algorithm learns: a short distillation of the shipped digits teacher beats the teacher's
own 1-step sample quality (FID-digits on the shipped metric net), with a real margin."""

import pytest
import torch

from nitro_dist.build import build_run
from nitro_dist.config import load_config
from nitro_dist.data.pairs import teacher_x0
from nitro_dist.diffusion import TeacherSampler
from nitro_dist.digits.data import PROMPTS
from nitro_dist.digits.metric import DigitsEvaluator
from nitro_dist.step import train_step
from nitro_dist.tasks import EVAL_SEED_OFFSET


@pytest.mark.slow
@pytest.mark.drill
def test_short_distillation_beats_teacher_at_one_step():
    cfg = load_config(
        "digits",
        [
            "train.batch_size=32",
            "teacher.offline_pairs=512",
            "teacher.num_steps=8",
            "refinement.enable_at=[0]",
            "loss.regression_weight=0",  # the adversarial objective alone
            "optim.ema_warmup_iterations=0",  # the EMA the figures below were measured with
            "logging.progress=false",
        ],
    )
    run = build_run(cfg, progress=False)
    n = 500
    labels = torch.arange(n) % 10
    prompts = [PROMPTS[int(y)] for y in labels]
    seeds = [EVAL_SEED_OFFSET + i for i in range(n)]
    ev = DigitsEvaluator()
    m = run.models
    one_step = TeacherSampler(
        m.schedule,
        scheduler=cfg.teacher.scheduler,
        num_steps=1,
        guidance_scale=cfg.teacher.guidance_scale,
        overrides=cfg.teacher.scheduler_overrides,
    )
    baseline = teacher_x0(
        m.teacher, m.text, one_step, prompts, torch.tensor(seeds), m.sample_shape, run.device
    ).clamp(-1, 1)
    fid_teacher_1 = ev.fid(baseline)
    fid_start = ev.fid(run.generator(run.ema)(prompts, seeds, 1))
    # FID at 80 / 90 / 100 / 120 iterations: 37.8 / 35.1 / 33.6 / 27.4 against the teacher's 1 step
    # 56.1 and the start 64.3 (seed 0 on CPU): 90 is 0.63x / 0.55x, inside the 0.75x bound with
    # room, in three quarters of 120's time. The full run's figures: benchmarks/digits_quality.py
    for it in range(90):
        train_step(run, it)
    fid_end = ev.fid(run.generator(run.ema)(prompts, seeds, 1))
    print(
        f"FID-digits: teacher 1 step {fid_teacher_1:.1f}, student {fid_start:.1f} -> {fid_end:.1f}"
    )
    assert fid_end < 0.75 * fid_teacher_1
    assert fid_end < 0.75 * fid_start
    assert ev.alignment(run.generator(run.ema)(prompts, seeds, 1), labels) > 0.9
