"""Shards written by other tools: brace patterns without a manifest (counted from tar headers,
cached, re-indexed when a shard changes), the img2dataset layout through ``data.caption_key``,
image folders with .txt captions for write_shards, and the driver's dataset check
(``loader.check_dataset``) failing, with the reason and the URL, wherever a worker would."""

import io
import json
import tarfile
import warnings

import pytest

from nitro_dist.config import load_config
from nitro_dist.data.index import count_shard, index_locations, parallel_map
from nitro_dist.data.loader import ShardLoader, check_dataset
from nitro_dist.data.prompts import CaptionKey, read_prompts
from nitro_dist.data.shards import BadData, DataError, list_shards, raw_samples, write_shard
from nitro_dist.data.write_shards import main

NOT_A_JPEG = b"\xff\xd8 these bytes are no image: decoding them would fail"


def img2dataset_sample(i: int, caption: str | None = None) -> dict:
    """One sample as img2dataset writes it: KEY.jpg, KEY.txt, KEY.json."""
    caption = caption if caption is not None else f"a photo number {i}"
    meta = {"caption": f"json {caption}", "url": f"http://x/{i}.jpg", "key": f"{i:09d}"}
    return {
        "__key__": f"{i:09d}",
        "jpg": NOT_A_JPEG + bytes([i % 256]) * 300,
        "txt": caption.encode(),
        "json": json.dumps(meta).encode(),
    }


def write_img2dataset(folder, sizes: list[int], name: str = "{:05d}.tar") -> str:
    """Shards 00000.tar ... of ``sizes`` samples; returns their brace pattern."""
    start = 0
    for k, n in enumerate(sizes):
        samples = [img2dataset_sample(i) for i in range(start, start + n)]
        write_shard(f"{folder}/{name.format(k)}", samples)
        start += n
    return f"{folder}/{{00000..{len(sizes) - 1:05d}}}.tar"


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# counting from tar headers


def test_header_count_equals_what_the_reader_yields(tmp_path):
    """The count of every kind of shard is the number of samples the loader's reader yields
    (dirs, __meta__ members and extensionless names skipped; damage drops the cut sample)."""
    members = [("__info__", b"x"), ("sub/", b"")]
    for i in range(5):
        members += [(f"sub/{i:03d}.txt", b"a cat %d" % i), (f"sub/{i:03d}.JPG", b"\0" * 700)]
    members.append(("README", b"no extension: skipped"))
    whole = tar_of(members)
    cases = {
        "whole": whole,
        "cut_in_data": whole[:3000],
        "cut_at_header": whole[: 512 * 7],
        "garbage": b"\x00garbage" * 100,
        "empty": b"",
        "duplicate": tar_of([("a.txt", b"1"), ("a.jpg", b"2"), ("a.txt", b"3"), ("b.txt", b"4")]),
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(data)
        bad = BadData()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read = list(raw_samples(str(path), bad))
        got = count_shard(str(path), len(data))
        assert got["count"] == len(read), (name, got, [r["__key__"] for r in read])
        assert (got["damaged"] is not None) == (bad.corrupt_shards == 1), (name, got)
    assert count_shard(str(tmp_path / "whole.tar"), len(whole))["members"] == {"jpg": 5, "txt": 5}
    assert count_shard(str(tmp_path / "whole.tar"), len(whole))["count"] == 5
    assert "error" in count_shard(str(tmp_path / "nope.tar"), 10)


def test_parallel_map_without_ray_keeps_order():
    assert parallel_map(lambda a, b: a * b, [(i, 2) for i in range(40)]) == list(range(0, 80, 2))
    assert parallel_map(abs, []) == []


# ---------------------------------------------------------------------------------------------
# the cached index of a brace pattern


def test_brace_pattern_without_manifest_is_indexed_and_cached(tmp_path):
    pattern = write_img2dataset(tmp_path, [7, 5, 9])
    shards = list_shards(pattern)
    assert shards.counts == [7, 5, 9] and shards.urls[1] == f"{tmp_path}/00001.tar"
    index = tmp_path / "00000..00002.tar.index.json"
    assert index_locations(pattern, None) == [str(index)]
    data = json.loads(index.read_text())
    assert data["pattern"] == pattern and data["total"] == 21
    assert data["shards"][0]["members"] == {"jpg": 7, "json": 7, "txt": 7}
    # the cache is read: a (tampered) count of an unchanged shard comes back as stored ...
    data["shards"][0]["count"] = 70
    index.write_text(json.dumps(data))
    assert list_shards(pattern).counts == [70, 5, 9]
    # ... and a shard whose size changed is counted again, the others reused
    write_shard(str(tmp_path / "00001.tar"), [img2dataset_sample(i) for i in range(11)])
    assert list_shards(pattern).counts == [70, 11, 9]
    assert json.loads(index.read_text())["shards"][1]["count"] == 11
    # the index has the manifest's layout: it can be given as data.shards itself
    assert list_shards(str(index)).counts == [70, 11, 9]
    # same split path as manifest shards: every sample of an epoch once over two ranks
    keys = []
    for rank in range(2):
        loader = ShardLoader(
            list_shards(pattern), seed=0, rank=rank, world_size=2, num_workers=0, caption_key="txt"
        )
        keys += [s.key for s in loader.next_batch(loader.epoch_length(0))]
    assert len(keys) == len(set(keys))


def test_index_goes_to_the_fallback_folder_when_the_shard_folder_refuses_it(tmp_path):
    shard_dir, fallback = tmp_path / "ro", tmp_path / "runs" / "shard_indexes"
    pattern = write_img2dataset(shard_dir, [3, 4])
    beside, other = index_locations(pattern, str(fallback))
    (shard_dir / beside.rsplit("/", 1)[1]).mkdir()  # a folder where the file would go: unwritable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unreadable; indexing again" for the folder
        assert list_shards(pattern, index_dir=str(fallback)).counts == [3, 4]
        assert json.loads(open(other).read())["total"] == 7
        with pytest.warns(UserWarning, match="not cached"):
            assert list_shards(pattern).counts == [3, 4]  # no fallback: warned, still counted


# ---------------------------------------------------------------------------------------------
# caption keys


def test_caption_key_syntax_and_extraction():
    raw = img2dataset_sample(3)
    assert CaptionKey.parse("txt").extract(raw) == "a photo number 3"
    assert CaptionKey.parse("json:caption").extract(raw) == "json a photo number 3"
    assert CaptionKey.parse("prompt.txt") == CaptionKey("prompt.txt")
    assert str(CaptionKey.parse("meta.json:caption")) == "meta.json:caption"
    with pytest.raises(LookupError, match=r"no 'prompt.txt' member \(it has: jpg, json, txt\)"):
        CaptionKey.parse("prompt.txt").extract(raw)
    with pytest.raises(LookupError, match=r"no string field 'text' \(caption, key, url\)"):
        CaptionKey.parse("json:text").extract(raw)
    for bad in ("txt:caption", "json:", "", "a b", "json:a:b"):
        with pytest.raises(ValueError, match="data.caption_key"):
            CaptionKey.parse(bad)
    with pytest.raises(ValueError, match="^data.caption_key"):
        load_config("tiny", ["data.caption_key=txt:caption"])
    assert load_config("tiny", ["data.caption_key=json:caption"]).data.caption_key == "json:caption"


def test_img2dataset_shards_train_with_a_caption_key(tmp_path):
    """txt or a JSON field as the caption; the (invalid) images are never decoded."""
    pattern = write_img2dataset(tmp_path, [4, 4])
    for key, prefix in (("txt", "a photo"), ("json:caption", "json a photo")):
        loader = ShardLoader(
            list_shards(pattern), seed=0, rank=0, world_size=1, num_workers=0, caption_key=key
        )
        batch = loader.next_batch(8)
        assert sorted(s.prompt for s in batch) == sorted(f"{prefix} number {i}" for i in range(8))
        assert loader.metrics()["data_missing_prompt"] == 0


# ---------------------------------------------------------------------------------------------
# write_shards from an image folder


def test_write_shards_from_an_image_folder(tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "b").mkdir(parents=True)
    for name, caption in (("x1.png", "a red car"), ("b/x2.JPG", "a blue boat"), ("x3.jpg", None)):
        (folder / name).write_bytes(b"not decoded")
        if caption:
            (folder / name).with_suffix(".txt").write_text(caption + "\n")
    (folder / "notes.txt").write_text("a caption with no image: ignored")
    with pytest.warns(UserWarning, match="1 of 3 images have no"):
        assert read_prompts(str(folder), "prompt") == ["a blue boat", "a red car"]
    with pytest.warns(UserWarning):
        assert main(["--prompts", str(folder), "--out", str(tmp_path / "out")]) == 0
    got = [s.prompt for u in list_shards(str(tmp_path / "out")).urls for s in _read(u)]
    assert got == ["a blue boat", "a red car"]
    (tmp_path / "empty").mkdir()
    assert main(["--prompts", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 2
    assert "no images (.png" in capsys.readouterr().err
    (folder / "b" / "x2.txt").unlink()
    (folder / "x1.txt").write_text("  \n")
    assert main(["--prompts", str(folder), "--out", str(tmp_path / "o3")]) == 2
    assert "3 images but none has a caption" in capsys.readouterr().err


def _read(url):
    from nitro_dist.data.shards import read_shard

    return list(read_shard(url, BadData()))


# ---------------------------------------------------------------------------------------------
# the driver's check: what would fail in a worker fails here first, naming reason and URL


def test_driver_check_passes_a_brace_pattern_without_manifest(tmp_path):
    pattern = write_img2dataset(tmp_path, [6, 6, 6])
    shards = check_dataset(pattern, caption_key="txt", world_size=2, batch_size=4)
    assert shards.counts == [6, 6, 6] and not (tmp_path / "manifest.json").exists()
    # what the loader would refuse, the check refuses
    with pytest.raises(DataError, match="3 shards for 4 workers"):
        check_dataset(pattern, caption_key="txt", world_size=4)
    with pytest.raises(DataError, match="fewer than the per-worker batch of 32"):
        check_dataset(pattern, caption_key="txt", world_size=1, batch_size=32)


def test_driver_check_names_a_shard_missing_from_the_range(tmp_path):
    pattern = write_img2dataset(tmp_path, [3, 3, 3, 3])
    (tmp_path / "00002.tar").unlink()
    with pytest.raises(DataError, match=f"1 of 4 shards not found: {tmp_path}/00002.tar"):
        check_dataset(pattern, caption_key="txt")
    # a manifest listing a shard that is gone: the same check
    from nitro_dist.data.shards import write_manifest

    write_manifest(str(tmp_path), ["00000.tar", "00002.tar"], [3, 3])
    with pytest.raises(DataError, match=f"1 of 2 shards not found: {tmp_path}/00002.tar"):
        check_dataset(str(tmp_path), caption_key="txt")


def test_driver_check_corrupt_tar(tmp_path):
    (tmp_path / "bad-0.tar").write_bytes(b"\x00garbage" * 100)
    why = f"no readable sample in 1 shards .*shard {tmp_path}/bad-0.tar: corrupt"
    with pytest.raises(DataError, match=why):
        check_dataset(f"{tmp_path}/bad-{{0..0}}.tar", caption_key="txt")
    # a truncated shard among good ones: warned by URL, its samples before the damage counted
    pattern = write_img2dataset(tmp_path, [4, 4, 4])
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match=f"shard {tmp_path}/00001.tar: corrupt or truncated"):
        shards = check_dataset(pattern, caption_key="txt")
    assert shards.counts[0] == 4 and shards.counts[2] == 4 and 0 < shards.counts[1] < 4


def test_driver_check_missing_caption_key_names_key_url_and_members(tmp_path):
    pattern = write_img2dataset(tmp_path, [3, 3])
    with pytest.raises(DataError, match="data.caption_key=prompt.txt") as e:
        check_dataset(pattern)  # the default: nitro_dist's own shards
    assert f"{tmp_path}/00000.tar" in str(e.value) and "jpg, json, txt" in str(e.value)
    with pytest.raises(DataError, match="data.caption_key=json:text: no sample of shard") as e:
        check_dataset(pattern, caption_key="json:text")
    assert f"{tmp_path}/00000.tar" in str(e.value) and "caption, key, url" in str(e.value)
    # a manifest set (no index): found in the samples themselves
    from nitro_dist.data.shards import write_manifest

    write_manifest(str(tmp_path), ["00000.tar", "00001.tar"], [3, 3])
    with pytest.raises(DataError, match=r"caption_key=prompt.txt: no sample of shard .*00000.tar"):
        check_dataset(str(tmp_path))
    assert check_dataset(str(tmp_path), caption_key="txt").counts == [3, 3]


# ---------------------------------------------------------------------------------------------
# s3


def test_brace_shards_on_s3_without_manifest(s3_endpoint):
    import s3fs

    pattern = write_img2dataset("s3://nitro-test/laion", [5, 3, 4])
    shards = check_dataset(pattern, caption_key="json:caption", world_size=2, batch_size=2)
    assert shards.counts == [5, 3, 4] and shards.urls[2] == "s3://nitro-test/laion/00002.tar"
    fs = s3fs.S3FileSystem()
    index = json.loads(fs.cat("nitro-test/laion/00000..00002.tar.index.json"))
    assert index["total"] == 12 and all(s["stamp"] for s in index["shards"])  # the ETag
    loader = ShardLoader(shards, seed=0, rank=0, world_size=1, num_workers=0, caption_key="txt")
    assert len({s.key for s in loader.next_batch(12)}) == 12
    with pytest.raises(DataError, match="s3://nitro-test/laion/00003.tar"):
        check_dataset("s3://nitro-test/laion/{00000..00003}.tar", caption_key="txt")


# ---------------------------------------------------------------------------------------------
# Ray


def test_index_through_ray_tasks(cluster, tmp_path, monkeypatch):
    """With Ray initialised the shards are counted by Ray tasks (the same count_shard), in
    processes other than the driver's."""
    import os

    from nitro_dist.data import index

    pattern = write_img2dataset("s3://nitro-test/ray-index", [4, 6, 2, 3])
    seen, count = tmp_path / "pids", index.count_shard

    def counted_where(*args):  # a closure: Ray ships it by value
        with open(seen, "a") as f:
            f.write(f"{os.getpid()}\n")
        return count(*args)

    monkeypatch.setattr(index, "count_shard", counted_where)
    assert list_shards(pattern).counts == [4, 6, 2, 3]
    pids = seen.read_text().split()
    assert len(pids) == 4 and str(os.getpid()) not in pids


def test_launch_checks_brace_shards_on_the_driver_and_hands_the_list_to_workers(tmp_path):
    """ray_train's driver side without Ray: the check runs with the run's keys (workers, batch,
    caption key), the index lands under the storage path when the shard folder refuses it, and
    the checked list travels to the workers in the trainer's loop config."""
    from nitro_dist.data import shards as shards_module
    from nitro_dist.distributed.ray_train import check_data, make_trainer

    pattern = write_img2dataset(tmp_path / "d", [4, 4])
    (tmp_path / "d" / "00000..00001.tar.index.json").mkdir()  # not writable there
    common = [
        "data.source=shards",
        f"data.shards={pattern}",
        "distributed.num_workers=2",
        f"distributed.storage_path={tmp_path}/runs",
        "train.batch_size=8",
    ]
    with pytest.raises(DataError, match="^data.caption_key=prompt.txt: no sample of"):
        check_data(load_config("tiny", common))
    cfg = load_config("tiny", [*common, "data.caption_key=txt"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checked = check_data(cfg)
    assert checked.counts == [4, 4]
    assert len(list((tmp_path / "runs" / "shard_indexes").glob("*.index.json"))) == 1
    with pytest.raises(DataError, match="fewer than the per-worker batch of 8"):
        check_data(load_config("tiny", [*common, "data.caption_key=txt", "train.batch_size=16"]))
    trainer, _, _ = make_trainer(cfg, shards=checked)
    handed = trainer.train_loop_config["shards"]
    assert handed == {"urls": checked.urls, "counts": [4, 4]}
    # a worker (worker_loop) takes that list: list_shards answers from it, no indexing
    shards_module.use_resolved(pattern, shards_module.ShardList(**handed))
    try:
        (tmp_path / "d" / "00001.tar").unlink()  # would fail a fresh indexing
        assert list_shards(pattern).counts == [4, 4]
    finally:
        shards_module._RESOLVED.clear()
