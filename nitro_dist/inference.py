"""The one sampling path: a generator (UNet + text + shifted-LCM sampler + VAE) makes images at
1-4 steps with the same weights.

``Generator.from_checkpoint`` loads a trained checkpoint (weights from ``generator/``, the
sampler from ``scheduler/``: noise schedule + shift; safetensors only); a training run wraps its
live models in a ``Generator`` for sample grids and evaluation. Used by ``nitro_dist.sample``,
``nitro_dist.eval``, training (grids, evaluation) and the Ray Serve app. Below it: the fast
inference wrappers (bf16 without autocast, CUDA graphs, torch.compile).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from nitro_dist import checkpoint_layout as ckpt
from nitro_dist.config import Config, load_config
from nitro_dist.diffusion import NitroLCMScheduler, StudentDenoiser, seeded_noise
from nitro_dist.models.builders import build_tiny_sdxl, is_single_file, load_text_and_vae
from nitro_dist.models.text import TextConditioner
from nitro_dist.remote import open_checkpoint
from nitro_dist.tasks import load_task


def checkpoint_unet(path: Path, use_ema: bool = True, cfg: Config | None = None) -> Any:
    """G's weights in a (local) checkpoint: ``generator/`` (its EMA when there is one and
    ``use_ema``), or for a LoRA student the adapters merged into the base the checkpoint's config
    names (``lora.merged_unet``: its ``model`` section is the reference to the base)."""
    folder = ckpt.generator_dir(path, use_ema)
    if ckpt.is_lora(path):
        from nitro_dist import lora

        cfg = cfg if cfg is not None else Generator.checkpoint_config(path)
        return lora.merged_unet(lora.base_student(cfg), folder)
    return UNet2DConditionModel.from_pretrained(folder, use_safetensors=True)


class Generator:
    def __init__(
        self,
        unet: UNet2DConditionModel,
        text: TextConditioner,
        scheduler: NitroLCMScheduler,
        vae: AutoencoderKL | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        cast: bool = True,
        batch_size: int = 256,
    ) -> None:
        """``cast``: move the models to ``device``/``dtype`` and freeze them (a loaded
        checkpoint); off, they are used as they are (a training run's live models, left as
        found). ``batch_size``: images per model call."""
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        if cast:
            # diffusers warns on any .to(dtype=...): pass a dtype only when it changes one
            cast_to = {} if dtype == torch.float32 else {"dtype": dtype}
            to = lambda m: m.to(self.device, **cast_to)
            unet = to(unet).eval().requires_grad_(False)
            text = text.to(self.device)  # text encoders stay fp32: small, and tokens matter
            vae = to(vae).eval() if vae is not None else None
        self.unet, self.text, self.vae = unet, text, vae
        c = scheduler.config
        self.denoiser = StudentDenoiser(
            dict(c), shift=c.shift, original_steps=c.original_inference_steps
        )
        size = self.unet.config.sample_size
        self.sample_shape = (self.unet.config.in_channels, size, size)
        # pixels per latent cell, and the latent multiple the UNet's downsampling needs
        self.vae_factor = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        # the fast path (nitro_dist.fast_path): accelerated UNet / decode calls, and the batch
        # sizes a model call is padded to so compiled code and CUDA graphs see known shapes
        self.fast_unet: Callable[..., Any] | None = None
        self.fast_decode: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.batch_buckets: tuple[int, ...] = ()  # ascending; () = each batch as it comes

    @property
    def native_size(self) -> int:
        """The side in pixels the generator was trained at."""
        return self.sample_shape[-1] * self.vae_factor

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes in the text encoder (with its start/end tokens)."""
        return max(len(t(prompt, truncation=False).input_ids) for t in self.text.tokenizers)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "cpu",
        use_ema: bool = True,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 256,
    ) -> Generator:
        path = open_checkpoint(path)
        cfg = cls.checkpoint_config(path)
        unet = checkpoint_unet(path, use_ema, cfg)
        scheduler = NitroLCMScheduler.from_pretrained(path / ckpt.SCHEDULER)
        text, vae = _text_and_vae(cfg)
        return cls(unet, text, scheduler, vae, device, dtype, batch_size=batch_size)

    @staticmethod
    def checkpoint_config(path: str | Path) -> Config:
        """The resolved config a checkpoint was trained with (defaults when it has none)."""
        path = open_checkpoint(path)
        found = path / "config.yaml"
        return load_config(str(found)) if found.exists() else Config()

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int = 1,
        size_hw: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1], N x C x H x W on CPU; the same (prompt, seed, steps, size) gives
        the same pixels whatever else is in the batch (per-sample noise from the seed).
        ``size_hw`` in pixels, multiples of ``size_multiple``; default the native size."""
        if len(prompts) != len(seeds):
            raise ValueError("prompts and seeds must have the same length")
        was_training = self.unet.training
        self.unet.eval()
        try:
            out = [
                self._generate(
                    prompts[s : s + self.batch_size], seeds[s : s + self.batch_size], steps, size_hw
                )
                for s in range(0, len(prompts), self.batch_size)
            ]
        finally:
            self.unet.train(was_training)
        return torch.cat(out) if out else torch.empty(0)

    def bucket(self, n: int) -> int:
        """The batch a model call of ``n`` images runs at: the smallest bucket that holds it."""
        return next((b for b in self.batch_buckets if b >= n), n)

    def _generate(
        self, prompts: list[str], seeds: list[int], steps: int, size_hw: tuple[int, int] | None
    ) -> torch.Tensor:
        n = len(prompts)
        pad = self.bucket(n) - n  # repeats of the last sample: per-sample noise, others unchanged
        prompts, seeds = prompts + prompts[-1:] * pad, seeds + seeds[-1:] * pad
        c = self.sample_shape[0]
        h, w = size_hw or (self.native_size, self.native_size)
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"size {h}x{w}: height and width must be multiples of {self.size_multiple}"
            )
        shape = (c, h // self.vae_factor, w // self.vae_factor)
        # SDXL's size micro-conditioning takes pixels; the digits UNet ignores it
        cond = self.text.encode(prompts, (h, w)).to(self.device, self.dtype)
        x_T = seeded_noise(seeds, shape).to(self.device, self.dtype)
        x0 = self.denoiser.sample(
            self.fast_unet or self.unet,
            x_T,
            cond,
            steps,
            noise_fn=lambda k: seeded_noise(seeds, shape, step=k).to(self.device, self.dtype),
        )
        if self.fast_decode is not None:
            x0 = self.fast_decode(x0)
        elif self.vae is not None:
            x0 = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
        return x0[:n].float().clamp(-1, 1).cpu()


def _text_and_vae(cfg: Config) -> tuple[TextConditioner, AutoencoderKL | None]:
    return teacher_text_and_vae(cfg, vae=cfg.model.use_vae)


def teacher_text_and_vae(cfg: Config, *, vae: bool) -> tuple[TextConditioner, AutoencoderKL | None]:
    """The text conditioning (and the VAE when ``vae``) of the teacher ``cfg.model`` names: built
    for ``tiny_sdxl`` (the seed's weights), read from the task's folder, a diffusers folder or a
    single-file checkpoint (only its text encoders and VAE) otherwise."""
    m = cfg.model
    if m.source == "tiny_sdxl":
        tiny = build_tiny_sdxl(cfg.seed, with_vae=vae)
        return tiny.text, tiny.vae
    if m.source == "task":
        # the bare task: a run's metric weights (eval.*) are no concern of inference
        root = load_task(cfg.task, cfg.train.sample_prompts).model_dir()
        if root is None:
            raise ValueError(f"model.source=task: task {cfg.task!r} ships no models")
    else:
        assert m.teacher_path is not None  # config.validate: required for source=diffusers
        root = Path(m.teacher_path)
    if is_single_file(root):
        return load_text_and_vae(root, m.config_path, sdxl=True, vae=vae)
    unet_cfg = UNet2DConditionModel.load_config(root / "unet")
    sdxl = unet_cfg.get("addition_embed_type") == "text_time"
    text, vae_model = load_text_and_vae(root, None, sdxl=sdxl, vae=vae)
    return text, vae_model.eval() if vae_model is not None else None


# ---------------------------------------------------------------------------------------------
# fast inference calls (generation latency): bf16 without autocast, CUDA graphs, compile


class CudaGraphed:
    """Replays a CUDA graph of ``fn`` (inference only: no autograd, fixed shapes). The first
    call with a new input signature warms up on a side stream and captures; later calls copy
    the inputs into the captured buffers and replay. Tensor outputs are cloned (the next replay
    overwrites the captured ones). Removes the CPU's per-kernel launch cost, which dominates a
    batch-1 UNet step in eager mode."""

    def __init__(self, fn: Callable[..., Any], warmup: int = 2) -> None:
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple[list[Any], torch.cuda.CUDAGraph, Any]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = tree_flatten((args, kwargs))
        key = (
            str(spec),
            tuple((tuple(v.shape), v.dtype, v.device) if torch.is_tensor(v) else v for v in flat),
        )
        if key not in self.graphs:
            self.graphs[key] = self._capture(flat, spec)
        static, graph, out = self.graphs[key]
        for dst, src in zip(static, flat, strict=True):
            if torch.is_tensor(dst):
                dst.copy_(src)
        graph.replay()
        return tree_map(lambda v: v.clone() if torch.is_tensor(v) else v, out)

    @torch.no_grad()
    def _capture(self, flat: list[Any], spec: Any) -> tuple[list[Any], torch.cuda.CUDAGraph, Any]:
        static = [v.clone() if torch.is_tensor(v) else v for v in flat]
        args, kwargs = tree_unflatten(static, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*args, **kwargs)
        return static, graph, out


def _accelerated(
    fn: Callable[..., Any], graphs: bool, compile: str | None, backend: str = "inductor"
) -> Callable[..., Any]:
    """``fn`` compiled (a torch.compile mode, with ``backend``: "inductor", or "aot_eager" /
    "eager" to run the same tracing without code generation, as CPU tests do) and/or replayed
    as CUDA graphs. Compiled per input shape (``dynamic=False``: serving pads batches to a few
    known sizes and warms each), with room for many shapes and no sharing of that room with
    other compiled functions of the process."""
    if compile is not None:
        fn = torch.compile(  # type: ignore[call-overload]  # the stubs lack recompile_limit
            fn,
            backend=backend,
            mode=compile if backend == "inductor" else None,  # modes are inductor's
            dynamic=False,
            recompile_limit=COMPILED_SHAPES,
            isolate_recompiles=True,
        )
    return CudaGraphed(fn) if graphs else fn


COMPILED_SHAPES = 256  # input shapes one compiled UNet / decoder may hold


def _cast(dtype: torch.dtype) -> Callable[[Any], Any]:
    return lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v


class LowPrecisionUNet:
    """A UNet held in ``dtype`` called without autocast (as diffusers pipelines run): floating
    inputs are cast to ``dtype`` and the prediction comes back fp32, so the sampler's maths
    stays fp32. ``graphs``: replay CUDA graphs (``CudaGraphed``); ``compile``: a
    ``torch.compile`` mode ("default", "reduce-overhead", ...) with ``backend``. Same call as
    the UNet."""

    def __init__(
        self,
        unet: torch.nn.Module,
        dtype: torch.dtype = torch.bfloat16,
        *,
        graphs: bool = False,
        compile: str | None = None,
        backend: str = "inductor",
    ) -> None:
        self.dtype = dtype

        def predict(x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
            return unet(x, t, **kw).sample

        self.fn = _accelerated(predict, graphs, compile, backend)
        self.compiled = compile is not None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kw: Any) -> SimpleNamespace:
        if self.compiled:  # compiled CUDA graphs: a new step may overwrite the last outputs
            torch.compiler.cudagraph_mark_step_begin()
        out = self.fn(_cast(self.dtype)(x), t, **tree_map(_cast(self.dtype), kw))
        return SimpleNamespace(sample=out.float())


class LowPrecisionDecoder:
    """``vae.decode(latents / scaling).sample`` in the VAE's dtype without autocast, optionally
    CUDA-graphed or compiled like ``LowPrecisionUNet``; returns fp32 pixels in [-1, 1]-ish."""

    def __init__(
        self,
        vae: AutoencoderKL,
        *,
        graphs: bool = False,
        compile: str | None = None,
        backend: str = "inductor",
    ):
        self.dtype = next(vae.parameters()).dtype
        scale = vae.config.scaling_factor

        def decode(z: torch.Tensor) -> torch.Tensor:
            return vae.decode(z / scale).sample

        self.fn = _accelerated(decode, graphs, compile, backend)
        self.compiled = compile is not None

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(latents.to(self.dtype)).float()
