"""The loader on real shards: `xvlm sample-data` -> the Ray shard build (all four sources) -> MultiGrainedLoader
with the sample data's own WordPiece tokenizer; 2 ranks x 2 workers and exact resume on what the builder wrote."""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_loader_resume import assert_same, take  # noqa: E402

from shards.loader import MultiGrainedLoader  # noqa: E402
from shards.loader_config import OURS, preset  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import ray

    from pipeline.build import BuildConfig, init_ray, run_build
    from sampledata.sample_data import generate

    root = tmp_path_factory.mktemp("built")
    summary = generate(root / "sample", images=40, val_images=10, seed=5, progress=False)

    def path(name):
        p = summary["paths"][name]
        return p if os.path.isabs(p) else str(root / "sample" / p)

    init_ray(None, 1)
    try:
        run_build(BuildConfig(sources={n: path(n) for n in ("coco", "vg", "sbu", "cc")}, out=str(root / "shards"),
                              samples_per_shard=9, progress=False, command=["test"]))
    finally:
        ray.shutdown()   # before the DataLoader forks its workers
    return str(root / "shards"), path("tokenizer")


def config(tokenizer, **overrides):
    return preset("tiny", **{**dict(tokenizer=tokenizer, iter_perc=0.5, shuffle_buffer=8, image_text_batch_size=4,
                                    region_batch_size=6, region_max_images=3), **overrides})


@pytest.mark.parametrize("streams", ["separate", "shared"])
def test_ranks_and_workers_over_built_shards(built, streams):
    path, tokenizer = built
    index = pq.read_table(os.path.join(path, "index.parquet"), columns=["key", "num_captions", "num_regions"])
    index_keys = set(index.column("key").to_pylist())
    runs = []
    for rank in range(2):
        cfg = config(tokenizer, num_workers=2, **(OURS if streams == "shared" else {}))
        loader = MultiGrainedLoader([path], cfg, rank=rank, world_size=2)
        runs.append((len(loader), list(loader), loader.stats()))
    assert runs[0][0] == runs[1][0] == len(runs[0][1]) == len(runs[1][1]) > 0
    assert [b["kind"] for b in runs[0][1]] == [b["kind"] for b in runs[1][1]]
    keys = [k for _, batches, _ in runs for b in batches for k in b["keys"]]
    assert set(keys) <= index_keys
    sources = Counter(s.split("+")[0] for _, batches, _ in runs for b in batches for s in b["sources"])
    assert {"coco", "sbu", "cc"} <= set(sources), sources
    wrapped = sum(stats["wrapped_samples"] + stats.get("region", {}).get("wrapped_samples", 0) for _, _, stats in runs)
    if streams == "shared":
        # repeats happen only through a counted wrap (caption-less VG samples skipped in image-text batches)
        assert len(keys) - len(set(keys)) <= wrapped
    else:
        # an image comes once per caption and region phrase caption in the image-text stream (plus wraps)
        entries = {r["key"]: r["num_captions"] + min(8, r["num_regions"]) for r in index.to_pylist()}
        seen = Counter(k for _, batches, _ in runs for b in batches if b["kind"] == "image_text" for k in b["keys"])
        assert sum(max(0, n - entries[key]) for key, n in seen.items()) <= wrapped
        assert any(n > 1 for n in seen.values())
    for _, batches, _ in runs:
        for b in batches:
            if b["kind"] == "region":
                rows = ~b["is_image"]
                assert ((b["target_bbox"][rows] >= 0) & (b["target_bbox"][rows] <= 1)).all()
                assert (b["patch_mask"][rows].sum(1) >= 1).all()
            assert torch.isfinite(b["image"]).all()


def test_exact_resume_on_built_shards(built):
    path, tokenizer = built
    cfg = config(tokenizer, num_workers=2)
    reference = take(MultiGrainedLoader([path], cfg), 12)
    first = MultiGrainedLoader([path], cfg)
    take(first, 5)
    resumed = MultiGrainedLoader([path], cfg)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(take(resumed, 7), reference[5:]):
        assert_same(a, b)


def test_recipe_statistics_on_built_shards(built):
    """X-VLM's recipe on what the builder wrote (COCO, VG, COCO+VG, SBU, CC): the image-text epoch walks every
    (image, caption) pair and up to 8 region phrases per image as captions; region batches draw region_max_images
    images and keep region_batch_size of their pooled rows; the anchor is not privileged."""
    import numpy as np

    from shards.samples import region_sample
    from shards.tar_stream import iter_range

    path, tokenizer = built
    index = pq.read_table(os.path.join(path, "index.parquet"),
                          columns=["key", "num_captions", "num_regions"]).to_pylist()
    entries = {r["key"]: r["num_captions"] + min(8, r["num_regions"]) for r in index}
    loader = MultiGrainedLoader([path], config(tokenizer, iter_perc=0.0, shuffle_buffer=64))
    plan = loader.plan()
    assert plan.total == sum(entries.values())
    seen = Counter(k for b in loader for k in b["keys"])
    assert all(seen[key] <= n for key, n in entries.items()) and not set(seen) - set(entries)
    assert sum(seen.values()) == len(loader) * 4 and sum(seen.values()) > 0.8 * plan.total
    coco = [key for key, r in zip(entries, index) if r["num_captions"] == 5 and r["num_regions"] == 0]
    assert coco and np.mean([seen[key] for key in coco]) > 4      # a COCO image once per caption

    cfg = config(tokenizer, iter_perc=1.0, region_batch_size=16, region_max_images=6, max_regions=5)
    region = [b for b in take(MultiGrainedLoader([path], cfg), 12) if b["kind"] == "region"]
    assert region and all(b["drawn_images"] == 6 and b["text_ids"].shape[0] == 16 for b in region)
    assert all(1 <= b["image"].shape[0] <= 6 and b["image_idx"].max() == b["image"].shape[0] - 1 for b in region)

    ds = loader.datasets[0]
    items = [item for shard in ds.shards for item in iter_range(shard, 0, shard.samples)]
    anchor_rows = {True: Counter(), False: Counter()}
    for anchor_first in anchor_rows:
        sample_cfg = cfg.replace(region_anchor_first=anchor_first)
        for n, item in enumerate(items):
            try:
                s = region_sample(item.files["jpg"], item.files["json"], np.random.default_rng(n), sample_cfg)
            except Exception:   # no usable box: not a region entry
                continue
            first_box = int(s["is_image"].sum())              # the row after the caption, if any
            anchor_rows[anchor_first]["first" if s["anchor_row"] == first_box else
                                      "cut" if s["anchor_row"] < 0 else "later"] += 1
    print(f"\nanchor row on built shards: X-VLM {dict(anchor_rows[False])}, region_anchor_first {dict(anchor_rows[True])}; "
          f"images per pooled batch {[b['image'].shape[0] for b in region]}")
    assert set(anchor_rows[True]) == {"first"}
    assert anchor_rows[False]["later"] > 0.2 * sum(anchor_rows[False].values())
