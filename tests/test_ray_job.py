"""`ray job submit` to a local cluster this test starts (`ray start --head` on 127.0.0.1): the
digits task trains for a few iterations and the job succeeds, exactly as a user runs it.

The dashboard/job server listens on 127.0.0.1 only; Ray 2.60's GCS and raylet gRPC servers
listen on every interface whatever the node address, so the cluster also runs with token
authentication and a fresh random token.
"""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from nitro_dist.distributed.parallel import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture
def head(tmp_path):
    if not (BIN / "ray").exists():
        pytest.skip("the ray CLI is not installed next to this python")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"] = "token", secrets.token_hex(32)
    port, dash = free_port(), free_port()
    start = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--disable-usage-stats",
    ]
    # --block: the command stays up and, when terminated, stops this cluster's processes only
    # (`ray stop` would end every Ray process on the machine, other tests' clusters included)
    proc = subprocess.Popen(
        [*start, "--block"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_dashboard(dash, proc)
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def wait_for_dashboard(port: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Until the job server answers (bounded), or the `ray start` process has exited."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2).close()
            return
        except urllib.error.HTTPError:  # it answers (token auth may refuse the request)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard on 127.0.0.1:{port} did not answer in {timeout_s} s")


@pytest.mark.ray  # its own cluster: runs before the session one starts (conftest)
@pytest.mark.slow
def test_ray_job_submit_trains_the_digits_task(head, tmp_path):
    env, address = head
    job = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={address}",
        "--working-dir",
        ".",
        "--",
        "python",
        "-m",
        "nitro_dist.train",
        "train.iterations=3",
        "init.iterations=0",  # the job's path, without the one-step stage's minute
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.eval_every=0",
        "train.eval_images=50",
        "train.batch_size=16",
        "teacher.offline_pairs=64",
        "distributed.cpus_per_worker=1",
        f"distributed.storage_path={tmp_path}",
    ]
    out = subprocess.run(job, cwd=REPO, env=env, timeout=600, capture_output=True, text=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "succeeded" in log
    assert "[iteration 3/3]" in log  # progress is visible in the job logs
    run_dir = tmp_path / "digits"
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["iteration"] == 3 and "fid_digits_1step" in final
    assert (run_dir / "iter_000003" / "generator" / "config.json").exists()
    assert (run_dir / "samples" / "final_1step.png").exists()


def test_unreachable_ray_address_is_a_clear_error(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    out = subprocess.run(
        [sys.executable, "-m", "nitro_dist.train", "--config", "tiny", f"--run-dir={tmp_path}/x"],
        env=env,
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "RAY_ADDRESS=127.0.0.1:" in out.stderr and "no Ray cluster answers" in out.stderr
