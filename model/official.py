"""The official X-VLM checkpoint layout (github.com/zengyan-97/X-VLM) and ours: key mapping both ways, the model
sizes read off the tensors, and the buffers the official code stores but we recompute.

Written from the official model files (models/xvlm.py, models/model_pretrain.py, models/swin_transformer.py,
models/xbert.py, configs/config_swinB_224.json, configs/config_bert.json); no code of theirs is used.

Official state_dict (the `model` entry of a checkpoint)        ours (model.xvlm.XVLM)
  vision_encoder.patch_embed.* / .norm.*                        vision.backbone.patch_embed.* / .norm.*
  vision_encoder.layers.i.blocks.j.*                            vision.backbone.layers.i.blocks.j.*
  vision_encoder.layers.i.downsample.* (end of stage i)         vision.backbone.layers.{i+1}.downsample.* (timm:
                                                                start of stage i+1; same tensors, same order)
  vision_encoder.layers.i.blocks.j.attn.relative_position_index  recomputed by timm: checked, not copied
  vision_encoder.layers.i.blocks.j.attn_mask (shifted blocks)    recomputed by timm: checked, not copied
  text_encoder.bert.embeddings.*                                text.embeddings.*
  text_encoder.bert.embeddings.position_ids                     recomputed: checked, not copied
  text_encoder.bert.encoder.layer.k.* (k < fusion_layer)        text.layer.k.*
  text_encoder.bert.encoder.layer.k.* (k >= fusion_layer)       fusion.layer.{k - fusion_layer}.*
  text_encoder.cls.predictions.*                                mlm_head.cls.predictions.* (decoder.weight is
                                                                tied to the word embeddings, decoder.bias to bias)
  vision_proj.*, text_proj.*, temp                              itc.vision_proj.*, itc.text_proj.*, itc.temp
  itm_head.{0,1,3}.*                                            itm_head.net.{0,1,3}.*
  bbox_head.{0,1,3}.*                                           box_head.mlp.net.{0,1,3}.*
Fine-tuned checkpoints (Retrieval.py, Grounding_bbox.py) hold a BertModel: `text_encoder.embeddings.*`,
`text_encoder.encoder.layer.*`, no `bert.` and no MLM head; Retrieval has no box head, Grounding_bbox only a box head.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from model.config import ModelConfig, preset
from model.errors import ModelError

PRETRAIN_TEXT = "text_encoder.bert."
FINETUNE_TEXT = "text_encoder."
MLM_PREFIX = "text_encoder.cls.predictions."
# Our heads, by the prefix of their parameters; a checkpoint may lack a whole head (fine-tuned ones do).
HEADS = {"itc": "itc.", "itm_head": "itm_head.", "mlm_head": "mlm_head.", "box_head": "box_head."}
SIMPLE = [("vision_proj.", "itc.vision_proj."), ("text_proj.", "itc.text_proj."), ("itm_head.", "itm_head.net."),
          ("bbox_head.", "box_head.mlp.net."), (MLM_PREFIX, "mlm_head.cls.predictions.")]
# Tied tensors: the official file stores them under both names; we store the first and check the second.
TIED = {"mlm_head.cls.predictions.decoder.weight": "text.embeddings.word_embeddings.weight",
        "mlm_head.cls.predictions.decoder.bias": "mlm_head.cls.predictions.bias"}
SWIN_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
SWIN_BUFFER = re.compile(r"^layers\.\d+\.blocks\.\d+\.(attn_mask|attn\.relative_position_index)$")
BERT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
CROSS_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.crossattention\.")
SWIN_BLOCK = re.compile(r"^vision_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$")
# timm's Swin-B at 224 / window 7, the name our base preset uses; other Swin sizes are its kwargs.
SWIN_B = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "window_size": 7}
HEAD_DIM = 64   # BERT's head width at every size (base 768/12, large 1024/16): the head count is not in the tensors


@dataclass
class Layout:
    """Where the text tower of an official checkpoint lives and where its fusion layers start."""

    text_prefix: str          # PRETRAIN_TEXT or FINETUNE_TEXT
    fusion_layer: int         # first BERT layer with cross-attention
    text_layers: int          # BERT layers in all

    @property
    def kind(self) -> str:
        return "pretrain" if self.text_prefix == PRETRAIN_TEXT else "finetune"


@dataclass
class Mapped:
    """An official state dict in our names."""

    state: dict[str, torch.Tensor]                          # our key -> tensor
    source: dict[str, str]                                  # our key -> official key
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)   # official buffer key -> tensor (to check)
    tied: dict[str, torch.Tensor] = field(default_factory=dict)      # our tied key -> tensor (to check)


# ---------------------------------------------------------------------------------------------- layout
def layout(state: dict[str, torch.Tensor], source: str) -> Layout:
    """The text layout of an official state dict; a clear error when it is not an X-VLM one."""
    if not any(k.startswith("vision_encoder.") for k in state) or not any(k.startswith("text_encoder.") for k in state):
        shown = ", ".join(sorted(state)[:5]) or "none"
        raise ModelError(f"{source} is not an X-VLM checkpoint: it has no vision_encoder.* and text_encoder.* "
                        f"weights (first keys: {shown})")
    if any(k.startswith(PRETRAIN_TEXT + "encoder.") for k in state):
        prefix = PRETRAIN_TEXT
    elif any(k.startswith(FINETUNE_TEXT + "encoder.") for k in state):
        prefix = FINETUNE_TEXT
    else:
        raise ModelError(f"{source}: no BERT layers under text_encoder.bert.encoder.* or text_encoder.encoder.*")
    layers, cross = set(), set()
    for key in state:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if match := BERT_LAYER.match(rest):
                layers.add(int(match.group(1)))
            if match := CROSS_LAYER.match(rest):
                cross.add(int(match.group(1)))
    if not cross:
        raise ModelError(f"{source}: no BERT layer has cross-attention (crossattention.*): not an X-VLM text tower")
    fusion_layer = min(cross)
    if cross != set(range(fusion_layer, len(layers))) or layers != set(range(len(layers))):
        raise ModelError(f"{source}: the BERT layers {sorted(layers)} with cross-attention in {sorted(cross)} are "
                        "not X-VLM's split (text-only layers, then fusion layers to the end)")
    return Layout(prefix, fusion_layer, len(layers))


# ---------------------------------------------------------------------------------------------- official -> ours
def _vision_key(rest: str) -> str | None:
    """Our key of `vision_encoder.<rest>`, or None for a buffer we recompute."""
    if SWIN_BUFFER.match(rest):
        return None
    if match := SWIN_DOWNSAMPLE.match(rest):
        return f"vision.backbone.layers.{int(match.group(1)) + 1}.downsample.{match.group(2)}"
    return "vision.backbone." + rest


def _text_key(rest: str, lay: Layout) -> str | None:
    """Our key of a BERT key (prefix removed), or None for position_ids (recomputed)."""
    if rest == "embeddings.position_ids":
        return None
    if rest.startswith("embeddings."):
        return "text." + rest
    if match := BERT_LAYER.match(rest):
        index, tail = int(match.group(1)), match.group(2)
        if index < lay.fusion_layer:
            return f"text.layer.{index}.{tail}"
        return f"fusion.layer.{index - lay.fusion_layer}.{tail}"
    return "?" + rest     # no place in our model: reported as unmapped


def to_ours(key: str, lay: Layout) -> str | None:
    """Our name for an official key; None for a recomputed buffer; a name starting with "?" for an unmapped key."""
    if key.startswith("vision_encoder."):
        return _vision_key(key[len("vision_encoder."):])
    if key == "temp":
        return "itc.temp"
    for theirs, ours in SIMPLE:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    if key.startswith(lay.text_prefix):
        return _text_key(key[len(lay.text_prefix):], lay)
    return "?" + key


def map_official(state: dict[str, torch.Tensor], lay: Layout, source: str) -> Mapped:
    """Rename every official tensor; the first key with no place in our model is an error naming it."""
    out = Mapped(state={}, source={})
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelError(f"{source}: entry {key} of the weights is a {type(tensor).__name__}, not a tensor")
        ours = to_ours(key, lay)
        if ours is None:
            out.buffers[key] = tensor
        elif ours.startswith("?"):
            raise ModelError(f"{source}: weight {key} {tuple(tensor.shape)} has no place in our X-VLM (not part of "
                            "the pretraining, retrieval or grounding layout: VQA / NLVR / captioning heads, a pooler "
                            "or another text tower cannot be imported)")
        elif ours in TIED:
            out.tied[ours] = tensor
        else:
            out.state[ours] = tensor
            out.source[ours] = key
    return out


# ---------------------------------------------------------------------------------------------- sizes
def _swin_sizes(state: dict[str, torch.Tensor], source: str) -> dict[str, Any]:
    proj = state.get("vision_encoder.patch_embed.proj.weight")
    if proj is None or proj.ndim != 4 or tuple(proj.shape[1:]) != (3, 4, 4):
        raise ModelError(f"{source}: vision_encoder.patch_embed.proj.weight "
                        f"{None if proj is None else tuple(proj.shape)} is not a Swin patch-4 embedding: only Swin "
                        "vision towers import (X-VLM's ViT and CLIP-ViT variants do not)")
    blocks: dict[int, dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        if match := SWIN_BLOCK.match(key):
            blocks.setdefault(int(match.group(1)), {})[int(match.group(2))] = tensor
    stages = sorted(blocks)
    depths = tuple(len(blocks[i]) for i in stages)
    tables = [blocks[i][0] for i in stages]
    sides = {round(float(t.shape[0]) ** 0.5) for t in tables}
    if len(sides) != 1:
        raise ModelError(f"{source}: the Swin stages have relative position tables of different sizes "
                        f"{[tuple(t.shape) for t in tables]}; one window size is supported")
    return {"embed_dim": int(proj.shape[0]), "depths": depths, "num_heads": tuple(int(t.shape[1]) for t in tables),
            "window_size": (sides.pop() + 1) // 2}


def _image_res(state: dict[str, torch.Tensor], official_config: dict[str, Any] | None, window: int,
               source: str) -> int:
    """config['image_res'], else read off the first stage's shifted-window mask ([windows, w*w, w*w])."""
    if official_config and isinstance(official_config.get("image_res"), int):
        return int(official_config["image_res"])
    mask = state.get("vision_encoder.layers.0.blocks.1.attn_mask")
    if mask is not None:
        return 4 * window * round(float(mask.shape[0]) ** 0.5)
    raise ModelError(f"{source} has neither a config with image_res nor a shifted-window mask to read it off: "
                     "pass --image-res")


def infer_config(state: dict[str, torch.Tensor], lay: Layout, official_config: dict[str, Any] | None,
                 source: str, text_heads: int | None = None, image_res: int | None = None) -> ModelConfig:
    """Our ModelConfig for an official checkpoint: the `base` preset with the sizes its tensors show (a pretrained
    X-VLM-base at 224 gives exactly `base`). BERT's head count is not in the tensors: width / 64 unless given."""
    swin = _swin_sizes(state, source)
    res = image_res or _image_res(state, official_config, swin["window_size"], source)
    words = state[lay.text_prefix + "embeddings.word_embeddings.weight"]
    hidden = int(words.shape[1])
    layer0 = lay.text_prefix + "encoder.layer.0."
    overrides: dict[str, Any] = {
        "image_res": res, "vocab_size": int(words.shape[0]), "hidden_size": hidden,
        "num_attention_heads": text_heads or max(1, hidden // HEAD_DIM),
        "intermediate_size": int(state[layer0 + "intermediate.dense.weight"].shape[0]),
        "text_layers": lay.fusion_layer, "fusion_layers": lay.text_layers - lay.fusion_layer,
        "max_position_embeddings": int(state[lay.text_prefix + "embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(state[lay.text_prefix + "embeddings.token_type_embeddings.weight"].shape[0]),
    }
    if "vision_proj.weight" in state:
        overrides["embed_dim"] = int(state["vision_proj.weight"].shape[0])
    elif official_config and isinstance(official_config.get("embed_dim"), int):
        overrides["embed_dim"] = int(official_config["embed_dim"])
    if official_config and isinstance(official_config.get("temp"), float):
        overrides["temp"] = float(official_config["temp"])
    if res == 384 and swin == {**SWIN_B, "window_size": 12}:
        overrides["vision_name"] = "swin_base_patch4_window12_384"     # registered under its own timm name
    else:
        kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in swin.items() if SWIN_B[k] != v}
        if kwargs:
            overrides["vision_kwargs"] = kwargs
    base = preset("base")
    return preset("base", **{k: v for k, v in overrides.items() if getattr(base, k) != v})


# ---------------------------------------------------------------------------------------------- ours -> official
def to_official(key: str, fusion_layer: int) -> str:
    """The official (pretraining layout) name of one of our keys."""
    if key.startswith("vision.backbone."):
        rest = key[len("vision.backbone."):]
        if match := SWIN_DOWNSAMPLE.match(rest):
            return f"vision_encoder.layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        return "vision_encoder." + rest
    if key == "itc.temp":
        return "temp"
    for theirs, ours in SIMPLE:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    if key.startswith("text.embeddings."):
        return PRETRAIN_TEXT + key[len("text."):]
    if match := re.match(r"^(text|fusion)\.layer\.(\d+)\.(.+)$", key):
        index = int(match.group(2)) + (fusion_layer if match.group(1) == "fusion" else 0)
        return f"{PRETRAIN_TEXT}encoder.layer.{index}.{match.group(3)}"
    raise ModelError(f"our weight {key} has no place in the official X-VLM layout")


def official_buffers(model: torch.nn.Module, text_prefix: str = PRETRAIN_TEXT) -> dict[str, torch.Tensor]:
    """The buffers the official X-VLM stores in its state dict, as our model computes them: Swin's relative position
    indices and shifted-window masks (timm keeps them out of its state dict) and BERT's position_ids."""
    out = {}
    for name, buffer in model.vision.backbone.named_buffers():
        if SWIN_BUFFER.match(name):
            out["vision_encoder." + name] = buffer
    positions = model.config.max_position_embeddings
    out[text_prefix + "embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    return out


# ---------------------------------------------------------------------------------------------- import
def _check_shapes(mapped: Mapped, own: dict[str, torch.Tensor], what: str, source: str) -> None:
    """Every official tensor has a place of the same shape in our model; the first that does not (in the file's
    order) is the error, with both shapes."""
    model = "model sized from this checkpoint" if what == "auto" else f"{what} model"
    hint = "" if what == "auto" else " (--preset auto reads the sizes off the checkpoint)"
    for ours, tensor in mapped.state.items():
        theirs = mapped.source[ours]
        if ours not in own:
            raise ModelError(f"{source}: weight {theirs} {tuple(tensor.shape)} has no counterpart {ours} in our "
                            f"{model}{hint}")
        if tuple(tensor.shape) != tuple(own[ours].shape):
            raise ModelError(f"{source}: weight {theirs} has shape {tuple(tensor.shape)} but our {model}'s "
                            f"{ours} has {tuple(own[ours].shape)}{hint}")


def _check_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor], lay: Layout, source: str) -> int:
    """The official file's recomputed buffers must equal ours (a different window, shift or resolution would not)."""
    ours = official_buffers(model, lay.text_prefix)
    for key, tensor in buffers.items():
        if key not in ours:
            raise ModelError(f"{source}: buffer {key} {tuple(tensor.shape)} has no counterpart in our model (its Swin "
                            "shifts or windows differently)")
        want = ours[key]
        if tuple(tensor.shape) != tuple(want.shape) or not torch.equal(tensor.to(want.dtype), want):
            raise ModelError(f"{source}: buffer {key} {tuple(tensor.shape)} differs from the one our model computes "
                            f"{tuple(want.shape)}: the checkpoint's window, shift, resolution or text length is not "
                            "ours")
    return len(buffers)


def _check_tied(mapped: Mapped, source: str) -> int:
    for ours, tensor in mapped.tied.items():
        partner = mapped.state.get(TIED[ours])
        if partner is None or tuple(partner.shape) != tuple(tensor.shape) or not torch.equal(partner, tensor):
            raise ModelError(f"{source}: {to_official(ours, 0)} is not tied to {mapped.source.get(TIED[ours], TIED[ours])} "
                            "as in X-VLM (our MLM decoder shares the word embeddings and its bias)")
    return len(mapped.tied)


def _absent_heads(mapped: Mapped, own: dict[str, torch.Tensor], fusion_layer: int, source: str) -> list[str]:
    """Heads the checkpoint lacks entirely (fine-tuned checkpoints); any other missing tensor is an error."""
    missing = [k for k in own if k not in mapped.state and k not in TIED]
    absent = []
    for head, prefix in HEADS.items():
        in_head = [k for k in own if k.startswith(prefix) and k not in TIED]
        if in_head and all(k in missing for k in in_head):
            absent.append(head)
    for key in missing:
        if not any(key.startswith(HEADS[head]) for head in absent):
            raise ModelError(f"{source}: weight {to_official(key, fusion_layer)} (our {key}) is missing from the "
                            "checkpoint")
    return absent


def import_official(state: dict[str, torch.Tensor], official_config: dict[str, Any] | None, source: str,
                    preset_name: str = "auto", new_heads: bool = False, text_heads: int | None = None,
                    image_res: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Our X-VLM holding an official checkpoint's weights, and a report of what was mapped and checked.

    preset_name "auto": the sizes are read off the tensors; "base" (or another preset): they must be the preset's.
    Heads the checkpoint lacks entirely (fine-tuned ones) are refused unless `new_heads`, which initialises them
    as a fresh model would (seed 0) and names them in the report.
    """
    from model.io import load_strict
    from model.xvlm import XVLM

    lay = layout(state, source)
    mapped = map_official(state, lay, source)
    ours = (official_config or {}).get("xvlm_pipeline_model_config")
    if preset_name == "auto" and isinstance(ours, dict):
        config = ModelConfig.from_dict(ours)     # one of our exports: its own config (switches included)
    elif preset_name == "auto":
        config = infer_config(state, lay, official_config, source, text_heads, image_res)
    else:
        config = preset(preset_name)
    torch.manual_seed(0)   # absent heads, when allowed, get the same fresh weights on every run
    model = XVLM(config)
    own = model.state_dict()
    _check_shapes(mapped, own, preset_name, source)
    if config.text_layers != lay.fusion_layer:
        raise ModelError(f"{source}: cross-attention starts at BERT layer {lay.fusion_layer}; the {preset_name} "
                        f"preset has {config.text_layers} text-only layers (--preset auto reads the split)")
    checked = _check_buffers(model, mapped.buffers, lay, source) + _check_tied(mapped, source)
    absent = _absent_heads(mapped, own, lay.fusion_layer, source)
    if absent and not new_heads:
        raise ModelError(f"{source} has no {', '.join(absent)} (a {lay.kind} checkpoint): pass --new-heads to "
                        "initialise them fresh, as untrained heads (whatever they score means nothing until trained)")
    allowed = {k for k in own if k in TIED or any(k.startswith(HEADS[h]) for h in absent)}
    load_strict(model, mapped.state, f"weights from {source}", allow_missing=allowed)
    report = {"source": source, "kind": lay.kind, "fusion_layer": lay.fusion_layer, "tensors": len(mapped.state),
              "checked_not_copied": checked, "new_heads": absent, "preset": preset_name}
    return model, report


# ---------------------------------------------------------------------------------------------- export
def exportable(config: ModelConfig) -> None:
    """Only models the official XVLM can express export: Swin tower, BERT [CLS], X-VLM's box head."""
    problems = []
    if config.family != "swin":
        problems.append(f"vision tower {config.vision_name} (the official code's Swin is the one we map)")
    if config.text_cls != "cls":
        problems.append(f"text_cls {config.text_cls!r} (official: the BERT [CLS] state)")
    if config.box_head != "xvlm":
        problems.append(f"box_head {config.box_head!r} (official: the MLP on the fused [CLS])")
    if problems:
        raise ModelError("this model cannot be expressed in the official X-VLM layout: " + "; ".join(problems))


def export_official(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the official (pretraining) names, buffers included, so that the official XVLM loads them
    with strict=True. Tied tensors stay shared, as in the official state dict."""
    exportable(model.config)
    out = {to_official(key, model.config.text_layers): tensor.detach()
           for key, tensor in model.state_dict().items()}
    out.update(official_buffers(model))
    return out


def official_config(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The `config` entry of an exported checkpoint (`state` from export_official): the official config keys that
    describe the model (plain values, readable with weights_only), the values of its Swin and BERT json files,
    and our ModelConfig."""
    swin = _swin_sizes(state, "the exported weights")
    width = swin["embed_dim"] * 2 ** (len(swin["depths"]) - 1)
    vision = {"vision_width": width, "image_res": config.image_res, "window_size": swin["window_size"],
              "embed_dim": swin["embed_dim"], "depths": list(swin["depths"]), "num_heads": list(swin["num_heads"])}
    text = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_act": "gelu",
            "hidden_size": config.hidden_size, "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.text_layers + config.fusion_layers, "fusion_layer": config.text_layers,
            "vocab_size": config.vocab_size, "max_position_embeddings": config.max_position_embeddings,
            "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.layer_norm_eps,
            "pad_token_id": config.pad_token_id, "hidden_dropout_prob": config.hidden_dropout_prob,
            "attention_probs_dropout_prob": config.attention_probs_dropout_prob, "initializer_range": 0.02,
            "encoder_width": width}
    return {"use_clip_vit": False, "use_swin": True, "use_roberta": False, "image_res": config.image_res,
            "patch_size": 4 * 2 ** (len(swin["depths"]) - 1), "embed_dim": config.embed_dim,
            "temp": config.temp, "vision_config_values": vision, "text_config_values": text,
            "xvlm_pipeline_model_config": config.to_dict()}
