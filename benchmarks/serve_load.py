"""Load test of the Ray Serve app on loopback: latency percentiles and images/s for 1 vs 4 steps,
Serve batching on vs off at a fixed concurrency, and Serve's overhead over calling the sampler
directly (the same Generator + PNG encoding a replica runs, in this process, one thread).

  python benchmarks/serve_load.py [--checkpoint runs/digits] [--requests 160] [--concurrency 8]

Bounded: every phase stops after --requests requests or --phase-timeout seconds. Without a
checkpoint (no runs/digits yet) it makes a 2-iteration digits checkpoint in a temp folder first.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PROMPTS = [f"a handwritten digit {w}" for w in "zero one two three four five six seven".split()]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(lat_s: list[float], wall_s: float, images: int) -> dict:
    return {
        "n": len(lat_s),
        "p50_ms": 1000 * pct(lat_s, 50),
        "p95_ms": 1000 * pct(lat_s, 95),
        "p99_ms": 1000 * pct(lat_s, 99),
        "images_per_s": images / wall_s,
    }


def checkpoint_or_make(path: str | None) -> str:
    from nitro_dist import checkpoint_layout as ckpt

    try:
        return str(ckpt.resolve(path or "runs/digits").resolve())
    except ValueError:
        if path:
            raise
    from nitro_dist.config import load_config
    from nitro_dist.loop import train

    out = Path(tempfile.mkdtemp(prefix="serve_load_"))
    print(f"no runs/digits checkpoint: training a 2-iteration one in {out}", flush=True)
    keys = "train.iterations=2 train.eval_every=0 train.sample_every=0 train.checkpoint_every=0"
    cfg = load_config("digits", keys.split() + ["logging.wandb=false", "logging.progress=false"])
    train(cfg, out)
    return str(ckpt.resolve(out))


def direct(checkpoint: str, steps: int, n: int, batch: int) -> dict:
    """The replica's work in this process: generate + PNG-encode, ``batch`` requests per call."""
    import torch

    from nitro_dist.image_api import Job, run_jobs
    from nitro_dist.inference import Generator

    torch.set_num_threads(1)  # a CPU replica gets one thread (fractional num_cpus)
    gen = Generator.from_checkpoint(checkpoint)
    jobs = [Job(PROMPTS[i % 8], steps, i, 1, gen.native_size, gen.native_size) for i in range(n)]
    run_jobs(gen, jobs[:batch])  # warm-up
    lat, t0 = [], time.perf_counter()
    for i in range(0, n, batch):
        t = time.perf_counter()
        run_jobs(gen, jobs[i : i + batch])
        lat.append(time.perf_counter() - t)
    return {**summary(lat, time.perf_counter() - t0, n), "mean_batch": float(batch)}


def load(port: int, prefix: str, steps: int, n: int, conc: int, timeout: float) -> dict:
    """``n`` requests from ``conc`` keep-alive clients; latency per request, images/s overall."""
    lat: list[float] = []
    batch: list[int] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    counter = iter(range(n))
    deadline = time.monotonic() + timeout

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body = json.dumps({"prompt": PROMPTS[i % 8], "steps": steps, "seed": i})
            t = time.perf_counter()
            conn.request("POST", f"{prefix}/v1/images", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            dt = time.perf_counter() - t
            with lock:
                codes[r.status] = codes.get(r.status, 0) + 1
                if r.status == 200:
                    lat.append(dt)
                    batch.append(int(r.getheader("X-Batch-Images", "1")))
        conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        for f in [pool.submit(client) for _ in range(conc)]:
            f.result()
    out = summary(lat, time.perf_counter() - t0, len(lat))
    out["status"] = codes
    out["mean_batch"] = statistics.fmean(batch) if batch else 0.0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--phase-timeout", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.md"))
    args = ap.parse_args()
    checkpoint = checkpoint_or_make(args.checkpoint)

    import ray
    from ray import serve

    from nitro_dist.serve import app

    rows: list[tuple[str, dict]] = []
    n, conc = args.requests, args.concurrency
    for steps in (1, 4):
        rows.append((f"direct, {steps} step, 1 request per call", direct(checkpoint, steps, n, 1)))
        rows.append(
            (f"direct, {steps} step, {conc} requests per call", direct(checkpoint, steps, n, conc))
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"checkpoint": checkpoint, "device": "cpu", "batch_wait_ms": args.batch_wait_ms}
        apps = {"on": args.max_batch_size, "off": 1}
        for name, mbs in apps.items():
            serve.run(
                app({**common, "max_batch_size": mbs, "max_queued_requests": 4 * n}),
                name=name,
                route_prefix=f"/{name}",
            )
        for steps in (1, 4):
            for name in apps:
                load(port, f"/{name}", steps, 2 * conc, conc, args.phase_timeout)  # warm-up
                res = load(port, f"/{name}", steps, n, conc, args.phase_timeout)
                rows.append((f"Serve, {steps} step, batching {name}, {conc} concurrent", res))
                print(rows[-1], flush=True)
            res = load(port, "/off", steps, n // 2, 1, args.phase_timeout)
            rows.append((f"Serve, {steps} step, batching off, 1 client", res))
    finally:
        serve.shutdown()
        ray.shutdown()

    by = dict(rows)
    lines = [
        f"# Serve load test (digits generator, CPU: {os.cpu_count()} cores, loopback)",
        "",
        f"checkpoint `{checkpoint}`; {n} requests per phase, 1 image each; Serve: one generator "
        f"replica (0.5 CPU, 1 torch thread), max_batch_size {args.max_batch_size}, "
        f"batch_wait_ms {args.batch_wait_ms}; direct: the replica's work (generate + PNG) in "
        "this process, 1 thread.",
        "",
        "| phase | p50 ms | p95 ms | p99 ms | images/s | images per model call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['images_per_s']:.1f} | {r['mean_batch']:.1f} |"
        )
    lines.append("")
    for steps in (1, 4):
        on = by[f"Serve, {steps} step, batching on, {conc} concurrent"]["images_per_s"]
        off = by[f"Serve, {steps} step, batching off, {conc} concurrent"]["images_per_s"]
        serve1 = by[f"Serve, {steps} step, batching off, 1 client"]["p50_ms"]
        d1 = by[f"direct, {steps} step, 1 request per call"]["p50_ms"]
        lines.append(
            f"- {steps} step: batching on/off throughput at {conc} concurrent = "
            f"{on / off:.2f}x; Serve p50 (1 client) {serve1:.1f} ms vs direct {d1:.1f} ms: "
            f"overhead {serve1 - d1:.1f} ms = {100 * (serve1 / d1 - 1):.0f}% of the direct call"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    print(json.dumps(rows, indent=1), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
