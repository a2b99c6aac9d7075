"""What the image API does, without Ray: the request schema, its limits, batched generation
grouped by (steps, size), and PNG encoding. ``nitro_dist.serve`` puts this behind Ray Serve."""

from __future__ import annotations

import base64
import io
import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from nitro_dist.images import to_pil, to_uint8_hwc
from nitro_dist.inference import Generator

MAX_IMAGES = 8  # per request
MAX_PROMPT_CHARS = 2000  # longer bodies are refused; token truncation happens well before
SEED_MAX = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    """Sizes the loaded generator accepts, in pixels: multiples of ``multiple`` from
    ``min_side`` to ``max_side`` (half to twice the training size)."""

    native: int
    multiple: int
    min_side: int
    max_side: int
    max_tokens: int
    channels: int
    # (height, width) pairs: when given, the only sizes served (a replica on the fast path
    # serves the sizes it warmed); empty: every size the sides allow
    sizes: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, gen: Generator) -> Limits:
        native, m = gen.native_size, gen.size_multiple
        return cls(
            native=native,
            multiple=m,
            min_side=max(m, (native // 2) // m * m),
            max_side=native * 2,
            max_tokens=gen.text.max_length,
            channels=gen.sample_shape[0],
        )

    def check_side(self, name: str, value: int | None) -> int:
        if value is None:
            return self.native
        if not self.min_side <= value <= self.max_side or value % self.multiple:
            raise ValueError(
                f"{name}: {value} is not allowed; use a multiple of {self.multiple} from "
                f"{self.min_side} to {self.max_side} (trained at {self.native})"
            )
        return value

    def check_size(self, height: int, width: int) -> None:
        """Refuse a (height, width) outside ``sizes`` (when the replica serves a fixed set)."""
        if self.sizes and (height, width) not in {tuple(s) for s in self.sizes}:
            served = ", ".join(f"{w}x{h}" for h, w in self.sizes)
            raise ValueError(
                f"size: {width}x{height} (width x height) is not served here; this server serves "
                f"{served}"
            )


StrictInt = Annotated[int, Field(strict=True)]


def not_blank(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("must not be empty or only spaces")
    return prompt


class ImageRequest(BaseModel):
    """Body of ``POST /v1/images``. Unknown fields are refused (a typo never goes unnoticed)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    steps: StrictInt = Field(default=1, ge=1, le=4)
    seed: StrictInt | None = Field(default=None, ge=0, le=SEED_MAX)
    num_images: StrictInt = Field(default=1, ge=1, le=MAX_IMAGES)
    height: StrictInt | None = None
    width: StrictInt | None = None
    format: Literal["json", "png"] = "json"
    model: str | None = None  # one of the served models; None: the first (GET /v1/models)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        return not_blank(v)


@dataclass
class Job:
    """One request as the generator replica sees it; ``num_images`` images from seed, seed+1…"""

    prompt: str
    steps: int
    seed: int
    num_images: int
    height: int
    width: int
    model: str = ""  # the served model's name; "": the first

    def key(self) -> tuple[int, int, int]:
        return (self.steps, self.height, self.width)


@dataclass
class Result:
    pngs: list[bytes]
    seeds: list[int]
    prompt_tokens: int
    truncated: bool
    batch_images: int = 0  # images in the generator call this job rode in
    meta: dict = field(default_factory=dict)


def encode_png(image_CHW: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    to_pil(to_uint8_hwc(image_CHW[None])[0]).save(buf, format="PNG")
    return buf.getvalue()


def png_strip(pngs: list[bytes]) -> bytes:
    """Several PNGs side by side in one PNG (the ``format: png`` answer for num_images > 1)."""
    from PIL import Image

    imgs = [Image.open(io.BytesIO(p)) for p in pngs]
    strip = Image.new(imgs[0].mode, (sum(i.width for i in imgs), imgs[0].height))
    x = 0
    for img in imgs:
        strip.paste(img, (x, 0))
        x += img.width
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return buf.getvalue()


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def run_jobs(
    gen: Generator, jobs: list[Job], call: Callable[..., torch.Tensor] | None = None
) -> list[Result]:
    """Generate for many requests at once: one generator call per (steps, height, width) group,
    results back in request order. Same seed -> same image, whatever the batch-mates. ``call``:
    what generates a group instead of ``gen(prompts, seeds, steps, (h, w))`` (serve_limits cuts
    it to a pixel budget)."""
    groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[job.key()].append(i)
    results: list[Result | None] = [None] * len(jobs)
    for (steps, h, w), idx in groups.items():
        prompts, seeds = [], []
        for i in idx:
            job = jobs[i]
            prompts += [job.prompt] * job.num_images
            seeds += [job.seed + k for k in range(job.num_images)]
        images = (call or gen)(prompts, seeds, steps, (h, w))
        start = 0
        for i in idx:
            job = jobs[i]
            n_tok = gen.prompt_tokens(job.prompt)
            chunk = images[start : start + job.num_images]
            start += job.num_images
            results[i] = Result(
                pngs=[encode_png(im) for im in chunk],
                seeds=seeds[start - job.num_images : start],
                prompt_tokens=n_tok,
                truncated=n_tok > gen.text.max_length,
                batch_images=len(prompts),
            )
    return results  # type: ignore[return-value]


def result_headers(result: Result, steps: int, max_tokens: int) -> dict[str, str]:
    """What both image endpoints say beside the images: seeds, steps, prompt tokens, and a
    warning when the text encoder read only the first ``max_tokens`` tokens."""
    headers = {
        "X-Seeds": ",".join(map(str, result.seeds)),
        "X-Steps": str(steps),
        "X-Prompt-Tokens": str(result.prompt_tokens),
        "X-Batch-Images": str(result.batch_images),  # images in the model call it rode in
    }
    if result.truncated:
        headers["X-Prompt-Truncated"] = (
            f"prompt has {result.prompt_tokens} tokens; the text encoder read the first "
            f"{max_tokens}"
        )
    return headers


# --- OpenAI-compatible images API: POST /v1/images/generations, GET /v1/models ---------------
# The same limits and the same images as /v1/images; requests, answers and errors in OpenAI's
# shapes, so the ``openai`` client (and tools built on it) can call this server.

OWNER = "nitro_dist"


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {message, type, param, code}}``. OpenAI
    answers a bad parameter with 400 (``param`` names it) and an unknown model with 404."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class OpenAIImageRequest(BaseModel):
    """Body of ``POST /v1/images/generations``: OpenAI's parameters this server honours, plus
    ``steps`` and ``seed`` (the ``openai`` client sends them with ``extra_body``). Other OpenAI
    parameters (quality, style, background...) are refused, not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None  # None: the served model
    n: StrictInt | None = Field(default=None, ge=1, le=MAX_IMAGES)  # None: 1
    size: str | None = None  # "WIDTHxHEIGHT" or "auto"; None/"auto": the training size
    response_format: str | None = None  # only "b64_json"
    user: str | None = None  # accepted (OpenAI's end-user id), not used
    steps: StrictInt = Field(default=1, ge=1, le=4)
    seed: StrictInt | None = Field(default=None, ge=0, le=SEED_MAX)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        return not_blank(v)

    @field_validator("response_format")
    @classmethod
    def _b64_only(cls, v: str | None) -> str | None:
        if v == "url":
            raise ValueError(
                "'url' is not supported: this server keeps no images to link to; "
                "use 'b64_json' (the default)"
            )
        if v not in (None, "b64_json"):
            raise ValueError(f"{v!r} is not supported; use 'b64_json'")
        return v


def _pydantic_error(err: ErrorDetails) -> OpenAIError:
    param = ".".join(str(p) for p in err.get("loc", ())) or None
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        supported = ", ".join(OpenAIImageRequest.model_fields)
        msg = f"unknown or unsupported parameter (supported: {supported})"
    if err.get("type") == "missing":
        msg = "required parameter missing"
    return OpenAIError(400, f"{param or 'body'}: {msg}", param)


def parse_size(size: str | None, limits: Limits) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` -> (height, width), each side within ``limits`` (as ``/v1/images``
    checks ``height`` and ``width``); None or ``"auto"``: the training size."""
    if size is None or size == "auto":
        return limits.native, limits.native
    m = re.fullmatch(r"([0-9]+)x([0-9]+)", size)
    if m is None:
        raise OpenAIError(
            400,
            f"size: {size!r} is not WIDTHxHEIGHT (e.g. '{limits.native}x{limits.native}')",
            "size",
        )
    try:
        width = limits.check_side("width", int(m[1]))
        height = limits.check_side("height", int(m[2]))
        limits.check_size(height, width)
    except ValueError as e:
        raise OpenAIError(400, f"size: {size!r}: {e}", "size") from None
    return height, width


def openai_job(
    body: bytes, limits: Limits, model_names: str | Sequence[str], random_seed: int
) -> Job:
    """A ``POST /v1/images/generations`` body -> the Job ``/v1/images`` would run for the same
    prompt, steps, seed, count and size; ``random_seed`` is used when the body has no seed.
    Raises OpenAIError (400 naming the parameter, 404 ``model_not_found``)."""
    req = openai_request(body, model_names)
    return openai_job_of(req, limits, random_seed)


def openai_request(body: bytes, model_names: str | Sequence[str]) -> OpenAIImageRequest:
    """The body parsed and checked (its ``model`` one of ``model_names``), before the model's
    limits are known. Raises OpenAIError as ``openai_job``."""
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"body: malformed JSON ({e})") from None
    if not isinstance(raw, dict):
        raise OpenAIError(400, f"body: expected a JSON object, got {type(raw).__name__}")
    try:
        req = OpenAIImageRequest.model_validate(raw)
    except ValidationError as e:
        raise _pydantic_error(e.errors()[0]) from None
    if req.model is not None and req.model not in _names(model_names):
        raise unknown_model(req.model, model_names)
    return req


def openai_job_of(req: OpenAIImageRequest, limits: Limits, random_seed: int) -> Job:
    """The Job for a checked request, its size within the model's ``limits``."""
    height, width = parse_size(req.size, limits)
    n = req.n if req.n is not None else 1
    seed = req.seed if req.seed is not None else random_seed
    if seed + n - 1 > SEED_MAX:
        raise OpenAIError(400, f"seed: seed + n - 1 must be <= {SEED_MAX}", "seed")
    return Job(req.prompt, req.steps, seed, n, height, width, model=req.model or "")


def openai_images_response(result: Result, job: Job, created: int) -> dict:
    """OpenAI's ``ImagesResponse``: base64 PNGs in ``data``, in seed order."""
    return {
        "created": created,
        "data": [{"b64_json": b64(p), "revised_prompt": None} for p in result.pngs],
        "output_format": "png",
        "size": f"{job.width}x{job.height}",
    }


def model_card(name: str, created: int) -> dict:
    """One entry of ``GET /v1/models`` (OpenAI's ``Model``)."""
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}


def _names(names: str | Sequence[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def models_list(names: str | Sequence[str], created: int) -> dict:
    return {"object": "list", "data": [model_card(n, created) for n in _names(names)]}


def unknown_model(model: str, names: str | Sequence[str]) -> OpenAIError:
    return OpenAIError(
        404,
        f"model: {model!r} does not exist here; this server serves: {', '.join(_names(names))}",
        "model",
        code="model_not_found",
    )


def model_name_of(checkpoint: str) -> str:
    """The served model's name from its checkpoint: the run folder's name for
    ``RUN/checkpoints/iter_N`` (or ``RUN/iter_N``), else the folder's own name (a bare generator
    folder); local paths and ``s3://`` URLs alike."""
    parts = [p for p in checkpoint.rstrip("/").split("/") if p]
    if parts and parts[-1].startswith("iter_"):
        parts.pop()
    if parts and parts[-1] == "checkpoints":
        parts.pop()
    if not parts or parts[-1].endswith(":"):
        raise ValueError(
            f"model_name: cannot name the model after {checkpoint!r}; pass model_name="
        )
    return parts[-1]
