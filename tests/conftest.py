"""Shared fixtures: a real SeaweedFS S3 server for the whole session, loopback-only networking for Ray/gloo."""
from __future__ import annotations

import os
import uuid

import pytest

# Keep every test's traffic on loopback (Ray binds the host address otherwise; gloo picks an interface).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: tiny-model forwards are latency-bound, and on a shared 2-core machine
    two threads fight the other processes (several times slower). Used through `pytest.mark.usefixtures`."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A running SeaweedFS S3 server on 127.0.0.1. Yields the server (endpoint, credentials, bucket, url(key));
    the standard AWS variables are set for the session so boto3 (and subprocesses) find it."""
    from seaweed import start_seaweed

    server = start_seaweed(str(tmp_path_factory.mktemp("seaweed")))
    try:
        with server.in_environment():
            yield server
    finally:
        server.stop()


@pytest.fixture
def s3_prefix(s3):
    """A fresh s3:// prefix per test inside the session bucket."""
    return s3.url(f"t-{uuid.uuid4().hex[:10]}")
