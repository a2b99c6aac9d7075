"""Ray Serve app over real HTTP on 127.0.0.1: a digits checkpoint (made by the training loop)
served by ``nitro_dist.serve:app``; the right digit comes out (shipped metric net), same seed ->
same PNG, bad input -> 4xx naming the field while the server keeps serving, an overload burst ->
503s and nothing else 5xx, a checkpoint in S3 (moto) serves the same images, and the web page
works in headless Chromium."""

import base64
import io
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from nitro_dist.digits.data import PROMPTS
from nitro_dist.digits.metric import DigitsEvaluator
from nitro_dist.distributed.parallel import free_port
from nitro_dist.image_api import Job, encode_png, run_jobs
from nitro_dist.inference import Generator

serve = pytest.importorskip("ray.serve")

# the "s3" app runs with the serving limits on (tests/test_serve_limits.py has them without Ray)
KEY_ENV, KEY = "NITRO_SERVE_TEST_KEY", "serve-test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
GUARDED = {
    "api_key_env": KEY_ENV,
    "max_request_pixels": 512,  # 8 images at the native 8x8, 2 at 16x16
    "fault_oom_pixels": 255,  # calls over 255 pixels run out of memory: one 16x16 image does
    "max_body_bytes": 4096,
    "body_timeout_s": 2,
}


@pytest.fixture(scope="module")
def run_dir(short_digits_run):
    return short_digits_run


@pytest.fixture(scope="module")
def base_url(run_dir, cluster):  # the session's Ray, with the module's S3 bucket
    import s3fs

    from nitro_dist.serve import app

    s3fs.S3FileSystem().put(str(run_dir / "checkpoints"), "nitro-test/served", recursive=True)
    port = free_port()
    try:
        # one proxy: the session cluster's simulated nodes share this machine (and the port)
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        common = {"batch_wait_ms": "20", "device": "cpu"}
        serve.run(app({"checkpoint": str(run_dir), **common}), name="main", route_prefix="/")
        busy = {"max_ongoing_requests": 1, "max_queued_requests": 1, "max_batch_size": 1}
        serve.run(
            app({"checkpoint": str(run_dir), **common, **busy}), name="busy", route_prefix="/busy"
        )
        os.environ[KEY_ENV] = KEY  # read by the app builder, only its digest goes on
        # two models in one app (Serve multiplexing): the S3 copy first (the default), the run
        two = {"models": f"served=s3://nitro-test/served,digits={run_dir}", **common}
        serve.run(app({**two, **GUARDED}), name="s3", route_prefix="/s3")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.environ.pop(KEY_ENV, None)
        serve.shutdown()  # Ray itself stays up for the session's other tests


def post(url: str, body, timeout: float = 60, headers=None) -> tuple[int, Any, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def decode(png: bytes) -> torch.Tensor:
    arr = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32)
    return torch.from_numpy(arr)[None, None] / 127.5 - 1  # 1 x 1 x H x W in [-1, 1]


def images_of(body: bytes) -> list[bytes]:
    return [base64.b64decode(s) for s in json.loads(body)["images"]]


@pytest.mark.slow
def test_run_jobs_groups_by_steps_and_size_and_keeps_order(run_dir):
    gen = Generator.from_checkpoint(run_dir)
    jobs = [
        Job(PROMPTS[3], 1, 10, 2, 8, 8),
        Job(PROMPTS[5], 4, 20, 1, 8, 8),
        Job(PROMPTS[7], 1, 30, 1, 16, 16),
        Job(PROMPTS[1], 1, 40, 1, 8, 8),
    ]
    together = run_jobs(gen, jobs)
    assert [r.seeds for r in together] == [[10, 11], [20], [30], [40]]
    assert [r.batch_images for r in together] == [3, 1, 1, 3]  # job 0 and 3 shared a call
    for job, res in zip(jobs, together, strict=True):
        alone = run_jobs(gen, [job])[0]
        for a, b in zip(alone.pngs, res.pngs, strict=True):
            assert (decode(a) - decode(b)).abs().max() <= 2 / 127.5  # batch numerics, <= 1 level
    assert Image.open(io.BytesIO(together[2].pngs[0])).size == (16, 16)


@pytest.mark.slow
def test_right_digit_comes_out(base_url):
    images, labels = [], []
    for d in list(range(10)) * 2:
        seed = 100 + len(images)
        status, headers, body = post(
            f"{base_url}/v1/images", {"prompt": PROMPTS[d], "steps": 1, "seed": seed}
        )
        assert status == 200, body
        assert headers["X-Seeds"] == str(seed) and headers["X-Steps"] == "1"
        (png,) = images_of(body)
        assert Image.open(io.BytesIO(png)).size == (8, 8)
        images.append(decode(png))
        labels.append(d)
    # a 2-iteration checkpoint: about the teacher's 1-step quality (97.5% on 200 images)
    acc = DigitsEvaluator().alignment(torch.cat(images), torch.tensor(labels))
    assert acc >= 0.9, acc
    for steps in (2, 3, 4):
        status, headers, body = post(
            f"{base_url}/v1/images", {"prompt": PROMPTS[1], "steps": steps}
        )
        assert status == 200 and headers["X-Steps"] == str(steps)
    # several images in one request: consecutive seeds, PNG answer is a strip of them
    status, headers, body = post(
        f"{base_url}/v1/images",
        {"prompt": PROMPTS[2], "num_images": 3, "seed": 7, "format": "png"},
    )
    assert status == 200 and headers["content-type"] == "image/png"
    assert headers["X-Seeds"] == "7,8,9"
    assert Image.open(io.BytesIO(body)).size == (24, 8)


@pytest.mark.slow
def test_same_seed_same_image_and_same_as_the_sampler(base_url, run_dir):
    req = {"prompt": PROMPTS[4], "steps": 2, "seed": 1234}
    a = images_of(post(f"{base_url}/v1/images", req)[2])[0]
    b = images_of(post(f"{base_url}/v1/images", req)[2])[0]
    c = images_of(post(f"{base_url}/v1/images", {**req, "seed": 1235})[2])[0]
    assert a == b and a != c
    direct = Generator.from_checkpoint(run_dir)([PROMPTS[4]], [1234], 2)[0]
    assert (decode(a) - decode(encode_png(direct))).abs().max() <= 2 / 127.5
    # concurrent requests (batched together) give what they give alone
    reqs = [{"prompt": PROMPTS[d], "steps": 1 + d % 4, "seed": d} for d in range(8)]
    alone = [images_of(post(f"{base_url}/v1/images", r)[2])[0] for r in reqs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: images_of(post(f"{base_url}/v1/images", r)[2])[0], reqs))
    for x, y in zip(alone, together, strict=True):
        assert (decode(x) - decode(y)).abs().max() <= 2 / 127.5
    # a random seed is chosen and reported when none is given
    status, headers, body = post(f"{base_url}/v1/images", {"prompt": PROMPTS[4]})
    assert status == 200 and json.loads(body)["seeds"] == [int(headers["X-Seeds"])]


BAD = [
    (b'{"prompt": "a handwritten digit one", ', 400, "body"),
    (b"[1, 2]", 422, "body"),
    ({"prompt": "a handwritten digit one", "stpes": 2}, 422, "stpes"),
    ({"prompt": "a handwritten digit one", "steps": 0}, 422, "steps"),
    ({"prompt": "a handwritten digit one", "steps": 5}, 422, "steps"),
    ({"prompt": "a handwritten digit one", "steps": "2"}, 422, "steps"),
    ({"prompt": "a handwritten digit one", "height": 9}, 422, "height"),
    ({"prompt": "a handwritten digit one", "height": 2}, 422, "height"),
    ({"prompt": "a handwritten digit one", "width": 4096}, 422, "width"),
    ({"prompt": "a handwritten digit one", "num_images": 9}, 422, "num_images"),
    ({"prompt": "a handwritten digit one", "num_images": 0}, 422, "num_images"),
    ({"prompt": "a handwritten digit one", "seed": -1}, 422, "seed"),
    ({"prompt": "a handwritten digit one", "format": "gif"}, 422, "format"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"prompt": "x" * 2001}, 422, "prompt"),
    ({"steps": 1}, 422, "prompt"),
]


@pytest.mark.slow
def test_bad_input_is_4xx_naming_the_field_and_the_server_keeps_serving(base_url):
    for body, code, field in BAD:
        status, _, out = post(f"{base_url}/v1/images", body)
        err = json.loads(out)
        assert status == code, (body, status, out)
        assert err["field"] == field and err["error"].startswith(field), (body, err)
    # over-long prompt: truncated to the encoder's limit, and the answer says so
    long_prompt = " ".join([PROMPTS[6]] * 10)
    status, headers, body = post(f"{base_url}/v1/images", {"prompt": long_prompt, "seed": 1})
    assert status == 200
    assert "the text encoder read the first 16" in headers["X-Prompt-Truncated"]
    assert json.loads(body)["truncated"] is True
    status, headers, _ = post(f"{base_url}/v1/images", {"prompt": PROMPTS[6], "seed": 1})
    assert status == 200 and "X-Prompt-Truncated" not in headers
    with urllib.request.urlopen(f"{base_url}/healthz", timeout=30) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["limits"]["native"] == 8


@pytest.mark.slow
def test_overload_burst_gets_503_and_no_other_5xx(base_url):
    body = {"prompt": PROMPTS[8], "steps": 4, "num_images": 8, "seed": 0}
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda _: post(f"{base_url}/busy/v1/images", body), range(24)))
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    for status, _, out in results:  # 503s come from Serve's proxy (backpressure)
        assert status == 200 or b"busy" in out or b"backpressure" in out, out
    assert post(f"{base_url}/busy/v1/images", body)[0] == 200  # and it recovers


@pytest.mark.slow
def test_checkpoint_in_s3_serves_the_same_images(base_url):
    req = {"prompt": PROMPTS[9], "steps": 2, "seed": 77}
    local = images_of(post(f"{base_url}/v1/images", req)[2])[0]
    status, _, body = post(f"{base_url}/s3/v1/images", req, headers=AUTH)
    assert status == 200 and images_of(body)[0] == local


@pytest.mark.slow
def test_openai_client_gets_the_same_images_and_openai_errors(base_url, run_dir):
    """``POST /v1/images/generations`` and ``GET /v1/models`` with the real ``openai`` client:
    the same seeds give the same PNGs as /v1/images; bad parameters are 400 naming the
    parameter, an unknown model 404 ``model_not_found``, in OpenAI's error shape."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    (model,) = client.models.list().data
    assert model.id == run_dir.name and model.owned_by == "nitro_dist"  # the run folder's name
    assert client.models.retrieve(run_dir.name).id == run_dir.name
    models = urllib.request.Request(f"{base_url}/s3/v1/models", headers=AUTH)
    with urllib.request.urlopen(models, timeout=30) as r:
        ids = [m["id"] for m in json.loads(r.read())["data"]]
        assert ids == ["served", "digits"]  # models=served=s3://.../served,digits=...
    raw = client.images.with_raw_response.generate(
        model=model.id,
        prompt=PROMPTS[3],
        n=2,
        size="8x8",
        response_format="b64_json",
        extra_body={"seed": 3, "steps": 2},
    )
    assert raw.headers["X-Seeds"] == "3,4" and raw.headers["X-Steps"] == "2"
    out = raw.parse()
    assert out.size == "8x8" and out.data is not None
    pngs = [base64.b64decode(d.b64_json or "") for d in out.data]
    same = {"prompt": PROMPTS[3], "steps": 2, "seed": 3, "num_images": 2}
    assert pngs == images_of(post(f"{base_url}/v1/images", same)[2])
    wide = client.images.generate(prompt=PROMPTS[3], size="16x8", extra_body={"seed": 3})
    assert wide.data is not None and len(wide.data) == 1  # no model: the served one; n: 1
    assert Image.open(io.BytesIO(base64.b64decode(wide.data[0].b64_json or ""))).size == (16, 8)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"response_format": "url"}, "response_format"),
        ({"size": "9x8"}, "size"),
        ({"size": "1024x1024"}, "size"),
        ({"size": "eight"}, "size"),
        ({"n": 9}, "n"),
        ({"quality": "hd"}, "quality"),
        ({"extra_body": {"steps": 5}}, "steps"),
        ({"extra_body": {"seed": -1}}, "seed"),
    ]
    for kwargs, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(model=model.id, prompt=PROMPTS[1], **kwargs)
        assert e.value.status_code == 400 and e.value.param == param, (kwargs, e.value.body)
        assert isinstance(e.value.body, dict) and e.value.body["type"] == "invalid_request_error"
        assert e.value.body["message"].startswith(param), e.value.body
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="dall-e-3", prompt=PROMPTS[1])
    assert missing.value.code == "model_not_found" and run_dir.name in missing.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")
    status, _, body = post(f"{base_url}/v1/images/generations", b'{"prompt": ')
    assert status == 400 and json.loads(body)["error"]["message"].startswith("body: malformed")


def get(url: str, headers=None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.slow
def test_limits_auth_and_out_of_memory_over_http(base_url):
    """The "s3" app with the limits on: /healthz open and without internals, /docs off, the API
    key, an oversized body (413), a stalled client (408), the per-request pixel budget (422 /
    OpenAI 400), and an out-of-memory (injected over 255 pixels per call): a batch that does not
    fit is split (200, same images), a request whose one image does not fit gets 503 +
    Retry-After while the others get theirs, and the replica keeps serving."""
    t0 = time.monotonic()
    url = f"{base_url}/s3"
    status, body = get(f"{url}/healthz")
    health = json.loads(body)
    public = {"status", "model", "models", "limits", "budgets", "live"}  # live: counts only
    assert status == 200 and set(health) == public, health
    assert health["budgets"] == {"max_request_pixels": 512, "max_call_pixels": 1024}
    for path in ("/docs", "/openapi.json"):
        assert get(url + path, AUTH)[0] == 404, path
    req = {"prompt": PROMPTS[2], "seed": 5, "num_images": 8}
    status, headers, body = post(f"{url}/v1/images", req)
    assert status == 401 and json.loads(body)["field"] == "authorization"
    assert post(f"{url}/v1/images", req, headers={"Authorization": "Bearer x"})[0] == 401
    status, _, body = post(f"{url}/v1/images", {"prompt": "x" * 5000}, headers=AUTH)
    assert status == 413 and json.loads(body)["field"] == "body"
    head = f"POST /s3/v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    with socket.create_connection(("127.0.0.1", int(base_url.rsplit(":", 1)[1])), 20) as s:
        s.sendall((head + 'Content-Length: 200\r\n\r\n{"prompt": ').encode())  # then stalls
        assert s.recv(65536).startswith(b"HTTP/1.1 408")
    big = {"prompt": PROMPTS[2], "num_images": 3, "height": 16, "width": 16}
    status, _, body = post(f"{url}/v1/images", big, headers=AUTH)
    assert status == 422 and json.loads(body)["error"].startswith("num_images: 3 image(s)")
    openai_big = {"prompt": PROMPTS[2], "n": 3, "size": "16x16"}
    status, _, body = post(f"{url}/v1/images/generations", openai_big, headers=AUTH)
    assert status == 400 and json.loads(body)["error"]["param"] == "n"
    # 8 images of 8x8 = 512 pixels: out of memory, halved to 2 per call; the same images
    status, headers, body = post(f"{url}/v1/images", req, headers=AUTH)
    assert status == 200 and headers["X-Batch-Images"] == "2"
    assert images_of(body) == images_of(post(f"{base_url}/v1/images", req)[2])
    # concurrent: whichever way Serve batches them, only the 16x16 request gets 503
    one_big = {"prompt": PROMPTS[4], "seed": 1, "height": 16, "width": 16}
    reqs = [{"prompt": PROMPTS[d], "seed": d, "num_images": 2} for d in range(4)] + [one_big]
    with ThreadPoolExecutor(5) as pool:
        out = list(pool.map(lambda r: post(f"{url}/v1/images", r, headers=AUTH), reqs))
    assert [s for s, _, _ in out] == [200, 200, 200, 200, 503], [s for s, _, _ in out]
    assert out[4][1]["Retry-After"] == "5" and b"out of memory" in out[4][2]
    assert post(f"{url}/v1/images", reqs[0], headers=AUTH)[0] == 200  # still serving
    print(f"limits over HTTP: {time.monotonic() - t0:.1f} s")


def test_app_arguments_are_checked_before_anything_starts(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from nitro_dist.serve import APP_ARGS, app

    assert "checkpoint" in APP_ARGS and "max_batch_size" in APP_ARGS
    with pytest.raises(ValidationError, match="max_batchsize"):
        app({"max_batchsize": "4"})
    with pytest.raises(ValidationError, match="replicas"):
        app({"replicas": "many"})
    with pytest.raises(ValueError, match="no checkpoint found at /nonexistent"):
        app({"checkpoint": "/nonexistent"})
    monkeypatch.delenv("NITRO_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key_env: the environment variable NITRO_NO_SUCH_KEY"):
        app({"checkpoint": "/nonexistent", "api_key_env": "NITRO_NO_SUCH_KEY"})
    monkeypatch.chdir(tmp_path)  # no runs/digits here
    with pytest.raises(ValueError, match="python -m nitro_dist.train"):
        app({})


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=opts)


@pytest.mark.browser
@pytest.mark.slow
def test_web_page_makes_an_image_in_headless_chromium(base_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _browser()
    try:
        browser.set_page_load_timeout(60)
        browser.get(base_url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: " px" in b.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "prompt").send_keys(PROMPTS[3])
        Select(browser.find_element(By.ID, "steps")).select_by_value("2")
        num = browser.find_element(By.ID, "num_images")
        num.clear()
        num.send_keys("2")
        browser.find_element(By.ID, "seed").send_keys("5")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "img.result")) == 2)
        srcs = [
            i.get_attribute("src") for i in browser.find_elements(By.CSS_SELECTOR, "img.result")
        ]
        status = browser.find_element(By.ID, "status").text
    finally:
        browser.quit()
    assert "2 step(s)" in status, status
    pngs = [base64.b64decode(s.split(",", 1)[1]) for s in srcs]
    same = images_of(
        post(
            f"{base_url}/v1/images", {"prompt": PROMPTS[3], "steps": 2, "seed": 5, "num_images": 2}
        )[2]
    )
    assert pngs == same
    pred = DigitsEvaluator().alignment(torch.cat([decode(p) for p in pngs]), torch.tensor([3, 3]))
    assert pred >= 0.5  # one of the two at least: a 2-iteration checkpoint at 2 steps


@pytest.fixture(scope="module")
def local_url(run_dir):
    """the app's routes (image_app.ImageApp) under plain uvicorn on 127.0.0.1, over the
    digits checkpoint loaded in this process: the browser tests need no Ray."""
    import threading

    import uvicorn

    from nitro_dist import serve as serve_mod
    from nitro_dist.local_app import local_api
    from nitro_dist.served_model import load_model

    model = load_model(
        "digits", serve_mod.resolve_checkpoint(str(run_dir)), device="cpu", dtype="fp32"
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            local_api({"digits": model}), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        serve_mod.api.dependency_overrides.clear()


@pytest.mark.browser
@pytest.mark.slow
def test_draw_as_you_type_in_headless_chromium(local_url):
    """Live mode: the prompt typed letter by letter (no debounce: a request per keystroke), the
    image shown at the end is the API's for that prompt and seed, and the server dropped the
    stale prompts that arrived while the model was busy. Then with the default debounce."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def typed(b, prompt: str) -> bool:
        shown = b.find_elements(By.CSS_SELECTOR, "img.live")
        return bool(shown) and shown[0].get_attribute("data-prompt") == prompt

    browser = _browser()
    latency = {}
    try:
        browser.set_page_load_timeout(60)
        wait = WebDriverWait(browser, 60)
        for debounce, digit in ((0, 3), (None, 7)):
            query = "?live=1" + (f"&debounce={debounce}" if debounce is not None else "")
            browser.get(local_url + "/" + query)
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model_select option"))
            browser.find_element(By.ID, "seed").send_keys("5")
            box = browser.find_element(By.ID, "prompt")
            if debounce == 0:
                box.send_keys(PROMPTS[digit])  # one key event per letter, as fast as it goes
            else:
                for ch in PROMPTS[digit]:  # a person typing: ~one letter per webdriver call
                    box.send_keys(ch)
            wait.until(lambda b, d=digit: typed(b, PROMPTS[d]))
            src = browser.find_element(By.CSS_SELECTOR, "img.live").get_attribute("src")
            status = browser.find_element(By.ID, "status")
            latency[debounce] = int(status.get_attribute("data-latency-ms"))
            png = base64.b64decode(src.split(",", 1)[1])
            same = {"prompt": PROMPTS[digit], "steps": 1, "seed": 5}
            assert png == images_of(post(f"{local_url}/v1/images", same)[2])[0]
    finally:
        browser.quit()
    with urllib.request.urlopen(f"{local_url}/healthz", timeout=30) as r:
        live = json.loads(r.read())["live"]
    print(
        f"keystroke-to-image: {latency[0]} ms (no debounce), {latency[None]} ms (100 ms "
        f"debounce); live {live}"
    )
    typed_letters = len(PROMPTS[3]) + len(PROMPTS[7])
    assert live["sessions"] == 2 and live["requests"] <= typed_letters
    assert live["dropped"] >= 1  # stale prompts never reached the model
    assert live["images"] + live["dropped"] == live["requests"]


@pytest.mark.slow
def test_several_models_in_one_app_and_live_over_serve(base_url, run_dir):
    """Through Ray Serve: the s3 app's two models (Serve multiplexing: the run's checkpoint in
    S3 and on disk) are listed and served by ``model``, an unknown one is a 422 listing them;
    the WebSocket of the main app ends a burst of prompts with the last prompt's image, the one
    /v1/images gives."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with urllib.request.urlopen(f"{base_url}/s3/healthz", timeout=30) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["models"] == ["served", "digits"]
    req = {"prompt": PROMPTS[2], "seed": 9}
    want = images_of(post(f"{base_url}/v1/images", req)[2])
    for model in ("served", "digits"):
        status, _, body = post(f"{base_url}/s3/v1/images", {**req, "model": model}, headers=AUTH)
        assert status == 200 and images_of(body) == want
    status, _, body = post(f"{base_url}/s3/v1/images", {**req, "model": "sdxl"}, headers=AUTH)
    assert status == 422 and "served, digits" in json.loads(body)["error"]
    prompt = PROMPTS[2]
    with connect(base_url.replace("http", "ws") + "/v1/live", open_timeout=30) as ws:
        for i in range(1, len(prompt) + 1):
            ws.send(json.dumps({"id": i, "prompt": prompt[:i], "seed": 9}))
        got = [json.loads(ws.recv(timeout=60))]
        while got[-1]["id"] != len(prompt):
            got.append(json.loads(ws.recv(timeout=60)))
    assert got[-1]["prompt"] == prompt and base64.b64decode(got[-1]["image"]) == want[0]
    assert got[-1]["dropped"] == len(prompt) - len(got)
    # the API key guards the socket too: no key, no handshake (the HTTP guard sees only HTTP)
    with pytest.raises(InvalidStatus):
        connect(base_url.replace("http", "ws") + "/s3/v1/live", open_timeout=30)
    with connect(base_url.replace("http", "ws") + "/s3/v1/live", additional_headers=AUTH) as ws:
        ws.send(json.dumps({"id": 1, "prompt": prompt, "seed": 9, "model": "digits"}))
        assert base64.b64decode(json.loads(ws.recv(timeout=60))["image"]) == want[0]


@pytest.mark.slow
def test_cli_serve_run_reports_a_missing_checkpoint(tmp_path):
    """``serve run nitro_dist.serve:app checkpoint=...`` fails fast with the message."""
    import subprocess
    import sys

    serve_cli = Path(sys.executable).with_name("serve")
    t0 = time.time()
    out = subprocess.run(
        [str(serve_cli), "run", "nitro_dist.serve:app", f"checkpoint={tmp_path}/none"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "no checkpoint found" in out.stdout + out.stderr
    assert time.time() - t0 < 120


@pytest.mark.slow
@pytest.mark.drill
def test_a_killed_generator_replica_is_replaced_and_serving_goes_on(base_url):
    """Kill the 'main' app's generator replica process: requests meanwhile get 200 or 503
    (never another 5xx), and within a bounded time the new replica answers."""
    import ray
    from ray.util import list_named_actors

    names = [a for a in list_named_actors(all_namespaces=True) if "main#Generator" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    req = {"prompt": PROMPTS[5], "seed": 3}
    statuses, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline and len(statuses) < 200:
        status = post(f"{base_url}/v1/images", req, timeout=60)[0]
        statuses.append(status)
        if status == 200 and len(statuses) > 1:
            break
        time.sleep(0.5)
    assert statuses[-1] == 200, statuses
    assert set(statuses) <= {200, 503}, statuses
    with urllib.request.urlopen(f"{base_url}/healthz", timeout=30) as r:
        assert json.loads(r.read())["status"] == "ok"
