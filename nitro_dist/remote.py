"""Checkpoints in object storage (s3://..., any fsspec URL) for inference: find the newest
complete one and copy the parts a generator needs into a local cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from nitro_dist.checkpoint_layout import is_remote, missing_parts, resolve

# what inference reads from a checkpoint (the heads and optimizer state stay remote)
INFERENCE_PARTS = ("generator", "generator_ema", "scheduler", "config.yaml", "trainer_state.json")
CACHE = Path(os.environ.get("NITRO_CACHE", Path.home() / ".cache" / "nitro_dist")) / "checkpoints"

__all__ = ["is_remote", "local_checkpoint", "open_checkpoint", "remote_checkpoint"]


def open_checkpoint(spec: str | Path) -> Path:
    """The local checkpoint folder for a checkpoint or run folder, local or in object storage
    (then its inference parts, copied into the cache): what eval, sample, export and inference
    read."""
    s = str(spec)
    if is_remote(s):
        s = local_checkpoint(remote_checkpoint(s))
    return resolve(s)


def remote_checkpoint(url: str) -> str:
    """``url`` is a checkpoint folder or a run folder (-> its newest complete ``iter_*``)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url.rstrip("/"))
        if not missing_parts(path, fs):
            return url.rstrip("/")
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        raise ValueError(f"checkpoint: nothing at {url}") from None
    except Exception as e:  # unreachable endpoint, bad credentials, ...
        raise ValueError(f"checkpoint: cannot read {url}: {e}") from e
    for name in reversed([n for n in names if n.startswith("iter_")]):
        if not missing_parts(f"{path}/{name}", fs):
            return f"{url.rstrip('/')}/{name}"
    raise ValueError(f"checkpoint: no complete checkpoint under {url}")


def local_checkpoint(spec: str) -> str:
    """A local folder holding the checkpoint's inference parts (``spec`` itself if local)."""
    if not is_remote(spec):
        return spec
    import fsspec

    fs, path = fsspec.core.url_to_fs(spec)
    dest = CACHE / hashlib.sha256(spec.encode()).hexdigest()[:16]
    done = dest / ".complete"
    if not done.exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for part in INFERENCE_PARTS:
            src = f"{path}/{part}"
            if fs.isdir(src):
                fs.get(src, str(tmp / part), recursive=True)
            elif fs.exists(src):
                fs.get_file(src, str(tmp / part))
        (tmp / ".complete").write_text(spec)
        try:
            tmp.rename(dest)
        except OSError:  # another replica on this node finished first
            pass
    return str(dest)
