"""Checking a dataset's metadata against itself: the manifest's accounting (inputs = written + rejected),
index.parquet's shards against the manifest's, rejects.parquet's counts against the manifest's."""
from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from reports.verify.problems import Problem
from shards.format import INDEX_NAME, MANIFEST_NAME, REJECTS_NAME
from shards.manifest import DatasetManifest
from shards.side_files import SideFile, open_side_file
from storage.errors import XvlmError

REJECT_COLUMNS = ["source", "kind", "file", "where", "reason", "detail"]


def check_accounting(manifest: DatasetManifest, problems: list[Problem]) -> None:
    """inputs = written + rejected, per source and record kind."""
    for source, counts in sorted(manifest.sources.items()):
        for kind in sorted(set(counts.inputs) | set(counts.written) | set(counts.rejected)):
            rejected = sum(counts.rejected.get(kind, {}).values())
            inputs, written = counts.inputs.get(kind, 0), counts.written.get(kind, 0)
            if inputs != written + rejected:
                problems.append(Problem(MANIFEST_NAME, "accounting", f"{source} {kind}: {inputs} inputs != {written} "
                                                                     f"written + {rejected} rejected"))


def check_index(index: SideFile, manifest: DatasetManifest, problems: list[Problem]) -> None:
    """Every shard index.parquet points at is one the manifest lists."""
    per_shard: Counter = Counter()
    for batch in index.batches(["shard"]):
        counts = pc.value_counts(batch.column("shard"))
        for item in counts.to_pylist():
            per_shard[item["values"]] += item["counts"]
    listed = {e.name for e in manifest.shards}
    for shard, n in sorted(per_shard.items()):
        if shard not in listed:
            problems.append(Problem(INDEX_NAME, "index", f"{n} rows point at shard {shard!r}, which the manifest "
                                                         f"does not list"))


def check_rejects(manifest: DatasetManifest, problems: list[Problem]) -> None:
    """rejects.parquet's rows per (source, kind, reason) equal the manifest's counts."""
    path = manifest.rejects_path
    try:
        counted: Counter = Counter()
        with open_side_file(manifest, "rejects", REJECT_COLUMNS) as rejects:
            for batch in rejects.batches(["source", "kind", "reason"]):
                grouped = pa.Table.from_batches([batch]).group_by(["source", "kind", "reason"]).aggregate(
                    [("reason", "count")])
                for row in grouped.to_pylist():
                    counted[(row["source"], row["kind"], row["reason"])] += row["reason_count"]
    except FileNotFoundError:
        problems.append(Problem(REJECTS_NAME, "missing_file", f"{path} does not exist"))
        return
    except XvlmError as err:   # not parquet, or not the format's columns: reported with the same message
        problems.append(Problem(REJECTS_NAME, "rejects", str(err)))
        return
    except Exception as err:  # noqa: BLE001 - any parquet failure is the file's problem, reported
        problems.append(Problem(REJECTS_NAME, "rejects", f"unreadable: {type(err).__name__}: {err}"))
        return
    expected: Counter = Counter()
    for source, counts in manifest.sources.items():
        for kind, reasons in counts.rejected.items():
            for reason, n in reasons.items():
                if n:
                    expected[(source, kind, reason)] += n
    for key in sorted(set(expected) | set(counted)):
        if expected[key] != counted[key]:
            problems.append(Problem(REJECTS_NAME, "rejects", f"{'/'.join(key)}: {counted[key]} rows, the manifest "
                                                             f"counts {expected[key]}"))
