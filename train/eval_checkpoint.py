"""What `xvlm eval` evaluates and how: the checkpoint a path or `auto` names, the text settings (the command line,
else the run's config, else an imported official checkpoint's), ITM re-ranking or ITC alone, and the evaluation of
that model on held-out shards (train/evaluate.py)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

DEFAULT_K_TEST = 16


@dataclass
class CheckpointEval:
    """One `xvlm eval` request; None fields take the run's (or the imported checkpoint's) settings."""
    checkpoint: str
    data: list[str] = field(default_factory=list)
    run: str | None = None
    tokenizer: str | None = None
    max_words: int | None = None
    max_tokens: int | None = None
    k_test: int | None = None
    batch_size: int = 64
    max_images: int | None = None
    iou: float = 0.5
    device: str | None = None
    progress: bool = True


def resolve_checkpoint(checkpoint: str, run: str | None) -> tuple[str, str | None]:
    """(model file, run config path or None) for a checkpoint argument."""
    from train import checkpoint as ckpt

    if checkpoint == "auto":
        if not run:
            raise XvlmError("--checkpoint auto needs --run RUN_FOLDER (the training run's --out)")
        found = ckpt.committed_checkpoints(run)
        if not found:
            raise XvlmError(f"run {run} has no committed checkpoint (looked in {ckpt.checkpoints_root(run)})")
        checkpoint = found[-1][1]
    checkpoint = checkpoint.rstrip("/")
    if checkpoint.endswith(".safetensors"):
        if not storage.exists(checkpoint):
            raise XvlmError(f"model file {checkpoint} does not exist")
        config = storage.join(run, "config.yaml") if run else None
        return checkpoint, config
    if not storage.exists(storage.join(checkpoint, ckpt.MARKER)):
        if storage.exists(storage.join(checkpoint, ckpt.IMPORT_REPORT)):   # `xvlm import-xvlm` output: no run config
            return storage.join(checkpoint, ckpt.MODEL_FILE), storage.join(run, "config.yaml") if run else None
        raise XvlmError(f"{checkpoint} is not a committed checkpoint (no {ckpt.MARKER} marker): give a "
                        "ckpt-XXXXXXXX folder that has one, `auto` with --run, a folder from `xvlm import-xvlm`, "
                        "or a .safetensors model file")
    return storage.join(checkpoint, ckpt.MODEL_FILE), storage.join(checkpoint, ckpt.CONFIG_FILE)


def imported_text_settings(checkpoint: str, request: Any) -> None:
    """An imported official checkpoint: max_words / max_tokens default to its own config's (16M: 30, 4M: 40)."""
    from train import checkpoint as ckpt

    report_path = storage.join(checkpoint.rstrip("/"), ckpt.IMPORT_REPORT)
    if checkpoint.endswith(".safetensors") or not storage.exists(report_path):
        return
    official = json.loads(storage.read_text(report_path)).get("official_config") or {}
    for name in ("max_words", "max_tokens"):
        if getattr(request, name) is None and isinstance(official.get(name), int):
            setattr(request, name, official[name])


def text_settings(config_path: str | None, request: Any) -> dict:
    """tokenizer / max_words / max_tokens: the command line first, then the run config's data section (which also
    gives pre_caption, X-VLM's by default)."""
    settings = {"tokenizer": request.tokenizer, "max_words": request.max_words, "max_tokens": request.max_tokens,
                "pre_caption": None}
    if config_path and storage.exists(config_path) and None in settings.values():
        from train.config import load_config

        loader = load_config(config_path).data.build()
        for name in settings:
            if settings[name] is None:
                settings[name] = getattr(loader, name)
    if not settings["tokenizer"]:
        raise XvlmError("no tokenizer folder: pass --tokenizer DIR (the run config has none)")
    return {k: v for k, v in settings.items() if v is not None}


def k_test_for(config_path: str | None, k_test: int | None) -> int:
    """--k-test, else 16 — or 0 when the run's config trained no ITM head (re-ranking by it would be noise)."""
    if k_test is not None:
        return k_test
    if config_path and storage.exists(config_path):
        from train.config import load_config
        from train.evaluate import run_k_test

        if run_k_test(load_config(config_path), DEFAULT_K_TEST) == 0:
            log.info("the run trained without ITM (loss.itm: 0): ranking by ITC only (--k-test 0)")
            return 0
    return DEFAULT_K_TEST


def evaluate_checkpoint(request: CheckpointEval) -> dict[str, Any]:
    """The held-out metrics of the model `request.checkpoint` names (with "checkpoint" and "data" added)."""
    from model.io import load_model
    from train import checkpoint as ckpt
    from train.evaluate import EvalConfig, evaluate

    model_path, config_path = resolve_checkpoint(request.checkpoint, request.run)
    imported_text_settings(request.checkpoint, request)
    cfg = EvalConfig(k_test=k_test_for(config_path, request.k_test), batch_size=request.batch_size,
                     iou_threshold=request.iou, max_images=request.max_images, progress=request.progress,
                     **text_settings(config_path, request))
    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = model_path.rsplit("/", 1)[0]
    if model_path.endswith(f"/{ckpt.MODEL_FILE}") and storage.exists(storage.join(folder, ckpt.MARKER)):
        model = ckpt.read_model(folder).to(device)     # a committed checkpoint: its weights are checked first
    else:
        model = load_model(model_path).to(device)
    log.info("evaluating %s on %s (%s)", model_path, ", ".join(request.data), device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)
    with autocast:
        metrics = evaluate(model, list(request.data), cfg, device)
    return {"checkpoint": model_path, "data": list(request.data), **metrics}
