"""Streaming from S3 (SeaweedFS): the same batches as from local disk, and a server that stops and restarts in
the middle of a shard's GET does not lose or repeat a byte: the read resumes where it stopped."""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402
from test_loader_split import TOKENIZER  # noqa: E402

import storage  # noqa: E402
from storage.errors import XvlmError  # noqa: E402
from shards.loader import MultiGrainedLoader  # noqa: E402
from shards.loader_config import preset  # noqa: E402

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Our own SeaweedFS (not the session one): this module stops and restarts it."""
    from seaweed import start_seaweed

    srv = start_seaweed(str(tmp_path_factory.mktemp("seaweed-loader")), bucket="loader")
    try:
        with srv.in_environment():
            yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def datasets(server, tmp_path_factory):
    # 48 noise JPEGs of 1280x960 in one shard (> 40 MB, asserted in the test): more than the kernel may buffer on
    # loopback (the receive buffer autotunes up to net.ipv4.tcp_rmem's max, 32 MB here, plus the server's send
    # buffer), so the server cannot have sent the whole object before it stops and the GET is cut mid-object.
    # With 640x480 pictures (~15 MB) it sometimes was not, and the test failed for want of a retry.
    local = shardkit.make_dataset(str(tmp_path_factory.mktemp("big")), samples=48, per_shard=48,
                                  size=(1280, 960), noise=True)
    return local, shardkit.upload(local, server.url("big"))


@pytest.fixture(scope="module")
def small(server, tmp_path_factory):
    local = shardkit.make_dataset(str(tmp_path_factory.mktemp("small")), samples=40, per_shard=12,
                                  sources=("coco", "vg"))
    return local, shardkit.upload(local, server.url("small"))


def config(**overrides):
    return preset("tiny", **{**dict(tokenizer=TOKENIZER, iter_perc=0.5, shuffle_buffer=48,
                                    image_text_batch_size=4, region_batch_size=6, region_max_images=3), **overrides})


def test_s3_gives_the_local_batches(small):
    local, remote = small
    b = list(MultiGrainedLoader([remote], config(num_workers=2)))
    c = list(MultiGrainedLoader([local], config(num_workers=2)))
    assert [x["keys"] for x in b] == [x["keys"] for x in c] and len(b) > 0
    for x, y in zip(b, c):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text_ids_masked"], y["text_ids_masked"])


def test_s3_reads_ahead_by_default(small, monkeypatch):
    """On S3 the next shuffle block's GETs run in the read-ahead thread ("auto"); the batches stay the local ones."""
    local, remote = small
    threads = []
    real = storage.open_read

    def recording(path, start=0, end=None, **kwargs):
        if path.endswith(".tar"):
            threads.append(threading.current_thread().name)
        return real(path, start=start, end=end, **kwargs)

    monkeypatch.setattr(storage, "open_read", recording)
    b = list(MultiGrainedLoader([remote], config(shuffle_buffer=5, iter_perc=0.0)))
    assert threads[0] == "MainThread" and threads.count("xvlm-read-ahead") > len(threads) / 2
    c = list(MultiGrainedLoader([local], config(shuffle_buffer=5, iter_perc=0.0)))
    assert [x["keys"] for x in b] == [x["keys"] for x in c] and len(b) > 0
    for x, y in zip(b, c):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text_ids_masked"], y["text_ids_masked"])


def test_server_restart_mid_object_is_survived(datasets, server, monkeypatch):
    local, remote = datasets
    assert os.path.getsize(os.path.join(local, "shard-000000.tar")) > 40 * 2 ** 20
    expected = list(MultiGrainedLoader([local], config()))
    streams, restarts = [], []
    real_open = storage.open_read

    class Slow:
        """Reads a shard GET slowly and restarts the server (from a thread) after its first MB; keeps reading
        slowly while the server shuts down (it drains open requests for a while before it is killed)."""

        def __init__(self, stream):
            self.stream, self.read_bytes = stream, 0

        def read(self, n=-1):
            data = self.stream.read(min(n, 256 * 1024) if n and n > 0 else 256 * 1024)
            self.read_bytes += len(data)
            if self.read_bytes > (1 << 20) and not restarts:
                thread = threading.Thread(target=server.restart, kwargs={"down_seconds": 2.0})
                restarts.append(thread)
                thread.start()
            if restarts and restarts[0].is_alive() and not self.stream.raw.retries_total:
                time.sleep(0.3)
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    def slow_open(path, start=0, end=None, **kw):
        stream = real_open(path, start=start, end=end, **kw)
        streams.append(stream)
        return Slow(stream) if storage.local_path(path) is None else stream

    monkeypatch.setattr(storage, "open_read", slow_open)
    got = list(MultiGrainedLoader([remote], config()))
    restarts[0].join()
    assert [x["keys"] for x in got] == [x["keys"] for x in expected]
    assert all(x["skips"] == {} for x in got)
    for x, y in zip(got, expected):
        assert torch.equal(x["image"], y["image"])
    # the GET was cut mid-object and the storage layer continued it at the byte where it stopped
    assert sum(s.raw.retries_total for s in streams if hasattr(s, "raw")) > 0, \
        "the storage layer did not retry the cut GET (see shards/storage.py _retryable)"


def test_missing_s3_dataset(server):
    with pytest.raises(XvlmError, match="does not exist"):
        MultiGrainedLoader([server.url("nothing-here")], config())
