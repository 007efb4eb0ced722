"""`xvlm verify`: check a built dataset end to end — every shard against the manifest (presence, size, sha256,
sample count), every tar member name, every sample's JSON against the format, every image decodable, every box
inside its image, index.parquet and rejects.parquet against the manifest — and list every problem found.
The parts: problems.py (findings, options, the printed report), shard.py (one shard in one read), metadata.py
(manifest, index and rejects against each other), run.py (a training run's checkpoints instead of a dataset).
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

import storage
from reports.verify.metadata import check_accounting, check_index, check_rejects
from reports.verify.problems import Problem, VerifyOptions, VerifyResult, report_lines
from reports.verify.shard import INDEX_CHECK_COLUMNS, check_image, check_shard
from shards.format import INDEX_NAME
from shards.manifest import ShardEntry, read_dataset_manifest
from shards.side_files import open_side_file
from storage.errors import XvlmError

__all__ = ["Problem", "VerifyOptions", "VerifyResult", "report_lines", "check_image", "check_shard", "verify"]


def verify(options: VerifyOptions) -> VerifyResult:
    """Every check; never stops at the first problem."""
    manifest = read_dataset_manifest(options.dataset)   # a damaged manifest: the same error as every reader
    result = VerifyResult(dataset=manifest.path, shards=len(manifest.shards))
    check_accounting(manifest, result.problems)
    check_rejects(manifest, result.problems)
    with contextlib.ExitStack() as stack:
        index_local = _checked_index(manifest, stack, result.problems)
        _check_shards(manifest, index_local, options, result)
    # shards on disk that the manifest does not list (e.g. from another build into the same folder)
    listed = {e.name for e in manifest.shards}
    for item in storage.list_files(manifest.path, recursive=False):
        name = item.path.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".tar") and name not in listed:
            result.problems.append(Problem(name, "extra_shard", "a .tar file in the dataset that the manifest does "
                                                                "not list"))
    return result


def _checked_index(manifest, stack: contextlib.ExitStack, problems: list[Problem]) -> str | None:
    """A local copy of index.parquet (open for the block of `stack`) after checking its shards, or None when it is
    missing or unreadable (the problem is listed). Not parquet or without the format's columns: XvlmError."""
    try:
        index = stack.enter_context(open_side_file(manifest, "index", INDEX_CHECK_COLUMNS))
    except FileNotFoundError:
        problems.append(Problem(INDEX_NAME, "missing_file", f"{manifest.index_path} does not exist"))
        return None
    try:
        check_index(index, manifest, problems)
    except XvlmError:
        raise
    except Exception as err:  # noqa: BLE001 - reported as the index's problem
        problems.append(Problem(INDEX_NAME, "index", f"unreadable: {type(err).__name__}: {err}"))
        return None
    return index.local


def _check_shards(manifest, index_local: str | None, options: VerifyOptions, result: VerifyResult) -> None:
    """Every shard the manifest lists, `options.workers` at a time, with one progress bar over their bytes."""
    entries = list(manifest.shards)
    bar = tqdm(total=sum(e.bytes for e in entries), unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
               disable=not options.progress, mininterval=0.5, dynamic_ncols=True)
    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with lock:
            bar.update(n)

    def one(entry: ShardEntry) -> tuple[int, list[Problem]]:
        try:
            return check_shard(storage.join(manifest.path, entry.name), entry, index_local, options, on_bytes)
        except Exception as err:  # noqa: BLE001 - storage errors after retries: the shard's problem
            return 0, [Problem(entry.name, "read_error", f"{type(err).__name__}: {err}")]

    with ThreadPoolExecutor(max_workers=options.workers) as pool:
        for samples, found in pool.map(one, entries):   # map keeps the manifest's order in the output
            result.samples += samples
            result.problems.extend(found)
    bar.close()
