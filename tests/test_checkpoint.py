import json
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from nitro_dist import checkpoint_layout as checkpoint
from nitro_dist.config import load_config
from nitro_dist.loop import train

pytestmark = pytest.mark.slow  # tiny training runs and a CLI process


def _weights(folder):
    return load_file(str(folder / "generator" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny config trained for 4 iterations in one go: a run folder, read-only for users."""
    out = tmp_path_factory.mktemp("straight")
    train(load_config("tiny", ["train.iterations=4", "train.checkpoint_every=0"]), out)
    return out


def test_run_dir_layout_and_exact_resume(tiny_cfg, tmp_path, straight):
    split = tmp_path / "split"
    train(tiny_cfg("train.iterations=2", "train.checkpoint_every=0"), split)
    first = checkpoint.latest(split / "checkpoints")
    assert first.name == "iter_000002"
    train(tiny_cfg("train.iterations=4", "train.checkpoint_every=0"), split)  # resumes from latest
    a = checkpoint.latest(straight / "checkpoints")
    b = checkpoint.latest(split / "checkpoints")
    assert a.name == b.name == "iter_000004"
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    for head in sorted((a / "pool").glob("head_*.safetensors")):
        ha, hb = load_file(str(head)), load_file(str(b / "pool" / head.name))
        for k in ha:
            torch.testing.assert_close(ha[k], hb[k], rtol=0, atol=1e-6)
    state = json.loads((b / "trainer_state.json").read_text())
    assert state["iteration"] == 4 and state["images_seen"] == 16
    # run directory contents
    assert (straight / "config.yaml").exists() and (straight / "metrics.jsonl").exists()
    assert len((straight / "metrics.jsonl").read_text().splitlines()) >= 4
    for n in (1, 2, 4):
        Image.open(straight / "samples" / f"final_{n}step.png").verify()
    # the layout of DESIGN.md, safetensors only
    for part in (
        "generator",
        "scheduler",
        "optimizer",
        "pool",
        "trainer_state.json",
        "config.yaml",
    ):
        assert (a / part).exists(), part
    suffixes = {p.suffix for p in a.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".yaml"}, suffixes
    unet = UNet2DConditionModel.from_pretrained(a / "generator")
    assert unet.config.addition_embed_type == "text_time"


def test_keep_checkpoints_prunes_old_ones(tiny_cfg, tmp_path):
    train(
        tiny_cfg("train.iterations=3", "train.checkpoint_every=1", "train.keep_checkpoints=2"),
        tmp_path,
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*"))
    assert names == ["iter_000002", "iter_000003"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_sample_cli_same_seed_same_pixels(tmp_path, straight, capsys):
    from nitro_dist.sample import main

    run = straight
    outs = []
    for name in ("a", "b"):
        args = [
            "--checkpoint",
            str(run),
            "--prompt",
            "a red cube",
            "--steps",
            "2",
            "--num-images",
            "2",
            "--seed",
            "5",
            "--out",
            str(tmp_path / name),
        ]
        if name == "a":  # the command as users run it
            cmd = [sys.executable, "-m", "nitro_dist.sample", *args]
            subprocess.run(cmd, check=True, capture_output=True)
        else:  # and again in this process: another process, the same pixels
            assert main(args) == 0
        outs.append(sorted((tmp_path / name).glob("*.png")))
    assert [p.name for p in outs[0]] == ["seed000005_2step.png", "seed000006_2step.png"]
    for p, q in zip(*outs, strict=True):
        assert Image.open(p).tobytes() == Image.open(q).tobytes()
    assert Image.open(outs[0][0]).tobytes() != Image.open(outs[0][1]).tobytes()
    # the exit code and message of a missing checkpoint (in this process: no second start-up)
    bad = main(
        ["--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "c")]
    )
    assert bad == 2 and "no checkpoint found" in capsys.readouterr().err
