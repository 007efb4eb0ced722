"""Text and fusion encoders from transformers' BERT layers, kept bidirectional; fusion layers cross-attend to vision.

transformers builds cross-attention only in a decoder `BertLayer`, and a decoder makes self-attention causal (5.x:
an `is_causal` flag; 4.x: only when no mask is given). So we build the layers ourselves, switch causality off, and
drive them with our own bidirectional masks. Both major versions are supported (pyproject: transformers >= 4.45):
4.x layers take no `layer_idx` and return a tuple whose first element is the hidden states; 5.x return a tensor.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

from model.config import ModelConfig


def bert_config(config: ModelConfig, cross_attention: bool = False) -> BertConfig:
    """The transformers config of our text (cross_attention=False) or fusion (True) layers."""
    bert = BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.text_layers + config.fusion_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act="gelu", hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps, pad_token_id=config.pad_token_id,
        # The library only adds cross-attention to decoder layers; is_causal is switched off after building.
        is_decoder=cross_attention, add_cross_attention=cross_attention,
    )
    bert._attn_implementation = "sdpa"
    return bert


# transformers >= 4.48 numbers its layers (for caches); 4.45-4.47 take the config only.
_LAYER_TAKES_INDEX = "layer_idx" in inspect.signature(BertLayer.__init__).parameters


def bert_layer(config: BertConfig, index: int) -> BertLayer:
    """One transformers BertLayer, on either major version."""
    return BertLayer(config, layer_idx=index) if _LAYER_TAKES_INDEX else BertLayer(config)


def layer_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states a BertLayer returned: 5.x returns them, 4.x a tuple that starts with them."""
    return output[0] if isinstance(output, tuple) else output


def attention_bias(atts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, L] 1/0 key mask -> [N, 1, 1, L] additive bias (0 kept, dtype min masked): every query sees every kept key."""
    return (1.0 - atts[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_layer(layer: BertLayer, hidden: torch.Tensor, recompute: bool, **kwargs: torch.Tensor) -> torch.Tensor:
    """One layer's hidden states; with `recompute` (training) its activations are recomputed in the backward
    (torch.utils.checkpoint, non-reentrant: the same dropout masks, the same result)."""
    if recompute and torch.is_grad_enabled():
        return layer_hidden(checkpoint(layer, hidden, use_reentrant=False, **kwargs))
    return layer_hidden(layer(hidden, **kwargs))


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation (normal 0.02, LayerNorm 1/0) for modules we create outside a PreTrainedModel."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=std)
            if sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class TextEncoder(nn.Module):
    """ids [K, T], atts [K, T] -> hidden [K, T, H]: BERT embeddings + the first `text_layers` (self-attention only).

    `text_cls: mean` (config) puts the mean of the text's token states in the [CLS] position: the text's ITC
    feature and the fusion's [CLS] query then carry the words from the first step. A randomly initialised [CLS]
    is the same vector for every text until attention learns to gather into it (a long plateau when training
    from scratch); a pretrained BERT's [CLS] already gathers, so X-VLM (and the default, `cls`) keeps it.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bert = bert_config(config, cross_attention=False)
        self.embeddings = BertEmbeddings(bert)
        self.layer = nn.ModuleList([bert_layer(bert, i) for i in range(config.text_layers)])
        for layer in self.layer:
            layer.attention.self.is_causal = False
        self.pool_mean = config.text_cls == "mean"
        self.checkpointing = False      # XVLM.set_activation_checkpointing
        init_bert_weights(self)

    def forward(self, ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids=ids)
        bias = attention_bias(atts, hidden.dtype)
        for layer in self.layer:
            hidden = run_layer(layer, hidden, self.checkpointing, attention_mask=bias)
        if self.pool_mean:
            weights = atts.to(hidden.dtype).unsqueeze(-1)
            mean = (hidden * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
            hidden = torch.cat([mean, hidden[:, 1:]], dim=1)
        return hidden


class FusionEncoder(nn.Module):
    """text hidden [K, T, H] + vision [K, V, C] -> fused [K, T, H]: `fusion_layers` BERT layers with cross-attention.

    Self-attention stays bidirectional; cross-attention keys and values project from the vision width C
    (newly initialised, as in X-VLM).
    """

    def __init__(self, config: ModelConfig, vision_width: int) -> None:
        super().__init__()
        bert = bert_config(config, cross_attention=True)
        self.layer = nn.ModuleList([bert_layer(bert, i) for i in range(config.fusion_layers)])
        for layer in self.layer:
            layer.attention.self.is_causal = False       # the decoder flag must not make text attention causal
            layer.crossattention.self.is_causal = False
            cross = layer.crossattention.self
            cross.key = nn.Linear(vision_width, config.hidden_size)
            cross.value = nn.Linear(vision_width, config.hidden_size)
        self.checkpointing = False      # XVLM.set_activation_checkpointing
        init_bert_weights(self)

    def forward(self, text_hidden: torch.Tensor, text_atts: torch.Tensor,
                vision_embeds: torch.Tensor, vision_atts: torch.Tensor) -> torch.Tensor:
        hidden = text_hidden
        self_bias = attention_bias(text_atts, hidden.dtype)
        cross_bias = attention_bias(vision_atts, hidden.dtype)
        for layer in self.layer:
            hidden = run_layer(layer, hidden, self.checkpointing, attention_mask=self_bias,
                               encoder_hidden_states=vision_embeds, encoder_attention_mask=cross_bias)
        return hidden
