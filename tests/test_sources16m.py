"""The 16M sources (Objects365, Open Images, CC12M, RefCOCO) on `xvlm sample-data` output and on hand-made bad
input: every record is grouped or rejected with its reason (inputs = grouped + rejected, per source and kind), the
RefCOCO join into COCO samples, and the clear errors (exit 2) for what cannot be read at all."""
from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_sources import build, reasons  # noqa: E402

from pipeline.sources.objects365 import image_file  # noqa: E402
from storage.errors import XvlmError  # noqa: E402
from tools.cli import main as xvlm_main  # noqa: E402


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    from sampledata.sample_data import generate

    return generate(tmp_path_factory.mktemp("sample16m"), images=40, val_images=4, seed=5, progress=False)


# ---------------------------------------------------------------------------------------------- sample data


def test_objects365_alone(sample, tmp_path):
    groups, acc, rejects = build({"objects365": sample["paths"]["objects365"]}, tmp_path)
    n = sample["counts"]["objects365"]
    assert acc["objects365"]["inputs"] == {"image": n["images"], "object": n["boxes"]} and rejects == []
    assert len(groups) == n["images"]
    assert sum(not os.path.exists(g.image_path) for g in groups) == n["missing_images"]
    assert all("/train/patch" in g.image_path for g in groups)
    regions = [r for g in groups for r in g.regions]
    assert {r["text"] for r in regions} <= {"Circle", "Square", "Triangle", "Star", "Hexagon", "Diamond"}
    assert sum(r.get("group_of", False) for r in regions) == n["group_boxes"] > 0


def test_openimages_alone_boxes_stay_normalized_until_the_image_stage(sample, tmp_path):
    groups, acc, rejects = build({"openimages": sample["paths"]["openimages"]}, tmp_path)
    n = sample["counts"]["openimages"]
    assert acc["openimages"]["inputs"] == {"image": n["images"], "object": n["boxes"]} and rejects == []
    assert all(g.normalized and g.ann_width is None for g in groups)
    for g in groups:
        for r in g.regions:
            x, y, w, h = r["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 1 + 1e-9 and y + h <= 1 + 1e-9
    assert sum(r.get("group_of", False) for g in groups for r in g.regions) == n["group_boxes"] > 0
    assert sum(not os.path.exists(g.image_path) for g in groups) == n["missing_images"]


@pytest.mark.parametrize("form", ["cc12m", "cc12m_img2dataset"])
def test_cc12m_alone(sample, tmp_path, form):
    groups, acc, rejects = build({"cc12m": sample["paths"][form]}, tmp_path)
    n = sample["counts"]["cc12m"]
    assert acc["cc12m"]["inputs"] == {"image": n["rows"], "caption": n["rows"]}
    assert [g.key for g in groups] == sorted(g.key for g in groups)
    assert all(g.key.startswith("cc12m-") and len(g.key) == len("cc12m-") + 9 for g in groups)
    if form == "cc12m":      # the TSV form: failed downloads are missing files for the image stage
        assert rejects == [] and sum(not os.path.exists(g.image_path) for g in groups) == n["failed_to_download"]
    else:
        assert reasons(rejects) == {"status_not_success": 2 * n["failed_to_download"]}
    lines = (Path(sample["paths"]["cc12m"]) / "cc12m.tsv").read_text().splitlines()
    by_key = {g.key: g for g in groups}
    for row, line in enumerate(lines):          # url TAB caption: the caption of row r is on image r
        url, caption = line.split("\t")
        if f"cc12m-{row:09d}" in by_key:
            assert by_key[f"cc12m-{row:09d}"].captions[0].text == caption


def test_refcoco_alone_train_refs_only(sample, tmp_path):
    groups, acc, rejects = build({"refcoco": sample["paths"]["refcoco"]}, tmp_path)
    counts = sample["counts"]["refcoco"]
    sentences = sum(counts[d]["sentences"] for d in ("refcoco", "refcoco+", "refcocog"))
    held_out = sentences - sum(counts[d]["train_sentences"] for d in ("refcoco", "refcoco+", "refcocog"))
    assert acc["refcoco"]["inputs"]["region"] == sentences
    assert reasons(rejects)["held_out_split"] == held_out
    assert set(reasons(rejects)) <= {"held_out_split", "duplicate_record"}
    assert groups and all(g.key == f"refcoco-{g.coco_id:012d}" and os.path.exists(g.image_path) for g in groups)
    assert all(r["kind"] == "region" for g in groups for r in g.regions)


def test_refcoco_joins_the_coco_sample_of_its_image(sample, tmp_path):
    paths = sample["paths"]
    groups, acc, _ = build({"coco": paths["coco"], "refcoco": paths["refcoco"], "vg": paths["vg"]}, tmp_path)
    joined = [g for g in groups if "refcoco" in g.source.split("+")]
    assert joined and all(g.key.startswith("coco-") and g.source.startswith("coco+") for g in joined)
    assert not any(g.key.startswith("refcoco-") for g in groups)   # every RefCOCO image is a staged COCO image
    assert any(g.source == "coco+refcoco+vg" for g in groups)
    for g in joined:
        assert g.image_path.endswith(f"/train2017/{g.coco_id:012d}.jpg")      # COCO's file, COCO's frame
        assert g.captions and {r["kind"] for r in g.regions} >= {"object", "region"}
        assert [r.source for r in g.image_records][0] == "coco"
    refcoco_alone, _, _ = build({"refcoco": paths["refcoco"]}, tmp_path / "alone")
    alone = {g.coco_id: g for g in refcoco_alone}
    for g in joined:     # the same boxes: RefCOCO's instances frame is COCO's
        mine = [r["bbox"] for r in g.regions if r["ref"].source == "refcoco"]
        assert mine == [r["bbox"] for r in alone[g.coco_id].regions]


# ---------------------------------------------------------------------------------------------- bad input


def _openimages(root: Path, rows: list[str], classes: str | None = "LabelName,DisplayName\n/m/01,Dog\n",
                listed: list[str] | None = None) -> Path:
    root.mkdir(parents=True)
    header = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside"
    (root / "oidv6-train-annotations-bbox.csv").write_text(header + "\n" + "".join(r + "\n" for r in rows))
    (root / "validation-annotations-bbox.csv").write_text(header + "\n" + "00000000000000aa,x,/m/01,1,0,1,0,1,0,0,0,0,0\n")
    if classes is not None:
        (root / "oidv7-class-descriptions-boxable.csv").write_text(classes)
    if listed is not None:
        (root / "train-images-boxable-with-rotation.csv").write_text("ImageID,Subset,Rotation\n" +
                                                                      "".join(f"{i},train,0.0\n" for i in listed))
    return root


def test_openimages_bad_rows_are_counted(tmp_path):
    a, b, c = "000026e7ee790996", "000062a39995e348", "0000c64e1253d68f"
    rows = [
        f"{a},xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0",       # good
        f"{a},xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,1,0,0",       # good, group of
        f"{a},xclick,/m/99,1,0.1,0.5,0.2,0.6,0,0,0,0,0",       # no class description
        f"{a},xclick,/m/01,1,-0.1,0.5,0.2,0.6,0,0,0,0,0",      # outside [0, 1]
        f"{a},xclick,/m/01,1,0.1,1.5,0.2,0.6,0,0,0,0,0",       # outside [0, 1]
        f"{a},xclick,/m/01,1,0.6,0.5,0.2,0.6,0,0,0,0,0",       # inverted
        f"{a},xclick,/m/01,1,0.1,0.5,0.2,0.2,0,0,0,0,0",       # zero height
        f"{a},xclick,/m/01,1,abc,0.5,0.2,0.6,0,0,0,0,0",       # not a number
        f"{a},xclick,/m/01,1,nan,0.5,0.2,0.6,0,0,0,0,0",       # NaN
        f"{a},xclick,/m/01,1,0.1,0.5",                         # malformed line: too few fields
        "",                                                     # blank line: not a record
        f'{b},xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0',       # an image not in the image list
        "NOT-AN-ID,xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0",  # ImageID not 16 hex digits
        f'{c},xclick,"/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0',      # an unclosed quote swallows the next line
        f"{c},xclick,/m/01,1,0.1,0.5,0.2,0.6,0,0,0,0,0",
    ]
    root = _openimages(tmp_path / "oi", rows, listed=[a, c])
    groups, acc, rejects = build({"openimages": root}, tmp_path / "work")
    assert acc["openimages"]["inputs"] == {"image": 1, "object": 13}   # validation split held out; c lost its rows
    got = {(r["where"], r["reason"]) for r in rejects}
    assert got == {("line 4", "malformed_line"), ("line 5", "bad_box"), ("line 6", "bad_box"), ("line 7", "bad_box"),
                   ("line 8", "bad_box"), ("line 9", "malformed_line"), ("line 10", "bad_box"),
                   ("line 11", "malformed_line"), ("line 13", "no_image_record"), ("line 14", "malformed_line"),
                   ("line 15", "malformed_line")}
    assert "no class description" in next(r["detail"] for r in rejects if r["where"] == "line 4")
    [g] = groups
    assert g.key == f"openimages-{a}" and g.image_path.endswith(f"/train/{a}.jpg") and g.normalized
    assert [r.get("group_of", False) for r in g.regions] == [False, True]
    assert g.regions[0]["bbox"] == pytest.approx([0.1, 0.2, 0.4, 0.4])


def test_openimages_v6_classes_without_header_and_missing_files_are_clear(tmp_path):
    root = _openimages(tmp_path / "v6", ["000026e7ee790996,x,/m/01,1,0,0.5,0,0.5,0,0,0,0,0"], classes=None)
    (root / "class-descriptions-boxable.csv").write_text("/m/01,Dog\n")          # V6: no header
    groups, _, rejects = build({"openimages": root}, tmp_path / "w1")
    assert rejects == [] and [r["text"] for r in groups[0].regions] == ["Dog"]
    no_classes = _openimages(tmp_path / "none", ["000026e7ee790996,x,/m/01,1,0,0.5,0,0.5,0,0,0,0,0"], classes=None)
    with pytest.raises(XvlmError, match="class-descriptions-boxable.csv"):
        build({"openimages": no_classes}, tmp_path / "w2")
    bad_header = tmp_path / "header"
    bad_header.mkdir()
    (bad_header / "train-annotations-bbox.csv").write_text("ImageID,LabelName\nx,y\n")
    (bad_header / "class-descriptions-boxable.csv").write_text("/m/01,Dog\n")
    with pytest.raises(XvlmError, match="no XMin, XMax, YMin, YMax"):
        build({"openimages": bad_header}, tmp_path / "w3")


def _o365(root: Path, images: list, annotations: list, categories: list | None = None) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "zhiyuan_objv2_train.json").write_text(json.dumps(
        {"images": images, "annotations": annotations,
         "categories": categories if categories is not None else [{"id": 1, "name": "Person"}]}))
    return root


def test_objects365_bad_records_are_counted(tmp_path):
    images = [{"id": 1, "file_name": "images/v1/patch0/objects365_v1_00000001.jpg", "width": 100, "height": 80},
              {"id": 2, "file_name": "../../etc/passwd", "width": 10, "height": 10},            # leaves the folder
              {"id": 3, "file_name": "objects365_v1_00000003.jpg", "width": 0, "height": 10}]  # no size
    anns = [{"id": 10, "image_id": 1, "bbox": [1, 2, 30, 40], "category_id": 1, "iscrowd": 0},
            {"id": 11, "image_id": 1, "bbox": [1, 2, 30, 40], "category_id": 1, "iscrowd": 1},  # same box, a group
            {"id": 17, "image_id": 1, "bbox": [1, 2, 30, 40], "category_id": 1, "iscrowd": 0},  # repeats 10
            {"id": 12, "image_id": 1, "bbox": [1, 2, 30], "category_id": 1},                     # not a box
            {"id": 13, "image_id": 1, "bbox": [1, 2, 30, 40], "category_id": 7},                 # unknown category
            {"id": 14, "image_id": "1", "bbox": [1, 2, 30, 40], "category_id": 1},               # id not an int
            {"id": 15, "image_id": 9, "bbox": [1, 2, 30, 40], "category_id": 1},                 # no such image
            {"id": 16, "image_id": 1, "bbox": [1, 2, -3, 40], "category_id": 1},                 # negative size
            "not an object"]
    root = _o365(tmp_path / "o365", images, anns)
    groups, acc, rejects = build({"objects365": root}, tmp_path / "work")
    assert acc["objects365"]["inputs"] == {"image": 3, "object": 9}
    assert sorted((r["where"], r["reason"]) for r in rejects) == sorted([
        ("images[1]", "malformed_line"), ("images[2]", "malformed_line"), ("annotation 17", "duplicate_record"),
        ("annotation 12", "malformed_line"), ("annotation 13", "malformed_line"), ("annotation 14", "malformed_line"),
        ("annotation 15", "no_image_record"), ("annotation 16", "bad_box"), ("annotations[8]", "malformed_line")])
    [g] = groups
    assert g.image_path == str(root / "train/patch0/objects365_v1_00000001.jpg")
    assert [r.get("group_of", False) for r in g.regions] == [False, True]
    assert image_file("obj365_train_000000000139.jpg") == "train/obj365_train_000000000139.jpg"     # v1 names
    assert image_file("images/v2/patch16/objects365_v2_00908726.jpg") == "train/patch16/objects365_v2_00908726.jpg"


def test_objects365_truncated_json_keeps_what_came_before(tmp_path):
    images = [{"id": k, "file_name": f"images/v1/patch0/o_{k}.jpg", "width": 10, "height": 10} for k in range(3)]
    anns = [{"id": 10 + k, "image_id": k, "bbox": [1, 1, 5, 5], "category_id": 1} for k in range(3)]
    root = tmp_path / "o365"
    (root / "annotations").mkdir(parents=True)
    text = json.dumps({"categories": [{"id": 1, "name": "Person"}], "images": images, "annotations": anns})
    (root / "annotations" / "zhiyuan_objv2_train.json").write_text(text[: text.index('{"id": 12')] + '{"id": 1')
    groups, acc, rejects = build({"objects365": root}, tmp_path / "work")
    assert [r["reason"] for r in rejects if r["kind"] == "line"] == ["malformed_line"]
    assert len(groups) == 2      # the two annotations before the cut; the third image has none left
    with pytest.raises(XvlmError, match="zhiyuan_objv2_train.json or objects365_train.json"):
        build({"objects365": tmp_path / "empty"}, tmp_path / "w2")


def _refer(root: Path, refs: object, instances: dict | None = None, dataset: str = "refcoco+",
           refs_name: str = "refs(unc).p") -> Path:
    folder = root / dataset
    folder.mkdir(parents=True)
    data = refs if isinstance(refs, bytes) else pickle.dumps(refs, protocol=2)
    (folder / refs_name).write_bytes(data)
    instances = instances or {
        "images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 100, "height": 80}],
        "annotations": [{"id": 50, "image_id": 5, "bbox": [1, 2, 30, 40], "category_id": 1}],
        "categories": [{"id": 1, "name": "person"}]}
    (folder / "instances.json").write_text(json.dumps(instances))
    return root


def _ref(ref_id: int, ann_id: int = 50, split: str = "train", sentences: object = None, image_id: int = 5) -> dict:
    sentences = sentences if sentences is not None else [{"raw": f"Man number {ref_id}.", "sent": "man", "sent_id": 0}]
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "sentences": sentences,
            "category_id": 1, "file_name": "x.jpg", "sent_ids": [0]}


def test_refcoco_bad_refs_are_counted(tmp_path):
    refs = [_ref(0),
            _ref(1, ann_id=999),                                   # ann_id missing from instances.json
            _ref(2, split="testB"),                                # held out
            _ref(3, sentences=[{"raw": "", "sent": ""}, 7]),      # empty text, not a sentence
            _ref(4, sentences=[{"raw": "caf\udce9 au lait"}]),   # invalid UTF-8 (Python 2 bytes)
            _ref(5, image_id=6),                                   # the ann is on another image
            {"ref_id": 6, "split": "train"},                       # not a ref
            "garbage"]
    root = _refer(tmp_path / "refer", refs)
    groups, acc, rejects = build({"refcoco": root}, tmp_path / "work")
    assert acc["refcoco"]["inputs"] == {"image": 1, "region": 7, "line": 2}
    assert sorted((r["where"], r["reason"]) for r in rejects) == sorted([
        ("ref 1 sentence 0", "malformed_line"), ("ref 2 sentence 0", "held_out_split"),
        ("ref 3 sentence 0", "empty_text"), ("ref 3 sentence 1", "malformed_line"),
        ("ref 4 sentence 0", "invalid_utf8"), ("ref 5 sentence 0", "malformed_line"),
        ("ref 6", "malformed_line"), ("refs[7]", "malformed_line")])
    [g] = groups
    assert g.key == "refcoco-000000000005" and g.coco_id == 5
    assert g.image_path == str(root / "images/mscoco/images/train2014/COCO_train2014_000000000005.jpg")
    assert [(r["text"], r["bbox"]) for r in g.regions] == [("Man number 0.", [1.0, 2.0, 30.0, 40.0])]


def test_refcoco_hostile_pickle_is_a_clear_error_and_never_runs(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return os.system, ("touch /tmp/xvlm-refcoco-pwned",)

    root = _refer(tmp_path / "refer", pickle.dumps([_ref(0), Evil()], protocol=2))
    with pytest.raises(XvlmError, match=r"refcoco\+/refs\(unc\)\.p refused: .*global (posix|os)\.system"):
        build({"refcoco": root}, tmp_path / "work")
    assert not os.path.exists("/tmp/xvlm-refcoco-pwned")
    # From the CLI: exit 2, one line, no traceback.
    code = xvlm_main(["build-shards", "--source", f"refcoco={root}", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err and "Traceback" not in err
    class_root = _refer(tmp_path / "cls", pickle.dumps([_ref(0), {"x": XvlmError("boom")}], protocol=4))
    with pytest.raises(XvlmError, match="global storage.errors.XvlmError"):
        build({"refcoco": class_root}, tmp_path / "w2")
    with pytest.raises(XvlmError, match="holds a dict"):
        build({"refcoco": _refer(tmp_path / "dict", {"refs": []})}, tmp_path / "w3")
    with pytest.raises(XvlmError, match="point refcoco=PATH"):
        build({"refcoco": tmp_path / "nothing"}, tmp_path / "w4")
