"""Draw as you type, without a browser or Ray: the per-connection newest-wins slot, the served
models list / unknown model answers, and the WebSocket protocol over serve.py's own routes
(``local_app``: image_app.ImageApp's routes over in-process models)."""

import asyncio
import json

import pytest

from nitro_dist.live import LatestSlot
from nitro_dist.served_model import parse_models, parse_sizes


def test_latest_slot_keeps_the_newest_and_counts_the_dropped():
    async def run() -> None:
        slot: LatestSlot[str] = LatestSlot()
        slot.put("a")
        slot.put("a h")
        slot.put("a ha")  # two never taken: dropped
        assert await slot.take() == "a ha"
        assert (slot.dropped, slot.taken) == (2, 1)
        waiter = asyncio.create_task(slot.take())
        await asyncio.sleep(0)
        assert not waiter.done()  # nothing waiting: take waits
        slot.put("b")
        assert await waiter == "b" and slot.dropped == 2
        slot.put("c")
        slot.close()
        assert await slot.take() == "c"  # closing keeps what is waiting
        assert await slot.take() is None
        with pytest.raises(RuntimeError):
            slot.put("d")

    asyncio.run(run())


def test_models_and_sizes_arguments_parse_or_name_the_problem():
    assert parse_models("a=runs/a, b=s3://x/b") == {"a": "runs/a", "b": "s3://x/b"}
    assert list(parse_models('{"z": "p", "a": "q"}')) == ["z", "a"]  # order: z is the default
    assert parse_models({"m": "p"}) == {"m": "p"}
    for bad, msg in [("a", "not NAME=CHECKPOINT"), ("a=x,a=y", "given twice"), ("a=", "non-empty")]:
        with pytest.raises(ValueError, match=f"models: .*{msg}"):
            parse_models(bad)
    assert parse_sizes("16x8, 8x8") == [(8, 16), (8, 8)]
    with pytest.raises(ValueError, match="sizes: '8by8'"):
        parse_sizes("8by8")


def test_models_argument_excludes_checkpoint(tmp_path):
    from nitro_dist.serve import AppArgs, served_models

    with pytest.raises(ValueError, match="models: give either"):
        served_models(AppArgs(models="a=x", checkpoint="y"))
    with pytest.raises(ValueError, match="models: a: checkpoint: no checkpoint found"):
        served_models(AppArgs(models=f"a={tmp_path}"))


@pytest.mark.slow
def test_two_models_newest_prompt_wins_over_the_websocket(short_digits_run):
    """serve.py's routes over two models: both listed (healthz, /v1/models), chosen per request
    by ``model`` (different weights, different images), an unknown one a 4xx listing them; a
    burst of prompts on /v1/live ends with the last prompt's image, equal to /v1/images'."""
    import torch
    from fastapi.testclient import TestClient

    from nitro_dist.local_app import local_api
    from nitro_dist.serve import resolve_checkpoint
    from nitro_dist.served_model import load_model

    ckpt = resolve_checkpoint(str(short_digits_run))
    a = load_model("digits", ckpt, device="cpu", dtype="fp32")
    b = load_model("dimmer", ckpt, device="cpu", dtype="fp32")
    with torch.no_grad():
        for p in b.gen.unet.parameters():
            p.mul_(0.9)
    client = TestClient(local_api({"digits": a, "dimmer": b}))
    health = client.get("/healthz").json()
    assert health["models"] == ["digits", "dimmer"] and health["model"] == "digits"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["digits", "dimmer"]
    assert client.get("/v1/models/dimmer").json()["id"] == "dimmer"
    req = {"prompt": "a handwritten digit one", "seed": 3}
    first = client.post("/v1/images", json=req).json()["images"]
    assert client.post("/v1/images", json={**req, "model": "digits"}).json()["images"] == first
    assert client.post("/v1/images", json={**req, "model": "dimmer"}).json()["images"] != first
    bad = client.post("/v1/images", json={**req, "model": "sdxl"})
    assert bad.status_code == 422 and bad.json()["field"] == "model"
    assert "digits, dimmer" in bad.json()["error"]
    oa = client.post("/v1/images/generations", json={**req, "model": "sdxl"})
    assert oa.status_code == 404 and "digits, dimmer" in oa.json()["error"]["message"]
    oa = client.post("/v1/images/generations", json={**req, "model": "dimmer"})
    dimmer = client.post("/v1/images", json={**req, "model": "dimmer"}).json()["images"]
    assert oa.status_code == 200 and [d["b64_json"] for d in oa.json()["data"]] == dimmer
    prompt = req["prompt"]
    with client.websocket_connect("/v1/live") as ws:
        ws.send_text(json.dumps({"id": 1, "prompt": "", "seed": 3}))
        assert ws.receive_json()["field"] == "prompt"  # a bad message: an error, no image
        for i in range(1, len(prompt) + 1):
            ws.send_text(json.dumps({"id": i, "prompt": prompt[:i], "seed": 3}))
        got = []
        while not got or got[-1]["id"] != len(prompt):
            got.append(ws.receive_json())
    ids = [m["id"] for m in got]
    assert ids == sorted(ids) and got[-1]["prompt"] == prompt
    assert got[-1]["image"] == first[0]
    live = client.get("/healthz").json()["live"]
    assert live["requests"] == len(prompt) and live["images"] == len(got)
    assert live["dropped"] == len(prompt) - len(got) == got[-1]["dropped"]
