"""LoRA students (student.lora.*, nitro_dist/lora.py): only the adapters train, are optimized and
checkpointed; a split run resumes exactly; the checkpoint's adapters export as diffusers' LoRA
file, which a stock SDXL pipeline's ``load_lora_weights`` reads to the trained student's output,
or merged into full weights (``--merge``); the memory plan shows the saving. W=1 == W=2 with
LoRA is tests/test_pool_sync.py's ``lora`` variant; bad student.lora values tests/test_config.py."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from sdxl_files import sdxl_pipeline

from nitro_dist import checkpoint_layout, lora
from nitro_dist import memory_plan as MP
from nitro_dist.build import build_run
from nitro_dist.checkpoint import load_weights
from nitro_dist.config import load_config
from nitro_dist.diffusion import NitroLCMScheduler
from nitro_dist.export import main as export_main
from nitro_dist.inference import Generator
from nitro_dist.loop import train
from nitro_dist.models.builders import build_tiny_sdxl

LORA = ["student.lora.rank=4", "student.lora.alpha=8", "optim.lr=1e-2", "optim.ema_decay=0.5"]
RUN = ["train.checkpoint_every=0", "train.log_every=0", *LORA]


def _cfg(*extra):
    return load_config("tiny", [*RUN, *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LoRA run trained 2 iterations straight, and 1 + 1 with a resume."""
    straight, split = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("split")
    train(_cfg("train.iterations=2"), straight)
    train(_cfg("train.iterations=1"), split)
    train(_cfg("train.iterations=2"), split)
    return straight / "checkpoints" / "iter_000002", split / "checkpoints" / "iter_000002"


def _unet_out(unet, seed=0):
    """One UNet call on fixed inputs (the tiny SDXL's shapes)."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    hidden = torch.randn(2, 77, c.cross_attention_dim, generator=g)
    pooled_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(2, pooled_dim, generator=g),
        "time_ids": torch.rand(2, 6, generator=g),
    }
    with torch.no_grad():
        return unet(x, torch.tensor([999, 499]), hidden, added_cond_kwargs=added).sample


def test_only_the_adapters_train():
    run = build_run(_cfg(), progress=False)
    s = run.models.student
    trainable = lora.trainable(s)
    assert trainable and all("lora_" in n for n, p in s.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in trainable) < 0.1 * sum(p.numel() for p in s.parameters())
    opt = [p for g in run.g.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt} == {id(p) for p in trainable}
    # the EMA shares the frozen base and copies the adapters
    shared = [pe is p for pe, p in zip(run.ema.parameters(), s.parameters(), strict=True)]
    assert sum(shared) == sum(not p.requires_grad for p in s.parameters())
    before = {n: p.detach().clone() for n, p in s.named_parameters()}
    from nitro_dist.step import train_step

    assert train_step(run, 0)["skipped"] == 0
    for n, p in s.named_parameters():
        same = torch.equal(before[n], p)
        assert same != ("lora_B" in n), n  # B (zero at start) moved, the base did not


@pytest.mark.slow  # the fixture: three tiny training runs (~35 s)
def test_checkpoint_holds_adapters_only_and_resumes_exactly(runs):
    a, b = runs
    assert not (a / "generator").exists() and (a / "generator_lora" / lora.LORA_FILE).exists()
    for name in ("generator_lora", "generator_ema_lora"):
        wa = load_file(str(a / name / lora.LORA_FILE))
        wb = load_file(str(b / name / lora.LORA_FILE))
        assert wa.keys() == wb.keys() and all(k.startswith("unet.") for k in wa)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    sa, sb = (load_file(str(p / "optimizer" / "state.safetensors")) for p in (a, b))
    assert len(sa) == 3 * len(wa)  # exp_avg, exp_avg_sq, step per adapter tensor: no base
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6)
    full = sum(p.numel() for p in build_tiny_sdxl(0).student.parameters())
    stored = sum(v.numel() for v in sa.values())
    assert stored < 0.2 * full  # adapters' state only (a full student's is 2x its weights)
    # a full-student config does not resume from adapters (and says why)
    run = build_run(load_config("tiny"), progress=False)
    with pytest.raises(ValueError, match="student.lora.rank"):
        load_weights(a, run.models.student, None)


@pytest.mark.slow
def test_lora_export_loads_into_a_stock_pipeline(runs, tmp_path):
    ckpt, _ = runs
    # the trained student: the base from the config plus the checkpoint's adapters, unmerged
    cfg = Generator.checkpoint_config(ckpt)
    run = build_run(cfg, progress=False)
    load_weights(ckpt, run.models.student, run.ema)
    want = _unet_out(run.models.student.eval())
    out = tmp_path / "adapters.safetensors"
    args = ["--checkpoint", str(ckpt), "--format", "lora", "--no-ema", "--out", str(out)]
    assert export_main(args) == 0
    assert export_main(args) == 2  # exists: --overwrite
    # a stock SDXL pipeline of the base model (tiny: from the seed), diffusers' LoRA loader
    m = build_tiny_sdxl(cfg.seed, with_vae=True)
    pipe = sdxl_pipeline(m, NitroLCMScheduler.from_pretrained(ckpt / "scheduler"))
    base_out = _unet_out(pipe.unet)
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name)
    got = _unet_out(pipe.unet)
    assert (want - base_out).abs().max() > 1e-4  # the adapters matter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the EMA's adapters are the default
    ema = tmp_path / "ema.safetensors"
    assert export_main(["--checkpoint", str(ckpt), "--format", "lora", "--out", str(ema)]) == 0
    saved = load_file(str(ckpt / "generator_ema_lora" / lora.LORA_FILE))
    assert all(torch.equal(v, saved[k]) for k, v in load_file(str(ema)).items())
    # --merge: full weights, the adapters merged into the base
    merged = tmp_path / "merged.safetensors"
    args = ["--checkpoint", str(ckpt), "--format", "unet-safetensors", "--no-ema"]
    assert export_main([*args, "--out", str(merged)]) == 2  # a LoRA checkpoint needs --merge
    assert export_main([*args, "--merge", "--out", str(merged)]) == 0
    unet = UNet2DConditionModel.from_config(m.student.config)
    unet.load_state_dict(load_file(str(merged)))
    torch.testing.assert_close(_unet_out(unet), want, rtol=1e-4, atol=1e-5)
    # inference reads the checkpoint the same way (merged EMA adapters by default)
    gen = Generator.from_checkpoint(ckpt, use_ema=False)
    torch.testing.assert_close(_unet_out(gen.unet), want, rtol=1e-4, atol=1e-5)
    state = json.loads((ckpt / checkpoint_layout.TRAINER_STATE).read_text())
    assert state["iteration"] == 2


def test_memory_plan_shows_the_saving():
    full = MP.plan(load_config("tiny"), activations=False)
    low = MP.plan(load_config("tiny", ["student.lora.rank=4"]), activations=False)
    opt = "G AdamW state (2 x fp32)"
    assert low.shared[opt] < 0.1 * full.shared[opt]
    assert low.g_trainable < 0.1 * full.g_trainable == 0.1 * full.g_params
    assert low.shared["G weights (fp32)"] > full.shared["G weights (fp32)"]  # base + adapters
    assert "G trainable parameters (millions)" in low.table()


def test_unknown_target_module_names_the_key():
    with pytest.raises(ValueError, match="student.lora.target_modules"):
        build_run(_cfg("student.lora.target_modules=[no_such_layer]"), progress=False)
