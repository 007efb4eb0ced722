"""The shard build job end to end on `xvlm sample-data` output, with one local Ray shared by the module:
each source alone and all together, the COCO∩VG merge, reading back with webdataset and tarfile, box scaling,
and S3 as input and output."""
from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.build import BuildConfig, run_build
from pipeline.images import ImageConfig
import storage
from shards.format import sample_problems
from shards.manifest import read_manifest

pytestmark = [pytest.mark.ray]

MAX_SIDE = 160   # smaller than every sample picture, so every image is resized and its boxes scaled


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    from sampledata.sample_data import generate

    return generate(tmp_path_factory.mktemp("sample"), images=40, val_images=10, seed=3, progress=False)


@pytest.fixture(scope="module")
def local_ray(s3):
    """One in-process Ray for the module (started after the S3 fixture so its workers see the S3 env)."""
    import ray

    from pipeline.build import init_ray

    init_ray(None, 2)
    yield
    ray.shutdown()


def _sources(sample: dict, *names: str) -> dict[str, str]:
    return {name: sample["paths"][name] for name in names}


def _build(sources: dict[str, str], out: str, **kwargs) -> object:
    config = BuildConfig(sources=sources, out=str(out), samples_per_shard=kwargs.pop("samples_per_shard", 8),
                         image=kwargs.pop("image", ImageConfig(max_side=MAX_SIDE)), progress=False,
                         command=["test"], **kwargs)
    return run_build(config)


def _read_samples(out: str) -> list[dict]:
    """Every sample of every shard, read with Python's tarfile through the storage layer."""
    samples = []
    for shard in read_manifest(out).shards:
        with storage.open_read(storage.join(out, shard["name"])) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            current: dict = {}
            for info in tar:
                key, ext = info.name.split(".", 1)
                if current and current["key"] != key:
                    samples.append(current)
                    current = {}
                current["key"] = key
                current[ext] = tar.extractfile(info).read()
            if current:
                samples.append(current)
    return samples


def _check_dataset(out: str) -> tuple[dict, list[dict]]:
    """Accounting, sample validity and boxes inside their images; returns (manifest json, samples)."""
    manifest = json.loads(storage.read_bytes(storage.join(out, "manifest.json")))
    for source, counts in manifest["sources"].items():
        for kind, n in counts["inputs"].items():
            rejected = sum(counts["rejected"].get(kind, {}).values())
            assert n == counts["written"].get(kind, 0) + rejected, (source, kind)
    samples = _read_samples(out)
    assert len(samples) == manifest["totals"]["samples"] > 0
    index = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, "index.parquet")))).to_pylist()
    assert [row["key"] for row in index] == [s["key"] for s in samples] == sorted(s["key"] for s in samples)
    for sample, row in zip(samples, index):
        meta = json.loads(sample["json"])
        assert sample_problems(meta) == [], sample["key"]
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (meta["width"], meta["height"]) == (row["width"], row["height"])
        assert max(image.size) <= MAX_SIDE
        for region in meta["regions"]:
            x, y, w, h = region["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= meta["width"] + 0.01 and y + h <= meta["height"] + 0.01
        text = meta["captions"][0] if meta["captions"] else meta["regions"][0]["text"]
        assert sample["txt"].decode() == text
    return manifest, samples


def test_all_sources_together_and_coco_vg_merge(sample, local_ray, tmp_path):
    out = tmp_path / "all"
    result = _build(_sources(sample, "coco", "vg", "sbu", "cc"), out)
    manifest, samples = _check_dataset(str(out))
    assert result.shards_written == len(manifest["shards"]) >= 2
    counts = sample["counts"]
    sources = manifest["sources"]
    assert sources["coco"]["written"]["image"] == counts["coco_train2017"]["images"]
    assert sources["coco"]["rejected"]["object"] == {"crowd_box": counts["coco_train2017"]["crowd"]}
    assert sources["vg"]["written"] == {"image": counts["vg"]["images"], "region": counts["vg"]["regions"],
                                        "object": counts["vg"]["objects"]}
    assert sources["sbu"]["rejected"]["image"] == {"missing_image": counts["sbu"]["missing_images"]}
    # COCO∩VG: one sample per shared picture, keyed by COCO, with COCO's objects and VG's regions.
    metas = [json.loads(s["json"]) for s in samples]
    merged = [m for m in metas if m["source"] == "coco+vg"]
    assert len(merged) == counts["vg"]["coco_overlap"]
    vg_only = {m["source_id"] for m in metas if m["source"] == "vg"}
    assert len(vg_only) == counts["vg"]["images"] - counts["vg"]["coco_overlap"]
    for m in merged:
        assert m["key"].startswith("coco-") and m["coco_id"] == int(m["source_id"])
        assert m["captions"] and {r["kind"] for r in m["regions"]} == {"region", "object"}
    assert len({m["key"] for m in metas}) == len(metas)


def test_shards_read_back_with_stock_webdataset(sample, local_ray, tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    _build(_sources(sample, "coco", "sbu"), out)
    names = [s["name"] for s in read_manifest(str(out)).shards]
    dataset = wds.WebDataset([str(out / n) for n in names], shardshuffle=False).decode("pil")
    seen = 0
    for item in dataset:
        assert set(item) >= {"__key__", "jpg", "json", "txt"}
        assert item["jpg"].size == (item["json"]["width"], item["json"]["height"])
        assert item["json"]["key"] == item["__key__"]
        seen += 1
    assert seen == read_manifest(str(out)).to_json()["totals"]["samples"]


def test_boxes_are_scaled_with_the_resize(sample, local_ray, tmp_path):
    out = tmp_path / "coco"
    _build(_sources(sample, "coco"), out)
    coco = os.path.join(sample["paths"]["coco"], "annotations", "instances_train2017.json")
    data = json.load(open(coco))
    images = {im["id"]: im for im in data["images"]}
    boxes: dict[int, list] = {}
    for ann in data["annotations"]:
        if not ann["iscrowd"]:
            boxes.setdefault(ann["image_id"], []).append(ann["bbox"])
    for item in _read_samples(str(out)):
        meta = json.loads(item["json"])
        original = images[int(meta["source_id"])]
        sx, sy = meta["width"] / original["width"], meta["height"] / original["height"]
        assert abs(sx - sy) < 0.01 and max(meta["width"], meta["height"]) == MAX_SIDE
        expected = [[x * sx, y * sy, w * sx, h * sy] for x, y, w, h in boxes[int(meta["source_id"])]]
        got = [r["bbox"] for r in meta["regions"]]
        assert len(got) == len(expected)
        for g, e in zip(sorted(got), sorted(expected)):
            assert all(abs(a - b) < 0.02 for a, b in zip(g, e)), (g, e)


@pytest.mark.parametrize("source", ["coco", "vg", "sbu", "cc", "cc_img2dataset"])
def test_each_source_alone(sample, local_ray, tmp_path, source):
    name = "cc" if source.startswith("cc") else source
    out = tmp_path / source
    _build({name: sample["paths"][source]}, out, samples_per_shard=50)
    manifest, samples = _check_dataset(str(out))
    assert list(manifest["sources"]) == [name]
    assert samples and all(json.loads(s["json"])["source"] == name for s in samples)


@pytest.mark.s3
def test_s3_input_and_output_give_the_same_shards_as_local(sample, local_ray, s3, s3_prefix, tmp_path):
    names = ("coco", "sbu", "cc_img2dataset")
    remote_sources = {}
    for source in names:
        root = sample["paths"][source]
        remote_root = storage.join(s3_prefix, "in", source)
        for entry in storage.list_files(root):
            storage.write_bytes(storage.join(remote_root, os.path.relpath(entry.path, root)),
                                open(entry.path, "rb").read())
        remote_sources["cc" if source.startswith("cc") else source] = remote_root
    local = tmp_path / "local"
    _build({("cc" if s.startswith("cc") else s): sample["paths"][s] for s in names}, local)
    remote = storage.join(s3_prefix, "out")
    _build(remote_sources, remote, endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    remote_manifest, _ = _check_dataset(remote)
    local_manifest = read_manifest(str(local)).to_json()
    assert remote_manifest["shards"] == local_manifest["shards"]        # same names, sizes and sha256
    assert remote_manifest["sources"] == local_manifest["sources"]
    for shard in remote_manifest["shards"]:
        assert storage.read_bytes(storage.join(remote, shard["name"])) == (local / shard["name"]).read_bytes()
    # A second run resumes: every shard is already done, nothing is rewritten.
    again = _build(remote_sources, remote, endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    assert again.shards_written == 0 and again.shards_skipped == len(remote_manifest["shards"])


# ---------------------------------------------------------------------------------------------- bad inputs


def _save(image: Image.Image, path: str, fmt: str, **kwargs) -> None:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _break_sample(sample: dict, root) -> tuple[dict[str, str], dict]:
    """A copy of the sample sources with one of every bad-input kind; returns (sources, what was done)."""
    import shutil

    sources = {}
    for source in ("coco", "sbu", "cc", "cc_img2dataset"):
        shutil.copytree(sample["paths"][source], root / source)
    coco = root / "coco"
    instances_path = coco / "annotations" / "instances_train2017.json"
    captions_path = coco / "annotations" / "captions_train2017.json"
    instances, captions = json.loads(instances_path.read_text()), json.loads(captions_path.read_text())
    images = sorted(instances["images"], key=lambda im: im["id"])
    file = {im["id"]: str(coco / "train2017" / im["file_name"]) for im in images}
    ids = [im["id"] for im in images]
    picture = {i: Image.open(file[i]).convert("RGB") for i in ids[:14]}
    plan = {"missing": ids[0], "truncated": ids[1], "html": ids[2], "bomb": ids[3], "cmyk": ids[4],
            "gray": ids[5], "palette": ids[6], "gray16": ids[7], "rgba": ids[8], "exif": ids[9],
            "half": ids[10], "aspect": ids[11], "boxes": ids[12], "duplicate": ids[13]}
    os.remove(file[plan["missing"]])
    data = open(file[plan["truncated"]], "rb").read()
    open(file[plan["truncated"]], "wb").write(data[: len(data) // 2])
    open(file[plan["html"]], "w").write("<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n")
    _save(Image.new("L", (2600, 2600)), file[plan["bomb"]], "PNG")            # 6.76 M pixels > --max-pixels
    _save(picture[plan["cmyk"]].convert("CMYK"), file[plan["cmyk"]], "JPEG")
    _save(picture[plan["gray"]].convert("L"), file[plan["gray"]], "JPEG")
    _save(picture[plan["palette"]].convert("P"), file[plan["palette"]], "PNG")  # a PNG named .jpg
    gray16 = Image.fromarray((__import__("numpy").asarray(picture[plan["gray16"]].convert("L"), dtype="uint16") * 257))
    _save(gray16, file[plan["gray16"]], "PNG")
    rgba = picture[plan["rgba"]].convert("RGBA")
    rgba.putalpha(128)
    _save(rgba, file[plan["rgba"]], "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(picture[plan["exif"]], file[plan["exif"]], "JPEG", exif=exif.tobytes())
    half = picture[plan["half"]]
    _save(half.resize((half.width // 2, half.height // 2)), file[plan["half"]], "JPEG")
    wide = picture[plan["aspect"]]
    _save(wide.crop((0, 0, wide.width, wide.height // 2)), file[plan["aspect"]], "JPEG")
    # Boxes: partly outside (clipped), wholly outside, zero / negative size; an empty caption;
    # an image listed twice (one sample, both listings written).
    next_id = max(a["id"] for a in instances["annotations"]) + 1
    boxes = {"partly": [-10.0, -10.0, 60.0, 60.0], "outside": [5000.0, 5000.0, 10.0, 10.0],
             "zero": [1.0, 1.0, 0.0, 5.0], "negative": [1.0, 1.0, -5.0, 5.0]}   # (NaN is not JSON: see test_images)
    for k, bbox in enumerate(boxes.values()):
        instances["annotations"].append({"id": next_id + k, "image_id": plan["boxes"], "bbox": bbox, "iscrowd": 0,
                                         "category_id": instances["categories"][0]["id"], "area": 1.0,
                                         "segmentation": []})
    captions["annotations"].append({"id": next_id + 10, "image_id": plan["boxes"], "caption": "   "})
    captions["images"].append(dict(next(im for im in images if im["id"] == plan["duplicate"])))
    instances_path.write_text(json.dumps(instances))
    captions_path.write_text(json.dumps(captions))
    sources["coco"] = str(coco)
    # SBU: a caption line that is not UTF-8.
    sbu = root / "sbu"
    lines = (sbu / "SBU_captioned_photo_dataset_captions.txt").read_bytes().split(b"\n")
    lines[0] = b"a caf\xe9 in latin-1 \xff"
    (sbu / "SBU_captioned_photo_dataset_captions.txt").write_bytes(b"\n".join(lines))
    sources["sbu"] = str(sbu)
    # CC TSV: a line without its tab; img2dataset: members with '..' and absolute paths and a symlink.
    with open(root / "cc" / "Train_GCC-training.tsv", "a") as f:
        f.write("this line has no url column\n")
    sources["cc"] = str(root / "cc")
    tar_path = next((root / "cc_img2dataset").glob("*.tar"))
    with tarfile.open(tar_path, "a") as tar:
        for name in ("../evil.jpg", "/abs/evil.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        link = tarfile.TarInfo("999999999.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    sources["cc_img2dataset"] = str(root / "cc_img2dataset")
    half_boxes = [a["bbox"] for a in instances["annotations"] if a["image_id"] == plan["half"] and not a["iscrowd"]]
    return sources, {"plan": plan, "half_boxes": half_boxes, "boxes": boxes, "images": {im["id"]: im for im in images}}


def test_every_bad_input_is_counted_with_its_reason(sample, local_ray, tmp_path):
    sources, done = _break_sample(sample, tmp_path / "bad")
    plan = done["plan"]
    out_tsv, out_i2d = tmp_path / "out", tmp_path / "out_i2d"
    image = ImageConfig(max_side=MAX_SIDE, max_pixels=5_000_000)
    _build({k: v for k, v in sources.items() if k != "cc_img2dataset"}, out_tsv, image=image)
    _build({"cc": sources["cc_img2dataset"]}, out_i2d, image=image)
    manifest, samples = _check_dataset(str(out_tsv))
    _check_dataset(str(out_i2d))
    rejects = pq.read_table(out_tsv / "rejects.parquet").to_pylist() + \
        pq.read_table(out_i2d / "rejects.parquet").to_pylist()
    by_reason: dict[str, list[dict]] = {}
    for row in rejects:
        by_reason.setdefault(row["reason"], []).append(row)
    # Rejects add up to the manifest's rejected counts.
    for source, counts in manifest["sources"].items():
        for kind, reasons in counts["rejected"].items():
            for reason, n in reasons.items():
                assert n == sum(1 for r in by_reason[reason] if r["source"] == source and r["kind"] == kind)
    coco_image_rejects = {r["reason"] for r in rejects if r["source"] == "coco" and r["kind"] == "image"}
    assert {"missing_image", "truncated_image", "not_an_image", "decompression_bomb",
            "image_size_mismatch"} <= coco_image_rejects
    for reason in ("bad_box", "box_outside", "empty_text", "invalid_utf8", "malformed_line", "unsafe_tar_member"):
        assert reason in by_reason, reason
    assert manifest["sources"]["coco"]["clipped_boxes"] >= 1
    metas = {json.loads(s["json"])["source_id"]: json.loads(s["json"]) for s in samples}
    # Converted images are written; none of the rejected ones is.
    for name in ("cmyk", "gray", "palette", "gray16", "rgba", "exif", "half", "boxes", "duplicate"):
        assert str(plan[name]) in metas, name
    for name in ("missing", "truncated", "html", "bomb", "aspect"):
        assert str(plan[name]) not in metas, name
    # EXIF orientation 6 is not applied: the stored frame keeps the source's landscape/portrait shape.
    original = done["images"][plan["exif"]]
    exif_meta = metas[str(plan["exif"])]
    assert (exif_meta["width"] > exif_meta["height"]) == (original["width"] > original["height"])
    # The half-size file: boxes made for the full-size frame are rescaled into the stored image.
    half = metas[str(plan["half"])]
    scale = half["width"] / done["images"][plan["half"]]["width"]
    expected = sorted([x * scale, y * scale, w * scale, h * scale] for x, y, w, h in done["half_boxes"])
    got = sorted(r["bbox"] for r in half["regions"])
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert all(abs(a - b) < 0.05 for a, b in zip(g, e)), (g, e)
    # The image listed twice is one sample (the coco source counts an identical listing once).
    assert manifest["sources"]["coco"]["written"]["image"] == len(done["images"]) - 5
    assert sum(1 for m in metas.values() if m["source_id"] == str(plan["duplicate"])) == 1

