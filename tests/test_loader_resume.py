"""Exact mid-epoch resume: a restored loader yields the very batches (keys, pixels, boxes, masks, token ids) of an
uninterrupted run, with 0 and 2 workers, across the epoch boundary (and the region stream's own epoch boundary),
without decoding what was consumed; for X-VLM's separate streams (the default) and our shared stream."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402
from test_loader_split import TOKENIZER  # noqa: E402

from shards import samples  # noqa: E402
from storage.errors import XvlmError  # noqa: E402
from shards.loader import MultiGrainedLoader  # noqa: E402
from shards.loader_config import OURS, preset  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return shardkit.make_dataset(str(tmp_path_factory.mktemp("resume")), samples=60, per_shard=16,
                                 sources=("coco", "vg"))


def config(**overrides):
    base = dict(tokenizer=TOKENIZER, iter_perc=0.5, shuffle_buffer=6, image_text_batch_size=4,
                region_batch_size=6, region_max_images=3)
    return preset("tiny", **{**base, **overrides})


def take(loader, n):
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], torch.Tensor):
            assert torch.equal(a[name], b[name]), name
        elif name != "skips":
            assert a[name] == b[name], name


@pytest.mark.parametrize("streams", ["separate", "shared"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(dataset, workers, streams):
    cfg = config(num_workers=workers, **(OURS if streams == "shared" else {}))
    reference = MultiGrainedLoader([dataset], cfg)
    per_epoch = len(reference)
    n, m = per_epoch // 2 + 1, per_epoch   # stop mid-epoch, then run on into the next epoch
    expected = take(reference, n + m)
    assert {b["kind"] for b in expected} == {"image_text", "region"}

    first = MultiGrainedLoader([dataset], cfg)
    head = take(first, n)
    state = json.loads(json.dumps(first.state_dict()))   # a checkpoint stores it as plain data
    for a, b in zip(head, expected[:n]):
        assert_same(a, b)

    resumed = MultiGrainedLoader([dataset], cfg)
    resumed.load_state_dict(state)
    start = time.perf_counter()
    tail = take(resumed, m)
    print(f"\nresume at batch {n}/{per_epoch} with {workers} workers: {m} batches in "
          f"{time.perf_counter() - start:.2f}s")
    for a, b in zip(tail, expected[n:]):
        assert_same(a, b)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_across_the_region_streams_own_epochs(dataset, workers):
    """The region stream restarts on its own when exhausted (X-VLM); a resume at any point, also right after
    that restart and in the middle of an iteration (region batch handed out, image-text batch not), continues
    exactly. Region workers may differ from the image-text workers."""
    cfg = config(num_workers=workers, region_num_workers=1, iter_perc=1.0, region_max_images=10,
                 region_entries="image")
    reference = MultiGrainedLoader([dataset], cfg)
    region_epoch_len = len(reference._streams["region"])
    per_epoch = len(reference)
    assert region_epoch_len < per_epoch // 2        # the region stream ends inside the first epoch
    expected = take(reference, per_epoch + 3)
    assert reference.stats()["region"]["epoch"] >= 1
    for n in (1, 2 * region_epoch_len, 2 * region_epoch_len + 1, per_epoch - 1, per_epoch + 1):
        first = MultiGrainedLoader([dataset], cfg)
        take(first, n)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = MultiGrainedLoader([dataset], cfg)
        resumed.load_state_dict(state)
        for a, b in zip(take(resumed, len(expected) - n), expected[n:]):
            assert_same(a, b)


def test_resume_decodes_only_what_follows(dataset, monkeypatch):
    cfg = config(num_workers=0)
    first = MultiGrainedLoader([dataset], cfg)
    per_epoch = len(first)
    take(first, per_epoch // 2)
    state = first.state_dict()
    built = []
    for name in ("image_text_sample", "region_sample"):
        original = getattr(samples, name)
        monkeypatch.setattr(samples, name, lambda *a, _f=original, **k: built.append(1) or _f(*a, **k))
    resumed = MultiGrainedLoader([dataset], cfg)
    resumed.load_state_dict(state)
    start = time.perf_counter()
    first_batch = next(iter(resumed))
    elapsed = time.perf_counter() - start
    # exactly the images of that one batch were decoded (the fixture has no skips)
    assert len(built) == first_batch.get("drawn_images", first_batch["image"].shape[0])
    print(f"\nresume at batch {per_epoch // 2}/{per_epoch}: first batch after {elapsed * 1000:.0f} ms")


@pytest.mark.parametrize("streams", ["separate", "shared"])
def test_resume_refuses_another_world_size_or_worker_count(dataset, streams):
    ours = OURS if streams == "shared" else {}
    cfg = config(num_workers=0, **ours)
    loader = MultiGrainedLoader([dataset], cfg, rank=0, world_size=2)
    take(loader, 1)
    state = loader.state_dict()
    with pytest.raises(XvlmError, match="world_size 2.*has 1"):
        MultiGrainedLoader([dataset], cfg).load_state_dict(state)
    with pytest.raises(XvlmError, match="worker"):
        MultiGrainedLoader([dataset], config(num_workers=2, **ours), rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(XvlmError, match="rank 0"):
        MultiGrainedLoader([dataset], cfg, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(XvlmError, match="seed"):
        MultiGrainedLoader([dataset], config(seed=1, **ours), rank=0, world_size=2).load_state_dict(state)
    other = {} if streams == "shared" else OURS
    with pytest.raises(XvlmError, match="streams"):
        MultiGrainedLoader([dataset], config(**other), rank=0, world_size=2).load_state_dict(state)
    if streams == "separate":
        with pytest.raises(XvlmError, match="iter_perc 0.5"):
            MultiGrainedLoader([dataset], config(iter_perc=0.3), rank=0, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_keeps_samples_waiting_for_the_other_batch_kind(tmp_path, workers):
    # the shared stream (ours): vg samples have no caption, image-text batches leave them to the next region batch
    path = shardkit.make_dataset(str(tmp_path / "d"), samples=60, per_shard=16, sources=("coco", "vg"),
                                 captionless=("vg",))
    cfg = config(num_workers=workers, **OURS)
    reference = MultiGrainedLoader([path], cfg)
    per_epoch = len(reference)
    expected = take(reference, per_epoch)
    for batch in expected:
        if batch["kind"] == "image_text":
            assert all(s == "coco" for s in batch["sources"])
    assert any(s == "vg" for b in expected if b["kind"] == "region" for s in b["sources"])

    first = MultiGrainedLoader([path], cfg)
    states = []
    for n, _ in enumerate(first, start=1):
        states.append((n, json.loads(json.dumps(first.state_dict()))))
    # resume from a state in which some samples were waiting
    waiting = [(n, s) for n, s in states if any(w["deferred"] for w in s["workers"]) and n < per_epoch]
    assert waiting, "the fixture never deferred a sample"
    n, state = waiting[len(waiting) // 2]
    resumed = MultiGrainedLoader([path], cfg)
    resumed.load_state_dict(state)
    for a, b in zip(take(resumed, per_epoch - n), expected[n:]):
        assert_same(a, b)
