"""bench/bench_loader.py's ratio method: each S3 row runs next to its local row (after it, and before it every
second round), and a ratio is the median of the per-round ratios (not best round against best round)."""
from __future__ import annotations

import pytest

from bench.bench_loader import paired_order, round_ratio


def test_each_s3_row_runs_right_after_its_local_row():
    names = ["bare: Pillow decode + resize", "loader image-text, local", "loader region, local",
             "loader image-text, local, Pillow decode", "loader image-text, S3", "loader region, S3",
             "mosaicml-streaming image-text, local MDS"]
    assert paired_order(names) == [
        "bare: Pillow decode + resize", "loader image-text, local", "loader image-text, S3", "loader region, local",
        "loader region, S3", "loader image-text, local, Pillow decode", "mosaicml-streaming image-text, local MDS"]
    assert paired_order(["loader, bare transform, local", "loader, bare transform, S3"]) == \
        ["loader, bare transform, local", "loader, bare transform, S3"]
    assert paired_order(["loader region, local"]) == ["loader region, local"]   # no S3 rows (--no-s3)


def test_every_second_round_the_s3_row_of_a_pair_runs_first():
    names = ["bare: Pillow decode + resize", "loader image-text, local", "loader region, local",
             "loader image-text, S3", "loader region, S3"]
    assert paired_order(names, swap=True) == [
        "bare: Pillow decode + resize", "loader image-text, S3", "loader image-text, local", "loader region, S3",
        "loader region, local"]


def test_ratios_are_medians_of_per_round_ratios():
    # round 2 is slow for both rows of the pair: its ratio is still 0.9; one odd round moves the range, not the median
    history = {"s3": [90.0, 45.0, 90.0], "local": [100.0, 50.0, 100.0], "odd": [100.0, 180.0, 100.0]}
    assert round_ratio(history, "s3", "local") == pytest.approx((0.9, 0.9, 0.9))
    median, low, high = round_ratio(history, "odd", "local")
    assert (median, low, high) == pytest.approx((1.0, 1.0, 3.6))
