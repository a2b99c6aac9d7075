"""Storage faults (issue 17): reads, uploads and downloads through a fault-injecting proxy in
front of the S3 server (dropped connections mid-body, 503 SlowDown, stalls past the read
timeout) give what a fault-free run gives; storage that stays down is an error naming the URL,
never a shard counted as corrupt; a full disk during a checkpoint keeps the previous one."""

from __future__ import annotations

import errno

import fsspec
import pytest
import torch
from fault_proxy import FaultProxy
from safetensors.torch import load_file

from nitro_dist import checkpoint_layout as layout
from nitro_dist import retry
from nitro_dist.checkpoint import DiskFullError
from nitro_dist.data.loader import ShardLoader
from nitro_dist.data.shards import BadData, DataError, list_shards, read_shard
from nitro_dist.data.write_shards import digits_prompts, write_prompt_shards

SHARDS = "s3://nitro-test/faults/prompts"
# a window longer than s3fs's own 5 tries: only nitro_dist's retries get through it
OUTAGE = {n: "drop" for n in range(2, 9)} | {10: "503", 11: "stall", 13: "drop", 16: "503"}


@pytest.fixture(scope="module")
def shards(s3_endpoint):
    write_prompt_shards(digits_prompts(96), SHARDS, shard_size=16, progress=False)
    return SHARDS


@pytest.fixture
def proxy(s3_endpoint):
    """s3fs pointed at the proxy (fsspec's config: every S3FileSystem made meanwhile), with a
    1 s read timeout and botocore's own retries off, so the faults reach the layers under test
    quickly; nitro_dist's policy with short waits."""
    p = FaultProxy(s3_endpoint, stall_s=2.0).start()
    import s3fs

    saved_conf, saved_policy = fsspec.config.conf.get("s3"), retry.current()
    fsspec.config.conf["s3"] = {
        "client_kwargs": {"endpoint_url": p.url},
        "config_kwargs": {"read_timeout": 1, "connect_timeout": 1, "retries": {"max_attempts": 1}},
    }
    s3fs.S3FileSystem.clear_instance_cache()
    retry.configure(retry.RetryPolicy(retries=8, max_s=60.0))
    try:
        yield p
    finally:
        p.stop()
        retry.configure(saved_policy)
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        s3fs.S3FileSystem.clear_instance_cache()


def stream(spec: str, batches: int = 9) -> tuple[list[str], ShardLoader]:
    """Two epochs' keys of the loader (in-process reading), in order."""
    loader = ShardLoader(list_shards(spec), seed=0, rank=0, world_size=1, num_workers=0)
    loader.buffer = 8
    return [s.key for _ in range(batches) for s in loader.next_batch(20)], loader


def test_transient_and_permanent_errors_are_told_apart():
    from botocore.exceptions import ClientError, ReadTimeoutError

    def client_error(status: int, code: str) -> ClientError:
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )

    transient = [
        ConnectionResetError(errno.ECONNRESET, "reset"),
        TimeoutError("stalled"),
        ReadTimeoutError(endpoint_url="http://x"),
        client_error(503, "SlowDown"),
        client_error(500, "InternalError"),
        client_error(429, "TooManyRequests"),
        client_error(400, "Throttling"),
        OSError(errno.EBUSY, "SlowDown"),  # s3fs's translation of a 503
    ]
    permanent = [
        FileNotFoundError("s3://b/k"),
        PermissionError("denied"),
        client_error(404, "NoSuchKey"),
        client_error(403, "AccessDenied"),
        ValueError("checksum differs"),
        OSError(errno.ENOSPC, "No space left on device"),
    ]
    assert [retry.is_transient(e) for e in transient] == [True] * len(transient)
    assert [retry.is_transient(e) for e in permanent] == [False] * len(permanent)
    # bounded: a transient error that persists ends in StorageError naming the call
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    with pytest.raises(retry.StorageError, match="shard s3://b/x: .* after 3 attempts"):
        retry.call(flaky, "shard s3://b/x", retry.RetryPolicy(retries=2, max_s=5))
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(retry.StorageError, match="after 1 attempts"):  # no time left to wait
        retry.call(flaky, "shard s3://b/x", retry.RetryPolicy(retries=9, max_s=0.0))
    calls.clear()
    with pytest.raises(FileNotFoundError):  # permanent: raised at once
        retry.call(lambda: calls.append(1) or open("/nonexistent/x"), "f")
    assert len(calls) == 1


@pytest.mark.slow  # 6-10 s on 2 busy cores: make test, not test-fast
def test_sample_stream_through_faults_equals_the_fault_free_stream(shards, proxy):
    want, clean = stream(shards)
    proxy.arm(OUTAGE, methods=("GET",))
    got, faulty = stream(shards)
    assert {k for _, k, _, _ in proxy.injected} == {"drop", "503", "stall"}
    assert got == want  # same samples, same order
    assert faulty.metrics() == clean.metrics()
    assert faulty.metrics()["data_corrupt_shards"] == 0


@pytest.mark.slow  # 6-10 s on 2 busy cores: make test, not test-fast
def test_storage_that_stays_down_is_an_error_naming_the_url(shards, proxy):
    url = list_shards(shards).urls[0]
    retry.configure(retry.RetryPolicy(retries=1, max_s=10.0))
    proxy.arm({n: "drop" for n in range(20)}, methods=("GET",))  # longer than 2 x 5 tries
    bad = BadData()
    with pytest.raises(DataError, match=f"shard {url}: unreadable, .*after 2 attempts"):
        list(read_shard(url, bad))
    assert bad.corrupt_shards == 0  # not counted as bad data: the stream does not shrink
    proxy.arm({})
    assert len(list(read_shard(url, BadData()))) == 16  # the shard itself is fine


@pytest.mark.slow  # two short training runs (~35 s on 2 cores)
@pytest.mark.drill
def test_training_through_faults_ends_with_the_fault_free_weights(
    shards, proxy, tiny_cfg, tmp_path
):
    """Two short in-process runs reading S3 shards; each uploads its run (checkpoints, metrics)
    to S3 and its newest checkpoint is downloaded back (``remote.sync_dir``, ``open_checkpoint``):
    the run under faults on every kind of request ends with the fault-free weights."""
    from nitro_dist import remote
    from nitro_dist.loop import train

    cfg = tiny_cfg(
        "data.source=shards",
        f"data.shards={shards}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "train.iterations=3",
        "train.checkpoint_every=2",
        "storage.retries=8",
    )
    weights = []
    for name, plan in (("clean", {}), ("faulty", OUTAGE | {20: "drop", 24: "503", 30: "drop"})):
        remote.CACHE = tmp_path / name / "cache"
        proxy.arm(plan)  # every method: reads, listings, uploads, downloads
        train(cfg, tmp_path / name / "run")
        url = f"s3://nitro-test/faults/runs/{name}"
        remote.sync_dir(tmp_path / name / "run", url)
        local = remote.open_checkpoint(f"{url}/checkpoints")
        assert not layout.verify(local, parts=layout.INFERENCE_PARTS)
        weights.append(load_file(str(local / "generator" / "diffusion_pytorch_model.safetensors")))
        if plan:
            kinds = {k for _, k, _, _ in proxy.injected}
            methods = {m for _, _, m, _ in proxy.injected}
            assert kinds == {"drop", "503", "stall"} and {"GET", "PUT"} <= methods
    clean, faulty = weights
    assert clean.keys() == faulty.keys()
    assert all(torch.equal(clean[k], faulty[k]) for k in clean)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_cfg, tmp_path):
    from nitro_dist.loop import train

    cfg = tiny_cfg(
        "train.iterations=4", "train.checkpoint_every=1", "distributed.disk_full_at_iteration=2"
    )
    root = tmp_path / "run" / "checkpoints"
    with pytest.raises(DiskFullError) as got:
        train(cfg, tmp_path / "run")
    msg = str(got.value)
    assert "disk full while writing" in msg and str(root) in msg
    assert f"the previous checkpoint {root / 'iter_000001'} is intact" in msg
    assert got.value.errno == errno.ENOSPC
    assert sorted(p.name for p in root.iterdir()) == ["iter_000001", "latest"]  # no half copy
    assert layout.verify(root / "iter_000001") == []
    assert layout.latest(root) == root / "iter_000001"
