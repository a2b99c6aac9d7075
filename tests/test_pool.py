import pytest
import torch

from nitro_dist.config import load_config
from nitro_dist.discriminator.pool import HeadPool, make_layout, refresh_ids, sample_active

# SDXL-like backbone: 10 levels (channels, side)
SDXL_LEVELS = [(320, 128, 128)] * 4 + [(640, 64, 64)] * 3 + [(1280, 32, 32)] * 3


def layout(**pool_overrides):
    pool_overrides = {"candidates": 4, **pool_overrides}  # the paper's pool, not the digits one
    cfg = load_config("digits", [f"pool.{k}={v}" for k, v in pool_overrides.items()])
    return make_layout(cfg.pool, SDXL_LEVELS), cfg.pool


def test_paper_pool_size():
    lay, _ = layout(width=256)
    assert lay.num_slots == 3 * 4 * 10
    assert lay.num_heads == 480


def test_sampling_is_deterministic_and_covers_each_slot_of_the_bucket():
    lay, _ = layout(candidates=4, heads_per_slot=2)
    a = sample_active(lay, seed=3, iteration=17, heads_per_slot=2)
    b = sample_active(lay, seed=3, iteration=17, heads_per_slot=2)
    assert a == b
    slots = [h // lay.candidates for h in a.head_ids]
    assert sorted(set(slots)) == lay.slots_of_bucket(a.bucket)
    assert all(slots.count(s) == 2 for s in set(slots))
    assert a.t_star == lay.t_buckets[a.bucket]
    draws = {sample_active(lay, 3, i, 2).head_ids for i in range(40)}
    assert len(draws) > 20  # it really changes from iteration to iteration
    buckets = [sample_active(lay, 3, i, 1).bucket for i in range(400)]
    assert set(buckets) == {0, 1, 2, 3}


def test_t_jitter_stays_near_bucket():
    lay, _ = layout()
    for i in range(50):
        d = sample_active(lay, 0, i, 1, t_jitter=20)
        assert abs(d.t_star - lay.t_buckets[d.bucket]) <= 20


def test_refresh_rate_observed_matches_configured():
    lay, _ = layout()
    n = sum(len(refresh_ids(lay, 0, i, 0.01)) for i in range(500))
    rate = n / (500 * lay.num_heads)
    assert 0.008 < rate < 0.012
    assert refresh_ids(lay, 0, 5, 0.0) == []
    assert refresh_ids(lay, 0, 5, 0.3) == refresh_ids(lay, 0, 5, 0.3)


def test_refresh_reinitialises_weights_and_zeroes_optimizer_state():
    lay, pcfg = layout(width=8, candidates=2, t_buckets=[10], kinds=["global_cond"], levels=[7])
    pool = HeadPool(lay, pcfg, seed=0)
    head = pool.head(1)
    x = torch.randn(2, 1280, 32, 32)
    head(x).mean().backward()
    pool.step()
    assert pool.optimizer.state[next(head.parameters())]["exp_avg"].abs().sum() > 0
    before = [p.detach().clone() for p in head.parameters()]
    assert pool.refresh([1, 999], iteration=5) == [1]
    after = list(head.parameters())
    assert not torch.equal(before[0], after[0])
    assert all(p not in pool.optimizer.state for p in after)
    # keyed: a pool built elsewhere (another rank) refreshing the same head gets the same weights
    other = HeadPool(lay, pcfg, seed=0, owned=[1])
    other.refresh([1], iteration=5)
    for p, q in zip(head.parameters(), other.head(1).parameters(), strict=True):
        assert torch.equal(p, q)


def test_initial_heads_do_not_depend_on_owner_set():
    lay, pcfg = layout(
        width=8, candidates=2, t_buckets=[10, 500], kinds=["global_cond"], levels=[8, 9]
    )
    full = HeadPool(lay, pcfg, seed=1)
    shard = HeadPool(lay, pcfg, seed=1, owned=[3, 5])
    assert shard.owned == [3, 5] and len(shard.heads) == 2
    for hid in (3, 5):
        for p, q in zip(full.head(hid).parameters(), shard.head(hid).parameters(), strict=True):
            assert torch.equal(p, q)
    assert shard.numel() < full.numel()


def test_head_kinds_and_local_crop_sizes():
    lay, _ = layout()
    kinds = {lay.spec(h).kind for h in range(lay.num_heads)}
    assert kinds == {"global_cond", "local_cond", "local_uncond"}
    g = [lay.spec(h) for h in range(lay.num_heads) if lay.spec(h).kind == "global_cond"]
    loc = [lay.spec(h) for h in range(lay.num_heads) if lay.spec(h).kind == "local_cond"]
    assert {s.in_size for s in g} == {128, 64, 32}
    assert {s.in_size for s in loc} == {64, 32, 16}


@pytest.mark.parametrize("side", [1, 2, 4, 8, 32])
def test_head_runs_on_any_map_size(side):
    lay, _ = layout(width=8, depth=3)
    from nitro_dist.discriminator.heads import Head

    h = Head(16, side, 8, 3)
    assert h(torch.randn(2, 16, side, side)).shape[:2] == (2, 1)


def test_head_numel_formula_matches_modules():
    lay, _ = layout(width=16, depth=2)
    for hid in (0, 37, 200, 479):
        assert lay.head_numel(hid) == sum(p.numel() for p in lay.build_head(hid).parameters())


@pytest.mark.parametrize("side", [1, 2, 8])
def test_a_head_learns_to_separate_real_from_fake(side):
    """Guards the GroupNorm-on-1x1 trap: the D loss must fall well below its chance value 2."""
    from nitro_dist.discriminator.heads import Head, head_scores
    from nitro_dist.losses import d_loss

    torch.manual_seed(0)
    head = Head(16, side, 32, 2)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, betas=(0.0, 0.99))
    real = torch.randn(64, 16, side, side) + 0.5
    fake = torch.randn(64, 16, side, side) - 0.5
    for _ in range(60):
        loss = d_loss(
            [head_scores(head, real, "global_cond")], [head_scores(head, fake, "global_cond")]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0
