"""`xvlm sample-data`, the 16M sources: Objects365 v2, Open Images V7 boxes, CC12M (TSV + img2dataset) and
RefCOCO / RefCOCO+ / RefCOCOg in their real layouts, plus X-VLM's evaluation files (Karpathy COCO, Flickr30K,
RefCOCO+) with their images, and copies of evaluation pictures planted in the web sources for the leak filter.

Called by tools/sample_data.py after the COCO / VG / SBU / CC writers, on picture indices after theirs, so the
four older sources keep their bytes. Same seed -> byte-identical files.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import storage
from sampledata import scenes
from sampledata.sample_data import CC_ERRORS, Img2datasetShard, Picture, PictureStream, img2dataset_key, make_picture

OWNED = ("objects365", "openimages", "cc12m", "refcoco", "eval")
WEB_SHARE = 0.05              # pictures of each web source per --images
FLICKR_SHARE = 0.04           # Flickr30K test pictures per --images (each planted once in a web source)
O365_MISSING = 1              # Objects365 images listed but not on disk (mmdetection skips three real ones)
OI_MISSING = 1                # Open Images boxes whose image was not downloaded
CC12M_FAILED = 2              # CC12M rows img2dataset could not download
KARPATHY_FROM_TRAIN = 3       # COCO train2017 pictures in the Karpathy test split (val2014 is in train2017)
PLANT_KINDS = ("exact", "reencoded", "resized", "cropped")
WEB_SOURCES = ("cc12m", "openimages", "objects365")
CATEGORY_NAMES = {shape: shape.capitalize() for shape in scenes.SHAPES}   # Objects365 / Open Images capitalise
OI_LABELS = {shape: f"/m/0{k + 1:02d}xv{k}" for k, shape in enumerate(scenes.SHAPES)}
OI_BOX_HEADER = ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax", "IsOccluded",
                 "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside", "XClick1X", "XClick2X", "XClick3X",
                 "XClick4X", "XClick1Y", "XClick2Y", "XClick3Y", "XClick4Y"]
OI_IMAGE_HEADER = ["ImageID", "Subset", "OriginalURL", "OriginalLandingURL", "License", "AuthorProfileURL", "Author",
                   "Title", "OriginalSize", "OriginalMD5", "Thumbnail300KURL", "Rotation"]


@dataclass
class Item:
    """One picture as a web source stores it: bytes, size, object boxes, and where it came from if planted."""
    jpeg: bytes
    width: int
    height: int
    objects: list[tuple[str, tuple[float, float, float, float]]]     # (shape, [x, y, w, h]) in these pixels
    caption: str
    planted: dict | None = None                                      # {"kind", "eval_set", "eval_image"}


@dataclass
class Plan:
    """What the web sources hold: their own pictures plus the planted copies, per source."""
    items: dict[str, list[Item]] = field(default_factory=lambda: {s: [] for s in WEB_SOURCES})


def _write_json(path: Path, obj: object) -> None:
    storage.write_text(str(path), json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


# ---------------------------------------------------------------------------------------------- planted copies


def _planted_copy(pic: Picture, kind: str) -> tuple[bytes, int, int, list]:
    """A copy of an evaluation picture as a web crawl might hold it, with its object boxes in the copy's pixels."""
    scene = pic.scene
    boxes = [(o.shape, tuple(float(v) for v in o.box)) for o in scene.objects]
    if kind == "exact":
        return pic.jpeg, scene.width, scene.height, boxes
    image = Image.open(io.BytesIO(pic.jpeg)).convert("RGB")
    if kind == "reencoded":
        return scenes.jpeg_bytes(image, quality=70), scene.width, scene.height, boxes
    if kind == "resized":
        w, h = round(scene.width * 0.7), round(scene.height * 0.7)
        sx, sy = w / scene.width, h / scene.height
        return scenes.jpeg_bytes(image.resize((w, h), Image.Resampling.LANCZOS)), w, h, \
            [(s, (x * sx, y * sy, bw * sx, bh * sy)) for s, (x, y, bw, bh) in boxes]
    # cropped by a few pixels: 3 off the left and top, 5 off the right and bottom
    left, top, right, bottom = 3, 3, scene.width - 5, scene.height - 5
    cropped = []
    for s, (x, y, bw, bh) in boxes:
        x0, y0, x1, y1 = max(x, left), max(y, top), min(x + bw, right), min(y + bh, bottom)
        cropped.append((s, (x0 - left, y0 - top, x1 - x0, y1 - y0)))
    return scenes.jpeg_bytes(image.crop((left, top, right, bottom))), right - left, bottom - top, cropped


def _item(pic: Picture, planted: dict | None = None, kind: str = "exact") -> Item:
    jpeg, w, h, boxes = _planted_copy(pic, kind)
    caption = scenes.short_caption(pic.scene, pic.text_rng, "cc")
    return Item(jpeg, w, h, boxes, caption, planted)


# ---------------------------------------------------------------------------------------------- evaluation files


def write_eval(root: Path, coco_root: Path, train: list[tuple[int, Picture]], val: list[tuple[int, Picture]],
               flickr: list[Picture], flickr_val: list[Picture]) -> dict:
    """X-VLM's evaluation files with their images: coco_{test,val}.json (Karpathy: image "val2014/COCO_val2014_ID.jpg",
    caption list), flickr30k_{test,val}.json (image "flickr30k-images/ID.jpg"); images under eval/images/."""
    images = root / "images"

    def coco_entries(pairs: list[tuple[int, Picture]], folder: str) -> list[dict]:
        entries = []
        for coco_id, pic in pairs:
            name = f"val2014/COCO_val2014_{coco_id:012d}.jpg"
            storage.write_bytes(str(images / name), storage.read_bytes(str(coco_root / folder / f"{coco_id:012d}.jpg")))
            entries.append({"image": name, "caption": scenes.captions(pic.scene, pic.text_rng, count=5)})
        return entries

    def flickr_entries(pictures: list[Picture], first_id: int) -> list[dict]:
        entries = []
        for k, pic in enumerate(pictures):
            name = f"flickr30k-images/{first_id + 7919 * k}.jpg"
            storage.write_bytes(str(images / name), pic.jpeg)
            entries.append({"image": name, "caption": scenes.captions(pic.scene, pic.text_rng, count=5)})
        return entries

    test = coco_entries(train[:KARPATHY_FROM_TRAIN], "train2017") + coco_entries(val, "val2017")
    valid = coco_entries(train[KARPATHY_FROM_TRAIN:KARPATHY_FROM_TRAIN + 2], "train2017")
    _write_json(root / "coco_test.json", test)
    _write_json(root / "coco_val.json", valid)
    _write_json(root / "flickr30k_test.json", flickr_entries(flickr, 1000092795))
    _write_json(root / "flickr30k_val.json", flickr_entries(flickr_val, 2000092795))
    return {"coco_test": len(test), "coco_val": len(valid), "flickr30k_test": len(flickr),
            "flickr30k_val": len(flickr_val)}


# ---------------------------------------------------------------------------------------------- Objects365 v2


def write_objects365(root: Path, items: list[Item], seed: int) -> tuple[dict, list[dict]]:
    """annotations/zhiyuan_objv2_train.json (COCO-style, v2 file names "images/v1/patchN/objects365_v1_ID.jpg") and
    train/patchN/objects365_v1_ID.jpg; O365_MISSING listed images are not on disk; iscrowd=1 group boxes."""
    rng = np.random.default_rng([seed, 365])
    images, annotations, planted = [], [], []
    missing = set(rng.permutation([k for k, it in enumerate(items) if it.planted is None])[:O365_MISSING].tolist())
    ann_id = 1
    for k, item in enumerate(items):
        image_id = 420000 + 37 * k
        version = "v1" if k % 2 == 0 else "v2"
        patch = f"patch{k % 3}"
        images.append({"height": item.height, "id": image_id, "license": 5, "width": item.width,
                       "file_name": f"images/{version}/{patch}/objects365_{version}_{image_id:08d}.jpg", "url": ""})
        if k not in missing:
            storage.write_bytes(str(root / "train" / patch / f"objects365_{version}_{image_id:08d}.jpg"), item.jpeg)
        for j, (shape, (x, y, w, h)) in enumerate(item.objects):
            crowd = int(k < 2 and j == 0)      # a group box in the first two images
            annotations.append({"id": ann_id, "iscrowd": crowd, "isfake": 0, "area": round(w * h, 2),
                                "isreflected": 0, "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                                "image_id": image_id, "category_id": scenes.SHAPES.index(shape) + 1})
            ann_id += 1
        if item.planted:
            planted.append({**item.planted, "source": "objects365", "key": f"objects365-{image_id}"})
    categories = [{"name": CATEGORY_NAMES[s], "id": k + 1} for k, s in enumerate(scenes.SHAPES)]
    _write_json(root / "annotations" / "zhiyuan_objv2_train.json",
                {"images": images, "annotations": annotations, "categories": categories, "licenses": []})
    return {"images": len(images), "boxes": len(annotations), "group_boxes": sum(a["iscrowd"] for a in annotations),
            "missing_images": len(missing)}, planted


# ---------------------------------------------------------------------------------------------- Open Images V7


def _oi_row(image_id: str, shape: str, box, item: Item, group: int) -> list[str]:
    x, y, w, h = box
    x0, x1, y0, y1 = x / item.width, (x + w) / item.width, y / item.height, (y + h) / item.height
    clicks = [f"{v:.6f}" for v in (x0, x1, x0, x1, y0, y0, y1, y1)]
    return [image_id, "xclick", OI_LABELS[shape], "1", f"{x0:.6f}", f"{x1:.6f}", f"{y0:.6f}", f"{y1:.6f}",
            "0", "0", str(group), "0", "0"] + clicks


def write_openimages(root: Path, items: list[Item], seed: int) -> tuple[dict, list[dict]]:
    """oidv6-train-annotations-bbox.csv (sorted by ImageID, normalized XMin/XMax/YMin/YMax), the V7 class
    descriptions with their header, train-images-boxable-with-rotation.csv and train/IMAGEID.jpg; OI_MISSING
    images were not downloaded; IsGroupOf boxes."""
    rng = np.random.default_rng([seed, 600])
    ids = [rng.bytes(8).hex() for _ in items]
    missing = set(rng.permutation([k for k, it in enumerate(items) if it.planted is None])[:OI_MISSING].tolist())
    rows, image_rows, planted, groups = [], [], [], 0
    for k, (image_id, item) in enumerate(zip(ids, items)):
        if k not in missing:
            storage.write_bytes(str(root / "train" / f"{image_id}.jpg"), item.jpeg)
        for j, (shape, box) in enumerate(item.objects):
            group = int(k % 3 == 0 and j == 0)
            groups += group
            rows.append(_oi_row(image_id, shape, box, item, group))
        image_rows.append([image_id, "train", f"https://farm1.staticflickr.com/{k}/{image_id}_o.jpg",
                           f"https://www.flickr.com/photos/x/{k}", "https://creativecommons.org/licenses/by/2.0/",
                           "https://www.flickr.com/people/x/", "x", f"picture {k}", str(len(item.jpeg)),
                           "bWQ1", "", "90.0" if k % 5 == 4 else "0.0"])
        if item.planted:
            planted.append({**item.planted, "source": "openimages", "key": f"openimages-{image_id}"})
    rows.sort(key=lambda r: (r[0], r[4], r[6]))
    image_rows.sort()

    def csv_text(header: list[str] | None, lines: list[list[str]]) -> str:
        return "".join(",".join(r) + "\n" for r in ([header] if header else []) + lines)

    storage.write_text(str(root / "oidv6-train-annotations-bbox.csv"), csv_text(OI_BOX_HEADER, rows))
    storage.write_text(str(root / "train-images-boxable-with-rotation.csv"), csv_text(OI_IMAGE_HEADER, image_rows))
    storage.write_text(str(root / "oidv7-class-descriptions-boxable.csv"),
                       csv_text(["LabelName", "DisplayName"], [[OI_LABELS[s], CATEGORY_NAMES[s]] for s in scenes.SHAPES]))
    return {"images": len(items), "boxes": len(rows), "group_boxes": groups, "missing_images": len(missing)}, planted


# ---------------------------------------------------------------------------------------------- CC12M


def write_cc12m(root: Path, items: list[Item], seed: int) -> tuple[dict, list[dict]]:
    """cc12m.tsv (url TAB caption, no header), images/ROW.jpg for the rows that downloaded, and img2dataset's
    webdataset output in img2dataset/; CC12M_FAILED rows failed to download."""
    rng = np.random.default_rng([seed, 12000])
    failed = set(rng.permutation([k for k, it in enumerate(items) if it.planted is None])[:CC12M_FAILED].tolist())
    shard = Img2datasetShard(root / "img2dataset", 0)
    lines, planted = [], []
    try:
        for row, item in enumerate(items):
            url = f"https://web.example.org/{rng.bytes(6).hex()}/{row}.jpg"
            lines.append(f"{url}\t{item.caption}\n")
            ok = row not in failed
            w, h = (item.width, item.height) if ok else (None, None)
            meta = {"url": url, "caption": item.caption, "key": img2dataset_key(0, row),
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else CC_ERRORS[row % len(CC_ERRORS)], "width": w, "height": h,
                    "original_width": w, "original_height": h, "exif": "{}" if ok else None,
                    "sha256": hashlib.sha256(item.jpeg).hexdigest() if ok else None}
            shard.add(meta, item.jpeg if ok else None)
            if ok:
                storage.write_bytes(str(root / "images" / f"{row}.jpg"), item.jpeg)
            if item.planted:
                planted.append({**item.planted, "source": "cc12m", "key": f"cc12m-{row:09d}"})
    except BaseException:
        shard.abort()
        raise
    shard.close()
    storage.write_text(str(root / "cc12m.tsv"), "".join(lines))
    return {"rows": len(items), "images": len(items) - len(failed), "failed_to_download": len(failed)}, planted


# ---------------------------------------------------------------------------------------------- RefCOCO


def _sentences(pic: Picture, object_index: int, rng: np.random.Generator, sent_id: int) -> list[dict]:
    phrases = [p.phrase for p in scenes.region_phrases(pic.scene, rng) if p.object_index == object_index]
    out = []
    for k, phrase in enumerate(phrases[:1 + int(rng.integers(0, 2))]):
        raw = phrase.upper() if rng.random() < 0.2 else phrase.capitalize()
        out.append({"tokens": phrase.split(), "raw": raw, "sent_id": sent_id + k, "sent": phrase})
    return out


def _refs(dataset: str, chosen: list[tuple[int, Picture]], anns: dict[int, list[dict]], seed: int) -> list[dict]:
    """refs of one dataset: one ref per (image, object) with 1-2 sentences; the split is drawn per image."""
    rng = np.random.default_rng([seed, 1000 + ("refcoco", "refcoco+", "refcocog").index(dataset)])
    splits = ("train", "train", "train", "val", "testA", "testB") if dataset != "refcocog" else \
        ("train", "train", "train", "val", "test")
    refs, sent_id = [], 0
    for coco_id, pic in chosen:
        split = splits[int(rng.integers(len(splits)))]
        for k, ann in enumerate(anns[coco_id]):
            sentences = _sentences(pic, k, rng, sent_id)
            sent_id += len(sentences)
            refs.append({"sent_ids": [s["sent_id"] for s in sentences], "file_name":
                         f"COCO_train2014_{coco_id:012d}_{ann['id']}.jpg", "ann_id": ann["id"], "ref_id": len(refs),
                         "image_id": coco_id, "split": split, "sentences": sentences,
                         "category_id": ann["category_id"]})
    return refs


def write_refcoco(root: Path, coco_root: Path, chosen: list[tuple[int, Picture]], seed: int) -> tuple[dict, dict]:
    """The refer toolkit's data folder: refcoco/refs(unc).p, refcoco+/refs(unc).p, refcocog/refs(umd).p (pickle
    protocol 2, as the Python 2 originals) + instances.json each, images/mscoco/images/train2014/. Returns the
    counts and the refs per dataset (for the RefCOCO+ evaluation files)."""
    instances = json.loads(storage.read_text(str(coco_root / "annotations" / "instances_train2017.json")))
    ids = {coco_id for coco_id, _ in chosen}
    anns: dict[int, list[dict]] = {i: [] for i in ids}
    for ann in instances["annotations"]:
        if ann["image_id"] in ids and not ann["iscrowd"]:
            anns[ann["image_id"]].append(ann)
    images = [dict(im, file_name=f"COCO_train2014_{im['id']:012d}.jpg") for im in instances["images"] if im["id"] in ids]
    for coco_id, pic in chosen:
        storage.write_bytes(str(root / "images/mscoco/images/train2014" / f"COCO_train2014_{coco_id:012d}.jpg"), pic.jpeg)
    counts, all_refs = {}, {}
    for dataset, refs_name in (("refcoco", "refs(unc).p"), ("refcoco+", "refs(unc).p"), ("refcocog", "refs(umd).p")):
        refs = _refs(dataset, chosen, anns, seed)
        all_refs[dataset] = refs
        storage.write_bytes(str(root / dataset / refs_name), pickle.dumps(refs, protocol=2))
        _write_json(root / dataset / "instances.json",
                    {"info": instances["info"], "images": images, "licenses": instances["licenses"],
                     "annotations": [a for i in sorted(ids) for a in anns[i]], "categories": instances["categories"]})
        train = [r for r in refs if r["split"] == "train"]
        counts[dataset] = {"refs": len(refs), "train_refs": len(train),
                           "sentences": sum(len(r["sentences"]) for r in refs),
                           "train_sentences": sum(len(r["sentences"]) for r in train)}
    counts["images"] = len(chosen)
    return counts, all_refs


def write_refcoco_eval(root: Path, refs: list[dict]) -> dict:
    """refcoco+_val.json and refcoco+_test.json (testA + testB) as X-VLM's grounding files: image
    "train2014/COCO_train2014_ID.jpg", text, ref_id."""
    counts = {}
    for name, splits in (("refcoco+_val", ("val",)), ("refcoco+_test", ("testA", "testB"))):
        entries = [{"image": f"train2014/COCO_train2014_{r['image_id']:012d}.jpg", "text": s["sent"],
                    "ref_id": r["ref_id"]} for r in refs if r["split"] in splits for s in r["sentences"]]
        _write_json(root / f"{name}.json", entries)
        counts[name] = len(entries)
    return counts


# ---------------------------------------------------------------------------------------------- the whole set


def _web_plan(stream: PictureStream, first: int, per_source: int, planted: list[tuple[Picture, str]]) -> Plan:
    """Each web source's own pictures, with the planted copies spread over the sources and kinds in turn."""
    plan = Plan()
    index = first
    for source in WEB_SOURCES:
        plan.items[source] = [_item(pic) for pic in stream(range(index, index + per_source))]
        index += per_source
    for k, (pic, eval_image) in enumerate(planted):
        kind = PLANT_KINDS[k % len(PLANT_KINDS)]
        source = WEB_SOURCES[k % len(WEB_SOURCES)]
        at = 1 + (7 * k) % max(1, len(plan.items[source]))          # among the own pictures, not first
        plan.items[source].insert(at, _item(pic, {"kind": kind, "eval_image": eval_image}, kind))
    return plan


def write_all(out: Path, seed: int, images: int, val_images: int, train_ids: list[int], coco_start: int,
              val_ids: list[int], progress: bool) -> tuple[dict, dict]:
    """Write OWNED under `out`; returns (counts, relative paths) for sample_data.json."""
    per_source = max(4, round(images * WEB_SHARE))
    n_flickr = max(4, round(images * FLICKR_SHARE))
    first = images + val_images
    stream = PictureStream(seed, 3 * per_source + n_flickr + 2, progress)
    stream.bar.set_description("sample-data 16M sources")
    train = [(i, make_picture(seed, coco_start + k, jpeg=b"")) for k, i in enumerate(train_ids)]
    val = [(i, make_picture(seed, images + k, jpeg=b"")) for k, i in enumerate(val_ids)]
    for pairs, folder in ((train, "train2017"), (val, "val2017")):
        for coco_id, pic in pairs:
            pic.jpeg = storage.read_bytes(str(out / "coco" / folder / f"{coco_id:012d}.jpg"))
    flickr = list(stream(range(first + 3 * per_source, first + 3 * per_source + n_flickr + 2)))
    counts = {"eval": write_eval(out / "eval", out / "coco", train, val, flickr[:n_flickr], flickr[n_flickr:])}
    # Planted: every Flickr30K test picture and the first two Karpathy test pictures of COCO val.
    planted = [(pic, f"flickr30k-images/{1000092795 + 7919 * k}.jpg") for k, pic in enumerate(flickr[:n_flickr])]
    planted += [(pic, f"val2014/COCO_val2014_{i:012d}.jpg") for i, pic in val[:2]]
    plan = _web_plan(stream, first, per_source, planted)
    planted_rows = []
    for source, writer in (("cc12m", write_cc12m), ("openimages", write_openimages), ("objects365", write_objects365)):
        counts[source], rows = writer(out / source, plan.items[source], seed)
        planted_rows += rows
    for row in planted_rows:
        row["eval_set"] = "flickr30k" if row["eval_image"].startswith("flickr30k") else "coco-karpathy"
    chosen = [train[k] for k in sorted(np.random.default_rng([seed, 2014]).permutation(len(train))
                                       [:max(4, len(train) // 2)].tolist())]
    counts["refcoco"], refs = write_refcoco(out / "refcoco", out / "coco", chosen, seed)
    counts["eval"].update(write_refcoco_eval(out / "eval", refs["refcoco+"]))
    counts["eval"]["planted"] = len(planted_rows)
    counts["eval"] = counts.pop("eval")       # listed after the sources
    storage.write_text(str(out / "eval" / "planted.json"), json.dumps(
        sorted(planted_rows, key=lambda r: r["key"]), indent=1, sort_keys=True) + "\n")
    stream.bar.close()
    paths = {"objects365": "objects365", "openimages": "openimages", "cc12m": "cc12m",
             "cc12m_img2dataset": "cc12m/img2dataset", "refcoco": "refcoco", "eval": "eval"}
    return counts, paths

