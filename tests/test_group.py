"""Grouping: deterministic key-sorted partitions, out-of-core buckets that give the same groups as one in-memory
pass, slices for the shard tasks, and the ImageGroup helpers the shard writer uses for its rejects."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.group import GroupConfig, count_groups, group_images, iter_groups
from pipeline.stage import StageConfig, stage_sources


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> str:
    from sampledata.sample_data import generate

    sample = generate(tmp_path_factory.mktemp("sample"), images=40, val_images=4, seed=5, progress=False)
    work = str(tmp_path_factory.mktemp("work"))
    paths = sample["paths"]
    stage_sources({"coco": paths["coco"], "vg": paths["vg"], "sbu": paths["sbu"], "cc": paths["cc_img2dataset"]},
                  work, StageConfig(progress=False, batch_rows=100))
    return work


def group_all(work: str, partitions: int, **config) -> tuple[list[str], list]:
    parts = group_images(work, partitions, GroupConfig(progress=False, **config))
    return parts, [g for p in parts for g in iter_groups(p)]


def test_same_input_gives_byte_identical_partitions(staged):
    parts, groups = group_all(staged, 3)
    first = [open(p, "rb").read() for p in parts]
    accounting = open(os.path.join(staged, "groups", "accounting.json")).read()
    parts_again, _ = group_all(staged, 3)
    assert [open(p, "rb").read() for p in parts_again] == first
    assert open(os.path.join(staged, "groups", "accounting.json")).read() == accounting
    assert [g.key for g in groups] == sorted(g.key for g in groups)


def test_small_buckets_give_the_same_groups(staged):
    _, in_memory = group_all(staged, 2)
    _, spilled = group_all(staged, 2, max_rows_per_bucket=100, key_sample_rows=50)
    info = json.loads(open(os.path.join(staged, "groups", "accounting.json")).read())
    assert info["buckets"] >= 4
    # A bucket holds whole images, so it can pass the limit by at most one image's rows (~60 here).
    assert info["largest_bucket_rows"] < 100 + 100
    assert spilled == in_memory


def test_partitions_are_balanced_key_ranges(staged):
    parts, groups = group_all(staged, 4)
    sizes = [count_groups(p) for p in parts]
    assert sum(sizes) == len(groups) and min(sizes) >= len(groups) // 4 - 3
    previous = ""
    for p in parts:
        keys = [g.key for g in iter_groups(p)]
        assert keys == sorted(keys) and (not keys or keys[0] > previous)
        previous = keys[-1] if keys else previous


def test_more_partitions_than_images(staged):
    parts, groups = group_all(staged, 50)
    assert len(groups) < 50 and len(parts) == 50 and sum(count_groups(p) for p in parts) == len(groups)


def test_slices_read_only_their_rows(staged):
    [part], groups = group_all(staged, 1, row_group_size=7)
    n = count_groups(part)
    assert n == len(groups)
    pieces = [list(iter_groups(part, start, min(start + 10, n))) for start in range(0, n, 10)]
    assert [g for piece in pieces for g in piece] == groups
    assert list(iter_groups(part, 5, 5)) == [] and list(iter_groups(part, n - 1, n + 50)) == groups[-1:]


def test_reject_all_covers_every_record(staged):
    _, groups = group_all(staged, 1)
    merged = next(g for g in groups if g.source == "coco+vg")
    rejects = merged.reject_all("missing_image", "gone")
    assert len(rejects) == len(merged.image_records) + len(merged.captions) + len(merged.regions)
    assert {(r.source, r.kind) for r in rejects} == {("coco", "image"), ("coco", "caption"), ("coco", "object"),
                                                     ("vg", "image"), ("vg", "region"), ("vg", "object")}
    assert all(r.reason == "missing_image" and r.file and r.where for r in rejects)
    region = merged.regions[0]
    assert region["ref"].reject("box_outside").kind == region["kind"]


@pytest.mark.slow
def test_memory_stays_flat_as_the_input_grows(tmp_path):
    """Peak RSS of stage + group + read-back on a VG-format release does not follow the release's size: with
    small buffers (stage batch, spill batch, key sample, bucket, row group), 10x the records cost about the same
    memory. (json.load of the same files grows ~linearly: 6.1 GB at the real size.)"""
    def peak(scale: float) -> float:
        script = textwrap.dedent(f"""
            import json, resource
            from bench.bench_annotations import synthesize
            from pipeline.stage import StageConfig, stage_sources
            from pipeline.group import GroupConfig, group_images, iter_groups
            data, work = {str(tmp_path / f"vg{scale}")!r}, {str(tmp_path / f"work{scale}")!r}
            counts = synthesize(data, {scale})
            stage_sources({{"vg": data}}, work, StageConfig(progress=False, batch_rows=2000))
            parts = group_images(work, 4, GroupConfig(progress=False, max_rows_per_bucket=5000, spill_batch_rows=5000,
                                                      key_sample_rows=2000, row_group_size=32))
            regions = sum(len(g.regions) for p in parts for g in iter_groups(p))
            assert regions == counts["regions"] + counts["objects"], (regions, counts)
            print(json.dumps({{"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
        """)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"]

    small, large = peak(0.003), peak(0.03)  # ~28k vs ~280k records
    assert large < small * 1.25, (small, large)
