"""Random in-memory batches in the loader's layout, mixed by iter_perc, with the loader's state_dict interface.

For benchmarks (the trainer against a bare loop over the same batches) and smoke runs without shards
(`data.synthetic=true`). The kinds follow iter_perc_mode as the loader's plan does: with "xvlm" iteration i is a
region batch with probability iter_perc (a hash of (seed, i)) followed by an image-text batch; with "per_batch"
batch i is a region batch with that probability. Every rank agrees on them.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Iterator

import torch

from model.synthetic import image_text_batch, region_batch


def region_step(seed: int, index: int, iter_perc: float) -> bool:
    """True when batch `index` of the plan is a region batch, with probability iter_perc (as the loader's plan)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2.0 ** 64
    return u < iter_perc


class SyntheticStream:
    """Cycles through `pool` pre-built batches of each kind; batch i's kind follows `region_step`."""

    def __init__(self, *, image_res: int, grid: int, vocab_size: int, max_tokens: int, max_masks: int,
                 image_text_batch_size: int, region_batch_size: int, region_max_images: int, iter_perc: float,
                 seed: int, rank: int = 0, pool: int = 4, iter_perc_mode: str = "xvlm") -> None:
        self.seed = seed
        self.iter_perc = iter_perc
        self.iter_perc_mode = iter_perc_mode
        self.index = 0          # batches handed out (per_batch) or iterations begun (xvlm)
        self.region_done = False  # xvlm: the region batch of iteration `index` was handed out
        generator = torch.Generator().manual_seed(seed * 1000 + rank)
        # At most region_max_images images (the loader's bound, which padded batches rely on), at least 2.
        rows_per_image = max(1, math.ceil(region_batch_size / max(1, region_max_images)))
        images = max(2, region_batch_size // rows_per_image)
        self.pools: dict[str, list[dict[str, Any]]] = {"image_text": [], "region": []}
        for _ in range(pool):
            batch = image_text_batch(image_text_batch_size, image_res, vocab_size, max_tokens, max_masks, generator)
            self.pools["image_text"].append({"kind": "image_text", **batch})
            batch = region_batch(images, rows_per_image, image_res, grid, vocab_size, max_tokens, max_masks,
                                 generator=generator)
            self.pools["region"].append({"kind": "region", **batch})

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            region = region_step(self.seed, self.index, self.iter_perc)
            if self.iter_perc_mode == "xvlm":
                if region and not self.region_done:
                    self.region_done = True
                    yield self.pools["region"][self.index % len(self.pools["region"])]
                    continue
                region = False
            pool = self.pools["region" if region else "image_text"]
            batch = pool[self.index % len(pool)]
            self.index += 1
            self.region_done = False
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "region_done": self.region_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])
        self.region_done = bool(state.get("region_done", False))
