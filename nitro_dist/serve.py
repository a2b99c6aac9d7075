"""Ray Serve application: the one-step generator behind a FastAPI ingress.

  serve run nitro_dist.serve:app                              # latest digits checkpoint
  serve run nitro_dist.serve:app checkpoint=runs/digits device=cpu max_batch_size=8
  serve deploy cluster/serve_config.yaml                      # the same app on a cluster

Endpoints: ``POST /v1/images`` (JSON in; JSON with base64 PNGs or ``image/png`` out),
``POST /v1/images/generations`` and ``GET /v1/models`` (OpenAI-compatible: the ``openai`` client
works against this server), ``GET /healthz``, ``GET /`` (a page to try prompts). Two
deployments: ``Generator`` (the model, one per GPU on a cluster, dynamic batching grouped by
steps and size) and ``Ingress`` (HTTP, validation, backpressure answered with 503).
"""

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

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
    openai_job,
    png_strip,
    result_headers,
    unknown_model,
)
from nitro_dist.serve_limits import (
    HTTPLimits,
    LimitArgs,
    OutOfMemory,
    PixelBudget,
    RequestGuard,
    install,
)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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
    batch_wait_ms: float = Field(default=10.0, ge=0, le=10_000)
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
    """The model. ``generate`` is batched by Serve; one model call per (steps, size) group."""

    def __init__(
        self,
        checkpoint: str,
        device: str,
        dtype: str,
        max_batch_size: int,
        batch_wait_ms: float,
        limit_args: LimitArgs,
    ) -> None:
        import torch

        from nitro_dist.inference import Generator
        from nitro_dist.remote import local_checkpoint

        self.device = device
        self.dtype = dtype
        self.checkpoint = checkpoint
        self.gen = Generator.from_checkpoint(
            local_checkpoint(checkpoint), device=device, dtype=getattr(torch, DTYPES[dtype])
        )
        self.limits = Limits.of(self.gen)
        self.budget = PixelBudget.resolve(limit_args, self.limits)
        self.max_batch_size = max_batch_size
        self.generate.set_max_batch_size(max_batch_size)
        # Serve's batch queue waits out the timeout even when one request fills the batch:
        # with batching off, don't make every request pay it
        self.generate.set_batch_wait_timeout_s(batch_wait_ms / 1000 if max_batch_size > 1 else 0)

    def info(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "device": self.device,
            "dtype": self.dtype,
            "max_batch_size": self.max_batch_size,
            "limits": self.limits.__dict__,
            "budgets": {
                "max_request_pixels": self.budget.max_request_pixels,
                "max_call_pixels": self.budget.max_call_pixels,
            },
        }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, jobs: list[Job]) -> list[Result | OutOfMemory]:
        from nitro_dist.serve_limits import run_jobs_guarded

        # in a thread: the replica keeps answering health checks and queueing while it computes;
        # calls cut to the pixel budget; out of memory answers OutOfMemory for the jobs it hit
        return await asyncio.to_thread(run_jobs_guarded, self.gen, jobs, self.budget)


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
    def __init__(self, generator: DeploymentHandle, model_name: str, http: HTTPLimits) -> None:
        install(http)
        self.generator = generator
        self.model_name = model_name
        self.created = int(time.time())  # OpenAI's Model.created: when this app came up
        self._info: dict | None = None

    async def _model_info(self) -> dict:
        if self._info is None:
            self._info = await self.generator.info.remote()
        return self._info

    async def _generate(self, job: Job) -> Result:
        try:
            result = await self.generator.generate.remote(job)
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

    async def _budget(self) -> PixelBudget:
        return PixelBudget(**(await self._model_info())["budgets"])

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> str:
        return _page()

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Live: asks a generator replica each time (the cached limits would outlive it). Says
        what a client may ask for, nothing of the internals (paths, devices, errors)."""
        try:
            info = await asyncio.wait_for(self.generator.info.remote(), timeout=10)
        except BackPressureError:
            return JSONResponse({"status": "busy"}, status_code=503, headers={"Retry-After": "1"})
        except Exception as e:  # not up yet, restarting, or gone: say so, don't crash
            logging.getLogger(__name__).warning("health check: generator unavailable: %r", e)
            return JSONResponse(
                {"status": "unavailable"}, status_code=503, headers={"Retry-After": "5"}
            )
        self._info = info
        public = {k: info[k] for k in ("limits", "budgets")}
        return JSONResponse({"status": "ok", "model": self.model_name, **public})

    @api.post("/v1/images")
    async def images(self, req: ImageRequest) -> Response:
        limits = Limits(**(await self._model_info())["limits"])
        try:
            height = limits.check_side("height", req.height)
            width = limits.check_side("width", req.width)
            (await self._budget()).check_request(req.num_images, height, width, "num_images")
        except ValueError as e:
            field = str(e).split(":", 1)[0]
            return JSONResponse({"error": str(e), "field": field}, status_code=422)
        seed = req.seed if req.seed is not None else random.randint(0, SEED_MAX - req.num_images)
        if seed + req.num_images - 1 > SEED_MAX:
            return JSONResponse(
                {"error": f"seed: seed + num_images - 1 must be <= {SEED_MAX}", "field": "seed"},
                status_code=422,
            )
        job = Job(req.prompt, req.steps, seed, req.num_images, height, width)
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
        limits = Limits(**(await self._model_info())["limits"])
        try:
            job = openai_job(
                await request.body(),
                limits,
                self.model_name,
                random.randint(0, SEED_MAX - MAX_IMAGES),
            )
            try:
                (await self._budget()).check_request(job.num_images, job.height, job.width, "n")
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
        return JSONResponse(models_list(self.model_name, self.created))

    @api.get("/v1/models/{model:path}")  # a name given with model_name may hold "/"
    async def openai_model(self, model: str) -> JSONResponse:
        if model != self.model_name:
            err = unknown_model(model, self.model_name)
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse(model_card(self.model_name, self.created))


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
    checkpoint = resolve_checkpoint(a.checkpoint)
    model_name = a.model_name or model_name_of(checkpoint)
    device = _device(a.device)
    dtype = a.dtype if a.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
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
    ).bind(checkpoint, device, dtype, a.max_batch_size, a.batch_wait_ms, LimitArgs(**_limits(a)))
    # the ingress holds no model: a sliver of CPU, and room for everything the generators hold
    ingress_cap = a.max_ongoing_requests * (a.max_replicas if a.replicas == "auto" else a.replicas)
    return Ingress.options(  # type: ignore[attr-defined]  # a Deployment, as above
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=ingress_cap + a.max_queued_requests,
        max_queued_requests=a.max_queued_requests,
    ).bind(generator, model_name, http)


def _limits(a: AppArgs) -> dict[str, Any]:
    return a.model_dump(include=set(LimitArgs.model_fields))
