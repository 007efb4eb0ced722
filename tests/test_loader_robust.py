"""Damaged data never stops training: a corrupt sample and a truncated shard mid-stream are skipped and counted,
batch counts stay as planned; broken datasets fail before training with a clear XvlmError."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402
from test_loader_split import TOKENIZER  # noqa: E402

from shards.dataset import open_dataset  # noqa: E402
from storage.errors import XvlmError  # noqa: E402
from shards.loader import MultiGrainedLoader  # noqa: E402
from shards.loader_config import OURS, preset  # noqa: E402
from shards.tar_stream import CORRUPT, TRUNCATED, RawSample, Skipped, iter_range  # noqa: E402


def damaged(tmp_path):
    path = shardkit.make_dataset(str(tmp_path / "d"), samples=48, per_shard=12)
    ds = open_dataset(path)
    shardkit.corrupt_member(path, "shard-000000.tar", ds.shards[0].keys[3], "jpg")   # undecodable image
    shardkit.corrupt_header(path, "shard-000001.tar", ds.shards[1].keys[5], "json")  # broken tar header
    shardkit.truncate_shard(path, "shard-000002.tar", 0.5)                           # cut-off upload
    return path, ds


def test_tar_stream_skips_and_reopens_at_the_next_sample(tmp_path):
    _, ds = damaged(tmp_path)
    header = list(iter_range(ds.shards[1], 0, 12))
    assert [type(x) for x in header] == [RawSample] * 5 + [Skipped] + [RawSample] * 6
    assert header[5].reason == CORRUPT and [x.index for x in header] == list(range(12))
    cut = list(iter_range(ds.shards[2], 2, 10))
    reasons = [x.reason for x in cut if isinstance(x, Skipped)]
    assert reasons and set(reasons) == {TRUNCATED} and isinstance(cut[0], RawSample)
    assert [x.index for x in cut] == list(range(2, 12))


def worker_states(loader: MultiGrainedLoader) -> list[dict]:
    """The per-worker positions of the loader's state (of the image-text stream when streams are separate)."""
    state = loader.state_dict()
    return state["workers"] if "workers" in state else state["stream_states"]["image_text"]["workers"]


@pytest.mark.parametrize("streams", ["separate", "shared"])
@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_samples_are_skipped_counted_and_training_goes_on(tmp_path, workers, streams, caplog):
    path, ds = damaged(tmp_path)
    config = preset("tiny", tokenizer=TOKENIZER, iter_perc=0.0, shuffle_buffer=5, num_workers=workers,
                    image_text_batch_size=4, **(OURS if streams == "shared" else {}))
    loader = MultiGrainedLoader([path], config)
    planned = len(loader)
    with caplog.at_level(logging.WARNING, logger="shards.loader"):
        batches = list(loader)
    assert len(batches) == planned
    skips = batches[-1]["skips"]
    truncated = sum(ds.shards[2].end_offset(i) > os.path.getsize(os.path.join(path, "shard-000002.tar"))
                    for i in range(12))
    assert skips["corrupt_image"] >= 1 and skips[CORRUPT] >= 1 and skips[TRUNCATED] >= truncated
    assert set(skips) == {"corrupt_image", CORRUPT, TRUNCATED}
    keys = [k for b in batches for k in b["keys"]]
    assert ds.shards[0].keys[3] not in keys and ds.shards[1].keys[5] not in keys
    # every slot read is either in a batch or a counted skip; a worker short of good samples wraps into its
    # slice again (counted) rather than yield fewer batches
    assert len(keys) == planned * 4
    workers_state = worker_states(loader)
    length = loader.plan().slice_len
    assert sum(w["slot"] for w in workers_state) == len(keys) + sum(skips.values())
    assert loader.stats()["wrapped_samples"] == sum(max(0, w["slot"] - length) for w in workers_state) > 0
    assert sum("skipped" in r.message for r in caplog.records) <= 2   # rate-limited, not one line per skip


def test_missing_dataset(tmp_path):
    with pytest.raises(XvlmError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"))


def test_unfinished_dataset(tmp_path):
    path = shardkit.make_dataset(str(tmp_path / "d"), samples=4, per_shard=4)
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(XvlmError, match="did not finish"):
        MultiGrainedLoader([path], preset("tiny", tokenizer=TOKENIZER))


def test_empty_dataset(tmp_path):
    path = shardkit.make_dataset(str(tmp_path / "d"), samples=0, per_shard=4)
    with pytest.raises(XvlmError, match="is empty"):
        MultiGrainedLoader([path], preset("tiny", tokenizer=TOKENIZER))


def test_other_format_version(tmp_path):
    path = shardkit.make_dataset(str(tmp_path / "d"), samples=4, per_shard=4, format_version="2.0")
    with pytest.raises(XvlmError, match="format version 2.0"):
        MultiGrainedLoader([path], preset("tiny", tokenizer=TOKENIZER))


def test_too_little_data_for_the_slices(tmp_path):
    path = shardkit.make_dataset(str(tmp_path / "d"), samples=6, per_shard=4)
    with pytest.raises(XvlmError, match="fewer than one batch"):
        len(MultiGrainedLoader([path], preset("tiny", tokenizer=TOKENIZER), rank=0, world_size=2))


def test_data_that_cannot_fill_a_batch_kind_fails_clearly_instead_of_looping(tmp_path):
    path = shardkit.make_dataset(str(tmp_path / "d"), samples=24, per_shard=8, sources=("vg",), captionless=("vg",))
    # the shared stream (ours) finds out while reading
    loader = MultiGrainedLoader([path], preset("tiny", tokenizer=TOKENIZER, iter_perc=0.0, image_text_batch_size=4,
                                               **OURS))
    with pytest.raises(XvlmError, match="without one usable for a image-text batch.*iter_perc"):
        list(loader)
    # separate streams know it from the index, before the first batch (without region phrases as captions)
    loader = MultiGrainedLoader([path], preset("tiny", tokenizer=TOKENIZER, iter_perc=0.5, image_text_batch_size=4,
                                               phrase_captions=0))
    with pytest.raises(XvlmError, match="no image-text entries"):
        len(loader)
    for streams in ({}, OURS):
        regions_only = MultiGrainedLoader([path], preset("tiny", tokenizer=TOKENIZER, iter_perc=1.0, region_batch_size=4,
                                                         region_max_images=2, **{**streams,
                                                                                 "iter_perc_mode": "per_batch"}))
        assert all(b["kind"] == "region" for b in regions_only) and len(regions_only) > 0
    coco = shardkit.make_dataset(str(tmp_path / "c"), samples=24, per_shard=8, sources=("coco",))
    no_boxes = str(tmp_path / "nb")
    shardkit.make_dataset(no_boxes, samples=24, per_shard=8, sources=("sbu",), boxless=("sbu",))
    assert len(MultiGrainedLoader([coco], preset("tiny", tokenizer=TOKENIZER))) > 0
    with pytest.raises(XvlmError, match="no region entries.*iter_perc to 0"):
        len(MultiGrainedLoader([no_boxes], preset("tiny", tokenizer=TOKENIZER, region_batch_size=4)))
