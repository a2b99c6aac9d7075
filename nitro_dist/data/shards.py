"""WebDataset shards on local disk or any fsspec URL (s3:// through s3fs), DESIGN.md §3 schema.

One sample per key: the caption (``prompt.txt``; ``data.caption_key`` names another member or a
JSON field, e.g. ``txt`` or ``json:caption`` for img2dataset shards); optional ``meta.json``
({"noise_seed": int}), ``teacher.npy`` (the teacher's x0, fp16), ``embeds.npy`` / ``pooled.npy``
(text conditioning); other members (images) are never decoded. Shards are
``{prefix}-{000000..N}.tar`` next to a ``manifest.json`` with per-shard counts, or any tar set
given as a brace pattern, counted once from its tar headers and cached (``data/index.py``).

Reading distinguishes storage trouble from bad data: a shard that cannot be opened (missing,
storage unreachable, a read broken by a dropped connection, 5xx or throttling) is retried with
backoff (``nitro_dist.retry``, ``storage.*``; a read resumes at its byte offset, so the samples are
the same as without the fault) and then raises ``DataError`` naming the URL; only a shard whose
bytes are bad (corrupt or truncated) and undecodable samples are skipped and counted (``BadData``).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from nitro_dist.data.prompts import CaptionKey
from nitro_dist.data.storage import (
    DataError,
    ShardList,
    join,
    open_with_retries,
    read_bytes,
    url_fs,
)

PROMPT_TXT = CaptionKey("prompt.txt")  # the caption member of the shards nitro_dist writes

MANIFEST = "manifest.json"


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192):
    """webdataset opener for any fsspec URL (webdataset 1.0.2 has no s3:// handler)."""
    return fsspec.open(url, mode).open()


def register_fsspec_schemes(schemes: Iterable[str] = ("s3", "gcs", "az", "abfs", "memory")):
    """Make ``wds.WebDataset("s3://...")`` (and the other schemes) read through fsspec."""
    for scheme in schemes:
        wds.gopen_schemes[scheme] = gopen_fsspec


register_fsspec_schemes()


# ---------------------------------------------------------------------------------------------
# naming and listing


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


_RESOLVED: dict[str, ShardList] = {}  # data.shards -> its list, as the driver resolved it


def use_resolved(spec: str, shards: ShardList) -> None:
    """A training worker takes the shard list the driver checked (no second indexing)."""
    _RESOLVED[spec] = shards


def list_shards(spec: str, *, index_dir: str | None = None) -> ShardList:
    """Shard URLs and counts of: a folder/prefix with a manifest.json, a manifest URL (an index
    file too), or a brace pattern (``s3://b/pairs-{000000..000009}.tar``: counted from the tar
    headers once and cached by ``index.index_pattern``; ``index_dir`` = where the index goes
    if it cannot be written beside the shards)."""
    if spec in _RESOLVED:
        return _RESOLVED[spec]
    spec = spec.rstrip("/")
    if "{" in spec:
        from nitro_dist.data.index import index_pattern

        return index_pattern(spec, index_dir)
    manifest = spec if spec.endswith(".json") else join(spec, MANIFEST)
    fs, path = url_fs(manifest)
    try:
        exists = fs.exists(path)
    except Exception as e:  # noqa: BLE001 - any storage client error
        raise DataError(f"data.shards={spec}: storage unreachable: {e}") from e
    if exists:
        data = json.loads(read_bytes(manifest))
        base = manifest.rsplit("/", 1)[0]
        return ShardList(
            [s.get("url") or join(base, s["name"]) for s in data["shards"]],
            [int(s["count"]) for s in data["shards"]],
        )
    if spec.endswith(".tar"):
        return ShardList([spec], [-1])
    raise DataError(
        f"data.shards={spec}: no {MANIFEST} there (write shards with "
        "python -m nitro_dist.data.write_shards, or give the shards as a brace pattern, "
        "e.g. data.shards=s3://bucket/data-{000000..000099}.tar)"
    )


# ---------------------------------------------------------------------------------------------
# samples


@dataclass
class Sample:
    key: str  # "<shard file>/<key>": unique within a dataset
    prompt: str
    noise_seed: int
    teacher: torch.Tensor | None = None  # C x H x W x0 as stored (fp16; offline teacher mode)


@dataclass
class BadData:
    """Counts of what was skipped (logged with the training metrics)."""

    corrupt_shards: int = 0
    missing_prompt: int = 0
    bad_latent: int = 0
    bad_meta: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, kind: str, why: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.reasons) < 20:
            self.reasons.append(why)
        warnings.warn(f"skipped: {why}", stacklevel=3)

    def merge(self, other: BadData) -> None:
        for k in ("corrupt_shards", "missing_prompt", "bad_latent", "bad_meta"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.reasons.extend(other.reasons[: max(0, 20 - len(self.reasons))])

    def as_metrics(self) -> dict[str, int]:
        return {
            "data_corrupt_shards": self.corrupt_shards,
            "data_missing_prompt": self.missing_prompt,
            "data_bad_latent": self.bad_latent,
            "data_bad_meta": self.bad_meta,
        }


def seed_from_key(key: str) -> int:
    """A stable noise seed for samples written without one."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little") >> 1


def decode(raw: dict, shard: str, bad: BadData, caption: CaptionKey = PROMPT_TXT) -> Sample | None:
    key = f"{shard.rsplit('/', 1)[-1]}/{raw.get('__key__')}"
    try:
        prompt = caption.extract(raw)
    except LookupError as e:
        bad.add("missing_prompt", f"{key}: no caption {caption} ({e})")
        return None
    seed = seed_from_key(key)
    if "meta.json" in raw:
        try:
            seed = int(json.loads(raw["meta.json"])["noise_seed"])
        except (ValueError, KeyError, TypeError):
            bad.add("bad_meta", f"{key}: meta.json has no integer noise_seed")
            return None
    teacher = None
    if "teacher.npy" in raw:
        try:
            arr = np.load(io.BytesIO(raw["teacher.npy"]), allow_pickle=False)
            if arr.ndim != 3 or not np.isfinite(arr).all():
                raise ValueError(f"shape {arr.shape}")
            teacher = torch.from_numpy(arr)  # as stored (fp16): half the bytes between processes
        except Exception as e:  # noqa: BLE001 - numpy raises several types for bad bytes
            bad.add("bad_latent", f"{key}: teacher.npy undecodable ({e})")
            return None
    return Sample(key, prompt, seed, teacher)


def raw_samples(url: str, bad: BadData) -> Iterator[dict]:
    """One shard's samples as member suffix -> bytes. Storage errors (retried first, a broken
    read resumes at its offset) raise ``DataError`` naming the URL; a corrupt or truncated tar
    is read up to the damage (the sample cut there is dropped) and counted
    (``index.count_shard`` counts exactly these)."""
    stream = open_with_retries(url)
    damaged: list[Exception] = []

    def on_error(exn: Exception) -> bool:
        if stream.error is None:  # else: the storage failed, not the data (raised below)
            damaged.append(exn)
        return False  # stop reading this shard

    held = None  # a sample is yielded once the next begins: the one at a damage point is cut
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=on_error)
        for raw in group_by_keys(files, handler=on_error):
            if held is not None:
                yield held
            held = raw
    except (tarfile.TarError, OSError, EOFError) as e:
        if stream.error is None:
            damaged.append(e)
    finally:
        stream.close()
    if stream.error is not None:  # reads kept failing after retries: an error, not bad data
        raise DataError(stream.error)
    if held is not None and not damaged:
        yield held
    if damaged:
        bad.add("corrupt_shards", f"shard {url}: corrupt or truncated ({damaged[0]!r})")


def read_shard(url: str, bad: BadData, caption: CaptionKey = PROMPT_TXT) -> Iterator[Sample]:
    """Decoded samples of one shard (``raw_samples``); undecodable ones skipped and counted."""
    for raw in raw_samples(url, bad):
        sample = decode(raw, url, bad, caption)
        if sample is not None:
            yield sample


# ---------------------------------------------------------------------------------------------
# writing


def encode(
    key: str,
    prompt: str,
    noise_seed: int,
    teacher: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> dict:
    sample = {
        "__key__": key,
        "prompt.txt": prompt.encode("utf-8"),
        "meta.json": json.dumps({"noise_seed": int(noise_seed)}).encode(),
    }
    arrays = dict(extra or {})
    if teacher is not None:
        arrays["teacher"] = teacher.astype(np.float16)
    for name, arr in arrays.items():
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        sample[f"{name}.npy"] = buf.getvalue()
    return sample


def write_shard(url: str, samples: Iterable[dict]) -> int:
    """Write one tar shard at ``url`` (written under a temporary name, then moved into place, so
    a reader or a resumed job never sees half a shard). Returns the sample count."""
    fs, path = url_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp"
    n = 0
    with fs.open(tmp, "wb") as f:
        writer = wds.TarWriter(f)
        for s in samples:
            writer.write(s)
            n += 1
        writer.close()
    fs.mv(tmp, path)
    return n


def write_manifest(out: str, names: list[str], counts: list[int], extra: dict | None = None):
    data = {
        "shards": [{"name": n, "count": c} for n, c in zip(names, counts, strict=True)],
        "total": int(sum(counts)),
        **(extra or {}),
    }
    fs, path = url_fs(join(out, MANIFEST))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(data, indent=1))
    return data
