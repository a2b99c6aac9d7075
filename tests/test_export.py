"""python -m nitro_dist.export: every format read back by the tools that use it (diffusers'
pipeline and single-file loaders, NitroFusion's bare-UNet recipe), exact weights, the same image
as the project's sampler, the delta's arithmetic, and the refusals.

The checkpoint is written the way training writes one (generator/, generator_ema/, scheduler/,
config.yaml, trainer_state.json) for a tiny SDXL whose teacher is a single-file checkpoint with a
config folder, so inference reads the teacher's text encoders and VAE from the file."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from sdxl_files import assert_same_weights, perturbed, wide_sdxl, write_configs, write_single_file

from nitro_dist import checkpoint_layout
from nitro_dist.config import dump_yaml, load_config
from nitro_dist.diffusion import NitroLCMScheduler
from nitro_dist.export import main, sidecar_path
from nitro_dist.inference import Generator
from nitro_dist.models.builders import load_diffusers_folder, load_schedule

PROMPT, SEED = "a red cube", 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    m = wide_sdxl(0)
    configs = write_configs(m, root / "configs")
    teacher = write_single_file(m, root / "teacher.safetensors")
    cfg = load_config(
        "tiny",
        [
            "model.source=diffusers",
            f"model.teacher_path={teacher}",
            f"model.config_path={configs}",
            "model.use_vae=true",
            "sampler.shift=500",
        ],
    )
    ckpt = root / "run" / "checkpoints" / "iter_000003"
    gen, ema = perturbed(m.teacher, 1), perturbed(m.teacher, 2)
    gen.save_pretrained(ckpt / "generator")
    ema.save_pretrained(ckpt / "generator_ema")
    NitroLCMScheduler.from_schedule(load_schedule(configs), cfg.sampler.shift).save_pretrained(
        ckpt / "scheduler"
    )
    (ckpt / "config.yaml").write_text(dump_yaml(cfg))
    (ckpt / "trainer_state.json").write_text(json.dumps({"iteration": 3, "world_size": 1}))
    written = [p.name for p in ckpt.iterdir()]
    checkpoint_layout.write_part(ckpt, 0, 1, written, {})  # what a training rank writes last
    return SimpleNamespace(
        m=m,
        configs=configs,
        teacher=teacher,
        cfg=cfg,
        dir=root / "run",
        ckpt=ckpt,
        gen=gen,
        ema=ema,
    )


def export(run, fmt, out, *extra):
    return main(["--checkpoint", str(run.dir), "--format", fmt, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def pipeline_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "nitro-sdxl"
    assert export(run, "diffusers", out) == 0
    return out


@pytest.fixture(scope="module")
def ours(run):
    """The project's sampler on the checkpoint: 1 step, SEED."""
    return Generator.from_checkpoint(run.dir)([PROMPT], [SEED], 1)


def pipeline_image(pipe, steps=1):
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(SEED * 8),  # Generator's stream for x_T
        output_type="pt",
    ).images
    return out * 2 - 1  # the pipeline's [0, 1] pixels -> Generator's [-1, 1]


def test_diffusers_pipeline_folder_gives_the_samplers_image(run, pipeline_dir, ours):
    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    assert isinstance(pipe.scheduler, NitroLCMScheduler) and pipe.scheduler.config.shift == 500
    assert_same_weights(pipe.unet, run.ema)  # the EMA weights
    assert_same_weights(pipe.vae, run.m.vae)
    assert_same_weights(pipe.text_encoder_2, run.m.text.encoders[1])
    assert not list(pipeline_dir.rglob("*.bin"))
    assert ours.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pipeline_image(pipe), ours, rtol=0, atol=1e-5)


class ShiftedLCM(LCMScheduler):
    """NitroFusion's TimestepShiftLCMScheduler as their model card describes it: LCM whose UNet is
    told floor(t * shifted_timestep / T) while stepping between the unshifted timesteps."""

    def __init__(self, *args, shifted_timestep=250, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_to_config(shifted_timestep=shifted_timestep)

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.true_ts = self.timesteps.clone()
        self.told_ts = (
            self.true_ts * self.config.shifted_timestep // self.config.num_train_timesteps
        )
        self.timesteps = self.told_ts

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.step_index is None:
            self._init_step_index(timestep)
        self.timesteps = self.true_ts
        try:
            return super().step(model_output, timestep, sample, generator, return_dict)
        finally:
            self.timesteps = self.told_ts


@pytest.mark.slow  # pipelines at 1 and 4 steps / S3 server, > 10 s on 2 cores
def test_unet_safetensors_as_nitrofusion_publishes(run, pipeline_dir, tmp_path, capsys):
    out = tmp_path / "nitro_unet.safetensors"
    assert export(run, "unet-safetensors", out) == 0
    sd = load_file(str(out))
    assert sd.keys() == run.ema.state_dict().keys()
    assert all(torch.equal(v, run.ema.state_dict()[k]) for k, v in sd.items())
    # NitroFusion's recipe: a UNet from the base model's config, then the state dict
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(run.configs / "unet"))
    unet.load_state_dict(sd)
    settings = json.loads(sidecar_path(out).read_text())
    assert settings["shifted_timestep"] == run.cfg.sampler.shift == 500
    assert settings["original_inference_steps"] == 4
    assert "shifted_timestep=500" in capsys.readouterr().out
    # their scheduler with these settings samples what NitroLCMScheduler samples (LCM's boundary
    # scalings c_skip/c_out differ from (0, 1) by < 1e-7 at the shifted timesteps)
    theirs = ShiftedLCM.from_config(
        {**settings["noise_schedule"], "original_inference_steps": 4},
        shifted_timestep=settings["shifted_timestep"],
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    pipe.unet = unet
    for steps in (1, 4):
        ref = pipeline_image(pipe, steps)
        pipe.scheduler, saved = theirs, pipe.scheduler
        got = pipeline_image(pipe, steps)
        pipe.scheduler = saved
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert export(run, "unet-safetensors", out, "--no-ema", "--overwrite", "--dtype", "fp16") == 0
    raw = load_file(str(out))
    assert all(torch.equal(v, run.gen.state_dict()[k].half()) for k, v in raw.items())


def test_single_file_unet_round_trip_is_exact(run, tmp_path):
    out = tmp_path / "nitro.safetensors"
    assert export(run, "single-file", out) == 0
    assert all(k.startswith("model.diffusion_model.") for k in load_file(str(out)))
    back = UNet2DConditionModel.from_single_file(
        str(out), config=str(run.configs), subfolder="unet", local_files_only=True
    )
    assert_same_weights(back, run.ema)
    # and as a student in our own loader
    models = load_diffusers_folder(run.teacher, str(out), config_path=str(run.configs))
    assert_same_weights(models.student, run.ema)


@pytest.mark.slow  # pipelines at 1 and 4 steps / S3 server, > 10 s on 2 cores
def test_single_file_full_loads_in_diffusers_and_gives_the_same_image(
    run, pipeline_dir, ours, tmp_path
):
    out = tmp_path / "nitro-full.safetensors"
    assert export(run, "single-file", out, "--full") == 0
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(out), config=str(pipeline_dir), local_files_only=True
    )
    assert_same_weights(pipe.unet, run.ema)
    assert_same_weights(pipe.vae, run.m.vae)
    assert_same_weights(pipe.text_encoder, run.m.text.encoders[0])
    assert_same_weights(pipe.text_encoder_2, run.m.text.encoders[1])
    assert isinstance(pipe.scheduler, NitroLCMScheduler)
    torch.testing.assert_close(pipeline_image(pipe), ours, rtol=0, atol=1e-5)


def test_delta_is_custom_plus_student_minus_base(run, tmp_path):
    base = tmp_path / "base"
    run.m.teacher.save_pretrained(base)  # the UNet the distillation started from
    custom = perturbed(run.m.teacher, 5, scale=0.1)  # a user's fine-tune of it
    custom_file = write_single_file(run.m, tmp_path / "custom.safetensors", custom)
    out = tmp_path / "delta"
    args = ["--base", str(base), "--custom", str(custom_file)]
    assert export(run, "delta", out, *args) == 0
    c, s, b = custom.state_dict(), run.ema.state_dict(), run.m.teacher.state_dict()
    got = UNet2DConditionModel.from_pretrained(out).state_dict()
    assert got.keys() == s.keys()
    for k in s:
        assert torch.equal(got[k], c[k] + (s[k] - b[k])), k
    # bare state dicts in, the original layout out
    save_file(custom.state_dict(), str(tmp_path / "custom_unet.safetensors"))
    out_file = tmp_path / "delta.safetensors"
    args = ["--base", str(base), "--custom", str(tmp_path / "custom_unet.safetensors")]
    assert export(run, "delta", out_file, *args, "--delta-as", "single-file") == 0
    back = UNet2DConditionModel.from_single_file(
        str(out_file), config=str(run.configs), subfolder="unet", local_files_only=True
    ).state_dict()
    for k in s:
        assert torch.equal(back[k], c[k] + (s[k] - b[k])), k


def test_delta_refuses_a_custom_model_of_another_architecture(run, tmp_path, capsys):
    run.m.teacher.save_pretrained(tmp_path / "base")
    bad = {k: v for k, v in run.m.teacher.state_dict().items() if "mid_block" not in k}
    save_file(bad, str(tmp_path / "custom.safetensors"))
    args = ["--base", str(tmp_path / "base"), "--custom", str(tmp_path / "custom.safetensors")]
    assert export(run, "delta", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert "--custom" in err and "custom.safetensors" in err and "missing keys (mid_block" in err
    assert not (tmp_path / "out").exists()


def test_refusals_name_the_problem(run, tmp_path, capsys):
    out = tmp_path / "unet.safetensors"
    out.write_text("keep me")
    assert export(run, "unet-safetensors", out) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert export(run, "unet-safetensors", out, "--overwrite") == 0
    assert load_file(str(out)).keys() == run.ema.state_dict().keys()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # a missing checkpoint
    rc = main(["--checkpoint", str(tmp_path / "nope"), "--format", "diffusers", "--out", "x"])
    assert rc == 2 and "no checkpoint found at" in capsys.readouterr().err
    # argument errors (argparse exits with 2 and names the flag)
    for argv, message in [
        (["--format", "onnx"], "argument --format: invalid choice: 'onnx'"),
        (["--format", "delta"], "--format delta needs --base and --custom"),
        (["--format", "single-file", "--out", "x.ckpt"], "name it *.safetensors"),
        (["--format", "diffusers", "--full"], "--full is only read with --format single-file"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(["--checkpoint", str(run.dir), "--out", "x", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(f in text for f in ("diffusers", "unet-safetensors", "single-file", "delta"))


@pytest.mark.slow  # pipelines at 1 and 4 steps / S3 server, > 10 s on 2 cores
def test_export_from_object_storage(run, s3_endpoint, tmp_path, monkeypatch):
    import s3fs

    from nitro_dist import remote

    monkeypatch.setattr(remote, "CACHE", tmp_path / "cache")
    s3fs.S3FileSystem().put(str(run.ckpt), "nitro-test/run/iter_000003", recursive=True)
    out = tmp_path / "unet.safetensors"
    rc = main(
        ["--checkpoint", "s3://nitro-test/run", "--format", "unet-safetensors", "--out", str(out)]
    )
    assert rc == 0
    sd = load_file(str(out))
    assert all(torch.equal(v, run.ema.state_dict()[k]) for k, v in sd.items())
