"""Official X-VLM checkpoint files (github.com/zengyan-97/X-VLM): reading one safely (torch.load with
weights_only=True, one clear line for each way it can fail), importing it into our model folder (model.safetensors
+ import.json), and exporting our model (a run, a checkpoint, an imported folder or a model file) as one. The
tensor mapping itself is model/official.py's."""
from __future__ import annotations

import io
import json
import logging
import pickle
import zipfile
from typing import Any

import torch

import storage
from model.errors import ModelError
from train.checkpoint import IMPORT_REPORT, MODEL_FILE

log = logging.getLogger(__name__)


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


def _plain(value: Any) -> Any:
    """The checkpoint's config as JSON (anything unusual as its text)."""
    return json.loads(json.dumps(value, default=str))


def train_overrides(config) -> list[str]:
    """The `model.*` overrides that make a training config describe this model (for model.init=DIR)."""
    from model.config import preset

    base = preset("base").to_dict()
    return [f"model.{k}={json.dumps(v)}" for k, v in config.to_dict().items() if base[k] != v]


def import_checkpoint(checkpoint: str, out: str, preset: str = "auto", new_heads: bool = False,
                      text_heads: int | None = None, image_res: int | None = None) -> dict[str, Any]:
    """Map an official checkpoint onto our X-VLM, write OUT/model.safetensors and OUT/import.json; returns the
    import report (what was mapped and checked, the overrides that make a training config describe the model)."""
    from model.io import model_to_bytes
    from model.official import import_official

    state, official_config = read_official(checkpoint)
    log.info("read %s: %d tensors; mapping onto our X-VLM (--preset %s)", checkpoint, len(state), preset)
    model, report = import_official(state, official_config, checkpoint, preset, new_heads, text_heads, image_res)
    report["model_config"] = model.config.to_dict()
    report["train_overrides"] = ["model.preset=base", *train_overrides(model.config)]
    report["official_config"] = _plain(official_config)
    storage.makedirs(out)
    storage.write_bytes(storage.join(out, MODEL_FILE), model_to_bytes(model))
    storage.write_text(storage.join(out, IMPORT_REPORT), json.dumps(report, indent=2) + "\n")
    return report


def model_file(source: str) -> str:
    """The model .safetensors file that `source` names."""
    from train import checkpoint as ckpt

    source = source.rstrip("/")
    if source.endswith(".safetensors"):
        if not storage.exists(source):
            raise ModelError(f"model file {source} does not exist")
        return source
    direct = storage.join(source, ckpt.MODEL_FILE)
    if storage.exists(direct):
        return direct
    found = ckpt.committed_checkpoints(source)
    if found:
        return storage.join(found[-1][1], ckpt.MODEL_FILE)
    raise ModelError(f"{source} holds no model: give a run folder with a committed checkpoint, a checkpoint or "
                     "imported folder with model.safetensors, or a .safetensors file")


def export_checkpoint(source: str, out: str) -> tuple[str, int]:
    """Write the model `source` names to `out` in the official layout; returns (the model file read, entries)."""
    from model.io import model_from_bytes
    from model.official import export_official, official_config

    path = model_file(source)
    model = model_from_bytes(storage.read_bytes(path), source=path)
    state = export_official(model)
    if model.config.head_layer_norm_eps != 1e-5:
        log.warning("this model's heads use LayerNorm eps %g; the official heads use 1e-5, so its ITM and box outputs "
                    "will differ slightly there", model.config.head_layer_norm_eps)
    with storage.atomic_write(out) as f:
        torch.save({"model": state, "config": official_config(model.config, state)}, f)
    return path, len(state)
