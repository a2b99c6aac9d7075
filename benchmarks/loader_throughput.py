"""Loader throughput vs what training consumes, side by side in one run.

  python benchmarks/loader_throughput.py [--samples 1000] [--workers 2]

1. Writes SDXL-shaped pair shards (prompt + meta + a 4x128x128 fp16 teacher latent, 128 KiB a
   sample) to local disk and to a real S3-compatible server started here (moto's, 127.0.0.1).
2. Reads one epoch of each through the training loader (``ShardLoader``: per-rank split,
   DataLoader workers, shuffle buffer, decode to tensors): samples/s.
3. Times the digits task's training step (batch 64, single process) for its consumption rate.
Target: loader >= 10x what training consumes. Writes benchmarks/results/loader_throughput.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def write_sdxl_pairs(out: str, n: int, shard_size: int) -> None:
    from nitro_dist.data.shards import encode, join, shard_name, write_manifest, write_shard

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((4, 128, 128)).astype(np.float16)
    names, counts = [], []
    for k, start in enumerate(range(0, n, shard_size)):
        rows = range(start, min(n, start + shard_size))
        samples = (
            encode(f"{i:09d}", f"a photo of object number {i}", 1_000_000 + i, latent) for i in rows
        )
        names.append(shard_name("pairs", k))
        counts.append(write_shard(join(out, names[-1]), samples))
    write_manifest(out, names, counts)


def read_rate(spec: str, workers: int, batch: int) -> tuple[float, int]:
    from nitro_dist.data.loader import ShardLoader
    from nitro_dist.data.shards import list_shards

    loader = ShardLoader(
        list_shards(spec), seed=0, rank=0, world_size=1, num_workers=workers, shuffle_buffer=64
    )
    n = loader.epoch_length(0) // batch
    loader.next_batch(batch)  # worker start-up and the first shard are not throughput
    t0 = time.perf_counter()
    got = sum(len(loader.next_batch(batch)) for _ in range(n - 1))
    return got / (time.perf_counter() - t0), got


def digits_consumption(iters: int) -> float:

    from nitro_dist.build import build_run
    from nitro_dist.config import load_config
    from nitro_dist.step import train_step

    cfg = load_config("digits", ["logging.wandb=false"])
    run = build_run(cfg, progress=False)
    for i in range(3):
        train_step(run, i)
    t0 = time.perf_counter()
    for i in range(3, 3 + iters):
        train_step(run, i)
    return cfg.train.batch_size * iters / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(host: str, port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto server on {host}:{port} did not start in {timeout_s} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="epochs read per source (median)")
    args = ap.parse_args()

    # the S3 server in its own process, as a real one would be (not competing for this
    # process's GIL)
    host, port = "127.0.0.1", free_port()
    srv = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(host, port)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    import s3fs

    s3fs.S3FileSystem().mkdir("bench")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for where, spec in (
                ("local disk", f"{tmp}/pairs"),
                ("S3 (moto server process, loopback)", "s3://bench/pairs"),
            ):
                write_sdxl_pairs(spec, args.samples, args.shard_size)
                runs = [read_rate(spec, args.workers, args.batch) for _ in range(args.repeats)]
                rate, got = statistics.median(r for r, _ in runs), runs[0][1]
                rows.append((where, rate, got))
                print(f"{where}: {rate:.0f} samples/s ({got} samples)", flush=True)
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    consume = digits_consumption(args.train_iters)
    print(f"digits training consumes {consume:.0f} samples/s", flush=True)
    lines = [
        f"# Loader throughput (CPU, {os.cpu_count()} cores)",
        "",
        f"SDXL-shaped pair samples (prompt + meta + 4x128x128 fp16 latent), {args.samples} "
        f"samples in shards of {args.shard_size}, {args.workers} loader workers, batch "
        f"{args.batch}, median of {args.repeats} epochs; digits training: batch 64, single "
        f"process, {args.train_iters} iterations.",
        "",
        "| source | samples/s | x digits consumption | target |",
        "|---|---|---|---|",
        *(f"| {w} | {r:.0f} | {r / consume:.1f}x | >= 10x |" for w, r, _ in rows),
        f"| digits training consumption | {consume:.0f} | 1x | |",
    ]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "loader_throughput.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
