"""Checkpoints in object storage (s3://..., any fsspec URL) for inference: find the newest one
that verifies and copy the parts a generator needs into a local cache, verified again there."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from nitro_dist.checkpoint_layout import (
    INFERENCE_PARTS,
    RANKS,
    clean_stale,
    is_remote,
    newest_verified,
    resolve,
    verify,
)

CACHE = Path(os.environ.get("NITRO_CACHE", Path.home() / ".cache" / "nitro_dist")) / "checkpoints"

__all__ = [
    "INFERENCE_PARTS",
    "is_remote",
    "local_checkpoint",
    "open_checkpoint",
    "remote_checkpoint",
]


def open_checkpoint(spec: str | Path) -> Path:
    """The local checkpoint folder for a checkpoint or run folder (its newest checkpoint whose
    inference parts verify), local or in object storage (then those parts, copied into the cache
    and verified there): what eval, sample, export and inference read."""
    s = str(spec)
    if is_remote(s):
        s = local_checkpoint(remote_checkpoint(s))
    return resolve(s, parts=INFERENCE_PARTS)


def remote_checkpoint(url: str) -> str:
    """``url`` is a checkpoint folder (it must verify) or a run folder (-> its newest ``iter_*``
    that verifies; newer ones that do not are skipped with a warning). Object storage is checked
    by listing (the inference parts there with their recorded sizes, every rank's part file);
    checksums are checked on the local copy."""
    import fsspec

    url = url.rstrip("/")
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(f"{path}/trainer_state.json") or fs.exists(f"{path}/{RANKS}"):
            problems = verify(path, fs, parts=INFERENCE_PARTS, hash_parts=())
            if problems:
                raise ValueError(f"checkpoint {url} does not verify: {'; '.join(problems)}")
            return url
        if not fs.exists(path):
            raise FileNotFoundError(path)
        found = newest_verified(path, fs, parts=INFERENCE_PARTS, hash_parts=())
    except FileNotFoundError:
        raise ValueError(f"checkpoint: nothing at {url}") from None
    except ValueError:
        raise
    except Exception as e:  # unreachable endpoint, bad credentials, ...
        raise ValueError(f"checkpoint: cannot read {url}: {e}") from e
    if found is None:
        raise ValueError(f"checkpoint: no checkpoint that verifies under {url}")
    return f"{url}/{found.rsplit('/', 1)[-1]}"


def _parts_fingerprint(fs, path: str) -> str:
    h = hashlib.sha256()
    try:
        names = sorted(fs.ls(f"{path}/{RANKS}", detail=False))
    except FileNotFoundError:
        names = []
    for name in names:
        h.update(name.encode())
        h.update(fs.cat_file(name))
    return h.hexdigest()


def local_checkpoint(spec: str) -> str:
    """A local folder holding the checkpoint's inference parts (``spec`` itself if local). The
    copy is marked complete only once its files match the checksums the ranks recorded."""
    if not is_remote(spec):
        return spec
    import fsspec

    fs, path = fsspec.core.url_to_fs(spec)
    # keyed by the URL and what its ranks recorded (every file's size and checksum): a run
    # written again at the same URL is a new copy, never a stale one
    key = f"{spec}\n{_parts_fingerprint(fs, path)}"
    dest = CACHE / hashlib.sha256(key.encode()).hexdigest()[:16]
    done = dest / ".complete"
    if not done.exists():
        clean_stale(CACHE, prefix=f"{dest.name}.tmp")  # copies a killed process left
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for part in (*INFERENCE_PARTS, RANKS):
            src = f"{path}/{part}"
            if fs.isdir(src):
                fs.get(src, str(tmp / part), recursive=True)
            elif fs.exists(src):
                fs.get_file(src, str(tmp / part))
        problems = verify(tmp, parts=INFERENCE_PARTS)
        if problems:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"checkpoint {spec}: the downloaded copy does not verify: {problems}")
        (tmp / ".complete").write_text(spec)
        try:
            tmp.rename(dest)
        except OSError:  # another replica on this node finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
