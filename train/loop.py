"""The training loop: `train(cfg)` runs X-VLM pretraining in one process, under torchrun, or in a Ray Train worker.

The loop runs *iterations*, which the schedule counts (`schedule.steps`, warmup, lr decay), as X-VLM's Pretrain.py:
with `iter_perc_mode: xvlm` an iteration is the region batch the loader's plan may put first (probability
iter_perc) and one image-text batch. `alternating` (X-VLM) trains each in its own optimizer step, the region step at
the current lr; `summed` (ours, X2-VLM) sums their losses in one step; the scheduler steps once per iteration. With
`iter_perc_mode: per_batch` (ours before) an iteration is one batch of either kind (summed: the region batches up to
the next image-text batch). The plan is the same on every rank (checked each iteration). Gradient accumulation,
clipping, bf16 autocast on GPU, DDP. A checkpoint holds everything that decides the next steps (weights, optimizer,
scheduler, scaler, every rank's RNG states and loader position), so a killed run resumed with
`checkpoint.resume=auto` repeats an uninterrupted run's losses bit for bit on CPU.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model.errors import ModelError
from model.io import load_weights, model_to_bytes
from model.objectives import BATCH_KINDS, objectives_of
from model.xvlm import XVLM, build_model
import storage
from storage.errors import XvlmError
from train import checkpoint as ckpt
from train import distributed
from train.compiled import check_batch, compile_model, pad_to_shape, static_shapes, use_compile
from train.config import TrainConfig
from train.metrics import MetricsLogger
from train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

KINDS = BATCH_KINDS                                              # ("region", "image_text")
LOSS_NAMES = {kind: objectives_of(kind) for kind in KINDS}      # the objectives of each batch kind
METRIC_KEYS = [f"{kind}/{name}" for kind in KINDS for name in LOSS_NAMES[kind]]
MAX_REGION_BATCHES_PER_GROUP = 8   # summed mode: a group closes after this many region batches without image-text
EvaluateFn = Callable[..., dict]


# ---------------------------------------------------------------------------------------------- setup helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def configure_determinism(cfg: TrainConfig, ctx: distributed.DistContext) -> None:
    """Deterministic kernels on CPU (exact resume); one intra-op thread pool share per local process."""
    if ctx.device.type == "cpu":
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size if ctx.distributed else 1))
        if local > 1:  # several ranks on one machine must not oversubscribe its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (precision auto or bf16), none on CPU."""
    if device.type != "cuda":
        if cfg.precision == "bf16":
            raise XvlmError("precision=bf16 needs a GPU; use precision=auto or fp32 on CPU")
        return None
    return None if cfg.precision == "fp32" else torch.bfloat16


def build_stream(cfg: TrainConfig, ctx: distributed.DistContext, model: XVLM):
    """The batch source for this rank: the shards loader, or random in-memory batches (`data.synthetic`)."""
    forced = {"image_res": model.config.image_res, "grid_stride": model.grid_stride,
              "seed": cfg.schedule.seed, "iter_perc": cfg.schedule.iter_perc,
              "iter_perc_mode": cfg.schedule.iter_perc_mode}
    clash = sorted(k for k in forced if k in cfg.data.overrides and cfg.data.overrides[k] != forced[k])
    if clash:
        raise XvlmError(f"data.{clash[0]} is set by the trainer (image_res / grid_stride from the model, seed, "
                        f"iter_perc and iter_perc_mode from the schedule section); remove it from the data section")
    loader_cfg = cfg.data.build(**forced)
    if cfg.data.synthetic:
        from train.synthetic_stream import SyntheticStream

        return SyntheticStream(image_res=loader_cfg.image_res, grid=model.grid_size,
                               vocab_size=model.config.vocab_size, max_tokens=loader_cfg.max_tokens,
                               max_masks=loader_cfg.max_masks, image_text_batch_size=loader_cfg.image_text_batch_size,
                               region_batch_size=loader_cfg.region_batch_size,
                               region_max_images=loader_cfg.region_max_images, iter_perc=cfg.schedule.iter_perc,
                               seed=cfg.schedule.seed, rank=ctx.rank, iter_perc_mode=cfg.schedule.iter_perc_mode)
    from shards.loader import MultiGrainedLoader

    return MultiGrainedLoader(cfg.data.datasets, loader_cfg, rank=ctx.rank, world_size=ctx.world_size)


def tensors_to(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device` (keys, sources and kind stay behind)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def endless(stream: Any) -> Iterator[dict[str, Any]]:
    """Epoch after epoch of `stream` (the loader yields one epoch per `for`)."""
    while True:
        count = 0
        for batch in stream:
            count += 1
            yield batch
        if count == 0:
            raise XvlmError("the loader yielded no batch for a whole epoch: the datasets are too small for the batch "
                            "sizes and world size (see the loader's warnings), or hold no usable sample")


# ---------------------------------------------------------------------------------------------- the trainer


class Trainer:
    """Owns the model, optimizer, schedule, loader and sinks of one run on one rank."""

    def __init__(self, cfg: TrainConfig, ctx: distributed.DistContext, stream: Any = None,
                 evaluate: EvaluateFn | None = None, model: XVLM | None = None,
                 new_parameters: set[str] | None = None) -> None:
        """`model` (fine-tuning: built from a pretraining checkpoint, the same on every rank) replaces the one the
        config describes; `new_parameters` names those that train at the new-parameter lr (default: the model's
        rule)."""
        self.cfg = cfg
        self.ctx = ctx
        configure_determinism(cfg, ctx)
        seed_everything(cfg.schedule.seed)  # the same initial weights on every rank
        self.model = (model if model is not None else self._build_model()).to(ctx.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, new_parameters, fused=ctx.device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        self.amp_dtype = autocast_dtype(cfg, ctx.device)
        self.loss_weights = cfg.loss.weights()   # {name: weight > 0}: the losses the model computes
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=False)  # bf16 needs no loss scaling
        self.stream = stream if stream is not None else build_stream(cfg, ctx, self.model)
        self.evaluate = evaluate
        self._housekeeping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-prune")
        self._pruning: Future | None = None
        self.step = 0                # iterations done: what the schedule counts
        self.optimizer_steps = 0     # optimizer steps done (region and image-text steps)
        self.eval_results: dict[str, Any] = {}
        # Dropout and ITM negatives differ per rank from here on; resume restores these states exactly.
        seed_everything(cfg.schedule.seed + 1000 * (ctx.rank + 1))
        resumed = self._resume()
        self.ddp: nn.Module = self.model
        if ctx.distributed:
            # Region and image-text steps use different heads: unused parameters must be found each step.
            # static_graph cannot hold: the used parameters change with the batch kind. Gradients as views of the
            # all-reduce buckets save a copy of every gradient.
            devices = [ctx.device] if ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=devices, find_unused_parameters=True,
                                               gradient_as_bucket_view=True)
        # Compiled: each batch padded to its kind's fixed shape (train/compiled.py), one graph per kind. Fine-tuning
        # batches (shards/downstream_batches.py) have no configured maxima: they run eagerly.
        self.compiled = use_compile(cfg.compile, ctx.device) and not cfg.finetune.task
        self.shapes = static_shapes(cfg) if self.compiled else None
        self.run_model = compile_model(self.ddp, cfg) if self.compiled else self.ddp
        self.batches = endless(self.stream)
        if resumed is not None:
            ckpt.set_rng_state(resumed.rank_state["rng"])
        self.metrics = MetricsLogger(cfg.out, cfg.schedule.steps, self.step, local_dir=cfg.logging.local_dir,
                                     progress=cfg.logging.progress, tensorboard=cfg.logging.tensorboard,
                                     enabled=ctx.is_main)

    def _build_model(self) -> XVLM:
        model = self._read_or_build_model()
        model.set_activation_checkpointing(self.cfg.model.activation_checkpointing)
        return model

    def _read_or_build_model(self) -> XVLM:
        model_cfg = self.cfg.model.build()
        if self.cfg.model.init:
            model = ckpt.read_model(self.cfg.model.init)
            if model.config != model_cfg:
                raise XvlmError(f"model.init {self.cfg.model.init} was saved with another model config than the "
                                "model section describes; make them agree")
            return model
        return build_model(model_cfg)

    # ------------------------------------------------------------------ resume
    def _resume(self) -> ckpt.Checkpoint | None:
        candidates: list[str] = []
        error = None
        if self.ctx.is_main:
            try:
                candidates = ckpt.resume_candidates(self.cfg.out, self.cfg.checkpoint.resume)
                if not candidates and ckpt.committed_checkpoints(self.cfg.out):
                    # A fresh start among another run's checkpoints: a later `--resume auto` would pick those up.
                    raise XvlmError(f"{self.cfg.out} already holds checkpoints of another run; continue it with "
                                    "--resume auto, or start fresh in a new --out (or delete the old one)")
                storage.clean_interrupted_writes(ckpt.checkpoints_root(self.cfg.out))
            except XvlmError as err:
                error = str(err)
        candidates, error = distributed.broadcast_object(self.ctx, (candidates, error))
        if error:
            raise XvlmError(error)
        if not candidates:
            if self.ctx.is_main:
                log.info("starting a new run in %s", self.cfg.out)
            return None
        state = self._first_good_checkpoint(candidates)
        path = state.path
        try:
            load_weights(self.model, state.model_bytes, source=path)
        except ModelError as err:
            raise XvlmError(f"checkpoint {path}: {err}; resume with the run's own config (its config.yaml) or "
                            "start a new --out") from err
        trainer = state.trainer
        self.optimizer.load_state_dict(trainer["optimizer"])
        scheduler_state = dict(trainer["scheduler"])
        # The schedule's numbers (warmup, steps) come from this run's config, not from the checkpoint.
        scheduler_state["lr_lambdas"] = self.scheduler.state_dict()["lr_lambdas"]
        self.scheduler.load_state_dict(scheduler_state)
        for group in self.optimizer.param_groups:   # fused or not is this machine's choice, not the checkpoint's
            group["fused"] = self.ctx.device.type == "cuda"
        if trainer["scaler"]:
            self.scaler.load_state_dict(trainer["scaler"])
        self.stream.load_state_dict(state.rank_state["loader"])
        self.step = state.step
        self.optimizer_steps = int((trainer.get("extra") or {}).get("optimizer_steps", state.step))
        if self.ctx.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        return state

    def _first_good_checkpoint(self, candidates: list[str]) -> ckpt.Checkpoint:
        """The first of `candidates` that every rank reads and verifies; with `--resume auto` the others are
        skipped with a warning saying why, an explicit `--resume PATH` that fails is an error."""
        explicit = self.cfg.checkpoint.resume not in ("auto", "none")
        skipped = []
        for path in candidates:
            state, why, fatal = None, "", False
            try:
                state = ckpt.load(path, self.ctx.rank, self.ctx.world_size)
            except ckpt.CheckpointError as err:
                why = str(err)
            except XvlmError as err:     # not about this checkpoint (e.g. another world size): no fallback helps
                why, fatal = str(err), True
            if not distributed.all_ok(self.ctx, not fatal):
                raise XvlmError(why or "resuming failed on another rank (see its log)")
            if distributed.all_ok(self.ctx, not why):
                if skipped and self.ctx.is_main:
                    log.warning("resuming from %s, the newest checkpoint that passes its checks", path)
                return state
            why = why or f"checkpoint {path} fails its checks on another rank (see that rank's log)"
            if explicit:
                raise XvlmError(f"--resume {path}: {why}; give another checkpoint, or --resume auto to take the newest "
                                "that passes its checks")
            log.warning("skipping a checkpoint that fails its checks: %s", why)
            skipped.append(why)
        raise XvlmError(f"no checkpoint in {ckpt.checkpoints_root(self.cfg.out)} passes its checks ("
                        + "; ".join(skipped) + "); restore one, or start a new run in a new --out")

    # ------------------------------------------------------------------ one step
    def _next_batch(self) -> dict[str, Any]:
        # The loader must not move the trainer's RNG: a DataLoader draws a seed from the global torch RNG each
        # time it starts iterating (each epoch, and once more after a resume), which would shift dropout.
        with torch.random.fork_rng(devices=[]):
            return next(self.batches)

    def step_batches(self) -> list[dict[str, Any]]:
        """The batches of the next iteration, from the loader's plan: with iter_perc_mode xvlm or in summed mode the
        region batches up to and including the next image-text batch (xvlm: at most one), else one batch; repeated
        grad_accum times."""
        schedule = self.cfg.schedule
        grouped = schedule.mode == "summed" or schedule.iter_perc_mode == "xvlm"
        out: list[dict[str, Any]] = []
        for _ in range(schedule.grad_accum):
            if not grouped:
                out.append(self._next_batch())
                continue
            regions = 0
            while True:  # region batches up to and including the next image-text batch
                batch = self._next_batch()
                out.append(batch)
                if batch["kind"] == "image_text":
                    break
                regions += 1
                if regions >= MAX_REGION_BATCHES_PER_GROUP:
                    break
        return out

    def _optimizer_groups(self, batches: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], float]]:
        """The iteration's optimizer steps, each (batches, loss scale): X-VLM's alternating mode trains the region
        batches, then the image-text batches, each kind in its own step (each kind's micro-batches averaged); the
        other modes train the iteration's batches in one step, each weighted 1 / grad_accum."""
        schedule = self.cfg.schedule
        if schedule.mode == "alternating" and schedule.iter_perc_mode == "xvlm":
            groups = [[b for b in batches if b["kind"] == kind] for kind in KINDS]
            return [(group, 1.0 / len(group)) for group in groups if group]
        return [(batches, 1.0 / schedule.grad_accum)]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.amp_dtype)

    def _optimizer_step(self, batches: list[dict[str, Any]], scale: float, sums: torch.Tensor,
                        counts: dict[str, int]) -> tuple[float, int, float | None]:
        """Forward/backward over `batches` (DDP synchronises the last), clip, optimizer step. Adds each loss to
        `sums` and the batches to `counts`; returns the weighted loss, the images seen and the gradient norm."""
        total = 0.0
        images = 0
        for i, batch in enumerate(batches):
            kind = batch["kind"]
            if kind not in LOSS_NAMES:
                raise XvlmError(f"the loader yielded a batch of unknown kind {kind!r}")
            last = i == len(batches) - 1
            sync = self.ddp.no_sync() if (self.ctx.distributed and not last) else contextlib.nullcontext()
            tensors = tensors_to(batch, self.ctx.device)
            images += int(tensors["image"].shape[0])
            if self.shapes is not None:
                check_batch(batch)
                tensors = pad_to_shape(tensors, kind, self.shapes)
            with sync:
                with self._autocast():
                    losses = self.run_model(kind, objectives=tuple(self.loss_weights), **tensors)
                loss = sum(self.loss_weights[name] * value for name, value in losses.items()) * scale
                loss.backward()
            for name, value in losses.items():
                sums[METRIC_KEYS.index(f"{kind}/{name}")] += float(value.detach())
            total += float(loss.detach())
            counts[kind] += 1
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip) if clip > 0 else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return total, images, float(grad_norm) if grad_norm is not None else None

    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """One iteration: its optimizer step(s) at the current lr, then one scheduler step. Returns local values."""
        sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
        counts = {kind: 0 for kind in KINDS}
        total = 0.0
        images = 0
        self.ddp.train()
        base_groups = [g for g in self.optimizer.param_groups if g.get("lr_scale", 1.0) == 1.0]
        lr = (base_groups or self.optimizer.param_groups)[0]["lr"]  # the lr of pretrained-able parameters
        grad_norms: dict[str, float | None] = {}
        groups = self._optimizer_groups(batches)
        for group, scale in groups:
            loss, seen, grad_norm = self._optimizer_step(group, scale, sums, counts)
            total += loss
            images += seen
            grad_norms[group[-1]["kind"] if len(groups) > 1 else "step"] = grad_norm
        self.scheduler.step()
        out = {"sums": sums, "counts": counts, "loss": total, "images": images, "lr": lr,
               "skips": batches[-1].get("skips") or {},
               "grad_norm": grad_norms["image_text"] if len(groups) > 1 else grad_norms["step"]}
        if len(groups) > 1:
            out["grad_norm_region"] = grad_norms["region"]
        return out

    def _reduce(self, local: dict[str, Any]) -> dict[str, Any]:
        """Means over ranks; fails when ranks disagree on the step's kinds (the plan must be shared)."""
        counts = [local["counts"][k] for k in KINDS]
        vec = torch.cat([local["sums"], torch.tensor(counts + [local["loss"], local["images"]], dtype=torch.float64)])
        if self.ctx.distributed:
            dev = self.ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
            kinds = torch.tensor(counts + [-c for c in counts], dtype=torch.int64, device=dev)
            dist.all_reduce(kinds, op=dist.ReduceOp.MAX)
            if kinds[:2].tolist() != [-v for v in kinds[2:].tolist()]:
                raise XvlmError(f"ranks disagree on the kinds of step {self.step + 1}: the loader's plan must be the "
                                "same on every rank (same seed and iter_perc everywhere)")
            vec = vec.to(dev)
            dist.all_reduce(vec)
            vec = vec.cpu()
        world = self.ctx.world_size
        n = len(METRIC_KEYS)
        losses = {}
        for kind_i, kind in enumerate(KINDS):
            c = counts[kind_i]
            if c == 0:
                continue
            for name in LOSS_NAMES[kind]:
                if name not in self.loss_weights:
                    continue
                j = METRIC_KEYS.index(f"{kind}/{name}")
                losses[f"{kind}/{name}"] = float(vec[j]) / (c * world)
        return {"losses": losses, "loss": float(vec[n + 2]) / world, "images": int(vec[n + 3]),
                "kinds": {k: counts[i] for i, k in enumerate(KINDS)}}

    # ------------------------------------------------------------------ checkpoints and evaluation
    def save_checkpoint(self) -> str:
        path = ckpt.checkpoint_path(self.cfg.out, self.step)
        if self.ctx.is_main:
            self._finish_pruning()
            ckpt.prepare_folder(path)
        distributed.barrier(self.ctx)
        error = None
        writes: list = []
        records: dict[str, dict] = {}
        try:
            writes += ckpt.start_writes(path, ckpt.rank_files(self.ctx.rank, self.stream.state_dict()))
            if self.ctx.is_main:
                # The weights upload while the optimizer state is serialised.
                writes += ckpt.start_writes(path, {ckpt.MODEL_FILE: model_to_bytes(self.model)})
                writes += ckpt.start_writes(path, ckpt.main_files(
                    optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, step=self.step,
                    extra={"eval": self.eval_results, "optimizer_steps": self.optimizer_steps},
                    config_yaml=self.cfg.to_yaml()))
        except Exception as err:  # noqa: BLE001 - every rank must learn that the checkpoint failed
            error = err
        try:
            records = ckpt.finish_writes(writes)   # also after a failure: no write is left running behind it
        except Exception as err:  # noqa: BLE001
            error = error or err
        if not distributed.all_ok(self.ctx, error is None):
            raise XvlmError(f"checkpoint step {self.step} failed on at least one rank"
                            + (f": {error}" if error else "")) from error
        every_rank = distributed.gather_objects(self.ctx, records)   # sizes and hashes for the marker
        if self.ctx.is_main:
            self.metrics.sync()   # never raises: a failed upload is retried at the next checkpoint
            ckpt.commit(path, self.step, self.ctx.world_size, {k: v for part in every_rank for k, v in part.items()})
            # Old checkpoints go in the background while training goes on (a kill meanwhile is harmless: their
            # markers go first); the next save waits for it.
            self._pruning = self._housekeeping.submit(ckpt.prune, self.cfg.out, self.cfg.checkpoint.keep)
        return path

    def _finish_pruning(self) -> None:
        if self._pruning is None:
            return
        try:
            for removed in self._pruning.result():
                log.info("removed old checkpoint %s", removed)
        except Exception as err:  # noqa: BLE001 - housekeeping: a failed delete must not stop training
            log.warning("could not remove old checkpoints: %s", err)
        self._pruning = None

    def maybe_evaluate(self) -> dict[str, Any] | None:
        """Every `eval.every` steps, rank 0 evaluates on `eval.datasets`; the other ranks wait at a barrier."""
        every = self.cfg.eval.every
        if not every or self.step % every or not self.cfg.eval.datasets:
            return None
        fn = self.evaluate
        if fn is None:
            try:
                from train.evaluate import evaluate as fn
            except ImportError:
                log.warning("eval.every is set but train.evaluate is not available; skipping evaluation")
                return None
        result: dict[str, Any] = {}
        if self.ctx.is_main:
            saved = ckpt.rng_state()  # evaluation must not shift the training RNG streams
            self.model.eval()
            try:
                with torch.no_grad(), self._autocast():
                    result = fn(self.model, self.cfg, device=self.ctx.device) or {}
            finally:
                self.model.train()
                ckpt.set_rng_state(saved)
        distributed.barrier(self.ctx)
        self.eval_results = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        return self.eval_results if self.ctx.is_main else None

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        total_steps = cfg.schedule.steps
        if self.ctx.is_main:
            storage.write_text(storage.join(cfg.out, "config.yaml"), cfg.to_yaml())
        start_step = self.step
        start = time.perf_counter()
        data_wait_total = 0.0
        last = {}
        while self.step < total_steps:
            t0 = time.perf_counter()
            batches = self.step_batches()
            waited = time.perf_counter() - t0
            local = self.train_step(batches)
            reduced = self._reduce(local)
            self.step += 1
            elapsed = time.perf_counter() - t0  # data + compute of this step (not the last step's checkpoint)
            data_wait_total += waited
            if not all(math.isfinite(v) for v in reduced["losses"].values()):
                raise XvlmError(f"a loss is not finite at step {self.step}: {reduced['losses']} "
                                "(lower optim.lr or check the data)")
            entry = {"step": self.step, "optimizer_steps": self.optimizer_steps, "loss": reduced["loss"],
                     "losses": reduced["losses"], "lr": local["lr"], "kinds": reduced["kinds"],
                     "grad_norm": local["grad_norm"],
                     "samples_per_s": reduced["images"] / elapsed if elapsed > 0 else None,
                     "data_wait_frac": waited / elapsed if elapsed > 0 else None,
                     "skips": local["skips"], "time": time.time()}
            if "grad_norm_region" in local:
                entry["grad_norm_region"] = local["grad_norm_region"]
            evaluated = self.maybe_evaluate()
            if evaluated is not None:
                entry["eval"] = evaluated
            if self.step % cfg.logging.every == 0 or self.step == total_steps:
                postfix = {"opt_steps": self.optimizer_steps, "loss": f"{reduced['loss']:.3f}",
                           "lr": f"{local['lr']:.2e}",
                           "img/s": f"{entry['samples_per_s'] or 0:.1f}", "wait": f"{entry['data_wait_frac'] or 0:.0%}"}
            else:
                postfix = None
            self.metrics.log(entry, postfix)
            last = entry
            if self.step % cfg.checkpoint.every == 0 or self.step == total_steps:
                self.save_checkpoint()
        wall = time.perf_counter() - start
        self._finish_pruning()
        self.metrics.close()
        steps_run = self.step - start_step
        return {"rank": self.ctx.rank, "world_size": self.ctx.world_size, "steps": self.step,
                "optimizer_steps": self.optimizer_steps, "steps_run": steps_run, "start_step": start_step, "wall_s": wall,
                "data_wait_frac": data_wait_total / wall if wall > 0 else 0.0, "last": last,
                "eval": self.eval_results, "out": cfg.out,
                "checkpoint": ckpt.checkpoint_path(cfg.out, self.step) if steps_run or start_step else None}


def train(cfg: TrainConfig, *, device: torch.device | str | None = None, stream: Any = None,
          evaluate: EvaluateFn | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (steps, wall time, last metrics, eval results, out).

    Works in one process, under torchrun (RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPU, gloo on CPU) and in a Ray
    Train worker whose process group is already set up. `stream` replaces the loader (anything with __iter__,
    state_dict and load_state_dict yielding batches per docs/batches.md); `evaluate(model, cfg, device=...) -> dict`
    replaces train.evaluate.evaluate for the periodic evaluation (`eval.every`, on rank 0).
    """
    cfg.validate()
    ctx = distributed.setup(device)
    try:
        trainer = Trainer(cfg, ctx, stream=stream, evaluate=evaluate)
        return trainer.run()
    finally:
        distributed.teardown(ctx)
