"""The HTTP API over the served models, without Ray: FastAPI's ``api`` and ``ImageApp``, whose
methods are its routes (validation, pixel budgets, PNG/base64, OpenAI's images API, the page and
its ``/v1/live`` WebSocket). ``ImageApp`` leaves two things to a subclass: where a model comes
from (``model``) and how a job reaches it (``submit``).

- ``serve.ImageServer``: the Ray Serve deployment (one deployment, HTTP and the models in the same
  replica): models loaded through Serve's model multiplexing, jobs batched by ``WhenFree``.
- ``local_app.LocalApp``: models loaded in this process, one model call at a time (the plain
  uvicorn server a user would write; tests and the benchmark's anchor).

Every route gets the instance through the ``current`` dependency: under Serve the replica's
object (``serve.ingress`` serves ``api`` from it), in ``local_app`` an override. (Plain route
functions, not ``serve.ingress``' class-based view: a view's methods reach a replica by
reference, from this module, without the ``self`` dependency the view gave them in the driver.)
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from nitro_dist.image_api import (
    MAX_IMAGES,
    SEED_MAX,
    ImageRequest,
    Job,
    OpenAIError,
    Result,
    b64,
    model_card,
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

if TYPE_CHECKING:
    from nitro_dist.served_model import ServedModel

api = FastAPI(title="nitro_dist", description="One-step text-to-image (NitroFusion)")
# docs, API key, body size and read time, request timeout: the limits ImageApp installs
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
    """The model could not take the request now (out of memory): 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def _page() -> str:
    return resources.files("nitro_dist").joinpath("web/index.html").read_text()


class ImageApp:
    """What the routes do, over ``model_names`` (the first the default), with ``limit_args``' pixel
    budgets and ``http``'s limits (installed for ``RequestGuard`` in this process)."""

    max_batch_size = 1  # requests per model call (info only; a batching subclass says more)

    def __init__(self, model_names: Sequence[str], limit_args: LimitArgs, http: HTTPLimits) -> None:
        install(http)
        self.model_names = list(model_names)
        self.model_name = self.model_names[0]  # the default model
        self.limit_args = limit_args
        self.created = int(time.time())  # OpenAI's Model.created: when this app came up
        self.live = LiveStats()  # draw-as-you-type sessions of this process
        self._budgets: dict[str, PixelBudget] = {}

    async def model(self, name: str) -> ServedModel:
        """The served model ``name`` (one of ``model_names``)."""
        raise NotImplementedError

    async def submit(self, job: Job) -> Result | OutOfMemory:
        """``job`` run by its model (``job.model``, a served name)."""
        raise NotImplementedError

    def requested(self, model: str | None) -> str:
        """The model a request asks for: its ``model``, else the default."""
        return model or self.model_name

    def budget(self, m: ServedModel) -> PixelBudget:
        if m.name not in self._budgets:
            self._budgets[m.name] = PixelBudget.resolve(self.limit_args, m.limits)
        return self._budgets[m.name]

    async def info(self, model: str | None = None) -> dict[str, Any]:
        """The model's limits, budgets and fast path (a deployment handle may ask; /healthz
        shows the limits and budgets only)."""
        m = await self.model(self.requested(model))
        budget = self.budget(m)
        return {
            **m.info(),
            "max_batch_size": self.max_batch_size,
            "budgets": {
                "max_request_pixels": budget.max_request_pixels,
                "max_call_pixels": budget.max_call_pixels,
            },
        }

    def _unknown(self, model: str) -> JSONResponse | None:
        """422 naming the field and listing the served models, for a model not served here."""
        if model in self.model_names:
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

    async def _generate(self, job: Job) -> Result:
        result = await self.submit(job)
        if isinstance(result, OutOfMemory):
            raise Unavailable(result.message, result.retry_after)
        return result

    async def healthz(self) -> JSONResponse:
        """Answered by the process that holds the models. Says what a client may ask for,
        nothing of the internals (paths, devices, errors)."""
        info = await self.info()
        public = {k: info[k] for k in ("limits", "budgets")}
        extra = {"models": self.model_names, "live": self.live.__dict__}
        return JSONResponse({"status": "ok", "model": self.model_name, **public, **extra})

    async def images(self, req: ImageRequest) -> Response:
        name = self.requested(req.model)
        if (unknown := self._unknown(name)) is not None:
            return unknown
        m = await self.model(name)
        limits = m.limits
        try:
            height = limits.check_side("height", req.height)
            width = limits.check_side("width", req.width)
            limits.check_size(height, width)
            self.budget(m).check_request(req.num_images, height, width, "num_images")
        except ValueError as e:
            field = str(e).split(":", 1)[0]
            return JSONResponse({"error": str(e), "field": field}, status_code=422)
        seed = req.seed if req.seed is not None else random.randint(0, SEED_MAX - req.num_images)
        if seed + req.num_images - 1 > SEED_MAX:
            return JSONResponse(
                {"error": f"seed: seed + num_images - 1 must be <= {SEED_MAX}", "field": "seed"},
                status_code=422,
            )
        job = Job(req.prompt, req.steps, seed, req.num_images, height, width, name)
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

    async def openai_images(self, request: Request) -> JSONResponse:
        """OpenAI's images API over the same models: the same seed gives the same image as
        ``/v1/images``; errors in OpenAI's shape (400 naming the parameter)."""
        try:
            req = openai_request(await request.body(), self.model_names)
            if (name := self.requested(req.model)) not in self.model_names:
                raise unknown_model(name, self.model_names)
            m = await self.model(name)
            job = openai_job_of(req, m.limits, random.randint(0, SEED_MAX - MAX_IMAGES))
            job.model = m.name
            try:
                self.budget(m).check_request(job.num_images, job.height, job.width, "n")
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
            headers=result_headers(result, job.steps, m.limits.max_tokens),
        )

    async def openai_models(self) -> JSONResponse:
        return JSONResponse(models_list(self.model_names, self.created))

    async def openai_model(self, model: str) -> JSONResponse:
        if model not in self.model_names:
            err = unknown_model(model, self.model_names)
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse(model_card(model, self.created))

    async def live_socket(self, websocket: WebSocket) -> None:
        """Draw as you type: each message a prompt, the newest one of a client always wins."""
        if not authorized(websocket.headers, active_limits().api_key_sha256):
            await websocket.close(code=1008, reason="authorization: send 'Bearer KEY'")
            return
        await live_session(websocket, self._live_image, self.live)

    async def _live_image(self, prompt: str, seed: int, steps: int, model: str | None) -> bytes:
        """One image for the live page, through the same checks and model as /v1/images."""
        name = self.requested(model)
        if name not in self.model_names:
            raise ValueError(f"model: {name!r} is not served; known models: {self.model_names}")
        native = (await self.model(name)).limits.native
        job = Job(prompt, steps, seed, 1, native, native, name)
        try:
            return (await self._generate(job)).pngs[0]
        except Unavailable as e:
            raise ValueError(e.message) from e


async def current() -> ImageApp:
    """The app behind the routes: under Serve the replica's own object (``serve.ImageServer``);
    ``local_app`` overrides this dependency with its ``LocalApp``. Async: FastAPI runs a plain
    ``def`` dependency in its thread pool, a thread hop in and out of every request."""
    from ray import serve

    return serve.get_replica_context().servable_object


App = Annotated[ImageApp, Depends(current)]


@api.get("/", response_class=HTMLResponse)
async def page() -> str:
    return _page()


@api.get("/healthz")
async def healthz(app: App) -> JSONResponse:
    return await app.healthz()


@api.post("/v1/images")
async def images(req: ImageRequest, app: App) -> Response:
    return await app.images(req)


@api.post("/v1/images/generations")
async def openai_images(request: Request, app: App) -> JSONResponse:
    return await app.openai_images(request)


@api.get("/v1/models")
async def openai_models(app: App) -> JSONResponse:
    return await app.openai_models()


@api.get("/v1/models/{model:path}")  # a name given with model_name may hold "/"
async def openai_model(model: str, app: App) -> JSONResponse:
    return await app.openai_model(model)


@api.websocket("/v1/live")
async def live_socket(websocket: WebSocket, app: App) -> None:
    await app.live_socket(websocket)
