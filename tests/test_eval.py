"""The eval CLI on a digits checkpoint: 1- and 4-step FID-digits/alignment table, grids, CLIP
score with a local (tiny, random) CLIP model, and clear errors for what is missing."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from nitro_dist.digits.data import PROMPTS
from nitro_dist.eval import main
from nitro_dist.models.tokenizer import clip_tokenizer


@pytest.fixture(scope="module")
def run_dir(short_digits_run):
    return short_digits_run


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)  # the same random CLIP whichever tests ran before
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer()).save_pretrained(path)
    return path


@pytest.mark.slow
def test_digits_table_grids_and_clip_score(run_dir, tiny_clip, tmp_path):
    out = tmp_path / "eval"
    code = main(
        [
            "--checkpoint",
            str(run_dir),
            "--steps",
            "1",
            "4",
            "--num-images",
            "60",
            "--clip",
            str(tiny_clip),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = list(csv.DictReader((out / "eval.csv").open()))
    assert [r["steps"] for r in rows] == ["1", "4"]
    for r in rows:
        assert float(r["fid_digits"]) > 0 and 0 <= float(r["alignment"]) <= 1
    assert "| steps |" in (out / "eval.md").read_text()
    assert (out / "grid_1step.png").exists() and (out / "grid_4step.png").exists()
    # the CLIP score by hand, from the images of the grids (the 60 scored images, 8 per row)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(60)]
    for r in rows:
        images = grid_images(out / f"grid_{r['steps']}step.png", 60, side=8, per_row=8)
        cos = clip_cosines(tiny_clip, images, prompts)
        expected = float((100 * cos).clamp(min=0).mean())
        assert expected > 0
        assert float(r["clip_score"]) == pytest.approx(expected, rel=1e-4, abs=1e-4)
        # image i is scored against prompt i: another pairing gives another score
        shifted = clip_cosines(tiny_clip, images, prompts[1:] + prompts[:1])
        assert abs(float((100 * shifted).clamp(min=0).mean()) - expected) > 1e-3


def grid_images(path, n: int, side: int, per_row: int, pad: int = 1) -> np.ndarray:
    """The ``n`` uint8 images (N x side x side) of a grid saved by images.save_grid, which
    scales the grid up (nearest) to 64 pixels per image."""
    grid = np.asarray(Image.open(path))
    scale = 64 // side
    canvas = grid[::scale, ::scale]
    out = []
    for i in range(n):
        r, c = divmod(i, per_row)
        y, x = pad + r * (side + pad), pad + c * (side + pad)
        out.append(canvas[y : y + side, x : x + side])
    return np.stack(out)


@torch.no_grad()
def clip_cosines(model_path, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
    """Cosine of CLIP's projected image and text embeddings, per (grey image, prompt) pair."""
    model = CLIPModel.from_pretrained(model_path).eval()
    processor = CLIPProcessor.from_pretrained(model_path)
    rgb = [np.repeat(a[..., None], 3, axis=-1) for a in images]
    inputs = processor(text=prompts, images=rgb, return_tensors="pt", padding=True)
    img = model.visual_projection(model.vision_model(inputs["pixel_values"]).pooler_output)
    txt = model.text_projection(
        model.text_model(inputs["input_ids"], inputs["attention_mask"]).pooler_output
    )
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1)


@pytest.mark.slow
def test_missing_pieces_are_clear_errors(run_dir, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nothing"), "--steps", "1"]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    assert (
        main(
            [
                "--checkpoint",
                str(run_dir),
                "--clip",
                str(tmp_path / "noclip"),
                "--num-images",
                "10",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 2
    )
    assert "--clip" in capsys.readouterr().err
    try:
        import cleanfid.fid  # noqa: F401
    except Exception:  # noqa: BLE001 - not importable here (torchvision): the message says so
        assert (
            main(
                [
                    "--checkpoint",
                    str(run_dir),
                    "--reference",
                    str(tmp_path),
                    "--num-images",
                    "10",
                    "--steps",
                    "1",
                    "--out",
                    str(tmp_path / "f"),
                ]
            )
            == 2
        )
        assert "clean-fid" in capsys.readouterr().err


@pytest.mark.slow
def test_generation_spread_over_ray_tasks_matches_local(run_dir, cluster, tmp_path):
    """--workers 2: two Ray tasks generate interleaved halves; same seeds -> same table."""
    local, spread = tmp_path / "local", tmp_path / "spread"
    common = ["--checkpoint", str(run_dir), "--steps", "1", "--num-images", "40"]
    assert main([*common, "--out", str(local)]) == 0
    assert main([*common, "--out", str(spread), "--workers", "2"]) == 0
    a = list(csv.DictReader((local / "eval.csv").open()))
    b = list(csv.DictReader((spread / "eval.csv").open()))
    assert a == b
