"""A local S3 for the benchmarks that measure against one: the tests' SeaweedFS server (tests/seaweed.py), which
sits beside bench/ in a checkout (benchmarks, like tests, run from a checkout, not from an installed package)."""
from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"


def start_seaweed(workdir: str):
    """A running SeaweedFS S3 server with a bucket (see tests/seaweed.py: endpoint, credentials, url(key), stop())."""
    if not (TESTS / "seaweed.py").is_file():
        raise SystemExit(f"{TESTS / 'seaweed.py'} not found: run the benchmarks from a checkout of xvlm-pipeline")
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from seaweed import start_seaweed as start

    return start(workdir)
