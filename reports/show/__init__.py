"""`xvlm show`: draw dataset samples to PNG with their boxes and texts — as stored in the shards, and with
`--augmented` as the loader delivers them (crop, flip with left/right swapped texts, resize), so a user can see
that boxes stay on their objects. A sample is found through index.parquet (shard + byte offset) and only its tar
members are read. The parts: draw.py (boxes and text panel), read.py (finding and reading samples), views.py
(stored and augmented views).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

import storage
from reports.show.draw import LINE_WIDTH, MIN_SIDE, PALETTE, PANEL_WIDTH, DrawnBox, box_colour, draw_sample, scale_factor
from reports.show.read import ShardSample, find_rows, read_sample
from reports.show.views import augmented_views, raw_view, region_boxes, tensor_to_image
from shards.manifest import read_dataset_manifest
from storage.errors import XvlmError

__all__ = ["LINE_WIDTH", "MIN_SIDE", "PALETTE", "PANEL_WIDTH", "DrawnBox", "box_colour", "draw_sample",
           "scale_factor", "ShardSample", "find_rows", "read_sample", "augmented_views", "raw_view", "region_boxes",
           "tensor_to_image", "ShowOptions", "show"]


@dataclass
class ShowOptions:
    dataset: str
    keys: list[str]
    random: int = 0
    augmented: bool = False
    out: str = "show"
    seed: int = 0
    tokenizer: str | None = None
    preset: str = "base"
    image_res: int | None = None

    def __post_init__(self) -> None:
        if bool(self.keys) == bool(self.random):
            raise XvlmError("give sample KEY(s) or --random N (one of the two)")
        if self.random < 0:
            raise XvlmError(f"--random must be positive, got {self.random}")
        if self.augmented and not self.tokenizer:
            raise XvlmError("--augmented needs --tokenizer DIR (the BERT WordPiece folder the loader uses, e.g. "
                            "OUT/tokenizer of `xvlm sample-data`): the loader's samples carry token ids")

    def loader_config(self):
        from shards.loader_config import preset

        overrides = {"tokenizer": self.tokenizer or ""}
        if self.image_res:
            overrides["image_res"] = self.image_res
        return preset(self.preset, **overrides)


def show(options: ShowOptions) -> list[str]:
    """Write the PNGs; returns the paths written (and logs why a view was not possible)."""
    manifest = read_dataset_manifest(options.dataset)   # refuses an unfinished, foreign or damaged dataset
    config = options.loader_config() if options.augmented else None
    rows = find_rows(manifest, options.keys or None, options.random, options.seed)
    storage.makedirs(options.out)
    written, failed = [], []
    for row in rows:
        try:   # a damaged sample is reported and the others are still drawn
            sample = read_sample(manifest, row)
            views: dict[str, Image.Image | str] = {"": raw_view(sample)}
        except XvlmError as err:
            print(f"{row['key']}: not drawn: {err}")
            failed.append(f"{row['key']} ({err})")
            continue
        if config is not None:
            views.update({f".{k}": v for k, v in augmented_views(sample, config, options.seed).items()})
        for suffix, view in views.items():
            if isinstance(view, str):
                print(f"{sample.key}: {view}")
                continue
            path = storage.join(options.out, f"{sample.key}{suffix}.png")
            buf = io.BytesIO()
            view.save(buf, format="PNG")
            storage.write_bytes(path, buf.getvalue())
            written.append(path)
    if failed:
        raise XvlmError(f"{len(failed)} of {len(rows)} sample(s) could not be drawn: {'; '.join(failed)[:600]}; "
                        f"run `xvlm verify {manifest.path}`")
    return written
