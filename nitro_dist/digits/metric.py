"""FID-digits and prompt alignment for the digits task, measured with a small digits classifier.

The Inception network behind FID knows nothing useful about 8x8 handwritten digits, so the digits
task measures Frechet distance in the 128-d penultimate features of :class:`DigitsNet`, a small CNN
trained on scikit-learn's ``load_digits`` (FID-digits), and prompt alignment as the share of
generated images that the same network classifies as the prompted digit.

Train and ship the weights with ``python -m nitro_dist.digits.metric [--out PATH]``; they live in
``nitro_dist/digits/weights/metric_net.safetensors`` next to ``metric_net.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from nitro_dist.digits.data import DIGIT_NAMES, digits_dataset

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "metric_net.safetensors"
TRAIN_COMMAND = "python -m nitro_dist.digits.metric"
FEATURE_DIM = 128
NUM_CLASSES = len(DIGIT_NAMES)
INPUT_SIZE = 8
HELDOUT_FRACTION = 0.2


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class DigitsNet(nn.Module):
    """A small CNN digits classifier whose penultimate layer is the FID-digits feature space.

    conv3x3(1->32) -> ReLU -> conv3x3(32->64) -> ReLU -> maxpool 2 -> linear(1024->128) -> ReLU
    (the features) -> dropout -> linear(128->10) (the logits).
    """

    def __init__(self, dropout: float = 0.25) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.fc = nn.Linear(64 * (INPUT_SIZE // 2) ** 2, FEATURE_DIM)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (after ReLU).

        x: (N, 1, H, W) float images in [-1, 1]; any H x W other than 8 x 8 is resized to 8 x 8
        with bilinear interpolation. Returns (N, 128).
        """
        x = _as_net_input(x)
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, 10), for x: (N, 1, H, W) images in [-1, 1]."""
        return self.head(self.dropout(self.features(x)))


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected a (N, 1, H, W) image tensor, got {shape}")


def _as_net_input(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 1, 8, 8) float32, resized bilinearly when needed."""
    _check_images(x)
    x = x.float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return x


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def heldout_split(labels: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified 80/20 split: (train_indices, heldout_indices), both int64 and sorted.

    labels: (N,) int64 digit labels. Each class is permuted with a generator seeded by ``seed``
    and its first 20% (rounded) go to the held-out set.
    """
    gen = torch.Generator().manual_seed(seed)
    train, heldout = [], []
    for digit in range(NUM_CLASSES):
        idx = torch.nonzero(labels == digit).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_heldout = round(len(idx) * HELDOUT_FRACTION)
        heldout.append(idx[:n_heldout])
        train.append(idx[n_heldout:])
    return torch.cat(train).sort().values, torch.cat(heldout).sort().values


def _augment(x: torch.Tensor, gen: torch.Generator, noise_std: float = 0.05) -> torch.Tensor:
    """Random shifts of up to one pixel (background fill) plus gaussian noise; x: (N, 1, 8, 8)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    shifted = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    noise = torch.randn(shifted.shape, generator=gen) * noise_std
    return (shifted + noise).clamp(-1.0, 1.0)


@torch.no_grad()
def classify(net: DigitsNet, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Predicted digits, (N,) int64, for images: (N, 1, H, W) in [-1, 1]."""
    _check_images(images)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    preds = [net(b.to(device)).argmax(1).cpu() for b in images.split(batch_size)]
    net.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


def heldout_accuracy(net: DigitsNet, seed: int = 0) -> float:
    """Accuracy (share in [0, 1]) of ``net`` on the held-out 20% of ``heldout_split(seed)``."""
    images, labels = digits_dataset(INPUT_SIZE)
    _, heldout = heldout_split(labels, seed)
    return (classify(net, images[heldout]) == labels[heldout]).float().mean().item()


def train_metric_net(
    seed: int = 0,
    epochs: int = 40,
    *,
    batch_size: int = 64,
    lr: float = 3e-3,
    log: Callable[[str], None] | None = print,
) -> DigitsNet:
    """Train a :class:`DigitsNet` on the 80% training split of ``heldout_split(seed)``.

    AdamW with a one-cycle learning-rate schedule; each batch gets random one-pixel shifts and
    gaussian noise (std 0.05). Reports the held-out accuracy through ``log`` and returns the net,
    frozen and in eval mode. With the defaults: ~11 s on two idle CPU cores, ~65 s on two busy ones.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = digits_dataset(INPUT_SIZE)
    train_idx, _ = heldout_split(labels, seed)
    x_train, y_train = images[train_idx], labels[train_idx]

    net = DigitsNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(train_idx) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_idx), generator=gen)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(net(_augment(x_train[batch], gen)), y_train[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval().requires_grad_(False)
    if log is not None:
        log(f"metric net held-out accuracy: {heldout_accuracy(net, seed):.4f}")
    return net


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------


def save_metric_net(net: DigitsNet, path: Path, info: dict) -> Path:
    """Write ``net``'s weights to ``path`` (safetensors) and ``info`` to ``path`` with .json."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path))
    meta = path.with_suffix(".json")
    meta.write_text(json.dumps(info, indent=2) + "\n")
    return meta


def load_metric_net(path: str | Path | None = None) -> DigitsNet:
    """The shipped (or ``path``'s) metric network, frozen and in eval mode, on the CPU.

    Raises ValueError naming the missing file and the command that creates it.
    """
    from safetensors.torch import load_file

    path = WEIGHTS_PATH if path is None else Path(path)
    if not path.is_file():
        command = TRAIN_COMMAND if path == WEIGHTS_PATH else f"{TRAIN_COMMAND} --out {path}"
        raise ValueError(
            f"the digits metric network weights are missing: {path} does not exist; "
            f"train them with `{command}`"
        )
    net = DigitsNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in squared feature units.

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)).

    This mirrors clean-fid's ``cleanfid.fid.frechet_distance`` step for step: ``scipy.linalg.sqrtm``
    of the covariance product; if that is not finite (near-singular product), ``eps`` is added to
    both diagonals and the root taken again; a complex result is accepted only if its diagonal's
    imaginary part is within 1e-3 of zero, and its real part is used. Two differences that do not
    change the value: the retry is announced with ``warnings.warn`` rather than ``print``, and
    ``sqrtm`` is called without its deprecated ``disp`` argument, its "Matrix is singular"
    warning silenced instead (as ``disp=False`` silences it in clean-fid: the finiteness check
    is what decides).

    mu1, mu2: (D,) means; sigma1, sigma2: (D, D) covariances.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes: {mu1.shape} and {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different shapes: {sigma1.shape} and {sigma2.shape}")

    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(
                f"fid calculation produces singular product; adding {eps} to diagonal of cov "
                "estimates",
                RuntimeWarning,
                stacklevel=2,
            )
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    tr_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of feats: (N, D), N >= 2, in float64 as clean-fid takes."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"expected an (N, D) feature array with N >= 2, got {feats.shape}")
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets, (Na, D) and (Nb, D), like clean-fid's ``fid_from_feats``."""
    return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Snap [-1, 1] images to the 256 levels an 8-bit PNG holds (clamping first); same shape."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


class DigitsEvaluator:
    """FID-digits and prompt alignment against all 1,797 real digits.

    net: the metric network (default: ``load_metric_net()``). The reference statistics are the
    mean and covariance of the 128-d features of every real digit, quantised like generated images
    and taken at the generated images' resolution: images of R x R pixels are compared with
    ``digits_dataset(R)`` (what a model at that resolution trains on), so the bilinear round trip
    to 8 x 8 is shared by both sides. The statistics for ``resolution`` are computed at
    construction, those for other sizes on first use, then cached.
    """

    def __init__(
        self, net: DigitsNet | None = None, resolution: int = INPUT_SIZE, batch_size: int = 1024
    ) -> None:
        self.net = load_metric_net() if net is None else net.eval().requires_grad_(False)
        self.batch_size = batch_size
        self._reference: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.reference_statistics(resolution)

    def reference_statistics(self, resolution: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """(mean (128,), covariance (128, 128)) of all real digits' features at ``resolution``."""
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if resolution not in self._reference:
            real, _ = digits_dataset(resolution)
            self._reference[resolution] = feature_statistics(self.features(real))
        return self._reference[resolution]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """(N, 128) float64 features of quantised images: (N, 1, H, W) in [-1, 1]."""
        _check_images(images)
        device = next(self.net.parameters()).device
        chunks = [
            self.net.features(quantize(b).to(device)).cpu().double()
            for b in images.split(self.batch_size)
        ]
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, FEATURE_DIM))

    def fid(self, images: torch.Tensor) -> float:
        """FID-digits of square images (N, 1, R, R) in [-1, 1], N >= 2, against real digits at R."""
        _check_images(images)
        height, width = images.shape[-2:]
        if height != width:
            raise ValueError(f"FID-digits needs square images, got {height} x {width}")
        mu, sigma = feature_statistics(self.features(images))
        return frechet_distance(mu, sigma, *self.reference_statistics(height))

    def alignment(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> float:
        """Share in [0, 1] of images (N, 1, H, W) classified as their prompted digit labels (N,)."""
        _check_images(images)
        labels = torch.as_tensor(labels, dtype=torch.int64).flatten().cpu()
        if len(labels) != len(images) or len(images) == 0:
            raise ValueError(
                f"need as many labels as images (> 0), got {len(labels)} and {len(images)}"
            )
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise ValueError(
                f"labels must be digits 0..9, got range {labels.min()}..{labels.max()}"
            )
        preds = classify(self.net, quantize(images), self.batch_size)
        return (preds == labels).float().mean().item()

    def evaluate(
        self, images: torch.Tensor, labels: torch.Tensor | Sequence[int]
    ) -> dict[str, float]:
        """{"fid_digits": FID-digits, "alignment": share classified as prompted} for images."""
        return {"fid_digits": self.fid(images), "alignment": self.alignment(images, labels)}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train and ship the digits metric network.")
    parser.add_argument(
        "--out",
        type=Path,
        default=WEIGHTS_PATH,
        help="safetensors path; the .json info file is written next to it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    net = train_metric_net(seed=args.seed, epochs=args.epochs, log=None)
    seconds = time.perf_counter() - start
    accuracy = heldout_accuracy(net, args.seed)
    info = {"heldout_accuracy": round(accuracy, 6), "seed": args.seed, "epochs": args.epochs}
    meta = save_metric_net(net, args.out, info)
    print(
        f"held-out accuracy {accuracy:.4f} after {seconds:.1f} s of training; "
        f"wrote {args.out} and {meta}"
    )


if __name__ == "__main__":
    main()
