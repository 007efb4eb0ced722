"""`xvlm sample-data`'s 16M sources and evaluation files: stock readers load them (pycocotools, pandas, pickle,
webdataset), the boxes lie on their shapes, the RefCOCO refs point at COCO's annotations, and the planted copies of
evaluation pictures are what planted.json says they are."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from shards.safe_pickle import load_plain
from sampledata import scenes
from sampledata import sources16m as sample_sources16m

IMAGES, VAL_IMAGES, SEED = 40, 6, 21


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    from sampledata.sample_data import generate

    root = tmp_path_factory.mktemp("s16") / "data"
    generate(root, images=IMAGES, val_images=VAL_IMAGES, seed=SEED, progress=False)
    return root


def _on_shape(image: Image.Image, box, shape_colours: set[str]) -> bool:
    x, y, w, h = box
    return scenes.nearest_colour(image.getpixel((int(x + w / 2), int(y + h / 2)))) in shape_colours


def test_objects365_loads_in_pycocotools_and_boxes_lie_on_shapes(out):
    from pycocotools.coco import COCO

    root = out / "objects365"
    coco = COCO(str(root / "annotations" / "zhiyuan_objv2_train.json"))
    assert {c["name"] for c in coco.cats.values()} == set(sample_sources16m.CATEGORY_NAMES.values())
    missing = 0
    for image_id, entry in coco.imgs.items():
        parts = entry["file_name"].split("/")
        assert parts[:2] == ["images", parts[1]] and parts[1] in ("v1", "v2") and parts[2].startswith("patch")
        path = root / "train" / parts[2] / parts[3]
        if not path.exists():
            missing += 1
            continue
        with Image.open(path) as image:
            assert image.size == (entry["width"], entry["height"])
            rgb = image.convert("RGB")
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
                assert set(ann) == {"id", "iscrowd", "isfake", "area", "isreflected", "bbox", "image_id", "category_id"}
                assert _on_shape(rgb, ann["bbox"], set(scenes.COLOURS)), ann
    assert missing == sample_sources16m.O365_MISSING
    assert sum(a["iscrowd"] for a in coco.dataset["annotations"]) == 2


def test_openimages_csvs_read_with_pandas_and_boxes_lie_on_shapes(out):
    import pandas as pd

    root = out / "openimages"
    boxes = pd.read_csv(root / "oidv6-train-annotations-bbox.csv")
    classes = pd.read_csv(root / "oidv7-class-descriptions-boxable.csv")
    listed = pd.read_csv(root / "train-images-boxable-with-rotation.csv")
    assert list(boxes.columns) == sample_sources16m.OI_BOX_HEADER
    assert list(classes.columns) == ["LabelName", "DisplayName"]
    assert list(listed.columns) == sample_sources16m.OI_IMAGE_HEADER
    assert list(boxes["ImageID"]) == sorted(boxes["ImageID"]) and set(boxes["ImageID"]) == set(listed["ImageID"])
    assert set(boxes["LabelName"]) <= set(classes["LabelName"])
    assert ((0 <= boxes["XMin"]) & (boxes["XMin"] < boxes["XMax"]) & (boxes["XMax"] <= 1)).all()
    assert ((0 <= boxes["YMin"]) & (boxes["YMin"] < boxes["YMax"]) & (boxes["YMax"] <= 1)).all()
    assert boxes["IsGroupOf"].sum() > 0
    missing = 0
    for image_id, rows in boxes.groupby("ImageID"):
        path = root / "train" / f"{image_id}.jpg"
        if not path.exists():
            missing += 1
            continue
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            for row in rows.itertuples():
                box = (row.XMin * image.width, row.YMin * image.height, (row.XMax - row.XMin) * image.width,
                       (row.YMax - row.YMin) * image.height)
                assert _on_shape(rgb, box, set(scenes.COLOURS))
    assert missing == sample_sources16m.OI_MISSING


def test_cc12m_tsv_and_img2dataset_agree(out):
    import pyarrow.parquet as pq
    import webdataset as wds

    root = out / "cc12m"
    rows = [line.split("\t") for line in (root / "cc12m.tsv").read_text().splitlines()]
    assert all(len(r) == 2 and r[0].startswith("https://") for r in rows)      # url first, then the caption
    table = pq.read_table(root / "img2dataset" / "00000.parquet").to_pylist()
    assert [(r["url"], r["caption"]) for r in table] == [tuple(r) for r in rows]
    assert sum(r["status"] != "success" for r in table) == sample_sources16m.CC12M_FAILED
    samples = list(wds.WebDataset(str(root / "img2dataset" / "00000.tar"), shardshuffle=False))
    assert len(samples) == len(rows) - sample_sources16m.CC12M_FAILED
    for s in samples:
        assert (root / "images" / f"{int(s['__key__'])}.jpg").read_bytes() == s["jpg"]


def test_refcoco_refs_point_at_coco_annotations(out):
    root = out / "refcoco"
    coco = json.loads((out / "coco" / "annotations" / "instances_train2017.json").read_text())
    coco_anns = {a["id"]: a for a in coco["annotations"]}
    for dataset, refs_name in (("refcoco", "refs(unc).p"), ("refcoco+", "refs(unc).p"), ("refcocog", "refs(umd).p")):
        raw = (root / dataset / refs_name).read_bytes()
        refs = load_plain(raw, what=refs_name)
        assert refs == pickle.loads(raw)      # the safe reader gives what pickle gives
        instances = json.loads((root / dataset / "instances.json").read_text())
        anns = {a["id"]: a for a in instances["annotations"]}
        splits = {"train", "val", "testA", "testB"} if dataset != "refcocog" else {"train", "val", "test"}
        assert {r["split"] for r in refs} <= splits and "train" in {r["split"] for r in refs}
        for ref in refs:
            assert set(ref) == {"sent_ids", "file_name", "ann_id", "ref_id", "image_id", "split", "sentences",
                                "category_id"}
            ann = anns[ref["ann_id"]]
            assert ann == coco_anns[ref["ann_id"]] and ann["image_id"] == ref["image_id"]
            assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]] and ref["sentences"]
            image = root / "images/mscoco/images/train2014" / f"COCO_train2014_{ref['image_id']:012d}.jpg"
            assert image.read_bytes() == (out / "coco" / "train2017" / f"{ref['image_id']:012d}.jpg").read_bytes()
            with Image.open(image) as picture:
                colour = scenes.nearest_colour(picture.convert("RGB").getpixel(
                    (int(ann["bbox"][0] + ann["bbox"][2] / 2), int(ann["bbox"][1] + ann["bbox"][3] / 2))))
            for sentence in ref["sentences"]:
                assert sentence["sent"].split()[1:3][0] in (colour, "small", "large"), sentence
                assert colour in sentence["sent"].split()[:4] and sentence["raw"].lower() == sentence["sent"]


def test_evaluation_files_and_planted_copies(out):
    ev = out / "eval"
    coco_ids = {int(p.stem) for folder in ("train2017", "val2017") for p in (out / "coco" / folder).glob("*.jpg")}
    for name in ("coco_test", "coco_val", "flickr30k_test", "flickr30k_val"):
        entries = json.loads((ev / f"{name}.json").read_text())
        assert entries and all(set(e) == {"image", "caption"} and len(e["caption"]) == 5 for e in entries)
        assert all((ev / "images" / e["image"]).exists() for e in entries)
        if name.startswith("coco"):
            assert all(int(e["image"][-16:-4]) in coco_ids and e["image"].startswith("val2014/COCO_val2014_")
                       for e in entries)
    refs = load_plain((out / "refcoco" / "refcoco+" / "refs(unc).p").read_bytes())
    held_out = {(r["image_id"], s["sent"]) for r in refs if r["split"] != "train" for s in r["sentences"]}
    grounding = json.loads((ev / "refcoco+_val.json").read_text()) + json.loads((ev / "refcoco+_test.json").read_text())
    assert {(int(e["image"][-16:-4]), e["text"]) for e in grounding} == held_out
    planted = json.loads((ev / "planted.json").read_text())
    assert {p["kind"] for p in planted} == set(sample_sources16m.PLANT_KINDS)
    for p in planted:
        original = (ev / "images" / p["eval_image"]).read_bytes()
        copy = _planted_file(out, p)
        if p["kind"] == "exact":
            assert copy == original
        a, b = Image.open(io.BytesIO(original)), Image.open(io.BytesIO(copy))
        expected = {"exact": a.size, "reencoded": a.size, "resized": (round(a.width * 0.7), round(a.height * 0.7)),
                    "cropped": (a.width - 8, a.height - 8)}[p["kind"]]
        assert b.size == expected and (p["kind"] == "exact" or copy != original)


def _planted_file(out: Path, p: dict) -> bytes:
    source, ident = p["key"].split("-", 1)
    if source == "cc12m":
        return (out / "cc12m" / "images" / f"{int(ident)}.jpg").read_bytes()
    if source == "openimages":
        return (out / "openimages" / "train" / f"{ident}.jpg").read_bytes()
    return next((out / "objects365" / "train").rglob(f"objects365_v*_{int(ident):08d}.jpg")).read_bytes()
