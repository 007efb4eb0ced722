"""The leak filter's parts without Ray: the --exclude-eval syntax, X-VLM's evaluation files, COCO ids from image
paths, the perceptual hash on planted copies (exact, re-encoded, resized, cropped) against the other pictures of
the sample data, and the index digest that makes the filter part of a build's fingerprint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.build import BuildConfig
from pipeline.evalsets import coco_id, parse_spec, read_eval_file
from pipeline.leak import HAMMING_THRESHOLD, build_index
from storage.errors import XvlmError


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    from sampledata.sample_data import generate

    return generate(tmp_path_factory.mktemp("leak"), images=60, val_images=6, seed=11, progress=False)


def test_spec_syntax():
    spec = parse_spec("flickr30k=/d/flickr30k_test.json,images=/d/images")
    assert (spec.name, spec.file, spec.images, spec.split) == ("flickr30k", "/d/flickr30k_test.json", "/d/images",
                                                               "flickr30k:flickr30k_test")
    assert parse_spec("refcoco+=s3://b/refcoco+_val.json").split == "refcoco+:refcoco+_val"
    assert parse_spec("coco-karpathy=/x/coco_test.json").text() == "coco-karpathy=/x/coco_test.json"
    for bad, message in (("coco_test.json", "expected NAME=FILE"), ("Coco Test=/x.json", "expected NAME=FILE"),
                         ("coco=/x.json,root=/y", "unknown option"), ("coco=,images=/y", "no FILE"),
                         ("coco=/x.json,images=", "unknown option")):
        with pytest.raises(XvlmError, match=message):
            parse_spec(bad)
    with pytest.raises(XvlmError, match="expected NAME=FILE"):
        BuildConfig(sources={"coco": "/x"}, out="/y", exclude_eval=["nonsense"])
    with pytest.raises(XvlmError, match="0..128"):
        BuildConfig(sources={"coco": "/x"}, out="/y", leak_max_distance=200)


def test_coco_ids_from_x_vlm_image_paths():
    assert coco_id("val2014/COCO_val2014_000000391895.jpg") == 391895
    assert coco_id("train2014/COCO_train2014_000000581857.jpg") == 581857
    assert coco_id("coco/val2017/000000000139.jpg") == 139
    assert coco_id("flickr30k-images/1007129816.jpg") is None             # Flickr ids are not COCO ids
    assert coco_id("COCO_train2014_000000581857_16.jpg") is None           # a refs file_name, not an image


def test_evaluation_files_are_read_and_bad_ones_are_clear_errors(sample, tmp_path):
    ev = Path(sample["paths"]["eval"])
    test = read_eval_file(parse_spec(f"coco-karpathy={ev / 'coco_test.json'}"))
    assert len(test) == sample["counts"]["eval"]["coco_test"] and all(i.coco_id for i in test)
    refs = read_eval_file(parse_spec(f"refcoco+={ev / 'refcoco+_test.json'}"))
    assert len(refs) < sample["counts"]["eval"]["refcoco+_test"]      # one image per several expressions
    assert all(i.split == "refcoco+:refcoco+_test" and i.coco_id for i in refs)
    cases = {"missing.json": None, "not_json.json": "{oops", "dict.json": json.dumps({"images": []}),
             "no_image.json": json.dumps([{"caption": ["x"]}]), "empty.json": "[]"}
    messages = {"missing.json": "does not exist", "not_json.json": "is not JSON", "dict.json": "holds a JSON dict",
                "no_image.json": "has no \"image\" path", "empty.json": "lists no image"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(XvlmError, match=messages[name]):
            read_eval_file(parse_spec(f"x={tmp_path / name}"))


def test_sets_without_coco_ids_need_their_images(sample, tmp_path):
    ev = Path(sample["paths"]["eval"])
    with pytest.raises(XvlmError, match="images=ROOT"):
        build_index([parse_spec(f"flickr30k={ev / 'flickr30k_test.json'}")], progress=False)
    with pytest.raises(XvlmError, match=r"cannot be read.*no such file"):
        build_index([parse_spec(f"flickr30k={ev / 'flickr30k_test.json'},images={tmp_path}")], progress=False)
    escape = tmp_path / "escape.json"
    escape.write_text(json.dumps([{"image": "../../etc/passwd"}]))
    with pytest.raises(XvlmError, match="leaves images=ROOT"):
        build_index([parse_spec(f"x={escape},images={ev / 'images'}")], progress=False)


def _web_images(root: Path) -> dict[str, Path]:
    """key -> image file of every picture of the web sources (TSV / folder forms)."""
    files = {f"cc12m-{int(p.stem):09d}": p for p in (root / "cc12m" / "images").glob("*.jpg")}
    files.update({f"openimages-{p.stem}": p for p in (root / "openimages" / "train").glob("*.jpg")})
    files.update({f"objects365-{int(p.stem.rsplit('_', 1)[1])}": p for p in (root / "objects365" / "train").rglob("*.jpg")})
    files.update({f"cc-{int(p.stem):09d}": p for p in (root / "cc" / "images").glob("*.jpg")})
    files.update({f"sbu-{p.stem}": p for p in (root / "sbu" / "images").glob("*.jpg")})
    return files


def test_planted_copies_are_found_and_other_pictures_are_not(sample):
    root = Path(sample["out"])
    ev = root / "eval"
    index = build_index([parse_spec(f"flickr30k={ev / 'flickr30k_test.json'},images={ev / 'images'}"),
                         parse_spec(f"coco-karpathy={ev / 'coco_test.json'},images={ev / 'images'}")], progress=False)
    planted = {p["key"]: p for p in json.loads((ev / "planted.json").read_text())}
    assert {p["kind"] for p in planted.values()} == {"exact", "reencoded", "resized", "cropped"}
    web = _web_images(root)
    found, distances = {}, {}
    for key, path in web.items():
        found[key] = index.match_image(path.read_bytes())
        distances[key] = index.nearest(path.read_bytes())[0]
    for key, row in planted.items():
        assert found[key] is not None, (key, row["kind"], distances[key])
        split = "flickr30k:flickr30k_test" if row["eval_set"] == "flickr30k" else "coco-karpathy:coco_test"
        assert found[key].startswith(f"{split} by content: {row['eval_image']} at distance "), found[key]
    others = {k: d for k, d in distances.items() if k not in planted}
    assert len(others) > 20 and all(found[k] is None for k in others), sorted(others.items(), key=lambda kv: kv[1])[:5]
    assert max(distances[k] for k in planted) < min(others.values())
    assert HAMMING_THRESHOLD < min(others.values())


def test_the_digest_follows_the_sets_the_threshold_and_the_pictures(sample, tmp_path):
    ev = Path(sample["paths"]["eval"])
    specs = [parse_spec(f"coco-karpathy={ev / 'coco_test.json'}"),
             parse_spec(f"flickr30k={ev / 'flickr30k_val.json'},images={ev / 'images'}")]
    first = build_index(specs, progress=False)
    assert build_index(specs, progress=False).digest == first.digest
    assert build_index(specs[:1], progress=False).digest != first.digest
    changed = build_index(specs, progress=False)
    changed.threshold = 3
    assert changed.digest != first.digest
    # Same file name, other pictures: another digest (a rerun with other evaluation images is another build).
    images = tmp_path / "images"
    import shutil

    shutil.copytree(ev / "images", images)
    victim = images / json.loads((ev / "flickr30k_val.json").read_text())[0]["image"]
    victim.write_bytes((ev / "images" / json.loads((ev / "flickr30k_test.json").read_text())[0]["image"]).read_bytes())
    other = build_index([specs[0], parse_spec(f"flickr30k={ev / 'flickr30k_val.json'},images={images}")],
                        progress=False)
    assert other.digest != first.digest
    config = BuildConfig(sources={"coco": "/x"}, out="/y", exclude_eval=[s.text() for s in specs])
    config.eval_digest = first.digest
    assert config.output_config()["exclude_eval"]["digest"] == first.digest
    assert "exclude_eval" not in BuildConfig(sources={"coco": "/x"}, out="/y").output_config()
