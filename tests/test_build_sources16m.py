"""All eight sources into one dataset with `xvlm build-shards`, on local Ray and from S3, with the leak filter:
inputs = written + rejected per source and kind, Open Images boxes mapped to pixels, the dropped images exactly the
evaluation images (by COCO id) and the planted copies (by content), byte-identical reruns and resume with the
filter on, and the stats report's table of removed evaluation images."""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_build_job import MAX_SIDE, _build, _check_dataset  # noqa: E402

from pipeline.evalsets import coco_id  # noqa: E402
import storage  # noqa: E402
from storage.errors import XvlmError  # noqa: E402

pytestmark = [pytest.mark.ray]
EIGHT = ("coco", "vg", "sbu", "cc", "cc12m", "objects365", "openimages", "refcoco")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    from sampledata.sample_data import generate

    return generate(tmp_path_factory.mktemp("sample8"), images=40, val_images=6, seed=13, progress=False)


@pytest.fixture(scope="module")
def local_ray(s3):
    import ray

    from pipeline.build import init_ray

    init_ray(None, 2)
    yield
    ray.shutdown()


def _exclude(ev: str) -> list[str]:
    return [f"coco-karpathy={ev}/coco_test.json,images={ev}/images", f"coco-karpathy={ev}/coco_val.json",
            f"refcoco+={ev}/refcoco+_val.json", f"refcoco+={ev}/refcoco+_test.json",
            f"flickr30k={ev}/flickr30k_test.json,images={ev}/images"]


def _rejects(out: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, "rejects.parquet")))).to_pylist()


def _expected_coco_ids(ev: Path) -> set[int]:
    ids = set()
    for name in ("coco_test", "coco_val", "refcoco+_val", "refcoco+_test"):
        ids |= {coco_id(e["image"]) for e in json.loads((ev / f"{name}.json").read_text())}
    return ids - {None}


def test_eight_sources_with_the_leak_filter(sample, local_ray, tmp_path):
    ev = Path(sample["paths"]["eval"])
    sources = {name: sample["paths"][name] for name in EIGHT}
    out = tmp_path / "eight"
    result = _build(sources, out, exclude_eval=_exclude(str(ev)))
    manifest, samples = _check_dataset(str(out))         # inputs = written + rejected, boxes inside images
    assert sorted(manifest["sources"]) == sorted(EIGHT) and result.shards_written >= 2
    assert manifest["build"]["config"]["exclude_eval"]["digest"]
    metas = [json.loads(s["json"]) for s in samples]
    # Nothing of an evaluation image is left: no COCO id of the files, no planted copy.
    bad_ids = _expected_coco_ids(ev)
    planted = {p["key"]: p for p in json.loads((ev / "planted.json").read_text())}
    assert not any(m.get("coco_id") in bad_ids for m in metas)
    assert not set(planted) & {m["key"] for m in metas}
    # ... and nothing else was dropped: every eval_leak image reject is one of them, with its split.
    rejects = _rejects(str(out))
    leaks = [r for r in rejects if r["reason"] == "eval_leak"]
    by_content = [r for r in leaks if r["kind"] == "image" and " by content: " in r["detail"]]
    by_id = [r for r in leaks if r["kind"] == "image" and " by COCO id " in r["detail"]]
    assert len(by_content) == len(planted) > 0
    assert {r["detail"].split(" by content: ")[1].rsplit(" at distance", 1)[0] for r in by_content} == \
        {p["eval_image"] for p in planted.values()}
    assert all(r["detail"].split(" ", 1)[0] in {"coco-karpathy:coco_test", "coco-karpathy:coco_val",
                                               "refcoco+:refcoco+_val", "refcoco+:refcoco+_test",
                                               "flickr30k:flickr30k_test"} for r in leaks)
    assert {int(r["detail"].rsplit(" ", 1)[1]) for r in by_id} <= bad_ids and by_id
    for source in ("coco", "vg", "refcoco", "cc12m", "openimages", "objects365"):
        assert "eval_leak" in manifest["sources"][source]["rejected"].get("image", {}), source
    # Open Images: normalized boxes became pixels of the stored image; group boxes keep their flag.
    oi = [m for m in metas if m["source"] == "openimages"]
    assert oi and all(max(r["bbox"][2] for r in m["regions"]) > 1.5 for m in oi)
    assert any(r.get("group_of") for m in metas for r in m["regions"])
    assert max(max(m["width"], m["height"]) for m in metas) <= MAX_SIDE
    assert any(m["source"] == "coco+refcoco" or m["source"].startswith("coco+refcoco") for m in metas)
    # The stats report lists the removed evaluation images per split.
    from reports.stats import collect, summarize

    summary = summarize(collect(str(out), progress=False))
    table = summary["rejects"]["eval_leak_images"]
    assert sum(n for _, _, n in table) == len(by_content) + len(by_id)


def test_reruns_are_byte_identical_and_resume_with_the_filter_on(sample, local_ray, tmp_path):
    ev = str(Path(sample["paths"]["eval"]))
    sources = {name: sample["paths"][name] for name in ("cc12m", "openimages", "coco")}
    first, second = tmp_path / "a", tmp_path / "b"
    _build(sources, first, exclude_eval=_exclude(ev))
    _build(sources, second, exclude_eval=_exclude(ev))
    names = sorted(p.name for p in first.iterdir() if p.is_file())
    assert names == sorted(p.name for p in second.iterdir() if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # Resume: a shard lost after its task finished is rewritten, the rest is kept, the bytes are the same.
    victim = next(first.glob("shard-*.tar"))
    before = victim.read_bytes()
    victim.unlink()
    again = _build(sources, first, exclude_eval=_exclude(ev))
    assert again.shards_written == 1 and victim.read_bytes() == before
    # Other evaluation sets on the same output are another build: refused.
    with pytest.raises(XvlmError, match="other settings"):
        _build(sources, first, exclude_eval=_exclude(ev)[:2])


@pytest.mark.s3
def test_eight_sources_from_s3_give_the_local_dataset(sample, local_ray, s3, s3_prefix, tmp_path):
    remote = {}
    root = Path(sample["out"])
    for name in EIGHT + ("eval",):
        local_root = Path(sample["paths"][name])
        remote_root = storage.join(s3_prefix, "in", name)
        for entry in storage.list_files(str(local_root)):
            storage.write_bytes(storage.join(remote_root, os.path.relpath(entry.path, local_root)),
                                open(entry.path, "rb").read())
        remote[name] = remote_root
    assert root.exists()
    local, out = tmp_path / "local", storage.join(s3_prefix, "out")
    _build({n: sample["paths"][n] for n in EIGHT}, local, exclude_eval=_exclude(sample["paths"]["eval"]))
    _build({n: remote[n] for n in EIGHT}, out, exclude_eval=_exclude(remote["eval"]),
           endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    remote_manifest, _ = _check_dataset(out)
    local_manifest = json.loads((local / "manifest.json").read_text())
    assert remote_manifest["sources"] == local_manifest["sources"]
    assert remote_manifest["shards"] == local_manifest["shards"]          # same names, sizes and sha256
    assert sum(r["reason"] == "eval_leak" for r in _rejects(out)) == \
        sum(r["reason"] == "eval_leak" for r in _rejects(str(local))) > 0
