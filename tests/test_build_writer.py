"""ShardWriter: deterministic bytes, fixed tar metadata, atomic visibility; the sample JSON check."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from shards.format import SampleError, sample_problems, validate_sample
from shards.writer import ShardWriter


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buf, "JPEG")
    return buf.getvalue()


def _meta(key: str, **extra) -> dict:
    meta = {"key": key, "source": "coco", "source_id": "1", "width": 32, "height": 24, "captions": ["a red box"],
            "regions": [{"bbox": [1.0, 2.0, 10.0, 5.5], "text": "red box", "kind": "object", "attributes": ["red"]}]}
    meta.update(extra)
    return meta


def _write(path: str) -> ShardWriter:
    with ShardWriter(path) as writer:
        writer.write("coco-000000000001", _jpeg((255, 0, 0)), _meta("coco-000000000001"))
        writer.write("vg-2", _jpeg((0, 0, 255)), _meta("vg-2", captions=[], source="vg", source_id="2"))
    return writer


def test_shard_bytes_are_deterministic_and_metadata_fixed(tmp_path):
    a, b = _write(str(tmp_path / "a.tar")), _write(str(tmp_path / "b.tar"))
    data = (tmp_path / "a.tar").read_bytes()
    assert data == (tmp_path / "b.tar").read_bytes()
    assert a.info.sha256 == hashlib.sha256(data).hexdigest() and a.info.bytes == len(data) and a.info.samples == 2
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["coco-000000000001.jpg", "coco-000000000001.json",
                                             "coco-000000000001.txt", "vg-2.jpg", "vg-2.json", "vg-2.txt"]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.isfile()) == (0, 0, 0, "", "", 0o644, True)
        raw = tar.extractfile("vg-2.json").read()
        assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
        assert tar.extractfile("vg-2.txt").read() == b"red box"            # no caption: the first region text
        assert tar.extractfile("coco-000000000001.txt").read() == b"a red box"


def test_index_offset_points_at_the_sample_header(tmp_path):
    path = str(tmp_path / "s.tar")
    with ShardWriter(path) as writer:
        offsets = [writer.write(f"k-{i}", _jpeg((i * 40, 0, 0)), _meta(f"k-{i}")) for i in range(3)]
    data = open(path, "rb").read()
    for i, offset in enumerate(offsets):
        with tarfile.open(fileobj=io.BytesIO(data[offset:])) as tar:
            assert tar.next().name == f"k-{i}.jpg"


def test_failed_shard_leaves_nothing_under_its_name(tmp_path):
    path = tmp_path / "s.tar"
    with pytest.raises(SampleError):
        with ShardWriter(str(path)) as writer:
            writer.write("k-1", _jpeg((1, 2, 3)), _meta("k-1"))
            writer.write("k-2", _jpeg((1, 2, 3)), _meta("k-2", regions=[], captions=[]))
    assert not path.exists() and os.listdir(tmp_path) == []


def test_sample_problems_name_each_fault():
    validate_sample(_meta("ok-1"))
    bad = _meta("bad.key", width=0, captions=[" "],
                regions=[{"bbox": [30.0, 0.0, 10.0, 5.0], "text": "", "kind": "thing", "attributes": [1]}])
    text = "; ".join(sample_problems(bad))
    for expected in ("key", "not positive", "captions[0]", "text is empty", "kind 'thing'", "attributes",
                     "not inside"):
        assert expected in text, expected
    assert sample_problems([]) == ["sample JSON is a list, not an object"]
    assert "missing field 'width'" in sample_problems({k: v for k, v in _meta("x").items() if k != "width"})


def test_fast_tar_header_equals_tarfile_and_long_names_still_work(tmp_path):
    import tarfile as tf

    from shards.writer import _member, tar_header

    for name, size in (("a.jpg", 0), ("coco-000000000139.json", 1234), ("k" * 96 + ".txt", 8 ** 10)):
        assert tar_header(name, size) == _member(name, size).tobuf(tf.USTAR_FORMAT, "utf-8", "surrogateescape")
    key = "x" * 120                                    # needs a pax header
    path = str(tmp_path / "long.tar")
    with ShardWriter(path) as writer:
        writer.write(key, _jpeg((9, 9, 9)), _meta(key))
    with tarfile.open(path) as tar:
        assert tar.getnames() == [f"{key}.jpg", f"{key}.json", f"{key}.txt"]
    assert os.path.getsize(path) % (20 * 512) == 0
