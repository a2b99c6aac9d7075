import math

import pytest
import torch
from closeness import assert_adamw_close

from nitro_dist.build import build_run
from nitro_dist.config import load_config
from nitro_dist.discriminator.backbone import backbone_features, level_shapes
from nitro_dist.discriminator.pool import init_head_, make_layout, refresh_ids, sample_active
from nitro_dist.run_log import progress_line
from nitro_dist.step import draw_iteration_noise, enabled_steps, train_step


def test_sdxl_conditioning_path_on_tiny_sdxl_unet(tiny_models):
    m = tiny_models
    assert m.sdxl and m.teacher.config.addition_embed_type == "text_time"
    cond = m.text.encode(["a red cube", ""], (128, 128))
    assert cond.hidden_BLD.shape == (2, 77, 64)  # both encoders' penultimate states concatenated
    assert cond.pooled_BD.shape == (2, 32) and cond.time_ids_B6.tolist()[0] == [
        128,
        128,
        0,
        0,
        128,
        128,
    ]
    x = torch.randn(2, *m.sample_shape)
    out = m.student(x, torch.tensor([249, 249]), **cond.unet_kwargs()).sample
    assert out.shape == x.shape
    # the prompt really reaches the UNet through both the hidden states and the pooled embeds
    other = m.text.encode(["a blue ball", "a dog"], (128, 128))
    assert not torch.allclose(
        out, m.student(x, torch.tensor([249, 249]), **other.unet_kwargs()).sample
    )


def test_backbone_has_ten_levels_like_sdxl(tiny_models):
    m = tiny_models
    cond = m.text.encode([""], (128, 128))
    shapes = level_shapes(m.teacher, m.sample_shape, cond)
    assert len(shapes) == 10  # conv_in + 3 + 3 + 2 down-block skips + mid, as SDXL
    feats = backbone_features(m.teacher, torch.randn(1, *m.sample_shape), torch.tensor([10]), cond)
    assert [tuple(f.shape[1:]) for f in feats] == shapes


def test_refinement_schedule():
    assert enabled_steps([0, 200, 400, 600], 0) == [1]
    assert enabled_steps([0, 200, 400, 600], 450) == [1, 2, 3]
    assert enabled_steps([0, 0, 0, 0], 0) == [1, 2, 3, 4]


def test_g_lr_schedule_warms_up_then_follows_half_a_cosine_to_zero(tiny_cfg):
    from nitro_dist.optim import scheduled_lr

    o = tiny_cfg().optim
    assert scheduled_lr(o, 100, 0) is None  # constant, no warm-up: the optimizer's lr stands
    o = tiny_cfg("optim.warmup_iterations=4").optim
    assert [scheduled_lr(o, 100, t) / o.lr for t in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    o = tiny_cfg("optim.lr_schedule=cosine").optim
    got = [scheduled_lr(o, 10, t) / o.lr for t in range(10)]
    assert got == pytest.approx([0.5 * (1 + math.cos(math.pi * (t + 0.5) / 10)) for t in range(10)])
    assert got[0] > 0.99 and got[-1] < 0.01 and got == sorted(got, reverse=True)
    assert [got[t] + got[9 - t] for t in range(5)] == pytest.approx([1] * 5)  # point-symmetric
    o = tiny_cfg("optim.lr_schedule=cosine", "optim.warmup_iterations=2").optim
    assert scheduled_lr(o, 10, 0) / o.lr == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 20)))


def test_ema_warm_up_ramps_the_decay_and_the_ema_follows_g_at_first(tiny_cfg):
    from nitro_dist.optim import ema_decay_at

    o = tiny_cfg("optim.ema_decay=0.9", "optim.ema_warmup_iterations=4").optim
    assert [ema_decay_at(o, t) for t in range(6)] == pytest.approx(
        [0, 0.225, 0.45, 0.675, 0.9, 0.9]
    )
    assert ema_decay_at(tiny_cfg("optim.ema_decay=0.9").optim, 0) == 0.9  # no warm-up
    cfg = tiny_cfg("optim.ema_decay=0.9", "optim.ema_warmup_iterations=4")
    run = build_run(cfg, progress=False)
    assert train_step(run, 0)["skipped"] == 0
    for pe, p in zip(run.ema.parameters(), run.models.student.parameters(), strict=True):
        assert torch.equal(pe, p)  # decay 0 at iteration 0: the EMA is G


def test_train_step_sets_and_reports_the_scheduled_g_lr(tiny_cfg):
    run = build_run(tiny_cfg("optim.warmup_iterations=4"), progress=False)
    seen: list[float] = []
    run.g.optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    lrs = [train_step(run, it)["g_lr"] for it in range(2)]
    assert lrs == seen == [run.cfg.optim.lr / 4, run.cfg.optim.lr / 2]
    plain = build_run(tiny_cfg(), progress=False)
    metrics = train_step(plain, 0)
    assert "g_lr" not in metrics  # no schedule: the metrics are as before
    line = progress_line(1, 2, {**metrics, "images_per_s": 1.0})
    assert "g_lr" not in line and "refreshed=" in line
    line = progress_line(1, 2, {**metrics, "images_per_s": 1.0, "g_lr": lrs[0]})
    assert f"g_lr={lrs[0]:.2e} refreshed=" in line  # the console shows it when scheduled


def test_k_weights_set_how_often_each_refinement_step_is_drawn():
    layout = make_layout(load_config("digits").pool, [(32, 8, 8), (64, 4, 4)])
    draw = sample_active(layout, 0, 3, 1)
    ids = list(range(4000))

    def ks(steps, weights):
        noise = draw_iteration_noise(0, 3, ids, (1, 2, 2), steps, draw, layout, "cpu", weights)
        return noise.k_B.tolist()

    uniform = ks([1, 2, 3, 4], None)
    assert ks([1, 2, 3, 4], [2, 2, 2, 2]) == uniform  # equal weights: the draw of no weights
    share = [uniform.count(k) / len(ids) for k in (1, 2, 3, 4)]
    assert all(abs(x - 0.25) < 0.03 for x in share), share
    weighted = ks([1, 2, 3, 4], [5, 1, 1, 3])
    share = [weighted.count(k) / len(ids) for k in (1, 2, 3, 4)]
    assert all(abs(x - w / 10) < 0.03 for x, w in zip(share, [5, 1, 1, 3], strict=True)), share
    # only the enabled steps count: k = 1 and 2 at weights 5 : 1
    early = ks([1, 2], [5, 1, 1, 3])
    assert set(early) == {1, 2} and abs(early.count(1) / len(ids) - 5 / 6) < 0.03


def test_iteration_changes_generator_and_only_active_heads(tiny_cfg):
    cfg = tiny_cfg("pool.refresh_rate=0.0")
    run = build_run(cfg, progress=False)
    from nitro_dist.discriminator.pool import sample_active

    draw = sample_active(run.layout, cfg.seed, 0, cfg.pool.heads_per_slot)
    g_before = [p.detach().clone() for p in run.models.student.parameters()]
    t_before = [p.detach().clone() for p in run.models.teacher.parameters()]
    heads_before = {
        h: [p.detach().clone() for p in run.pool.head(h).parameters()] for h in run.pool.owned
    }
    metrics = train_step(run, 0)
    assert metrics["active_heads"] == len(draw.head_ids) > 0
    assert any(
        not torch.equal(a, b)
        for a, b in zip(g_before, run.models.student.parameters(), strict=True)
    )
    assert all(
        torch.equal(a, b) for a, b in zip(t_before, run.models.teacher.parameters(), strict=True)
    )
    for hid, before in heads_before.items():
        changed = any(
            not torch.equal(a, b)
            for a, b in zip(before, run.pool.head(hid).parameters(), strict=True)
        )
        assert changed == (hid in draw.head_ids), hid


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def _head_steps(run, hid: int) -> set[int]:
    """AdamW steps each parameter of head ``hid`` has taken (0: no optimizer state)."""
    state = run.pool.optimizer.state
    return {int(state[p]["step"]) if p in state else 0 for p in run.pool.head(hid).parameters()}


def _check_step(run, iteration: int, metrics: dict, g_before, heads_before, d_steps: int):
    """After ``train_step(run, iteration)``: finite losses, G moved, the teacher did not; every
    active head took ``d_steps`` AdamW steps, every other head is untouched, and the heads the
    refresh schedule drew were re-initialised (keyed weights, no optimizer state)."""
    cfg = run.cfg
    for key in ("g_loss", "d_loss", "g_grad_norm", "d_acc_real", "d_acc_fake"):
        assert math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["d_loss"] > 0 and 0 <= metrics["d_acc_real"] <= 1
    assert _changed(g_before, run.models.student)
    draw = sample_active(run.layout, cfg.seed, iteration, cfg.pool.heads_per_slot)
    refreshed = refresh_ids(run.layout, cfg.seed, iteration, cfg.pool.refresh_rate)
    assert metrics["active_heads"] == len(draw.head_ids) > 0
    assert metrics["refreshed_heads"] == len(refreshed)
    for hid, before in heads_before.items():
        head = run.pool.head(hid)
        if hid in refreshed:
            fresh = run.layout.build_head(hid)
            init_head_(fresh, cfg.seed, iteration, hid)
            for a, b in zip(fresh.parameters(), head.parameters(), strict=True):
                assert torch.equal(a, b), hid
            assert _head_steps(run, hid) == {0}, hid
        elif hid in draw.head_ids:
            assert _changed(before, head), hid
            assert _head_steps(run, hid) == {d_steps}, hid
        else:
            assert not _changed(before, head), hid
            assert _head_steps(run, hid) == {0}, hid


def test_static_single_head_ablation(tiny_cfg):
    """One candidate per slot: every slot of the drawn bucket trains its only head, always the
    same one."""
    cfg = tiny_cfg("pool.candidates=1", "pool.refresh_rate=0.0")
    run = build_run(cfg, progress=False)
    assert run.layout.num_heads == run.layout.num_slots
    g_before = _params(run.models.student)
    heads_before = {h: _params(run.pool.head(h)) for h in run.pool.owned}
    m = train_step(run, 0)
    draw = sample_active(run.layout, cfg.seed, 0, cfg.pool.heads_per_slot)
    assert list(draw.head_ids) == run.layout.slots_of_bucket(draw.bucket)
    _check_step(run, 0, m, g_before, heads_before, d_steps=1)


def test_two_d_steps_per_g_step(tiny_cfg):
    """Each active head takes two AdamW steps per iteration (G one); a refresh rate that draws
    some heads at iteration 0 re-initialises exactly those."""
    cfg = tiny_cfg("optim.d_steps_per_g_step=2", "pool.refresh_rate=0.3")
    run = build_run(cfg, progress=False)
    g_before = _params(run.models.student)
    heads_before = {h: _params(run.pool.head(h)) for h in run.pool.owned}
    m = train_step(run, 0)
    draw = sample_active(run.layout, cfg.seed, 0, cfg.pool.heads_per_slot)
    refreshed = refresh_ids(run.layout, cfg.seed, 0, cfg.pool.refresh_rate)
    assert refreshed and set(draw.head_ids) - set(refreshed)  # both kinds of head are checked
    _check_step(run, 0, m, g_before, heads_before, d_steps=2)
    assert run.g.optimizer.state[next(run.models.student.parameters())]["step"] == 1


def test_gradient_accumulation_matches_the_full_batch(tiny_cfg):
    """2 micro-batches of 2 accumulate to the same update as one batch of 4 (heads: AdamW's
    first steps normalise tiny gradient differences from the summation order, so 1e-4, and a
    rare near-zero gradient may flip its update: closeness.assert_adamw_close)."""
    runs = [build_run(tiny_cfg(f"train.grad_accum={n}"), progress=False) for n in (1, 2)]
    for run in runs:
        for it in range(2):
            train_step(run, it)
    s0, s1 = runs[0].models.student, runs[1].models.student
    for a, b in zip(s0.parameters(), s1.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
    lr = runs[0].cfg.pool.lr
    for h in runs[0].pool.owned:
        h0, h1 = runs[0].pool.head(h), runs[1].pool.head(h)
        for a, b in zip(h0.parameters(), h1.parameters(), strict=True):
            assert_adamw_close(a, b, 1e-4, lr, steps=2, msg=f"head {h}")
