"""Sources and staging: each release format on `xvlm sample-data` output, alone and together, and every bad
input they must turn into a counted reject (inputs = grouped + rejected, per source and kind)."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import sources as source_registry
from pipeline.group import GroupConfig, group_images, iter_groups, load_accounting, reject_files
from pipeline.records import Annotation, ImageRef, Reject
from pipeline.stage import StageConfig, stage_sources
import storage
from storage.errors import XvlmError

QUIET = StageConfig(progress=False)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    from sampledata.sample_data import generate

    return generate(tmp_path_factory.mktemp("sample"), images=40, val_images=4, seed=3, progress=False)


def build(sources: dict[str, str], work: Path, partitions: int = 2) -> tuple[list, dict, list[dict]]:
    """Stage + group; returns (groups, accounting, reject rows) after checking the accounting adds up."""
    stage_sources({k: str(v) for k, v in sources.items()}, str(work), QUIET)
    parts = group_images(str(work), partitions, GroupConfig(progress=False))
    groups = [g for p in parts for g in iter_groups(p)]
    accounting = load_accounting(str(work))
    rejects = [row for path in reject_files(str(work)) for row in pq.read_table(path).to_pylist()]
    written: dict = {}
    for g in groups:
        for ref in g.records():
            written.setdefault(ref.source, {}).setdefault(ref.kind, 0)
            written[ref.source][ref.kind] += 1
    for source, acc in accounting.items():
        assert acc["grouped"] == written.get(source, {}), source
        for kind, n in acc["inputs"].items():
            rejected = sum(1 for r in rejects if r["source"] == source and r["kind"] == kind)
            assert n == acc["grouped"].get(kind, 0) + rejected, (source, kind)
            assert rejected == sum(acc["rejected"].get(kind, {}).values())
    return groups, accounting, rejects


def reasons(rejects: list[dict], source: str | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejects:
        if source is None or r["source"] == source:
            out[r["reason"]] = out.get(r["reason"], 0) + 1
    return out


def _declared_sources() -> dict[str, str]:
    """NAME -> module of every file in pipeline/sources/ that defines NAME and iter_records, found by reading the
    files (independently of the registry's import-based discovery)."""
    import ast

    declared = {}
    for path in sorted(Path(source_registry.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        names = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "NAME" for t in node.targets)
                 and isinstance(node.value, ast.Constant)]
        if names and any(isinstance(n, ast.FunctionDef) and n.name == "iter_records" for n in tree.body):
            declared[names[0]] = path.stem
    return declared


def test_registry_discovers_every_source():
    declared = _declared_sources()
    assert sorted(source_registry.registry()) == sorted(declared)
    assert {"cc", "coco", "sbu", "vg"} <= set(declared)          # the four releases of X-VLM's 4M setting
    assert {"cc12m", "objects365", "openimages", "refcoco"} <= set(declared)   # the 16M setting adds these
    with pytest.raises(XvlmError, match="unknown source"):
        source_registry.get_source("laion")
    assert source_registry.safe_id("4385058960_b0f291553e") == "4385058960_b0f291553e"
    changed = source_registry.safe_id("A B/c")
    assert source_registry.SAFE_KEY.fullmatch(changed) and changed != source_registry.safe_id("a b/c")


# ---------------------------------------------------------------------------------------------- sample data


def test_coco_alone(sample, tmp_path):
    groups, acc, rejects = build({"coco": sample["paths"]["coco"]}, tmp_path)
    n = sample["counts"]["coco_train2017"]
    assert acc["coco"]["inputs"] == {"image": n["images"], "caption": n["captions"], "object": n["instances"]}
    assert reasons(rejects) == {"crowd_box": n["crowd"]}
    assert len(groups) == n["images"] and all(g.source == "coco" for g in groups)
    g = groups[0]
    assert g.key == f"coco-{int(g.source_id):012d}" and len(g.captions) == 5
    assert os.path.exists(g.image_path) and "/train2017/" in g.image_path  # val2017 is held out
    assert all(r["kind"] == "object" and r["text"] in {"circle", "square", "triangle", "star", "hexagon", "diamond"}
               for r in g.regions)


def test_vg_alone(sample, tmp_path):
    groups, acc, rejects = build({"vg": sample["paths"]["vg"]}, tmp_path)
    n = sample["counts"]["vg"]
    assert acc["vg"]["inputs"] == {"image": n["images"], "region": n["regions"], "object": n["objects"]}
    assert rejects == [] and len(groups) == n["images"]
    assert sum(g.coco_id is not None for g in groups) == n["coco_overlap"]  # not merged: no COCO staged
    objects = [r for g in groups for r in g.regions if r["kind"] == "object"]
    assert all(len(o["attributes"]) == 2 and o["text"].endswith(" ".join(o["attributes"][-1:]) + " " +
               o["text"].split()[-1]) for o in objects)
    assert all(os.path.exists(g.image_path) for g in groups)


def test_sbu_alone(sample, tmp_path):
    groups, acc, rejects = build({"sbu": sample["paths"]["sbu"]}, tmp_path)
    n = sample["counts"]["sbu"]
    assert acc["sbu"]["inputs"] == {"image": n["urls"], "caption": n["urls"]}
    assert rejects == [] and len(groups) == n["urls"]
    # The missing downloads are still samples: the image stage rejects them as missing_image.
    assert sum(not os.path.exists(g.image_path) for g in groups) == n["missing_images"]


def test_cc_tsv_alone(sample, tmp_path):
    groups, acc, rejects = build({"cc": sample["paths"]["cc"]}, tmp_path)
    n = sample["counts"]["cc"]
    assert acc["cc"]["inputs"] == {"image": n["rows"], "caption": n["rows"]}
    assert [g.key for g in groups][:2] == ["cc-000000000", "cc-000000001"]
    assert sum(not os.path.exists(g.image_path) for g in groups) == n["failed_to_download"]


def test_cc_img2dataset_alone(sample, tmp_path):
    groups, acc, rejects = build({"cc": sample["paths"]["cc_img2dataset"]}, tmp_path)
    n = sample["counts"]["cc"]
    assert acc["cc"]["inputs"] == {"image": n["rows"], "caption": n["rows"]}
    assert reasons(rejects) == {"status_not_success": 2 * n["failed_to_download"]}
    assert len(groups) == n["images"]
    for g in groups:
        tar_path, member = g.image_path.split("#")
        data = storage.read_bytes(tar_path, g.byte_offset, g.byte_offset + g.byte_size)
        with tarfile.open(tar_path) as tar:
            assert tar.extractfile(member).read() == data
        from PIL import Image
        assert Image.open(io.BytesIO(data)).size == (g.ann_width, g.ann_height)


def test_all_sources_and_the_coco_vg_merge(sample, tmp_path):
    paths = sample["paths"]
    groups, acc, rejects = build({"coco": paths["coco"], "vg": paths["vg"], "sbu": paths["sbu"],
                                  "cc": paths["cc_img2dataset"]}, tmp_path, partitions=3)
    counts = sample["counts"]
    overlap = counts["vg"]["coco_overlap"]
    merged = [g for g in groups if g.source == "coco+vg"]
    assert len(merged) == overlap > 0
    assert len(groups) == counts["coco_train2017"]["images"] + counts["vg"]["images"] - overlap \
        + counts["sbu"]["urls"] + counts["cc"]["images"]
    assert [g.key for g in groups] == sorted(g.key for g in groups)
    assert len({g.key for g in groups}) == len(groups)

    # The union: COCO's captions and objects plus VG's regions and objects, one sample, COCO's image.
    vg_alone, _, _ = build({"vg": paths["vg"]}, tmp_path / "vg")
    coco_alone, _, _ = build({"coco": paths["coco"]}, tmp_path / "coco")
    by_coco = {g.coco_id: g for g in vg_alone if g.coco_id is not None}
    coco_by_id = {g.coco_id: g for g in coco_alone}
    for g in merged:
        vg_g, coco_g = by_coco[g.coco_id], coco_by_id[g.coco_id]
        assert g.key == coco_g.key and g.image_path == coco_g.image_path
        assert [r.source for r in g.image_records] == ["coco", "vg"]
        assert g.captions == coco_g.captions
        assert [r["ref"] for r in g.regions] == [r["ref"] for r in coco_g.regions] + [r["ref"] for r in vg_g.regions]
        # Same pictures and frames in the sample data: VG boxes stay as they were.
        assert [r["bbox"] for r in g.regions[len(coco_g.regions):]] == [r["bbox"] for r in vg_g.regions]
    assert not any(g.key.startswith("vg-") and g.coco_id in coco_by_id for g in groups)


# ---------------------------------------------------------------------------------------------- bad input


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def tiny_coco(root: Path, captions: list[dict], objects: list[dict], images: list[dict] | None = None) -> Path:
    images = images or [{"id": 1, "file_name": "000000000001.jpg", "width": 100, "height": 80},
                        {"id": 2, "file_name": "000000000002.jpg", "width": 60, "height": 60}]
    cats = [{"id": 1, "name": "dog", "supercategory": "animal"}]
    write_json(root / "annotations" / "captions_train2017.json", {"images": images, "annotations": captions})
    write_json(root / "annotations" / "instances_train2017.json",
               {"images": images, "annotations": objects, "categories": cats})
    return root


def test_coco_bad_records_are_counted(tmp_path):
    captions = [
        {"id": 1, "image_id": 1, "caption": "A dog  on\n grass. "},
        {"id": 2, "image_id": 1, "caption": "   "},                    # whitespace only
        {"id": 3, "image_id": 1, "caption": ""},                       # empty
        {"id": 4, "image_id": 9, "caption": "no such image"},          # unknown image id
        {"id": 5, "image_id": 1, "caption": " A dog on grass."},       # repeats caption 1 once cleaned
        {"id": 6, "image_id": "1", "caption": "string id"},            # malformed record
        {"id": 7, "image_id": 1, "caption": "INVALID"},                # invalid UTF-8, patched in below
    ]
    objects = [
        {"id": 10, "image_id": 1, "bbox": [1, 2, 30, 40], "category_id": 1, "iscrowd": 0},
        {"id": 11, "image_id": 1, "bbox": [1, 2, -5, 40], "category_id": 1, "iscrowd": 0},   # negative size
        {"id": 12, "image_id": 1, "bbox": [1, 2, 30, 0], "category_id": 1, "iscrowd": 0},    # zero size
        {"id": 13, "image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1, "iscrowd": 1},   # crowd
        {"id": 14, "image_id": 1, "bbox": [0, 0, 10], "category_id": 1, "iscrowd": 0},       # not a box
        {"id": 15, "image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 77, "iscrowd": 0},  # unknown category
        {"id": 16, "image_id": 1, "bbox": [1, 2, 30, 40], "category_id": 1, "iscrowd": 0},   # duplicate of 10
    ]
    root = tiny_coco(tmp_path / "coco", captions, objects)
    path = root / "annotations" / "captions_train2017.json"
    path.write_bytes(path.read_bytes().replace(b"INVALID", b"caf\xe9 \xff"))
    groups, acc, rejects = build({"coco": root}, tmp_path / "work")
    assert acc["coco"]["inputs"] == {"image": 2, "caption": 7, "object": 7}
    assert acc["coco"]["rejected"] == {
        "image": {"no_annotations": 1},
        "caption": {"duplicate_record": 1, "empty_text": 2, "invalid_utf8": 1, "malformed_line": 1,
                    "no_image_record": 1},
        "object": {"bad_box": 2, "crowd_box": 1, "duplicate_record": 1, "malformed_line": 2},
    }
    [g] = groups
    assert [c.text for c in g.captions] == ["A dog on grass."]
    assert g.regions[0]["bbox"] == [1.0, 2.0, 30.0, 40.0] and g.regions[0]["ref"].where == "annotation 10"
    dup = next(r for r in rejects if r["reason"] == "duplicate_record" and r["kind"] == "object")
    assert (dup["file"], dup["where"]) == ("annotations/instances_train2017.json", "annotation 16")
    invalid = next(r for r in rejects if r["reason"] == "invalid_utf8")
    assert invalid["where"] == "annotation 7"


def test_truncated_json_keeps_what_parsed_and_goes_on(tmp_path):
    images = [{"image_id": i, "width": 50, "height": 40, "coco_id": None, "url": f"x/VG_100K_2/{i}.jpg"}
              for i in range(1, 5)]
    regions = [{"id": i, "regions": [{"region_id": 10 * i + k, "image_id": i, "phrase": f"thing {k}",
                                       "x": k, "y": k, "width": 5, "height": 5} for k in range(3)]}
               for i in range(1, 5)]
    root = tmp_path / "vg"
    write_json(root / "image_data.json", images)
    data = json.dumps(regions, indent=1).encode()
    (root / "region_descriptions.json").write_bytes(data[: data.index(b'"thing 1"', data.index(b'"id": 3'))])
    write_json(root / "attributes.json", [{"image_id": i, "attributes": [
        {"object_id": i, "names": ["cup"], "attributes": [" white ", "white", "small"], "x": 1, "y": 1, "w": 4,
         "h": 4}]} for i in range(1, 5)])
    groups, acc, rejects = build({"vg": root}, tmp_path / "work")
    assert acc["vg"]["inputs"] == {"image": 4, "region": 6, "object": 4, "line": 1}
    [broken] = [r for r in rejects if r["kind"] == "line"]
    assert broken["reason"] == "malformed_line" and broken["file"] == "region_descriptions.json"
    assert "line" in broken["where"] and "after item 2" in broken["where"]
    assert len(groups) == 4  # the objects file, read after the broken one, still counts
    assert groups[0].image_path.endswith("VG_100K_2/1.jpg")
    obj = [r for r in groups[0].regions if r["kind"] == "object"][0]
    assert obj["text"] == "white small cup" and obj["attributes"] == ["white", "small"]


def test_duplicate_image_ids_merge_or_conflict(tmp_path):
    images = [{"image_id": 1, "width": 50, "height": 40, "coco_id": None},
              {"image_id": 1, "width": 50, "height": 40, "coco_id": None},   # listed twice: merged
              {"image_id": 2, "width": 50, "height": 40, "coco_id": None},
              {"image_id": 2, "width": 70, "height": 40, "coco_id": None}]   # conflicting: rejected
    root = tmp_path / "vg"
    write_json(root / "image_data.json", images)
    write_json(root / "region_descriptions.json", [
        {"id": i, "regions": [{"region_id": i, "image_id": i, "phrase": "a cup", "x": 1, "y": 1, "width": 5,
                               "height": 5}]} for i in (1, 2)])
    groups, acc, rejects = build({"vg": root}, tmp_path / "work")
    assert [len(g.image_records) for g in groups] == [2, 1]
    assert acc["vg"]["rejected"] == {"image": {"duplicate_record": 1}}
    assert groups[1].ann_width == 50


def test_coco_vg_frames_rescale_or_refuse(tmp_path):
    coco = tiny_coco(tmp_path / "coco", [{"id": 1, "image_id": 1, "caption": "a dog"},
                                         {"id": 2, "image_id": 2, "caption": "a cat"}], [])
    root = tmp_path / "vg"
    write_json(root / "image_data.json", [{"image_id": 5, "width": 200, "height": 160, "coco_id": 1},   # 2x COCO's
                                          {"image_id": 6, "width": 100, "height": 30, "coco_id": 2},    # other aspect
                                          {"image_id": 7, "width": 100, "height": 80, "coco_id": 1}])   # COCO's frame
    write_json(root / "region_descriptions.json", [
        {"id": i, "regions": [{"region_id": i, "image_id": i, "phrase": "a thing", "x": 20, "y": 10, "width": 40,
                               "height": 30}]} for i in (5, 6, 7)])
    groups, acc, rejects = build({"coco": coco, "vg": root}, tmp_path / "work")
    merged, alone = groups
    assert merged.source == "coco+vg" and merged.key == "coco-000000000001"
    # Two VG images of one COCO image: both join it, each rescaled from its own frame.
    assert [r.where for r in merged.image_records] == ["image 1", "image 5", "image 7"]
    assert [r["bbox"] for r in merged.regions] == [[10.0, 5.0, 20.0, 15.0], [20.0, 10.0, 40.0, 30.0]]
    assert alone.source == "coco" and alone.regions == []
    assert acc["vg"]["rejected"] == {"image": {"image_size_mismatch": 1}, "region": {"image_size_mismatch": 1}}


def test_sbu_bad_lines(tmp_path):
    root = tmp_path / "sbu"
    root.mkdir()
    (root / "SBU_captioned_photo_dataset_urls.txt").write_bytes(
        b"http://static.flickr.com/1/11_aa.jpg\nnot a url\nhttp://static.flickr.com/1/12_bb.jpg\n"
        b"http://static.flickr.com/1/13_cc.jpg\n")
    (root / "SBU_captioned_photo_dataset_captions.txt").write_bytes(
        b"a boat\nlost caption\nbad \xc3\x28 bytes\n  \n\n\n")   # blank lines at the end pair nothing
    groups, acc, rejects = build({"sbu": root}, tmp_path / "work")
    assert [g.key for g in groups] == ["sbu-11_aa"]
    assert groups[0].image_path == str(root / "images" / "11_aa.jpg")
    assert acc["sbu"]["inputs"] == {"image": 4, "caption": 4}
    assert acc["sbu"]["rejected"] == {"image": {"malformed_line": 1, "no_annotations": 2},
                                      "caption": {"empty_text": 1, "invalid_utf8": 1, "no_image_record": 1}}
    bad = next(r for r in rejects if r["reason"] == "invalid_utf8")
    assert (bad["file"], bad["where"]) == ("SBU_captioned_photo_dataset_captions.txt", "line 3")


def test_cc_tsv_bad_lines(tmp_path):
    root = tmp_path / "cc"
    root.mkdir()
    (root / "Train_GCC-training.tsv").write_bytes(
        b"a red bus\thttp://a/1.jpg\nno tab here\nx\ty\tz\n\xff caption\thttp://a/4.jpg\nlast\thttp://a/5.jpg\n")
    groups, acc, rejects = build({"cc": root}, tmp_path / "work")
    assert [g.key for g in groups] == ["cc-000000000", "cc-000000004"]
    assert groups[1].image_path == str(root / "images" / "4.jpg")
    assert acc["cc"]["inputs"] == {"image": 3, "caption": 3, "line": 2}
    assert acc["cc"]["rejected"] == {"image": {"no_annotations": 1}, "caption": {"invalid_utf8": 1},
                                     "line": {"malformed_line": 2}}
    assert sorted(r["where"] for r in rejects if r["kind"] == "line") == ["line 2", "line 3"]


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE,
            link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_img2dataset_unsafe_members_are_never_used(tmp_path):
    from PIL import Image

    root = tmp_path / "i2d"
    root.mkdir()
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 6), "red").save(jpeg, "JPEG")
    with tarfile.open(root / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _member(tar, "000000000.jpg", jpeg.getvalue())
        _member(tar, "000000001.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")      # the image is a link
        _member(tar, "../../evil.jpg", b"x")                                        # escapes the folder
        _member(tar, "/tmp/absolute-evil.jpg", b"x")                                # absolute
        _member(tar, "000000003.jpg", kind=tarfile.LNKTYPE, link="000000000.jpg")   # hard link
    rows = [{"key": f"00000000{i}", "status": "success", "caption": f"caption {i}", "width": 8.0, "height": 6.0,
             "error_message": None} for i in range(4)]
    rows.append({"key": "000000004", "status": "failed_to_download", "caption": "gone", "width": None,
                 "height": None, "error_message": "HTTP Error 404: Not Found"})
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    # A tar without its parquet, and a parquet that is not one.
    shutil.copy(root / "00000.tar", root / "00001.tar")
    (root / "00002.parquet").write_bytes(b"not parquet")
    before = set(os.listdir(tmp_path))
    groups, acc, rejects = build({"cc": root}, tmp_path / "work")
    assert [g.key for g in groups] == ["cc-000000000"]
    assert acc["cc"]["rejected"]["image"] == {"missing_image": 1, "status_not_success": 1, "unsafe_tar_member": 2}
    assert acc["cc"]["rejected"]["line"] == {"malformed_line": 2, "unsafe_tar_member": 2}
    assert acc["cc"]["rejected"]["caption"] == {"missing_image": 1, "status_not_success": 1, "unsafe_tar_member": 2}
    unsafe = sorted({r["where"] for r in rejects if r["reason"] == "unsafe_tar_member"})
    assert unsafe == ["member ../../evil.jpg", "member /tmp/absolute-evil.jpg", "row 1 key 000000001",
                      "row 3 key 000000003"]
    assert set(os.listdir(tmp_path)) - before == {"work"}
    assert not os.path.exists("/tmp/absolute-evil.jpg") and not (tmp_path.parent / "evil.jpg").exists()


class _FakeSource:
    """A source yielding records straight from a list, for checks that no release format can express."""
    NAME = "fake"

    def __init__(self, records):
        self.records = records

    def iter_records(self, path):
        yield from self.records


def test_stage_checks_every_box_and_text(tmp_path, monkeypatch):
    nan = float("nan")
    records = [
        ImageRef("fake", "1", "/x/1.jpg", 10, 10, ref="list.txt#line 1"),
        Annotation("fake", "1", "region", "ok", [0, 0, 5, 5], ref="list.txt#line 2"),
        Annotation("fake", "1", "region", "nan size", [0, 0, nan, 5], ref="list.txt#line 3"),
        Annotation("fake", "1", "region", "nan corner", [nan, 0, 5, 5], ref="list.txt#line 4"),
        Annotation("fake", "1", "region", "inf", [0, 0, float("inf"), 5], ref="list.txt#line 5"),
        Annotation("fake", "1", "object", "partly outside is kept", [-3, -3, 5, 5], ref="list.txt#line 6"),
        Annotation("fake", "1", "region", "\t\n", [0, 0, 5, 5], ref="list.txt#line 7"),
        Annotation("fake", "Bad Id", "caption", "unsafe key", ref="list.txt#line 8"),
        Reject("fake", "line", "list.txt", "line 9", "malformed_line", "garbage"),
    ]
    monkeypatch.setitem(source_registry.registry(), "fake", _FakeSource(records))
    groups, acc, rejects = build({"fake": "unused"}, tmp_path)
    assert acc["fake"]["rejected"] == {"region": {"bad_box": 3, "empty_text": 1}, "caption": {"malformed_line": 1},
                                       "line": {"malformed_line": 1}}
    assert [r["text"] for r in groups[0].regions] == ["ok", "partly outside is kept"]


def test_missing_release_files_are_clear_errors(tmp_path):
    for name in ("coco", "vg", "sbu", "cc"):
        (tmp_path / name).mkdir()
        with pytest.raises(XvlmError, match="point"):
            stage_sources({name: str(tmp_path / name)}, str(tmp_path / "work"), QUIET)


# ---------------------------------------------------------------------------------------------- S3


@pytest.mark.s3
def test_stage_from_s3(sample, tmp_path, s3_prefix):
    paths = sample["paths"]
    for name, local in (("coco", paths["coco"]), ("vg", paths["vg"]), ("cc", paths["cc_img2dataset"])):
        for entry in storage.list_files(local):
            if "/val2017" in entry.path:
                continue
            storage.write_bytes(storage.join(s3_prefix, name, os.path.relpath(entry.path, local)),
                                storage.read_bytes(entry.path))
    remote = {name: storage.join(s3_prefix, name) for name in ("coco", "vg", "cc")}
    local = {"coco": paths["coco"], "vg": paths["vg"], "cc": paths["cc_img2dataset"]}
    from_s3, acc_s3, _ = build(remote, tmp_path / "s3")
    from_disk, acc_disk, _ = build(local, tmp_path / "disk")
    assert acc_s3 == acc_disk
    assert [(g.key, g.captions, [r["bbox"] for r in g.regions]) for g in from_s3] == \
        [(g.key, g.captions, [r["bbox"] for r in g.regions]) for g in from_disk]
    assert all(g.image_path.startswith(s3_prefix) for g in from_s3)
    cc = next(g for g in from_s3 if g.source == "cc")
    tar_path, _ = cc.image_path.split("#")
    data = storage.read_bytes(tar_path, cc.byte_offset, cc.byte_offset + cc.byte_size)
    assert data[:2] == b"\xff\xd8"


def test_truncated_img2dataset_tar(tmp_path):
    root = tmp_path / "i2d"
    root.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(3):
            _member(tar, f"00000000{i}.jpg", bytes([i]) * 5000)
    data = buf.getvalue()
    (root / "00000.tar").write_bytes(data[: 512 + 5120 + 512 + 2000])  # cut inside the second image
    rows = [{"key": f"00000000{i}", "status": "success", "caption": f"c {i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    groups, acc, rejects = build({"cc": root}, tmp_path / "work")
    assert [g.key for g in groups] == ["cc-000000000", "cc-000000001"]
    assert storage.read_bytes(groups[0].image_path.split("#")[0], groups[0].byte_offset,
                              groups[0].byte_offset + groups[0].byte_size) == b"\x00" * 5000
    # The cut image keeps its range (the image stage finds it short); the image after the cut is missing.
    assert acc["cc"]["rejected"] == {"image": {"missing_image": 1}, "caption": {"missing_image": 1},
                                     "line": {"malformed_line": 1}}
