"""`xvlm eval`: zero-shot retrieval R@1/5/10 and grounding accuracy of a checkpoint on held-out shards."""
from __future__ import annotations

import argparse
import json
import logging

import torch

import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

DESCRIPTION = (
    "Evaluate a model on held-out shards (datasets built by `xvlm build-shards`), deterministically (each image\n"
    "plainly resized to the model's image_res, no augmentation):\n"
    "  retrieval  image->text and text->image R@1/5/10 over the split's images and captions: ITC similarity\n"
    "             ranks every candidate, the ITM head re-ranks each query's top-k (as X-VLM); itc_* = ITC alone\n"
    "  grounding  fraction of box texts whose predicted box (the text attending to the whole image, through the\n"
    "             model's box head) has IoU >= 0.5 with the true box; mean IoU; a constant-box baseline\n"
    "The checkpoint is a ckpt-XXXXXXXX folder of a run, `auto` (the newest committed one of --run), a folder\n"
    "written by `xvlm import-xvlm` (an official X-VLM checkpoint), or a model .safetensors file. Text settings\n"
    "(tokenizer, max_words, max_tokens) come from the run's config (an imported folder: --tokenizer, and the\n"
    "official config's max_words / max_tokens)."
)
EPILOG = (
    "examples:\n"
    "  xvlm eval --checkpoint auto --run runs/tiny --data data/shards-val\n"
    "  xvlm eval --checkpoint runs/tiny/checkpoints/ckpt-00000200 --data data/shards-val --k-test 32 \\\n"
    "      --out runs/tiny/eval.json\n"
    "  xvlm eval --checkpoint s3://bucket/model.safetensors --data s3://bucket/shards-val --tokenizer tok/\n"
    "  xvlm eval --checkpoint models/xvlm-4m --data data/shards-val --tokenizer bert-base-uncased/   # imported\n"
    "  xvlm eval --checkpoint auto --run runs/tiny --data data/shards-val --max-images 100 --k-test 8   # quick"
)


DEFAULT_K_TEST = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH|auto",
                        help="a checkpoint folder (…/checkpoints/ckpt-XXXXXXXX), `auto` (newest committed checkpoint "
                             "of --run), a folder from `xvlm import-xvlm`, or a model .safetensors file; local or s3://")
    parser.add_argument("--run", help="run folder (local or s3://) for --checkpoint auto")
    parser.add_argument("--data", action="append", required=True, metavar="DATASET",
                        help="held-out dataset folder or s3:// prefix (repeatable)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the run config's data.tokenizer)")
    parser.add_argument("--max-words", type=int, help="pre_caption word limit (default: the run config's)")
    parser.add_argument("--max-tokens", type=int, help="token limit incl. [CLS] (default: the run config's)")
    parser.add_argument("--k-test", type=int, default=None,
                        help="ITM re-ranks each query's top-k ITC candidates (default 16, X-VLM uses 128 on COCO-5k; "
                             "0 = ITC ranking only, the default when the run trained without ITM: loss.itm 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images / texts / pairs per forward (default 64)")
    parser.add_argument("--max-images", type=int, help="evaluate the first N held-out samples only")
    parser.add_argument("--iou", type=float, default=0.5, help="IoU threshold of a correct box (default 0.5)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--out", help="write the metrics as JSON to this file (local or s3://)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


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


def imported_text_settings(checkpoint: str, args: argparse.Namespace) -> None:
    """An imported official checkpoint: max_words / max_tokens default to its own config's (16M: 30, 4M: 40)."""
    from train import checkpoint as ckpt

    report_path = storage.join(checkpoint.rstrip("/"), ckpt.IMPORT_REPORT)
    if checkpoint.endswith(".safetensors") or not storage.exists(report_path):
        return
    official = json.loads(storage.read_text(report_path)).get("official_config") or {}
    for name in ("max_words", "max_tokens"):
        if getattr(args, name) is None and isinstance(official.get(name), int):
            setattr(args, name, official[name])


def text_settings(config_path: str | None, args: argparse.Namespace) -> dict:
    """tokenizer / max_words / max_tokens: the command line first, then the run config's data section (which also
    gives pre_caption, X-VLM's by default)."""
    settings = {"tokenizer": args.tokenizer, "max_words": args.max_words, "max_tokens": args.max_tokens,
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


def run(args: argparse.Namespace) -> int:
    from model.io import load_model
    from train import checkpoint as ckpt
    from train.evaluate import EvalConfig, evaluate

    model_path, config_path = resolve_checkpoint(args.checkpoint, args.run)
    imported_text_settings(args.checkpoint, args)
    cfg = EvalConfig(k_test=k_test_for(config_path, args.k_test), batch_size=args.batch_size, iou_threshold=args.iou,
                     max_images=args.max_images, progress=not args.no_progress, **text_settings(config_path, args))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = model_path.rsplit("/", 1)[0]
    if model_path.endswith(f"/{ckpt.MODEL_FILE}") and storage.exists(storage.join(folder, ckpt.MARKER)):
        model = ckpt.read_model(folder).to(device)     # a committed checkpoint: its weights are checked first
    else:
        model = load_model(model_path).to(device)
    log.info("evaluating %s on %s (%s)", model_path, ", ".join(args.data), device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        metrics = evaluate(model, list(args.data), cfg, device)
    metrics = {"checkpoint": model_path, "data": list(args.data), **metrics}
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.out:
        storage.write_text(args.out, text + "\n")
    return 0
