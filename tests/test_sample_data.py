"""`xvlm sample-data`: the files follow the real COCO / VG / SBU / CC / img2dataset layouts, the texts are true to
the pixels, and the output is byte-identical for a seed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sampledata import sample_data, scenes
from tools.cli import main as xvlm_main

IMAGES, VAL_IMAGES, SEED = 60, 20, 7
COLOUR_WORDS = "|".join(scenes.COLOURS)
SHAPE_WORDS = "|".join(scenes.SHAPES)
# "[size] colour shape" or "[size] colour shape-word 'shape'" (the "the red shape" naming form)
NOUN = re.compile(rf"(?:(small|large) )?({COLOUR_WORDS}) ({SHAPE_WORDS}|shape)\b")
RELATION = re.compile(r"\b(to the left of|to the right of|left of|right of|above|below)\b")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "data"
    summary = sample_data.generate(root, images=IMAGES, val_images=VAL_IMAGES, seed=SEED, progress=False)
    assert summary["total_pictures"] == IMAGES + VAL_IMAGES
    return root


def load(path: Path):
    return json.loads(path.read_text())


def centre_colour(image: Image.Image, box) -> str:
    x, y, w, h = box
    return scenes.nearest_colour(image.getpixel((int(x + w / 2), int(y + h / 2))))


def centre_distance(image: Image.Image, box) -> float:
    x, y, w, h = box
    pixel = np.array(image.getpixel((int(x + w / 2), int(y + h / 2))), dtype=float)
    return float(min(np.linalg.norm(pixel - np.array(c)) for c in scenes.COLOURS.values()))


def inside(box, width: int, height: int) -> bool:
    x, y, w, h = box
    return x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= width and y + h <= height


# ---------------------------------------------------------------- COCO


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_coco_files_load_in_pycocotools_and_point_at_images(out, split):
    from pycocotools.coco import COCO

    root = out / "coco"
    instances = COCO(str(root / "annotations" / f"instances_{split}.json"))
    captions = COCO(str(root / "annotations" / f"captions_{split}.json"))
    assert set(instances.dataset) == {"info", "licenses", "images", "annotations", "categories"}
    assert set(captions.dataset) == {"info", "licenses", "images", "annotations"}
    expected = IMAGES * sample_data.SPLIT["coco"] if split == "train2017" else VAL_IMAGES
    assert len(instances.imgs) == round(expected)
    license_ids = {lic["id"] for lic in instances.dataset["licenses"]}
    for image_id, entry in instances.imgs.items():
        assert isinstance(image_id, int)
        assert set(entry) == {"license", "file_name", "coco_url", "height", "width", "date_captured", "flickr_url", "id"}
        assert entry["file_name"] == f"{image_id:012d}.jpg"
        assert entry["coco_url"].endswith(f"/{split}/{entry['file_name']}")
        assert entry["license"] in license_ids
        with Image.open(root / split / entry["file_name"]) as image:
            assert image.size == (entry["width"], entry["height"])
            assert 200 <= min(image.size) and max(image.size) <= 1024
        assert len(captions.getAnnIds(imgIds=[image_id])) == 5  # COCO has five captions per image
    for ann in captions.dataset["annotations"]:
        assert set(ann) == {"image_id", "id", "caption"} and ann["image_id"] in instances.imgs
    category_ids = set(instances.cats)
    assert {c["name"] for c in instances.cats.values()} == set(scenes.SHAPES)
    assert all(set(c) == {"id", "name", "supercategory"} for c in instances.cats.values())
    ids = [a["id"] for a in instances.dataset["annotations"]]
    assert len(ids) == len(set(ids))
    for ann in instances.dataset["annotations"]:
        assert set(ann) == {"segmentation", "area", "iscrowd", "image_id", "bbox", "category_id", "id"}
        assert ann["image_id"] in instances.imgs and ann["category_id"] in category_ids
        assert all(isinstance(v, float) for v in ann["bbox"])
        entry = instances.imgs[ann["image_id"]]
        assert inside(ann["bbox"], entry["width"], entry["height"])
        mask = instances.annToMask(ann)  # polygons and RLE both decode
        assert mask.shape == (entry["height"], entry["width"]) and mask.sum() > 0
        assert abs(mask.sum() - ann["area"]) <= 0.15 * ann["area"] + 30
    crowd = [a for a in instances.dataset["annotations"] if a["iscrowd"] == 1]
    if split == "train2017":
        assert len(crowd) == sample_data.CROWD_IMAGES
        assert all(isinstance(a["segmentation"], dict) and {"counts", "size"} == set(a["segmentation"]) for a in crowd)
    else:
        assert crowd == []


def test_coco_boxes_are_on_shapes_and_captions_name_every_object(out):
    from pycocotools.coco import COCO

    root = out / "coco"
    instances = COCO(str(root / "annotations" / "instances_val2017.json"))
    captions = COCO(str(root / "annotations" / "captions_val2017.json"))
    all_captions = []
    for image_id, entry in instances.imgs.items():
        with Image.open(root / "val2017" / entry["file_name"]) as image:
            image = image.convert("RGB")
            objects = set()
            for ann in instances.loadAnns(instances.getAnnIds(imgIds=[image_id])):
                assert centre_distance(image, ann["bbox"]) < 60, "box centre is not on a shape"
                objects.add((centre_colour(image, ann["bbox"]), instances.cats[ann["category_id"]]["name"]))
        texts = [a["caption"] for a in captions.loadAnns(captions.getAnnIds(imgIds=[image_id]))]
        for text in texts:
            named = {(m.group(2), m.group(3)) for m in NOUN.finditer(text)}
            assert named == objects, (text, objects)
            assert "background" in text
        all_captions.append(frozenset(texts))
    # Discriminative: no two held-out images share a caption set.
    assert len(set(all_captions)) == len(all_captions)


# ---------------------------------------------------------------- Visual Genome


def test_vg_files_have_the_release_fields_and_consistent_ids(out):
    root = out / "vg"
    image_data = load(root / "image_data.json")
    regions = load(root / "region_descriptions.json")
    objects = load(root / "objects.json")
    attributes = load(root / "attributes.json")
    ids = [e["image_id"] for e in image_data]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    by_id = {e["image_id"]: e for e in image_data}
    for entry in image_data:
        assert set(entry) == {"width", "url", "height", "image_id", "coco_id", "flickr_id"}
        assert entry["coco_id"] is None or isinstance(entry["coco_id"], int)
        assert entry["flickr_id"] is None or isinstance(entry["flickr_id"], int)
        with Image.open(root / "VG_100K" / f"{entry['image_id']}.jpg") as image:
            assert image.size == (entry["width"], entry["height"])
    region_ids, object_ids = set(), set()
    assert [r["id"] for r in regions] == ids
    for item in regions:
        assert set(item) == {"regions", "id"} and item["regions"]
        for region in item["regions"]:
            assert set(region) == {"region_id", "width", "height", "image_id", "phrase", "y", "x"}
            assert region["image_id"] == item["id"] and region["region_id"] not in region_ids
            region_ids.add(region["region_id"])
            entry = by_id[item["id"]]
            assert inside((region["x"], region["y"], region["width"], region["height"]), entry["width"], entry["height"])
    assert [o["image_id"] for o in objects] == ids
    for item in objects:
        assert set(item) == {"image_id", "objects", "image_url"}
        assert item["image_url"] == by_id[item["image_id"]]["url"]
        for obj in item["objects"]:
            assert set(obj) == {"synsets", "h", "object_id", "merged_object_ids", "names", "w", "y", "x"}
            assert obj["object_id"] not in object_ids and obj["names"][0] in scenes.SHAPES
            object_ids.add(obj["object_id"])
    assert [a["image_id"] for a in attributes] == ids
    for item, obj_item in zip(attributes, objects):
        assert set(item) == {"image_id", "attributes"}
        assert [a["object_id"] for a in item["attributes"]] == [o["object_id"] for o in obj_item["objects"]]
        for attr in item["attributes"]:
            assert set(attr) == {"synsets", "h", "object_id", "names", "w", "y", "x", "attributes"}


def test_vg_coco_images_are_the_same_pictures(out):
    from pycocotools.coco import COCO

    coco = COCO(str(out / "coco" / "annotations" / "instances_train2017.json"))
    overlap = [e for e in load(out / "vg" / "image_data.json") if e["coco_id"] is not None]
    assert len(overlap) == round(IMAGES * sample_data.SPLIT["coco"] * sample_data.VG_COCO_SHARE)
    for entry in overlap:
        coco_entry = coco.imgs[entry["coco_id"]]
        assert (coco_entry["width"], coco_entry["height"]) == (entry["width"], entry["height"])
        vg_bytes = (out / "vg" / "VG_100K" / f"{entry['image_id']}.jpg").read_bytes()
        assert vg_bytes == (out / "coco" / "train2017" / coco_entry["file_name"]).read_bytes()


def test_vg_phrases_labels_and_relations_are_true_to_the_pixels(out):
    root = out / "vg"
    objects = {o["image_id"]: o["objects"] for o in load(root / "objects.json")}
    attributes = {a["image_id"]: a["attributes"] for a in load(root / "attributes.json")}
    relations_checked = repeated_colours = 0
    for item in load(root / "region_descriptions.json"):
        with Image.open(root / "VG_100K" / f"{item['id']}.jpg") as image:
            image = image.convert("RGB")
            width = image.width
            # Labels: the attribute colour is the colour at the object's box centre.
            by_shape, colours = {}, []
            for attr in attributes[item["id"]]:
                box = (attr["x"], attr["y"], attr["w"], attr["h"])
                colour, size = attr["attributes"]
                assert centre_colour(image, box) == colour
                assert size in scenes.SIZES
                by_shape[attr["names"][0]] = (colour, size, box)
                colours.append(colour)
            assert len(by_shape) == len(objects[item["id"]])  # shapes are unique: phrases can name one object
            repeated_colours += len(colours) - len(set(colours))
            for region in item["regions"]:
                phrase = region["phrase"]
                box = (region["x"], region["y"], region["width"], region["height"])
                nouns = list(NOUN.finditer(phrase))
                size, colour, shape = nouns[0].groups()
                assert centre_colour(image, box) == colour, phrase
                if shape == "shape":  # "the red shape" names one object only when red is unique in the picture
                    assert colours.count(colour) == 1, phrase
                    shape = next(name for name, (c, _, _) in by_shape.items() if c == colour)
                assert by_shape[shape][0] == colour and size in (None, by_shape[shape][1]), phrase
                assert by_shape[shape][2] == box, phrase
                relation = RELATION.search(phrase)
                if relation is None:
                    assert len(nouns) == 1, phrase
                    continue
                other_size, other_colour, other_shape = nouns[1].groups()
                other_true_colour, other_true_size, other_box = by_shape[other_shape]
                assert other_colour == other_true_colour and other_size in (None, other_true_size), phrase
                word = relation.group(1).replace("to the ", "")
                assert holds(word, box, other_box), phrase
                # Horizontal flip with left<->right swapped in the text stays true.
                swapped = {"left of": "right of", "right of": "left of"}.get(word, word)
                assert holds(swapped, flip(box, width), flip(other_box, width)), phrase
                relations_checked += 1
    assert relations_checked > 20
    assert repeated_colours > 5  # colours repeat, so texts must name shapes to single an object out


def flip(box, width: int):
    x, y, w, h = box
    return (width - x - w, y, w, h)


def holds(word: str, a, b) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return {"left of": ax + aw <= bx, "right of": bx + bw <= ax, "above": ay + ah <= by, "below": by + bh <= ay}[word]


# ---------------------------------------------------------------- SBU and CC


def test_sbu_files_are_line_aligned_and_images_named_from_urls(out):
    root = out / "sbu"
    urls = (root / "SBU_captioned_photo_dataset_urls.txt").read_text().splitlines()
    caps = (root / "SBU_captioned_photo_dataset_captions.txt").read_text().splitlines()
    assert len(urls) == len(caps) == round(IMAGES * sample_data.SPLIT["sbu"])
    assert all(re.fullmatch(r"http://static\.flickr\.com/\d+/\d+_[0-9a-f]{10}\.jpg", u) for u in urls)
    present = [u for u in urls if (root / "images" / sample_data.sbu_file_name(u)).exists()]
    assert len(urls) - len(present) == sample_data.SBU_MISSING
    assert len(list((root / "images").iterdir())) == len(present)
    assert all(NOUN.search(c) and "background" in c for c in caps)


def test_cc_tsv_and_img2dataset_output_read_with_stock_libraries(out):
    import pyarrow.parquet as pq
    import webdataset as wds

    root = out / "cc"
    lines = (root / "Train_GCC-training.tsv").read_text().splitlines()
    rows = [line.split("\t") for line in lines]
    assert all(len(r) == 2 and r[1].startswith("https://") for r in rows)
    table = pq.read_table(root / "img2dataset" / "00000.parquet")
    assert table.column_names == ["url", "caption", "key", "status", "error_message", "width", "height",
                                  "original_width", "original_height", "exif", "sha256"]
    parquet_rows = table.to_pylist()
    assert [(r["caption"], r["url"]) for r in parquet_rows] == [tuple(r) for r in rows]
    assert [r["key"] for r in parquet_rows] == [f"{k:09d}" for k in range(len(rows))]
    failed = [r for r in parquet_rows if r["status"] != "success"]
    assert len(failed) == sample_data.CC_FAILED
    assert all(r["status"] == "failed_to_download" and r["error_message"] and r["width"] is None for r in failed)
    stats = load(root / "img2dataset" / "00000_stats.json")
    assert stats["count"] == len(rows) and stats["successes"] == len(rows) - len(failed)
    assert stats["failed_to_download"] == len(failed)

    samples = list(wds.WebDataset(str(root / "img2dataset" / "00000.tar"), shardshuffle=False))
    by_key = {r["key"]: r for r in parquet_rows}
    assert len(samples) == len(rows) - len(failed)
    import hashlib

    for sample in samples:
        meta = json.loads(sample["json"])
        assert set(meta) == {"url", "caption", "key", "status", "error_message", "width", "height",
                             "original_width", "original_height", "exif", "sha256"}
        assert meta == by_key[sample["__key__"]] and meta["status"] == "success"
        assert sample["txt"].decode() == meta["caption"]
        assert hashlib.sha256(sample["jpg"]).hexdigest() == meta["sha256"]
        row = int(meta["key"])
        assert (root / "images" / f"{row}.jpg").read_bytes() == sample["jpg"]
        with Image.open(root / "images" / f"{row}.jpg") as image:
            assert image.size == (meta["width"], meta["height"])
    for r in failed:
        assert not (root / "images" / f"{int(r['key'])}.jpg").exists()


# ---------------------------------------------------------------- tokenizer, determinism, CLI


def all_texts(out: Path) -> list[str]:
    texts = []
    for split in ("train2017", "val2017"):
        texts += [a["caption"] for a in load(out / "coco" / "annotations" / f"captions_{split}.json")["annotations"]]
    texts += [r["phrase"] for item in load(out / "vg" / "region_descriptions.json") for r in item["regions"]]
    texts += [n for item in load(out / "vg" / "objects.json") for o in item["objects"] for n in o["names"]]
    texts += [a for item in load(out / "vg" / "attributes.json") for o in item["attributes"] for a in o["attributes"]]
    texts += (out / "sbu" / "SBU_captioned_photo_dataset_captions.txt").read_text().splitlines()
    texts += [line.split("\t")[0] for line in (out / "cc" / "Train_GCC-training.tsv").read_text().splitlines()]
    return texts


def test_tokenizer_loads_and_covers_every_text(out):
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(out / "tokenizer"))
    vocab = (out / "tokenizer" / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tokenizer.pad_token_id == 0 and tokenizer.unk_token == "[UNK]"
    texts = all_texts(out)
    encoded = tokenizer(texts)["input_ids"]
    assert all(tokenizer.unk_token_id not in ids for ids in encoded)
    # Every word is one whole token (no word falls back to single characters).
    words = {w for t in texts for w in re.findall(r"[a-z]+", t)}
    assert words <= set(vocab), words - set(vocab)
    assert tokenizer.tokenize("The RED Circle") == ["the", "red", "circle"]  # lower-cases


def test_same_seed_gives_byte_identical_files(out, tmp_path):
    again = tmp_path / "again"
    sample_data.generate(again, images=IMAGES, val_images=VAL_IMAGES, seed=SEED, progress=False)
    first = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    sample_data.generate(other, images=IMAGES, val_images=VAL_IMAGES, seed=SEED + 1, progress=False)
    assert (other / "vg" / "objects.json").read_bytes() != (out / "vg" / "objects.json").read_bytes()


def test_cli_writes_summary_and_rejects_bad_input(tmp_path, capsys):
    target = tmp_path / "cli"
    assert xvlm_main(["sample-data", str(target), "--images", "20", "--val-images", "4", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 24 pictures" in printed and "coco_train2017" in printed
    summary = load(target / "sample_data.json")
    assert summary["seed"] == 3 and summary["generator_version"] == sample_data.GENERATOR_VERSION
    assert sum(summary["split"].values()) == 20 and summary["counts"]["coco_val2017"]["images"] == 4
    # Re-running over its own output replaces it; a foreign non-empty folder is refused.
    assert xvlm_main(["sample-data", str(target), "--images", "20", "--val-images", "4"]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    assert xvlm_main(["sample-data", str(foreign), "--images", "20"]) == 2
    assert xvlm_main(["sample-data", str(tmp_path / "small"), "--images", "5"]) == 2
    assert "at least 20" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "keep me"


def test_img2dataset_output_splits_into_shards_with_img2dataset_keys(tmp_path):
    import pyarrow.parquet as pq
    import webdataset as wds

    pictures = [sample_data.make_picture(SEED, index) for index in range(10)]
    counts = sample_data.write_cc(tmp_path, iter(pictures), len(pictures), SEED, number_sample_per_shard=4)
    assert counts["shards"] == 3 and counts["rows"] == 10
    folder = tmp_path / "img2dataset"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"{n:05d}{ext}" for n in range(3) for ext in (".parquet", ".tar", "_stats.json")]
    keys = [r["key"] for n in range(3) for r in pq.read_table(folder / f"{n:05d}.parquet").to_pylist()]
    # img2dataset: shard id over 5 digits + index over the digits of number_sample_per_shard - 1.
    assert keys == ["000000", "000001", "000002", "000003", "000010", "000011", "000012", "000013", "000020", "000021"]
    tar_keys = [s["__key__"] for s in wds.WebDataset(str(folder / "00001.tar"), shardshuffle=False)]
    assert set(tar_keys) <= {"000010", "000011", "000012", "000013"} and tar_keys
    assert sample_data.img2dataset_key(0, 0) == "000000000" and sample_data.img2dataset_key(3, 17) == "000030017"


def test_interrupted_img2dataset_shard_leaves_no_tar(tmp_path):
    def failing():
        yield sample_data.make_picture(SEED, 0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_data.write_cc(tmp_path, failing(), 5, SEED)
    folder = tmp_path / "img2dataset"
    assert not folder.exists() or list(folder.iterdir()) == []
