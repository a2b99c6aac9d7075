"""Tests for the digits metric network, FID-digits and prompt alignment (shipped weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nitro_dist.digits.data import digits_dataset
from nitro_dist.digits.metric import (
    WEIGHTS_PATH,
    DigitsEvaluator,
    DigitsNet,
    fid_from_features,
    frechet_distance,
    heldout_accuracy,
    heldout_split,
    load_metric_net,
    quantize,
)

# ~37 of the 128 ReLU features never fire on real digits, so feature covariances are singular
# and scipy's sqrtm warns about it; the distance is still accurate (identical sets give ~1e-12).
pytestmark = pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")


@pytest.fixture(scope="module")
def net() -> DigitsNet:
    return load_metric_net()


@pytest.fixture(scope="module")
def evaluator(net: DigitsNet) -> DigitsEvaluator:
    return DigitsEvaluator(net)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return digits_dataset(8)


def _halves(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    return perm[: n // 2], perm[n // 2 :]


def test_shipped_net_heldout_accuracy(net: DigitsNet) -> None:
    info = json.loads(WEIGHTS_PATH.with_suffix(".json").read_text())
    accuracy = heldout_accuracy(net, info["seed"])
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(info["heldout_accuracy"], abs=1e-4)


def test_heldout_split_is_disjoint_stratified_and_seeded(digits: tuple) -> None:
    _, labels = digits
    train, heldout = heldout_split(labels, seed=0)
    assert len(train) + len(heldout) == len(labels)
    assert not set(train.tolist()) & set(heldout.tolist())
    assert torch.bincount(labels[heldout], minlength=10).min() >= 30
    assert torch.equal(heldout, heldout_split(labels, seed=0)[1])
    assert not torch.equal(heldout, heldout_split(labels, seed=1)[1])


def test_features_and_logits_shapes_and_resizing(net: DigitsNet, digits: tuple) -> None:
    images, _ = digits
    assert net.features(images[:5]).shape == (5, 128)
    assert net(images[:5]).shape == (5, 10)
    big = F.interpolate(images[:5], scale_factor=2, mode="bilinear", align_corners=False)
    assert net.features(big).shape == (5, 128)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        net.features(images[:5, 0])


def test_fid_ranks_real_digits_far_below_noise_and_blur(
    evaluator: DigitsEvaluator, digits: tuple
) -> None:
    images, _ = digits
    a, b = _halves(len(images))
    real_vs_half = fid_from_features(evaluator.features(images[a]), evaluator.features(images[b]))
    noise = torch.randn(len(a), 1, 8, 8, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    blurred = F.avg_pool2d(F.pad(images[a], (1, 1, 1, 1), value=-1.0), 3, stride=1)

    assert real_vs_half < 20.0  # observed ~7
    assert evaluator.fid(images[a]) < real_vs_half  # a half against all digits: ~1.8
    assert evaluator.fid(noise) > 20 * real_vs_half  # observed ~380
    assert evaluator.fid(blurred) > 20 * real_vs_half  # observed ~540


def test_fid_of_real_digits_at_their_own_resolution_is_zero(evaluator: DigitsEvaluator) -> None:
    for resolution in (8, 16):
        images, labels = digits_dataset(resolution)
        assert evaluator.fid(images) == pytest.approx(0.0, abs=1e-6)
        assert evaluator.alignment(images, labels) >= 0.95


def test_frechet_distance_matches_closed_form() -> None:
    rng = np.random.default_rng(0)
    dim = 6
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    a1, a2 = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    sigma1, sigma2 = a1 @ a1.T + 0.1 * np.eye(dim), a2 @ a2.T + 0.1 * np.eye(dim)

    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), an SPD matrix: sum of its eigenvalues' roots.
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ sigma2 @ root1)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean

    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)


def test_identical_feature_sets_give_zero_fid() -> None:
    feats = np.random.default_rng(3).normal(size=(300, 32))
    assert abs(fid_from_features(feats, feats)) < 1e-8


def test_frechet_distance_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="different shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        fid_from_features(np.zeros((1, 3)), np.zeros((5, 3)))


def test_alignment_true_and_shuffled_labels(evaluator: DigitsEvaluator, digits: tuple) -> None:
    images, labels = digits
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(4))]
    assert evaluator.alignment(images, labels) >= 0.95
    assert evaluator.alignment(images, shuffled) <= 0.3
    result = evaluator.evaluate(images[:100], labels[:100])
    assert set(result) == {"fid_digits", "alignment"}
    with pytest.raises(ValueError, match="as many labels"):
        evaluator.alignment(images[:10], labels[:9])


def test_quantize_snaps_to_8_bit_levels() -> None:
    x = torch.linspace(-1.2, 1.2, 101).reshape(1, 1, 1, 101)
    q = quantize(x)
    levels = (q + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert q.min() == -1 and q.max() == 1
    assert (q - x.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6


def test_load_metric_net_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "metric_net.safetensors"
    with pytest.raises(ValueError, match="python -m nitro_dist.digits.metric") as err:
        load_metric_net(missing)
    assert str(missing) in str(err.value)
