from nitro_dist.config import load_config
from nitro_dist.discriminator.pool import make_layout
from nitro_dist.distributed.owners import owned_by, owner_map

SDXL_LEVELS = [(320, 128, 128)] * 4 + [(640, 64, 64)] * 3 + [(1280, 32, 32)] * 3


def test_owner_map_is_a_balanced_partition_for_eight_ranks():
    cfg = load_config("sdxl_realism")
    lay = make_layout(cfg.pool, SDXL_LEVELS)
    owner = owner_map(lay, 8)
    assert owner == owner_map(lay, 8)  # deterministic
    shards = [owned_by(owner, r) for r in range(8)]
    assert sorted(h for s in shards for h in s) == list(range(lay.num_heads))
    loads = [sum(lay.head_numel(h) for h in s) for s in shards]
    biggest = max(lay.head_numel(h) for h in range(lay.num_heads))
    assert max(loads) - min(loads) <= biggest
    assert max(loads) / (sum(loads) / 8) < 1.02


def test_one_rank_owns_everything():
    lay = make_layout(load_config("digits").pool, [(32, 8, 8), (64, 4, 4)])
    assert owner_map(lay, 1) == [0] * lay.num_heads
