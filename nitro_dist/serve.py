"""Ray Serve application: the one-step generator behind a FastAPI ingress.

  serve run nitro_dist.serve:app                              # latest digits checkpoint
  serve run nitro_dist.serve:app checkpoint=runs/digits device=cpu max_batch_size=8
  serve deploy cluster/serve_config.yaml                      # the same app on a cluster

Endpoints: ``POST /v1/images`` (JSON in; JSON with base64 PNGs or ``image/png`` out),
``POST /v1/images/generations`` and ``GET /v1/models`` (OpenAI-compatible: the ``openai`` client
works against this server), ``GET /healthz``, ``GET /`` (a page to try prompts, and to draw as
you type over the ``/v1/live`` WebSocket). Two deployments: ``Generator`` (the models, one
replica per GPU on a cluster, chosen per request by Serve's model multiplexing, dynamic batching
formed when the model is free (``batch_queue.WhenFree``) and grouped by steps and size,
optionally compiled and warmed: ``fast_path``) and ``Ingress`` (HTTP, validation, backpressure
answered with 503).
"""

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from nitro_dist.batch_queue import WhenFree
from nitro_dist.image_api import (
    MAX_IMAGES,
    SEED_MAX,
    ImageRequest,
    Job,
    Limits,
    OpenAIError,
    Result,
    b64,
    model_card,
    model_name_of,
    models_list,
    openai_images_response,
    openai_job_of,
    openai_request,
    png_strip,
    result_headers,
    unknown_model,
)
from nitro_dist.live import LiveStats, authorized, live_session
from nitro_dist.serve_limits import (
    HTTPLimits,
    LimitArgs,
    OutOfMemory,
    PixelBudget,
    RequestGuard,
    install,
)
from nitro_dist.serve_limits import active as active_limits
from nitro_dist.served_model import parse_models, parse_sizes

if TYPE_CHECKING:
    from nitro_dist.fast_path import FastPath
    from nitro_dist.served_model import ServedModel


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
    max_ongoing_requests: int = Field(default=16, ge=1, description="per generator replica")
    max_queued_requests: int = Field(
        default=32, ge=1, description="waiting requests per caller before answering 503"
    )
    num_cpus: float = Field(default=0.5, gt=0, description="CPUs per generator replica")
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
class GeneratorReplica:
    """The models (``served_model.ServedModel``; Serve multiplexing picks the replica and the
    model per request). ``generate`` is batched by ``WhenFree`` (a batch per model, taken when
    the model is free); one model call per (steps, size) group. Every model is loaded (and on
    the fast path compiled and warmed) before the replica reports healthy."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        models: dict[str, str],
        device: str,
        dtype: str,
        max_batch_size: int,
        batch_wait_ms: float,
        limit_args: LimitArgs,
        use_ema: bool = True,
        fast: dict | None = None,
        sizes_hw: list[tuple[int, int]] | None = None,
    ) -> None:
        from nitro_dist.fast_path import FastPath

        self.models = models
        self.default = next(iter(models))
        self.limit_args = limit_args
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

        local = local_checkpoint(self.models[name])
        return await asyncio.to_thread(load_model, name, local, **self.load_args)

    async def _model(self) -> "ServedModel":
        return await self.get_model(serve.get_multiplexed_model_id() or self.default)

    def _budget(self, m: "ServedModel") -> PixelBudget:
        return PixelBudget.resolve(self.limit_args, m.limits)

    async def info(self) -> dict[str, Any]:
        m = await self._model()
        budget = self._budget(m)
        out = {**m.info(), "checkpoint": self.models[m.name]}  # as given (an s3:// URL, say)
        return {
            **out,
            "max_batch_size": self.max_batch_size,
            "budgets": {
                "max_request_pixels": budget.max_request_pixels,
                "max_call_pixels": budget.max_call_pixels,
            },
        }

    async def generate(self, job: Job) -> Result | OutOfMemory:
        return await self.batches.submit(serve.get_multiplexed_model_id() or self.default, job)

    async def _run(self, name: str, jobs: list[Job]) -> list[Result | OutOfMemory]:
        """One batch of one model's jobs (``WhenFree`` never mixes models)."""
        from nitro_dist.serve_limits import run_jobs_guarded

        m = await self.get_model(name)
        # in a thread: the replica keeps answering health checks and queueing while it computes;
        # calls cut to the pixel budget; out of memory answers OutOfMemory for the jobs it hit
        return await asyncio.to_thread(run_jobs_guarded, m.gen, jobs, self._budget(m))


api = FastAPI(title="nitro_dist", description="One-step text-to-image (NitroFusion)")
# docs, API key, body size and read time, request timeout: the limits the Ingress installs
api.add_middleware(RequestGuard)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


@api.exception_handler(RequestValidationError)
async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """4xx naming the field: 400 for a body that is not JSON, 422 for JSON that breaks the
    schema (unknown field, value out of range, missing prompt...)."""
    errors = exc.errors()
    first: dict[str, Any] = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return JSONResponse(
            {"error": f"body: malformed JSON ({why})", "field": "body"}, status_code=400
        )
    field = _field(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid")
    if first.get("type") == "extra_forbidden":
        msg = f"unknown field (allowed: {', '.join(ImageRequest.model_fields)})"
    return JSONResponse(
        {"error": f"{field}: {msg}", "field": field, "detail": _plain(errors)}, status_code=422
    )


def _plain(errors: Sequence[dict]) -> list[dict]:
    return [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors
    ]


class Unavailable(Exception):
    """No generator could take the request now: answered 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def _page() -> str:
    return resources.files("nitro_dist").joinpath("web/index.html").read_text()


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self, generator: DeploymentHandle, model_names: list[str], http: HTTPLimits
    ) -> None:
        install(http)
        self.generator = generator
        self.model_names = list(model_names)
        self.model_name = self.model_names[0]  # the default model
        self.created = int(time.time())  # OpenAI's Model.created: when this app came up
        self._info: dict[str, dict] = {}
        self.live = LiveStats()  # draw-as-you-type sessions of this ingress replica

    def _handle(self, model: str) -> DeploymentHandle:
        """The generator, routed by Serve's model multiplexing to a replica holding ``model``."""
        return self.generator.options(multiplexed_model_id=model)

    def _unknown(self, model: str | None) -> JSONResponse | None:
        """422 naming the field and listing the served models, for a model not served here."""
        if model is None or model in self.model_names:
            return None
        served = ", ".join(self.model_names)
        return JSONResponse(
            {
                "error": f"model: {model!r} is not served here; known models: {served}",
                "field": "model",
                "models": self.model_names,
            },
            status_code=422,
        )

    async def _model_info(self, model: str | None = None) -> dict:
        name = model or self.model_name
        if name not in self._info:
            self._info[name] = await self._handle(name).info.remote()
        return self._info[name]

    async def _generate(self, job: Job) -> Result:
        try:
            result = await self._handle(job.model or self.model_name).generate.remote(job)
        except BackPressureError as e:
            raise Unavailable(f"server busy, retry shortly ({e})", "1") from e
        except RayActorError as e:  # also ActorDiedError, ActorUnavailableError
            # the replica died under this request; Serve is starting a new one
            raise Unavailable(
                f"generator replica restarting, retry shortly ({type(e).__name__})", "5"
            ) from e
        if isinstance(result, OutOfMemory):
            raise Unavailable(result.message, result.retry_after)
        return result

    async def _budget(self, model: str | None = None) -> PixelBudget:
        return PixelBudget(**(await self._model_info(model))["budgets"])

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return _page()

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Live: asks a generator replica each time (the cached limits would outlive it). Says
        what a client may ask for, nothing of the internals (paths, devices, errors)."""
        try:
            info = await asyncio.wait_for(self._handle(self.model_name).info.remote(), timeout=10)
        except BackPressureError:
            return JSONResponse({"status": "busy"}, status_code=503, headers={"Retry-After": "1"})
        except Exception as e:  # not up yet, restarting, or gone: say so, don't crash
            logging.getLogger(__name__).warning("health check: generator unavailable: %r", e)
            return JSONResponse(
                {"status": "unavailable"}, status_code=503, headers={"Retry-After": "5"}
            )
        self._info[self.model_name] = info
        public = {k: info[k] for k in ("limits", "budgets")}
        extra = {"models": self.model_names, "live": self.live.__dict__}
        return JSONResponse({"status": "ok", "model": self.model_name, **public, **extra})

    @api.post("/v1/images")
    async def images(self, req: ImageRequest) -> Response:
        if (unknown := self._unknown(req.model)) is not None:
            return unknown
        limits = Limits(**(await self._model_info(req.model))["limits"])
        try:
            height = limits.check_side("height", req.height)
            width = limits.check_side("width", req.width)
            limits.check_size(height, width)
            budget = await self._budget(req.model)
            budget.check_request(req.num_images, height, width, "num_images")
        except ValueError as e:
            field = str(e).split(":", 1)[0]
            return JSONResponse({"error": str(e), "field": field}, status_code=422)
        seed = req.seed if req.seed is not None else random.randint(0, SEED_MAX - req.num_images)
        if seed + req.num_images - 1 > SEED_MAX:
            return JSONResponse(
                {"error": f"seed: seed + num_images - 1 must be <= {SEED_MAX}", "field": "seed"},
                status_code=422,
            )
        job = Job(req.prompt, req.steps, seed, req.num_images, height, width, req.model or "")
        try:
            result = await self._generate(job)
        except Unavailable as e:
            return JSONResponse(
                {"error": e.message}, status_code=503, headers={"Retry-After": e.retry_after}
            )
        headers = result_headers(result, req.steps, limits.max_tokens)
        if req.format == "png":
            png = result.pngs[0] if len(result.pngs) == 1 else png_strip(result.pngs)
            return Response(content=png, media_type="image/png", headers=headers)
        body = {
            "images": [b64(p) for p in result.pngs],
            "seeds": result.seeds,
            "steps": req.steps,
            "height": height,
            "width": width,
            "prompt_tokens": result.prompt_tokens,
            "truncated": result.truncated,
        }
        return JSONResponse(body, headers=headers)

    @api.post("/v1/images/generations")
    async def openai_images(self, request: Request) -> JSONResponse:
        """OpenAI's images API over the same generator: the same seed gives the same image as
        ``/v1/images``; errors in OpenAI's shape (400 naming the parameter)."""
        try:
            req = openai_request(await request.body(), self.model_names)
            limits = Limits(**(await self._model_info(req.model))["limits"])
            job = openai_job_of(req, limits, random.randint(0, SEED_MAX - MAX_IMAGES))
            try:
                budget = await self._budget(req.model)
                budget.check_request(job.num_images, job.height, job.width, "n")
            except ValueError as e:
                raise OpenAIError(400, str(e), "n") from None
            result = await self._generate(job)
        except OpenAIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except Unavailable as e:
            err = OpenAIError(503, e.message, type="server_error")
            return JSONResponse(err.body(), status_code=503, headers={"Retry-After": e.retry_after})
        return JSONResponse(
            openai_images_response(result, job, int(time.time())),
            headers=result_headers(result, job.steps, limits.max_tokens),
        )

    @api.get("/v1/models")
    async def openai_models(self) -> JSONResponse:
        return JSONResponse(models_list(self.model_names, self.created))

    @api.get("/v1/models/{model:path}")  # a name given with model_name may hold "/"
    async def openai_model(self, model: str) -> JSONResponse:
        if model not in self.model_names:
            err = unknown_model(model, self.model_names)
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse(model_card(model, self.created))

    @api.websocket("/v1/live")
    async def live_socket(self, websocket: WebSocket) -> None:
        """Draw as you type: each message a prompt, the newest one of a client always wins."""
        if not authorized(websocket.headers, active_limits().api_key_sha256):
            await websocket.close(code=1008, reason="authorization: send 'Bearer KEY'")
            return
        await live_session(websocket, self._live_image, self.live)

    async def _live_image(self, prompt: str, seed: int, steps: int, model: str | None) -> bytes:
        """One image for the live page, through the same checks and generator as /v1/images."""
        if model is not None and model not in self.model_names:
            raise ValueError(f"model: {model!r} is not served; known models: {self.model_names}")
        native = Limits(**(await self._model_info(model))["limits"]).native
        job = Job(prompt, steps, seed, 1, native, native, model or "")
        try:
            return (await self._generate(job)).pngs[0]
        except Unavailable as e:
            raise ValueError(e.message) from e


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
    actor = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": a.num_cpus}
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
    generator = GeneratorReplica.options(  # type: ignore[attr-defined]
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
        a.use_ema,
        fast.__dict__,
        parse_sizes(a.sizes),
    )
    # the ingress holds no model: a sliver of CPU, and room for everything the generators hold
    ingress_cap = a.max_ongoing_requests * (a.max_replicas if a.replicas == "auto" else a.replicas)
    return Ingress.options(  # type: ignore[attr-defined]  # a Deployment, as above
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=ingress_cap + a.max_queued_requests,
        max_queued_requests=a.max_queued_requests,
    ).bind(generator, list(models), http)


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
