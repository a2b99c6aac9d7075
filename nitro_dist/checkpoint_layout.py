"""The checkpoint layout: names, completeness, finding the newest one (no training code).

Inference, serving, eval and export read checkpoints through this module alone; the training
side (``checkpoint``) writes the parts.

Layout (DESIGN.md §3)::

    iter_000500/             (Ray Train runs report their checkpoints under this name too)
      generator/           diffusers save_pretrained (safetensors): loads with
                           UNet2DConditionModel.from_pretrained
      generator_ema/       the same for the EMA weights, when EMA is on
      generator_lora/      instead of generator/ for a LoRA student (student.lora.rank > 0):
                           pytorch_lora_weights.safetensors, diffusers' LoRA file
                           (load_lora_weights); the frozen base is the config.yaml's model
                           section, never written
      generator_ema_lora/  the same for the EMA of the adapters
      scheduler/           NitroLCMScheduler config (with the shift)
      optimizer/           G's optimizer state (safetensors + json)
      pool/                manifest.json + head_000123.safetensors (weights + AdamW state)
      deepspeed/engine.json  DeepSpeed engine counters and ZeRO stage (when G ran under DeepSpeed)
      ranks/rank_00000.json  one per rank, written last: the heads it owned and every file it
                           wrote with its size and blake2b checksum (format 2)
      trainer_state.json   iteration, images seen, data cursor, seed, world size
      config.yaml          the resolved config
    latest                 name of the newest committed checkpoint (for people: readers scan the
                           ``iter_*`` folders and take the newest that verifies)

G's optimizer state is consolidated (full tensors per parameter) and heads are stored by global id,
so a checkpoint resumes under any ZeRO stage and on any number of ranks. Only safetensors and
JSON/YAML are read back: no pickle is ever loaded.

A checkpoint counts only when ``verify`` finds nothing wrong: trainer_state.json names the world
size, every rank's part file is there, and every file a part lists has its recorded size and
checksum. Training resume, eval, serve, export and the remote cache all call ``verify``; a run
folder resolves to its newest checkpoint that verifies, with a warning naming each newer one it
skipped (a worker killed while writing, a truncated upload, a flipped bit). Part files of format 1
(no file list, before checksums) still load: for them the part file itself is the only proof.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

LATEST = "latest"
GENERATOR, GENERATOR_EMA, SCHEDULER = "generator", "generator_ema", "scheduler"
GENERATOR_LORA, GENERATOR_EMA_LORA = "generator_lora", "generator_ema_lora"  # LoRA students
TRAINER_STATE, RANKS = "trainer_state.json", "ranks"
# what inference reads from a checkpoint (heads and optimizer state are for training only)
INFERENCE_PARTS = (
    GENERATOR, GENERATOR_EMA, GENERATOR_LORA, GENERATOR_EMA_LORA, SCHEDULER, "config.yaml",
    TRAINER_STATE,
)  # fmt: skip
PART_FORMAT = 2  # 2: part files list their files with sizes and checksums; 1: no file list
HASH = "blake2b"
CHUNK = 8 << 20  # bytes read at a time when hashing (SDXL checkpoints are tens of GB)
TMP_PREFIX = ".tmp-"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it does not verify (a newer one than the one used)."""


def is_remote(url: str) -> bool:
    """An object-storage URL (s3://...), as opposed to a local path."""
    return "://" in url and not url.startswith("file://")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


def rank_file(rank: int) -> str:
    return f"{RANKS}/rank_{rank:05d}.json"


# ---------------------------------------------------------------------------------------------
# writing: temp folder, parts, commit


def begin(root: Path, iteration: int) -> Path:
    """A fresh temp folder to fill; ``commit`` renames it into place. Temp folders that crashed
    writers left behind (their process is gone) are removed first."""
    clean_stale(root)
    tmp = root / f"{TMP_PREFIX}{checkpoint_name(iteration)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(root: Path, prefix: str = TMP_PREFIX) -> list[Path]:
    """Remove ``root/<prefix>...<pid>`` entries (temp folders and pointer files, named with
    their writer's process id) whose process no longer runs on this host: a crash while writing
    a checkpoint. Returns what was removed; live writers' (and our own) are left alone."""
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    prefixes = (prefix, f".{LATEST}.tmp") if prefix == TMP_PREFIX else (prefix,)
    for p in (q for pre in prefixes for q in root.glob(f"{pre}*")):
        pid = re.search(r"(\d+)$", p.name)
        if pid is None or _pid_alive(int(pid.group(1))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def file_hash(path: Path | str, fs: Any = None) -> str:
    """blake2b of the file's bytes, read in chunks (files of many GB)."""
    h = hashlib.blake2b(digest_size=32)
    opener = fs.open if fs is not None else open
    with opener(str(path), "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _expand(folder: Path, written: Iterable[str]) -> list[str]:
    """Relative paths of the files under each written entry (a file or a folder)."""
    out: list[str] = []
    for rel in written:
        p = folder / rel
        if p.is_dir():
            out.extend(
                q.relative_to(folder).as_posix() for q in sorted(p.rglob("*")) if q.is_file()
            )
        elif p.is_file():
            out.append(rel)
    return sorted(set(out))


def write_part(
    folder: Path, rank: int, world_size: int, written: Iterable[str], extra: dict[str, Any]
) -> None:
    """This rank's part file, last: ``written`` (files or folders relative to ``folder``) with
    each file's size and checksum, plus ``extra``. Written atomically (temp name, then rename):
    its presence means the rank's files are all there."""
    files = {
        rel: {"size": (folder / rel).stat().st_size, HASH: file_hash(folder / rel)}
        for rel in _expand(folder, written)
    }
    part = {"format": PART_FORMAT, "rank": rank, "world_size": world_size, **extra, "files": files}
    target = folder / rank_file(rank)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(part, indent=1))
    os.replace(tmp, target)


def commit(root: Path, tmp: Path, iteration: int, keep: int) -> Path:
    """Rename ``tmp`` into place as the iteration's checkpoint; keep the ``keep`` newest that
    verify (sizes) and remove everything older than them."""
    final = root / checkpoint_name(iteration)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.tmp{os.getpid()}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    done = sorted(p for p in root.glob("iter_*") if p.is_dir())
    good = [p for p in done if not verify(p, hash_parts=())]
    if len(good) >= keep:
        oldest_kept = good[-keep]
        for old in done:
            if old.name < oldest_kept.name:
                shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# verifying and finding


def _under(rel: str, parts: Sequence[str] | None) -> bool:
    """``rel`` is one of ``parts`` or inside one of them (None: everything)."""
    if parts is None:
        return True
    return any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in parts)


def _local_fs() -> Any:
    import fsspec

    return fsspec.filesystem("file")


_VERIFIED: dict[tuple, bool] = {}  # local checkpoints that verified, keyed by their file stats


def verify(
    path: Path | str,
    fs: Any = None,
    *,
    parts: Sequence[str] | None = None,
    hash_parts: Sequence[str] | None = None,
) -> list[str]:
    """What is wrong with the checkpoint at ``path`` (empty list: it verifies). The one check
    every reader makes.

    ``parts``: the files (or folders) to check, relative to the checkpoint (None: every file the
    rank parts list); each must be there with its recorded size. ``hash_parts``: those of them
    whose checksum is also checked (None: all of ``parts``; ``()``: none, e.g. a listing of
    object storage). The part files of all ranks must be there in every case. ``fs``: the
    fsspec filesystem holding ``path`` (default: local)."""
    local = fs is None
    fs = fs if fs is not None else _local_fs()
    root = fs._strip_protocol(str(path)).rstrip("/")  # as find() names the files
    try:
        listing = {p[len(root) + 1 :]: info for p, info in fs.find(root, detail=True).items()}
    except FileNotFoundError:
        return [f"{root}: no such folder"]
    key = None
    if local:
        stats = tuple(
            sorted((k, v.get("size"), v.get("mtime"), v.get("ino")) for k, v in listing.items())
        )
        key = (root, _key(parts), _key(hash_parts), stats)
        if _VERIFIED.get(key):
            return []
    problems = _problems(fs, root, listing, parts, parts if hash_parts is None else hash_parts)
    if key is not None and not problems:
        _VERIFIED[key] = True
    return problems


def _key(parts: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if parts is None else tuple(parts)


def _problems(
    fs: Any,
    root: str,
    listing: dict[str, dict[str, Any]],
    parts: Sequence[str] | None,
    hash_parts: Sequence[str] | None,
) -> list[str]:
    if TRAINER_STATE not in listing:
        return [f"{TRAINER_STATE}: missing"]
    try:
        world = int(json.loads(fs.cat_file(f"{root}/{TRAINER_STATE}")).get("world_size", 1))
    except (ValueError, UnicodeDecodeError) as e:
        return [f"{TRAINER_STATE}: unreadable ({e})"]
    problems = []
    for r in range(world):
        name = rank_file(r)
        if name not in listing:
            problems.append(f"{name}: missing (rank {r} did not finish its part)")
            continue
        try:
            part = json.loads(fs.cat_file(f"{root}/{name}"))
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{name}: unreadable ({e})")
            continue
        for rel, rec in sorted(part.get("files", {}).items()):  # format 1: no list to check
            if not _under(rel, parts):
                continue
            info = listing.get(rel)
            if info is None:
                problems.append(f"{rel}: missing (listed by rank {r})")
            elif info.get("size") != rec["size"]:
                problems.append(f"{rel}: {info.get('size')} bytes, rank {r} wrote {rec['size']}")
            elif _under(rel, hash_parts) and file_hash(f"{root}/{rel}", fs) != rec[HASH]:
                problems.append(f"{rel}: checksum differs from what rank {r} wrote (corrupt)")
    return problems


def missing_parts(path: Path | str, fs: Any = None) -> list[str]:
    """The former name of ``verify`` (every file checked)."""
    return verify(path, fs)


def newest_verified(
    root: str,
    fs: Any = None,
    *,
    parts: Sequence[str] | None = None,
    hash_parts: Sequence[str] | None = None,
) -> str | None:
    """The newest ``iter_*`` under ``root`` (a run's ``checkpoints/`` or a Ray Train run folder,
    any fsspec filesystem) that verifies (``verify``'s ``parts`` and ``hash_parts``); a
    ``CheckpointWarning`` names each newer one skipped and why."""
    fs_ = fs if fs is not None else _local_fs()
    root = str(root).rstrip("/")
    try:
        names = sorted(
            (p.rstrip("/").rsplit("/", 1)[-1] for p in fs_.ls(root, detail=False)), reverse=True
        )
    except (FileNotFoundError, NotADirectoryError):
        return None
    skipped: list[str] = []
    found = None
    for name in (n for n in names if n.startswith("iter_")):
        candidate = f"{root}/{name}"
        if not fs_.isdir(candidate):
            continue
        problems = verify(candidate, fs, parts=parts, hash_parts=hash_parts)
        if not problems:
            found = candidate
            break
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        skipped.append(f"{name}: {'; '.join(problems[:3])}{more}")
    if skipped:
        used = f"using {found.rsplit('/', 1)[-1]}" if found else "none verifies"
        warnings.warn(
            f"checkpoints under {root}: skipped {len(skipped)} that do not verify ({used}): "
            + " | ".join(skipped),
            CheckpointWarning,
            stacklevel=3,
        )
    return found


def latest(root: Path, *, parts: Sequence[str] | None = None) -> Path | None:
    """The newest checkpoint under ``root`` whose ``parts`` (None: all) verify, checksums
    included (see ``newest_verified``)."""
    found = newest_verified(str(root), parts=parts)
    return Path(found) if found is not None else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2))


def is_checkpoint(path: Path) -> bool:
    """A training checkpoint folder itself (as opposed to a run folder holding some)."""
    return (path / TRAINER_STATE).exists() or (path / RANKS).is_dir()


def resolve(path: str | Path, *, parts: Sequence[str] | None = None) -> Path:
    """A checkpoint dir, a run's ``checkpoints/`` dir, or a run dir -> the checkpoint dir that
    verifies (a run dir: its newest that does). ``parts``: what the caller reads (None: all;
    readers of the generator pass ``INFERENCE_PARTS``), checked file by file with checksums; the
    part files of every rank must be there in any case. A bare generator folder (``generator/``
    and no training state) is returned as it is."""
    p = Path(path)
    if is_checkpoint(p):
        problems = verify(p, parts=parts)
        if problems:
            raise ValueError(
                f"--checkpoint/--resume: checkpoint {p} does not verify: {'; '.join(problems)}"
            )
        return p
    for candidate in (p, p / "checkpoints"):
        found = latest(candidate, parts=parts)
        if found is not None:
            return found
    if (p / GENERATOR / "config.json").exists():
        return p
    raise ValueError(f"--checkpoint/--resume: no checkpoint found at {p}")


def is_lora(path: Path) -> bool:
    """The checkpoint holds a LoRA student's adapters (``generator_lora/``), not full weights."""
    return (path / GENERATOR_LORA).is_dir()


def generator_dir(path: Path, use_ema: bool = True) -> Path:
    """The weights to sample with: the EMA when there is one and ``use_ema``; a LoRA
    checkpoint's adapter folder (``generator_lora/`` or ``generator_ema_lora/``)."""
    own, ema = (GENERATOR_LORA, GENERATOR_EMA_LORA) if is_lora(path) else (GENERATOR, GENERATOR_EMA)
    return path / ema if use_ema and (path / ema).exists() else path / own
