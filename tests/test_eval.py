"""The eval CLI on a digits checkpoint (1- and 4-step FID-digits/alignment table, grids, CLIP
score with a local tiny random CLIP) and on a tiny SDXL stand-in against its own teacher (FID
through clean-fid with a tiny random Inception in clean-fid's TorchScript form, CLIP score);
the Tune metric of a prompts run; clear errors for what is missing."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from nitro_dist.config import load_config, with_values
from nitro_dist.digits.data import PROMPTS
from nitro_dist.eval import main
from nitro_dist.image_metrics import (
    InceptionFID,
    TeacherImages,
    frechet_from_features,
    save_tiny_clip,
    save_tiny_inception,
)


def needs_cleanfid():
    """clean-fid imports torchvision: PyPI's CUDA torchvision does not import beside the CPU
    torch 2.13.0 build; with torch 2.14.1 + torchvision 0.29.1 it does and these tests run."""
    try:
        from cleanfid import fid
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision failing inside it
        pytest.skip(f"clean-fid does not import here ({type(e).__name__}: {e})")
    return fid


@pytest.fixture(scope="module")
def run_dir(short_digits_run):
    return short_digits_run


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)


@pytest.fixture(scope="module")
def tiny_inception(tmp_path_factory):
    return save_tiny_inception(tmp_path_factory.mktemp("inception") / "tiny_inception.pt", seed=0)


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    """A tiny SDXL-architecture run (random weights, VAE: 32 x 32 RGB images) saved before any
    training step: its student is the teacher's copy under the student's own sampler."""
    from nitro_dist.loop import train

    out = tmp_path_factory.mktemp("sdxl0")
    overrides = ["train.iterations=0", "model.use_vae=true", "logging.progress=false"]
    train(load_config("tiny", overrides), out)
    return out


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
    common = ["--checkpoint", str(run_dir), "--num-images", "10", "--steps", "1"]
    assert main([*common, "--reference", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert "--reference: FID against reference images needs --inception" in capsys.readouterr().err
    assert main([*common, "--inception", str(tmp_path / "i.pt"), "--out", str(tmp_path / "g")]) == 2
    assert "--inception" in capsys.readouterr().err


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


# ---------------------------------------------------------------------------------------------
# FID through clean-fid with a local Inception, CLIP score, the student against its teacher


def test_inception_fid_runs_clean_fids_path(tiny_inception):
    fid = needs_cleanfid()
    inception = InceptionFID(tiny_inception)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g) * 2 - 1
    feats = inception.features(x)
    assert feats.shape == (16, 2048) and np.isfinite(feats).all()
    assert np.array_equal(feats, inception.features(x))  # deterministic
    # the same pixels through clean-fid's folder path by hand: PNGs, then get_folder_features
    assert inception.fid_from_features(feats, feats) == pytest.approx(0, abs=1e-9)
    fids = [
        inception.fid_from_features(feats, inception.features((x + s * noise).clamp(-1, 1)))
        for s, noise in [(0.05, torch.randn(x.shape, generator=g)), (0.5, torch.randn(x.shape))]
    ]
    other = inception.fid_from_features(feats, inception.features(torch.rand(16, 3, 32, 32) - 1))
    assert 0 < fids[0] < fids[1] and fids[0] < other
    # the N x N closed form is clean-fid's fid_from_feats (sqrtm of D x D), here on 64 features
    a, b = feats[:, :64], inception.features(torch.rand(12, 3, 32, 32, generator=g) * 2 - 1)[:, :64]
    assert frechet_from_features(a, b) == pytest.approx(fid.fid_from_feats(a, b), rel=1e-6)


def test_tiny_inception_survives_cpythons_ast_race_and_nothing_else(tmp_path):
    """gh-106905: another thread's compile can make ast.parse (torch.jit.script) fail once."""
    from unittest import mock

    real, calls = torch.jit.script, []

    def racing_once(obj, *args, **kwargs):  # torch.jit calls it again for what obj uses
        calls.append(obj)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=174, after=73)")
        return real(obj, *args, **kwargs)

    with mock.patch.object(torch.jit, "script", side_effect=racing_once):
        path = save_tiny_inception(tmp_path / "a.pt")
    assert calls[0] is calls[1]  # the model, scripted again
    assert torch.jit.load(str(path))(torch.zeros(1, 3, 8, 8)).shape == (1, 2048)
    with mock.patch.object(torch.jit, "script", side_effect=SystemError("something else")):
        with pytest.raises(SystemError, match="something else"):
            save_tiny_inception(tmp_path / "b.pt")


def test_frechet_closed_form_against_clean_fid_and_a_hand_formula():
    fid = needs_cleanfid()
    r = np.random.default_rng(0)
    a, b = r.normal(size=(20, 48)), r.normal(size=(30, 48)) * 1.3 + 0.2
    expected = fid.fid_from_feats(a, b)
    assert frechet_from_features(a, b) == pytest.approx(expected, rel=1e-6)
    # the 1-d case by hand: (mu_a - mu_b)^2 + (s_a - s_b)^2
    x, y = r.normal(size=(50, 1)), r.normal(size=(40, 1)) * 2 + 1
    by_hand = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_from_features(x, y) == pytest.approx(by_hand, rel=1e-9)


def test_missing_or_wrong_weights_name_their_flag_or_key(tmp_path, tiny_cfg):
    from nitro_dist.image_metrics import ClipScorer
    from nitro_dist.tasks import task_of

    with pytest.raises(ValueError, match="--inception .*nope.pt: no such file"):
        InceptionFID(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="--clip .*noclip: not a transformers CLIP folder"):
        ClipScorer(tmp_path / "noclip")
    with pytest.raises(ValueError, match="eval.inception .*nope.pt"):
        task_of(tiny_cfg(f"eval.inception={tmp_path / 'nope.pt'}"))
    with pytest.raises(ValueError, match="eval.clip .*noclip"):
        task_of(tiny_cfg(f"eval.clip={tmp_path / 'noclip'}"))
    needs_cleanfid()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a TorchScript archive")
    with pytest.raises(ValueError, match="--inception .*junk.pt: not a TorchScript Inception"):
        InceptionFID(junk)


def test_inference_does_not_need_the_runs_metric_weights(tmp_path):
    """A checkpoint trained with eval.inception/eval.clip loads where those files are absent
    (a serving machine): only training and evaluation read them."""
    from nitro_dist.inference import _text_and_vae
    from nitro_dist.tasks import task_of

    missing = [f"eval.inception={tmp_path / 'none.pt'}", f"eval.clip={tmp_path / 'none'}"]
    cfg = load_config("digits", missing)
    with pytest.raises(ValueError, match="eval.inception"):
        task_of(cfg)  # training and evaluation refuse it
    text, vae = _text_and_vae(cfg)  # model.source=task: the digits folder, read as before
    assert text is not None and vae is None


def prompts_cfg(*overrides: str):
    """A tiny SDXL run of task ``prompts`` (the shards are never read here)."""
    base = [
        "task=prompts",
        "data.source=shards",
        "data.shards=unused",
        "model.use_vae=true",
        "train.sample_prompts=[a red fox, a bowl of ramen]",
    ]
    return load_config("tiny", [*base, *overrides])


def test_prompts_task_reports_teacher_fid_and_clip_and_tune_watches_it(tiny_inception, tiny_clip):
    needs_cleanfid()
    from nitro_dist.diffusion import NitroLCMScheduler
    from nitro_dist.inference import Generator
    from nitro_dist.models.builders import build_tiny_sdxl
    from nitro_dist.tasks import evaluate_steps, task_of
    from nitro_dist.tune import pick_metric

    cfg = prompts_cfg(f"eval.inception={tiny_inception}", f"eval.clip={tiny_clip}")
    task = task_of(cfg)
    m = build_tiny_sdxl(cfg.seed, with_vae=True)
    sched = NitroLCMScheduler.from_schedule(m.schedule, cfg.sampler.shift)
    out = evaluate_steps(task, Generator(m.student, m.text, sched, m.vae), 10, steps=(1,))
    assert set(out) == {
        "pixel_std_1step",
        "diversity_1step",
        "fid_teacher_1step",
        "clip_score_1step",
    }
    assert out["fid_teacher_1step"] > 0 and out["clip_score_1step"] >= 0
    # the teacher's own images against themselves: zero, so the figure above can fail
    teacher_images, teacher_feats = task.comparison.teacher(task.eval_prompts(10))
    inception = task.comparison.inception
    assert inception.fid_from_features(inception.features(teacher_images), teacher_feats) == (
        pytest.approx(0, abs=1e-9)
    )
    # Tune: the digits default gives way to the teacher FID; an unreported metric is refused
    picked = pick_metric(cfg)
    assert (picked.tune.metric, picked.tune.mode) == ("fid_teacher_1step", "min")
    assert pick_metric(with_values(cfg, {"eval.inception": ""})).tune.metric == "clip_score_1step"
    kept = pick_metric(with_values(cfg, {"tune.metric": "diversity_4step", "tune.mode": "max"}))
    assert (kept.tune.metric, kept.tune.mode) == ("diversity_4step", "max")
    with pytest.raises(ValueError, match="tune.metric: task 'prompts' does not report 'fid_2step'"):
        pick_metric(with_values(cfg, {"tune.metric": "fid_2step"}))
    with pytest.raises(ValueError, match="eval.inception"):
        pick_metric(prompts_cfg())
    assert pick_metric(load_config("digits")).tune.metric == "fid_digits_1step"  # untouched


@pytest.mark.slow  # 6-10 s on 2 busy cores: make test, not test-fast
def test_sdxl_student_against_its_teacher_table(sdxl_run, tiny_inception, tiny_clip, tmp_path):
    """The CLI's table for a non-digits run: a teacher row and 1/2/4-step student rows; the
    1-step fid_teacher recomputed by hand from the generator, the teacher and the Inception."""
    needs_cleanfid()
    from nitro_dist import checkpoint_layout
    from nitro_dist.inference import Generator
    from nitro_dist.tasks import EVAL_SEED_OFFSET

    prompts_file = tmp_path / "held_out.txt"
    prompts_file.write_text("a red fox in the snow\na bowl of ramen\na city at night\n")
    out = tmp_path / "eval"
    args = ["--checkpoint", str(sdxl_run), "--num-images", "12", "--prompts", str(prompts_file)]
    args += ["--inception", str(tiny_inception), "--clip", str(tiny_clip), "--out", str(out)]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "eval.csv").open()))
    assert [(r["model"], r["steps"]) for r in rows] == [
        ("teacher", "4"),
        ("student", "1"),
        ("student", "2"),
        ("student", "4"),
    ]
    assert rows[0]["fid_teacher"] == ""  # the teacher is the reference
    fids = [float(r["fid_teacher"]) for r in rows[1:]]
    assert all(np.isfinite(f) and f > 0 for f in fids)
    assert all(float(r["clip_score"]) >= 0 for r in rows)
    assert json.loads((out / "eval.json").read_text())["rows"][1]["fid_teacher"] == fids[0]
    assert "| model | steps |" in (out / "eval.md").read_text()
    assert (out / "grid_teacher.png").exists() and (out / "grid_4step.png").exists()
    # by hand: the same prompts and seeds through the student (1 step) and the teacher
    prompts = [
        ["a red fox in the snow", "a bowl of ramen", "a city at night"][i % 3] for i in range(12)
    ]
    seeds = [EVAL_SEED_OFFSET + i for i in range(12)]
    path = checkpoint_layout.resolve(str(sdxl_run))
    student = Generator.from_checkpoint(path)(prompts, seeds, 1)
    teacher = TeacherImages(Generator.checkpoint_config(path))(prompts, seeds)
    inception = InceptionFID(tiny_inception)
    by_hand = frechet_from_features(inception.features(student), inception.features(teacher))
    assert fids[0] == pytest.approx(by_hand, rel=1e-6)
    # and missing weights are errors that name the flag
    bad = ["--checkpoint", str(sdxl_run), "--num-images", "10", "--steps", "1"]
    assert main([*bad, "--inception", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")]) == 2
    assert main([*bad, "--reference", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
