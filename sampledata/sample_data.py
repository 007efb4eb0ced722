"""The sample data (`xvlm sample-data`): a deterministic synthetic shapes dataset in the real COCO 2017, Visual
Genome 1.2, SBU Captions and Conceptual Captions (TSV + img2dataset webdataset) on-disk layouts, plus a small
WordPiece tokenizer. One writer per source layout; `generate` writes them all. The scenes are drawn by scenes.py.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

import storage
from storage.errors import XvlmError
from sampledata import scenes
from sampledata.scenes import Scene

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"
# Share of the --images training pictures per source. VG additionally reuses a share of the COCO train
# pictures (as real VG does): those count once, under COCO.
SPLIT = {"coco": 0.40, "vg": 0.20, "sbu": 0.15, "cc": 0.25}
VG_COCO_SHARE = 0.25          # fraction of the COCO train pictures that VG also contains (coco_id set)
SBU_MISSING = 2               # SBU URLs without a downloaded image (real downloads fail)
CC_FAILED = 3                 # CC rows that img2dataset reports as failed_to_download
CROWD_IMAGES = 2              # COCO train images whose last object is an iscrowd=1 RLE annotation
# COCO category ids have gaps in the real release (1..90 for 80 classes); keep gaps so nothing assumes 1..K.
CATEGORY_IDS = {"circle": 1, "square": 2, "triangle": 3, "star": 5, "hexagon": 7, "diamond": 9}
FIXED_EPOCH = 1500000000.0    # a fixed "now" for anything that would carry a time stamp

COCO_LICENSES = [
    {"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution-NonCommercial-ShareAlike License"},
    {"url": "http://creativecommons.org/licenses/by-nc/2.0/", "id": 2, "name": "Attribution-NonCommercial License"},
    {"url": "http://creativecommons.org/licenses/by-nc-nd/2.0/", "id": 3, "name": "Attribution-NonCommercial-NoDerivs License"},
    {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"},
    {"url": "http://creativecommons.org/licenses/by-sa/2.0/", "id": 5, "name": "Attribution-ShareAlike License"},
    {"url": "http://creativecommons.org/licenses/by-nd/2.0/", "id": 6, "name": "Attribution-NoDerivs License"},
    {"url": "http://flickr.com/commons/usage/", "id": 7, "name": "No known copyright restrictions"},
    {"url": "http://www.usa.gov/copyright.shtml", "id": 8, "name": "United States Government Work"},
]
CC_ERRORS = ("HTTP Error 404: Not Found", "<urlopen error [Errno -2] Name or service not known>",
             "The read operation timed out", "HTTP Error 403: Forbidden")
OWNED = ("coco", "vg", "sbu", "cc", "tokenizer", "sample_data.json", "objects365", "openimages", "cc12m", "refcoco",
         "eval", "downstream")   # objects365 .. eval: sampledata/sources16m.py; downstream: sampledata/downstream.py


@dataclass
class Picture:
    """One rendered scene, its JPEG bytes and the random stream its texts are drawn from."""
    index: int
    scene: Scene
    jpeg: bytes
    text_rng: np.random.Generator = field(repr=False)


# ---------------------------------------------------------------- the split


def split_counts(images: int) -> dict[str, int]:
    """How many of the `images` training pictures each source gets (deterministic, sums to `images`)."""
    coco = round(images * SPLIT["coco"])
    vg = round(images * SPLIT["vg"])
    sbu = round(images * SPLIT["sbu"])
    return {"coco": coco, "vg": vg, "sbu": sbu, "cc": images - coco - vg - sbu}


def make_picture(seed: int, index: int, jpeg: bytes | None = None) -> Picture:
    """Picture number `index` of a seed. One generator per picture, so a picture does not depend on how many
    others were drawn before it; pass `jpeg` to reuse bytes already written (a VG copy of a COCO picture)."""
    scene = scenes.sample_scene(np.random.default_rng([seed, index, 0]))
    if jpeg is None:
        jpeg = scenes.jpeg_bytes(scenes.render(scene))
    return Picture(index, scene, jpeg, np.random.default_rng([seed, index, 1]))


class PictureStream:
    """Renders pictures on demand (never all in memory) and advances one progress bar."""

    def __init__(self, seed: int, total: int, progress: bool):
        self.seed = seed
        self.bar = tqdm(total=total, desc="sample-data", unit="img", disable=not progress)

    def __call__(self, indices: range) -> Iterator[Picture]:
        for index in indices:
            yield make_picture(self.seed, index)
            self.bar.update(1)


# ---------------------------------------------------------------- COCO 2017


def _polygon_area(polygon: list[tuple[float, float]]) -> float:
    xs = np.array([p[0] for p in polygon])
    ys = np.array([p[1] for p in polygon])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def _crowd_rle(scene: Scene, obj: scenes.SceneObject) -> tuple[dict, float]:
    """Uncompressed RLE (as the real iscrowd=1 annotations use): run lengths over the column-major mask,
    starting with a run of zeros."""
    mask_image = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(mask_image)
    if obj.shape == "circle":
        x, y, w, h = obj.box
        draw.ellipse((x, y, x + w - 1, y + h - 1), fill=1)
    else:
        draw.polygon(obj.polygon, fill=1)
    flat = np.asarray(mask_image, dtype=np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [scene.height, scene.width]}, float(flat.sum())


def _coco_image_entry(image_id: int, split: str, pic: Picture, rng: np.random.Generator) -> dict:
    file_name = f"{image_id:012d}.jpg"
    day = FIXED_EPOCH - 1.2e8 + float(rng.integers(0, 3 * 10**7))
    return {
        "license": int(rng.integers(1, 9)),
        "file_name": file_name,
        "coco_url": f"http://images.cocodataset.org/{split}/{file_name}",
        "height": pic.scene.height,
        "width": pic.scene.width,
        "date_captured": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(day)),
        "flickr_url": f"http://farm{int(rng.integers(1, 10))}.staticflickr.com/{int(rng.integers(1000, 9000))}/"
                      f"{int(rng.integers(10**9, 10**10))}_{rng.bytes(5).hex()}_z.jpg",
        "id": image_id,
    }


def _write_json(path: Path, obj: object) -> None:
    storage.write_text(str(path), json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


def write_coco(root: Path, split: str, pictures: Iterable[Picture], image_ids: list[int], seed: int,
               crowd: int = 0) -> dict:
    """annotations/{captions,instances}_{split}.json and {split}/NNNNNNNNNNNN.jpg."""
    rng = np.random.default_rng([seed, 2017, 0 if split == "train2017" else 1])
    info = {"description": "xvlm-pipeline synthetic shapes in the COCO 2017 layout", "url": "http://cocodataset.org",
            "version": "1.0", "year": 2017, "contributor": "xvlm-pipeline sample-data", "date_created": "2017/09/01"}
    images, captions, instances = [], [], []
    crowd_left = crowd
    for pic, image_id in zip(pictures, image_ids):
        entry = _coco_image_entry(image_id, split, pic, rng)
        images.append(entry)
        storage.write_bytes(str(root / split / entry["file_name"]), pic.jpeg)
        for text in scenes.captions(pic.scene, pic.text_rng, count=5):
            captions.append({"image_id": image_id, "id": 0, "caption": text})
        make_crowd = crowd_left > 0 and len(pic.scene.objects) >= 3
        crowd_left -= int(make_crowd)
        for k, obj in enumerate(pic.scene.objects):
            x, y, w, h = obj.box
            ann = {"segmentation": [[float(v) for point in obj.polygon for v in point]],
                   "area": round(_polygon_area(obj.polygon), 2), "iscrowd": 0, "image_id": image_id,
                   "bbox": [float(x), float(y), float(w), float(h)], "category_id": CATEGORY_IDS[obj.shape], "id": 0}
            if make_crowd and k == len(pic.scene.objects) - 1:
                ann["segmentation"], ann["area"] = _crowd_rle(pic.scene, obj)
                ann["iscrowd"] = 1
            instances.append(ann)
    # Real annotation ids are unique across the file; number them after the fact.
    id_base = 100000 if split == "train2017" else 900000
    for n, ann in enumerate(captions):
        ann["id"] = id_base + n
    for n, ann in enumerate(instances):
        ann["id"] = id_base + n
    categories = [{"supercategory": "shape", "id": cid, "name": name} for name, cid in CATEGORY_IDS.items()]
    year_split = split
    _write_json(root / "annotations" / f"captions_{year_split}.json",
                {"info": info, "licenses": COCO_LICENSES, "images": images, "annotations": captions})
    _write_json(root / "annotations" / f"instances_{year_split}.json",
                {"info": info, "licenses": COCO_LICENSES, "images": images, "annotations": instances,
                 "categories": categories})
    return {"images": len(images), "captions": len(captions), "instances": len(instances),
            "crowd": crowd - crowd_left}


# ---------------------------------------------------------------- Visual Genome 1.2


def write_vg(root: Path, pictures: Iterable[tuple[Picture, int | None]], seed: int) -> dict:
    """image_data.json, region_descriptions.json, objects.json, attributes.json and VG_100K/{image_id}.jpg.
    `pictures` pairs each picture with its COCO id (None for VG-only pictures)."""
    rng = np.random.default_rng([seed, 1200])
    image_data, regions_file, objects_file, attributes_file = [], [], [], []
    region_id, object_id = 1, 1000000
    counts = {"images": 0, "coco_overlap": 0, "regions": 0, "objects": 0}
    # VG image ids start at 1; the caller interleaves COCO and VG-only pictures so ids do not follow COCO's order.
    for image_id, (pic, coco_id) in enumerate(pictures, start=1):
        # A separate text stream: VG's phrases for a COCO picture differ from COCO's captions, as in reality.
        text_rng = np.random.default_rng([seed, pic.index, 2])
        url = f"https://cs.stanford.edu/people/rak248/VG_100K/{image_id}.jpg"
        flickr_id = int(rng.integers(10**8, 10**10)) if coco_id is not None or rng.random() < 0.7 else None
        image_data.append({"width": pic.scene.width, "url": url, "height": pic.scene.height, "image_id": image_id,
                           "coco_id": coco_id, "flickr_id": flickr_id})
        storage.write_bytes(str(root / "VG_100K" / f"{image_id}.jpg"), pic.jpeg)
        regions = []
        for phrase in scenes.region_phrases(pic.scene, text_rng):
            x, y, w, h = pic.scene.objects[phrase.object_index].box
            regions.append({"region_id": region_id, "width": w, "height": h, "image_id": image_id,
                            "phrase": phrase.phrase, "y": y, "x": x})
            region_id += 1
        regions_file.append({"regions": regions, "id": image_id})
        objects, attributes = [], []
        for obj in pic.scene.objects:
            x, y, w, h = obj.box
            record = {"synsets": [f"{obj.shape}.n.01"], "h": h, "object_id": object_id, "merged_object_ids": [],
                      "names": [obj.shape], "w": w, "y": y, "x": x}
            objects.append(record)
            with_attributes = {k: v for k, v in record.items() if k != "merged_object_ids"}
            with_attributes["attributes"] = [obj.colour, obj.size]
            attributes.append(with_attributes)
            object_id += 1
        objects_file.append({"image_id": image_id, "objects": objects, "image_url": url})
        attributes_file.append({"image_id": image_id, "attributes": attributes})
        counts["images"] += 1
        counts["coco_overlap"] += int(coco_id is not None)
        counts["regions"] += len(regions)
        counts["objects"] += len(objects)
    _write_json(root / "image_data.json", image_data)
    _write_json(root / "region_descriptions.json", regions_file)
    _write_json(root / "objects.json", objects_file)
    _write_json(root / "attributes.json", attributes_file)
    return counts


# ---------------------------------------------------------------- SBU Captions


def sbu_file_name(url: str) -> str:
    """The downloader's naming rule: the URL's basename (http://static.flickr.com/2723/4385058960_b0f291553e.jpg
    -> 4385058960_b0f291553e.jpg)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def write_sbu(root: Path, pictures: Iterable[Picture], count: int, seed: int) -> dict:
    """SBU_captioned_photo_dataset_urls.txt + SBU_captioned_photo_dataset_captions.txt (line-aligned) and
    images/{basename of the URL}; SBU_MISSING URLs have no image (their download failed)."""
    rng = np.random.default_rng([seed, 1000])
    missing = set(rng.permutation(count)[:min(SBU_MISSING, max(0, count - 1))].tolist())
    urls, caps = [], []
    for k, pic in enumerate(pictures):
        url = (f"http://static.flickr.com/{int(rng.integers(1000, 9000))}/"
               f"{int(rng.integers(10**9, 10**10))}_{rng.bytes(5).hex()}.jpg")
        urls.append(url)
        caps.append(scenes.short_caption(pic.scene, pic.text_rng, "sbu"))
        if k not in missing:
            storage.write_bytes(str(root / "images" / sbu_file_name(url)), pic.jpeg)
    storage.write_text(str(root / "SBU_captioned_photo_dataset_urls.txt"), "".join(u + "\n" for u in urls))
    storage.write_text(str(root / "SBU_captioned_photo_dataset_captions.txt"), "".join(c + "\n" for c in caps))
    return {"urls": len(urls), "images": len(urls) - len(missing), "missing_images": len(missing)}


# ---------------------------------------------------------------- Conceptual Captions 3M + img2dataset


def img2dataset_key(shard: int, index: int, oom_shard_count: int = 5, number_sample_per_shard: int = 10000) -> str:
    """img2dataset's key: shard id padded to oom_shard_count digits + index padded to the digits of
    number_sample_per_shard - 1 ("000000000" for shard 0, sample 0 with the defaults)."""
    oom_sample = len(str(number_sample_per_shard - 1))
    return f"{shard:0{oom_shard_count}d}{index:0{oom_sample}d}"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(FIXED_EPOCH)   # fixed, so the tar is byte-identical across runs
    info.mode = 0o444
    info.uname = info.gname = "bigdata"   # what webdataset's TarWriter (used by img2dataset) writes
    tar.addfile(info, io.BytesIO(data))


IMG2DATASET_SCHEMA_FIELDS = ("url", "caption", "key", "status", "error_message", "width", "height",
                             "original_width", "original_height", "exif", "sha256")


def _img2dataset_schema():
    import pyarrow as pa

    # img2dataset builds its parquet from a pandas DataFrame of the metadata dicts: the size columns of a shard
    # with failed rows (None) become float64.
    sizes = {"width", "height", "original_width", "original_height"}
    return pa.schema([(name, pa.float64() if name in sizes else pa.string()) for name in IMG2DATASET_SCHEMA_FIELDS])


class Img2datasetShard:
    """One shard of img2dataset's webdataset output: NNNNN.tar (KEY.jpg/.json/.txt for successes),
    NNNNN.parquet (every row) and NNNNN_stats.json."""

    def __init__(self, folder: Path, shard_id: int):
        self.folder, self.name = folder, f"{shard_id:05d}"
        self.rows: list[dict] = []
        self._write = storage.atomic_write(str(folder / f"{self.name}.tar"))
        # "w|": a plain stream into the atomic writer, so the shard never sits in memory as a whole.
        self._tar = tarfile.open(fileobj=self._write.__enter__(), mode="w|", format=tarfile.USTAR_FORMAT)

    def add(self, meta: dict, jpeg: bytes | None) -> None:
        self.rows.append(meta)
        if jpeg is not None:
            # webdataset's TarWriter (used by img2dataset) writes a sample's members in sorted extension order.
            _tar_member(self._tar, f"{meta['key']}.jpg", jpeg)
            _tar_member(self._tar, f"{meta['key']}.json", json.dumps(meta, indent=4).encode())
            _tar_member(self._tar, f"{meta['key']}.txt", meta["caption"].encode())

    def abort(self) -> None:
        """Drop the partial tar (the atomic writer removes its temporary file)."""
        try:
            self._tar.close()
        finally:
            self._write.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._tar.close()
        self._write.__exit__(None, None, None)
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=_img2dataset_schema()), sink, compression="snappy")
        storage.write_bytes(str(self.folder / f"{self.name}.parquet"), sink.getvalue())
        status_dict: dict[str, int] = {}
        for meta in self.rows:
            reason = "success" if meta["status"] == "success" else meta["error_message"]
            status_dict[reason] = status_dict.get(reason, 0) + 1
        successes = status_dict.get("success", 0)
        duration = round(0.05 * len(self.rows), 3)   # fixed, not measured: the files must not depend on the clock
        stats = {"count": len(self.rows), "successes": successes, "failed_to_download": len(self.rows) - successes,
                 "failed_to_resize": 0, "duration": duration, "start_time": FIXED_EPOCH,
                 "end_time": FIXED_EPOCH + duration, "status_dict": status_dict}
        storage.write_text(str(self.folder / f"{self.name}_stats.json"), json.dumps(stats, indent=4))


def write_cc(root: Path, pictures: Iterable[Picture], count: int, seed: int,
             number_sample_per_shard: int = 10000) -> dict:
    """Train_GCC-training.tsv (caption TAB url, no header), images/{row}.jpg for the rows that downloaded, and
    img2dataset/NNNNN.tar + NNNNN.parquet + NNNNN_stats.json as `img2dataset --output_format webdataset
    --resize_mode no --compute_hash sha256` writes them; CC_FAILED rows are failed_to_download."""
    rng = np.random.default_rng([seed, 3000])
    failed = set(rng.permutation(count)[:min(CC_FAILED, max(0, count - 1))].tolist())
    lines = []
    shard: Img2datasetShard | None = None
    shards = 0
    try:
        for row, pic in enumerate(pictures):
            shard_id, in_shard = divmod(row, number_sample_per_shard)
            if shard is None or in_shard == 0:
                if shard is not None:
                    shard.close()
                shard = Img2datasetShard(root / "img2dataset", shard_id)
                shards += 1
            caption = scenes.short_caption(pic.scene, pic.text_rng, "cc")
            query = "?w=800" if rng.random() < 0.2 else ""
            url = f"https://images.example.com/photos/{rng.bytes(8).hex()}/{int(rng.integers(10**5, 10**7))}.jpg{query}"
            lines.append(f"{caption}\t{url}\n")
            ok = row not in failed
            w, h = (pic.scene.width, pic.scene.height) if ok else (None, None)
            meta = {"url": url, "caption": caption,
                    "key": img2dataset_key(shard_id, in_shard, number_sample_per_shard=number_sample_per_shard),
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else CC_ERRORS[int(rng.integers(len(CC_ERRORS)))],
                    "width": w, "height": h, "original_width": w, "original_height": h,
                    "exif": "{}" if ok else None,
                    "sha256": hashlib.sha256(pic.jpeg).hexdigest() if ok else None}
            shard.add(meta, pic.jpeg if ok else None)
            if ok:
                storage.write_bytes(str(root / "images" / f"{row}.jpg"), pic.jpeg)
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    if shard is not None:
        shard.close()
    storage.write_text(str(root / "Train_GCC-training.tsv"), "".join(lines))
    return {"rows": len(lines), "images": len(lines) - len(failed), "failed_to_download": len(failed),
            "shards": shards}


# ---------------------------------------------------------------- tokenizer


def write_tokenizer(root: Path) -> dict:
    """A BERT WordPiece folder (vocab.txt + configs) covering every word the generator writes, plus single
    characters and ##pieces so any lower-case ASCII text tokenizes without [UNK]."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punctuation = [",", ":", ".", "-", "'", "?", "!", "/", "(", ")"]
    pieces = ["##s", "##es", "##ed", "##ing", "##ly", "##er"] + [f"##{c}" for c in chars]
    vocab: list[str] = []
    for token in specials + scenes.vocabulary_words() + punctuation + chars + pieces:
        if token not in vocab:
            vocab.append(token)
    storage.write_text(str(root / "vocab.txt"), "".join(t + "\n" for t in vocab))
    config = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": True, "do_basic_tokenize": True,
              "strip_accents": None, "tokenize_chinese_chars": True, "model_max_length": 512,
              "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
              "mask_token": "[MASK]", "clean_up_tokenization_spaces": True}
    storage.write_text(str(root / "tokenizer_config.json"), json.dumps(config, indent=2, sort_keys=True))
    special_map = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                   "mask_token": "[MASK]"}
    storage.write_text(str(root / "special_tokens_map.json"), json.dumps(special_map, indent=2, sort_keys=True))
    return {"vocab_size": len(vocab)}


# ---------------------------------------------------------------- the whole dataset


def _prepare_out(out: Path) -> None:
    if storage.local_path(str(out)) is None:
        raise XvlmError(f"sample-data writes to a local folder, not {out}; generate locally, then copy it")
    if out.exists() and not out.is_dir():
        raise XvlmError(f"{out} exists and is not a folder; pick another OUT")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "sample_data.json").exists():
            raise XvlmError(f"{out} is not empty and holds no earlier sample-data output; pick an empty or new folder")
        for name in OWNED:  # replace our own earlier output only, so a smaller run leaves no stale files
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate(out_dir: str | os.PathLike, images: int = 1000, seed: int = 0, val_images: int = 200,
             progress: bool = True) -> dict:
    """Write the whole sample dataset under `out_dir` and return its summary (also in OUT/sample_data.json)."""
    if images < 20:
        raise XvlmError(f"--images must be at least 20 (got {images}): every source needs a few pictures")
    if val_images < 1:
        raise XvlmError(f"--val-images must be at least 1 (got {val_images})")
    out = Path(out_dir)
    _prepare_out(out)
    counts = split_counts(images)
    starts = {}
    offset = 0
    for source in ("coco", "vg", "sbu", "cc"):
        starts[source] = offset
        offset += counts[source]
    total = images + val_images

    # Picture indices: [0, images) are the training pictures in source order coco, vg, sbu, cc;
    # [images, images + val_images) are COCO val2017.
    def indices(source: str) -> range:
        return range(starts[source], starts[source] + counts[source])

    stream = PictureStream(seed, total, progress)
    id_rng = np.random.default_rng([seed, 139])
    coco_ids = [int(i) for i in id_rng.choice(np.arange(1, 581930), size=counts["coco"] + val_images, replace=False)]
    train_ids, val_ids = coco_ids[:counts["coco"]], coco_ids[counts["coco"]:]

    coco_root, vg_root, sbu_root, cc_root = out / "coco", out / "vg", out / "sbu", out / "cc"
    summary_counts = {
        "coco_train2017": write_coco(coco_root, "train2017", stream(indices("coco")), train_ids, seed, crowd=CROWD_IMAGES),
        "coco_val2017": write_coco(coco_root, "val2017", stream(range(images, total)), val_ids, seed),
    }
    # VG holds a share of the COCO train pictures (same file bytes, coco_id set) interleaved with its own.
    n_overlap = round(counts["coco"] * VG_COCO_SHARE)
    vg_plan: list[int | None] = [None] * counts["vg"] + list(range(n_overlap))
    vg_plan = [vg_plan[int(k)] for k in np.random.default_rng([seed, 1201]).permutation(len(vg_plan))]
    vg_own = stream(indices("vg"))

    def vg_pictures() -> Iterator[tuple[Picture, int | None]]:
        for k in vg_plan:
            if k is None:
                yield next(vg_own), None
            else:
                jpeg = storage.read_bytes(str(coco_root / "train2017" / f"{train_ids[k]:012d}.jpg"))
                yield make_picture(seed, starts["coco"] + k, jpeg=jpeg), train_ids[k]

    summary_counts["vg"] = write_vg(vg_root, vg_pictures(), seed)
    summary_counts["sbu"] = write_sbu(sbu_root, stream(indices("sbu")), counts["sbu"], seed)
    summary_counts["cc"] = write_cc(cc_root, stream(indices("cc")), counts["cc"], seed)
    stream.bar.close()
    from sampledata import sources16m   # the 16M sources and the evaluation files, on picture indices after these

    extra_counts, extra_paths = sources16m.write_all(out, seed, images, val_images, train_ids, starts["coco"],
                                                     val_ids, progress)
    summary_counts.update(extra_counts)
    from sampledata import downstream   # retrieval and RefCOCO+ sets from their own scenes (not training pictures)

    summary_counts["downstream"] = downstream.write_all(out / "downstream", seed)
    summary_counts["tokenizer"] = write_tokenizer(out / "tokenizer")

    summary = {
        "generator": "xvlm sample-data", "generator_version": GENERATOR_VERSION, "seed": seed,
        "images": images, "val_images": val_images, "total_pictures": total,
        "split": {source: counts[source] for source in ("coco", "vg", "sbu", "cc")},
        "counts": summary_counts,
        "paths": {
            "coco": "coco", "vg": "vg", "sbu": "sbu", "cc": "cc", "cc_img2dataset": "cc/img2dataset",
            "tokenizer": "tokenizer", **extra_paths, "downstream": "downstream",
        },
    }
    _write_json_pretty(out / "sample_data.json", summary)
    log.info("sample data: %d pictures (seed %d) in %s", total, seed, out)
    # Callers get absolute paths; the file keeps relative ones so the folder can be moved.
    return {**summary, "out": str(out.resolve()),
            "paths": {k: str((out / v).resolve()) for k, v in summary["paths"].items()}}


def _write_json_pretty(path: Path, obj: object) -> None:
    storage.write_text(str(path), json.dumps(obj, indent=2, sort_keys=True) + "\n")
