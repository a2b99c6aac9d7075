"""``nitro_dist.serve``'s FastAPI app without Ray: the same routes and handlers (the ``Ingress``
class's methods), over models loaded in this process. For tests (a browser against uvicorn on
127.0.0.1, no Ray start) and for trying the page on a laptop:

  python -m nitro_dist.local_app --checkpoint runs/digits [--port 8000]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from nitro_dist.image_api import Job, Result, run_jobs
from nitro_dist.serve_limits import HTTPLimits, LimitArgs, PixelBudget
from nitro_dist.served_model import ServedModel, load_model


class _Call:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    async def remote(self, *args: Any) -> Any:
        return await asyncio.to_thread(self.fn, *args)


class LocalGenerator:
    """What the ingress calls on its generator handle (``options(multiplexed_model_id=...)``,
    ``info.remote()``, ``generate.remote(job)``), answered by in-process models, one model
    call at a time (no Serve batching)."""

    def __init__(self, models: dict[str, ServedModel], model: str = "") -> None:
        self.models = models
        self.model = model or next(iter(models))
        self._lock = threading.Lock()

    def options(self, *, multiplexed_model_id: str = "") -> LocalGenerator:
        out = LocalGenerator(self.models, multiplexed_model_id)
        out._lock = self._lock
        return out

    @property
    def info(self) -> _Call:
        def info() -> dict:
            m = self.models[self.model]
            b = PixelBudget.resolve(LimitArgs(), m.limits)  # the app's default budgets
            budgets = {
                "max_request_pixels": b.max_request_pixels,
                "max_call_pixels": b.max_call_pixels,
            }
            return {**m.info(), "max_batch_size": 1, "budgets": budgets}

        return _Call(info)

    @property
    def generate(self) -> _Call:
        def one(job: Job) -> Result:
            with self._lock:
                return run_jobs(self.models[job.model or self.model].gen, [job])[0]

        return _Call(one)


def local_api(models: dict[str, ServedModel]) -> FastAPI:
    """serve.py's ``api`` with its ``Ingress`` built here over ``models``: Serve injects the
    replica's Ingress into every route as ``self``; here a dependency override does."""
    from nitro_dist import serve

    # the class under Serve's ASGI wrapper (a Deployment: mypy does not apply class decorators)
    ingress_cls = serve.Ingress.func_or_class.__bases__[0]  # type: ignore[attr-defined]
    ingress = object.__new__(ingress_cls)
    ingress_cls.__init__(ingress, LocalGenerator(models), list(models), HTTPLimits())
    deps = {
        inspect.signature(r.endpoint).parameters["self"].default.dependency
        for r in _routes(serve.api.router)
        if getattr(getattr(r, "endpoint", None), "_serve_cls", None) is not None
    }
    assert len(deps) == 1, deps  # one class-based view: serve.ingress's own injector
    serve.api.dependency_overrides[deps.pop()] = lambda: ingress
    return serve.api


def _routes(router: Any) -> list[Any]:
    """Every route, also those under included routers (FastAPI >= 0.137 keeps them nested)."""
    out = []
    for r in router.routes:
        nested = getattr(r, "original_router", None)
        out += _routes(nested) if nested is not None else [r]
    return out


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint or run folder")
    ap.add_argument("--name", default="", help="model name (default: the run folder's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    from nitro_dist.image_api import model_name_of
    from nitro_dist.serve import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    name = args.name or model_name_of(ckpt)
    model = load_model(name, ckpt, device=args.device, dtype="fp32")
    uvicorn.run(local_api({name: model}), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
