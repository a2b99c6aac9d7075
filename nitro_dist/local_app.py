"""``nitro_dist.serve``'s HTTP API without Ray: ``image_app.ImageApp``'s routes over models
loaded in this process, one model call at a time (no batching): the plain FastAPI + uvicorn
server a user would write. For tests (a browser against uvicorn on 127.0.0.1, no Ray start), the
benchmark's anchor (``benchmarks/serve_load.py``) and trying the page on a laptop:

  python -m nitro_dist.local_app --checkpoint runs/digits [--port 8000]
"""

from __future__ import annotations

import argparse
import asyncio
import threading

from fastapi import FastAPI

from nitro_dist.image_api import Job, Result, run_jobs
from nitro_dist.image_app import ImageApp, api, current
from nitro_dist.serve_limits import HTTPLimits, LimitArgs
from nitro_dist.served_model import ServedModel, load_model


class LocalApp(ImageApp):
    """The routes over in-process ``models`` (the first the default), the app's default limits;
    each job runs alone in a worker thread, one at a time."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        super().__init__(list(models), LimitArgs(), HTTPLimits())
        self.models = models
        self._lock = threading.Lock()  # one model call at a time, whichever event loop asks

    async def model(self, name: str) -> ServedModel:
        return self.models[name]

    async def submit(self, job: Job) -> Result:
        def one() -> Result:
            with self._lock:
                return run_jobs(self.models[job.model].gen, [job])[0]

        return await asyncio.to_thread(one)


def local_api(models: dict[str, ServedModel]) -> FastAPI:
    """The app's ``api`` with a ``LocalApp`` over ``models`` behind every route (under Serve the
    replica's object is; here a dependency override)."""
    app = LocalApp(models)

    async def this() -> ImageApp:  # async: no thread-pool hop per request (see ``current``)
        return app

    api.dependency_overrides[current] = this
    return api


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
