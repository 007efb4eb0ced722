"""`xvlm sample-data`, the downstream sets: a small COCO-style retrieval set (coco_{train,val,test}.json, X-VLM's
Karpathy layout) and a RefCOCO+-style grounding set (the refer release's refcoco+/refs(unc).p + instances.json and
X-VLM's refcoco+_{train,val,test,testA,testB}.json), with their images under downstream/images/.

Scenes come from their own random streams ([seed, DOWNSTREAM_STREAM, index]), not the training pictures' ([seed,
index]), and carry COCO ids above the real range, so none is a training picture (tested by image hash). Same seed ->
byte-identical files.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

import storage
from sampledata import scenes
from sampledata.sample_data import CATEGORY_IDS, Picture

DOWNSTREAM_STREAM = 20            # random-stream tag of the downstream scenes (training pictures have none)
FIRST_COCO_ID = 600_000           # above every real COCO id (max 581,929): never a training picture's id
RETRIEVAL = {"train": 60, "val": 12, "test": 30}      # images per split (5 captions each)
GROUNDING_IMAGES = 60
GROUNDING_SPLITS = ("train", "train", "train", "val", "testA", "testB")   # drawn per image, as RefCOCO+ splits by image
MAX_SIDE = 480                    # smaller pictures than the training ones: the quickstart fine-tunes on CPU


def downstream_picture(seed: int, index: int) -> Picture:
    """Downstream picture number `index`: its own random streams, never a training picture's."""
    rng = np.random.default_rng([seed, DOWNSTREAM_STREAM, index, 0])
    scene = scenes.sample_scene(rng)
    scale = min(1.0, MAX_SIDE / max(scene.width, scene.height))
    if scale < 1.0:
        scene = _scaled(scene, scale)
    return Picture(index, scene, scenes.jpeg_bytes(scenes.render(scene)),
                   np.random.default_rng([seed, DOWNSTREAM_STREAM, index, 1]))


def _scaled(scene: scenes.Scene, scale: float) -> scenes.Scene:
    """The scene drawn smaller: sizes, boxes and outlines scaled (boxes stay the tight pixel boxes)."""
    width, height = max(1, round(scene.width * scale)), max(1, round(scene.height * scale))
    objects = []
    for obj in scene.objects:
        polygon = [(round(x * scale, 2), round(y * scale, 2)) for x, y in obj.polygon]
        xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
        x0, y0 = max(0, int(np.floor(min(xs)))), max(0, int(np.floor(min(ys))))
        x1, y1 = min(width, int(np.ceil(max(xs))) + 1), min(height, int(np.ceil(max(ys))) + 1)
        objects.append(scenes.SceneObject(obj.shape, obj.colour, obj.size, (x0, y0, x1 - x0, y1 - y0), polygon))
    return scenes.Scene(width, height, scene.texture, scene.tone, scene.background, objects, scene.texture_seed)


def _write_json(path: Path, obj: object) -> None:
    storage.write_text(str(path), json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


def write_retrieval(root: Path, seed: int, first_index: int, counts: dict[str, int] = RETRIEVAL) -> dict:
    """coco_train.json (one entry per caption, image_id "coco_ID"), coco_val.json and coco_test.json (one entry per
    image with its 5 captions), images under images/train2014 (train) and images/val2014 (val, test)."""
    index, out = first_index, {}
    for split, n in counts.items():
        folder, prefix = ("train2014", "COCO_train2014") if split == "train" else ("val2014", "COCO_val2014")
        entries: list[dict] = []
        for _ in range(n):
            pic = downstream_picture(seed, index)
            coco_id = FIRST_COCO_ID + index
            name = f"{folder}/{prefix}_{coco_id:012d}.jpg"
            storage.write_bytes(str(root / "images" / name), pic.jpeg)
            captions = scenes.captions(pic.scene, pic.text_rng, count=5)
            if split == "train":
                entries += [{"caption": c, "image": name, "image_id": f"coco_{coco_id}"} for c in captions]
            else:
                entries.append({"image": name, "caption": captions})
            index += 1
        _write_json(root / f"coco_{split}.json", entries)
        out[f"coco_{split}"] = {"images": n, "entries": len(entries)}
    return out


def _grounding_image(seed: int, index: int, rng: np.random.Generator, refs: list[dict], anns: list[dict],
                     images: list[dict], root: Path) -> None:
    """One picture of the grounding set: its image, its instance annotations and one ref per object."""
    pic = downstream_picture(seed, index)
    coco_id = FIRST_COCO_ID + index
    storage.write_bytes(str(root / "images" / "train2014" / f"COCO_train2014_{coco_id:012d}.jpg"), pic.jpeg)
    images.append({"id": coco_id, "file_name": f"COCO_train2014_{coco_id:012d}.jpg", "width": pic.scene.width,
                   "height": pic.scene.height})
    split = GROUNDING_SPLITS[int(rng.integers(len(GROUNDING_SPLITS)))]
    phrases = scenes.region_phrases(pic.scene, pic.text_rng)
    for k, obj in enumerate(pic.scene.objects):
        ann_id = coco_id * 10 + k
        anns.append({"id": ann_id, "image_id": coco_id, "category_id": CATEGORY_IDS[obj.shape],
                     "bbox": [float(v) for v in obj.box], "area": float(obj.box[2] * obj.box[3]), "iscrowd": 0})
        sentences = []
        for phrase in [p.phrase for p in phrases if p.object_index == k][:2]:
            sent_id = sum(len(r["sentences"]) for r in refs) + len(sentences)
            sentences.append({"tokens": phrase.split(), "raw": phrase, "sent_id": sent_id, "sent": phrase})
        refs.append({"sent_ids": [s["sent_id"] for s in sentences], "file_name":
                     f"COCO_train2014_{coco_id:012d}_{ann_id}.jpg", "ann_id": ann_id, "ref_id": len(refs),
                     "image_id": coco_id, "split": split, "sentences": sentences,
                     "category_id": CATEGORY_IDS[obj.shape]})


def write_grounding(root: Path, seed: int, first_index: int, n_images: int = GROUNDING_IMAGES) -> dict:
    """refcoco+/refs(unc).p (a plain pickle, protocol 2 as the Python 2 original), refcoco+/instances.json and
    X-VLM's refcoco+_{train,val,testA,testB}.json plus refcoco+_test.json (testA + testB, as X-VLM ships it):
    entries {"image": "train2014/COCO_train2014_ID.jpg", "text", "ref_id"}, one per sentence."""
    rng = np.random.default_rng([seed, DOWNSTREAM_STREAM, 1000])
    refs: list[dict] = []
    anns: list[dict] = []
    images: list[dict] = []
    for index in range(first_index, first_index + n_images):
        _grounding_image(seed, index, rng, refs, anns, images, root)
    storage.write_bytes(str(root / "refcoco+" / "refs(unc).p"), pickle.dumps(refs, protocol=2))
    categories = [{"supercategory": "shape", "id": i, "name": name} for name, i in CATEGORY_IDS.items()]
    _write_json(root / "refcoco+" / "instances.json", {"images": images, "annotations": anns,
                                                       "categories": categories})
    out = {"images": n_images, "refs": len(refs)}
    for name, splits in (("train", ("train",)), ("val", ("val",)), ("testA", ("testA",)), ("testB", ("testB",)),
                         ("test", ("testA", "testB"))):
        entries = [{"image": f"train2014/COCO_train2014_{r['image_id']:012d}.jpg", "text": s["sent"],
                    "ref_id": r["ref_id"]} for r in refs if r["split"] in splits for s in r["sentences"]]
        _write_json(root / f"refcoco+_{name}.json", entries)
        out[f"refcoco+_{name}"] = len(entries)
    return out


def write_all(root: Path, seed: int) -> dict:
    """Both downstream sets under `root` (OUT/downstream); returns their counts for sample_data.json."""
    retrieval = write_retrieval(root, seed, 0)
    first = sum(RETRIEVAL.values())
    return {"retrieval": retrieval, "grounding": write_grounding(root, seed, first)}
