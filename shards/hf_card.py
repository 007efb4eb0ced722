"""Our shards for Hugging Face `datasets`: the sample schema, declared once (COLUMNS), as a `datasets.Features`
(`features()`) and as the dataset card (README.md, YAML `dataset_info.features`) that the builder writes beside
manifest.json.

Without a schema, `datasets`' webdataset builder infers one from the first 5 samples: when they have no regions
(Conceptual Captions, SBU), `regions` becomes a list of nulls and the first sample with a box fails ("Couldn't cast
... struct<attributes, bbox, kind, text> to null"). With either, every sample reads:

    datasets.load_dataset("path/to/shards")                                 # the card: every *.tar, split "train"
    datasets.load_dataset("webdataset", data_files={"train": tars}, features=shards.hf_card.features())

Fields of a sample's JSON that the schema does not list are left out by `datasets` (a new format field belongs here
and in shards/FORMAT.md). Writing the card needs no `datasets`; `features()` imports it.
"""
from __future__ import annotations

from typing import Any

import yaml

import storage
from shards.format import parse_shard_name
from shards.manifest import Manifest

CARD_NAME = "README.md"
# KEY.json (shards/FORMAT.md), fields in the sorted order they are written in. A type is a `datasets` dtype name,
# a dict (a struct) or a one-element list (a list of that type).
SAMPLE_JSON: dict[str, Any] = {
    "captions": ["string"],
    "coco_id": "int64",                 # optional: None where the image is not a COCO image
    "height": "int64",
    "key": "string",
    "regions": [{"attributes": ["string"], "bbox": ["float64"], "kind": "string", "text": "string"}],
    "source": "string",
    "source_id": "string",
    "width": "int64",
}
# The columns `datasets`' webdataset builder makes of a sample: one per member extension, plus its key and shard.
COLUMNS: dict[str, Any] = {"jpg": "image", "json": SAMPLE_JSON, "txt": "string", "__key__": "string",
                           "__url__": "string"}


def features():
    """COLUMNS as a `datasets.Features` (for `load_dataset("webdataset", ..., features=features())`)."""
    import datasets

    def build(kind: Any):
        if kind == "image":
            return datasets.Image()
        if isinstance(kind, str):
            return datasets.Value(kind)
        if isinstance(kind, dict):
            return {name: build(value) for name, value in kind.items()}
        return [build(kind[0])]

    return datasets.Features({name: build(kind) for name, kind in COLUMNS.items()})


def yaml_features(columns: dict[str, Any] = COLUMNS) -> list[dict[str, Any]]:
    """COLUMNS in the dataset card's `dataset_info.features` notation (what `datasets` writes for the same)."""
    def typed(kind: Any) -> dict[str, Any]:
        if isinstance(kind, str):
            return {"dtype": kind}
        if isinstance(kind, dict):
            return {"struct": yaml_features(kind)}
        inner = kind[0]
        return {"list": inner if isinstance(inner, str) else yaml_features(inner)}

    return [{"name": name, **typed(kind)} for name, kind in columns.items()]


def dataset_card(manifest: Manifest) -> str:
    """README.md of a dataset: YAML front matter (the schema; its shards as the split "train") and what it holds.
    Deterministic: a rebuild writes the same bytes."""
    names = [shard["name"] for shard in manifest.shards]
    prefixes = sorted({parsed[0] for name in names if (parsed := parse_shard_name(name))})
    pattern = f"{prefixes[0]}-*.tar" if len(prefixes) == 1 else "*.tar"
    front = {"dataset_info": {"features": yaml_features()},
             "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": pattern}]}]}
    total = sum(shard["samples"] for shard in manifest.shards)
    images = ", ".join(f"{name} {counts.written.get('image', 0):,}" for name, counts in sorted(manifest.sources.items()))
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n"
            f"# xvlm-pipeline shards (format {manifest.format_version})\n\n"
            f"{total:,} samples in {len(names):,} WebDataset tar shards (images written per source: {images}). Each "
            f"sample: KEY.jpg (RGB JPEG), KEY.json (captions and region / object boxes, `[x, y, w, h]` in the stored "
            f"image's pixels) and KEY.txt (its first text). manifest.json, index.parquet and rejects.parquet describe "
            f"the build (shards/FORMAT.md of xvlm-pipeline).\n\n"
            f"- xvlm's loader (exact resume): `xvlm train` with `data.datasets: [THIS_FOLDER]`\n"
            f"- webdataset: `webdataset.WebDataset(urls).compose(shards.wds_stages.image_text_stage(config))`\n"
            f"- Hugging Face datasets: `datasets.load_dataset(THIS_FOLDER)` (the schema above)\n")


def write_dataset_card(out_dir: str, manifest: Manifest) -> None:
    """README.md beside the shards (before manifest.json, which is written last)."""
    storage.write_text(storage.join(out_dir, CARD_NAME), dataset_card(manifest))
