"""Load test of the Ray Serve app on loopback, side by side with the plain alternative a user
would write instead: the same routes and model in one uvicorn process, no Ray, one model call at
a time (``nitro_dist.local_app``: the app's routes, ``image_app.ImageApp``, over an in-process
model).

Per step count: p50/p99 latency at 1 client and images/s at 8 and 32 clients (``--clients``) for
the plain server and for Serve with batching on and off; the replica's work called directly
(Generator + PNG encoding in this process); and the hops of a Serve request taken apart at
1 client: the deployment's handle called from this process (actor hop, no HTTP), then HTTP via
Serve's proxy into the same replica's FastAPI routes, then the batching wait. The Serve app is
one deployment (``Generator``: the routes and the model in one replica).

  python benchmarks/serve_load.py [--checkpoint runs/digits] [--requests 160] [--clients 8,32]

Both servers are up together and their phases interleaved (direct, plain, Serve at each step
count and concurrency), so a drifting load on a shared machine hits both alike; at 1 client the
servers take turns request by request (one client sends request i to the plain server, then to
each Serve app and the handle), so the 1-client ratios compare latencies under the same load,
not the different stretches of a drifting load that phases run one after another see. The table
gives the 1-minute load average at the end of each phase. Both servers compute on one torch thread
(a CPU replica gets 0.5 CPU = 1 thread; the plain server is started with OMP_NUM_THREADS=1), so
the comparison is of the serving path, not of the thread count. Bounded: every phase stops
after --requests requests or --phase-timeout seconds. Without a checkpoint (no runs/digits yet)
it makes a 2-iteration digits checkpoint in a temp folder first.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Ray Serve settings of the local cluster this script starts (its processes inherit this
# environment), from --serve-env KEY=VALUE and --direct-ingress; none by default. The replica's
# own setting (user code on its main loop) is the app's default (``nitro_dist.serve.REPLICA_ENV``).
SERVE_ENV: dict[str, str] = {}

PROMPTS = [f"a handwritten digit {w}" for w in "zero one two three four five six seven".split()]
ROOT = Path(__file__).resolve().parent.parent


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def plain_server(checkpoint: str, timeout: float = 180.0) -> Iterator[int]:
    """The plain anchor: ``python -m nitro_dist.local_app`` (uvicorn, one process, no Ray, no
    batching: one model call at a time) on a free loopback port, one torch thread; yields the
    port once /healthz answers 200, stops the process after."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "nitro_dist.local_app", "--checkpoint", checkpoint]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"plain server exited with {proc.returncode}:\n{tail}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"plain server not healthy on port {port} after {timeout} s")
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def http_client(port: int, prefix: str, steps: int) -> Callable[[], Callable[[int], tuple]]:
    """Per client thread: a keep-alive connection; each call POSTs /v1/images (1 image) and
    answers (status, images in the model call that served it)."""

    def make() -> Callable[[int], tuple]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def one(i: int) -> tuple[int, int]:
            body = json.dumps({"prompt": PROMPTS[i % 8], "steps": steps, "seed": i})
            conn.request("POST", f"{prefix}/v1/images", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            return r.status, int(r.getheader("X-Batch-Images", "1"))

        return one

    return make


class Tally:
    """One server's answers in a phase: status counts; latency and model-call size of the 200s."""

    def __init__(self) -> None:
        self.lat: list[float] = []
        self.batch: list[int] = []
        self.codes: dict[int, int] = {}

    def add(self, status: int, images: int, seconds: float) -> None:
        self.codes[status] = self.codes.get(status, 0) + 1
        if status == 200:
            self.lat.append(seconds)
            self.batch.append(images)

    def result(self, wall_s: float) -> dict:
        """``summary`` of the answered requests over ``wall_s`` (NaN figures when none was)."""
        out = summary(self.lat, wall_s, len(self.lat)) if self.lat else summary([math.nan], 1.0, 0)
        out["status"] = self.codes
        out["mean_batch"] = statistics.fmean(self.batch) if self.batch else 0.0
        return out


def timed(one: Callable[[int], tuple], i: int) -> tuple[int, int, float]:
    t = time.perf_counter()
    status, images = one(i)
    return status, images, time.perf_counter() - t


def load(make: Callable[[], Callable[[int], tuple]], n: int, conc: int, timeout: float) -> dict:
    """``n`` requests from ``conc`` clients (``make()`` gives each its request function);
    latency per request, images/s overall."""
    tally = Tally()
    lock = threading.Lock()
    counter = iter(range(n))
    deadline = time.monotonic() + timeout

    def client() -> None:
        one = make()
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            answer = timed(one, i)
            with lock:
                tally.add(*answer)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        for f in [pool.submit(client) for _ in range(conc)]:
            f.result()
    return tally.result(time.perf_counter() - t0)


def load_interleaved(
    makes: dict[str, Callable[[], Callable[[int], tuple]]], n: int, timeout: float
) -> dict[str, dict]:
    """One client that sends request i to every server in turn (i = 0..n-1), so each server's
    1-client latency is measured under the same load: on a shared machine the load drifts over a
    phase, and phases run one after another would each see a different part of the drift.
    Images/s here is per server: its own requests over its own busy time."""
    ones = {label: make() for label, make in makes.items()}
    tallies = {label: Tally() for label in makes}
    deadline = time.monotonic() + timeout
    for i in range(n):
        if time.monotonic() > deadline:
            break
        for label, one in ones.items():
            tallies[label].add(*timed(one, i))
    return {label: t.result(sum(t.lat)) for label, t in tallies.items()}


def direct_ingress_ports(apps: list[str], timeout: float = 60.0) -> dict[str, int]:
    """{app: port} of the replicas' own HTTP servers under Serve's direct ingress
    (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``: each ingress replica listens on a port of 30000-31000
    that the controller allocates, and answers ``/-/routes`` with its route prefix and app)."""
    found: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for port in range(30000, 30064):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/-/routes")
                r = conn.getresponse()
                if r.status == 200:
                    found.update({name: port for name in json.loads(r.read()).values()})
            except (OSError, ValueError):
                continue
        if set(apps) <= set(found):
            return found
        time.sleep(1)
    raise TimeoutError(f"direct ingress: no replica port for {set(apps) - set(found)} found")


def handle_client(handle: Any, steps: int, size: int) -> Callable[[], Callable[[int], tuple]]:
    """The deployment's handle (``ImageServer.generate``) called from this process: Serve's
    actor hop and the replica's batch queue, without HTTP, the proxy or FastAPI."""
    from nitro_dist.image_api import Job

    def make() -> Callable[[int], tuple]:
        def one(i: int) -> tuple[int, int]:
            job = Job(PROMPTS[i % 8], steps, i, 1, size, size)
            return 200, handle.generate.remote(job).result().batch_images

        return one

    return make


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--clients", default="8,32", help="concurrent clients of the load phases")
    ap.add_argument("--steps", default="1,4", help="sampling steps, comma-separated")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=0.0)
    ap.add_argument("--phase-timeout", type=float, default=120.0)
    ap.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Ray Serve environment setting of the local cluster (e.g. "
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0); repeatable",
    )
    ap.add_argument(
        "--direct-ingress",
        action="store_true",
        help="RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (experimental in Ray): the replica takes HTTP on "
        "a port of its own; adds rows of clients sent there, past Serve's proxy",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.md"))
    args = ap.parse_args()
    # this checkout's nitro_dist, here and in the Ray workers this script starts (not another
    # checkout's installed in the environment: a worktree's would be measured with main's code)
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.getenv("PYTHONPATH")]))
    for kv in args.serve_env:
        key, sep, value = kv.partition("=")
        if not sep or not key.startswith("RAY_SERVE_"):
            ap.error(f"--serve-env: {kv!r} is not RAY_SERVE_...=VALUE")
        SERVE_ENV[key] = value
    if args.direct_ingress:
        SERVE_ENV["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    os.environ.update(SERVE_ENV)  # before Ray starts: its processes inherit it
    clients = [int(c) for c in args.clients.split(",")]
    steps_list = [int(c) for c in args.steps.split(",")]
    checkpoint = checkpoint_or_make(args.checkpoint)
    load_before = os.getloadavg()

    rows: list[tuple[str, dict]] = []
    n, top = args.requests, max(clients)

    def phase(name: str, res: dict) -> None:
        res["load1"] = os.getloadavg()[0]  # the machine's 1-minute load at the phase's end
        rows.append((name, res))
        print(name, res, flush=True)

    import ray
    from ray import serve

    from nitro_dist.inference import Generator
    from nitro_dist.serve import app

    size = Generator.from_checkpoint(checkpoint).native_size
    port = free_port()
    # both servers up together and their phases interleaved (direct, plain, Serve at each step
    # count and concurrency): on a shared machine the load drifts, and it then drifts for both
    with plain_server(checkpoint) as plain_port:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            common = {
                "checkpoint": checkpoint,
                "device": "cpu",
                "batch_wait_ms": args.batch_wait_ms,
            }
            apps = {"on": args.max_batch_size, "off": 1}
            for name, mbs in apps.items():
                serve.run(
                    app({**common, "max_batch_size": mbs, "max_queued_requests": 4 * n}),
                    name=name,
                    route_prefix=f"/{name}",
                )
            for steps in steps_list:
                phase(f"direct, {steps} step, 1 request per call", direct(checkpoint, steps, n, 1))
                phase(
                    f"direct, {steps} step, {clients[0]} requests per call",
                    direct(checkpoint, steps, n, clients[0]),
                )
                servers = {f"plain, {steps} step": http_client(plain_port, "", steps)}
                for name in apps:
                    servers[f"Serve, {steps} step, batching {name}"] = http_client(
                        port, f"/{name}", steps
                    )
                if args.direct_ingress:
                    di_port = direct_ingress_ports(["on"])["on"]
                    servers[f"Serve direct ingress, {steps} step, batching on"] = http_client(
                        di_port, "/on", steps
                    )
                for make in servers.values():
                    load(make, 2 * top, top, args.phase_timeout)  # warm-up
                handle = serve.get_deployment_handle("Generator", app_name="off")
                via_handle = handle_client(handle, steps, size)
                load(via_handle, 8, 1, args.phase_timeout)  # warm-up
                # 1 client: the servers (and the handle) take turns request by request, so the
                # ratios compare latencies under the same load; more clients: a phase each
                one_client = {f"{label}, 1 clients": make for label, make in servers.items()}
                one_client[f"Serve handle (no HTTP), {steps} step, batching off, 1 client"] = (
                    via_handle
                )
                for label, res in load_interleaved(one_client, n, 4 * args.phase_timeout).items():
                    phase(label, res)
                for c in clients:
                    for label, make in servers.items():
                        phase(f"{label}, {c} clients", load(make, n, c, args.phase_timeout))
        finally:
            serve.shutdown()
            ray.shutdown()

    text = report(rows, args, checkpoint, steps_list, clients, load_before)
    print(text)
    print(json.dumps(rows, indent=1), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


def replica_env() -> dict[str, str]:
    from nitro_dist.serve import REPLICA_ENV

    return REPLICA_ENV


def report(
    rows: list[tuple[str, dict]],
    args: argparse.Namespace,
    checkpoint: str,
    steps_list: list[int],
    clients: list[int],
    load_before: tuple[float, float, float],
) -> str:
    by = dict(rows)
    load_after = os.getloadavg()
    lines = [
        f"# Serve load test vs a plain uvicorn server (digits generator, CPU: {os.cpu_count()} "
        "cores, loopback)",
        "",
        f"checkpoint `{checkpoint}`; {args.requests} requests per phase, 1 image each; "
        "1-minute load average before/after the run "
        f"{load_before[0]:.1f}/{load_after[0]:.1f} (other jobs share the machine). "
        f"Serve: one generator replica (0.5 CPU, 1 torch thread), max_batch_size "
        f"{args.max_batch_size}, batch_wait_ms {args.batch_wait_ms}, one deployment (HTTP "
        "routes and model in one replica, behind Serve's proxy); Serve settings: "
        f"{', '.join(f'`{k}={v}`' for k, v in sorted({**SERVE_ENV, **replica_env()}.items()))}. "
        "plain: `python -m nitro_dist.local_app` (the same routes under uvicorn, one process, "
        "no Ray, one model call at a time, 1 torch thread). direct: the replica's work "
        "(generate + PNG) in this process, 1 thread. The 1-client rows are measured "
        "interleaved: one client sends each request to every server in turn, so all of them see "
        "the same load.",
        "",
        "| phase | p50 ms | p95 ms | p99 ms | images/s | images per model call | load |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['images_per_s']:.1f} | {r['mean_batch']:.1f} | {r['load1']:.1f} |"
        )
    lines.append("")
    for s in steps_list:
        d1 = by[f"direct, {s} step, 1 request per call"]["p50_ms"]
        plain1 = by[f"plain, {s} step, 1 clients"]
        on1 = by[f"Serve, {s} step, batching on, 1 clients"]
        off1 = by[f"Serve, {s} step, batching off, 1 clients"]
        h1 = by[f"Serve handle (no HTTP), {s} step, batching off, 1 client"]["p50_ms"]
        for label, r in (("batching on", on1), ("batching off", off1)):
            lines.append(
                f"- {s} step, 1 client, Serve ({label}) vs plain: p50 {r['p50_ms']:.1f} vs "
                f"{plain1['p50_ms']:.1f} ms = {r['p50_ms'] / plain1['p50_ms']:.2f}x, p99 "
                f"{r['p99_ms']:.1f} vs {plain1['p99_ms']:.1f} ms = "
                f"{r['p99_ms'] / plain1['p99_ms']:.2f}x (target <= 1.5x); added over the direct "
                f"call ({d1:.1f} ms): {r['p50_ms'] - d1:.1f} vs {plain1['p50_ms'] - d1:.1f} ms"
            )
        for c in clients:
            on = by[f"Serve, {s} step, batching on, {c} clients"]["images_per_s"]
            p = by[f"plain, {s} step, {c} clients"]["images_per_s"]
            lines.append(
                f"- {s} step, {c} clients: Serve (batching on) {on:.1f} images/s vs plain "
                f"{p:.1f} = {on / p:.2f}x (target > 1)"
            )
            if (
                di := by.get(f"Serve direct ingress, {s} step, batching on, {c} clients")
            ) is not None:
                lines.append(
                    f"- {s} step, {c} clients, direct ingress: {di['images_per_s']:.1f} images/s "
                    f"= {di['images_per_s'] / p:.2f}x plain"
                )
        if (di1 := by.get(f"Serve direct ingress, {s} step, batching on, 1 clients")) is not None:
            lines.append(
                f"- {s} step, 1 client, direct ingress vs plain: p50 {di1['p50_ms']:.1f} vs "
                f"{plain1['p50_ms']:.1f} ms = {di1['p50_ms'] / plain1['p50_ms']:.2f}x, p99 "
                f"{di1['p99_ms'] / plain1['p99_ms']:.2f}x"
            )
        lines.append(
            f"- {s} step, where Serve's 1-client p50 goes: replica work (direct) {d1:.1f} ms; "
            f"+ actor hop via the deployment handle {h1 - d1:.1f} ms; + HTTP through Serve's "
            f"proxy and FastAPI {off1['p50_ms'] - h1:.1f} ms; + batching wait "
            f"{on1['p50_ms'] - off1['p50_ms']:.1f} ms (batching on vs off; noise when "
            f"batch_wait_ms is 0); plain's HTTP + handlers: {plain1['p50_ms'] - d1:.1f} ms"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
