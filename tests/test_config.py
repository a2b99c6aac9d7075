import subprocess
import sys

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
