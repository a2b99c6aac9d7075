"""The serving limits without Ray (``nitro_dist.serve_limits``): pixel budgets and the
out-of-memory guard on a real tiny generator, and the HTTP guard (body size, slow client, request
timeout, API key, docs) on a real uvicorn server on 127.0.0.1 driven over sockets and by the
``openai`` client. tests/test_serve.py checks the same limits through the Ray Serve app."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from nitro_dist.distributed.parallel import free_port
from nitro_dist.image_api import Job, Limits, Result, run_jobs
from nitro_dist.serve_limits import (
    HTTPLimits,
    LimitArgs,
    OutOfMemory,
    PixelBudget,
    RequestGuard,
    is_oom,
    run_jobs_guarded,
)

KEY = "test-key-0123456789"
LIMITS = Limits(native=8, multiple=2, min_side=4, max_side=16, max_tokens=16, channels=1)


def test_pixel_budgets_resolve_and_refuse_naming_the_parameter():
    auto = PixelBudget.resolve(LimitArgs(), LIMITS)
    assert (auto.max_request_pixels, auto.max_call_pixels) == (8 * 64, 16 * 64)
    given = PixelBudget.resolve(LimitArgs(max_request_pixels=300, max_call_pixels=256), LIMITS)
    assert (given.max_request_pixels, given.max_call_pixels) == (300, 256)
    with pytest.raises(ValueError, match=r"max_call_pixels: 255 .*\(16x16 = 256"):
        PixelBudget.resolve(LimitArgs(max_call_pixels=255), LIMITS)
    auto.check_request(8, 8, 8, "n")  # 512: at the budget
    with pytest.raises(ValueError, match=r"^n: 2 image\(s\) of 16x16 are 512 pixels, over .* 300"):
        given.check_request(2, 16, 16, "n")
    with pytest.raises(ValueError, match="at most 1$"):
        given.check_request(2, 16, 16, "num_images")


def test_out_of_memory_is_recognised():
    with pytest.raises(RuntimeError) as real:  # the CPU allocator's own error
        torch.empty(2**62, dtype=torch.uint8)
    assert is_oom(real.value)
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_oom(RuntimeError("shapes do not match"))
    assert not is_oom(ValueError("out of memory"))


@pytest.fixture(scope="module")
def gen():
    from nitro_dist.diffusion import NitroLCMScheduler
    from nitro_dist.inference import Generator
    from nitro_dist.models.builders import build_tiny_sdxl

    m = build_tiny_sdxl(0, with_vae=False)
    return Generator(m.student, m.text, NitroLCMScheduler.from_schedule(m.schedule, 250))


def pixels(result: Result) -> list[np.ndarray]:
    import io

    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(p)), dtype=np.int16) for p in result.pngs]


def same_images(a: Result, b: Result) -> bool:
    return all(np.abs(x - y).max() <= 1 for x, y in zip(pixels(a), pixels(b), strict=True))


def test_calls_keep_to_the_pixel_budget_and_oom_hits_only_its_requests(gen):
    """A batch of three requests: cut into calls of at most ``max_call_pixels``; with an
    (injected) out-of-memory over 150 pixels, the batch is rerun request by request, halving, and
    only the request whose single image is over gets OutOfMemory; the others get the images
    they get alone."""
    jobs = [
        Job("a cat", 1, 10, 1, 8, 8),
        Job("a dog", 1, 20, 3, 8, 8),
        Job("a fox", 1, 30, 1, 16, 16),
    ]
    alone = run_jobs(gen, jobs)  # one call per (steps, size): 4 and 1 images
    assert [r.batch_images for r in alone] == [4, 4, 1]
    t0 = time.perf_counter()
    cut = run_jobs_guarded(gen, jobs, PixelBudget(10**6, 128))  # 2 images of 8x8 per call
    assert [r.batch_images for r in cut] == [2, 2, 1]
    assert all(same_images(a, b) for a, b in zip(alone, cut, strict=True))
    hit = run_jobs_guarded(gen, jobs, PixelBudget(10**6, 10**6, fault_oom_pixels=150))
    assert isinstance(hit[2], OutOfMemory) and hit[2].retry_after == "5"
    assert "1 image(s) of 16x16 (256 pixels) even one per model call" in hit[2].message
    assert [r.batch_images for r in hit[:2]] == [1, 2]  # request 2 halved: 3 -> 2 per call
    assert same_images(alone[0], hit[0]) and same_images(alone[1], hit[1])
    assert hit[1].seeds == [20, 21, 22]
    print(f"guarded runs: {time.perf_counter() - t0:.1f} s")


# --- HTTP, on a real uvicorn ---------------------------------------------------------------------

TEST_LIMITS = HTTPLimits(
    max_body_bytes=2048,
    body_timeout_s=1.0,
    request_timeout_s=2.0,
    api_key_sha256=HTTPLimits.of(LimitArgs(api_key_env="K"), {"K": KEY}).api_key_sha256,
)


def make_app(limits: HTTPLimits) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestGuard, limits=lambda: limits)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/images")
    async def images(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                            "owned_by": "nitro_dist"}]}  # fmt: skip

    @app.get("/slow")
    async def slow() -> JSONResponse:
        await asyncio.sleep(30)
        return JSONResponse({})

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(make_app(TEST_LIMITS), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield "127.0.0.1", port
    srv.should_exit = True
    thread.join(timeout=10)


def request(server, method: str, path: str, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection(*server, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    out = r.status, dict(r.headers), r.read()
    conn.close()
    return out


AUTH = {"Authorization": f"Bearer {KEY}"}


def raw(server, data: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send ``data`` on a socket, stall, and return what the server answered and when."""
    with socket.create_connection(server, timeout=wait_s) as s:
        t0 = time.monotonic()
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            pass
        return got, time.monotonic() - t0


def test_api_key_is_needed_except_for_the_page_and_health(server):
    assert request(server, "GET", "/healthz")[0] == 200
    status, headers, body = request(server, "POST", "/v1/images", b"{}")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert json.loads(body)["field"] == "authorization"
    wrong = {"Authorization": "Bearer nope"}
    status, _, body = request(server, "POST", "/v1/images", b"{}", wrong)
    assert status == 401 and "not valid" in json.loads(body)["error"]
    assert request(server, "POST", "/v1/images", b"{}", AUTH)[0] == 200
    import openai

    base = f"http://{server[0]}:{server[1]}/v1"
    with pytest.raises(openai.AuthenticationError) as e:  # OpenAI's error shape
        openai.OpenAI(base_url=base, api_key="nope", max_retries=0).models.list()
    assert e.value.code == "invalid_api_key"
    assert openai.OpenAI(base_url=base, api_key=KEY, max_retries=0).models.list().data[0].id == "m"


def test_docs_are_off_unless_asked(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        status, _, body = request(server, "GET", path, headers=AUTH)
        assert status == 404 and b"docs=true" in body, path
    from fastapi.testclient import TestClient

    with TestClient(make_app(HTTPLimits(docs=True))) as client:
        assert client.get("/docs").status_code == 200
        assert client.get("/openapi.json").json()["paths"]


def test_oversized_body_is_refused_before_it_is_read(server):
    status, _, body = request(server, "POST", "/v1/images", b"x" * 2049, AUTH)
    assert status == 413 and json.loads(body)["error"].startswith("body: 2049 bytes")
    # announced 10 MB, nothing sent: answered from the headers at once
    head = f"POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    got, took = raw(server, (head + "Content-Length: 10000000\r\n\r\n").encode(), wait_s=5)
    assert got.startswith(b"HTTP/1.1 413") and took < 4, (got, took)
    # chunked, no length: refused once the bytes read pass the limit
    chunked = head + "Transfer-Encoding: chunked\r\n\r\n" + "800\r\n" + "x" * 2048 + "\r\n"
    got, _ = raw(server, (chunked + "10\r\n" + "y" * 16 + "\r\n").encode(), wait_s=5)
    assert got.startswith(b"HTTP/1.1 413") and b"more than 2048 bytes" in got


def test_slow_client_and_slow_answer_time_out(server):
    head = f"POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    got, took = raw(server, (head + "Content-Length: 100\r\n\r\n" + "x" * 10).encode(), wait_s=8)
    assert got.startswith(b"HTTP/1.1 408"), got
    assert b"10 bytes arrived" in got and 0.9 <= took < 6, took
    t0 = time.monotonic()
    status, _, body = request(server, "GET", "/slow", headers=AUTH)
    assert status == 504 and "request_timeout_s" in json.loads(body)["error"]
    assert 1.9 <= time.monotonic() - t0 < 10


def test_api_key_env_must_name_a_set_variable():
    with pytest.raises(ValueError, match="api_key_env: the environment variable NITRO_NOPE"):
        HTTPLimits.of(LimitArgs(api_key_env="NITRO_NOPE"), {})
    lim = HTTPLimits.of(LimitArgs(api_key_env="K"), {"K": KEY})
    assert KEY not in repr(lim) and len(lim.api_key_sha256) == 64  # only the digest travels
