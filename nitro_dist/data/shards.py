"""WebDataset shards on local disk or any fsspec URL (s3:// through s3fs), DESIGN.md §3 schema.

One sample per key: ``prompt.txt`` (required); optional ``meta.json`` ({"noise_seed": int}),
``teacher.npy`` (the teacher's x0, fp16), ``embeds.npy`` / ``pooled.npy`` (text conditioning).
Shards are ``{prefix}-{000000..N}.tar`` next to a ``manifest.json`` with per-shard counts.

Reading distinguishes storage trouble from bad data: a shard that cannot be opened (missing,
storage unreachable) is retried a few times and then raises ``DataError`` naming the URL; a
corrupt or truncated shard and undecodable samples are skipped and counted (``BadData``).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import fsspec
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

MANIFEST = "manifest.json"
OPEN_ATTEMPTS = 3


class DataError(ValueError):
    """Storage trouble or an unusable dataset (as opposed to a bad sample, which is skipped)."""


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


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


@dataclass
class ShardList:
    urls: list[str]
    counts: list[int]  # samples per shard from the manifest (-1: unknown)

    @property
    def total(self) -> int:
        return sum(c for c in self.counts if c > 0)


def list_shards(spec: str) -> ShardList:
    """A folder/prefix with a manifest.json, a manifest URL, or a brace pattern
    (``s3://b/pairs-{000000..000009}.tar``) -> shard URLs and counts."""
    spec = spec.rstrip("/")
    manifest = spec if spec.endswith(".json") else join(spec, MANIFEST)
    if "{" not in spec:
        fs, path = _fs(manifest)
        try:
            exists = fs.exists(path)
        except Exception as e:  # noqa: BLE001 - any storage client error
            raise DataError(f"data.shards={spec}: storage unreachable: {e}") from e
        if exists:
            data = json.loads(_read_bytes(manifest))
            base = manifest.rsplit("/", 1)[0]
            return ShardList(
                [join(base, s["name"]) for s in data["shards"]],
                [int(s["count"]) for s in data["shards"]],
            )
        if spec.endswith(".tar"):
            return ShardList([spec], [-1])
        raise DataError(
            f"data.shards={spec}: no {MANIFEST} there (write shards with "
            "python -m nitro_dist.data.write_shards, or give a brace pattern)"
        )
    from braceexpand import braceexpand

    urls = list(braceexpand(spec))
    return ShardList(urls, [-1] * len(urls))


def _fs(url: str):
    return fsspec.core.url_to_fs(url)


def _read_bytes(url: str) -> bytes:
    with open_with_retries(url) as f:
        return f.read()


def open_with_retries(url: str, attempts: int = OPEN_ATTEMPTS, backoff_s: float = 0.5):
    """Open ``url`` for reading; retried, then a ``DataError`` that names the URL."""
    last: Exception | None = None
    for i in range(attempts):
        try:
            return fsspec.open(url, "rb").open()
        except FileNotFoundError as e:
            last = e
        except Exception as e:  # noqa: BLE001 - network/credential errors differ per backend
            last = e
        if i + 1 < attempts:
            time.sleep(backoff_s * 2**i)
    kind = "not found" if isinstance(last, FileNotFoundError) else "storage unreachable"
    raise DataError(f"shard {url}: {kind} after {attempts} attempts ({last})") from last


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


def decode(raw: dict, shard: str, bad: BadData) -> Sample | None:
    key = f"{shard.rsplit('/', 1)[-1]}/{raw.get('__key__')}"
    if "prompt.txt" not in raw:
        bad.add("missing_prompt", f"{key}: no prompt.txt")
        return None
    try:
        prompt = raw["prompt.txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        bad.add("missing_prompt", f"{key}: prompt.txt is not UTF-8")
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


def read_shard(url: str, bad: BadData) -> Iterator[Sample]:
    """Samples of one shard. Storage errors raise ``DataError``; a corrupt or truncated tar
    is skipped from the point of damage on and counted."""
    stream = open_with_retries(url)
    damaged: list[Exception] = []

    def on_error(exn: Exception) -> bool:
        damaged.append(exn)
        return False  # stop reading this shard

    held = None  # a sample is yielded once the next begins: the one at a damage point is cut
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=on_error)
        for raw in group_by_keys(files, handler=on_error):
            if held is not None:
                sample = decode(held, url, bad)
                if sample is not None:
                    yield sample
            held = raw
    except (tarfile.TarError, OSError, EOFError) as e:
        damaged.append(e)
    finally:
        stream.close()
    if held is not None and not damaged:
        sample = decode(held, url, bad)
        if sample is not None:
            yield sample
    if damaged:
        bad.add("corrupt_shards", f"shard {url}: corrupt or truncated ({damaged[0]!r})")


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
    fs, path = _fs(url)
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
    fs, path = _fs(join(out, MANIFEST))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(data, indent=1))
    return data


def probe(spec: str, need_teacher: bool) -> ShardList:
    """Before any worker starts: the shards can be listed and at least one sample decodes
    (with a teacher latent when the offline teacher needs one); else a clear ``DataError``."""
    shards = list_shards(spec)
    bad = BadData()
    for url in shards.urls:
        for sample in read_shard(url, bad):
            if need_teacher and sample.teacher is None:
                raise DataError(
                    f"data.shards={spec}: teacher.mode=offline but {sample.key} has no "
                    "teacher.npy; make pair shards with python -m nitro_dist.prepare, or set "
                    "teacher.mode=online"
                )
            return shards
    why = "; ".join(bad.reasons[:3]) or "the shards are empty"
    raise DataError(f"data.shards={spec}: no readable sample in {len(shards.urls)} shards ({why})")
