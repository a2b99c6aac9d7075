"""Performance options (optim.fused, pool.fused, train.channels_last), the phase timer and the
FLOP accounting behind MFU. On the CPU the options must leave the numbers as they were (fused
AdamW and channels-last convolutions compute the same maths in another order)."""

import time

import pytest
import torch
from closeness import assert_adamw_close
from torch.nn.attention import SDPBackend, sdpa_kernel

from nitro_dist import inference, perf
from nitro_dist.build import build_run
from nitro_dist.config import load_config
from nitro_dist.digits.data import PROMPTS
from nitro_dist.step import train_step
from nitro_dist.timing import PhaseTimer

PERF_KEYS = ("optim.fused", "pool.fused", "train.channels_last")


@pytest.mark.parametrize("key", PERF_KEYS)
def test_perf_keys_are_typed_and_off_by_default(key):
    section, name = key.split(".")
    assert getattr(getattr(load_config("tiny"), section), name) is False
    assert getattr(getattr(load_config("tiny", [f"{key}=true"]), section), name) is True
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config("tiny", [f"{key}=fast"])


def test_defaults_leave_torch_choosing_the_adamw_implementation(tiny_cfg, reference):
    run, _ = reference
    assert run.g.optimizer.param_groups[0]["fused"] is None
    assert run.pool.optimizer.param_groups[0]["fused"] is None
    run = build_run(tiny_cfg("optim.fused=true", "pool.fused=true"), progress=False)
    assert run.g.optimizer.param_groups[0]["fused"] is True
    assert run.pool.optimizer.param_groups[0]["fused"] is True


def _train(cfg, iterations: int = 2):
    run = build_run(cfg, progress=False)
    metrics = [train_step(run, it) for it in range(iterations)]
    return run, metrics


@pytest.fixture(scope="module")
def reference():
    """The default tiny config after 2 iterations, and its metrics (read-only for users)."""
    torch.manual_seed(0)
    return _train(load_config("tiny"))


def _assert_same_state(a, b, atol_g: float, atol_heads: float) -> None:
    """After _train's 2 iterations."""
    for p, q in zip(a.models.student.parameters(), b.models.student.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol_g)
    for h in a.pool.owned:
        for p, q in zip(a.pool.head(h).parameters(), b.pool.head(h).parameters(), strict=True):
            assert_adamw_close(p, q, atol_heads, a.cfg.pool.lr, steps=2, msg=f"head {h}")


def test_fused_adamw_gives_the_same_training_on_cpu(tiny_cfg, reference):
    ref, m_ref = reference
    fused, m_fused = _train(tiny_cfg("optim.fused=true", "pool.fused=true"))
    _assert_same_state(ref, fused, 1e-6, 1e-6)
    assert m_fused[-1]["g_loss"] == pytest.approx(m_ref[-1]["g_loss"], abs=1e-5)


def test_channels_last_gives_the_same_training_on_cpu(tiny_cfg, reference):
    ref, m_ref = reference
    cl, m_cl = _train(tiny_cfg("train.channels_last=true"))
    assert cl.models.teacher.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # AdamW's first steps normalise tiny gradient differences (summation order), as in
    # test_step's accumulation test
    _assert_same_state(ref, cl, 2e-5, 1e-4)
    assert m_cl[-1]["d_loss"] == pytest.approx(m_ref[-1]["d_loss"], abs=1e-4)


def test_checkpoint_does_not_switch_the_adamw_implementation(tiny_cfg, tmp_path, reference):
    """A checkpoint saved with foreach AdamW resumes fused (and back): how AdamW runs is the
    config's choice; the state (moments, step count) carries over."""
    plain, _ = reference  # 2 iterations
    plain.g.save(tmp_path / "optimizer", write=True)
    fused = build_run(tiny_cfg("optim.fused=true"), progress=False)
    fused.g.load(tmp_path / "optimizer")
    assert fused.g.optimizer.param_groups[0]["fused"] is True
    state = fused.g.optimizer.state[next(fused.models.student.parameters())]
    assert float(state["step"]) == 2.0
    train_step(fused, 2)  # the fused kernel accepts the loaded state


def test_phase_timer_charges_nested_time_once():
    timer = PhaseTimer()
    with timer("outer"):
        time.sleep(0.02)
        with timer("inner"):
            time.sleep(0.03)
    assert timer.seconds["inner"] == pytest.approx(0.03, abs=0.02)
    assert timer.seconds["outer"] == pytest.approx(0.02, abs=0.02)
    assert timer.total() == pytest.approx(0.05, abs=0.02)


def test_timer_names_the_phases_and_changes_nothing(tiny_cfg):
    cfg = tiny_cfg("train.grad_accum=2")
    a, b = build_run(cfg, progress=False), build_run(cfg, progress=False)
    timer = PhaseTimer()
    assert train_step(a, 0) == train_step(b, 0, timer)
    for phase in ("data", "teacher", "g_backsim", "g_forward", "backbone", "heads"):
        assert timer.seconds[phase] > 0, phase
    for phase in ("g_backward", "g_optimizer", "d_backward", "heads_optimizer", "refresh"):
        assert phase in timer.seconds


SETTINGS = (  # every term of the count: teacher (online, CFG), checkpointing, accumulation, D steps
    "teacher.guidance_scale=3.0", "model.gradient_checkpointing=true", "train.grad_accum=2",
    "optim.d_steps_per_g_step=2",
    # lighter than tiny's own: a 2-step teacher, 2 samples, 6 heads (the count's terms all stay)
    "teacher.timesteps=[999,499]", "train.batch_size=2", "pool.levels=[0]",
)  # fmt: skip


@pytest.mark.slow
def test_meta_flop_count_equals_real_iterations(tiny_cfg):
    """MFU's FLOPs come from the iteration's code run on meta tensors (no device memory). They must
    equal torch's count of real iterations, on several draws (the backward simulation's k
    varies): hardware FLOPs with checkpointing as configured, model FLOPs with it off. (Real runs
    use SDPA's math kernel here: torch's counter has no formula for the CPU flash kernel.)"""
    cfg = tiny_cfg(*SETTINGS)
    run = build_run(cfg, progress=False)
    run.conds([*PROMPTS, ""])  # conditioning is cached per prompt: text encoding is a one-off
    fl = perf.run_iteration_flops(run)
    b = cfg.train.batch_size
    text = 0  # an online teacher encodes its prompts (and the empty one for CFG) every iteration
    if cfg.teacher.mode == "online":  # (it is)
        with sdpa_kernel(SDPBackend.MATH):
            text, _ = perf.count_flops(lambda: run.models.text.encode(list(PROMPTS[:b])))
        text *= 2 if cfg.teacher.guidance_scale > 1 else 1
    ks = set()
    for it in range(2):  # draws 0 and 1 have different k (1.5 and 2.75 with the tiny config)
        with sdpa_kernel(SDPBackend.MATH):
            counted, m = perf.count_flops(lambda it=it: train_step(run, it))
        assert counted - text == pytest.approx(fl.hardware(b, perf.n_backsim(m, b)), rel=1e-9)
        ks.add(m["mean_k"])
    assert len(ks) > 1, "every draw had the same k: the backward-simulation term is unchecked"
    plain = build_run(tiny_cfg(*SETTINGS, "model.gradient_checkpointing=false"), progress=False)
    plain.conds([*PROMPTS, ""])
    with sdpa_kernel(SDPBackend.MATH):
        counted, m = perf.count_flops(lambda: train_step(plain, 0))
    assert counted - text == pytest.approx(fl.model(b, perf.n_backsim(m, b)), rel=1e-9)
    # checkpointing recomputes at most one more forward
    assert fl.model_per_sample < fl.hardware_per_sample < 1.5 * fl.model_per_sample


def test_peak_flops_by_device_name():
    assert perf.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert perf.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert perf.peak_flops("CPU") is None


def test_low_precision_unet_matches_autocast(tiny_models):
    """The generation path without autocast (bf16 module, fp32 sampler maths) gives what the
    autocast path gives, to bf16 precision."""
    import copy

    unet = copy.deepcopy(tiny_models.teacher).to(torch.bfloat16)
    cond = tiny_models.text.encode(["a red cube"], (128, 128))
    x = torch.randn(1, *tiny_models.sample_shape)
    t = torch.tensor([249])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = unet(x, t, **cond.unet_kwargs()).sample.float()
    out = inference.LowPrecisionUNet(unet)(x, t, **cond.unet_kwargs()).sample
    assert out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) < 3e-2


def test_optimizer_checkpoint_ignores_implementation_keys(tiny_cfg, tmp_path):
    run = build_run(tiny_cfg(), progress=False)
    run.g.save(tmp_path, write=True)
    run.g.optimizer.param_groups[0]["fused"] = True
    run.g.load(tmp_path)
    assert run.g.optimizer.param_groups[0]["fused"] is True


def test_attention_runs_through_sdpa(tiny_models):
    """UNet, VAE and text encoders all use torch's scaled_dot_product_attention (flash /
    memory-efficient kernels on GPU): nothing to switch on."""
    from diffusers import AutoencoderKL

    from nitro_dist.models import tiny

    vae = AutoencoderKL(**tiny.TINY_VAE)
    for module in (tiny_models.teacher, vae):
        assert {type(p).__name__ for p in module.attn_processors.values()} == {"AttnProcessor2_0"}
    for enc in tiny_models.text.encoders:
        assert enc.config._attn_implementation == "sdpa"


@pytest.mark.slow
@pytest.mark.drill
def test_bf16_and_compile_under_deepspeed_keep_fp32_weights_and_train(one_rank_group):
    """precision=bf16 under DeepSpeed: autocast inside the engine (its torch_autocast section)
    over fp32 master weights. DeepSpeed's own bf16 section had cast G to bf16 while the
    inputs stayed fp32, which failed on the first H100 run ("mat1 and mat2 must have the same
    dtype"); autocast runs on the CPU too, so this checks that path here. The same run with
    train.compile (dynamo graph capture; the backend "eager" skips code generation, which on
    this CPU takes minutes) traces graphs and trains alike. A one-rank gloo group in this
    process; the 2-level tiny SDXL UNet (the property does not depend on the depth; dynamo
    traces 3 graphs: grad and no-grad calls, then a dynamic batch)."""
    from nitro_dist.distributed.parallel import parallelize
    from nitro_dist.models import tiny
    from nitro_dist.models.builders import build_sdxl_from_configs

    base = ["train.precision=bf16", "distributed.zero_stage=2", "logging.wandb=false",
            "train.batch_size=2", "teacher.timesteps=[999,499]", "pool.levels=[0]"]  # fmt: skip
    losses = {}
    try:
        for name, extra in (
            ("eager", []),
            ("compiled", ["train.compile=true", "train.compile_backend=eager"]),
        ):
            models = build_sdxl_from_configs(
                tiny.TINY_SDXL_UNET_2LEVEL, tiny.TINY_SDXL_TEXT_ENCODERS, None
            )
            run = build_run(load_config("tiny", base + extra), progress=False, models=models)
            parallelize(run, 0, 1)
            before = [p.detach().clone() for p in run.g.student.parameters()]
            torch._dynamo.utils.counters.clear()
            losses[name] = [train_step(run, i)["g_loss"] for i in range(2)]
            after = list(run.g.student.parameters())
            assert type(run.g).__name__ == "DeepSpeedUpdate", name
            assert after[0].dtype == torch.float32, name
            assert all(torch.isfinite(torch.tensor(losses[name]))), name
            assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)), name
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
            assert graphs == (name == "compiled"), name
    finally:
        torch._dynamo.reset()  # this process goes on with other tests
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=2e-2, abs=2e-3), losses


def test_compile_keeps_state_dict_keys_and_refuses_zero3(tiny_cfg):
    run = build_run(tiny_cfg("train.compile=true", "train.compile_backend=eager"), progress=False)
    plain = build_run(tiny_cfg(), progress=False)
    assert run.models.student.state_dict().keys() == plain.models.student.state_dict().keys()
    with pytest.raises(ValueError, match="train.compile"):
        tiny_cfg("train.compile=true", "distributed.zero_stage=3")
    with pytest.raises(ValueError, match="train.compile_backend"):
        tiny_cfg("train.compile=true", "train.compile_backend=nope")
