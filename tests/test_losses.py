import pytest
import torch

from nitro_dist import losses


def test_hinge_matches_hand_formula():
    real = torch.tensor([[2.0], [0.5], [-1.0]])
    fake = torch.tensor([[-2.0], [0.3], [1.0]])
    # relu(1 - r): 0, 0.5, 2 -> mean 2.5/3; relu(1 + f): 0, 1.3, 2 -> mean 3.3/3
    expected = 2.5 / 3 + 3.3 / 3
    assert torch.isclose(losses.d_loss_head(real, fake, "hinge"), torch.tensor(expected))
    assert torch.isclose(losses.g_loss_head(fake, "hinge"), torch.tensor(-(-2.0 + 0.3 + 1.0) / 3))


def test_non_saturating_matches_hand_formula():
    real = torch.tensor([0.0, 1.0])
    fake = torch.tensor([-1.0, 2.0])
    sp = lambda x: torch.log1p(torch.exp(torch.tensor(x)))  # noqa: E731
    expected = (sp(-0.0) + sp(-1.0)) / 2 + (sp(-1.0) + sp(2.0)) / 2
    assert torch.isclose(losses.d_loss_head(real, fake, "non_saturating"), expected)
    assert torch.isclose(losses.g_loss_head(fake, "non_saturating"), (sp(1.0) + sp(-2.0)) / 2)


def test_pool_loss_is_mean_over_heads_and_patches():
    reals = [torch.tensor([[3.0]]), torch.tensor([[0.0, 0.0, 2.0, 2.0]])]
    fakes = [torch.tensor([[-3.0]]), torch.tensor([[0.0, 0.0, 0.0, 0.0]])]
    head0 = 0.0 + 0.0
    head1 = (1 + 1 + 0 + 0) / 4 + 1.0
    assert torch.isclose(losses.d_loss(reals, fakes), torch.tensor((head0 + head1) / 2))
    acc_r, acc_f = losses.d_accuracy(reals, fakes)
    assert acc_r == pytest.approx(3 / 5) and acc_f == pytest.approx(1 / 5)
