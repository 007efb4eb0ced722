"""Training metrics on rank 0: a tqdm bar with ETA, metrics.jsonl (one JSON line per step), TensorBoard if present.

metrics.jsonl lives in the run folder when it is local; for an s3:// run it is written to a local folder and
uploaded beside the checkpoints (`{out}/metrics.jsonl`) each time one is saved. An upload that fails (after the
storage layer's retries) never ends the run: it is warned about, and the next checkpoint uploads the whole file
again. On resume the file is cut back to the resumed step, so it reads exactly like the file of a run that was
never interrupted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

from tqdm import tqdm

import storage

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def local_metrics_dir(out: str, local_dir: str = "") -> str:
    """Where metrics.jsonl is appended: the run folder itself, or a local folder for an s3:// run."""
    if local_dir:
        return local_dir
    if storage.local_path(out) is not None:
        return out
    digest = hashlib.sha1(out.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"xvlm-run-{digest}")


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The entries of a metrics.jsonl (local or s3://); a torn last line (killed mid-write) is dropped."""
    if not storage.exists(path):
        return []
    entries = []
    for _number, raw in storage.iter_lines(path):
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            break  # only the last line can be torn: lines are written whole and in order
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            break  # not a line of ours: the history ends before it
        entries.append(entry)
    return entries


class MetricsLogger:
    """Rank 0's sinks. `log(entry)` appends a line per step; `sync()` uploads the file for s3:// runs."""

    def __init__(self, out: str, total_steps: int, start_step: int, *, local_dir: str = "", progress: bool = True,
                 tensorboard: bool = True, enabled: bool = True) -> None:
        self.out = out
        self.enabled = enabled
        self.dir = local_metrics_dir(out, local_dir)
        self.path = os.path.join(self.dir, METRICS_FILE)
        self.remote = storage.join(out, METRICS_FILE) if storage.local_path(out) is None else None
        self.bar = None
        self.writer = None
        self.file = None
        self.unsynced = 0            # failed uploads since the last one that went through
        if not enabled:
            return
        os.makedirs(self.dir, exist_ok=True)
        self._restore(start_step)
        self.file = open(self.path, "a", encoding="utf-8")
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed: metrics go to %s only", self.path)
            else:
                self.writer = SummaryWriter(log_dir=os.path.join(self.dir, "tensorboard"), purge_step=start_step + 1)

    def _restore(self, start_step: int) -> None:
        """Keep the entries up to `start_step` (from the local file, or the uploaded copy on a fresh machine)."""
        entries = read_metrics(self.path)
        if self.remote and (not entries or entries[-1]["step"] < start_step):
            entries = read_metrics(self.remote)
        kept = [e for e in entries if e["step"] <= start_step]
        if start_step and (len(kept) < start_step or kept[-1]["step"] != start_step):
            log.warning("metrics.jsonl holds %d of the %d steps before the resumed one; the history has gaps",
                        len(kept), start_step)
        storage.write_text(self.path, "".join(json.dumps(e) + "\n" for e in kept))

    def log(self, entry: dict[str, Any], postfix: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        # One write() of a whole line, flushed: a kill leaves at most a torn last line, which readers drop.
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        step = entry["step"]
        if self.writer is not None:
            for key, value in _scalars(entry):
                self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def sync(self) -> bool:
        """Upload metrics.jsonl next to the checkpoints (s3:// runs); called before a checkpoint commits. Never
        raises: a failed upload is a warning (the file stays complete locally, and the next sync sends all of it).
        Returns whether the remote copy is up to date."""
        if not self.enabled or self.remote is None:
            return True
        if not self.file.closed:
            self.file.flush()
        try:
            with open(self.path, "rb") as f:
                storage.write_bytes(self.remote, f.read())
        except Exception as err:  # noqa: BLE001 - metrics must never end a run; the next sync retries
            self.unsynced += 1
            log.warning("could not upload %s to %s (%s: %s); it stays complete in %s and is uploaded again at the "
                        "next checkpoint", METRICS_FILE, self.remote, type(err).__name__, err, self.path)
            return False
        if self.unsynced:
            log.info("%s uploaded again to %s after %d failed upload(s)", METRICS_FILE, self.remote, self.unsynced)
            self.unsynced = 0
        return True

    def close(self) -> None:
        if not self.enabled or self.file.closed:
            return
        self.sync()
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _scalars(entry: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for key, value in entry.items():
        if key == "step":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(_scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((name, float(value)))
    return out
