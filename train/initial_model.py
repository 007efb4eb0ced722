"""The model a fine-tuning run starts from: a pretraining checkpoint (ours, or a folder from `xvlm import-xvlm`) in
the fine-tuning architecture (its config with the run's changes, e.g. image_res 384 and Swin window 12), the
position tables resized as X-VLM's loader resizes them (model/resize.py). Parameters the checkpoint does not hold
are new: they keep their fresh initialisation and train at lr x new_param_lr_mult (X-VLM's init_params)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

from model.config import ModelConfig
from model.errors import ModelError
from model.resize import resize_position_tables
from model.xvlm import XVLM, build_model
from storage.errors import XvlmError
from train import checkpoint as ckpt

log = logging.getLogger(__name__)


def finetune_config(base: ModelConfig, changes: dict[str, Any]) -> ModelConfig:
    """`base` (the checkpoint's config) with `changes` (the config's model section) applied; vision_kwargs merge key
    by key, so `vision_kwargs: {window_size: 12}` keeps the tower's other settings."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise XvlmError(f"config model.{unknown[0]}: not a model setting; valid: {sorted(known)}")
    values = dict(changes)
    if isinstance(values.get("vision_kwargs"), dict):
        values["vision_kwargs"] = {**base.vision_kwargs, **values["vision_kwargs"]}
    try:
        return dataclasses.replace(base, **values)
    except (ModelError, TypeError, ValueError) as err:
        raise XvlmError(f"config model section over the checkpoint's config: {err}") from err


def initial_model(init: str, changes: dict[str, Any]) -> tuple[XVLM, set[str], list[str]]:
    """(the fine-tuning model, names of its new parameters, notes on what was resized or left out) from the
    checkpoint `init`: a model .safetensors, a checkpoint folder or an `xvlm import-xvlm` folder (local or s3://).
    Call with the global RNG seeded: new parameters are initialised from it."""
    source = ckpt.read_model(init)
    config = finetune_config(source.config, changes)
    try:
        model = build_model(config)
    except (ModelError, RuntimeError, ValueError, TypeError) as err:
        raise XvlmError(f"cannot build the fine-tuning model from {init}'s config with the model section's "
                        f"changes: {err}") from err
    target = model.state_dict()
    prefix = getattr(model.vision, "num_prefix_tokens", 1)
    state, notes = resize_position_tables(source.state_dict(), target, prefix_tokens=prefix)
    mis_shaped = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items()
                  if k in target and v.shape != target[k].shape]
    if mis_shaped:
        raise XvlmError(f"checkpoint {init} does not fit the fine-tuning model ({len(mis_shaped)} tensors differ, "
                        f"e.g. {mis_shaped[0]}); change only image_res / window sizes / heads in the model section")
    unused = sorted(set(state) - set(target))
    missing = {k for k in target if k not in state}
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    parameters = {name for name, _ in model.named_parameters()}
    new = missing & parameters
    if unused:
        notes.append(f"{len(unused)} checkpoint tensor(s) unused by the fine-tuning model (e.g. {unused[0]})")
    if new:
        notes.append(f"{len(new)} new parameter(s) (not in the checkpoint), trained at the new-parameter lr "
                     f"(e.g. {sorted(new)[0]})")
    for note in notes:
        log.info("initial model: %s", note)
    return model, new, notes
