"""Weights in and out: the model's own safetensors (with its config), and pretrained towers from local files.

Nothing is downloaded: a timm checkpoint file for the vision tower, a Hugging Face BERT folder for text + fusion.
Every load is strict and names the missing or unexpected keys.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save as safetensors_save

from model.config import ModelConfig
from model.xvlm import XVLM
from model.errors import ModelError

log = logging.getLogger(__name__)

FORMAT = "xvlm-model"
FORMAT_VERSION = "1"


# ---------------------------------------------------------------------------------------------- key checks
def _key_list(keys: list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                allow_missing: set[str] | None = None) -> None:
    """Load `state` into `module`; raise ModelError listing missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    allow_missing = allow_missing or set()
    missing = [k for k in own if k not in state and k not in allow_missing]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                  if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        parts = [f"cannot load {what}:"]
        if missing:
            parts.append(f"missing keys: {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_key_list(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatches (checkpoint vs model): {_key_list(mis_shaped)}")
        raise ModelError("\n  ".join(parts))
    module.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------- own weights
def _untied_state(model: XVLM) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied tensors (safetensors refuses shared storage)."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out


def _tied_names(model: XVLM) -> set[str]:
    return set(model.state_dict()) - set(_untied_state(model))


def _sorted_metadata(data: bytes) -> bytes:
    """safetensors writes its metadata in hash-map order, which changes from process to process; rewrite the header
    with the metadata keys sorted (same length, same tensors) so that the same model always gives the same bytes."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:      # cannot happen for the same JSON; keep safetensors' own bytes if it ever does
        return data
    return data[:8] + text + b" " * (length - len(text)) + data[8 + length:]


def model_to_bytes(model: XVLM) -> bytes:
    """The model's weights as safetensors bytes with its config JSON in the metadata (the same model gives the
    same bytes)."""
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(model.config.to_dict())}
    return _sorted_metadata(safetensors_save(_untied_state(model), metadata=metadata))


def _read_header_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_len]).get("__metadata__", {})


def _saved_config(data: bytes, source: str) -> ModelConfig:
    """The config stored in a model file's metadata, after checking that it is one of ours."""
    try:
        metadata = _read_header_metadata(data)
    except (ValueError, json.JSONDecodeError) as err:
        raise ModelError(f"{source} is not a safetensors file: {err}") from err
    if metadata.get("format") != FORMAT:
        raise ModelError(f"{source} is not an xvlm model file (metadata format {metadata.get('format')!r}); "
                        "pretrained towers load with load_vision_checkpoint / load_text_checkpoint")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{source} has model format version {metadata.get('format_version')!r}; "
                        f"this code reads version {FORMAT_VERSION}")
    return ModelConfig.from_dict(json.loads(metadata["config"]))


def load_weights(model: XVLM, data: bytes, source: str = "bytes") -> None:
    """Load a saved model's weights into an existing model of the same config (strict), without building a
    second model (a resume of `base` would otherwise hold two copies)."""
    if _saved_config(data, source) != model.config:
        raise ModelError(f"{source} holds a model with another config than this one")
    load_strict(model, safetensors_load(data), f"model weights from {source}", allow_missing=_tied_names(model))


def model_from_bytes(data: bytes, source: str = "bytes") -> XVLM:
    """Build the model from its saved config and load its weights (strict)."""
    model = XVLM(_saved_config(data, source))
    load_weights(model, data, source)
    return model


def save_model(model: XVLM, path: str) -> None:
    """Write `model` to a local `path` atomically (temp name + rename) as safetensors + config.
    For object storage, write `model_to_bytes(model)` through the trainer's storage layer."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(model_to_bytes(model))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def load_model(path: str) -> XVLM:
    """Read a local model file written by save_model (for s3:// use model_from_bytes on the object's bytes)."""
    if str(path).startswith("s3://"):
        raise ModelError(f"{path}: model/ reads local files only; read the bytes through storage/ and "
                         "call model_from_bytes (train.checkpoint.read_model does)")
    if not os.path.exists(path):
        raise ModelError(f"model file {path} does not exist")
    with open(path, "rb") as f:
        return model_from_bytes(f.read(), source=str(path))


# ---------------------------------------------------------------------------------------------- checkpoints
def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch file loaded with weights_only=True (never unpickles code)."""
    if path.suffix == ".safetensors":
        return safetensors_load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for non-tensor pickles and corrupt files
        raise ModelError(f"cannot read {path} as a weights-only torch checkpoint: {err}") from err
    # Training checkpoints often wrap the weights.
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path} does not hold a flat dict of tensors")
    return obj


def load_vision_checkpoint(model: XVLM, path: str | os.PathLike) -> None:
    """Load a timm checkpoint file (.safetensors, .pth/.bin) into the vision tower.

    timm's own filter adapts it (e.g. resizes ViT position embeddings or Swin bias tables to our image_res);
    the classifier head is dropped because the tower has none.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"vision checkpoint {path} does not exist (nothing is downloaded: give a local timm file)")
    state = {k.removeprefix("module."): v for k, v in _read_tensors(path).items()}
    backbone = model.vision.backbone
    if model.vision.family == "swin":
        from timm.models.swin_transformer import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    state = checkpoint_filter_fn(state, backbone)
    state = {k: v for k, v in state.items() if not k.startswith("head.") and k != "head"}
    # Buffers timm recomputes itself (Swin's relative position index, attention masks) need not be in the file.
    buffers = {name for name, _ in backbone.named_buffers()}
    load_strict(backbone, state, f"vision tower {model.config.vision_name} from {path}", allow_missing=buffers)
    log.info("loaded vision tower weights from %s (%d tensors)", path, len(state))


BERT_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
               "num_attention_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
               "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
               "layer_norm_eps": "layer_norm_eps", "pad_token_id": "pad_token_id"}


def bert_fields(folder: str | os.PathLike) -> dict[str, object]:
    """ModelConfig fields read from a Hugging Face BERT folder's config.json, plus its layer count as
    "num_hidden_layers" (split it into text_layers + fusion_layers)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder} has no config.json: give a Hugging Face BERT model folder")
    hf = json.loads(config_path.read_text())
    if hf.get("model_type") not in (None, "bert"):
        raise ModelError(f"{folder} holds a {hf.get('model_type')!r} model; the text tower needs a BERT")
    fields = {ours: hf[theirs] for theirs, ours in BERT_FIELDS.items() if theirs in hf}
    fields["num_hidden_layers"] = hf.get("num_hidden_layers")
    return fields


def _bert_weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ModelError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")


def load_text_checkpoint(model: XVLM, folder: str | os.PathLike) -> None:
    """Load a Hugging Face BERT folder: embeddings + layers 0..N-1 -> text encoder, layers N..N+M-1 -> fusion
    encoder (self-attention and feed-forward; its cross-attention stays newly initialised), cls.predictions ->
    MLM head when present. The folder's sizes must match the config (see bert_fields)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"text checkpoint folder {folder} does not exist (nothing is downloaded)")
    cfg = model.config
    fields = bert_fields(folder)
    wrong = {k: (v, getattr(cfg, k)) for k, v in fields.items()
             if k in BERT_FIELDS.values() and k not in ("layer_norm_eps", "pad_token_id") and v != getattr(cfg, k)}
    layers = cfg.text_layers + cfg.fusion_layers
    if fields["num_hidden_layers"] != layers:
        wrong["text_layers + fusion_layers"] = (fields["num_hidden_layers"], layers)
    if wrong:
        detail = ", ".join(f"{k}: folder {a} vs config {b}" for k, (a, b) in wrong.items())
        raise ModelError(f"BERT folder {folder} does not fit the model config ({detail}); "
                        "build the config with model.io.bert_fields(folder)")
    raw = _read_tensors(_bert_weights_file(folder))
    text, fusion, mlm, skipped = {}, {}, {}, []
    for key, tensor in raw.items():
        key = key.removeprefix("bert.")
        match = LAYER_KEY.match(key)
        if key.startswith("embeddings."):
            if key.endswith(("position_ids", "token_type_ids")):   # index buffers, recomputed
                continue
            text[key] = tensor
        elif match:
            index, rest = int(match.group(1)), match.group(2)
            if index < cfg.text_layers:
                text[f"layer.{index}.{rest}"] = tensor
            else:
                fusion[f"layer.{index - cfg.text_layers}.{rest}"] = tensor
        elif key.startswith("cls.predictions."):
            mlm[key.removeprefix("cls.predictions.")] = tensor
        elif key.startswith(("pooler.", "cls.seq_relationship.")):
            skipped.append(key)   # next-sentence pooler and head: X-VLM has no use for them
        else:
            text[key] = tensor    # reported as unexpected by load_strict
    text_buffers = {name for name, _ in model.text.named_buffers()}
    load_strict(model.text, text, f"text layers from {folder}", allow_missing=text_buffers)
    cross = {name for name in model.fusion.state_dict() if ".crossattention." in name}
    load_strict(model.fusion, fusion, f"fusion layers from {folder}", allow_missing=cross)
    if mlm:
        mlm = {k.replace("decoder.weight", "__tied__"): v for k, v in mlm.items()}
        mlm.pop("__tied__", None)  # tied to the word embeddings just loaded
        mlm.pop("decoder.bias", None)
        load_strict(model.mlm_head.cls.predictions, mlm, f"MLM head from {folder}",
                    allow_missing={"decoder.weight", "decoder.bias"})
    log.info("loaded BERT %s: %d text + %d fusion layers%s; skipped %s", folder, cfg.text_layers,
             cfg.fusion_layers, " + MLM head" if mlm else "", skipped or "nothing")
