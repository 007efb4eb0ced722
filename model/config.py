"""The model's typed configuration: a registry of timm vision towers by name and the `tiny` / `base` presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from model.errors import ModelError

VisionFamily = Literal["swin", "vit"]


@dataclass(frozen=True)
class VisionTowerSpec:
    """How to read a timm model as an X-VLM vision tower.

    family: "swin" -> [CLS] is the average pool of the final normed tokens, grid from the final stride;
            "vit"  -> [CLS] is the class token, grid = image_res / patch size.
    timm_kwargs: defaults passed to `timm.create_model` (a config's `vision_kwargs` override them).
    """

    family: VisionFamily
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


# timm name -> how to use it. Register more with `register_vision_tower`.
VISION_TOWERS: dict[str, VisionTowerSpec] = {}


def register_vision_tower(name: str, family: VisionFamily, **timm_kwargs: Any) -> None:
    """Make the timm model `name` usable as a vision tower (`ModelConfig.vision_name`)."""
    if family not in ("swin", "vit"):
        raise ModelError(f"vision tower family must be 'swin' or 'vit', got {family!r}")
    VISION_TOWERS[name] = VisionTowerSpec(family, dict(timm_kwargs))


# X-VLM base: Swin-B window 7 at 224 with stochastic depth 0.1 (official config).
register_vision_tower("swin_base_patch4_window7_224", "swin", drop_path_rate=0.1)
register_vision_tower("swin_base_patch4_window12_384", "swin", drop_path_rate=0.1)
register_vision_tower("swin_small_patch4_window7_224", "swin", drop_path_rate=0.1)
register_vision_tower("swin_tiny_patch4_window7_224", "swin", drop_path_rate=0.1)
register_vision_tower("vit_base_patch16_224", "vit")
register_vision_tower("vit_base_patch16_384", "vit")
register_vision_tower("vit_small_patch16_224", "vit")
register_vision_tower("vit_tiny_patch16_224", "vit")
register_vision_tower("vit_base_patch16_clip_224", "vit")
# A ViT with a convolutional stem (model/convstem.py): trained from scratch it learns sooner (docs/model.md).
register_vision_tower("vit_convstem", "vit")

BoxHead = Literal["xvlm", "softargmax", "dense"]
BOX_HEADS: tuple[str, ...] = ("xvlm", "softargmax", "dense")
TextCls = Literal["cls", "mean"]
SameText = Literal["negative", "ignore"]
ItcGatherGrad = Literal["local", "sum"]
ItmPositives = Literal["diagonal", "same_box"]
# Model files written before `head_layer_norm_eps` existed built their heads with BERT's eps: read them so.
LEGACY_HEAD_LAYER_NORM_EPS = 1e-12


@dataclass
class ModelConfig:
    """Everything that decides the model's shapes; saved as JSON next to its weights."""

    # vision tower (timm)
    vision_name: str = "swin_base_patch4_window7_224"
    vision_kwargs: dict[str, Any] = field(default_factory=dict)   # overrides for timm.create_model
    image_res: int = 224
    # text + fusion (transformers BERT); the first text_layers are text-only, the next fusion_layers cross-attend
    vocab_size: int = 30522
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    text_layers: int = 6
    fusion_layers: int = 6
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    text_cls: TextCls = "cls"        # "cls": BERT's [CLS] state (X-VLM); "mean": the mean token state (from scratch)
    # heads
    embed_dim: int = 256             # ITC projection size
    temp: float = 0.07               # initial ITC temperature
    temp_min: float = 0.001
    temp_max: float = 0.5
    # ITC pairs (i, j != i) whose texts are identical (repeated object names: "hexagon", "man"): "negative" as in
    # X-VLM, or "ignore": left out of both softmaxes, so a name is not pushed away from other images' instances
    itc_same_text: SameText = "negative"
    # Backward of the cross-rank feature gather: "local" as X-VLM (each rank's features get the gradient of its own
    # loss only; models/xvlm.py AllGather), or "sum" (ours, open_clip's: every rank's gradient is summed, so after
    # DDP's average the gradient equals the single-process one on the global batch: ITC weighs N x more on N ranks)
    itc_gather_grad: ItcGatherGrad = "local"
    # Pairs ITM never draws as hard negatives: "diagonal" as X-VLM's pretraining (only a row's own pair), or
    # "same_box" (ours): in region batches also every row of the same image with the same patch mask
    itm_positives: ItmPositives = "diagonal"
    box_head: BoxHead = "xvlm"       # "xvlm" (paper's MLP on the fused [CLS]), "softargmax" or "dense" (ours)
    # LayerNorm eps of the heads (ITM, every box head): PyTorch's default 1e-5 as X-VLM's MLP heads; the text
    # and fusion layers keep BERT's `layer_norm_eps`
    head_layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.vision_name not in VISION_TOWERS:
            raise ModelError(f"unknown vision tower {self.vision_name!r}; registered: {sorted(VISION_TOWERS)} "
                            "(add one with model.config.register_vision_tower)")
        if self.box_head not in BOX_HEADS:
            raise ModelError(f"box_head must be one of {', '.join(BOX_HEADS)}, got {self.box_head!r}")
        if self.text_cls not in ("cls", "mean"):
            raise ModelError(f"text_cls must be 'cls' or 'mean', got {self.text_cls!r}")
        if self.itc_same_text not in ("negative", "ignore"):
            raise ModelError(f"itc_same_text must be 'negative' or 'ignore', got {self.itc_same_text!r}")
        if self.itc_gather_grad not in ("local", "sum"):
            raise ModelError(f"itc_gather_grad must be 'local' or 'sum', got {self.itc_gather_grad!r}")
        if self.itm_positives not in ("diagonal", "same_box"):
            raise ModelError(f"itm_positives must be 'diagonal' or 'same_box', got {self.itm_positives!r}")
        if not self.head_layer_norm_eps > 0:
            raise ModelError(f"head_layer_norm_eps must be > 0, got {self.head_layer_norm_eps}")
        if self.hidden_size % self.num_attention_heads:
            raise ModelError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                            f"{self.num_attention_heads}")
        for name in ("vocab_size", "hidden_size", "text_layers", "fusion_layers", "image_res", "embed_dim"):
            if int(getattr(self, name)) < 1:
                raise ModelError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temp_min <= self.temp <= self.temp_max:
            raise ModelError(f"temp {self.temp} must lie in [temp_min, temp_max] = [{self.temp_min}, {self.temp_max}]")

    @property
    def family(self) -> VisionFamily:
        return VISION_TOWERS[self.vision_name].family

    def timm_kwargs(self) -> dict[str, Any]:
        """Arguments for timm.create_model: registry defaults, then this config's overrides."""
        kwargs = dict(VISION_TOWERS[self.vision_name].timm_kwargs)
        kwargs.update(self.vision_kwargs)
        kwargs["img_size"] = self.image_res
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """A saved config. Files from before a field existed get the value they were built with (the heads'
        LayerNorm eps was BERT's); other absent fields take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        values = {"head_layer_norm_eps": LEGACY_HEAD_LAYER_NORM_EPS, **values}
        return cls(**values)


def _tiny(**overrides: Any) -> ModelConfig:
    # A 64 px ViT with 8 px patches (8x8 grid) and a 2+2 layer BERT of width 64: a CPU step takes milliseconds.
    values: dict[str, Any] = dict(
        vision_name="vit_tiny_patch16_224",
        vision_kwargs={"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
        image_res=64, vocab_size=30522, hidden_size=64, num_attention_heads=2, intermediate_size=128,
        text_layers=2, fusion_layers=2, max_position_embeddings=64, embed_dim=32,
    )
    values.update(overrides)
    return ModelConfig(**values)


def _base(**overrides: Any) -> ModelConfig:
    # X-VLM base: Swin-B (window 7, 224) + BERT-base split 6 text + 6 fusion layers, ~216M parameters.
    return ModelConfig(**overrides)


PRESETS = {"tiny": _tiny, "base": _base}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with field overrides, e.g. `preset("tiny", vocab_size=len(vocab))`."""
    if name not in PRESETS:
        raise ModelError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
    return PRESETS[name](**overrides)
