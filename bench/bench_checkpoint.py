"""Benchmark: what verifying a checkpoint on resume costs, against plain loading in the same run.

A `base` X-VLM checkpoint (215.6M parameters, AdamW state after one step: ~2.6 GB) is written with the trainer's
own functions, then loaded in rotating rounds:
  plain     read the marker and the three files a rank reads (storage.read_bytes), torch.load(weights_only) the
            trainer and rank state, load the weights into the model and the state into the optimizer;
  unhashed  `train.checkpoint.load(verify=False)`: the verified loader's reads (the optimizer state into one
            buffer, chunk by chunk) and sizes, without the hashes; then the same loading into model and optimizer;
  verified  `train.checkpoint.load`: also every file's sha256 against the marker (hashed in threads while the files
            are read and parsed) before anything is loaded.
Prints the medians and the ratios verified / plain and verified / unhashed (the cost of the hashes alone; target
<= 1.10). Local files come from the page cache (the fastest reading, so the largest relative cost of hashing); with
--s3 they come from a local SeaweedFS.

  python bench/bench_checkpoint.py                 # base, 5 rounds, ~3 minutes and ~9 GB of memory on 2 cores
  python bench/bench_checkpoint.py --s3            # the checkpoint on a local SeaweedFS S3 server instead
  python bench/bench_checkpoint.py --preset tiny --rounds 9
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.config import preset  # noqa: E402
from model.io import load_weights, model_to_bytes  # noqa: E402
from model.xvlm import build_model  # noqa: E402
import storage  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train.config import OptimSection, ScheduleSection  # noqa: E402
from train.optim import build_optimizer, build_scheduler  # noqa: E402


def write_checkpoint(folder: str, model, optimizer, scheduler) -> str:
    """One committed checkpoint of step 1, written as the trainer writes it."""
    path = ckpt.checkpoint_path(folder, 1)
    ckpt.prepare_folder(path)
    writes = ckpt.start_writes(path, ckpt.rank_files(0, {"epoch": 0}))
    writes += ckpt.start_writes(path, {ckpt.MODEL_FILE: model_to_bytes(model)})
    writes += ckpt.start_writes(path, ckpt.main_files(optimizer=optimizer, scheduler=scheduler, scaler=None, step=1,
                                                      extra={}, config_yaml="bench: true\n"))
    ckpt.commit(path, 1, 1, ckpt.finish_writes(writes))
    return path


def _torch_bytes(path: str):
    return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)


def load_plain(path: str, model, optimizer) -> None:
    json.loads(storage.read_text(storage.join(path, ckpt.MARKER)))
    model_bytes = storage.read_bytes(storage.join(path, ckpt.MODEL_FILE))
    trainer = _torch_bytes(storage.join(path, ckpt.TRAINER_FILE))
    _torch_bytes(storage.join(path, ckpt.rank_file(0)))
    load_weights(model, model_bytes)
    optimizer.load_state_dict(trainer["optimizer"])


def load_verified(path: str, model, optimizer, verify: bool = True) -> None:
    state = ckpt.load(path, 0, 1, verify=verify)
    load_weights(model, state.model_bytes)
    optimizer.load_state_dict(state.trainer["optimizer"])


LOADERS = {"plain": load_plain, "unhashed": lambda *a: load_verified(*a, verify=False), "verified": load_verified}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base", choices=["tiny", "base"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="folder for the checkpoint (default: a temp folder, removed)")
    parser.add_argument("--s3", action="store_true", help="write and load the checkpoint on a local SeaweedFS server")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(preset(args.preset))
    optimizer = build_optimizer(model, OptimSection())
    for p in model.parameters():          # one step, so AdamW holds its two moment tensors per parameter
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    folder = args.dir or tempfile.mkdtemp(prefix="xvlm-bench-ckpt-")
    try:
        if not args.s3:
            measure(folder, args, model, optimizer)
            return 0
        from bench.local_s3 import start_seaweed

        server = start_seaweed(os.path.join(folder, "seaweed"), bucket="bench")
        try:
            with server.in_environment():
                measure(server.url("run"), args, model, optimizer)
        finally:
            server.stop()
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def measure(folder: str, args: argparse.Namespace, model, optimizer) -> None:
    """Write the checkpoint under `folder` (local or s3://), then time plain and verified loading."""
    scheduler = build_scheduler(optimizer, ScheduleSection(steps=10, warmup_steps=1))
    path = write_checkpoint(folder, model, optimizer, scheduler)
    size = sum(e.size for e in storage.list_files(path))
    data = os.urandom(256 << 20)
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    sha_rate = len(data) / (time.perf_counter() - start) / 1e9
    del data
    print(f"checkpoint {args.preset}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{size / 1e9:.2f} GB in {path}; sha256 {sha_rate:.2f} GB/s on one core")
    load_plain(path, model, optimizer)      # warm the page cache and the allocator
    times: dict[str, list[float]] = {name: [] for name in LOADERS}
    names = list(LOADERS)
    for r in range(args.rounds):
        for kind in names[r % 3:] + names[:r % 3]:          # each loader goes first in turn
            start = time.perf_counter()
            LOADERS[kind](path, model, optimizer)
            times[kind].append(time.perf_counter() - start)
        print(f"round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in names))
    median = {k: statistics.median(v) for k, v in times.items()}
    for base in ("plain", "unhashed"):
        ratios = sorted(v / b for v, b in zip(times["verified"], times[base]))
        print(f"verified / {base}: {median['verified'] / median[base]:.3f} (medians {median['verified']:.2f} s / "
              f"{median[base]:.2f} s; per-round ratios {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    sys.exit(main())
