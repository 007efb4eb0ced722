"""Hugging Face `datasets` reads our shards with the real library, every sample, even when the first samples have no
regions (schema inference from them alone would type `regions` as a list of nulls): through the dataset card the
builder writes (README.md), and through `shards.hf_card.features()`."""
from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402
from test_stats import sample_build  # noqa: E402

from shards.hf_card import CARD_NAME, features, yaml_features  # noqa: E402
from shards.manifest import read_dataset_manifest  # noqa: E402


@pytest.fixture(scope="module")
def captions_first(tmp_path_factory) -> str:
    """Shards whose first samples (cc-..., sorted first) have no regions and whose later ones (coco-...) have boxes."""
    return shardkit.make_dataset(str(tmp_path_factory.mktemp("hf") / "ds"), samples=24, per_shard=8,
                                 sources=("cc", "coco"), boxless=("cc",))


def _expected(path: str) -> dict[str, dict]:
    """key -> KEY.json, read from the shards with tarfile (independently of datasets)."""
    import tarfile

    out = {}
    for tar_path in sorted(glob.glob(f"{path}/*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    out[member.name[:-5]] = json.loads(tar.extractfile(member).read())
    return out


def _check(ds, expected: dict[str, dict]) -> None:
    assert len(ds) == len(expected)
    first = ds[0]
    assert first["json"]["regions"] == [] and first["__key__"].startswith("cc-")     # what used to break inference
    with_boxes = 0
    for row in ds:
        want = expected[row["__key__"]]
        got = row["json"]
        assert got["captions"] == want["captions"] and got["source"] == want["source"]
        assert [r["bbox"] for r in got["regions"]] == [r["bbox"] for r in want["regions"]]
        assert [(r["text"], r["kind"], r["attributes"]) for r in got["regions"]] == \
            [(r["text"], r["kind"], r["attributes"]) for r in want["regions"]]
        assert row["jpg"].size == (want["width"], want["height"])
        with_boxes += bool(got["regions"])
    assert with_boxes == sum(bool(w["regions"]) for w in expected.values()) > 0


def test_the_dataset_card_gives_datasets_the_schema(captions_first, tmp_path):
    card = Path(captions_first, CARD_NAME).read_text()
    assert card.startswith("---\n") and "dataset_info:" in card
    ds = datasets.load_dataset(captions_first, split="train", cache_dir=str(tmp_path / "cache"))
    _check(ds, _expected(captions_first))


def test_the_features_object_reads_every_sample(captions_first, tmp_path):
    tars = sorted(glob.glob(f"{captions_first}/*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, features=features(), split="train",
                               cache_dir=str(tmp_path / "cache"))
    _check(ds, _expected(captions_first))


def test_the_card_and_the_features_object_are_one_schema():
    """The card's YAML is what `datasets` itself writes for features()."""
    assert yaml_features() == datasets.DatasetInfo(features=features())._to_yaml_dict()["features"]


def test_the_builder_writes_the_card(tmp_path_factory, tmp_path):
    """A dataset from `xvlm build-shards` (sample data of all four sources) loads whole from its folder."""
    _src, built = sample_build(tmp_path_factory)
    assert (built / CARD_NAME).is_file()
    ds = datasets.load_dataset(str(built), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == read_dataset_manifest(str(built)).samples
    assert sorted(set(ds["__key__"])) == sorted(_expected(str(built)))
