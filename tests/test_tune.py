"""Ray Tune sweeps: every swept value reaches the trial's config and its workers (that each one
changes what is built is tests/test_config_live.py::test_every_swept_value_changes_what_is_built),
bad spaces are named, and a small sweep runs, resumes and writes its table, plot and best
config."""

import csv
import json

import pytest

from nitro_dist.config import CONFIG_DIR, get_key, load_config
from nitro_dist.tune import TRIAL_RESOURCES, candidate_values, check_space, main, trial_config


def presets_with_a_space():
    out = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(str(path))
        if cfg.tune.search_space:
            out.append(cfg)
    return out


@pytest.mark.parametrize("cfg", presets_with_a_space(), ids=lambda c: c.run_name)
def test_every_swept_value_reaches_the_trial_config(cfg):
    check_space(cfg)
    for key, spec in cfg.tune.search_space.items():
        domain, values = candidate_values(key, spec)
        probes = values if domain in ("grid", "choice") else values[:1]
        for v in probes:
            built = trial_config(cfg, {key: v})
            assert get_key(built, key) == v, key
            # and the training workers see it: the dict they receive round-trips it
            assert get_key(load_config(None, [f"{key}={json.dumps(v)}"]), key) == v


def test_bad_search_spaces_name_the_key():
    cfg = load_config("digits")
    with pytest.raises(ValueError, match="unknown config key pool.candidate"):
        check_space(load_config("digits", ['tune.search_space={"pool.candidate": {"grid": [1]}}']))
    with pytest.raises(ValueError, match="pool.refresh_rate: value 2"):
        check_space(
            load_config("digits", ['tune.search_space={"pool.refresh_rate": {"grid": [2]}}'])
        )
    with pytest.raises(ValueError, match="expected one of"):
        check_space(load_config("digits", ['tune.search_space={"pool.width": [8, 16]}']))
    assert check_space(cfg) is None


def test_a_trial_reserves_no_cpu_for_itself():
    """The trial function only waits on its TorchTrainer: every CPU stays for the workers (the
    digits preset's 2 x 1 CPU on a 2-core machine could not start beside 0.01 CPU)."""
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    need = resource_dict_to_pg_factory(TRIAL_RESOURCES).required_resources
    assert need.get("CPU", 0) == 0 and need.get("GPU", 0) == 0 and need


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.drill
def test_small_sweep_runs_resumes_and_writes_results(cluster, tmp_path):
    args = [
        "--config",
        "digits",
        "train.iterations=4",
        "init.iterations=0",  # the sweep's path, without the one-step stage's minute
        "train.eval_every=2",
        "train.eval_images=50",
        "train.sample_every=0",
        "train.grid_per_prompt=1",
        "train.checkpoint_every=2",
        "train.batch_size=16",
        "teacher.offline_pairs=64",
        "logging.wandb=false",
        "logging.progress=false",
        "distributed.cpus_per_worker=1",
        "distributed.num_workers=1",
        "tune.grace_period=2",
        f"tune.storage_path={tmp_path}",
        'tune.search_space={"pool.candidates": {"grid": [1, 2]}}',
    ]
    assert main(args) == 0
    sweep = tmp_path / "digits-sweep"
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert sorted(int(r["pool.candidates"]) for r in rows) == [1, 2]
    assert all(float(r["fid_digits_1step"]) > 0 for r in rows)
    # the best value over evaluations, and the last evaluation's (no better than the best)
    assert all(float(r["last_fid_digits_1step"]) >= float(r["fid_digits_1step"]) for r in rows)
    assert (sweep / "metric.png").stat().st_size > 1000
    best = load_config(str(sweep / "best.yaml"))  # the train CLI accepts it
    assert best.pool.candidates == int(rows[0]["pool.candidates"])
    # rerunning the same command restores the finished sweep instead of training again
    assert main(args) == 0
    assert len(list(csv.DictReader((sweep / "results.csv").open()))) == 2
