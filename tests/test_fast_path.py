"""The served fast path without Ray: batches padded to buckets give the same images; a compiled
generator (aot_eager: the torch.compile path without code generation, as on CPU) gives the eager
images for the same seeds, and after the warm-up no request of any (steps, size, bucket)
compiles anything; the app arguments that choose it are checked before anything starts."""

import pytest
import torch

from nitro_dist.diffusion import NitroLCMScheduler
from nitro_dist.fast_path import FastPath, batch_buckets, compilations
from nitro_dist.inference import Generator


def test_batch_buckets_and_bad_settings_name_the_argument():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(6) == (1, 2, 4, 6)
    with pytest.raises(ValueError, match="compile: 'fastest'"):
        FastPath(compile="fastest")
    with pytest.raises(ValueError, match="compile_backend: 'tvm'"):
        FastPath(compile="default", backend="tvm")
    assert not FastPath().on and FastPath(cuda_graphs=True).on


def test_padding_to_a_bucket_gives_the_same_images(tiny_models):
    m = tiny_models
    sched = NitroLCMScheduler.from_schedule(m.schedule, 250)
    gen = Generator(m.student, m.text, sched, None)
    prompts, seeds = ["a red cube", "a blue ball", "a cat"], [1, 2, 3]
    plain = gen(prompts, seeds, 2)
    gen.batch_buckets, gen.batch_size = (1, 4), 4
    assert gen.bucket(3) == 4 and gen.bucket(1) == 1
    padded = gen(prompts, seeds, 2)
    assert padded.shape == plain.shape
    assert (padded - plain).abs().max() < 1e-5  # batch numerics only


@pytest.mark.slow
@pytest.mark.drill
def test_compiled_generator_matches_eager_and_warm_up_covers_every_bucket(short_digits_run):
    """The replica's loader (served_model.load_model) on the fast path: 2 buckets x 1 size x 4
    step counts warmed (2 compilations: steps do not change shapes); afterwards requests of
    every steps, batch 1-3 and the served size compile nothing and give the eager images
    (fp32: within 1e-5, far below one PNG level); other sizes are refused, not compiled."""
    from nitro_dist.serve import resolve_checkpoint
    from nitro_dist.served_model import load_model

    ckpt = resolve_checkpoint(str(short_digits_run))
    eager = load_model("d", ckpt, device="cpu", dtype="fp32")
    fast = FastPath(compile="default", backend="aot_eager")
    m = load_model("d", ckpt, device="cpu", dtype="fp32", fast=fast, max_images_per_call=2)
    assert m.gen.batch_buckets == (1, 2)
    assert m.warm is not None and m.warm.compilations == 2
    assert sorted(m.warm.runs) == [(k, 8, 8, b) for k in (1, 2, 3, 4) for b in (1, 2)]
    assert m.limits.sizes == ((8, 8),)
    assert m.info()["fast_path"]["warm_runs"] == 8
    before = compilations(m.gen)
    prompts = ["a handwritten digit three", "a handwritten digit five", "a handwritten digit one"]
    for steps in (1, 2, 3, 4):
        for n in (1, 2, 3):
            got = m.gen(prompts[:n], list(range(10, 10 + n)), steps, (8, 8))
            want = eager.gen(prompts[:n], list(range(10, 10 + n)), steps, (8, 8))
            assert (got - want).abs().max() < 1e-5, (steps, n)
    assert compilations(m.gen) == before  # no request paid for compilation
    with pytest.raises(ValueError, match="size: 16x8 .* serves 8x8"):
        m.limits.check_size(8, 16)


def test_fast_path_app_arguments_are_checked_before_anything_starts():
    from pydantic import ValidationError

    from nitro_dist.serve import AppArgs, fast_path_of

    with pytest.raises(ValueError, match="cuda_graphs: CUDA graphs need device=cuda"):
        fast_path_of(AppArgs(cuda_graphs=True), "cpu")
    with pytest.raises(ValidationError, match="compile"):
        AppArgs.model_validate({"compile": "fastest"})
    args = AppArgs.model_validate({"compile": "default", "compile_backend": "eager"})
    assert fast_path_of(args, "cpu") == FastPath(compile="default", backend="eager")
    assert fast_path_of(AppArgs(), "cpu") == FastPath()


def test_the_fast_path_wrappers_cast_and_return_fp32():
    from nitro_dist.fast_path import accelerate
    from nitro_dist.models.builders import build_tiny_sdxl

    m = build_tiny_sdxl(0, with_vae=True)
    sched = NitroLCMScheduler.from_schedule(m.schedule, 250)
    gen = Generator(m.student, m.text, sched, m.vae)
    accelerate(gen, FastPath(), (1, 2))  # eager wrappers: the path without compile
    assert gen.fast_unet is not None and gen.fast_decode is not None and gen.batch_size == 2
    out = gen(["a cat"] * 3, [1, 2, 3], 1)
    ref = Generator(m.student, m.text, sched, m.vae)(["a cat"] * 3, [1, 2, 3], 1)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 1e-5
