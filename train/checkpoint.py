"""Checkpoints in a local folder or under s3://bucket/prefix, through the storage layer; committed by a marker.

Layout of one checkpoint (`{out}/checkpoints/ckpt-{step:08d}/`):
  model.safetensors   the weights with the model config (model.io), written by rank 0
  trainer.pt          optimizer, scheduler, grad scaler, step (tensors + plain values; torch.load weights_only)
  rank-{r:05d}.pt     rank r's torch / CUDA / numpy / python RNG states and its loader state
  config.yaml         the resolved run config
  COMMITTED           JSON (format version, step, world size, and every file's size and sha256), written LAST by
                      rank 0 with a create-if-absent put; without it the folder is a partial checkpoint that resume
                      ignores.
A resume checks each file it reads against the marker (size, then sha256, hashed in a thread while the next file is
read and parsed) before anything is loaded into the model or optimizer; a checkpoint that fails is a
CheckpointError, and `--resume auto` falls back to the next older one.
Nothing is ever unpickled: tensors load with safetensors or `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import storage
from storage.errors import XvlmError
from shards.format import SampleError, load_json

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.yaml"
IMPORT_REPORT = "import.json"   # beside MODEL_FILE in a folder written by `xvlm import-xvlm` (no run config)
FORMAT_VERSION = 2          # 2: the marker records each file's size and sha256 (1: names only, not verifiable)
MAX_MARKER_BYTES = 1 << 20
CKPT_NAME = re.compile(r"^ckpt-(\d{8})$")
FILE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")   # a file of a checkpoint: a plain name, no folder
# Tests set this to seconds to sleep after each file of a checkpoint, to kill a run in the middle of a save.
SLOW_ENV = "XVLM_TEST_SLOW_CHECKPOINT"


def checkpoints_root(out: str) -> str:
    return storage.join(out, "checkpoints")


def checkpoint_path(out: str, step: int) -> str:
    return storage.join(checkpoints_root(out), f"ckpt-{step:08d}")


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


class CheckpointError(XvlmError):
    """A checkpoint that fails its checks (damaged, truncated, mixed up): resume skips it for an older one."""


# ---------------------------------------------------------------------------------------------- finding


def _scan(out: str) -> dict[int, tuple[str, set[str]]]:
    """step -> (checkpoint folder, names of the files in it), from one listing of the run's checkpoints."""
    found: dict[int, tuple[str, set[str]]] = {}
    root = checkpoints_root(out)
    for entry in storage.list_files(root):
        rel = entry.path[len(root):].strip("/")
        name, _, leaf = rel.partition("/")
        match = CKPT_NAME.match(name)
        if match and leaf:
            found.setdefault(int(match.group(1)), (storage.join(root, name), set()))[1].add(leaf)
    return found


def list_checkpoints(out: str) -> list[tuple[int, str, bool]]:
    """(step, path, committed) of every checkpoint folder under the run folder, oldest first."""
    return sorted((step, path, MARKER in names) for step, (path, names) in _scan(out).items())


def committed_checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, path) of every committed checkpoint under the run folder, oldest first."""
    return sorted((step, path) for step, (path, names) in _scan(out).items() if MARKER in names)


def resume_candidates(out: str, resume: str) -> list[str]:
    """The checkpoints to try, in order: `auto` -> every committed one, newest first (resume takes the first that
    passes its checks), `none` -> none, else the given path, which must be committed."""
    if resume == "auto":
        return [path for _step, path in reversed(committed_checkpoints(out))]
    path = resolve_resume(out, resume)
    return [path] if path else []


def resolve_resume(out: str, resume: str) -> str | None:
    """`auto` -> the newest committed checkpoint of the run (or None), `none` -> None, else a checkpoint path
    which must be committed."""
    if resume == "none":
        return None
    if resume == "auto":
        found = committed_checkpoints(out)
        return found[-1][1] if found else None
    path = resume.rstrip("/")
    if not storage.exists(storage.join(path, MARKER)):
        raise XvlmError(f"--resume {resume}: no committed checkpoint there (its {MARKER} marker is missing); "
                        f"give a ckpt-XXXXXXXX folder that has one, or --resume auto / none")
    return path


# ---------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and python RNG states as weights-only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------- saving


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _pause_for_tests() -> None:
    delay = float(os.environ.get(SLOW_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _write(path: str, data: bytes) -> tuple[str, dict[str, Any]]:
    """Write one file of a checkpoint; returns (name, its marker record: bytes and sha256)."""
    record = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}   # hashlib releases the GIL
    storage.write_bytes(path, data)
    _pause_for_tests()
    return path.rsplit("/", 1)[-1], record


def prepare_folder(path: str) -> None:
    """Make room for a new checkpoint at `path`: drop a marker first (so a crash never leaves an old marker over
    new files), then whatever a killed run left there."""
    storage.delete(storage.join(path, MARKER))
    storage.delete_tree(path)


def rank_files(rank: int, loader_state: Any) -> dict[str, bytes]:
    """Every rank's part: its RNG states and loader position."""
    return {rank_file(rank): _to_bytes({"format_version": FORMAT_VERSION, "rank": rank, "rng": rng_state(),
                                        "loader": loader_state})}


def main_files(*, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, step: int,
               extra: dict[str, Any], config_yaml: str) -> dict[str, bytes]:
    """Rank 0's part besides the weights (MODEL_FILE, written first: see start_writes): optimizer / scheduler /
    scaler, step and the config."""
    trainer = {"format_version": FORMAT_VERSION, "step": step, "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
               "extra": extra}
    return {TRAINER_FILE: _to_bytes(trainer), CONFIG_FILE: config_yaml.encode("utf-8")}


_writers: ThreadPoolExecutor | None = None


def start_writes(path: str, files: dict[str, bytes]) -> list[Future]:
    """Start writing files of a checkpoint part, side by side in writer threads (each atomically): a caller can
    serialise the next file while these upload. finish_writes waits for them.

    The writer threads live as long as the process, so their S3 clients and connections are reused by every save.
    """
    global _writers
    if _writers is None:
        _writers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ckpt-write")
    return [_writers.submit(_write, storage.join(path, name), data) for name, data in files.items()]


def finish_writes(futures: list[Future]) -> dict[str, dict[str, Any]]:
    """Wait for every started write (none is left running behind a failure); raise the first error. Returns the
    marker records {file name: {"bytes", "sha256"}} of the files written."""
    errors = [err for err in (future.exception() for future in futures) if err is not None]
    if errors:
        raise errors[0]
    return dict(future.result() for future in futures)


def commit(path: str, step: int, world_size: int, files: dict[str, dict[str, Any]]) -> None:
    """Rank 0, once every rank reported its part written: the marker that makes the checkpoint count. Last.
    `files` holds every rank's records (file name -> bytes, sha256)."""
    expected = {MODEL_FILE, TRAINER_FILE, CONFIG_FILE, *(rank_file(r) for r in range(world_size))}
    if set(files) != expected:
        raise XvlmError(f"checkpoint {path}: written files {sorted(files)} are not the expected {sorted(expected)}")
    body = json.dumps({"format_version": FORMAT_VERSION, "step": step, "world_size": world_size,
                       "files": dict(sorted(files.items())), "time": time.time()}, indent=1).encode()
    marker = storage.join(path, MARKER)
    if not storage.put_if_absent(marker, body):
        # A PUT retried after a dropped connection finds the marker its first attempt wrote: that is ours.
        if storage.read_bytes(marker) != body:
            raise XvlmError(f"checkpoint {path} was committed by another writer: are two runs using one --out?")
    log.info("checkpoint step %d committed: %s", step, path)


def _remove(path: str) -> None:
    storage.delete_tree(path, remove_folder=True)


def prune(out: str, keep: int) -> list[str]:
    """Delete committed checkpoints beyond the newest `keep` (marker first, so a half-deleted one is partial),
    and partial ones older than the newest committed (left by killed runs). Returns the deleted paths."""
    found = _scan(out)
    committed = sorted(step for step, (_path, names) in found.items() if MARKER in names)
    if not committed:
        return []
    doomed = set(committed[:-keep] if keep > 0 else committed)
    doomed |= {step for step in found if step < committed[-1] and step not in committed}
    removed = []
    for step in sorted(doomed):
        path = found[step][0]
        storage.delete(storage.join(path, MARKER))
        _remove(path)
        removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------- loading


def read_marker(path: str) -> dict[str, Any]:
    """The checked COMMITTED marker of a checkpoint folder: format version, step (matching the folder's name), world
    size, files. Raises CheckpointError."""
    where = storage.join(path, MARKER)
    try:
        raw = storage.read_bytes(where, end=MAX_MARKER_BYTES + 1)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} is not a committed checkpoint (no {MARKER} marker)") from err
    try:
        meta = load_json(raw, where, max_bytes=MAX_MARKER_BYTES)
    except SampleError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(meta, dict) or meta.get("format_version") not in (1, FORMAT_VERSION):
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{where} is not a checkpoint marker this code reads (format version {version!r}; "
                              f"this code reads {FORMAT_VERSION})")
    step, world, files = meta.get("step"), meta.get("world_size"), meta.get("files")
    problems = []
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        problems.append(f"step {step!r:.40} is not a step number")
    match = CKPT_NAME.match(path.rstrip("/").rsplit("/", 1)[-1])
    if match and isinstance(step, int) and int(match.group(1)) != step:
        problems.append(f"it names step {step}, the folder is step {int(match.group(1))} (a marker of another "
                        f"checkpoint?)")
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        problems.append(f"world_size {world!r:.40} is not a process count")
    if meta["format_version"] == FORMAT_VERSION and not (isinstance(files, dict) and all(
            FILE_NAME.match(name) and isinstance(r, dict) and isinstance(r.get("bytes"), int)
            and isinstance(r.get("sha256"), str) for name, r in files.items())):
        problems.append("its `files` are not {plain file name: {bytes, sha256}}")
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    return meta


HASH_CHUNK = 64 << 20


class _BufferFile(io.RawIOBase):
    """A seekable binary file over a bytearray, so torch.load reads a chunked read's buffer without a copy of it."""

    def __init__(self, buffer: bytearray) -> None:
        super().__init__()
        self.view = memoryview(buffer)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        n = max(0, min(len(target), len(self.view) - self.pos))
        target[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = offset if whence == io.SEEK_SET else self.pos + offset if whence == io.SEEK_CUR \
            else len(self.view) + offset
        return self.pos

    def tell(self) -> int:
        return self.pos


def _size_error(path: str, name: str, size: int | str, recorded: int) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {name} has {size} bytes, the marker records {recorded} (truncated or "
                           f"replaced)")


def _read_chunked(path: str, name: str, size: int,
                  hasher: ThreadPoolExecutor | None) -> tuple[bytearray, Future | None]:
    """Exactly `size` bytes of a checkpoint file read into one buffer, each chunk handed to `hasher` (one thread: in
    order) as it arrives, so the hash runs while the rest is read (no hash without a hasher)."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    digest = hashlib.sha256()
    pos = 0
    with storage.open_read(storage.join(path, name)) as f:
        while pos < size:
            n = f.readinto(view[pos:min(size, pos + HASH_CHUNK)])
            if not n:
                raise _size_error(path, name, pos, size)
            if hasher is not None:
                hasher.submit(digest.update, view[pos:pos + n])
            pos += n
        if f.read(1):
            raise _size_error(path, name, f"more than {size}", size)
    return buffer, hasher.submit(digest.hexdigest) if hasher is not None else None


def _read_file(path: str, name: str, marker: dict[str, Any], hasher: ThreadPoolExecutor | None,
               chunked: bool = False) -> tuple[bytes | bytearray, Future | None]:
    """A checkpoint file's bytes with its size checked against the marker, and its sha256 under way in `hasher`
    (None for a version-1 marker, which records no hashes, or without a hasher). `chunked` hashes while reading,
    into a bytearray."""
    record = marker["files"].get(name) if isinstance(marker["files"], dict) else None
    if marker["format_version"] == FORMAT_VERSION and record is None:
        raise CheckpointError(f"checkpoint {path}: its {MARKER} marker does not list {name}")
    try:
        if record is not None and chunked:
            return _read_chunked(path, name, record["bytes"], hasher)
        data = storage.read_bytes(storage.join(path, name))
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path}: {name} is missing") from err
    if record is None:
        return data, None
    if len(data) != record["bytes"]:
        raise _size_error(path, name, len(data), record["bytes"])
    return data, hasher.submit(lambda: hashlib.sha256(data).hexdigest()) if hasher is not None else None


def _check_hash(path: str, name: str, marker: dict[str, Any], digest: Future | None) -> None:
    if digest is not None and digest.result() != marker["files"][name]["sha256"]:
        raise CheckpointError(f"checkpoint {path}: {name} does not match the sha256 its marker records (damaged, or "
                              f"copied from another checkpoint)")


def _load_pt(data: bytes | bytearray, where: str) -> Any:
    try:
        source = _BufferFile(data) if isinstance(data, bytearray) else io.BytesIO(data)
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for non-weights pickles and corrupt files
        raise CheckpointError(f"cannot read {where} as a weights-only torch file: {err}") from err


@dataclass
class Checkpoint:
    """What one rank needs to resume."""

    path: str
    step: int
    world_size: int
    model_bytes: bytes
    trainer: dict[str, Any]
    rank_state: dict[str, Any]


def load(path: str, rank: int, world_size: int, verify: bool = True) -> Checkpoint:
    """Read a committed checkpoint for `rank`, each file checked against the marker's size and sha256 (hashed in a
    thread while the next file is read and parsed: parsing is safe on any bytes, and nothing is loaded into a
    model before this returns). CheckpointError for a damaged checkpoint; XvlmError when the world size differs.
    `verify=False` skips the hashes (sizes are still checked): what bench/bench_checkpoint.py compares against."""
    marker = read_marker(path)
    if marker["world_size"] != world_size:
        raise XvlmError(f"checkpoint {path} was written by {marker['world_size']} processes but this run has "
                        f"{world_size}: exact resume needs the same world size (the loader's shard split and every "
                        f"rank's RNG depend on it); relaunch with {marker['world_size']} processes or start a new run "
                        f"from its weights with model.init={storage.join(path, MODEL_FILE)}")
    if marker["format_version"] == 1:
        log.warning("checkpoint %s was written before checkpoints recorded their files' hashes: not verified", path)
    names = (MODEL_FILE, TRAINER_FILE, rank_file(rank))
    # The weights (safetensors wants bytes) are hashed in one thread while the optimizer state, the largest file,
    # is read; that one is hashed chunk by chunk in another thread as it arrives; the main thread meanwhile reads
    # and parses. Only the last chunk's hash is left to wait for.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash") as files, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash") as chunks:
        read = {MODEL_FILE: _read_file(path, MODEL_FILE, marker, files if verify else None)}
        read[TRAINER_FILE] = _read_file(path, TRAINER_FILE, marker, chunks if verify else None, chunked=True)
        read[rank_file(rank)] = _read_file(path, rank_file(rank), marker, files if verify else None)
        parsed, failure = {}, None
        for name in (TRAINER_FILE, rank_file(rank)):
            try:
                parsed[name] = _load_pt(read[name][0], storage.join(path, name))
            except CheckpointError as err:
                failure = failure or err
        for name in names:      # a hash mismatch explains a parse failure: it is reported first
            _check_hash(path, name, marker, read[name][1])
    if failure is not None:
        raise failure
    trainer = parsed[TRAINER_FILE]
    if not isinstance(trainer, dict) or trainer.get("step") != marker["step"]:
        raise CheckpointError(f"checkpoint {path}: {TRAINER_FILE} is not the trainer state of step {marker['step']}")
    return Checkpoint(path=path, step=int(marker["step"]), world_size=world_size, model_bytes=read[MODEL_FILE][0],
                      trainer=trainer, rank_state=parsed[rank_file(rank)])


def verifiable(path: str) -> bool:
    """Whether a committed checkpoint's marker records its files' hashes (format 2 on)."""
    try:
        return read_marker(path)["format_version"] >= 2
    except CheckpointError:
        return True      # damaged: `check` says how


def check(path: str, on_bytes=None) -> list[str]:
    """Every problem of one committed checkpoint, reading each file the marker lists through sha256 in chunks
    (bounded memory): `xvlm verify RUN`. An empty list when it passes (or has a format-1 marker, which records no
    hashes: see `verifiable`)."""
    try:
        marker = read_marker(path)
    except CheckpointError as err:
        return [str(err)]
    if marker["format_version"] == 1:
        return []     # written before checkpoints recorded their files' hashes: nothing to check against
    problems = []
    expected = {MODEL_FILE, TRAINER_FILE, CONFIG_FILE, *(rank_file(r) for r in range(marker["world_size"]))}
    missing = sorted(expected - set(marker["files"]))
    if missing:
        problems.append(f"its marker does not list {missing}")
    for name, record in sorted(marker["files"].items()):
        digest, size = hashlib.sha256(), 0
        try:
            with storage.open_read(storage.join(path, name)) as f:
                while chunk := f.read(8 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if size != record["bytes"]:
            problems.append(f"{name} has {size} bytes, the marker records {record['bytes']}")
        elif digest.hexdigest() != record["sha256"]:
            problems.append(f"{name} does not match the sha256 its marker records")
    return problems


def read_model(path: str):
    """An X-VLM model from a model file (local or s3://), or from the model file of a checkpoint folder or of a
    folder written by `xvlm import-xvlm`."""
    from model.io import model_from_bytes

    if not path.endswith(".safetensors"):
        if storage.exists(storage.join(path, MARKER)):   # a committed checkpoint: its weights are checked
            marker = read_marker(path)
            with ThreadPoolExecutor(max_workers=1) as hasher:
                data, digest = _read_file(path, MODEL_FILE, marker, hasher)
                _check_hash(path, MODEL_FILE, marker, digest)
            return model_from_bytes(data, source=storage.join(path, MODEL_FILE))
        path = storage.join(path, MODEL_FILE)
    if not storage.exists(path):
        raise XvlmError(f"model file {path} does not exist (give a model .safetensors file, a checkpoint folder or a "
                        "folder from `xvlm import-xvlm`)")
    return model_from_bytes(storage.read_bytes(path), source=path)
