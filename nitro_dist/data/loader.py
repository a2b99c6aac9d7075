"""The training loader for WebDataset shards: one rank's samples, epoch by epoch.

Order and split are pure functions of (seed, epoch), so every rank agrees without talking:
1. the shard list is permuted by (seed, epoch);
2. shards go, in that order, to the rank with the fewest samples so far (manifest counts);
3. every rank yields exactly ``epoch_length`` = the smallest rank total samples in the epoch
   ("equalised split": shards need not divide evenly, no rank runs dry and hangs the others'
   collectives, no sample is yielded twice within an epoch);
4. within a rank, DataLoader worker w reads the rank's shards w, w+k, ...; each worker shuffles
   through a buffer seeded by (seed, epoch, rank, worker); the main process takes the workers'
   samples round-robin (deterministic).
The cursor (epoch, samples consumed this epoch) goes into the checkpoint; a resumed run replays
the epoch's stream up to it. If bad data leaves a rank short of ``epoch_length`` it wraps around
its own stream for the rest of the epoch (counted as ``data_refilled``), never blocking.

``check_dataset`` is the driver's check before any worker starts: the loader's own checks
(``check_split``, the caption key, a readable sample) on the same code, so what would fail in a
worker fails on the driver first, naming the reason and the URL.
"""

from __future__ import annotations

import random
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nitro_dist import retry, rng
from nitro_dist.data.index import stat_shards
from nitro_dist.data.prompts import CaptionKey
from nitro_dist.data.shards import (
    BadData,
    DataError,
    Sample,
    ShardList,
    decode,
    list_shards,
    raw_samples,
    read_shard,
)

CHUNK = 16  # samples per message from a loader worker
SHARDS_STREAM = 9  # rng stream id for the shard permutation (rng.py holds streams 1-8)


def shard_assignment(counts: list[int], seed: int, epoch: int, world: int) -> list[list[int]]:
    """shards[rank] for one epoch: permuted by (seed, epoch), greedily balanced by count."""
    g = rng.keyed_generator(seed, epoch, SHARDS_STREAM)
    order = torch.randperm(len(counts), generator=g).tolist()
    totals = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for s in order:
        r = min(range(world), key=lambda i: (totals[i], i))
        out[r].append(s)
        totals[r] += counts[s]
    return out


def epoch_length(counts: list[int], seed: int, epoch: int, world: int) -> int:
    parts = shard_assignment(counts, seed, epoch, world)
    return min(sum(counts[s] for s in p) for p in parts)


def check_split(
    shards: ShardList, world_size: int, batch_size: int = 0, seed: int = 0, epoch: int = 0
) -> None:
    """The shards can be split over ``world_size`` ranks (and, given ``batch_size`` per rank,
    ``epoch`` gives every rank at least one batch); else a ``DataError`` saying why."""
    if any(c < 0 for c in shards.counts):
        raise DataError(
            "data.shards: per-shard counts are needed to split shards over ranks; point "
            "data.shards at a folder with a manifest.json (write_shards and prepare write one) "
            "or give the shards as a brace pattern (their counts are read once from the tars)"
        )
    if len(shards.urls) < world_size:
        raise DataError(
            f"data.shards: {len(shards.urls)} shards for {world_size} workers; need at least "
            "one shard per worker (write smaller shards)"
        )
    if batch_size:
        n = epoch_length(shards.counts, seed, epoch, world_size)
        if n < batch_size:
            raise DataError(
                f"data.shards: an epoch has {n} samples per worker, fewer than the per-worker "
                f"batch of {batch_size}"
            )


class _EpochStream(IterableDataset):
    """One rank's shards for one epoch; DataLoader workers split them by index."""

    def __init__(
        self, urls: list[str], seed: int, epoch: int, rank: int, buffer: int, caption: CaptionKey
    ) -> None:
        self.urls, self.seed, self.epoch, self.rank, self.buffer = urls, seed, epoch, rank, buffer
        self.caption = caption
        self.policy = retry.current()  # for loader workers started without fork

    def __iter__(self) -> Iterator[tuple | BadData]:
        """Chunks of CHUNK samples (one message between processes per chunk, not per sample),
        and each shard's skip counts."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        retry.configure(self.policy)
        r = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{wid}")
        bad = BadData()
        pool: list[Sample] = []
        out: list[Sample] = []
        for url in self.urls[wid::nw]:
            for sample in read_shard(url, bad, self.caption):
                pool.append(sample)
                if len(pool) >= self.buffer:
                    out.append(pool.pop(r.randrange(len(pool))))
                    if len(out) == CHUNK:
                        yield pack(out)
                        out = []
            if any(bad.as_metrics().values()):
                yield bad  # summed by the main process
                bad = BadData()
        r.shuffle(pool)
        out.extend(pool)
        for i in range(0, len(out), CHUNK):
            yield pack(out[i : i + CHUNK])


def pack(samples: list[Sample]) -> tuple:
    """One shared-memory tensor per chunk instead of one per sample (DataLoader IPC cost)."""
    lat = [s.teacher for s in samples if s.teacher is not None]
    same = len(lat) == len(samples) and len({tuple(t.shape) for t in lat}) == 1
    stacked = torch.stack(lat) if same else None
    light = [Sample(s.key, s.prompt, s.noise_seed, None if same else s.teacher) for s in samples]
    return light, stacked


def unpack(chunk: tuple) -> list[Sample]:
    light, stacked = chunk
    if stacked is not None:
        for s, t in zip(light, stacked, strict=True):
            s.teacher = t
    return light


@dataclass
class Cursor:
    epoch: int = 0
    position: int = 0  # samples this rank consumed in ``epoch``


class ShardLoader:
    def __init__(
        self,
        shards: ShardList,
        *,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        caption_key: str = "prompt.txt",
    ) -> None:
        check_split(shards, world_size)
        self.caption = CaptionKey.parse(caption_key)
        self.shards, self.seed = shards, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.buffer = num_workers, shuffle_buffer
        self.cursor = Cursor()
        self.bad = BadData()
        self.refilled = 0
        self._it: Iterator[Sample] | None = None
        self._lengths: dict[int, int] = {}

    def epoch_length(self, epoch: int) -> int:
        if epoch not in self._lengths:  # next_batch asks every batch: compute once per epoch
            self._lengths = {
                epoch: epoch_length(self.shards.counts, self.seed, epoch, self.world_size)
            }
        return self._lengths[epoch]

    # -- state ------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "epoch": self.cursor.epoch,
            "position": self.cursor.position,
            "world_size": self.world_size,
        }

    def seek(self, state: dict | None) -> None:
        """Continue from a checkpoint's cursor. A different number of workers splits the epoch
        differently, so then the run continues at the start of the next epoch."""
        if not state:
            return
        if int(state.get("world_size", self.world_size)) != self.world_size:
            self.cursor = Cursor(int(state["epoch"]) + 1, 0)
        else:
            self.cursor = Cursor(int(state["epoch"]), int(state["position"]))
        self._it = None

    # -- samples ----------------------------------------------------------------------------

    def _stream(self, epoch: int) -> Iterator[Sample]:
        mine = shard_assignment(self.shards.counts, self.seed, epoch, self.world_size)[self.rank]
        urls = [self.shards.urls[s] for s in mine]
        ds = _EpochStream(urls, self.seed, epoch, self.rank, self.buffer, self.caption)
        workers = min(self.num_workers, len(urls))
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=workers,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )
        it = iter(loader)
        # the workers stop when this stream ends or is closed, or when the ShardLoader goes
        # (``_stop_workers`` says why not by the DataLoader iterator's own __del__)
        stop = weakref.finalize(self, _stop_workers, it)
        stop.atexit = False  # at interpreter exit torch's own handling applies
        try:
            for item in it:
                if isinstance(item, BadData):
                    self.bad.merge(item)
                    continue
                yield from unpack(item)
        finally:
            stop()

    def _epoch_samples(self, epoch: int) -> Iterator[Sample]:
        """Exactly ``epoch_length`` samples; wraps around if bad data left the stream short."""
        length, n, rounds = self.epoch_length(epoch), 0, 0
        while n < length:
            got = 0
            for s in self._stream(epoch):
                if n == length:
                    return
                got, n = got + 1, n + 1
                self.refilled += rounds > 0
                yield s
            if got == 0:
                raise DataError(
                    f"data.shards: rank {self.rank} found no readable sample in its shards of "
                    f"epoch {epoch} ({'; '.join(self.bad.reasons[:3])})"
                )
            rounds += 1

    def next_batch(self, size: int) -> list[Sample]:
        """``size`` samples; epochs roll over on whole batches (the tail of an epoch that does
        not fill a batch is dropped, so every rank steps the same number of times)."""
        per_epoch = self.epoch_length(self.cursor.epoch) // size * size
        if per_epoch == 0:
            check_split(self.shards, self.world_size, size, self.seed, self.cursor.epoch)
        if self.cursor.position >= per_epoch:
            self.cursor, self._it = Cursor(self.cursor.epoch + 1, 0), None
        if self._it is None:
            self._it = self._epoch_samples(self.cursor.epoch)
            for _ in range(self.cursor.position):  # replay up to the cursor (resume)
                next(self._it)
        batch = [next(self._it) for _ in range(size)]
        self.cursor.position += size
        return batch

    def metrics(self) -> dict[str, int]:
        return {**self.bad.as_metrics(), "data_refilled": self.refilled}


def _stop_workers(it: Iterator) -> None:
    """Stop a DataLoader iterator's workers now (torch's own shutdown, which its __del__ calls).

    Left to that __del__, a ShardLoader dropped mid-epoch cost 5 s per worker: the loader and
    its epoch generator reference each other, so the cyclic gc frees them, and it calls weakref
    callbacks before any __del__: multiprocessing's Queue finalizers stop the index queues'
    feeder threads first, torch's stop signal then never reaches the workers, and it joins each
    until its timeout (MP_STATUS_CHECK_INTERVAL). ``weakref.finalize`` on the ShardLoader runs
    this among those callbacks, and its registry holds ``it`` (and its queues) strongly, so they
    are not part of that garbage."""
    shutdown = getattr(it, "_shutdown_workers", None)  # none without workers
    if shutdown is not None:
        shutdown()


# ---------------------------------------------------------------------------------------------
# the driver's check


def check_dataset(
    spec: str,
    *,
    caption_key: str = "prompt.txt",
    need_teacher: bool = False,
    world_size: int = 1,
    batch_size: int = 0,
    seed: int = 0,
    index_dir: str | None = None,
) -> ShardList:
    """Before any worker starts, what a worker's loader would stop on, as a ``DataError`` that
    names the reason and the URL: the shard list (a brace pattern is indexed here: a shard
    missing from the range, unreachable storage), every listed shard present, the caption key
    (``data.caption_key``) in the samples, one readable sample (with a teacher latent when the
    offline teacher needs one), and the split (``check_split`` for ``world_size`` ranks of
    ``batch_size``, epoch 0). Returns the shard list the workers use."""
    caption = CaptionKey.parse(caption_key)
    shards = list_shards(spec, index_dir=index_dir)
    if shards.info is None:  # a manifest: are its shards there? (indexing stat'ed them)
        stat_shards(shards.urls, f"data.shards={spec}")
    warned = set()  # indexed shards without the caption member (a warning already named them)
    if shards.info is not None:
        warned = _check_indexed_members(spec, shards.info, caption)
    _check_first_sample(spec, shards.urls, caption, need_teacher, warned)
    check_split(shards, world_size, batch_size, seed)
    return shards


def _check_first_sample(
    spec: str, urls: list[str], caption: CaptionKey, need_teacher: bool, warned: set[str]
) -> None:
    """Read shards until a sample decodes as a worker decodes it. A shard none of whose samples
    has the caption stops the check (a wrong ``data.caption_key``: the error names the members
    the samples have), unless the index already warned about that shard."""
    bad = BadData()
    with warnings.catch_warnings():  # the skips a worker would warn about: summed up below
        warnings.simplefilter("ignore")
        for url in urls:
            seen, lacking, why = 0, 0, ""
            for raw in raw_samples(url, bad):
                seen += 1
                try:
                    caption.extract(raw)
                except LookupError as e:
                    lacking, why = lacking + 1, why or str(e)
                    continue
                sample = decode(raw, url, bad, caption)
                if sample is None:
                    continue
                if need_teacher and sample.teacher is None:
                    raise DataError(
                        f"data.shards={spec}: teacher.mode=offline but {sample.key} has no "
                        "teacher.npy; make pair shards with python -m nitro_dist.prepare, or set "
                        "teacher.mode=online"
                    )
                return
            if seen and lacking == seen and url not in warned:  # a worker would skip them all
                raise DataError(
                    f"data.caption_key={caption}: no sample of shard {url} has its caption: "
                    f"{why}. Set data.caption_key to the member that holds the caption "
                    "(e.g. txt, prompt.txt, json:caption)"
                )
    why = "; ".join(bad.reasons[:3]) or "the shards are empty"
    raise DataError(f"data.shards={spec}: no readable sample in {len(urls)} shards ({why})")


def _check_indexed_members(spec: str, info: list[dict], caption: CaptionKey) -> set[str]:
    """From the index (tar headers): no sample anywhere has the caption member -> an error;
    some shards without it -> a warning naming them (the loader skips their samples); returns
    their URLs."""
    counted = [s for s in info if s["count"] > 0]
    lacking = [s for s in counted if not s["members"].get(caption.member)]
    if counted and len(lacking) == len(counted):
        have = sorted({m for s in counted for m in s["members"]})
        raise DataError(
            f"data.caption_key={caption}: no sample of {spec} has a {caption.member!r} member "
            f"(first shard: {counted[0]['url']}; the samples have: {', '.join(have)}). Set "
            "data.caption_key to the member that holds the caption (e.g. txt, json:caption)"
        )
    if lacking:
        warnings.warn(
            f"data.caption_key={caption}: {len(lacking)} shards have no sample with a "
            f"{caption.member!r} member; their samples are skipped (first: {lacking[0]['url']})",
            stacklevel=3,
        )
    return {s["url"] for s in lacking}
