"""Benchmark the trainer against bare baselines measured in the same run, and print the ratios.

1. Time per training step of `train.loop.Trainer` (DDP-ready step, metrics, progress bar, kind checks) vs a bare
   forward / backward / clip / optimizer loop over the same in-memory batches (target <= 1.05x).
2. A checkpoint save to S3 (SeaweedFS on 127.0.0.1: every file, the commit marker, keep-K pruning) vs a plain
   boto3 upload of the same bytes (target <= 1.5x).

  python bench/bench_train.py                      # tiny model, ~1-2 minutes on 2 cores
  python bench/bench_train.py --steps 30 --hidden 256 --rounds 3
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.io import model_to_bytes  # noqa: E402
import storage  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train import distributed  # noqa: E402
from train.config import load_config  # noqa: E402
from train.loop import Trainer, tensors_to  # noqa: E402
from train.metrics import METRICS_FILE, read_metrics  # noqa: E402
from train.synthetic_stream import SyntheticStream  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_config(out: str, args: argparse.Namespace, steps: int):
    overrides = [f"out={json.dumps(out)}", "data.synthetic=true", f"schedule.steps={steps}", "schedule.warmup_steps=1",
                 f"schedule.mode={args.mode}", "schedule.iter_perc_mode=per_batch",   # one batch per step, as the bare loop
                 f"checkpoint.every={steps}", "checkpoint.keep=1",
                 "checkpoint.resume=none", "logging.tensorboard=false", f"logging.progress={str(args.progress).lower()}",
                 f"data.image_text_batch_size={args.batch}", f"data.region_batch_size={args.batch}",
                 f"data.region_max_images={max(2, args.batch // 2)}"]
    if args.hidden:
        overrides += [f"model.hidden_size={args.hidden}", f"model.intermediate_size={4 * args.hidden}",
                      f"model.num_attention_heads={max(1, args.hidden // 64)}"]
    return load_config(str(REPO / "train" / "configs" / "tiny_cpu.yaml"), overrides)


def stream_for(trainer: Trainer, cfg) -> SyntheticStream:
    model, loader = trainer.model, cfg.data.build(image_res=trainer.model.config.image_res,
                                                  grid_stride=trainer.model.grid_stride)
    return SyntheticStream(image_res=loader.image_res, grid=model.grid_size, vocab_size=model.config.vocab_size,
                           max_tokens=loader.max_tokens, max_masks=loader.max_masks,
                           image_text_batch_size=loader.image_text_batch_size,
                           region_batch_size=loader.region_batch_size, region_max_images=loader.region_max_images,
                           iter_perc=cfg.schedule.iter_perc, seed=cfg.schedule.seed,
                           iter_perc_mode=cfg.schedule.iter_perc_mode)


def trainer_step_time(args: argparse.Namespace, workdir: str, round_: int) -> float:
    """Seconds per step of the real loop: from the metrics' time stamps, first and last step excluded."""
    out = os.path.join(workdir, f"trainer-{round_}")
    cfg = make_config(out, args, args.steps)
    ctx = distributed.setup()
    trainer = Trainer(cfg, ctx)
    trainer.run()
    entries = read_metrics(os.path.join(out, METRICS_FILE))
    times = [e["time"] for e in entries]
    return (times[-1] - times[1]) / (len(times) - 2)


def bare_step_time(args: argparse.Namespace, workdir: str, round_: int) -> float:
    """Seconds per step of a bare loop over the same batches (same model, optimizer, schedule and plan)."""
    cfg = make_config(os.path.join(workdir, f"bare-{round_}"), args, args.steps)
    ctx = distributed.setup()
    trainer = Trainer(cfg, ctx)  # only for identical model / optimizer / scheduler / stream construction
    model, optimizer, scheduler = trainer.model, trainer.optimizer, trainer.scheduler
    batches = iter(trainer.stream)
    steps = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        group = [next(batches)]
        if cfg.schedule.mode == "summed":
            while group[-1]["kind"] != "image_text":
                group.append(next(batches))
        for batch in group:
            losses = model(batch["kind"], **tensors_to(batch, ctx.device))
            sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - t0)
    trainer.metrics.close()
    return sum(steps[1:-1]) / (len(steps) - 2)


def bench_loop(args: argparse.Namespace, workdir: str) -> dict:
    bare, ours = [], []
    for r in range(args.rounds):  # interleaved rounds in alternating order: both see the same machine load
        if r % 2:
            ours.append(trainer_step_time(args, workdir, r))
            bare.append(bare_step_time(args, workdir, r))
        else:
            bare.append(bare_step_time(args, workdir, r))
            ours.append(trainer_step_time(args, workdir, r))
        print(f"  round {r}: bare {bare[-1] * 1000:.1f} ms/step, trainer {ours[-1] * 1000:.1f} ms/step", flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    return {"bare_ms": b * 1000, "trainer_ms": o * 1000, "ratio": o / b}


def bench_checkpoint(args: argparse.Namespace, workdir: str) -> dict:
    from bench.local_s3 import start_seaweed

    server = start_seaweed(os.path.join(workdir, "seaweed"))
    os.environ.update(server.env())
    storage.set_endpoint_url(None)
    try:
        cfg = make_config(server.url("bench-run"), args, 2)
        ctx = distributed.setup()
        trainer = Trainer(cfg, ctx)
        trainer.run()  # two steps: a real optimizer state to save
        # The exact bytes of each file (serialised once, outside the timings of the baseline)
        model_bytes = model_to_bytes(trainer.model)
        trainer_buf = io.BytesIO()
        torch.save({"format_version": ckpt.FORMAT_VERSION, "step": trainer.step,
                    "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
                    "scaler": {}, "extra": {}}, trainer_buf)
        rank_buf = io.BytesIO()
        torch.save({"format_version": ckpt.FORMAT_VERSION, "rank": 0, "rng": ckpt.rng_state(),
                    "loader": trainer.stream.state_dict()}, rank_buf)
        files = {"model.safetensors": model_bytes, "trainer.pt": trainer_buf.getvalue(),
                 "rank-00000.pt": rank_buf.getvalue(), "config.yaml": cfg.to_yaml().encode()}
        total = sum(len(v) for v in files.values())
        client = storage.backend_for(server.url("bench-run")).client()
        ours, put, managed = [], [], []
        for r in range(args.rounds):
            trainer.step += 1
            t0 = time.perf_counter()
            trainer.save_checkpoint()
            ours.append(time.perf_counter() - t0)
            trainer._finish_pruning()  # background housekeeping, outside both timings
            t0 = time.perf_counter()
            for name, data in files.items():
                client.put_object(Bucket=server.bucket, Key=f"baseline-put/{r}/{name}", Body=data)
            put.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for name, data in files.items():
                client.upload_fileobj(io.BytesIO(data), server.bucket, f"baseline-managed/{r}/{name}")
            managed.append(time.perf_counter() - t0)
            print(f"  round {r}: save_checkpoint {ours[-1]:.3f}s, boto3 put_object {put[-1]:.3f}s, "
                  f"boto3 upload_fileobj {managed[-1]:.3f}s ({total / 1e6:.1f} MB)", flush=True)
        o, p, m = (statistics.median(v) for v in (ours, put, managed))
        return {"mbytes": total / 1e6, "save_s": o, "put_object_s": p, "upload_fileobj_s": m,
                "ratio_vs_put_object": o / p, "ratio_vs_upload_fileobj": o / m}
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed loop (first and last not timed)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the medians are compared")
    parser.add_argument("--batch", type=int, default=8, help="images / text rows per batch")
    parser.add_argument("--hidden", type=int, default=0, help="text width (0: the tiny preset's 64)")
    parser.add_argument("--mode", default="alternating", choices=["alternating", "summed"])
    parser.add_argument("--progress", action="store_true", help="show the trainer's progress bar")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: stable timings on a shared machine)")
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--skip-checkpoint", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
        if not args.skip_loop:
            print("training loop vs bare forward/backward/optimizer loop:", flush=True)
            results["loop"] = bench_loop(args, workdir)
            r = results["loop"]
            print(f"loop: trainer {r['trainer_ms']:.1f} ms/step vs bare {r['bare_ms']:.1f} ms/step -> "
                  f"{r['ratio']:.3f}x (target <= 1.05x)")
        if not args.skip_checkpoint:
            print("checkpoint save to S3 (SeaweedFS) vs plain boto3 upload of the same bytes:", flush=True)
            results["checkpoint"] = bench_checkpoint(args, workdir)
            r = results["checkpoint"]
            print(f"checkpoint: {r['mbytes']:.1f} MB, save {r['save_s']:.3f}s vs put_object {r['put_object_s']:.3f}s "
                  f"-> {r['ratio_vs_put_object']:.2f}x; vs upload_fileobj {r['upload_fileobj_s']:.3f}s -> "
                  f"{r['ratio_vs_upload_fileobj']:.2f}x (target <= 1.5x)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
