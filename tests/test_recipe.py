"""X-VLM's recipe, pinned (docs/fidelity.md, "Recipe: data, text, schedule"): the share of region steps that
Pretrain.py's iter_perc gives, the image-text stream's walk over (image, caption) pairs, the region batches of
RegionTextJsonDataset.collate_fn (images, rows, no privileged anchor), and the switches that bring back ours."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402
from test_loader_split import TOKENIZER  # noqa: E402

from shards.collate import pooled_rows  # noqa: E402
from shards.loader import MultiGrainedLoader  # noqa: E402
from shards.loader_config import OURS, preset  # noqa: E402
from shards.plan import iteration_kinds, kind_sequence  # noqa: E402
from shards.samples import region_sample  # noqa: E402
from shards.tar_stream import iter_range  # noqa: E402
from shards.text import load_vocab  # noqa: E402

# X-VLM 4M: 41 epochs of ceil(5,114,489 / (128 x 8)) = 4,995 image-text iterations (Pretrain.py, the config)
EPOCHS, ITERATIONS = 41, 4_995


# ---------------------------------------------------------------------------------------------- iter_perc


def test_region_steps_are_a_third_of_optimizer_steps_at_iter_perc_half():
    """Pretrain.py: each iteration is one image-text step, preceded with probability iter_perc by a region step.
    Over the whole 4M schedule (204,795 iterations) at 0.5: 1/3 of the optimizer steps are region steps."""
    config = preset("tiny", iter_perc=0.5)
    regions = steps = 0
    for epoch in range(EPOCHS):
        kinds = iteration_kinds(config, epoch, ITERATIONS)
        assert int((~kinds).sum()) == ITERATIONS and not kinds[-1]           # the epoch ends an iteration
        assert not (kinds[:-1] & kinds[1:]).any()                            # a region step never follows one
        regions += int(kinds.sum())
        steps += len(kinds)
    assert steps - regions == EPOCHS * ITERATIONS == 204_795
    assert regions / steps == pytest.approx(1 / 3, abs=0.01)
    assert regions / (EPOCHS * ITERATIONS) == pytest.approx(0.5, abs=0.01)  # region steps per iteration
    # our per-batch mode: half of all batches; the shared stream's plan uses the same sequences
    ours = preset("tiny", iter_perc=0.5, iter_perc_mode="per_batch")
    assert iteration_kinds(ours, 0, 100_000).mean() == pytest.approx(0.5, abs=0.01)
    assert kind_sequence(config, 0, 300_000).mean() == pytest.approx(1 / 3, abs=0.01)
    assert kind_sequence(ours, 0, 300_000).mean() == pytest.approx(0.5, abs=0.01)
    # other shares: p / (1 + p)
    for p in (0.2, 1.0):
        kinds = iteration_kinds(preset("tiny", iter_perc=p), 3, 50_000)
        assert kinds.mean() == pytest.approx(p / (1 + p), abs=0.01)


def test_the_kind_sequence_is_the_same_on_every_rank_and_seeded():
    config = preset("tiny", iter_perc=0.5)
    a = iteration_kinds(config, 7, 1000)
    assert np.array_equal(a, iteration_kinds(config, 7, 1000))
    assert not np.array_equal(a, iteration_kinds(config, 8, 1000))
    assert not np.array_equal(a, iteration_kinds(config.replace(seed=1), 7, 1000))


# ---------------------------------------------------------------------------------------------- image-text walk


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """COCO-like images with 5 captions and object boxes, SBU-like with 1 caption and no box, VG-like with a region
    phrase and an object box and no caption."""
    return shardkit.make_dataset(str(tmp_path_factory.mktemp("corpus")), samples=72, per_shard=10,
                                 sources=("coco", "sbu", "vg"), captions={"coco": 5}, captionless=("vg",),
                                 boxless=("sbu",), objects_only=("coco",))


def test_the_image_text_stream_walks_every_caption_once_per_epoch(corpus):
    """ALBEF's 4M files (X-VLM's train_file) hold one line per (image, caption) pair: an epoch of the image-text
    stream is one pass over the pairs, so a COCO image comes 5 times, each time with another caption; VG images come
    with their region phrases as captions (ALBEF's VG captions), here one each. 2 ranks x 2 workers, iter_perc 0:
    the image-text stream alone."""
    pairs, batches_per_rank = [], []
    for rank in range(2):
        loader = MultiGrainedLoader([corpus], preset("tiny", tokenizer=TOKENIZER, iter_perc=0.0, num_workers=2,
                                                     image_text_batch_size=4, shuffle_buffer=16, swap_left_right=False,
                                                     max_words=40, max_tokens=40),
                                    rank=rank, world_size=2)
        plan = loader.plan()
        assert plan.total == 24 * 5 + 24 + 24 and plan.dropped == plan.total - 4 * plan.slice_len
        batches = list(loader)
        batches_per_rank.append(len(batches))
        tokenizer = load_vocab(TOKENIZER).tokenizer
        for batch in batches:
            texts = tokenizer.batch_decode(batch["text_ids"], skip_special_tokens=True)
            pairs += list(zip(batch["keys"], texts))
    assert batches_per_rank[0] == batches_per_rank[1]
    counts = Counter(pairs)
    assert max(counts.values()) == 1                        # no (image, caption) pair twice in an epoch
    per_image = Counter(key for key, _ in pairs)
    coco = [n for key, n in per_image.items() if key.startswith("coco")]
    sbu = [n for key, n in per_image.items() if key.startswith("sbu")]
    vg = {key: n for key, n in per_image.items() if key.startswith("vg")}
    assert max(sbu) == 1 and max(coco) == 5 and sum(coco) > 4 * len(coco)   # all 5 captions of nearly every image
    assert len(vg) > 20 and max(vg.values()) == 1
    assert all(" on the left" in text for key, text in pairs if key.startswith("vg"))   # the phrase, not a caption
    # without phrase captions: no VG image; ours ("image" entries): one entry per image, a caption drawn at random
    no_phrases = MultiGrainedLoader([corpus], preset("tiny", tokenizer=TOKENIZER, iter_perc=0.0,
                                                     image_text_batch_size=4, phrase_captions=0))
    assert no_phrases.plan().total == 24 * 5 + 24
    assert not any(k.startswith("vg") for batch in no_phrases for k in batch["keys"])
    loader = MultiGrainedLoader([corpus], preset("tiny", tokenizer=TOKENIZER, iter_perc=0.0,
                                                 image_text_batch_size=4, image_text_entries="image"))
    keys = [k for batch in loader for k in batch["keys"]]
    assert loader.plan().total == 48 and max(Counter(keys).values()) == 1


def test_both_streams_see_a_coco_image_in_one_epoch(corpus):
    """Two independent streams (Pretrain.py's general_loader and region_loader): an image with captions and boxes
    serves image-text batches and region batches in the same epoch; the region stream walks one entry per image
    and box kind (X-VLM's coco_objs / vg_objs / vg_regions files)."""
    config = preset("tiny", tokenizer=TOKENIZER, iter_perc=1.0, image_text_batch_size=4, region_max_images=4,
                    region_batch_size=8)
    loader = MultiGrainedLoader([corpus], config)
    seen = {"image_text": set(), "region": Counter()}
    for batch in loader:
        if batch["kind"] == "image_text":
            seen["image_text"].update(batch["keys"])
        else:
            seen["region"].update(batch["keys"])
    both = seen["image_text"] & set(seen["region"])
    assert any(key.startswith("coco") for key in both)
    assert not any(key.startswith("sbu") for key in seen["region"])      # no box, no region entry
    assert loader.plan(stream="region").total == 24 + 2 * 24            # coco objects; vg objects and phrases
    # ours: the shared stream hands each image to one batch kind per epoch
    shared = MultiGrainedLoader([corpus], config.replace(**OURS, iter_perc=0.5))
    kinds_of: dict[str, set] = {}
    for batch in shared:
        for key in batch["keys"]:
            kinds_of.setdefault(key, set()).add(batch["kind"])
    # (only a worker that wraps into its slice again, after skips, can meet an image a second time)
    assert sum(len(kinds) > 1 for kinds in kinds_of.values()) <= shared.stats()["wrapped_samples"]
    assert len(both) > shared.stats()["wrapped_samples"]


# ---------------------------------------------------------------------------------------------- region batches


def test_pooled_rows_as_collate_fn():
    rng = np.random.default_rng(0)
    enough = pooled_rows(200, 128, rng)
    assert len(enough) == 128 == len(set(enough.tolist())) and enough.max() < 200
    short = pooled_rows(100, 128, rng)                      # all 100, plus 28 of them again
    assert set(short.tolist()) == set(range(100)) and len(short) == 128
    assert max(Counter(short.tolist()).values()) == 2
    tiny = pooled_rows(30, 128, rng)                        # fewer than half: all of them repeated
    assert Counter(tiny.tolist()) == Counter(list(range(30)) * 4 + list(range(8)))


def region_batches(dataset, **overrides):
    config = preset("tiny", tokenizer=TOKENIZER, iter_perc=1.0, iter_perc_mode="per_batch", shuffle_buffer=16,
                    **{"region_batch_size": 8, "region_max_images": 4, "max_regions": 4, **overrides})
    return [b for b in MultiGrainedLoader([dataset], config) if b["kind"] == "region"]


def test_region_batch_statistics(tmp_path):
    """X-VLM: region_max_images images per batch, their rows pooled and region_batch_size of them kept; ours
    (packed): images until the rows are filled, so more images and the rows of each image together."""
    path = shardkit.make_dataset(str(tmp_path / "d"), samples=64, per_shard=16, sources=("coco", "vg"))
    xvlm = region_batches(path, region_entries="image")
    assert xvlm and all(b["drawn_images"] == 4 and b["text_ids"].shape[0] == 8 for b in xvlm)
    # 4 images x (caption + 2 boxes) = 12 coco rows or 8 vg-like rows for 8 slots: some images lose rows
    rows_per_image = Counter(n for b in xvlm for n in torch.bincount(b["image_idx"]).tolist())
    assert min(rows_per_image) >= 1 and max(rows_per_image) <= 3
    assert np.mean([b["image"].shape[0] for b in xvlm]) > 3.5
    packed = region_batches(path, region_entries="image", region_batching="packed")
    assert all(b["text_ids"].shape[0] <= 8 and b["image"].shape[0] <= 4 for b in packed)
    # packed takes images whole until the rows run out: the last one may be cut, the others complete
    assert all(torch.equal(b["image_idx"], b["image_idx"].sort().values) for b in packed)


def test_no_row_is_privileged(tmp_path):
    """X-VLM puts the whole-image caption first, then the boxes inside the crop in random order: the anchor is the
    first box row only by chance, and max_regions may leave it out. Ours (region_anchor_first) always puts it first."""
    path = shardkit.make_dataset(str(tmp_path / "d"), samples=24, per_shard=24, sources=("coco",))
    shard = MultiGrainedLoader([path], preset("tiny", tokenizer=TOKENIZER)).datasets[0].shards[0]
    items = [item for item in iter_range(shard, 0, shard.samples)]
    # many boxes per image, so that several lie inside the crop
    metas = []
    for item in items:
        meta = json.loads(item.files["json"])
        meta["regions"] = meta["regions"] + [dict(r, bbox=[0, 0, 96, 72]) for r in meta["regions"]] * 2
        metas.append((item.files["jpg"], meta))
    first = {}
    for anchor_first in (False, True):
        config = preset("tiny", tokenizer=TOKENIZER, max_regions=3, region_anchor_first=anchor_first)
        rows = []
        for seed in range(10):
            for jpg, meta in metas:
                sample = region_sample(jpg, meta, np.random.default_rng(seed), config)
                rows.append(sample["anchor_row"])
        counts = Counter(rows)
        first[anchor_first] = counts[1] / len(rows)              # row 0 is the caption
        if not anchor_first:
            assert counts[-1] > 0                                # cut by max_regions
    assert first[True] == 1.0 and first[False] < 0.6


def test_phrase_captions_are_the_largest_distinct_phrases():
    from shards.samples import phrase_captions

    meta = {"captions": [], "regions": [
        {"bbox": [0, 0, 10, 10], "text": "a small cup", "kind": "region"},
        {"bbox": [0, 0, 90, 90], "text": "The big table.", "kind": "region"},
        {"bbox": [0, 0, 50, 50], "text": "the big table", "kind": "region"},        # the same text again
        {"bbox": [0, 0, 99, 99], "text": "chair", "kind": "object"},                # objects are no captions
        {"bbox": [0, 0, 40, 40], "text": "a green wall", "kind": "region"},
        {"bbox": [0, 0, 40, 40], "text": "...", "kind": "region"}]}                 # empty after pre_caption
    config = preset("tiny", phrase_captions=8)
    assert phrase_captions(meta, config) == ["the big table", "a green wall", "a small cup"]
    assert phrase_captions(meta, config.replace(phrase_captions=2)) == ["the big table", "a green wall"]
