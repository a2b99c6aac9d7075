"""Chaos benchmark (issue 17): the default digits run on 2 Ray Train workers, with faults injected,
beside the same run without them.

  python benchmarks/chaos.py [--iterations N] [--eval-images 1000]

On this machine it starts a Ray cluster of four simulated nodes (``ray.cluster_utils.Cluster``:
the head, which runs no training worker, and three worker nodes with one training slot each, so
a lost node has a spare to be replaced by), an S3 server (moto's) behind the fault-injecting
proxy of tests/fault_proxy.py, and stores the runs (checkpoints, metrics) in S3. The faulty run
gets, at fractions of its length:
- a worker kill (``distributed.fail_at_iteration``: rank 1 exits abruptly at 25%),
- a NaN step (``distributed.nan_at_iterations``: rank 1's G loss at 40%),
- an S3 outage (dropped connections, 503 SlowDown, stalls on 12 requests in a row from the
  first checkpoint upload on; ``storage.retries`` absorbs them),
- a node loss (``distributed.node_loss_at_iteration``: rank 1's node leaves the cluster at 65%;
  Ray Train restarts the run on the remaining node and the spare).
Checkpoints every 10% of the run: a kill or loss between two of them redoes the iterations
since the last one.
It prints the faults injected and survived, the samples lost or trained twice in the run's
final trajectory (from the data audit, ``data.audit_dir``: every rank's samples per iteration
against the global batch the iteration draws), the iterations redone after restores, and the
final FID-digits beside the clean run's. Writes nothing else; the printed report is what
benchmarks/results/chaos.md records.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # fault_proxy: the tests' fault-injecting S3 proxy

BUCKET = "chaos"
FAULTS = {  # iteration of each injected fault, for a run of n iterations
    "kill": lambda n: round(0.25 * n),
    "nan": lambda n: round(0.4 * n),
    "node": lambda n: round(0.65 * n),
}


def start_s3() -> tuple[object, object]:
    """moto's S3 server and the fault proxy in front of it; AWS_* point every process started
    from here on (Ray's nodes and workers) at the proxy."""
    import logging

    from fault_proxy import FaultProxy
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's line per request
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    srv.start()
    host, port = srv.get_host_and_port()
    proxy = FaultProxy(f"http://{host}:{port}", stall_s=2.0).start()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": proxy.url,
        }
    )
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    return srv, proxy


def start_cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,  # the driver's Ray tasks and Train's controller; no training slot
            "object_store_memory": 256 * 2**20,
            "dashboard_host": "127.0.0.1",
            "include_dashboard": True,
        },
    )
    for _ in range(3):
        cluster.add_node(num_cpus=1, resources={"chaos_slot": 1}, object_store_memory=128 * 2**20)
    cluster.wait_for_nodes()
    cluster.connect()
    assert ray.is_initialized()
    return cluster


def overrides(name: str, args, audit: Path, faults: bool) -> list[str]:
    n = args.iterations
    every = max(1, n // 10)
    out = [
        f"run_name={name}",
        f"train.iterations={n}",
        f"train.checkpoint_every={every}",
        f"train.log_every={every}",
        "train.eval_every=0",
        "train.sample_every=0",
        f"train.eval_images={args.eval_images}",
        "train.grid_per_prompt=1",
        "distributed.num_workers=2",
        "distributed.cpus_per_worker=1",
        "distributed.resources_per_worker={chaos_slot: 1}",
        "distributed.placement_strategy=SPREAD",
        f"distributed.storage_path=s3://{BUCKET}/runs",
        "storage.retries=8",
        f"data.audit_dir={audit}",
        "logging.wandb=false",
        "logging.progress=false",
    ]
    if faults:
        out += [
            # the worker kill and the node loss; one more should the outage fail an upload that
            # Ray Train makes (it retries through s3fs and botocore, not nitro_dist's policy)
            "distributed.max_failures=3",
            "distributed.fail_rank=1",
            f"distributed.fail_at_iteration={FAULTS['kill'](n)}",
            f"distributed.nan_at_iterations=[{FAULTS['nan'](n)}]",
            f"distributed.node_loss_at_iteration={FAULTS['node'](n)}",
        ]
    return out


def audit_report(audit: Path, cfg) -> dict[str, int]:
    """The run's final trajectory from the audit rows: for every (rank, iteration) the rows of
    the last attempt that trained it (a restore replays the iterations after its checkpoint);
    against the global batch each iteration draws (a pure function of seed and iteration)."""
    from nitro_dist.build import training_prompts
    from nitro_dist.data.pairs import global_batch_indices
    from nitro_dist.tasks import task_of

    n_prompts = len(training_prompts(cfg, task_of(cfg)).prompts)
    per_rank = cfg.train.batch_size // cfg.distributed.max_workers  # fixed: 2 workers
    rows: dict[tuple[int, int], list[str]] = collections.defaultdict(list)
    for f in sorted(audit.glob("rank_*.txt")):
        rank = int(f.stem.split("_")[1])
        for line in f.read_text().splitlines():
            _, it, key = line.split()
            rows[(rank, int(it))].append(key)
    # every attempt at an iteration wrote one block of per_rank rows; the last one counts
    attempts = {
        k: [v[i : i + per_rank] for i in range(0, len(v), per_rank)] for k, v in rows.items()
    }
    lost = twice = 0
    for it in range(cfg.train.iterations):
        want = collections.Counter(
            f"task-{i}"
            for i in global_batch_indices(cfg.seed, it, n_prompts, cfg.train.batch_size).tolist()
        )
        got = collections.Counter(
            k for (r, i), blocks in attempts.items() if i == it for k in blocks[-1]
        )
        lost += sum((want - got).values())
        twice += sum((got - want).values())
    redone = sum(len(b) - 1 for b in attempts.values())
    return {"samples_lost": lost, "samples_twice": twice, "rank_iterations_redone": redone}


def train(name: str, args, work: Path, faults: bool, proxy) -> dict:
    from nitro_dist.config import load_config
    from nitro_dist.distributed.ray_train import launch

    audit = work / name / "audit"
    cfg = load_config("digits", overrides(name, args, audit, faults))
    if faults:
        # 12 requests in a row after the first checkpoint's uploads began fail: every kind
        arm_after_first_checkpoint(proxy, cfg)
    t0 = time.time()
    out = launch(cfg)
    out["seconds"] = time.time() - t0
    out.update(audit_report(audit, cfg))
    return out


def arm_after_first_checkpoint(proxy, cfg) -> None:
    """Arm the outage when the first checkpoint's upload starts (a watcher thread)."""
    import threading

    import s3fs

    first = f"{BUCKET}/runs/{cfg.run_name}/iter_{cfg.train.checkpoint_every:06d}"
    kinds = ["drop", "503", "stall"]

    def watch() -> None:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        while True:
            fs.invalidate_cache()
            try:
                if fs.exists(first):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        proxy.arm({n: kinds[n % 3] for n in range(12)})

    threading.Thread(target=watch, daemon=True).start()


def faults_report(run_url: str, proxy, out: dict, cfg_its: dict[str, int]) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    path = run_url.split("://", 1)[1]
    marks = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{path}/faults"))
    rows = [json.loads(x) for x in fs.cat(f"{path}/metrics.jsonl").splitlines()]
    skipped = max((m.get("skipped_steps", 0) for m in rows), default=0)
    outage = collections.Counter(k for _, k, _, _ in proxy.injected)
    finished = out.get("iteration") == cfg_its["iterations"]
    lines = [
        f"- worker kill at iteration {cfg_its['kill']}: "
        f"{'injected' if any(m.startswith('injected_at') for m in marks) else 'NOT injected'}"
        f", {'survived' if finished else 'NOT survived'} (Ray Train restarted the worker group)",
        f"- NaN step at iteration {cfg_its['nan']}: skipped steps counted {skipped}"
        f" (the step changed nothing), {'survived' if finished else 'NOT survived'}",
        f"- S3 outage: {sum(outage.values())} requests failed ({dict(outage)}), "
        f"{'survived' if finished else 'NOT survived'} (retried)",
        f"- node loss at iteration {cfg_its['node']}: "
        f"{'injected' if any(m.startswith('node_lost') for m in marks) else 'NOT injected'}"
        f", {'survived' if finished else 'NOT survived'} (restarted on the spare node)",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--iterations", type=int, default=None, help="of each run (default: the digits preset's)"
    )
    ap.add_argument("--eval-images", type=int, default=1000, help="FID-digits images (1000)")
    args = ap.parse_args(argv)
    if args.iterations is None:
        from nitro_dist.config import load_config

        args.iterations = load_config("digits").train.iterations
    if args.iterations < 10:
        ap.error("--iterations: at least 10 (faults go at 25%%, 40%% and 65%% of the run)")
    srv, proxy = start_s3()
    cluster = start_cluster()
    work = Path(tempfile.mkdtemp(prefix="nitro-chaos-"))
    try:
        n = args.iterations
        its = {"iterations": n, **{k: f(n) for k, f in FAULTS.items()}}
        clean = train("clean", args, work, False, proxy)
        proxy.arm({})
        chaos = train("chaos", args, work, True, proxy)
        lines = [
            f"chaos benchmark: digits, 2 workers, {n} iterations "
            f"(batch 64), FID-digits on {args.eval_images} images",
            "",
            "faults injected / survived:",
            *faults_report(chaos["run_dir"], proxy, chaos, its),
            "",
            "| run | iterations | seconds | samples lost | samples trained twice "
            "| rank-iterations redone | FID-digits 1 step | 2 steps | 4 steps |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in (("clean", clean), ("chaos", chaos)):
            lines.append(
                f"| {name} | {r.get('iteration')} | {r['seconds']:.0f} | {r['samples_lost']} | "
                f"{r['samples_twice']} | {r['rank_iterations_redone']} | "
                f"{r.get('fid_digits_1step', float('nan')):.2f} | "
                f"{r.get('fid_digits_2step', float('nan')):.2f} | "
                f"{r.get('fid_digits_4step', float('nan')):.2f} |"
            )
        print("\n".join(lines), flush=True)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
        proxy.stop()
        srv.stop()


if __name__ == "__main__":
    main()
