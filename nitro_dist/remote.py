"""Checkpoints in object storage (s3://..., any fsspec URL) for inference: find the newest one
that verifies and copy the parts a generator needs into a local cache, verified again there; and
the run's uploads (``sync_dir``). Every storage call is retried on transient errors
(``nitro_dist.retry``, ``storage.*``)."""

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
        return _retried(f"checkpoint {url}", lambda: _find_remote(url, fs, path))
    except FileNotFoundError:
        raise ValueError(f"checkpoint: nothing at {url}") from None
    except ValueError:
        raise
    except Exception as e:  # unreachable endpoint, bad credentials, ...
        raise ValueError(f"checkpoint: cannot read {url}: {e}") from e


def _find_remote(url: str, fs, path: str) -> str:
    """``remote_checkpoint``'s one attempt (listing and part files; retried as a whole)."""
    if fs.exists(f"{path}/trainer_state.json") or fs.exists(f"{path}/{RANKS}"):
        problems = verify(path, fs, parts=INFERENCE_PARTS, hash_parts=())
        if problems:
            raise ValueError(f"checkpoint {url} does not verify: {'; '.join(problems)}")
        return url
    if not fs.exists(path):
        raise FileNotFoundError(path)
    found = newest_verified(path, fs, parts=INFERENCE_PARTS, hash_parts=())
    if found is None:
        raise ValueError(f"checkpoint: no checkpoint that verifies under {url}")
    return f"{url}/{found.rsplit('/', 1)[-1]}"


def _retried(what: str, fn):
    """``fn()`` under the process's storage retry policy (``nitro_dist.retry``)."""
    from nitro_dist import retry

    return retry.call(fn, what)


def put_file(local: str | Path, url: str) -> None:
    """Upload one file to ``url`` (any fsspec URL); transient errors retried (an S3 PUT is whole
    or absent, so a retry never leaves half a file)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    _retried(f"upload {local} -> {url}", lambda: fs.put_file(str(local), path))


def get_file(url: str, local: str | Path) -> None:
    """Download ``url`` to ``local``; transient errors retried."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    _retried(f"download {url}", lambda: fs.get_file(path, str(local)))


def sync_dir(local: Path, url: str, uploaded: dict[Path, float] | None = None) -> list[str]:
    """Upload the files of ``local`` under ``url`` that changed since the last call (``uploaded``:
    file -> mtime at its upload, updated here); ``ranks/`` part files go last, so a checkpoint
    folder in it verifies only once everything it lists is there. Returns the URLs written."""
    seen = uploaded if uploaded is not None else {}
    files = sorted(
        (f for f in local.rglob("*") if f.is_file()),
        key=lambda f: (RANKS in f.relative_to(local).parts, f.as_posix()),
    )
    out = []
    for f in files:
        mtime = f.stat().st_mtime
        if seen.get(f) == mtime:
            continue
        target = f"{url.rstrip('/')}/{f.relative_to(local).as_posix()}"
        put_file(f, target)
        seen[f] = mtime
        out.append(target)
    return out


def _parts_fingerprint(fs, path: str) -> str:
    h = hashlib.sha256()
    try:
        names = sorted(fs.ls(f"{path}/{RANKS}", detail=False))
    except FileNotFoundError:
        names = []
    for name in names:
        h.update(name.encode())
        h.update(_retried(f"read {name}", lambda n=name: fs.cat_file(n)))
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
            found = _retried(f"list {spec}/{part}", lambda s=src: fs.find(s, withdirs=False))
            for name in found:  # file by file: a retry repeats one file, not the folder
                rel = name[len(path) + 1 :]
                _retried(
                    f"download {spec}/{rel}",
                    lambda n=name, r=rel: (
                        (tmp / r).parent.mkdir(parents=True, exist_ok=True),
                        fs.get_file(n, str(tmp / r)),
                    ),
                )
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
