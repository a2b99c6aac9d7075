"""LoRA students (student.lora.*, nitro_dist/lora.py): only the adapters train, are optimized and
checkpointed; a split run resumes exactly; the checkpoint's adapters export as diffusers' LoRA
file, which a stock SDXL pipeline's ``load_lora_weights`` reads to the trained student's output,
or merged into full weights (``--merge``); the memory plan shows the saving. W=1 == W=2 with
LoRA is tests/test_pool_sync.py's ``lora`` variant; bad student.lora values (ZeRO-3 + LoRA among
them) tests/test_config.py. The same checks under a DeepSpeed engine (ZeRO 0/1/2) run in-process
in a one-rank gloo group."""

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from sdxl_files import sdxl_pipeline

from nitro_dist import checkpoint_layout, lora
from nitro_dist import memory_plan as MP
from nitro_dist.build import build_run
from nitro_dist.checkpoint import load_states, load_weights, write_checkpoint
from nitro_dist.config import load_config
from nitro_dist.diffusion import NitroLCMScheduler
from nitro_dist.export import main as export_main
from nitro_dist.inference import Generator
from nitro_dist.loop import train
from nitro_dist.models import tiny
from nitro_dist.models.builders import build_sdxl_from_configs, build_tiny_sdxl
from nitro_dist.step import train_step

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


# a light iteration (as tests/test_trust.py's DeepSpeed check): what these tests check does not
# depend on its size
LIGHT = ["train.batch_size=2", "teacher.timesteps=[999,499]", "pool.levels=[0]"]


@pytest.fixture(scope="module")
def small_models(one_rank_group):
    """The 2-level tiny SDXL models, built once in the one-rank group: each run copies the
    student."""
    return build_sdxl_from_configs(tiny.TINY_SDXL_UNET_2LEVEL, tiny.TINY_SDXL_TEXT_ENCODERS, None)


def _deepspeed_run(cfg, models, resume=None):
    """What a Ray Train worker does (loop.train with RaySession): build, the checkpoint's
    weights into G, G into a DeepSpeed engine, then the optimizer state and the heads."""
    from nitro_dist.distributed.parallel import parallelize

    fresh = dataclasses.replace(models, student=copy.deepcopy(models.student))
    run = build_run(cfg, progress=False, models=fresh)
    if resume is not None:
        run.state = load_weights(resume, run.models.student, run.ema)
    parallelize(run, 0, 1)
    if resume is not None:
        load_states(resume, run.g, run.pool.local)
    return run


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_steps_with_the_scheduled_g_lr(small_models, stage):
    """optim.warmup_iterations under DeepSpeed: the AdamW the engine steps (stage 0: ours; ZeRO:
    the one under its partition) takes the schedule's lr, and the iteration reports it."""
    cfg = _cfg(f"distributed.zero_stage={stage}", "optim.warmup_iterations=4", *LIGHT)
    run = _deepspeed_run(cfg, small_models)
    seen: list[float] = []
    base = run.g.optimizer if stage == 0 else run.g.optimizer.optimizer
    base.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    metrics = train_step(run, 1)  # iteration 1 of a 4-iteration warm-up: lr x 2/4
    assert metrics["g_lr"] == pytest.approx(cfg.optim.lr / 2) and metrics["skipped"] == 0
    assert seen == [pytest.approx(cfg.optim.lr / 2)]


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_steps_and_checkpoints_only_the_adapters(small_models, stage, tmp_path):
    """LoRA under DeepSpeed ZeRO 0/1/2: DeepSpeed's optimizer holds the adapters only (the
    base stays bit-identical, the adapters move), the checkpoint holds the adapters and their
    AdamW state only, and a run resumed from it takes the next step the straight run takes."""
    cfg = _cfg(f"distributed.zero_stage={stage}", *LIGHT)
    run = _deepspeed_run(cfg, small_models)
    s = run.models.student
    adapters = lora.trainable(s)
    assert type(run.g).__name__ == "DeepSpeedUpdate" and adapters
    if stage == 0:  # the engine steps our AdamW itself
        held = [p for g in run.g.optimizer.param_groups for p in g["params"]]
    else:  # ZeRO: the params it flattens, and the fp32 partition its base optimizer steps
        held = [p for group in run.g.optimizer.bit16_groups for p in group]
        flat = run.g.optimizer.single_partition_of_fp32_groups
        assert sum(f.numel() for f in flat) == sum(p.numel() for p in adapters)
    assert {id(p) for p in held} == {id(p) for p in adapters}
    before = {n: p.detach().clone() for n, p in s.named_parameters()}
    assert train_step(run, 0)["skipped"] == 0
    for n, p in s.named_parameters():
        assert torch.equal(before[n], p) != ("lora_B" in n), n  # B (zero at start) moved
    run.state = {"iteration": 1, "images_seen": cfg.train.batch_size}
    write_checkpoint(run.checkpoint_parts(), tmp_path)
    assert not (tmp_path / "generator").exists()
    saved = load_file(str(tmp_path / "generator_lora" / lora.LORA_FILE))
    state = load_file(str(tmp_path / "optimizer" / "state.safetensors"))
    assert len(saved) == len(adapters) and len(state) == 3 * len(adapters)  # moments + step
    shapes = sorted(tuple(p.shape) for p in adapters)
    assert sorted(tuple(v.shape) for k, v in state.items() if "exp_avg_sq" in k) == shapes
    # resumed: the next iteration equals the straight run's (seen: bit-identical; bound 1e-6,
    # an optimizer state lost or misplaced moves the adapters by ~lr = 1e-2)
    again = _deepspeed_run(cfg, small_models, resume=tmp_path)
    assert again.state["iteration"] == 1
    m_straight, m_resumed = train_step(run, 1), train_step(again, 1)
    assert m_resumed["g_loss"] == pytest.approx(m_straight["g_loss"], abs=1e-6)
    named = dict(again.models.student.named_parameters())
    for n, p in s.named_parameters():
        torch.testing.assert_close(named[n], p, rtol=0, atol=1e-6 if "lora_" in n else 0)
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n
    ta, tb = run.g.optimizer_tensors(), again.g.optimizer_tensors()
    assert ta.keys() == tb.keys() and float(ta["0.step"]) == 2.0
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=1e-6)
