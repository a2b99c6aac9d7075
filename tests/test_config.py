import dataclasses
import re
import subprocess
import sys
import typing

import pytest
import yaml

from nitro_dist.config import CONFIG_DIR, Config, config_from_dict, load_config, to_dict


def test_defaults_and_every_preset_resolve():
    assert isinstance(load_config(), Config)
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path.stem)
        assert cfg.run_name


def test_overrides_change_the_built_config():
    cfg = load_config(
        "digits",
        [
            "pool.candidates=7",
            "pool.refresh_rate=0.05",
            "sampler.shift=500",
            "pool.kinds=[global_cond]",
            "teacher.scheduler_overrides.eta=0.5",
        ],
    )
    assert cfg.pool.candidates == 7
    assert cfg.pool.refresh_rate == 0.05
    assert cfg.sampler.shift == 500
    assert cfg.pool.kinds == ["global_cond"]
    assert cfg.teacher.scheduler_overrides["eta"] == 0.5
    assert cfg.teacher.scheduler_overrides["timestep_spacing"] == "trailing"  # merged, not replaced
    assert load_config("digits", ["pool.lr=2e-3"]).pool.lr == 2e-3  # YAML 1.1 reads it as a str


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("pool.candidatez=3", "pool.candidatez"),
        ("nope=1", "nope"),
        ("pool.candidates=x", "pool.candidates"),
        ("pool.candidates=0", "pool.candidates"),
        ("pool.heads_per_slot=9", "pool.heads_per_slot"),
        ("pool.refresh_rate=1.5", "pool.refresh_rate"),
        ("pool.kinds=[global_cond,foo]", "pool.kinds[1]"),
        ("pool.t_buckets=[10,1000]", "pool.t_buckets[1]"),
        ("loss.type=wgan", "loss.type"),
        ("train.device=tpu", "train.device"),
        ("refinement.enable_at=[5]", "refinement.enable_at"),
        ("model.source=diffusers", "model.teacher_path"),
        ("train.iterations=true", "train.iterations"),
        ("pool=3", "pool"),
        ("novalue", "key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ValueError, match=None) as e:
        load_config("digits", [override])
    assert needle in str(e.value)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ValueError, match="no preset named"):
        load_config("no_such_preset")
    with pytest.raises(ValueError, match="does not exist"):
        load_config("/tmp/definitely/missing.yaml")


def test_yaml_with_unknown_key_rejected(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("base: digits\npool:\n  widht: 3\n")
    with pytest.raises(ValueError, match="pool.widht"):
        load_config(str(p))


def test_dict_roundtrip_for_ray():
    cfg = load_config("tiny", ["pool.candidates=3"])
    again = config_from_dict(to_dict(cfg))
    assert again == cfg
    with pytest.raises(ValueError, match="train.bogus"):
        config_from_dict({"train": {"bogus": 1}})


def test_cli_dry_run_prints_resolved_config_and_rejects_bad_keys():
    out = subprocess.run(
        [sys.executable, "-m", "nitro_dist.train", "--dry-run", "pool.candidates=5"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert yaml.safe_load(out.stdout)["pool"]["candidates"] == 5
    bad = subprocess.run(
        [sys.executable, "-m", "nitro_dist.train", "--dry-run", "pool.bogus=5"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "pool.bogus" in bad.stderr


# validate(): a bad value in any section is reported with its dotted key first in the message
VALIDATE_CASES = {
    "": [(["task="], "task")],
    "model": [(["model.source=diffusers"], "model.teacher_path")],
    "sampler": [
        (["sampler.shift=0"], "sampler.shift"),
        (["sampler.original_inference_steps=0"], "sampler.original_inference_steps"),
    ],
    "teacher": [
        (["teacher.num_steps=0"], "teacher.num_steps"),
        (["teacher.guidance_scale=-1"], "teacher.guidance_scale"),
        (["teacher.offline_pairs=0"], "teacher.offline_pairs"),
        (["teacher.batch_size=0"], "teacher.batch_size"),
        (["teacher.mode=sometimes"], "teacher.mode"),
    ],
    "init": [
        (["init.iterations=-1"], "init.iterations"),
        (["init.lr=0"], "init.lr"),
        (["init.steps=[0]"], "init.steps"),
        (["init.steps=[]"], "init.steps"),
        (["init.iterations=5", "data.source=shards", "data.shards=x"], "init.iterations"),
        (["teacher.clean_x0=maybe"], "teacher.clean_x0"),
    ],
    "refinement": [
        (["refinement.enable_at=[0,1,2,3,4]"], "refinement.enable_at"),
        (["refinement.enable_at=[0,-1]"], "refinement.enable_at"),
        (["refinement.k_weights=[1,1]"], "refinement.k_weights"),  # 4 steps, 2 weights
        (["refinement.k_weights=[1,0,1,1]"], "refinement.k_weights"),
    ],
    "pool": [
        (["pool.kinds=[]"], "pool.kinds"),
        (["pool.kinds=[global_cond,global_cond]"], "pool.kinds"),
        (["pool.t_buckets=[]"], "pool.t_buckets"),
        (["pool.t_jitter=-1"], "pool.t_jitter"),
        (["pool.width=0"], "pool.width"),
        (["pool.depth=0"], "pool.depth"),
        (["pool.crop_frac=0"], "pool.crop_frac"),
        (["pool.bucket_mb=0"], "pool.bucket_mb"),
        (["pool.betas=[0.9]"], "pool.betas"),
        (["pool.lr=0"], "pool.lr"),
        (["pool.width_ratio=-0.5"], "pool.width_ratio"),
        (["pool.state_bits=16"], "pool.state_bits"),
        (["pool.state_bits=8", "pool.fused=true"], "pool.state_bits"),
    ],
    "loss": [
        (["loss.type=wgan"], "loss.type"),
        (["loss.g_weight=x"], "loss.g_weight"),
        (["loss.regression_weight=-1"], "loss.regression_weight"),
    ],
    "optim": [
        (["optim.lr=0"], "optim.lr"),
        (["optim.betas=[0.9]"], "optim.betas"),
        (["optim.ema_decay=1.0"], "optim.ema_decay"),
        (["optim.d_steps_per_g_step=0"], "optim.d_steps_per_g_step"),
        (["optim.warmup_iterations=-1"], "optim.warmup_iterations"),
        (["optim.ema_warmup_iterations=-1"], "optim.ema_warmup_iterations"),
        (["optim.lr_schedule=linear"], "optim.lr_schedule"),
        (["pool.refresh_by=often"], "pool.refresh_by"),
        (["pool.t_star_per=batch"], "pool.t_star_per"),
        (["optim.fused=1"], "optim.fused"),
        (["optim.state_bits=4"], "optim.state_bits"),
        (["optim.state_bits=8", "optim.fused=true"], "optim.state_bits"),
        (["optim.state_bits=8", "distributed.zero_stage=2"], "optim.state_bits"),
        (["optim.offload=gpu"], "optim.offload"),
        (["optim.offload=cpu"], "optim.offload"),  # ZeRO-0: nothing to offload from
        (["optim.offload=cpu", "distributed.zero_stage=2", "optim.state_bits=8"], "optim.offload"),
    ],
    "data": [
        (["data.source=shards", "init.iterations=0"], "data.shards"),
        (["data.num_workers=-1"], "data.num_workers"),
        (["data.shuffle_buffer=0"], "data.shuffle_buffer"),
    ],
    "train": [
        (["train.iterations=-1"], "train.iterations"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.grad_accum=3"], "train.batch_size"),  # 64 does not split into 3 micro-batches
        (["train.grad_accum=0"], "train.grad_accum"),
        (["train.log_every=-1"], "train.log_every"),
        (["train.checkpoint_every=-1"], "train.checkpoint_every"),
        (["train.grid_per_prompt=0"], "train.grid_per_prompt"),
        (["train.keep_checkpoints=0"], "train.keep_checkpoints"),
        (["train.eval_images=5"], "train.eval_images"),
        (["train.compile=true", "distributed.zero_stage=3"], "train.compile"),
        (["train.compile=true", "train.compile_backend=nope"], "train.compile_backend"),
    ],
    "student": [
        (["student.lora.rank=-1"], "student.lora.rank"),
        (["student.lora.rank=4", "student.lora.alpha=-1"], "student.lora.alpha"),
        (["student.lora.rank=4", "student.lora.target_modules=[]"], "student.lora.target_modules"),
        (["student.lora.rank=4", "distributed.zero_stage=3"], "student.lora.rank"),
    ],
    "storage": [
        (["storage.retries=-1"], "storage.retries"),
        (["storage.retry_max_s=-1"], "storage.retry_max_s"),
    ],
    "distributed": [
        (["distributed.num_workers=0"], "distributed.num_workers"),
        (["distributed.num_workers=[1, 2, 3]"], "distributed.num_workers"),
        (["distributed.num_workers=[2, 1]"], "distributed.num_workers"),
        (["distributed.num_workers=[1, 3]"], "train.batch_size"),  # 4 over 3 workers
        (["distributed.placement_strategy=FILL"], "distributed.placement_strategy"),
        (["distributed.zero_stage=4"], "distributed.zero_stage"),
        (["distributed.cpus_per_worker=0"], "distributed.cpus_per_worker"),
        (["distributed.gpus_per_worker=0"], "distributed.gpus_per_worker"),
        (["distributed.max_failures=-2"], "distributed.max_failures"),
        (["distributed.fail_rank=2"], "distributed.fail_rank"),
        (["distributed.storage_path="], "distributed.storage_path"),
    ],
    "tune": [
        (["tune.num_samples=0"], "tune.num_samples"),
        (["tune.max_concurrent=0"], "tune.max_concurrent"),
        (["tune.grace_period=0"], "tune.grace_period"),
        (["tune.reduction_factor=1"], "tune.reduction_factor"),
        (["tune.mode=best"], "tune.mode"),
    ],
    "eval": [(["eval.inception=3"], "eval.inception"), (["eval.clip=[a]"], "eval.clip")],
    "logging": [(["logging.wandb_mode=sometimes"], "logging.wandb_mode")],
}


def test_every_config_section_has_validate_cases():
    hints = typing.get_type_hints(Config)
    sections = {name for name, tp in hints.items() if dataclasses.is_dataclass(tp)}
    assert set(VALIDATE_CASES) == {"", *sections}  # "": the top-level keys


@pytest.mark.parametrize(
    ("overrides", "key"),
    [case for cases in VALIDATE_CASES.values() for case in cases],
    ids=[" ".join(o) for cases in VALIDATE_CASES.values() for o, _ in cases],
)
def test_validate_error_starts_with_the_key(overrides, key):
    with pytest.raises(ValueError) as e:
        load_config("digits", overrides)
    assert re.match(rf"{re.escape(key)}[:\[]", str(e.value)), str(e.value)
