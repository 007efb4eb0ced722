"""`xvlm import-xvlm`: an official X-VLM checkpoint (the .pth / .th its scripts save) -> our model folder."""
from __future__ import annotations

import argparse
import io
import json
import logging
import pickle
import shlex
import zipfile
from typing import Any

import torch

from model.errors import ModelError
import storage
from train.checkpoint import IMPORT_REPORT, MODEL_FILE

log = logging.getLogger(__name__)


DESCRIPTION = (
    "Import an official X-VLM checkpoint (github.com/zengyan-97/X-VLM): the dict Pretrain.py saves ({'model': ...,\n"
    "'config': ...}; 4M and 16M base), or a fine-tuned one (Retrieval.py, Grounding_bbox.py: text keys without\n"
    "`bert.`, no MLM head). It is read with torch.load(weights_only=True): a file that needs code execution is\n"
    "refused. Every tensor is mapped onto our X-VLM (Swin tower in timm, BERT layers from transformers, heads);\n"
    "Swin's relative position indices and window masks and BERT's position_ids are checked against ours, not\n"
    "copied. An unmapped, missing or mis-shaped tensor is an error naming the key.\n"
    "Writes OUT/model.safetensors (weights + model config: `xvlm train model.init=OUT`, `xvlm eval --checkpoint\n"
    "OUT`) and OUT/import.json (what was mapped and checked, the checkpoint's own config)."
)
EPILOG = (
    "examples:\n"
    "  xvlm import-xvlm 4m_base_model_state_step_199999.th --out models/xvlm-4m\n"
    "  xvlm import-xvlm checkpoint_best.pth --out models/xvlm-coco --new-heads      # a Retrieval fine-tune at 384 px\n"
    "  xvlm import-xvlm 16m_base_model_state_step_199999.th --out models/xvlm-16m --preset base   # must be base\n"
    "  xvlm eval --checkpoint models/xvlm-4m --data data/shards-val --tokenizer bert-base-uncased/\n"
    "CPU round trip with random base weights (no download, about a minute):\n"
    "  python -c \"from model.config import preset; from model.xvlm import build_model; from model.io import save_model; \\\n"
    "    save_model(build_model(preset('base')), '/tmp/x/model.safetensors')\"\n"
    "  xvlm export-xvlm /tmp/x --out /tmp/x.pth && xvlm import-xvlm /tmp/x.pth --out /tmp/y"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="official X-VLM checkpoint file (local or s3://)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (local or s3://)")
    parser.add_argument("--preset", default="auto", choices=["auto", "base"],
                        help="auto (default): our base model with the sizes the checkpoint's tensors show (a "
                             "pretrained X-VLM-base at 224 px gives exactly `base`; fine-tunes at 384 px give window "
                             "12); base: the tensors must fit the base preset, else the first mismatching key is "
                             "named with both shapes")
    parser.add_argument("--new-heads", action="store_true",
                        help="initialise the heads the checkpoint does not have (fine-tunes: MLM head; Retrieval: box "
                             "head; Grounding_bbox: ITC, ITM and MLM heads) freshly; without it such a checkpoint is "
                             "refused. The new heads are listed in import.json")
    parser.add_argument("--text-heads", type=int, help="BERT attention heads (--preset auto; default width / 64)")
    parser.add_argument("--image-res", type=int,
                        help="image resolution (--preset auto; default the checkpoint config's image_res)")


# ---------------------------------------------------------------------------------------------- reading
def _unpickle_refusal(err: Exception) -> str:
    """The line of torch's weights_only refusal that names what the file wanted to execute."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.split(" Please use")[0].removeprefix("WeightsUnpickler error: ").rstrip(".")
    return lines[0] if lines else type(err).__name__


def load_checkpoint_bytes(data: bytes, source: str) -> Any:
    """torch.load(weights_only=True) with one clear line for each way it can fail."""
    if data[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(io.BytesIO(data)):
        raise ModelError(f"{source} is truncated or damaged: a zip archive without its central directory "
                        f"({len(data):,} bytes); download it again")
    if data[:4] != b"PK\x03\x04" and data[:1] != b"\x80":
        raise ModelError(f"{source} is not a torch checkpoint (neither torch's zip format nor a pickle)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        resave = ("Where you trust the file, re-save its tensors: "
                  "torch.save({'model': torch.load(p, weights_only=False)['model']}, 'clean.pth')")
        if "Unsupported global" in str(err):     # the pickle names a class or function to call
            raise ModelError(f"{source} needs code execution to load, which torch.load(weights_only=True) refuses "
                            f"({_unpickle_refusal(err)}); we never unpickle code. {resave}") from err
        raise ModelError(f"{source} cannot be read with torch.load(weights_only=True) ({_unpickle_refusal(err)}): "
                        f"it is damaged, or its pickle uses operations that need code execution. {resave}") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ModelError(f"{source} is truncated or damaged: {str(err).splitlines()[0] if str(err) else err!r}") from err


def _unwrapped(state: dict[str, Any]) -> dict[str, Any]:
    """Weights saved from a DistributedDataParallel wrapper carry `module.` before every name."""
    if state and all(str(k).startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def split_checkpoint(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(weights, the checkpoint's config or None) of a loaded official checkpoint or a bare state dict."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        config = obj.get("config")
        return _unwrapped(obj["model"]), config if isinstance(config, dict) else None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _unwrapped(obj), None
    kind = f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise ModelError(f"{source} is not an X-VLM checkpoint: it holds {kind}, not {{'model': weights, 'config': ...}} "
                     "or a dict of tensors")


def read_official(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    if not storage.exists(path):
        raise ModelError(f"checkpoint {path} does not exist")
    return split_checkpoint(load_checkpoint_bytes(storage.read_bytes(path), path), path)


# ---------------------------------------------------------------------------------------------- command
def _plain(value: Any) -> Any:
    """The checkpoint's config as JSON (anything unusual as its text)."""
    return json.loads(json.dumps(value, default=str))


def train_overrides(config) -> list[str]:
    """The `model.*` overrides that make a training config describe this model (for model.init=DIR)."""
    from model.config import preset

    base = preset("base").to_dict()
    return [f"model.{k}={json.dumps(v)}" for k, v in config.to_dict().items() if base[k] != v]


def run(args: argparse.Namespace) -> int:
    from model.io import model_to_bytes
    from model.official import import_official

    state, official_config = read_official(args.checkpoint)
    log.info("read %s: %d tensors; mapping onto our X-VLM (--preset %s)", args.checkpoint, len(state), args.preset)
    model, report = import_official(state, official_config, args.checkpoint, args.preset, args.new_heads,
                                    args.text_heads, args.image_res)
    report["model_config"] = model.config.to_dict()
    report["train_overrides"] = ["model.preset=base", *train_overrides(model.config)]
    report["official_config"] = _plain(official_config)
    storage.makedirs(args.out)
    storage.write_bytes(storage.join(args.out, MODEL_FILE), model_to_bytes(model))
    storage.write_text(storage.join(args.out, IMPORT_REPORT), json.dumps(report, indent=2) + "\n")
    new = f"; new heads: {', '.join(report['new_heads'])}" if report["new_heads"] else ""
    print(f"imported {args.checkpoint} ({report['kind']} layout, {report['tensors']} tensors mapped, "
          f"{report['checked_not_copied']} checked, not copied{new}) -> {args.out}")
    overrides = " ".join(shlex.quote(o) for o in [*report["train_overrides"], f"model.init={args.out}"])
    print(f"  train from it: xvlm train --config C.yaml {overrides}")
    print(f"  evaluate it:   xvlm eval --checkpoint {args.out} --data SHARDS --tokenizer BERT_FOLDER")
    return 0
