"""Shard sets without a manifest (webdataset shards written by other tools, e.g. img2dataset):
each shard's sample count from its tar member headers, counted once, in parallel, and cached.

``data.shards=s3://b/pairs-{000000..000999}.tar`` (or a local brace pattern) is expanded, every
shard is stat'ed (one listing per folder: a shard missing from the range is an error naming it),
and the shards not in the cache are counted: Ray tasks when Ray is initialised (the driver of a
training run), a thread pool otherwise; the same ``count_shard`` runs in both. Counting reads
member headers only (local files seek over the data; remote ones stream through fsspec) and
never decodes a member. Counts follow the loader's reading exactly (``shards.raw_samples``): a
corrupt or truncated shard counts the samples before the damage, minus the one cut there.

The cache, ``<name>.index.json`` where ``<name>`` is the pattern's file part without braces
(``pairs-000000..000999.tar.index.json``), is written beside the shards, or where that is not
writable (a read-only bucket) into the fallback folder the caller gives (training: the
``shard_indexes/`` folder of ``distributed.storage_path``). It has the manifest's layout (a list
of shards with counts, each with its full URL), so it can also be given as ``data.shards``. Each
entry keeps the shard's size and ETag (mtime on local disk): a shard whose size or stamp changed
is counted again, the others are reused.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
from webdataset.tariterators import base_plus_ext

from nitro_dist.data.storage import DataError, ShardList, join, open_with_retries

INDEX_SUFFIX = ".index.json"
THREADS = 16  # concurrent shard reads without Ray (I/O bound)
RAY_TASK_CPUS = 0.25  # I/O bound: several counting tasks share a core
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped metadata members


# ---------------------------------------------------------------------------------------------
# one shard


def sample_member(info: tarfile.TarInfo) -> tuple[str, str] | None:
    """(sample key, member suffix) as webdataset's reader groups a tar member; None: skipped."""
    if not info.isreg() or _META.match(info.name):
        return None
    prefix, suffix = base_plus_ext(info.name)
    return None if prefix is None else (prefix, suffix.lower())


def count_shard(url: str, size: int) -> dict[str, Any]:
    """Samples of one shard from its member headers; ``size`` = the file's bytes (a member
    running past it is truncation). Never raises: an unopenable shard gives ``{"error": ...}``,
    a damaged one its readable count and ``damaged`` (the reader skips from the damage on)."""
    try:
        stream = open_with_retries(url)
    except DataError as e:
        return {"url": url, "error": str(e)}
    local = isinstance(fsspec.core.url_to_fs(url)[0], fsspec.implementations.local.LocalFileSystem)
    started, key = 0, None
    suffixes: set[str] = set()  # of the current sample
    members: Counter[str] = Counter()  # member suffix -> samples that have it
    damaged = None
    try:
        # seek over member data on local disk; stream (one sequential read) from remote storage
        with stream, tarfile.open(fileobj=stream, mode="r:*" if local else "r|*") as tf:
            for info in tf:
                tf.members = []  # type: ignore[attr-defined]  # keep no list of 1M headers
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"{info.name} runs past the end ({size} bytes)")
                got = sample_member(info)
                if got is None:
                    continue
                if got[0] != key:
                    started, key, suffixes = started + 1, got[0], set()
                elif got[1] in suffixes:
                    raise ValueError(f"{info.name}: a second {got[1]!r} in sample {key}")
                suffixes.add(got[1])
                members[got[1]] += 1
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        if stream.error is not None:  # the storage kept failing: not a damaged shard
            return {"url": url, "error": stream.error}
        # the reader drops the sample at the damage point (it may be cut)
        damaged, started = f"{type(e).__name__}: {e}", max(0, started - 1)
    return {
        "url": url,
        "count": started,
        "size": size,
        "members": dict(sorted(members.items())),
        "damaged": damaged,
    }


# ---------------------------------------------------------------------------------------------
# many shards


def parallel_map(fn: Callable[..., Any], calls: list[tuple]) -> list[Any]:
    """``[fn(*args) for args in calls]`` as Ray tasks when Ray is initialised (spread over the
    cluster), else on a thread pool. ``fn`` must not raise (return errors as values)."""
    if not calls:
        return []
    if ray_initialized():
        import ray

        @ray.remote(num_cpus=RAY_TASK_CPUS, max_retries=2)
        def nitro_index_shard(*args: Any) -> Any:  # the name shows in Ray's task list
            return fn(*args)

        task = nitro_index_shard.options(name="nitro_index_shard")
        return ray.get([task.remote(*args) for args in calls])
    with ThreadPoolExecutor(max_workers=min(THREADS, len(calls))) as ex:
        return list(ex.map(lambda args: fn(*args), calls))


def ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _stamp(info: dict[str, Any]) -> str:
    """What changes when a file is rewritten: the ETag (S3, GCS), else the modification time."""
    for k in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "created"):
        if info.get(k):
            return str(info[k])
    return ""


def stat_shards(urls: list[str], what: str) -> dict[str, tuple[int, str]]:
    """url -> (size, stamp), one listing per folder. A missing shard or unreachable storage is a
    ``DataError`` naming the URLs (``what``: the config key or pattern that gave them)."""
    by_dir: dict[str, list[str]] = {}
    for u in urls:
        by_dir.setdefault(u.rsplit("/", 1)[0] if "/" in u else ".", []).append(u)
    out: dict[str, tuple[int, str]] = {}
    missing: list[str] = []
    for folder, group in by_dir.items():
        fs, path = fsspec.core.url_to_fs(folder)
        try:
            fs.invalidate_cache(path)
            listing = {i["name"].rstrip("/"): i for i in fs.ls(path, detail=True)}
        except FileNotFoundError:
            listing = {}
        except Exception:  # noqa: BLE001 - no listing (http) or a listing error: stat each
            listing = None
        for u in group:
            p = fsspec.core.url_to_fs(u)[1]
            info = listing.get(p) if listing is not None else _info(fs, p, u, what)
            if info is None or info.get("type") == "directory":
                missing.append(u)
            else:
                out[u] = (int(info["size"]), _stamp(info))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(missing[:5]) + more
        raise DataError(f"{what}: {len(missing)} of {len(urls)} shards not found: {shown}")
    return out


def _info(fs: Any, path: str, url: str, what: str) -> dict | None:
    try:
        return fs.info(path)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - any storage client error
        raise DataError(f"{what}: shard {url}: storage unreachable ({e})") from e


# ---------------------------------------------------------------------------------------------
# the cached index of a brace pattern


def index_locations(pattern: str, fallback_dir: str | None) -> list[str]:
    """Where the index of ``pattern`` is looked for and written: beside the shards (the folder
    before the first brace), then ``fallback_dir`` (the name gets a hash of the whole pattern:
    one fallback folder serves shard sets in many buckets)."""
    head = pattern.split("{", 1)[0]
    folder = head.rsplit("/", 1)[0] if "/" in head else "."
    name = re.sub(r"[{}]", "", pattern[len(folder) + 1 :]).replace("/", "_") + INDEX_SUFFIX
    out = [join(folder, name)]
    if fallback_dir:
        digest = hashlib.sha256(pattern.encode()).hexdigest()[:10]
        out.append(join(fallback_dir, f"{digest}-{name}"))
    return out


def _load(location: str, pattern: str) -> dict[str, Any] | None:
    try:
        fs, path = fsspec.core.url_to_fs(location)
        data = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - unreadable or malformed: index again
        warnings.warn(f"shard index {location} unreadable ({e}); indexing again", stacklevel=3)
        return None
    return data if isinstance(data, dict) and data.get("pattern") == pattern else None


def _save(locations: list[str], data: dict[str, Any]) -> str | None:
    text = json.dumps(data, indent=1).encode()
    errors = []
    for location in locations:
        try:
            fs, path = fsspec.core.url_to_fs(location)
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(path, text)
            return location
        except Exception as e:  # noqa: BLE001 - read-only folder or bucket: try the next place
            errors.append(f"{location}: {e}")
    warnings.warn(f"shard index not cached ({'; '.join(errors)})", stacklevel=3)
    return None


def index_pattern(pattern: str, fallback_dir: str | None = None) -> ShardList:
    """The shards of a brace pattern with their sample counts (cached, see the module doc)."""
    from braceexpand import braceexpand

    what = f"data.shards={pattern}"
    urls = list(braceexpand(pattern))
    stats = stat_shards(urls, what)
    locations = index_locations(pattern, fallback_dir)
    cached: dict[str, dict[str, Any]] = {}
    for location in locations:
        data = _load(location, pattern)
        if data is not None:
            cached = {s["url"]: s for s in data.get("shards", []) if "url" in s}
            break
    entries: dict[str, dict[str, Any]] = {}
    todo = []
    for u in urls:
        old = cached.get(u)
        size, stamp = stats[u]
        if old is not None and old.get("size") == size and old.get("stamp") == stamp:
            entries[u] = old
        else:
            todo.append((u, size))
    for got in parallel_map(count_shard, todo):
        if "error" in got:
            raise DataError(f"{what}: {got['error']}")
        got["stamp"] = stats[got["url"]][1]
        got["name"] = got["url"].rsplit("/", 1)[-1]
        entries[got["url"]] = got
    shards = [entries[u] for u in urls]
    for s in shards:
        if s.get("damaged") and (s["url"], s["size"]) in todo:
            warnings.warn(
                f"shard {s['url']}: corrupt or truncated ({s['damaged']}); "
                f"{s['count']} samples readable before the damage",
                stacklevel=2,
            )
    if todo:
        _save(
            locations,
            {
                "kind": "index",
                "pattern": pattern,
                "shards": shards,
                "total": sum(s["count"] for s in shards),
            },
        )
    return ShardList(urls, [int(s["count"]) for s in shards], info=shards)
