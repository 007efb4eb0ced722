"""Fault injection into source releases: captions never land under another image (CC TSV blank lines, quoted
captions over two lines or with tabs, an SBU file one line short), and one bad record never aborts a build (a
`\\udfff` escape in COCO JSON, an img2dataset parquet with int64 keys or list captions, an image that is a link to
/dev/zero or out of the release, a FIFO, a file over the byte limit): each is a counted reject, and the accounting
adds up (inputs = written + rejected)."""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_sources import build  # noqa: E402

from pipeline.build import write_shard  # noqa: E402
from pipeline.images import ImageConfig  # noqa: E402
from storage.errors import XvlmError  # noqa: E402


def _jpeg(colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buf, "JPEG")
    return buf.getvalue()


def test_cc_tsv_pairs_by_record_whatever_the_lines(tmp_path):
    root = tmp_path / "cc"
    root.mkdir()
    (root / "Train_GCC-training.tsv").write_text(
        "caption of row 0\thttp://a/0.jpg\n"
        "\n"                                                          # a blank line is not a record
        "caption of row 1\thttp://a/1.jpg\n"
        '"caption of row 2, split\nover two lines"\thttp://a/2.jpg\n'  # one record, two lines
        '"caption of row 3 with a\ttab"\thttp://a/3.jpg\n'
        "\n\n"
        "caption of row 4\thttp://a/4.jpg\r\n")
    groups, acc, rejects = build({"cc": root}, tmp_path / "work")
    assert rejects == [] and acc["cc"]["inputs"] == {"image": 5, "caption": 5}
    assert [g.key for g in groups] == [f"cc-{i:09d}" for i in range(5)]
    for row, group in enumerate(groups):
        assert group.image_path == str(root / "images" / f"{row}.jpg")
        assert [c.text for c in group.captions] == [group.captions[0].text]
        assert f"caption of row {row}" in group.captions[0].text, (row, group.captions)
    assert groups[2].captions[0].text == "caption of row 2, split over two lines"
    assert [c.ref.where for g in groups for c in g.captions] == ["line 1", "line 3", "line 4", "line 6", "line 9"]


def test_cc_tsv_unclosed_quote_is_one_counted_reject(tmp_path):
    root = tmp_path / "cc"
    root.mkdir()
    (root / "Train_GCC-training.tsv").write_text(
        "caption of row 0\thttp://a/0.jpg\n" + '"row 1 never closed\thttp://a/1.jpg\n'
        + "".join(f"swallowed {i}\thttp://a/x.jpg\n" for i in range(10)))
    groups, acc, rejects = build({"cc": root}, tmp_path / "work")
    assert [g.key for g in groups] == ["cc-000000000"]
    assert [(r["where"], r["reason"]) for r in rejects] == [("line 2", "malformed_line")]


def test_sbu_files_of_different_lengths_stop_the_build_before_anything_is_paired(tmp_path):
    root = tmp_path / "sbu"
    root.mkdir()
    (root / "SBU_captioned_photo_dataset_urls.txt").write_text(
        "".join(f"http://static.flickr.com/1/{i}_a.jpg\n" for i in range(5)))
    (root / "SBU_captioned_photo_dataset_captions.txt").write_text(
        "".join(f"caption {i}\n" for i in range(5) if i != 2))        # line 3 lost
    with pytest.raises(XvlmError, match="has 5 lines but SBU_captioned_photo_dataset_captions.txt has 4"):
        build({"sbu": root}, tmp_path / "work")


def _coco(root: Path, captions: list, categories: list, images: list, instances: list) -> None:
    (root / "annotations").mkdir(parents=True)
    for kind, anns in (("captions", captions), ("instances", instances)):
        body = {"images": images, "annotations": anns, **({"categories": categories} if kind == "instances" else {})}
        # json.dumps writes "\udfff" as that escape: the same bytes a hostile release would hold
        (root / "annotations" / f"{kind}_train2017.json").write_text(json.dumps(body))


def test_coco_lone_surrogate_escapes_are_counted_rejects(tmp_path):
    root = tmp_path / "coco"
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 32, "height": 24} for i in (1, 2, 3)]
    images.append({"id": 4, "file_name": "bad\udfffname.jpg", "width": 32, "height": 24})
    captions = [{"id": 10, "image_id": 1, "caption": "a red square"},
                {"id": 11, "image_id": 2, "caption": "half a pair \udfff here"},
                {"id": 12, "image_id": 3, "caption": "a blue square"},
                {"id": 13, "image_id": 4, "caption": "an image with a bad name"}]
    instances = [{"id": 20, "image_id": 1, "bbox": [1, 1, 10, 10], "category_id": 1, "iscrowd": 0},
                 {"id": 21, "image_id": 3, "bbox": [1, 1, 10, 10], "category_id": 2, "iscrowd": 0}]
    _coco(root, captions, [{"id": 1, "name": "square"}, {"id": 2, "name": "circ\ud800le"}], images, instances)
    groups, acc, rejects = build({"coco": root}, tmp_path / "work")
    by_reason = {(r["kind"], r["reason"], r["where"]) for r in rejects}
    assert ("caption", "invalid_utf8", "annotation 11") in by_reason
    assert ("object", "invalid_utf8", "annotation 21") in by_reason
    assert {g.key for g in groups} >= {"coco-000000000001", "coco-000000000003"}
    assert acc["coco"]["inputs"]["caption"] == 4 and acc["coco"]["inputs"]["object"] == 2


def _img2dataset_shard(root: Path, stem: str, keys: list, captions: list) -> None:
    with tarfile.open(root / f"{stem}.tar", "w") as tar:
        for key in keys:
            data = _jpeg()
            info = tarfile.TarInfo(f"{key}.jpg" if isinstance(key, str) else f"{key:09d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    table = pa.table({"key": keys, "status": ["success"] * len(keys), "caption": captions,
                      "width": [32] * len(keys), "height": [24] * len(keys)})
    pq.write_table(table, root / f"{stem}.parquet")


def test_img2dataset_fields_of_the_wrong_type_are_counted_rejects(tmp_path):
    root = tmp_path / "i2d"
    root.mkdir()
    _img2dataset_shard(root, "00000", [0, 1], ["first", "second"])                          # int64 keys
    _img2dataset_shard(root, "00001", ["000010000", "000010001"], [["a", "list"], ["b"]])   # list captions
    _img2dataset_shard(root, "00002", ["000020000"], ["a good one"])
    groups, acc, rejects = build({"cc": root}, tmp_path / "work")
    assert [g.key for g in groups] == ["cc-000020000"]
    reasons = {(r["file"], r["kind"], r["reason"]) for r in rejects}
    assert ("00000.parquet", "image", "malformed_line") in reasons
    assert ("00001.parquet", "caption", "malformed_line") in reasons
    assert any("key is int 0, not a string" in r["detail"] for r in rejects)
    assert any("caption is list" in r["detail"] for r in rejects)


def test_image_files_that_are_links_out_special_or_too_large_are_counted_rejects(tmp_path):
    root = tmp_path / "sbu"
    (root / "images").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "out.jpg").write_bytes(_jpeg("blue"))
    names = {"good": None, "zero": "/dev/zero", "out": str(outside / "out.jpg"), "fifo": "fifo",
             "big": "big", "linked-in": "good"}
    (root / "images" / "good.jpg").write_bytes(_jpeg())
    (root / "images" / "big.jpg").write_bytes(_jpeg() + b"\0" * 20_000)
    os.mkfifo(root / "images" / "fifo.jpg")
    for name, target in names.items():
        if target and target not in ("fifo", "big"):
            os.symlink(target if target.startswith("/") else f"{target}.jpg", root / "images" / f"{name}.jpg")
    (root / "SBU_captioned_photo_dataset_urls.txt").write_text(
        "".join(f"http://static.flickr.com/1/{name}.jpg\n" for name in names))
    (root / "SBU_captioned_photo_dataset_captions.txt").write_text("".join(f"photo {name}\n" for name in names))
    groups, _acc, _rejects = build({"sbu": root}, tmp_path / "work")
    out = tmp_path / "out"
    out.mkdir()
    write_shard(groups, str(out), "shard-000000.tar", ImageConfig(max_side=64, max_file_bytes=10_000), "test",
                roots=(str(root),))
    done = json.loads((out / "_work" / "shard-000000.json").read_text())
    counts = done["counts"]["sbu"]
    assert counts["rejected"]["image"] == {"unsafe_path": 2, "not_a_file": 1, "file_too_large": 1}
    assert counts["written"] == {"image": 2, "caption": 2}        # the good one, and a link inside the release
    details = pq.read_table(out / "_work" / "shard-000000.rejects.parquet").to_pylist()
    assert all("\0" not in r["detail"] and "root:" not in r["detail"] for r in details)
