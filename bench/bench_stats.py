"""Peak memory of `xvlm stats` on a synthetic 10M-row index.parquet, against reading the same index whole
(the naive way) and against `xvlm stats` on a 100k-row index, each measured in its own subprocess in this run.

    python bench/bench_stats.py --rows 10000000 --work /tmp/bench-stats      # ~1-3 min on 2 cores, ~0.5 GB disk
    python bench/bench_stats.py --rows 1000000 --no-naive                    # quicker

Prints peak RSS (ru_maxrss of the child) and wall time of each run and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards.format import INDEX_NAME, MANIFEST_NAME, REJECTS_NAME
from shards.manifest import INDEX_SCHEMA, REJECTS_SCHEMA

SOURCES = ["coco", "coco+vg", "vg", "sbu", "cc"]
SAMPLES_PER_SHARD = 5000


def _list_column(lengths: np.ndarray, values: np.ndarray, type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(lengths.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_))


def synthetic_batch(start: int, n: int, rng: np.random.Generator) -> pa.RecordBatch:
    """Rows shaped like a real COCO+VG+SBU+CC index: 1-5 captions, 0-60 boxes, 200-512 px images."""
    source = rng.choice(len(SOURCES), size=n, p=[0.08, 0.02, 0.02, 0.2, 0.68])
    has_boxes = np.isin(source, [0, 1, 2])
    captions = np.where(np.isin(source, [0, 1]), 5, np.where(source == 2, 0, 1)).astype(np.int32)
    regions = np.where(np.isin(source, [1, 2]), rng.integers(10, 50, n), 0).astype(np.int32)
    objects = np.where(has_boxes, rng.integers(1, 15, n), 0).astype(np.int32)
    boxes = regions + objects
    width = rng.integers(200, 513, n).astype(np.int32)
    height = rng.integers(200, 513, n).astype(np.int32)
    numbers = np.arange(start, start + n)
    keys = pa.array([f"{SOURCES[s].replace('+', '_')}-{i:012d}" for s, i in zip(source.tolist(), numbers.tolist())])
    shards = pa.array([f"shard-{i // SAMPLES_PER_SHARD:06d}.tar" for i in numbers.tolist()])
    columns = {
        "key": keys, "shard": shards,
        "offset": pa.array((numbers % SAMPLES_PER_SHARD) * 60_000, pa.int64()),
        "source": pa.array([SOURCES[s] for s in source.tolist()]),
        "width": pa.array(width), "height": pa.array(height),
        "jpeg_bytes": pa.array(rng.integers(8_000, 90_000, n), pa.int64()),
        "passthrough": pa.array(rng.random(n) < 0.6),
        "num_captions": pa.array(captions), "num_regions": pa.array(regions), "num_objects": pa.array(objects),
        "caption_lengths": _list_column(captions, rng.integers(3, 40, int(captions.sum())).astype(np.int32),
                                        pa.int32()),
        "box_area_fractions": _list_column(boxes, rng.beta(0.6, 6.0, int(boxes.sum())).astype(np.float32),
                                           pa.float32()),
    }
    return pa.RecordBatch.from_pydict(columns, schema=INDEX_SCHEMA)


def write_synthetic(out: str, rows: int, batch: int = 500_000, seed: int = 0,
                    row_group_size: int = SAMPLES_PER_SHARD) -> None:
    """index.parquet written batch by batch (never whole in memory), plus a matching manifest and rejects.
    The builder writes one parquet row group per shard; `row_group_size` imitates that (larger row groups make
    the reader decode more rows at once)."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {s: 0 for s in SOURCES}
    with pq.ParquetWriter(os.path.join(out, INDEX_NAME), INDEX_SCHEMA, compression="zstd") as writer:
        for start in range(0, rows, batch):
            chunk = synthetic_batch(start, min(batch, rows - start), rng)
            for item in chunk.column("source").value_counts().to_pylist():
                counts[item["values"]] += item["counts"]
            writer.write_batch(chunk, row_group_size=row_group_size)
            print(f"  wrote {start + chunk.num_rows:,} / {rows:,} index rows", end="\r", flush=True)
    print()
    rejects = rows // 100
    reasons = ["missing_image", "not_an_image", "truncated_image", "bad_box", "empty_text"]
    table = pa.table({"source": pa.array(rng.choice(["sbu", "cc"], rejects)), "kind": pa.array(["image"] * rejects),
                      "file": pa.array(["urls.txt"] * rejects), "where": pa.array([str(i) for i in range(rejects)]),
                      "reason": pa.array(rng.choice(reasons, rejects)), "detail": pa.array([""] * rejects)},
                     schema=REJECTS_SCHEMA)
    pq.write_table(table, os.path.join(out, REJECTS_NAME), compression="zstd")
    shards = [{"name": f"shard-{i:06d}.tar", "samples": min(SAMPLES_PER_SHARD, rows - i * SAMPLES_PER_SHARD),
               "bytes": 300_000_000, "sha256": "0" * 64} for i in range(-(-rows // SAMPLES_PER_SHARD))]
    manifest = {"format_version": "1.0", "build": {"command": ["bench/bench_stats.py"],
                                                   "config": {"image": {"max_side": 512}}},
                "sources": {s: {"inputs": {"image": n}, "written": {"image": n}, "rejected": {}, "clipped_boxes": 0}
                            for s, n in counts.items()},
                "shards": shards, "files": {"index": INDEX_NAME, "rejects": REJECTS_NAME}}
    with open(os.path.join(out, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)


# The child reports its own high-water mark (VmHWM): ru_maxrss of a child would also count the parent's pages
# it was forked from, which exec does not reset in that figure.
REPORT_HWM = ("\nimport sys\nfor line in open('/proc/self/status'):\n"
              "    if line.startswith('VmHWM:'):\n        sys.stderr.write('VMHWM_KB ' + line.split()[1] + '\\n')\n")
STATS = "import sys\nfrom tools.cli import main\nrc = main(sys.argv[1:])\nassert rc == 0, rc"
NAIVE = "import sys, pyarrow.parquet as pq\nt = pq.read_table(sys.argv[1])\nprint(t.num_rows, t.nbytes)"


def measure(code: str, args: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of `python -c code args` in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code + REPORT_HWM] + args, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{code.splitlines()[-1]} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    hwm = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("VMHWM_KB ")]
    return int(hwm[-1]) / 1024.0, wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--small-rows", type=int, default=100_000)
    parser.add_argument("--work", default="/tmp/xvlm-bench-stats")
    parser.add_argument("--row-group-size", type=int, default=SAMPLES_PER_SHARD,
                        help="rows per parquet row group (default 5000: one per shard, as the builder writes)")
    parser.add_argument("--no-naive", action="store_true", help="skip reading the whole index (needs several GB)")
    args = parser.parse_args()
    big, small = os.path.join(args.work, "big"), os.path.join(args.work, "small")
    for path, rows in ((small, args.small_rows), (big, args.rows)):
        if not os.path.exists(os.path.join(path, MANIFEST_NAME)):
            print(f"writing a synthetic {rows:,}-row index to {path}")
            write_synthetic(path, rows, row_group_size=args.row_group_size)
    meta = pq.ParquetFile(os.path.join(big, INDEX_NAME)).metadata
    print(f"index.parquet: {os.path.getsize(os.path.join(big, INDEX_NAME)) / 1e6:.0f} MB for {args.rows:,} rows in "
          f"{meta.num_row_groups:,} row groups")
    stats_args = ["--log-level", "WARNING", "stats"]
    results = {}
    results["stats_small"] = measure(STATS, stats_args + [small, "--out", os.path.join(args.work, "small.html"),
                                                          "--no-progress"])
    results["stats_big"] = measure(STATS, stats_args + [big, "--out", os.path.join(args.work, "big.html"),
                                                        "--no-progress"])
    if not args.no_naive:
        results["naive_read_table"] = measure(NAIVE, [os.path.join(big, INDEX_NAME)])
    for name, (rss, wall) in results.items():
        print(f"{name:<18} peak RSS {rss:8.0f} MB   wall {wall:6.1f} s")
    rss_big, rss_small = results["stats_big"][0], results["stats_small"][0]
    print(f"xvlm stats peak RSS, {args.rows:,} rows vs {args.small_rows:,} rows: {rss_big / rss_small:.2f}x")
    if "naive_read_table" in results:
        print(f"xvlm stats peak RSS vs reading the whole index with pq.read_table: "
              f"{rss_big / results['naive_read_table'][0]:.2f}x")
    print(f"xvlm stats throughput: {args.rows / results['stats_big'][1]:,.0f} index rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
