"""benchmarks/ablations.py's bookkeeping without training: a run's evaluations read back from its
metrics.jsonl, runs accumulating over sittings (a finished run is not run again), and the
trajectory of a study with in-loop evaluations (a table per evaluation point, the plot)."""

import json

import benchmark_module


def _ablations():
    return benchmark_module.load("ablations")


def _metrics(fid1: float) -> dict:
    out = {}
    for step, fid in zip((1, 2, 4), (fid1, fid1 - 4, fid1 - 3), strict=True):
        out[f"fid_digits_{step}step"] = fid
        out[f"alignment_{step}step"] = 0.99
    return out


def test_read_evaluations_keeps_the_evaluation_lines_in_order(tmp_path):
    ablations = _ablations()
    lines = [
        {"iteration": 0, "images_seen": 0, "init_loss_start": 0.2},
        {"iteration": 25, "images_seen": 1600, "g_loss": 0.03, "d_loss": 1.99},
        {"iteration": 450, "images_seen": 28800, **_metrics(10.5)},
        {"iteration": 475, "images_seen": 30400, "g_loss": 0.05},
        {"iteration": 900, "images_seen": 57600, "skipped_steps": 0, **_metrics(10.1)},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    evaluations = ablations.read_evaluations(path)
    assert [it for it, _ in evaluations] == [450, 900]
    assert evaluations[1][1]["fid_digits_1step"] == 10.1


def test_a_study_accumulates_and_records_its_trajectory(tmp_path, monkeypatch):
    ablations = _ablations()
    ran: list[tuple[str, int, int]] = []
    fid = {"full": 10.0, "no_refresh": 10.6}

    def fake_run(variant, seed, iterations, eval_images, extra, eval_every=0):
        ran.append((variant, seed, eval_every))
        row = {"variant": variant, "seed": seed, "iterations": iterations}
        row.update({"eval_images": eval_images, "overrides": " ".join(extra), "seconds": 1.0})
        points = []
        for at in range(eval_every or iterations, iterations + 1, eval_every or iterations):
            # no_refresh drifts up over training (more on some seeds), full stays
            drift = at / 900 * (1 + seed / 10) + seed**2 / 50 if variant == "no_refresh" else 0
            m = _metrics(fid[variant] + drift + seed / 10)
            points.append({**{k: row[k] for k in ablations.KEY}, "at_iteration": at, **m})
        row.update({k: points[-1][k] for k in ablations.METRICS})
        return row, points

    monkeypatch.setattr(ablations, "run_one", fake_run)
    args = ["--tag", "t", "--iterations", "900", "--eval-every", "450", "--out", str(tmp_path)]
    args += ["--variants", "full", "no_refresh"]
    ablations.main([*args, "--seeds", "0", "1"])
    assert ran == [
        ("full", 0, 450),
        ("no_refresh", 0, 450),
        ("full", 1, 450),
        ("no_refresh", 1, 450),
    ]
    ablations.main([*args, "--seeds", "0", "1", "2"])  # a later sitting: only seed 2 runs
    assert ran[4:] == [("full", 2, 450), ("no_refresh", 2, 450)]

    runs = ablations.read_rows(tmp_path / "ablations_t_runs.csv")
    assert [(r["variant"], r["seed"]) for r in runs] == [
        (v, s) for s in (0, 1, 2) for v in ("full", "no_refresh")
    ]
    points = ablations.read_rows(tmp_path / "ablations_t_trajectory.csv")
    assert sorted({r["at_iteration"] for r in points}) == [450, 900]
    assert len(points) == 12
    md = (tmp_path / "ablations_t.md").read_text()
    assert "## At iteration 450" in md and "## At iteration 900" in md
    at_900 = md.split("## At iteration 900")[1]
    # mean of 10.6 + (1 + seed / 10) + seed / 10 + seed² / 50
    assert "| no_refresh | 0,1,2 | 11.83 +- " in at_900.split("## The gap")[0]
    # the gap to full: 0.6 + at / 900 * (1 + seed / 10) + seed² / 50; it grows by 0.5-0.6
    gap = md.split("## The gap to full over training")[1]
    from scipy.stats import ttest_rel

    p = ttest_rel([1.6, 1.72, 1.88], [1.1, 1.17, 1.28]).pvalue
    assert f"| no_refresh | 1 | +1.18 +- 0.09 | +1.73 +- 0.14 | +0.55 ({p:.3f}, n=3) |" in gap
    assert (tmp_path / "ablations_t_trajectory.png").stat().st_size > 0
    assert (tmp_path / "ablations_t.png").stat().st_size > 0


def test_the_check_against_the_default_study_names_each_point_equal_or_not():
    ablations = _ablations()
    key = {"eval_images": 2000, "overrides": ""}
    reference = [
        {"variant": "full", "seed": 0, "iterations": 450, **key, **_metrics(10.0)},
        {"variant": "full", "seed": 1, "iterations": 450, **key, **_metrics(10.2)},
    ]
    points = [
        {"variant": "full", "seed": s, "iterations": 1350, "at_iteration": at, **key, **m}
        for s, at, m in [
            (0, 450, _metrics(10.0)),  # the same run, on the same machine
            (0, 900, _metrics(9.0)),  # no reference at 900
            (1, 450, {**_metrics(10.2), "fid_digits_2step": 6.45}),  # another machine's run
            (2, 450, _metrics(10.0)),  # no reference for seed 2
        ]
    ]
    text = ablations.consistency_table(points, reference)
    rows = [line for line in text.splitlines() if line.startswith("| full")]
    assert rows == [
        "| full | 0 | 450 | 10.0000 / 6.0000 / 7.0000 | 10.0000 / 6.0000 / 7.0000 | equal |",
        "| full | 1 | 450 | 10.2000 / 6.2000 / 7.2000 | 10.2000 / 6.4500 / 7.2000 "
        "| differs by up to 0.2500 |",
    ]
    assert ablations.consistency_table(points[1:2], reference) == ""
