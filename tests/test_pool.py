import pytest
import torch

from nitro_dist.config import load_config
from nitro_dist.discriminator.pool import HeadPool, make_layout, refresh_ids, sample_active

# SDXL-like backbone: 10 levels (channels, side)
SDXL_LEVELS = [(320, 128, 128)] * 4 + [(640, 64, 64)] * 3 + [(1280, 32, 32)] * 3
# the shipped digits teacher's levels (backbone.level_shapes of nitro_dist/digits/weights)
DIGITS_LEVELS = [(32, 8, 8), (32, 8, 8), (32, 4, 4), (64, 4, 4), (64, 4, 4)]


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


def test_a_bucket_per_sample_keys_each_sample_and_activates_the_buckets_drawn():
    """pool.t_star_per=sample: each position of the global batch draws its own bucket (and
    jitter), keyed by position (a larger batch extends a smaller one's draws); every slot of
    each bucket drawn gets its heads; the loss weights make each bucket's samples count as a
    whole batch."""
    lay, _ = layout(candidates=4)
    a = sample_active(lay, 3, 17, 1, t_jitter=20, per_sample=64)
    assert a == sample_active(lay, 3, 17, 1, t_jitter=20, per_sample=64)
    assert (a.bucket, a.t_star) == (-1, -1) and len(a.sample_buckets) == len(a.sample_t) == 64
    assert set(a.sample_buckets) == {0, 1, 2, 3}
    for b, t in zip(a.sample_buckets, a.sample_t, strict=True):
        assert abs(t - lay.t_buckets[b]) <= 20
    slots = sorted(h // lay.candidates for h in a.head_ids)
    assert slots == list(range(lay.num_slots))  # every slot of every bucket, one head each
    w = a.bucket_weights()
    assert all(a.sample_buckets.count(b) * w[b] == 64 for b in w)
    small = sample_active(lay, 3, 17, 1, t_jitter=20, per_sample=3)
    assert small.sample_buckets == a.sample_buckets[:3] and small.sample_t == a.sample_t[:3]
    present = sorted(set(small.sample_buckets))
    assert sorted({h // lay.candidates for h in small.head_ids}) == sorted(
        s for b in present for s in lay.slots_of_bucket(b)
    )
    assert a.buckets_of([5, 0]).tolist() == [a.sample_buckets[5], a.sample_buckets[0]]
    one = sample_active(lay, 3, 17, 1)  # one bucket per iteration: its value for every sample
    assert one.buckets_of([0, 1]).tolist() == [one.bucket] * 2
    assert one.t_of([0, 1]).tolist() == [one.t_star] * 2 and one.bucket_weights() == {
        one.bucket: 1.0
    }


def test_refresh_rate_observed_matches_configured():
    lay, _ = layout()
    n = sum(len(refresh_ids(lay, 0, i, 0.01)) for i in range(500))
    rate = n / (500 * lay.num_heads)
    assert 0.008 < rate < 0.012
    assert refresh_ids(lay, 0, 5, 0.0) == []
    assert refresh_ids(lay, 0, 5, 0.3) == refresh_ids(lay, 0, 5, 0.3)


def test_refresh_by_use_takes_only_the_active_heads_at_the_same_rate():
    lay, _ = layout()
    draws = [sample_active(lay, 0, i, 1).head_ids for i in range(2000)]
    used = [refresh_ids(lay, 0, i, 0.3, among=d) for i, d in enumerate(draws)]
    for i, (d, ids) in enumerate(zip(draws, used, strict=True)):
        assert set(ids) <= set(d)
        assert ids == [h for h in refresh_ids(lay, 0, i, 0.3) if h in d]  # the same keyed draw
    rate = sum(map(len, used)) / sum(map(len, draws))
    assert 0.28 < rate < 0.32  # per use of a head
    assert refresh_ids(lay, 0, 5, 1.0, among=draws[5]) == list(draws[5])
    assert refresh_ids(lay, 0, 5, 1.0, among=()) == []


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


def test_width_ratio_scales_each_head_with_its_level():
    """pool.width_ratio: width = ratio x the level's channels, a multiple of 8, at least
    pool.width; the SDXL presets' light heads (ratio 1/32, width 32) against one width 256."""
    lay, _ = layout(width=32, width_ratio=0.03125)
    widths = {c: {lay.spec(h).width for h in range(lay.num_heads) if lay.spec(h).in_channels == c}
              for c in (320, 640, 1280)}  # fmt: skip
    assert widths == {320: {32}, 640: {32}, 1280: {40}}
    assert layout(width=8, width_ratio=0.25)[0].spec(479).width == 320  # 1280 / 4
    assert layout(width=8, width_ratio=0.01)[0].spec(0).width == 8  # 3.2 -> the least width
    for hid in (0, 200, 479):
        assert lay.head_numel(hid) == sum(p.numel() for p in lay.build_head(hid).parameters())
    fixed, _ = layout(width=256)
    assert lay.numel() < 0.11 * fixed.numel()  # 206M against 1.89G parameters


def test_digits_heads_are_unchanged_by_width_ratio():
    """The digits preset leaves pool.width_ratio at 0: every head keeps width 32 and the same
    weights as Head(channels, side, pool.width, depth) under the same key, i.e. the digits
    figures' pool bit for bit."""
    from nitro_dist.discriminator.heads import Head
    from nitro_dist.discriminator.pool import INITIAL_ITERATION, init_head_

    cfg = load_config("digits")
    assert cfg.pool.width_ratio == 0.0
    lay = make_layout(cfg.pool, DIGITS_LEVELS)
    pool = HeadPool(lay, cfg.pool, seed=0)
    for hid in range(0, lay.num_heads, 7):
        s = lay.spec(hid)
        assert s.width == cfg.pool.width == 32
        ref = Head(s.in_channels, s.in_size, 32, cfg.pool.depth)
        init_head_(ref, 0, INITIAL_ITERATION, hid)
        got = pool.head(hid).state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


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
