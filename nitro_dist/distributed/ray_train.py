"""Ray Train adapter: ``python -m nitro_dist.train`` runs ``loop.train`` on a TorchTrainer.

The driver joins the cluster named by RAY_ADDRESS (as under ``ray job submit``) or starts a local
Ray sized to the machine. Each worker converts the config dict back to the typed tree, then runs
the same loop as a single process with a ``RaySession``: the head pool sharded over ranks
(``ShardedPool``), G under DeepSpeed ZeRO (``DeepSpeedUpdate``), checkpoints reported with
``ray.train.report`` (every rank adds its part; Ray merges them into one folder per checkpoint
under ``<storage_path>/<run_name>/iter_XXXXXX``), restarts after a worker failure resumed from the
last reported checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from nitro_dist import checkpoint as ckpt
from nitro_dist import checkpoint_layout as layout
from nitro_dist.checkpoint_layout import is_remote
from nitro_dist.config import Config, config_from_dict, to_dict
from nitro_dist.distributed.address import check_reachable
from nitro_dist.run_log import quiet_libraries

if TYPE_CHECKING:
    from nitro_dist.data.shards import ShardList

FAIL_ENV = "NITRO_FAIL_AT"  # "iteration[:rank]": inject a worker fault (tests, recovery drills)
FAULT_EXIT_CODE = 17


# ---------------------------------------------------------------------------------------------
# where a run lives


def resolve_storage(storage_path: str) -> str:
    """Absolute local path (relative = to the launching directory), or the URL unchanged.

    Under ``ray job submit --working-dir`` the driver runs in a Ray-managed copy of the working
    dir that is deleted with the job, so relative paths go under ``~/nitro_runs`` there."""
    if is_remote(storage_path):
        return storage_path.rstrip("/")
    p = Path(storage_path.removeprefix("file://")).expanduser()
    if not p.is_absolute():
        base = Path.cwd()
        if "runtime_resources" in base.parts:  # a job's temporary working dir
            base = Path.home() / "nitro_runs"
        p = base / p
    return str(p)


def ray_storage(url: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig; s3:// goes through s3fs (endpoint and
    credentials from the usual AWS_* variables) wrapped for pyarrow."""
    if not is_remote(url):
        return url, None
    import fsspec
    import pyarrow.fs as pafs

    protocol, path = url.split("://", 1)
    fs = fsspec.filesystem(protocol)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


# ---------------------------------------------------------------------------------------------
# driver


def connect(cfg: Config) -> None:
    """Join RAY_ADDRESS's cluster, or start a local one with enough (logical) CPUs."""
    import ray

    quiet_ray_train(local=not os.environ.get("RAY_ADDRESS"))
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)  # ray.init() would retry an unreachable address forever
        ray.init(log_to_driver=True, logging_level=logging.WARNING)
        return
    d = cfg.distributed
    need = math.ceil(d.max_workers * d.cpus_per_worker)
    ray.init(
        # a new local Ray even when another runs on this machine: without it ray.init() joins
        # the last `ray start` cluster here and refuses num_cpus ("When connecting to an existing
        # cluster, num_cpus and num_gpus must not be provided"); RAY_ADDRESS names a cluster
        address="local",
        num_cpus=max(os.cpu_count() or 1, need),
        dashboard_host="127.0.0.1",  # the state API (Train V2 uses it) lives in the dashboard
        logging_level=logging.WARNING,  # no "Started a local Ray instance" banner
        runtime_env={"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}},
    )


def quiet_ray_train(local: bool) -> None:
    """The driver's side of a readable console (the worker calls ``run_log.quiet_libraries``):
    Ray Train's read by ``trainer.fit()`` from the driver's environment and passed to workers."""
    quiet_libraries()
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every print() shows twice
    if local:  # one machine: no preemption to watch for (its actor logs a C++ error line)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def launch(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train ``cfg`` on Ray Train; returns the final metrics plus ``checkpoint`` and ``run_dir``.
    Rerunning with the same run_name and storage_path continues from the latest checkpoint."""
    connect(cfg)  # first: with Ray up, a brace-pattern shard set is indexed by Ray tasks
    shards = check_data(cfg) if cfg.data.source == "shards" else None
    trainer, storage, fs = make_trainer(cfg, resume, shards=shards)
    result = trainer.fit()
    out = dict(result.metrics or {})
    out["run_dir"] = f"{storage}/{cfg.run_name}"
    if result.checkpoint is not None:
        path = result.checkpoint.path
        out["checkpoint"] = path if fs is None else f"{storage.split('://')[0]}://{path}"
    return out


def check_data(cfg: Config, *, index_only: bool = False) -> ShardList:
    """The driver's dataset check (``loader.check_dataset``: what a worker's loader would stop
    on stops here, before any worker starts); returns the ``ShardList`` the workers use. An
    index of a brace pattern that cannot be written beside the shards goes to
    ``<storage_path>/shard_indexes/``. ``index_only``: just the list (Tune trials)."""
    from nitro_dist import retry
    from nitro_dist.data.loader import check_dataset, check_split
    from nitro_dist.data.shards import list_shards

    retry.configure(retry.from_config(cfg.storage))  # the driver indexes and reads shards too
    d, w = cfg.data, cfg.distributed.max_workers
    index_dir = f"{resolve_storage(cfg.distributed.storage_path)}/shard_indexes"
    if index_only:
        return list_shards(d.shards, index_dir=index_dir)
    shards = check_dataset(
        d.shards,
        caption_key=d.caption_key,
        need_teacher=cfg.teacher.mode == "offline",
        world_size=w,
        batch_size=cfg.train.batch_size // w,
        seed=cfg.seed,
        index_dir=index_dir,
    )
    for n in range(cfg.distributed.min_workers, w):  # the sizes an elastic run may shrink to
        check_split(shards, n, cfg.train.batch_size // n, cfg.seed)
    return shards


def make_trainer(
    cfg: Config,
    resume: str | None = None,
    callbacks: list | None = None,
    shards: ShardList | None = None,
):
    """(TorchTrainer, resolved storage, pyarrow fs or None); ``callbacks`` e.g. Tune's;
    ``shards`` = the driver's checked ``ShardList`` (data.source=shards; else listed here),
    handed to the workers so none lists or indexes the shards again."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distributed
    storage = resolve_storage(d.storage_path)
    path, fs = ray_storage(storage)
    resources: dict[str, float] = {"CPU": d.cpus_per_worker, **d.resources_per_worker}
    # [min, max]: Ray Train V2's elastic training (a tuple), else a fixed number of workers
    workers = d.num_workers if isinstance(d.num_workers, int) else tuple(d.num_workers)
    if d.use_gpu:
        resources["GPU"] = d.gpus_per_worker
    if resume and not is_remote(resume):
        resume = str(layout.resolve(resume))
    loop_config: dict[str, Any] = {"config": to_dict(cfg), "storage": storage, "resume": resume}
    if cfg.data.source == "shards":
        shards = shards if shards is not None else check_data(cfg, index_only=True)
        loop_config["shards"] = {"urls": shards.urls, "counts": shards.counts}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=d.use_gpu,
            resources_per_worker=resources,
            placement_strategy=d.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
            # worker-group set-up tables, "Checkpoint successfully created", ... (WARNING and up)
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks or None,
        ),
    )
    return trainer, storage, fs


# ---------------------------------------------------------------------------------------------
# worker


def worker_loop(config: dict[str, Any]) -> None:
    import ray.train

    from nitro_dist.loop import train

    quiet_libraries()
    cfg = config_from_dict(config["config"])
    if config.get("shards"):  # the driver's list: no worker lists or indexes the shards again
        from nitro_dist.data.shards import ShardList, use_resolved

        use_resolved(cfg.data.shards, ShardList(**config["shards"]))
    if not cfg.train.num_threads:  # Ray sets OMP_NUM_THREADS=1 for its workers
        torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
    ctx = ray.train.get_context()
    session = RaySession(cfg, config["storage"], ctx.get_world_rank(), ctx.get_world_size())
    resume = config.get("resume")
    try:
        train(cfg, session.run_dir, resume=resume, session=session)
    finally:
        session.close()


class RaySession:
    """How a Ray Train worker takes part in ``loop.train`` (see ``loop.LocalSession``)."""

    def __init__(self, cfg: Config, storage: str, rank: int, world_size: int) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.remote_dir = f"{storage}/{cfg.run_name}"
        self._uploaded: dict[Path, float] = {}
        if is_remote(storage):  # rank 0 writes locally and uploads at checkpoints
            self.run_dir = Path(tempfile.mkdtemp(prefix=f"nitro-{cfg.run_name}-"))
            if rank == 0:
                self._fetch("metrics.jsonl")  # a rerun appends to the run's log
        else:
            self.run_dir = Path(self.remote_dir)

    def _fetch(self, name: str) -> None:
        import fsspec

        from nitro_dist import retry
        from nitro_dist.remote import get_file

        url = f"{self.remote_dir}/{name}"
        fs, path = fsspec.core.url_to_fs(url)
        if retry.call(lambda: fs.exists(path), f"list {url}"):
            get_file(url, self.run_dir / name)

    # -- set-up -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def restore(self, resume: str | Path | None, parts: list[str]) -> Iterator[Path | None]:
        """Ray's latest checkpoint of this run (after a failure, or a rerun of the same name), else
        the one given to ``launch(resume=...)`` (a local folder or a URL), else none. One that
        does not verify (sizes) falls back to the run's newest that does, with a warning. From
        object storage each rank downloads ``parts`` (what it reads: G, its optimizer state, the
        heads it owns) into a folder of its own."""
        import ray.train

        found = ray.train.get_checkpoint()
        if found is None and resume:
            path, fs = ray_storage(str(resume))
            found = ray.train.Checkpoint(path, filesystem=fs)
        if found is None:
            yield None
            return
        if found.filesystem.type_name == "local":
            yield self._verified(Path(found.path), parts)
            return
        handler = getattr(found.filesystem, "handler", None)
        fs = getattr(handler, "fs", None)  # the fsspec filesystem ray_storage wrapped
        folder = Path(tempfile.mkdtemp(prefix=f"nitro-restore-r{self.rank}-"))
        try:
            if fs is None:  # not one of ours: all of it
                found.to_directory(str(folder))
            else:
                from nitro_dist import retry

                src = retry.call(
                    lambda: self._verified_remote(fs, found.path, parts), f"resume {found.path}"
                )
                for part in [*parts, layout.RANKS, layout.TRAINER_STATE]:
                    where = f"{src}/{part}"
                    names: list[str] = retry.call(
                        functools.partial(fs.find, where, withdirs=False), f"list {where}"
                    )
                    for name in names:  # file by file: a retry repeats one file
                        dest = folder / name[len(src) + 1 :]
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        get = functools.partial(fs.get_file, name, str(dest))
                        retry.call(get, f"download {name}")
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _verified(self, path: Path, parts: list[str]) -> Path:
        """``path`` if its ``parts`` verify, else the newest checkpoint beside it that does."""
        if not layout.verify(path, parts=parts):
            return path
        found = layout.newest_verified(str(path.parent), parts=parts)
        if found is None:
            raise ValueError(f"resume: {path} does not verify and no checkpoint beside it does")
        return Path(found)

    def _verified_remote(self, fs: Any, path: str, parts: list[str]) -> str:
        if not layout.verify(path, fs, parts=parts, hash_parts=()):
            return path
        found = layout.newest_verified(path.rsplit("/", 1)[0], fs, parts=parts, hash_parts=())
        if found is None:
            raise ValueError(f"resume: {path} does not verify and no checkpoint beside it does")
        return found

    def parallelize(self, run) -> None:
        """Shard the pool over ranks and put G under DeepSpeed (parallelism from outside)."""
        from nitro_dist.distributed.parallel import parallelize

        parallelize(run, self.rank, self.world_size)
        run.node = _node_id()  # the rank's part of a checkpoint names the node that wrote it

    # -- each iteration ---------------------------------------------------------------------

    def check_fault(self, iteration: int) -> None:
        """Exit abruptly (as a crashed worker would) at the configured iteration, once per run:
        a marker in the run folder keeps the restarted worker from failing again. The same for
        ``distributed.node_loss_at_iteration``, where the whole node goes (``lose_node``)."""
        d = self.cfg.distributed
        at, rank = d.fail_at_iteration, d.fail_rank
        if os.environ.get(FAIL_ENV):
            spec = os.environ[FAIL_ENV].split(":")
            at, rank = int(spec[0]), int(spec[1]) if len(spec) > 1 else 0
        if (
            iteration == at
            and self.rank == rank
            and self._first_fault(f"injected_at_{at}_rank{rank}")
        ):
            print(f"fault injection: rank {rank} exits at iteration {at}", flush=True)
            os._exit(FAULT_EXIT_CODE)
        at = d.node_loss_at_iteration
        if iteration == at and self.rank == d.fail_rank:
            node = _node_id()
            if self._first_fault(f"node_lost_at_{at}_rank{self.rank}", node):
                lose_node(node, f"rank {self.rank} at iteration {at}")

    def _first_fault(self, name: str, note: str = "injected") -> bool:
        """Mark fault ``name`` in the run's ``faults/`` folder; False if it was marked before
        (this run already had it: a restarted worker goes on)."""
        import fsspec

        marker = f"{self.remote_dir}/faults/{name}"
        fs, path = fsspec.core.url_to_fs(marker)
        if fs.exists(path):
            return False
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, f"{note}\n".encode())
        return True

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of the per-rank losses and accuracies (one small all-reduce)."""
        keys = ["g_loss", "d_loss", "d_acc_real", "d_acc_fake", "mean_k"]
        counts = sorted(k for k in metrics if k.startswith("data_"))  # skipped-data counters
        vals = torch.tensor([float(metrics[k]) for k in keys + counts], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(vals)
            vals[: len(keys)] /= self.world_size  # means; the counters are sums over ranks
        out = dict(zip(keys + counts, vals.tolist(), strict=True))
        counted = {k: int(out[k]) for k in counts}
        return {**metrics, **out, **counted, "num_workers": self.world_size}

    # -- checkpoints and reports ------------------------------------------------------------

    def save(self, run, metrics: dict[str, Any]) -> str:
        import ray.train

        it = run.state["iteration"]
        tmp_root = Path(tempfile.gettempdir())
        prefix = f"nitro-ckpt-r{self.rank}-"
        layout.clean_stale(tmp_root, prefix)  # parts a killed worker of this host left
        folder = Path(tempfile.mkdtemp(prefix=prefix, suffix=f"-{os.getpid()}", dir=tmp_root))
        try:
            if self.cfg.distributed.disk_full_at_iteration == it:
                ckpt.inject_disk_full(folder)
            ckpt.write_checkpoint(run.checkpoint_parts(), folder)
        except Exception as e:
            ckpt.failed_write(folder, None, e)  # a full disk: DiskFullError; Ray keeps the last
            raise
        ray.train.report(
            _scalars(metrics),
            checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
            checkpoint_dir_name=layout.checkpoint_name(it),
        )
        shutil.rmtree(folder, ignore_errors=True)
        return f"{self.remote_dir}/{layout.checkpoint_name(it)}"

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(_scalars(metrics))

    def has_checkpoint(self, iteration: int) -> bool:
        import ray.train

        found = ray.train.get_checkpoint()
        return found is not None and Path(found.path).name == layout.checkpoint_name(iteration)

    def sync(self) -> None:
        """Upload rank 0's run files (metrics, samples) when the run lives in remote storage."""
        if self.rank != 0 or not is_remote(self.remote_dir):
            return
        from nitro_dist.remote import sync_dir

        sync_dir(self.run_dir, self.remote_dir, self._uploaded)  # each upload retried

    def close(self) -> None:
        if is_remote(self.remote_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def lose_node(node_id: str, who: str) -> None:
    """Fault injection: take this worker's Ray node out of the cluster, as a machine that is
    shut down or preempted: its raylet (the parent of every Ray worker process) gets SIGTERM,
    unregisters the node and ends every process on it, this one included."""
    import signal
    import time

    import ray

    info = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    if info is not None and "node:__internal_head__" in info.get("Resources", {}):
        raise RuntimeError(
            f"distributed.node_loss_at_iteration: {who} runs on the head node, which cannot be "
            "lost without the cluster; give the workers a resource only worker nodes have "
            "(distributed.resources_per_worker) or use distributed.fail_at_iteration"
        )
    raylet = os.getppid()
    try:
        cmdline = Path(f"/proc/{raylet}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        cmdline = b""
    if not cmdline.endswith(b"raylet"):
        raise RuntimeError(
            f"distributed.node_loss_at_iteration: the parent of {who}'s worker process "
            f"({raylet}: {cmdline.decode(errors='replace') or 'unknown'}) is not a raylet"
        )
    print(f"fault injection: node {node_id[:12]} of {who} leaves the cluster", flush=True)
    os.kill(raylet, signal.SIGTERM)
    time.sleep(600)  # the raylet ends this process on its way out
    os._exit(FAULT_EXIT_CODE)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)}
