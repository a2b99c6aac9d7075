"""Ray Serve application: the one-step generator and its HTTP API in one deployment.

  serve run nitro_dist.serve:app                              # latest digits checkpoint
  serve run nitro_dist.serve:app checkpoint=runs/digits device=cpu max_batch_size=8
  serve deploy cluster/serve_config.yaml                      # the same app on a cluster

Endpoints: ``POST /v1/images`` (JSON in; JSON with base64 PNGs or ``image/png`` out),
``POST /v1/images/generations`` and ``GET /v1/models`` (OpenAI-compatible: the ``openai`` client
works against this server), ``GET /healthz``, ``GET /`` (a page to try prompts, and to draw as
you type over the ``/v1/live`` WebSocket); the routes are ``image_app.ImageApp``'s. One
deployment, ``Generator`` (``ImageServer``): each replica (one per GPU on a cluster) answers HTTP
itself (validation, PNG/base64, the page; Serve's proxy hands it the request) and holds every
served model (Serve's model multiplexing loads them), with dynamic batching formed when the
model is free (``batch_queue.WhenFree``: a model call runs in a worker thread while the event
loop takes the requests that will form the next batch), grouped by steps and size, optionally
compiled and warmed (``fast_path``). Overload is answered 503 by Serve's proxy
(``max_queued_requests``).
"""

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field
from ray import serve

from nitro_dist.batch_queue import WhenFree
from nitro_dist.image_api import MAX_IMAGES, Job, Result, model_name_of
from nitro_dist.image_app import ImageApp, api
from nitro_dist.serve_limits import HTTPLimits, LimitArgs, OutOfMemory
from nitro_dist.served_model import parse_models, parse_sizes

if TYPE_CHECKING:
    from nitro_dist.fast_path import FastPath
    from nitro_dist.served_model import ServedModel

__all__ = ["APP_ARGS", "AppArgs", "ImageServer", "api", "app", "resolve_checkpoint"]


class AppArgs(LimitArgs):
    """``serve run nitro_dist.serve:app key=value ...`` arguments (unknown keys are refused);
    the limits (pixel budgets, body size, timeouts, API key, docs) are ``LimitArgs``'."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(
        default="",
        description="checkpoint folder, run folder (latest checkpoint) or s3://...; "
        "default: the latest checkpoint of the digits run (runs/digits)",
    )
    replicas: int | Literal["auto"] = Field(default=1, description="generator replicas or auto")
    max_replicas: int = Field(default=4, ge=1, description="upper bound when replicas=auto")
    max_batch_size: int = Field(default=8, ge=1, le=256, description="requests per model call")
    batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=10_000,
        description="how long a batch that is not full waits for more requests when the model "
        "is free (0: none; batches still form from the requests that arrive during a call)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 on cuda, fp32 on cpu"
    )
    # 64, not 16: requests beyond it wait in Serve's proxy, whose router keeps probing the full
    # replica's queue (measured: +9 ms of proxy and replica CPU per request at 32 clients, and
    # 34 vs 58 images/s, benchmarks/results/serve_load.md); in the replica they wait in the batch
    # queue at no cost
    max_ongoing_requests: int = Field(
        default=64,
        ge=1,
        description="requests in a replica at once (HTTP requests and open /v1/live sockets; "
        "a model call takes up to max_batch_size of them; the rest wait for the next calls)",
    )
    max_queued_requests: int = Field(
        default=32, ge=1, description="waiting requests per caller before answering 503"
    )
    num_cpus: float = Field(default=0.5, gt=0, description="CPUs per replica (device=cpu)")
    use_ema: bool = True
    model_name: str = Field(
        default="",
        description="the model's name in the OpenAI-compatible API (GET /v1/models, the "
        "'model' parameter); default: the run folder's name",
    )
    # several models in one app, chosen per request by 'model' (Serve model multiplexing)
    models: dict[str, str] | str = Field(
        default="",
        description="NAME=CHECKPOINT,NAME=CHECKPOINT (or a mapping): every model every replica "
        "serves, the first the default; instead of checkpoint/model_name",
    )
    # the fast path: every (steps, size, batch bucket) is warmed before a replica is healthy
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        default="off", description="torch.compile mode of the UNet and VAE decode"
    )
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        default="inductor", description="torch.compile backend (aot_eager: no codegen, CPU tests)"
    )
    cuda_graphs: bool = Field(default=False, description="replay CUDA graphs (device=cuda)")
    sizes: str = Field(
        default="",
        description="WIDTHxHEIGHT,... served (and warmed); default: any size the model allows, "
        "or on the fast path (compile/cuda_graphs) the training size only",
    )


APP_ARGS = tuple(AppArgs.model_fields)

# Ray Serve settings of the replica process, in its runtime env (merged with an application's:
# its other env_vars stay). User code (the routes, the batch queue) on the replica's main event
# loop instead of a loop thread of its own: one thread hand-off less per request in and out
# (the model call runs in a worker thread either way). The environment `serve run` or
# `serve deploy` is started with overrides it (=1: Serve's default).
_USER_THREAD = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
REPLICA_ENV = {_USER_THREAD: os.environ.get(_USER_THREAD, "0")}


def resolve_checkpoint(spec: str) -> str:
    """The checkpoint folder a replica loads: local paths resolved here (replicas may run in
    another working directory), remote URLs checked and passed on."""
    from nitro_dist import checkpoint_layout as ckpt
    from nitro_dist.remote import is_remote, remote_checkpoint

    if is_remote(spec):
        return remote_checkpoint(spec)
    if not spec:
        from nitro_dist.config import load_config

        cfg = load_config("digits")
        run_dir = Path(cfg.distributed.storage_path) / cfg.run_name
        try:
            return str(ckpt.resolve(run_dir, parts=ckpt.INFERENCE_PARTS).resolve())
        except ValueError:
            raise ValueError(
                f"checkpoint: none given and the default digits run {run_dir.resolve()} has no "
                "checkpoint yet; train one with `python -m nitro_dist.train` (a few minutes on "
                "CPU) or pass checkpoint=PATH"
            ) from None
    try:
        return str(ckpt.resolve(spec, parts=ckpt.INFERENCE_PARTS).resolve())
    except ValueError:
        raise ValueError(f"checkpoint: no checkpoint found at {spec}") from None


@serve.deployment(name="Generator")
@serve.ingress(api)
class ImageServer(ImageApp):
    """One replica: the HTTP routes (``ImageApp``) and the models (``served_model.ServedModel``;
    every replica loads every model through Serve's multiplexing). Requests are batched by
    ``WhenFree`` (a batch per model, taken when the model is free), one model call per (steps,
    size) group in a worker thread, so the event loop keeps taking requests during a call.
    Every model is loaded (and on the fast path compiled and warmed) before the replica reports
    healthy."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        models: dict[str, str],
        device: str,
        dtype: str,
        max_batch_size: int,
        batch_wait_ms: float,
        limit_args: LimitArgs,
        http: HTTPLimits,
        use_ema: bool = True,
        fast: dict | None = None,
        sizes_hw: list[tuple[int, int]] | None = None,
    ) -> None:
        from nitro_dist.fast_path import FastPath

        ImageApp.__init__(self, list(models), limit_args, http)
        self.checkpoints = models
        self.load_args: dict[str, Any] = {
            "device": device,
            "dtype": dtype,
            "use_ema": use_ema,
            "fast": FastPath(**(fast or {})),
            "sizes_hw": sizes_hw,
            "max_images_per_call": max_batch_size * MAX_IMAGES,
        }
        self.max_batch_size = max_batch_size
        # batches formed when the model is free (not on Serve's batch timer): a lone request
        # runs at once, under load a call takes what arrived during the last one
        self.batches: WhenFree[Job] = WhenFree(self._run, max_batch_size, batch_wait_ms / 1000)
        for name in models:  # healthy only when every model is loaded and warm
            await self.get_model(name)

    @serve.multiplexed(max_num_models_per_replica=-1)  # every model on every replica
    async def get_model(self, name: str) -> "ServedModel":
        from nitro_dist.remote import local_checkpoint
        from nitro_dist.served_model import load_model

        local = local_checkpoint(self.checkpoints[name])
        return await asyncio.to_thread(load_model, name, local, **self.load_args)

    async def model(self, name: str) -> "ServedModel":
        return await self.get_model(name)

    def requested(self, model: str | None) -> str:
        """The body's ``model``, else Serve's ``serve_multiplexed_model_id`` header (which
        Serve's proxy also routes by), else the default model."""
        return model or serve.get_multiplexed_model_id() or self.model_name

    async def info(self, model: str | None = None) -> dict[str, Any]:
        # the checkpoint as given (an s3:// URL, say), not the replica's local copy
        out = await ImageApp.info(self, model)
        return {**out, "checkpoint": self.checkpoints[out["model"]]}

    async def submit(self, job: Job) -> Result | OutOfMemory:
        return await self.batches.submit(job.model, job)

    async def generate(self, job: Job) -> Result | OutOfMemory:
        """A job from a deployment handle (no HTTP; ``benchmarks/serve_load.py`` times it)."""
        job.model = self.requested(job.model)
        return await self.submit(job)

    async def _run(self, name: str, jobs: list[Job]) -> list[Result | OutOfMemory]:
        """One batch of one model's jobs (``WhenFree`` never mixes models)."""
        from nitro_dist.serve_limits import run_jobs_guarded

        m = await self.get_model(name)
        # in a thread: the replica keeps answering HTTP, health checks and queueing while it
        # computes; calls cut to the pixel budget; out of memory answers OutOfMemory per job
        return await asyncio.to_thread(run_jobs_guarded, m.gen, jobs, self.budget(m))


def _device(device: str) -> str:
    if device != "auto":
        return device
    import ray

    if ray.is_initialized():
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def app(args: dict) -> serve.Application:
    """Application builder: ``serve run nitro_dist.serve:app key=value ...``."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    http = HTTPLimits.of(a)  # the API key from api_key_env's variable, before anything starts
    models = served_models(a)
    device = _device(a.device)
    dtype = a.dtype if a.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    fast = fast_path_of(a, device)
    actor: dict[str, Any] = (
        {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": a.num_cpus}
    )
    actor["runtime_env"] = {"env_vars": dict(REPLICA_ENV)}
    scale: dict[str, Any] = {"num_replicas": a.replicas}
    if a.replicas == "auto":
        scale = {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": a.max_replicas,
                "target_ongoing_requests": a.max_batch_size,
            }
        }
    # serve.deployment made the class a Deployment; mypy does not apply class decorators
    return ImageServer.options(  # type: ignore[attr-defined]
        ray_actor_options=actor,
        max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=a.max_queued_requests,
        **scale,
    ).bind(
        models,
        device,
        dtype,
        a.max_batch_size,
        a.batch_wait_ms,
        LimitArgs(**_limits(a)),
        http,
        a.use_ema,
        fast.__dict__,
        parse_sizes(a.sizes),
    )


def _limits(a: AppArgs) -> dict[str, Any]:
    return a.model_dump(include=set(LimitArgs.model_fields))


def served_models(a: AppArgs) -> dict[str, str]:
    """{name: checkpoint} the app serves: ``models``, or the one ``checkpoint``/``model_name``."""
    if not a.models:
        checkpoint = resolve_checkpoint(a.checkpoint)
        return {a.model_name or model_name_of(checkpoint): checkpoint}
    if a.checkpoint or a.model_name:
        raise ValueError(
            "models: give either models=NAME=CHECKPOINT,... or checkpoint= (and model_name=), "
            "not both"
        )
    out = {}
    for name, spec in parse_models(a.models).items():
        try:
            out[name] = resolve_checkpoint(spec)
        except ValueError as e:
            raise ValueError(f"models: {name}: {e}") from None
    return out


def fast_path_of(a: AppArgs, device: str) -> "FastPath":
    from nitro_dist.fast_path import FastPath

    if a.cuda_graphs and device != "cuda":
        raise ValueError(f"cuda_graphs: CUDA graphs need device=cuda (the device is {device})")
    compile = None if a.compile == "off" else a.compile
    return FastPath(compile=compile, backend=a.compile_backend, cuda_graphs=a.cuda_graphs)
