"""Read-ahead: the next shuffle block is read in a background thread while the current one is decoded (by default
for datasets on S3; forced on here for local ones). The batches are exactly those of a loader without it (also
across a mid-epoch resume), the later blocks' reads happen in that thread, and the thread ends with the iterator.
The thread only moves bytes: parsing stays in the reader's thread, and a range the thread cannot read whole (a
truncated shard, a failing read) is read again where it is reached, with the damage counted exactly as without
read-ahead. tests/test_loader_s3.py checks the default on S3."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402
from test_loader_resume import config as resume_config  # noqa: E402
from test_loader_robust import damaged  # noqa: E402
from test_loader_split import TOKENIZER  # noqa: E402

from shards import slots as slots_module  # noqa: E402
import storage  # noqa: E402
from storage.errors import XvlmError  # noqa: E402
from shards.loader import MultiGrainedLoader, ReadAhead  # noqa: E402
from shards.loader_config import preset  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return shardkit.make_dataset(str(tmp_path_factory.mktemp("ahead")), samples=60, per_shard=16,
                                 sources=("coco", "vg"))


def config(**overrides):
    return resume_config(**{"shuffle_buffer": 7, "read_ahead": True, **overrides})


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["kind"] == y["kind"] and x["keys"] == y["keys"]
        for name, value in x.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, y[name]), name


def read_ahead_threads():
    return [t for t in threading.enumerate() if t.name == "xvlm-read-ahead"]


@pytest.mark.parametrize("workers", [0, 2])
def test_same_batches_with_and_without_read_ahead(dataset, workers):
    on = list(MultiGrainedLoader([dataset], config(num_workers=workers)))
    off = list(MultiGrainedLoader([dataset], config(num_workers=workers, read_ahead=False)))
    assert_same_batches(on, off)


def test_resume_mid_block_with_read_ahead(dataset):
    """A restore lands inside a shuffle block (read partly, in the reader's own thread); the blocks after it come
    from the read-ahead: the batches still equal an uninterrupted run's."""
    whole = list(MultiGrainedLoader([dataset], config(read_ahead=False)))
    first = MultiGrainedLoader([dataset], config())
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    it.close()
    second = MultiGrainedLoader([dataset], config())
    second.load_state_dict(state)
    assert_same_batches(list(second), whole[3:])


def test_later_blocks_are_read_by_the_read_ahead_thread(dataset, monkeypatch):
    reads = []
    real = storage.open_read

    def recording(path, start=0, end=None, **kwargs):
        reads.append((threading.current_thread().name, path, start))
        return real(path, start=start, end=end, **kwargs)

    monkeypatch.setattr(storage, "open_read", recording)
    batches = list(MultiGrainedLoader([dataset], config(iter_perc=0.0)))
    assert batches
    shard_reads = [name for name, path, _ in reads if path.endswith(".tar")]
    # the first block is read where the samples are wanted; the rest ahead, in the thread
    assert shard_reads[0] == "MainThread"
    assert "xvlm-read-ahead" in shard_reads and shard_reads.count("MainThread") < len(shard_reads) / 2
    for setting in (False, "auto"):   # auto: on for S3 datasets only, so off for this local one
        reads.clear()
        list(MultiGrainedLoader([dataset], config(iter_perc=0.0, read_ahead=setting)))
        assert {name for name, path, _ in reads if path.endswith(".tar")} == {"MainThread"}, setting


def test_the_thread_ends_with_the_iterator(dataset):
    before = set(read_ahead_threads())
    it = iter(MultiGrainedLoader([dataset], config()))
    next(it)
    started = set(read_ahead_threads()) - before
    assert len(started) == 1
    it.close()
    for thread in started:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_a_failed_read_reaches_the_reader():
    ahead = ReadAhead()
    try:
        future = ahead.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            future.result(timeout=10)
        assert ahead.submit(lambda a, b: a + b, 2, 3).result(timeout=10) == 5   # the thread goes on
    finally:
        ahead.close()


def test_read_ahead_setting_is_checked():
    assert preset("tiny", tokenizer=TOKENIZER).read_ahead == "auto"
    with pytest.raises(XvlmError, match="read_ahead must be auto, true or false"):
        config(read_ahead="yes")


def test_the_thread_only_reads_bytes_and_parsing_stays_in_the_readers_thread(dataset, monkeypatch):
    parsed_in = []
    real = slots_module.iter_range

    def recording(*args, **kwargs):
        parsed_in.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(slots_module, "iter_range", recording)
    assert list(MultiGrainedLoader([dataset], config(iter_perc=0.0)))
    assert parsed_in and set(parsed_in) == {"MainThread"}


@pytest.mark.parametrize("workers", [0, 2])
def test_damage_is_skipped_and_counted_the_same_with_read_ahead(tmp_path, workers):
    """A corrupt image, a broken tar header and a truncated shard: the thread's whole-range read of the truncated
    shard comes up short, so that range is read again in the reader's thread; batches and counts are unchanged."""
    path, _ = damaged(tmp_path)
    common = dict(iter_perc=0.0, shuffle_buffer=5, num_workers=workers, image_text_batch_size=4)
    on = list(MultiGrainedLoader([path], config(**common)))
    off = list(MultiGrainedLoader([path], config(**common, read_ahead=False)))
    assert_same_batches(on, off)
    assert on[-1]["skips"] == off[-1]["skips"] and set(on[-1]["skips"]) == {"corrupt_image", "corrupt_sample",
                                                                             "truncated_shard"}


def test_a_failed_read_ahead_is_read_again_when_reached(dataset, monkeypatch):
    failed = []
    real = storage.open_read

    def failing_in_the_thread(path, start=0, end=None, **kwargs):
        if threading.current_thread().name == "xvlm-read-ahead" and len(failed) < 3:
            failed.append(path)
            raise ConnectionResetError("connection reset by peer")
        return real(path, start=start, end=end, **kwargs)

    monkeypatch.setattr(storage, "open_read", failing_in_the_thread)
    on = list(MultiGrainedLoader([dataset], config(iter_perc=0.0)))
    monkeypatch.setattr(storage, "open_read", real)
    assert len(failed) == 3
    assert_same_batches(on, list(MultiGrainedLoader([dataset], config(iter_perc=0.0, read_ahead=False))))
    assert not on[-1]["skips"]
