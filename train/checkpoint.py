"""Checkpoints in a local folder or under s3://bucket/prefix, through the storage layer; committed by a marker.

Layout of one checkpoint (`{out}/checkpoints/ckpt-{step:08d}/`):
  model.safetensors   the weights with the model config (model.io), written by rank 0
  trainer.pt          optimizer, scheduler, grad scaler, step (tensors + plain values; torch.load weights_only)
  rank-{r:05d}.pt     rank r's torch / CUDA / numpy / python RNG states and its loader state
  config.yaml         the resolved run config
  COMMITTED           JSON (step, world size, files), written LAST by rank 0 with a create-if-absent put;
                      without it the folder is a partial checkpoint that resume ignores.
Nothing is ever unpickled: tensors load with safetensors or `torch.load(weights_only=True)`.
"""
from __future__ import annotations

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

from shards import storage
from shards.errors import XvlmError

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.yaml"
IMPORT_REPORT = "import.json"   # beside MODEL_FILE in a folder written by `xvlm import-xvlm` (no run config)
FORMAT_VERSION = 1
CKPT_NAME = re.compile(r"^ckpt-(\d{8})$")
# Tests set this to seconds to sleep after each file of a checkpoint, to kill a run in the middle of a save.
SLOW_ENV = "XVLM_TEST_SLOW_CHECKPOINT"


def checkpoints_root(out: str) -> str:
    return storage.join(out, "checkpoints")


def checkpoint_path(out: str, step: int) -> str:
    return storage.join(checkpoints_root(out), f"ckpt-{step:08d}")


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


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


def committed_checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, path) of every committed checkpoint under the run folder, oldest first."""
    return sorted((step, path) for step, (path, names) in _scan(out).items() if MARKER in names)


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


def _write(path: str, data: bytes) -> None:
    storage.write_bytes(path, data)
    _pause_for_tests()


def prepare_folder(path: str) -> None:
    """Make room for a new checkpoint at `path`: drop a marker first (so a crash never leaves an old marker over
    new files), then whatever a killed run left there."""
    storage.delete(storage.join(path, MARKER))
    storage.delete_prefix(path)


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


def finish_writes(futures: list[Future]) -> None:
    """Wait for every started write (none is left running behind a failure); raise the first error."""
    errors = [err for err in (future.exception() for future in futures) if err is not None]
    if errors:
        raise errors[0]


def commit(path: str, step: int, world_size: int) -> None:
    """Rank 0, once every rank reported its part written: the marker that makes the checkpoint count. Last."""
    files = sorted({MODEL_FILE, TRAINER_FILE, CONFIG_FILE, *(rank_file(r) for r in range(world_size))})
    body = json.dumps({"step": step, "world_size": world_size, "files": files,
                       "format_version": FORMAT_VERSION, "time": time.time()}).encode()
    if not storage.put_if_absent(storage.join(path, MARKER), body):
        raise XvlmError(f"checkpoint {path} was committed by another writer: are two runs using one --out?")
    log.info("checkpoint step %d committed: %s", step, path)


def _remove(path: str) -> None:
    storage.delete_prefix(path)
    if not storage.is_s3(path):
        try:
            os.rmdir(path)
        except OSError:  # already gone, or a file appeared meanwhile
            pass


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


def _load_pt(path: str) -> Any:
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError as err:
        raise XvlmError(f"checkpoint file {path} is missing") from err
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for non-weights pickles and corrupt files
        raise XvlmError(f"cannot read {path} as a weights-only torch file: {err}") from err


@dataclass
class Checkpoint:
    """What one rank needs to resume."""

    path: str
    step: int
    world_size: int
    model_bytes: bytes
    trainer: dict[str, Any]
    rank_state: dict[str, Any]


def load(path: str, rank: int, world_size: int) -> Checkpoint:
    """Read a committed checkpoint for `rank`; the world size must match the one that wrote it."""
    try:
        meta = json.loads(storage.read_text(storage.join(path, MARKER)))
    except FileNotFoundError as err:
        raise XvlmError(f"{path} is not a committed checkpoint (no {MARKER} marker)") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise XvlmError(f"checkpoint {path} has format version {meta.get('format_version')}; this code reads "
                        f"{FORMAT_VERSION}")
    if meta["world_size"] != world_size:
        raise XvlmError(f"checkpoint {path} was written by {meta['world_size']} processes but this run has "
                        f"{world_size}: exact resume needs the same world size (the loader's shard split and every "
                        f"rank's RNG depend on it); relaunch with {meta['world_size']} processes or start a new run "
                        f"from its weights with model.init={storage.join(path, MODEL_FILE)}")
    trainer = _load_pt(storage.join(path, TRAINER_FILE))
    rank_state = _load_pt(storage.join(path, rank_file(rank)))
    return Checkpoint(path=path, step=int(meta["step"]), world_size=world_size,
                      model_bytes=storage.read_bytes(storage.join(path, MODEL_FILE)), trainer=trainer,
                      rank_state=rank_state)


def read_model(path: str):
    """An X-VLM model from a model file (local or s3://), or from the model file of a checkpoint folder or of a
    folder written by `xvlm import-xvlm`."""
    from model.io import model_from_bytes

    if not path.endswith(".safetensors"):
        path = storage.join(path, MODEL_FILE)
    if not storage.exists(path):
        raise XvlmError(f"model file {path} does not exist (give a model .safetensors file, a checkpoint folder or a "
                        "folder from `xvlm import-xvlm`)")
    return model_from_bytes(storage.read_bytes(path), source=path)
