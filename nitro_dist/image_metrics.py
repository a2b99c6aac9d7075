"""Task-free image metrics: FID through clean-fid with a local Inception, CLIP score with a local
CLIP, and the student-against-its-teacher comparison built from them.

Nothing here downloads anything. The weights are files the user names:

- Inception: clean-fid's "clean"-mode network, the TorchScript file ``inception-2015-12-05.pt``
  (the one clean-fid and StyleGAN2-ADA download; copy it to the offline machine). Images go
  through clean-fid's own path: PNG files in a folder, ``cleanfid.fid.get_folder_features``
  (PIL bicubic resize to 299 x 299 in float, mode "clean") and ``cleanfid.fid.fid_from_feats``.
- CLIP: a transformers CLIP folder (``CLIPModel`` + ``CLIPProcessor``, ``save_pretrained``
  layout), e.g. openai/clip-vit-large-patch14 copied to disk.

``TeacherComparison`` scores a student's images against its own teacher's on the same prompts:
``fid_teacher`` (FID of student images against teacher images) and ``clip_score``. The teacher
images come from the run's config (its teacher UNet and ``teacher`` sampler, the path training
distils from) and are made once per prompt list; the teacher is dropped once they exist.

``save_tiny_inception`` / ``save_tiny_clip`` write small randomly initialised stand-ins in the
same formats (tests, offline dry runs): the numbers mean nothing, the code path is the real one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from nitro_dist.config import Config

INCEPTION_FILE = "inception-2015-12-05.pt"  # the name clean-fid's InceptionV3W loads
INCEPTION_DIM = 2048  # clean-fid views the network's output as (N, 2048)


def import_cleanfid(what: str) -> Any:
    """``cleanfid.fid``, or a ValueError naming ``what`` (the flag or key that asked for FID)."""
    try:
        from cleanfid import fid
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision failing inside it
        raise ValueError(
            f"{what}: FID needs clean-fid, which does not import here ({type(e).__name__}: {e}); "
            "install it with `pip install -e .[eval]` beside a torchvision built for this torch"
        ) from None
    return fid


def _uint8_rgb(images_NCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] -> uint8 N x H x W x 3, quantised as ``images.to_uint8_hwc`` saves samples; grey
    repeated to RGB, a latent's first 3 channels (that module imports tasks: no cycle here)."""
    x = images_NCHW.detach().float().cpu()
    x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x[:, :3]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _write_pngs(images_NCHW: torch.Tensor, folder: Path) -> None:
    from PIL import Image

    for i, img in enumerate(_uint8_rgb(images_NCHW)):
        Image.fromarray(img).save(folder / f"{i:06d}.png")


def check_inception_path(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a file and clean-fid imports; else ValueError naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"{what} {path}: no such file; give clean-fid's Inception weights, the TorchScript "
            f"file {INCEPTION_FILE} (nothing is downloaded)"
        )
    import_cleanfid(what)
    return path


def check_clip_path(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{what} {path}: not a transformers CLIP folder (no config.json; a CLIPModel and "
            "CLIPProcessor saved with save_pretrained)"
        )
    return path


class InceptionFID:
    """clean-fid's feature extractor with the Inception at ``path`` (no download).

    ``what`` names the flag or config key the path came from, for error messages."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        *,
        what: str = "--inception",
        batch_size: int = 64,
    ) -> None:
        path = check_inception_path(path, what)
        self.fid = import_cleanfid(what)
        from cleanfid.inception_torchscript import InceptionV3W

        self.device, self.batch_size, self.what = torch.device(device), batch_size, what
        # InceptionV3W loads <folder>/inception-2015-12-05.pt: give it a folder holding a link
        # to the user's file under that name, so any file name works
        with tempfile.TemporaryDirectory() as tmp:
            os.symlink(path.resolve(), Path(tmp) / INCEPTION_FILE)
            try:
                net = InceptionV3W(tmp, download=False, resize_inside=False)
            except Exception as e:  # noqa: BLE001 - torch.jit.load's errors, missing .layers
                raise ValueError(
                    f"{what} {path}: not a TorchScript Inception clean-fid can load "
                    f"({type(e).__name__}: {e})"
                ) from None
        self.net = net.to(self.device).eval()

    @torch.no_grad()
    def features(self, images_NCHW: torch.Tensor) -> np.ndarray:
        """(N, 2048) float features of images in [-1, 1], through clean-fid's folder path (the
        images are written as 8-bit PNGs first, as any saved sample would be)."""
        with tempfile.TemporaryDirectory() as tmp:
            _write_pngs(images_NCHW, Path(tmp))
            return self.folder_features(tmp)

    def folder_features(self, folder: str | Path) -> np.ndarray:
        return self.fid.get_folder_features(
            str(folder),
            model=self.net,
            num_workers=0,  # the resize runs in this process: no loader workers to start
            batch_size=self.batch_size,
            device=self.device,
            mode="clean",
            verbose=False,
        )

    def fid_from_features(self, feats_a: np.ndarray, feats_b: np.ndarray) -> float:
        """FID of two feature sets: ``frechet_from_features`` while both sets are smaller than
        the feature width (the same number, without a 2048 x 2048 matrix root), else clean-fid's
        ``fid_from_feats``."""
        if len(feats_a) < 2 or len(feats_b) < 2:
            raise ValueError(f"FID needs 2+ images a side, got {len(feats_a)} and {len(feats_b)}")
        if max(len(feats_a), len(feats_b)) < feats_a.shape[1]:
            return frechet_from_features(feats_a, feats_b)
        return float(self.fid.fid_from_feats(feats_a, feats_b))

    def fid_to_stats(self, feats: np.ndarray, stats_npz: str | Path) -> float:
        """FID of features against precomputed statistics (an .npz with ``mu`` and ``sigma``)."""
        stats = np.load(stats_npz)
        mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
        return float(self.fid.frechet_distance(mu, sigma, stats["mu"], stats["sigma"]))


def frechet_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """The Frechet distance of the Gaussians fitted to two feature sets (Na, D) and (Nb, D),
    as clean-fid's ``fid_from_feats`` (np.cov, ddof 1), through the N x N side.

    d^2 = ||mu_a - mu_b||^2 + Tr S_a + Tr S_b - 2 Tr sqrt(S_a S_b). With centred features A, B
    (S_a = A^T A / (Na - 1)), the non-zero eigenvalues of S_a S_b are those of K K^T with
    K = A B^T / sqrt((Na - 1)(Nb - 1)), so Tr sqrt(S_a S_b) is the sum of K's singular values:
    an (Na x Nb) SVD instead of scipy's sqrtm of a D x D product (a minute for D = 2048 on two
    busy cores), and exact where sqrtm struggles with the rank-deficient covariances of N < D."""
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    a, b = a - mu_a, b - mu_b
    ca, cb = len(a) - 1, len(b) - 1
    tr_a, tr_b = (a * a).sum() / ca, (b * b).sum() / cb
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(ca * cb)
    diff = mu_a - mu_b
    return float(diff @ diff + tr_a + tr_b - 2 * tr_sqrt)


class ClipScorer:
    """CLIP score: 100 x cosine of CLIP's image and text embeddings, floored at 0 (Hessel et al.
    2021 without their 2.5 weight, as torchmetrics and the distillation papers report it)."""

    def __init__(
        self, path: str | Path, device: str | torch.device = "cpu", *, what: str = "--clip"
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        path = check_clip_path(path, what)
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(
                f"{what} {path}: cannot load a CLIP model and processor ({e})"
            ) from None
        self.device = torch.device(device)
        self.model.to(self.device)

    @torch.no_grad()
    def scores(self, images_NCHW: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(N,) per-image scores of images in [-1, 1] against their prompts."""
        if len(images_NCHW) != len(prompts):
            raise ValueError(f"CLIP score: {len(images_NCHW)} images for {len(prompts)} prompts")
        arrays = list(_uint8_rgb(images_NCHW))
        out = []
        for s in range(0, len(arrays), 64):
            inputs = self.processor(
                text=prompts[s : s + 64],
                images=arrays[s : s + 64],
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(self.device)
            res = self.model(**inputs)
            img = torch.nn.functional.normalize(res.image_embeds, dim=-1)
            txt = torch.nn.functional.normalize(res.text_embeds, dim=-1)
            out.append((100 * (img * txt).sum(-1)).clamp(min=0).cpu())
        return torch.cat(out) if out else torch.empty(0)

    def __call__(self, images_NCHW: torch.Tensor, prompts: list[str]) -> float:
        return float(self.scores(images_NCHW, prompts).mean())


# ---------------------------------------------------------------------------------------------
# the teacher's images


class TeacherImages:
    """The run's teacher as an image generator: its UNet under the ``teacher`` section's sampler
    (``data.pairs.teacher_x0``, what training distils towards), decoded by the VAE when the run
    has one. Same (prompt, seed) -> same pixels, whatever the batch."""

    def __init__(
        self,
        cfg: Config,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        task_dir: Path | None = None,
    ) -> None:
        """``task_dir``: the task's model folder, read for ``model.source=task``."""
        from nitro_dist.diffusion import TeacherSampler

        self.device, self.batch_size = torch.device(device), batch_size
        # build_tiny_sdxl seeds the global RNG: keep the caller's (a training run's) stream
        with torch.random.fork_rng(devices=[]):
            parts = _teacher_models(cfg, task_dir)
        self.unet, self.text, self.vae, schedule, self.sample_shape = parts
        for m in (self.unet, self.text, self.vae):
            if m is not None:
                m.to(self.device)
        self.sampler = TeacherSampler.from_config(schedule, cfg.teacher)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Images in [-1, 1], N x C x H x W on the CPU."""
        from nitro_dist.data.pairs import teacher_x0

        out = []
        for s in range(0, len(prompts), self.batch_size):
            x0 = teacher_x0(
                self.unet,
                self.text,
                self.sampler,
                prompts[s : s + self.batch_size],
                torch.tensor(seeds[s : s + self.batch_size], dtype=torch.long),
                self.sample_shape,
                self.device,
            ).float()
            if self.vae is not None:
                x0 = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
            out.append(x0.float().clamp(-1, 1).cpu())
        return torch.cat(out) if out else torch.empty(0)


def _teacher_models(
    cfg: Config, task_dir: Path | None
) -> tuple[Any, Any, Any, dict[str, Any], tuple[int, int, int]]:
    """(teacher UNet, text conditioner, VAE or None, noise schedule, sample shape) of the
    config's model section, read by the loaders training uses (task folder, diffusers folder,
    single-file checkpoint with model.config_path, tiny_sdxl). The student is not read: the
    builder's stand-in copy of the teacher is dropped at once."""
    import dataclasses

    from nitro_dist.models.builders import build_models

    model_cfg = dataclasses.replace(cfg.model, student_path=None, gradient_checkpointing=False)
    m = build_models(model_cfg, cfg.seed, task_dir)
    return m.teacher, m.text, m.vae, m.schedule, m.sample_shape


class TeacherComparison:
    """``fid_teacher`` (FID of student images against the teacher's on the same prompts) and
    ``clip_score`` of student images; either part is off when its path is empty.

    The paths are checked (and clean-fid imported) at construction, the weights loaded on first
    use. Teacher images use the seeds ``first_seed + i`` (the callers pass the evaluation range,
    ``tasks.EVAL_SEED_OFFSET`` on); they and their
    Inception features are made once for a prompt list and kept (the teacher is frozen), then
    the teacher models are released. ``what`` names where the paths came from, for errors
    (``("--inception", "--clip")`` in the CLI, the config keys in training)."""

    def __init__(
        self,
        cfg: Config,
        *,
        inception: str = "",
        clip: str = "",
        device: str | torch.device = "cpu",
        first_seed: int = 0,
        batch_size: int = 64,
        task_dir: Path | None = None,
        what: tuple[str, str] = ("eval.inception", "eval.clip"),
    ) -> None:
        self.cfg, self.device, self.first_seed = cfg, torch.device(device), first_seed
        self.task_dir = task_dir
        self.batch_size, self.what = batch_size, what
        self.inception_path, self.clip_path = inception, clip
        if inception:
            check_inception_path(inception, what[0])
        if clip:
            check_clip_path(clip, what[1])
        self._inception: InceptionFID | None = None
        self._clip: ClipScorer | None = None
        self._teacher: TeacherImages | None = None
        self._cache: dict[tuple[str, ...], tuple[torch.Tensor, np.ndarray | None]] = {}

    @classmethod
    def from_config(
        cls, cfg: Config, first_seed: int, task_dir: Path | None = None
    ) -> TeacherComparison | None:
        """The comparison ``cfg.eval`` asks for (None when it names no weights), on the
        training device."""
        e = cfg.eval
        if not (e.inception or e.clip):
            return None
        device = cfg.train.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(
            cfg,
            inception=e.inception,
            clip=e.clip,
            device=device,
            first_seed=first_seed,
            task_dir=task_dir,
        )

    @property
    def inception(self) -> InceptionFID | None:
        if self._inception is None and self.inception_path:
            self._inception = InceptionFID(self.inception_path, self.device, what=self.what[0])
        return self._inception

    @property
    def clip(self) -> ClipScorer | None:
        if self._clip is None and self.clip_path:
            self._clip = ClipScorer(self.clip_path, self.device, what=self.what[1])
        return self._clip

    def metric_names(self) -> list[str]:
        return ["fid_teacher"] * bool(self.inception_path) + ["clip_score"] * bool(self.clip_path)

    def teacher(self, prompts: list[str]) -> tuple[torch.Tensor, np.ndarray | None]:
        """(teacher images, their Inception features or None) for ``prompts``."""
        key = tuple(prompts)
        if key not in self._cache:
            if self._teacher is None:
                self._teacher = TeacherImages(self.cfg, self.device, self.batch_size, self.task_dir)
            seeds = [self.first_seed + i for i in range(len(prompts))]
            images = self._teacher(prompts, seeds)
            feats = self.inception.features(images) if self.inception is not None else None
            self._cache = {key: (images, feats)}  # the last prompt list only
            self._teacher = None  # frozen: its images are all it is needed for
        return self._cache[key]

    def __call__(self, images_NCHW: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.inception is not None:
            _, teacher_feats = self.teacher(prompts)
            assert teacher_feats is not None  # made with the inception
            out["fid_teacher"] = self.inception.fid_from_features(
                self.inception.features(images_NCHW), teacher_feats
            )
        if self.clip is not None:
            out["clip_score"] = self.clip(images_NCHW, prompts)
        return out


# ---------------------------------------------------------------------------------------------
# small random stand-ins in the real formats (tests, dry runs)


class _TinyInceptionLayers(torch.nn.Module):
    """Images N x 3 x 299 x 299 (normalised to [-1, 1]) -> N x 2048 x 1 x 1, like the layers of
    clean-fid's Inception: two strided convolutions, global average pool, a linear map to 2048."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.conv2 = torch.nn.Conv2d(8, 16, 5, stride=4)
        self.proj = torch.nn.Linear(16 * 4 * 4, INCEPTION_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(torch.relu(self.conv1(x))))
        h = torch.nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.proj(h)[:, :, None, None]


class _TinyInception(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _TinyInceptionLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        # the real file's signature; clean-fid's "clean" mode calls .layers directly
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear")
        return self.layers((x - 128) / 128).flatten(1)


def save_tiny_inception(path: str | Path, seed: int = 0) -> Path:
    """A random-weight TorchScript stand-in for ``inception-2015-12-05.pt`` (same calls, same
    2048-d output) at ``path``."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _TinyInception().eval()
    for attempt in range(3):
        try:  # scripting parses torch's sources with ast.parse
            scripted = torch.jit.script(model)
            break
        except SystemError as e:
            # CPython 3.11 keeps the AST builder's recursion depth per interpreter, not per
            # thread: another thread compiling at the same moment (a server's templates) makes
            # ast.parse fail with "AST constructor recursion depth mismatch" (gh-106905, seen
            # once in the test suite); the race is rare, so parse again
            if "recursion depth mismatch" not in str(e) or attempt == 2:
                raise
    scripted.save(str(path))
    return path


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """A random-weight transformers CLIP folder (model + processor, 32 x 32 images, the offline
    CLIP tokenizer) at ``path``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from nitro_dist.models.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={**tower, "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={**tower, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    path = Path(path)
    CLIPModel(config).save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer()).save_pretrained(path)
    return path
