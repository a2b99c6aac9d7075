"""Distil your own SDXL model, end to end, as README's walkthrough does it, on the tiny
SDXL-architecture stand-in (CPU, the session's Ray, moto's S3 server on 127.0.0.1):

captions table -> write_shards -> prepare (Ray Data teacher pairs) -> train with
configs/sdxl_realism.yaml from S3 (teacher: a single-file checkpoint + its config folder;
student: a bare UNet state dict, as NitroFusion publishes) -> eval (FID against the teacher with
clean-fid, CLIP score) -> export in every format -> Ray Serve from the s3:// run -> the
single-file export loaded in diffusers gives the server's image for the same seed. Plus: the same
train from img2dataset-style brace shards with no manifest (caption key ``txt``)."""

import base64
import csv
import io
import json
import tarfile
import urllib.request

import numpy as np
import pytest
import s3fs
import torch
from PIL import Image
from safetensors.torch import save_file
from sdxl_files import perturbed, wide_sdxl, write_configs, write_single_file

from nitro_dist.data.write_shards import main as write_shards
from nitro_dist.distributed.parallel import free_port
from nitro_dist.eval import main as eval_main
from nitro_dist.export import main as export
from nitro_dist.prepare import main as prepare
from nitro_dist.train import main as train

pytestmark = [pytest.mark.slow, pytest.mark.drill]
serve = pytest.importorskip("ray.serve")

BUCKET = "s3://nitro-test/journey"
PROMPT, SEED = "a lighthouse on a cliff at dusk", 7


def tiny_overrides(user) -> list[str]:
    """configs/sdxl_realism.yaml pointed at the user's files and shrunk to the stand-in."""
    return [
        f"model.teacher_path={user['teacher']}",
        f"model.config_path={user['configs']}",
        f"model.student_path={user['student']}",
        "model.gradient_checkpointing=false",
        "pool.levels=[0,3,9]",
        "pool.t_buckets=[10,500]",
        "pool.candidates=1",
        "pool.width=8",
        "train.batch_size=4",
        "train.grad_accum=1",
        "train.precision=fp32",
        "train.iterations=2",
        "train.checkpoint_every=2",
        "train.sample_every=0",
        "train.eval_every=0",
        "train.eval_images=10",
        "train.grid_per_prompt=1",
        "distributed.num_workers=1",
        "distributed.use_gpu=false",
        "distributed.cpus_per_worker=1",
        "logging.wandb=false",
        "logging.progress=false",
    ]


@pytest.fixture(scope="module")
def user(cluster, tmp_path_factory):
    """What such a user holds: a single-file SDXL teacher, the diffusers config folder that
    describes it, a one-step student as a bare UNet state dict, a captions table."""
    root = tmp_path_factory.mktemp("user")
    m = wide_sdxl(0)
    student = root / "student_unet.safetensors"
    save_file(perturbed(m.teacher, 1, scale=0.003).state_dict(), str(student))
    table = root / "captions.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        w.writerows([i, f"a photo of object number {i}, studio light"] for i in range(16))
    return {
        "m": m,
        "root": root,
        "teacher": write_single_file(m, root / "teacher.safetensors"),
        "configs": write_configs(m, root / "configs"),
        "student": student,
        "table": table,
    }


def post_image(url: str, body: dict) -> torch.Tensor:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        png = base64.b64decode(json.loads(r.read())["images"][0])
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32))


def test_distil_your_own_sdxl_model(user, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from nitro_dist.image_metrics import save_tiny_clip, save_tiny_inception
    from nitro_dist.serve import app

    tiny = tiny_overrides(user)
    # 1. captions -> prompt shards in S3
    prompts, pairs, runs = f"{BUCKET}/prompts", f"{BUCKET}/pairs", f"{BUCKET}/runs"
    assert write_shards(["--prompts", str(user["table"]), "--column", "caption"]
                        + ["--out", prompts, "--shard-size", "8"]) == 0  # fmt: skip
    # 2. the teacher's pairs (Ray Data, one CPU actor)
    assert prepare(["--config", "sdxl_realism", "--prompts", prompts, "--out", pairs]
                   + ["--batch-size", "8", *tiny]) == 0  # fmt: skip
    # 3. distil from S3 into S3
    common = ["--config", "sdxl_realism", *tiny, f"data.shards={pairs}"]
    assert train([*common, f"distributed.storage_path={runs}", "run_name=realism"]) == 0
    run = f"{runs}/realism"
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    assert fs.exists(f"{run[5:]}/iter_000002/generator/diffusion_pytorch_model.safetensors")
    final = json.loads(fs.cat(f"{run[5:]}/final_metrics.json"))
    assert final["iteration"] == 2
    # 4. evaluation against the run's own teacher (tiny random Inception and CLIP stand-ins)
    inception = save_tiny_inception(tmp_path / "inception.pt")
    clip = save_tiny_clip(tmp_path / "clip")
    args = ["--checkpoint", run, "--steps", "1", "2", "4", "--num-images", "4"]
    args += ["--inception", str(inception), "--clip", str(clip), "--out", str(tmp_path / "ev")]
    assert eval_main(args) == 0
    rows = list(csv.DictReader((tmp_path / "ev" / "eval.csv").open()))
    students = [r for r in rows if r.get("model") != "teacher"]
    assert sorted(int(r["steps"]) for r in students) == [1, 2, 4]
    assert all(float(r["fid_teacher"]) >= 0 and r["clip_score"] != "" for r in students)
    # 5. export in every format
    out = tmp_path / "export"
    for fmt, name, extra in [
        ("diffusers", "pipeline", []),
        ("unet-safetensors", "unet.safetensors", []),
        ("single-file", "nitro-full.safetensors", ["--full"]),
        ("delta", "delta", ["--base", str(user["student"]), "--custom", str(user["teacher"])]),
    ]:
        assert export(["--checkpoint", run, "--format", fmt, "--out", str(out / name), *extra]) == 0
    assert json.loads((out / "unet.scheduler.json").read_text())["shifted_timestep"] == 250
    # 6. serve the s3:// run over HTTP
    port = free_port()
    try:
        # one proxy: the session cluster's simulated nodes share this machine (and the port)
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        serve.run(app({"checkpoint": run, "device": "cpu"}), name="journey", route_prefix="/j")
        served = post_image(
            f"http://127.0.0.1:{port}/j/v1/images", {"prompt": PROMPT, "seed": SEED, "steps": 1}
        )
    finally:
        serve.shutdown()
    # 7. the single-file export in diffusers' own pipeline gives the server's image
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(out / "nitro-full.safetensors"), config=str(out / "pipeline"), local_files_only=True
    )
    img = pipe(
        PROMPT,
        num_inference_steps=1,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(SEED * 8),  # the project's x_T stream
        output_type="np",
    ).images[0]
    pixels = torch.from_numpy((img * 255).round().astype(np.float32))
    assert pixels.shape == served.shape
    assert (pixels - served).abs().max() <= 1.0  # PNG quantisation only


def img2dataset_shard(path, start: int, n: int) -> None:
    """A tar as img2dataset writes it: KEY.jpg, KEY.txt (the caption), KEY.json."""
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            key = f"{i:09d}"
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 10 % 255, 0, 0)).save(buf, format="JPEG")
            caption = f"a watercolour of a harbour, boat {i}".encode()
            meta = json.dumps({"key": key, "caption": caption.decode()}).encode()
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_the_same_train_from_img2dataset_brace_shards(user, tmp_path):
    """No manifest: the driver indexes the brace pattern; captions come from ``txt``."""
    local = tmp_path / "laion"
    local.mkdir()
    for k in range(3):
        img2dataset_shard(local / f"{k:05d}.tar", 4 * k, 4)
    fs = s3fs.S3FileSystem()
    fs.put(str(local), f"{BUCKET[5:]}/laion", recursive=True)
    shards = f"{BUCKET}/laion/{{00000..00002}}.tar"
    runs = f"{BUCKET}/runs"
    args = ["--config", "sdxl_realism", *tiny_overrides(user), f"data.shards={shards}"]
    args += ["data.caption_key=txt", "teacher.mode=online", "run_name=laion"]
    assert train([*args, f"distributed.storage_path={runs}"]) == 0
    fs.invalidate_cache()
    index = json.loads(fs.cat(f"{BUCKET[5:]}/laion/00000..00002.tar.index.json"))
    assert [s["count"] for s in index["shards"]] == [4, 4, 4]
    assert fs.exists(f"{BUCKET[5:]}/runs/laion/iter_000002/generator/config.json")
