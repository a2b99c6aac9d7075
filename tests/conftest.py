"""Shared fixtures. One OMP thread per process, and OMP threads sleep instead of spinning: on 2
cores, spinning OpenMP workers of two processes (a test and a Ray worker, say) slow each other
down by orders of magnitude.

One S3 server (moto's) and one local Ray cluster serve the whole session; the tests that use the
cluster run as one block (test_ray_job's own `ray start` cluster first), so that Ray's processes
only run while they are needed. `make test` runs two pytest-xdist workers (`--dist loadgroup`):
the Ray block is one unit of work (xdist group "ray"), so is each module whose tests share a
module-scoped fixture, and the other tests are handed out one by one. `make test` leaves out the
whole-system drills (marker `drill`); `make test-drills` runs them."""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One intra-op thread per process: the tests' models are tiny, and on 2 cores shared by two xdist
# workers and Ray's processes more threads only add synchronisation (test_digits_distill alone:
# 84 s with one thread, 114 s with two)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s: a tiny run would wait up to that long at
# every start, report and end (the variable is passed on to the controller and workers)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray runs its workers at nice 15: beside the other xdist worker's tests they would only get the
# CPU left over, and the Ray block is the suite's longest path
os.environ.setdefault("RAY_worker_niceness", "0")
# this Python's tools first on PATH, as `make` has them (the Ray clusters and subprocesses inherit
# it): torch builds DeepSpeed's C++ op with the `ninja` on PATH, and two ninja versions (pip's in
# the venv, the system's) take each other's build logs for stale and rebuild it (~3 CPU-minutes)
os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
# no usage-stats actor polling in the test clusters (`ray start --disable-usage-stats`'s setting)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from nitro_dist.config import load_config  # noqa: E402

RAY_GROUP = "ray"  # pytest-xdist (`-n 2 --dist loadgroup`): one worker runs every Ray test


def _ray_block(item: pytest.Item) -> int:
    """0: runs first; 1: starts its own Ray (test_ray_job); 2: uses the session cluster."""
    if "cluster" in item.fixturenames:
        return 2
    return 1 if item.get_closest_marker("ray") else 0


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    """Whether the test uses a module-scoped fixture (a trained run, a server, a spawned W=2
    job): pytest-xdist hands out single tests, so every worker that ran one of the module's tests
    would build it again (test_pool_sync's ~80 s twice)."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(
        defs and defs[-1].scope in ("module", "package") for defs in info.name2fixturedefs.values()
    )


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the ray marker added here counts
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "cluster" in item.fixturenames:  # `-m "not ray"` never starts the cluster
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("ray"):  # in order, in one process, beside the other tests
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))
        elif _shares_a_module_fixture(item):  # one worker builds the module's fixture, not both
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # under xdist (--dist loadgroup) the groups go out first, the largest first (the Ray
        # block, the modules with a module fixture), then single tests in this order: slow ones
        # before quick ones, so no long test is left for the end while the other worker idles
        items.sort(
            key=lambda item: (
                {1: 0, 2: 1, 0: 2}[_ray_block(item)],
                item.get_closest_marker("slow") is None,
            )
        )
    else:
        items.sort(key=_ray_block)  # stable: file order within each block


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    def make(*overrides: str):
        return load_config("tiny", list(overrides))

    return make


@pytest.fixture(scope="session")
def tiny_models():
    from nitro_dist.models.builders import build_tiny_sdxl

    return build_tiny_sdxl(0)


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank gloo group in this process (``parallel.init_process_group``, as the DeepSpeed
    benchmarks make it), for the tests of one DeepSpeed engine; destroyed after the module."""
    import torch.distributed as dist

    from nitro_dist.distributed.parallel import free_port, init_process_group

    # the launcher's variables, set through monkeypatch: put back afterwards as they were (unset
    # ones unset), or later tests' processes would inherit this group's port, which DeepSpeed
    # keeps bound
    one_rank = {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**one_rank, "MASTER_PORT": str(free_port())}.items():
            mp.setenv(k, v)
        init_process_group(torch.device("cpu"))
        try:
            yield
        finally:
            from deepspeed.comm import comm as ds_comm

            if ds_comm.cdb is not None:  # DeepSpeed's own teardown also drops the groups it
                ds_comm.destroy_process_group()  # keeps: the next module's group is new to it
            else:
                dist.destroy_process_group()


@pytest.fixture(scope="session")
def short_digits_run(tmp_path_factory):
    """A digits run of 2 iterations through the training loop (checkpoint, config, metrics):
    about the teacher's 1-step quality, enough for eval and serving tests. Read-only for users.
    Made once per `pytest` command: under xdist the first worker that needs it trains it (the
    other waits on a file lock), in the folder the workers' temporary folders share."""
    from filelock import FileLock

    from nitro_dist.loop import train

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = root / "digits2"
    with FileLock(str(root / "digits2.lock")):
        if not (out / "final_metrics.json").exists():
            overrides = [
                "train.iterations=2",
                "init.iterations=0",  # the teacher copy, as before: no one-step stage
                "train.eval_every=0",
                "train.sample_every=0",
                "train.checkpoint_every=0",
                "train.eval_images=10",
                "train.grid_per_prompt=1",  # the final grids: one image per prompt
                "train.batch_size=16",
                "teacher.offline_pairs=64",
                "logging.wandb=false",
                "logging.progress=false",
            ]
            train(load_config("digits", overrides), out)
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on 127.0.0.1 for the session; the AWS_* variables
    point s3fs (and processes started meanwhile, e.g. Ray workers) at it."""
    moto_server = pytest.importorskip("moto.server")
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        srv.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3_endpoint(s3_server):
    """The session's S3 server, emptied for this module, with bucket ``nitro-test``."""
    import urllib.request

    import s3fs

    # moto keeps its state per process: start every module from an empty server
    urllib.request.urlopen(
        urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")
    ).close()
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("nitro-test")
    try:
        yield s3_server
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):  # the S3 server first: Ray's nodes inherit its AWS_* variables
    """One Ray cluster of two nodes on this machine for every in-process Ray test of the session
    (``ray.cluster_utils.Cluster``, what Ray's own multi-node tests use): the head (2 CPUs,
    dashboard on 127.0.0.1: Train V2 uses its state API) and a worker node (2 CPUs), so runs
    with ``distributed.placement_strategy=SPREAD`` put their ranks on two nodes. Yields the
    ``Cluster``: a test may add nodes (and must remove them again)."""
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster

    from nitro_dist.distributed.parallel import free_port

    assert not ray.is_initialized()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "object_store_memory": 512 * 2**20,  # tiny models: the default (30% of RAM) is unused
            "dashboard_host": "127.0.0.1",
            "include_dashboard": True,
            # a free port, not Ray's default 8265: a `make train` beside the tests has that one
            "dashboard_port": free_port(),
            # no log monitor: it tails every worker's log files all session (~40 CPU-s) to echo
            # them in pytest's output; no test reads them there (they stay in Ray's session
            # folder, /tmp/ray/session_latest/logs), and failures reach the tests as exceptions
            "include_log_monitor": False,
        },
    )
    cluster.add_node(num_cpus=2, object_store_memory=256 * 2**20)
    cluster.wait_for_nodes()
    cluster.connect()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_cluster, s3_endpoint):
    """The session's Ray cluster (``ray.cluster_utils.Cluster``), with the module's (empty) S3
    bucket."""
    yield ray_cluster
