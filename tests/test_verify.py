"""`xvlm verify`: passes a clean dataset built from the sample data, and catches a flipped byte, a missing shard,
a truncated shard, a damaged tar header, a sample JSON that breaks the format, an unsafe tar member name, and an
index or rejects file that disagrees with the manifest — exiting non-zero with the problem listed."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402
from test_stats import sample_build  # noqa: E402

import storage  # noqa: E402
from shards.manifest import INDEX_SCHEMA, REJECTS_SCHEMA, write_table  # noqa: E402
from tools.cli import main as xvlm  # noqa: E402
from reports.verify import VerifyOptions, verify  # noqa: E402


def _kinds(path: str) -> set[tuple[str, str]]:
    result = verify(VerifyOptions(path, progress=False, workers=2))
    return {(p.where.split(": ", 1)[0], p.kind) for p in result.problems}


@pytest.fixture
def tiny(tmp_path) -> str:
    return shardkit.make_dataset(str(tmp_path / "tiny"), samples=12, per_shard=4, sources=("coco", "vg"))


def _read_samples(shard_path: str) -> list[tuple[str, dict[str, bytes]]]:
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(shard_path) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(info).read()
    return samples


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info


def rewrite_shard(dataset: str, shard: str, change_meta=None, extra_member: tuple[str, bytes] | None = None) -> None:
    """Rewrite one shard (plain tarfile, as a buggy builder might) with changed sample JSON and/or one extra
    member, and bring the manifest (bytes, sha256) and index (offsets) up to date, so only the change is wrong."""
    path = os.path.join(dataset, shard)
    samples = _read_samples(path)
    offsets = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, files in samples:
            meta = json.loads(files["json"])
            if change_meta:
                change_meta(meta)
            files = dict(files, json=json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
            offsets[key] = tar.offset
            for ext in ("jpg", "json", "txt"):
                tar.addfile(_member(f"{key}.{ext}", len(files[ext])), io.BytesIO(files[ext]))
        if extra_member:
            name, data = extra_member
            tar.addfile(_member(name, len(data)), io.BytesIO(data))
    data = buf.getvalue()
    Path(path).write_bytes(data)
    manifest = json.loads(Path(dataset, "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == shard:
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    Path(dataset, "manifest.json").write_text(json.dumps(manifest))
    index = pq.read_table(os.path.join(dataset, "index.parquet")).to_pylist()
    for row in index:
        if row["shard"] == shard:
            row["offset"] = offsets[row["key"]]
    write_table(os.path.join(dataset, "index.parquet"), index, INDEX_SCHEMA)


def test_clean_tiny_dataset_passes(tiny, capsys):
    assert xvlm(["verify", tiny, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "3 shards, 12 samples" in out


@pytest.mark.ray
def test_clean_sample_build_passes(tmp_path_factory, capsys):
    _, ds = sample_build(tmp_path_factory)
    assert xvlm(["verify", str(ds), "--no-progress"]) == 0
    assert "every check passed" in capsys.readouterr().out


@pytest.mark.ray
def test_flipped_byte_in_a_built_shard(tmp_path_factory, tmp_path, capsys):
    _, ds = sample_build(tmp_path_factory)
    copy = tmp_path / "ds"
    shutil.copytree(ds, copy, ignore=shutil.ignore_patterns("_work"))
    shard = copy / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    assert xvlm(["verify", str(copy), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar: [sha256]" in out and "FAILED" in out
    assert "shard-000000.tar" not in out and "shard-000002.tar" not in out


def test_missing_shard(tiny, capsys):
    os.remove(os.path.join(tiny, "shard-000001.tar"))
    assert xvlm(["verify", tiny, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar: [missing_shard]" in out
    assert _kinds(tiny) == {("shard-000001.tar", "missing_shard")}


def test_truncated_shard(tiny):
    shardkit.truncate_shard(tiny, "shard-000002.tar", keep_fraction=0.6)
    kinds = _kinds(tiny)
    assert {("shard-000002.tar", "size"), ("shard-000002.tar", "sha256"),
            ("shard-000002.tar", "sample_count")} <= kinds
    assert {where for where, _ in kinds} == {"shard-000002.tar"}


def test_damaged_tar_header(tiny):
    shardkit.corrupt_header(tiny, "shard-000000.tar", "coco-000002", "json")
    kinds = _kinds(tiny)
    assert ("shard-000000.tar", "tar") in kinds and ("shard-000000.tar", "sample_count") in kinds


def test_corrupt_image_bytes_same_length(tiny):
    shardkit.corrupt_member(tiny, "shard-000001.tar", "coco-000008", "jpg")
    kinds = _kinds(tiny)
    assert ("shard-000001.tar", "sha256") in kinds and ("shard-000001.tar", "image") in kinds


def test_schema_error_box_outside_and_missing_field(tiny, capsys):
    def break_meta(meta):
        if meta["key"] == "vg-000003":
            meta["regions"][0]["bbox"] = [90.0, 10.0, 50.0, 5.0]     # runs past the 96 px wide image
        if meta["key"] == "coco-000010":
            del meta["source_id"]

    rewrite_shard(tiny, "shard-000001.tar", break_meta)
    assert xvlm(["verify", tiny, "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "shard-000001.tar: vg-000003: [schema] regions[0]: bbox [90.0, 10.0, 50.0, 5.0] is not inside the 96x72 image" in out
    assert "shard-000001.tar: coco-000010: [schema] missing field 'source_id'" in out
    assert _kinds(tiny) == {("shard-000001.tar", "schema")}   # hashes, sizes, index all up to date


def test_schema_error_image_size_differs_from_json(tiny):
    def wrong_size(meta):
        if meta["key"] == "coco-000000":
            meta["width"] = 200
    rewrite_shard(tiny, "shard-000000.tar", wrong_size)
    result = verify(VerifyOptions(tiny, progress=False))
    assert [(p.where, p.kind) for p in result.problems] == [("shard-000000.tar: coco-000000", "image")]
    assert "image is 96x72 but the JSON says 200x72" in result.problems[0].detail


def test_unsafe_member_name(tiny):
    rewrite_shard(tiny, "shard-000002.tar", extra_member=("../escape.txt", b"x"))
    assert ("shard-000002.tar", "member_name") in _kinds(tiny)


def test_index_and_rejects_must_agree_with_the_manifest(tiny):
    index = pq.read_table(os.path.join(tiny, "index.parquet")).to_pylist()
    index[5]["offset"] += 512
    write_table(os.path.join(tiny, "index.parquet"), index, INDEX_SCHEMA)
    write_table(os.path.join(tiny, "rejects.parquet"),
                [{"source": "coco", "kind": "image", "file": "f", "where": "1", "reason": "missing_image", "detail": ""}],
                REJECTS_SCHEMA)
    kinds = _kinds(tiny)
    assert ("shard-000001.tar", "index") in kinds        # the sample is not at the indexed byte
    assert ("rejects.parquet", "rejects") in kinds      # a reject row the manifest does not count


def test_extra_shard_and_not_a_dataset(tiny, tmp_path, capsys):
    shutil.copy(os.path.join(tiny, "shard-000000.tar"), os.path.join(tiny, "shard-000009.tar"))
    assert ("shard-000009.tar", "extra_shard") in _kinds(tiny)
    assert xvlm(["verify", str(tmp_path / "none")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.s3
def test_verify_an_s3_dataset(s3, s3_prefix, tiny):
    for name in sorted(os.listdir(tiny)):
        storage.write_bytes(storage.join(s3_prefix, name), Path(tiny, name).read_bytes())
    assert verify(VerifyOptions(s3_prefix, progress=False)).ok
    data = bytearray(Path(tiny, "shard-000001.tar").read_bytes())
    storage.write_bytes(storage.join(s3_prefix, "shard-000001.tar"), bytes(data[: len(data) // 2]))
    kinds = {(p.where.split(": ")[0], p.kind) for p in verify(VerifyOptions(s3_prefix, progress=False)).problems}
    assert ("shard-000001.tar", "size") in kinds and ("shard-000001.tar", "sha256") in kinds
