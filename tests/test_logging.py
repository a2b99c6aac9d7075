import json

import pytest

from nitro_dist.loop import train


@pytest.mark.slow
def test_wandb_offline_run_and_metrics_file(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    final = train(
        tiny_cfg("train.iterations=2", "logging.wandb=true", "train.checkpoint_every=0"), tmp_path
    )
    assert final["iteration"] == 2
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "g_loss",
        "d_loss",
        "d_acc_real",
        "d_acc_fake",
        "active_heads",
        "t_star",
        "refreshed_heads",
        "images_per_s",
    ):
        assert key in rows[0], key
