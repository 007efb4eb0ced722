"""The trainer's typed configuration: nested dataclasses loaded from YAML with dotted `key=value` overrides.

One `TrainConfig` holds everything a run needs; `load_config(path, overrides)` reads, overrides, validates and
returns it, and `to_yaml()` writes the resolved config that is saved with the run. Unknown keys are errors that
name the valid ones. The `model` and `data` sections hold a preset name plus field overrides that are checked
against the model's `ModelConfig` and the loader's `LoaderConfig`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from model.errors import ModelError
from model.objectives import IMAGE_TEXT, OBJECTIVES, objectives_of
from storage.errors import XvlmError

StepMode = Literal["summed", "alternating"]
IterPercMode = Literal["xvlm", "per_batch"]
Precision = Literal["auto", "fp32", "bf16"]
Compile = Literal["auto", True, False]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
CompileBackend = Literal["inductor", "aot_eager", "eager"]
MAX_CONFIG_BYTES = 1 << 20        # a config is a few KB; a larger file is refused unread


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.safe_load without aliases: `*name` references let a few hundred bytes expand to gigabytes (an alias
    bomb), and a config never needs them."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} (YAML aliases are not allowed "
                                                          f"in xvlm configs: write the value out)", event.start_mark)
        return super().compose_node(parent, index)


def _yaml(text: str, what: str):
    """A YAML document parsed without aliases; XvlmError naming `what` when it is not valid."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:   # its message spans lines (context, caret): one line here
        raise XvlmError(f"{what} is not valid YAML: {' '.join(str(err).split())}") from err
    except RecursionError:
        raise XvlmError(f"{what} nests too deeply to be a config") from None


def _check_finite(values: Any, key: str = "") -> None:
    """Every number in a config must be finite: `optim.lr=.inf` passes `lr > 0` and turns every weight into NaN."""
    if isinstance(values, float) and not math.isfinite(values):
        raise XvlmError(f"config {key}={values!r} must be a finite number")
    if isinstance(values, dict):
        for name, value in values.items():
            _check_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            _check_finite(value, f"{key}[{i}]")


@dataclass
class ModelSection:
    """A model preset (`model.config.PRESETS`) plus `ModelConfig` field overrides, e.g. `box_head: softargmax`."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None          # safetensors weights (local or s3://) to start from instead of random init
    # recompute each transformer block's activations in the backward instead of keeping them: less memory for a
    # larger per-GPU batch, about a third more compute (model.xvlm.XVLM.set_activation_checkpointing)
    activation_checkpointing: bool = False

    def build(self):
        """The validated `ModelConfig`."""
        from model.config import preset

        return preset(self.preset, **self.overrides)


@dataclass
class DataSection:
    """Built datasets (folders or s3:// prefixes from `xvlm build-shards`), a loader preset
    (`shards.loader_config`) and `LoaderConfig` field overrides (batch sizes, tokenizer, workers...).
    `synthetic: true` trains on random in-memory batches instead (benchmarks, smoke tests)."""

    datasets: list[str] = field(default_factory=list)
    preset: str = "tiny"
    synthetic: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self, **extra: Any):
        """The validated `LoaderConfig` (extra fields, e.g. seed, win over the overrides)."""
        from shards.loader_config import preset

        return preset(self.preset, **{**self.overrides, **extra})


@dataclass
class OptimSection:
    """AdamW as X-VLM: betas (0.9, 0.98), eps 1e-8, weight decay 0.01 (none on biases / norms), new params lr x 2."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.01
    new_param_lr_mult: float = 2.0
    grad_clip: float = 1.0           # max global grad norm; 0 turns clipping off


@dataclass
class ScheduleSection:
    """Iterations, warmup then linear decay, how region and image-text batches share steps, accumulation.

    As X-VLM's Pretrain.py, the schedule counts *iterations*: with iter_perc_mode xvlm an iteration is one
    image-text optimizer step, preceded with probability iter_perc by one region optimizer step (alternating
    mode), and the learning-rate scheduler steps once per iteration, so `steps` and `warmup_steps` count
    image-text iterations and region steps train at the current lr. X-VLM 4M: 41 epochs x 4,995 = 204,795
    iterations, warmup 2,500. With iter_perc_mode per_batch (ours before) an iteration is one batch of either kind.
    """

    steps: int = 204_795             # iterations (X-VLM: epochs 41 x ceil(5,114,489 / 1,024) image-text iterations)
    warmup_steps: int = 2_500        # iterations of linear warmup from 0
    min_lr_ratio: float = 0.0        # the decay ends at lr x min_lr_ratio
    mode: StepMode = "alternating"   # alternating: one optimizer step per batch kind (X-VLM); summed (ours,
                                     # X2-VLM): the iteration's region and image-text losses in one step
    iter_perc: float = 0.5           # X-VLM's iter_perc: probability of a region step before an image-text step
    iter_perc_mode: IterPercMode = "xvlm"   # xvlm: as above (1/3 of optimizer steps are region steps at 0.5);
                                            # per_batch (ours before): each batch is a region batch w.p. iter_perc
    grad_accum: int = 1              # micro-batches (per kind) per optimizer step
    seed: int = 42


def _loss_weights(self) -> dict[str, float]:
    """{loss name: weight} of the losses to compute (weight > 0)."""
    return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) > 0}


# One field per objective of the registry (model/objectives.py), its default weight the registry's: X-VLM's five at
# 1, ours (`centre`) at 0. A new objective there is a new key here.
LossSection = dataclasses.make_dataclass(
    "LossSection", [(name, float, field(default=objective.weight)) for name, objective in OBJECTIVES.items()],
    namespace={"weights": _loss_weights, "__module__": __name__, "__doc__": (
        "Weight of each loss in the step's sum, one key per objective of model/objectives.py (X-VLM's five: all 1; "
        "`centre` is ours, 0 = off). A weight of 0 skips that loss entirely: it is not computed, so turning ITM and "
        "MLM off halves a step (ITC + box trains the quickstart fastest).")})


@dataclass
class CheckpointSection:
    """Where and how often checkpoints go; the run folder's `--out` decides the location (local or s3://)."""

    every: int = 1000                # steps between checkpoints (and one at the end)
    keep: int = 3                    # keep the newest K committed checkpoints
    resume: str = "auto"             # auto | none | a checkpoint path


@dataclass
class EvalSection:
    """Periodic evaluation on held-out shards (train/evaluate.py); off while `every` is 0 or no shards are set."""

    every: int = 0
    datasets: list[str] = field(default_factory=list)
    max_samples: int = 0             # 0: the whole held-out split
    options: dict[str, Any] = field(default_factory=dict)   # passed through to train.evaluate


FinetuneTask = Literal["", "retrieval", "grounding"]


@dataclass
class FinetuneSection:
    """Fine-tuning on X-VLM's downstream files (`xvlm finetune`, train/finetune.py); `task` empty: pretraining.

    The recipe is X-VLM's (configs/Retrieval_coco.yaml, Retrieval_flickr.yaml, Grounding_bbox.yaml): 10 epochs,
    warm-up over the first 10% of the steps, 20 pairs per GPU, 40 tokens. `xvlm finetune` turns epochs into
    schedule.steps = epochs x (entries // world size // batch_size) and schedule.warmup_steps = warmup x steps.
    """

    task: FinetuneTask = ""
    init: str = ""                   # the pretrained model (checkpoint folder, .safetensors, `xvlm import-xvlm` folder)
    train_file: list[str] = field(default_factory=list)   # coco_train.json / refcoco+_train.json (local or s3://)
    val_file: str = ""               # evaluated after every epoch (retrieval: coco_val.json; grounding: refcoco+_val.json)
    test_file: list[str] = field(default_factory=list)    # evaluated at the end (coco_test.json; refcoco+_testA/B)
    image_root: str = ""             # the folder the files' image paths are relative to
    refcoco_data: str = ""           # grounding: the folder of refs(unc).p + instances.json (default <train>/refcoco+)
    tokenizer: str = ""              # a local BERT WordPiece folder (vocab.txt / tokenizer.json)
    epochs: int = 10
    warmup: float = 0.1              # fraction of the steps (X-VLM schedular num_warmup_steps: 0.1)
    batch_size: int = 20             # per process (X-VLM batch_size_train: 20 per GPU)
    max_tokens: int = 40
    max_words: int = 30              # pre_caption's word limit (re_dataset.py / grounding_dataset.py)
    augment: bool = True             # the official training transforms (crop, flip, RandomAugment)
    k_test: int = 256                # retrieval evaluation: ITM re-ranks the top k_test by ITC (flickr: 128; 0: ITC)
    eval_every_epoch: bool = True    # evaluate val_file after each epoch (saved in the checkpoint's eval results)
    zero_shot: bool = False          # also score the test files with the initial model (before fine-tuning)

    def validate(self) -> None:
        if not self.task:
            return
        _check(bool(self.train_file), "finetune.train_file", self.train_file,
               "must name the training file(s) (coco_train.json, refcoco+_train.json)")
        _check(bool(self.image_root), "finetune.image_root", self.image_root, "must name the images' root folder")
        _check(bool(self.tokenizer), "finetune.tokenizer", self.tokenizer,
               "must name a local BERT tokenizer folder (e.g. OUT/tokenizer of xvlm sample-data)")
        _check(self.epochs >= 1, "finetune.epochs", self.epochs, "must be >= 1")
        _check(0.0 <= self.warmup < 1.0, "finetune.warmup", self.warmup, "must lie in [0, 1) (a fraction of the steps)")
        _check(self.batch_size >= 2, "finetune.batch_size", self.batch_size,
               "must be >= 2 (ITC and ITM need another pair in the batch)")
        _check(self.max_tokens >= 2, "finetune.max_tokens", self.max_tokens, "must be >= 2")
        _check(self.max_words >= 1, "finetune.max_words", self.max_words, "must be >= 1")
        _check(self.k_test >= 0, "finetune.k_test", self.k_test, "must be >= 0 (0: ranked by ITC alone)")


@dataclass
class LoggingSection:
    """Console progress bar, metrics.jsonl, TensorBoard."""

    every: int = 1                   # steps between progress-bar postfix updates (metrics.jsonl gets every step)
    tensorboard: bool = True         # used when the tensorboard package is importable
    progress: bool = True
    local_dir: str = ""              # where metrics live while the run writes to s3:// (default: a temp folder)


@dataclass
class TrainConfig:
    """Everything one training run needs. `out` is the run folder (local or s3://bucket/prefix)."""

    out: str = "runs/xvlm"
    precision: Precision = "auto"    # auto: bf16 autocast on GPU, fp32 on CPU
    deterministic: bool = True       # torch.use_deterministic_algorithms on CPU (exact resume)
    # torch.compile the model's forward (both batch kinds, padded to fixed shapes): auto = on CUDA, off on CPU
    compile: Compile = "auto"
    compile_mode: CompileMode = "default"        # reduce-overhead: CUDA graphs on top (docs/training.md)
    compile_backend: CompileBackend = "inductor"  # aot_eager / eager: no code generation (tests, debugging)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    loss: LossSection = field(default_factory=LossSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    def validate(self) -> TrainConfig:
        """Check values and the model / loader sections; raise XvlmError naming the key and what to do."""
        s, o, c = self.schedule, self.optim, self.checkpoint
        _check(s.steps >= 1, "schedule.steps", s.steps, "must be >= 1")
        _check(0 <= s.warmup_steps <= s.steps, "schedule.warmup_steps", s.warmup_steps,
               f"must lie in [0, schedule.steps={s.steps}]")
        _check(0.0 <= s.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", s.min_lr_ratio, "must lie in [0, 1]")
        _check(s.mode in ("summed", "alternating"), "schedule.mode", s.mode, "must be 'summed' or 'alternating'")
        _check(0.0 <= s.iter_perc <= 1.0, "schedule.iter_perc", s.iter_perc, "must lie in [0, 1]")
        _check(s.grad_accum >= 1, "schedule.grad_accum", s.grad_accum, "must be >= 1")
        _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
        _check(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", o.betas,
               "must be two numbers in [0, 1)")
        _check(o.eps > 0, "optim.eps", o.eps, "must be > 0")
        _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
        _check(o.new_param_lr_mult > 0, "optim.new_param_lr_mult", o.new_param_lr_mult, "must be > 0")
        _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 turns clipping off)")
        for f in dataclasses.fields(self.loss):
            _check(getattr(self.loss, f.name) >= 0, f"loss.{f.name}", getattr(self.loss, f.name),
                   "must be >= 0 (0 skips that loss)")
        region_only = (s.iter_perc == 1.0 and s.iter_perc_mode == "per_batch") or self.finetune.task == "grounding"
        image_text = objectives_of(IMAGE_TEXT)
        _check(region_only or bool(set(self.loss.weights()) & set(image_text)), "loss",
               dataclasses.asdict(self.loss), f"must keep at least one of {', '.join(image_text)} above 0 (image-text "
               "batches have no box loss; only region batches alone, schedule.iter_perc_mode=per_batch with "
               "schedule.iter_perc=1, may train the box losses alone)")
        _check(bool(self.loss.weights()), "loss", dataclasses.asdict(self.loss), "must keep at least one loss above 0")
        _check(c.every >= 1, "checkpoint.every", c.every, "must be >= 1")
        _check(c.keep >= 1, "checkpoint.keep", c.keep, "must be >= 1")
        _check(bool(c.resume), "checkpoint.resume", c.resume, "must be 'auto', 'none' or a checkpoint path")
        _check(self.eval.every >= 0, "eval.every", self.eval.every, "must be >= 0 (0 turns evaluation off)")
        _check(self.logging.every >= 1, "logging.every", self.logging.every, "must be >= 1")
        _check(bool(self.out), "out", self.out, "must name a run folder (local path or s3://bucket/prefix)")
        self.finetune.validate()
        _check(not (self.finetune.task and self.compile is True), "compile", self.compile,
               "fine-tuning runs eagerly (its batches have no fixed shape to compile for): use compile: auto or false")
        _check(bool(self.data.datasets) or self.data.synthetic or bool(self.finetune.task), "data.datasets",
               self.data.datasets,
               "must list at least one built dataset (a folder or s3:// prefix from `xvlm build-shards`)")
        try:
            model = self.model.build()
        except (XvlmError, ModelError) as err:
            raise XvlmError(f"config model section: {err}") from err
        for name, weight in self.loss.weights().items():   # what an objective needs of the model
            if self.finetune.task:      # fine-tuning's model is the --init checkpoint's (checked by train/finetune.py)
                break
            requires = OBJECTIVES[name].requires
            problem = requires(model) if requires else None
            _check(problem is None, f"loss.{name}", weight, problem or "")
        try:
            self.data.build()
        except ImportError:  # the loader is optional for config-only work; checked again when training starts
            pass
        except XvlmError as err:
            raise XvlmError(f"config data section: {err}") from err
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        for section in ("model", "data"):  # flatten: `model: {preset: tiny, box_head: ...}` as written by users
            values = out[section]
            values.update(values.pop("overrides"))
        if out["model"]["init"] is None:
            del out["model"]["init"]
        if not self.finetune.task:   # pretraining configs read as they did before the section existed
            del out["finetune"]
        if not out["model"]["activation_checkpointing"]:   # the default: a model section stays as its user wrote it
            del out["model"]["activation_checkpointing"]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return _build(cls, values, "").validate()


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise XvlmError(f"config {key}={value!r} {rule}")


# ---------------------------------------------------------------------------------------------- building


def _build(cls: type, values: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and converting scalar types."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise XvlmError(f"config section {where or 'top level'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls in (ModelSection, DataSection):
        # Any key besides the section's own fields is an override of the model / loader config (checked there).
        own = {k: v for k, v in values.items() if k in fields and k != "overrides"}
        extra = {k: v for k, v in values.items() if k not in fields}
        extra.update(values.get("overrides") or {})
        own["overrides"] = extra
        values = own
        if cls is DataSection:
            _check_loader_keys(extra, where)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        name = f"{where}." if where else ""
        raise XvlmError(f"unknown config key {name}{unknown[0]}; valid keys{' in ' + where if where else ''}: "
                        f"{sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _convert(hints[name], value, key)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against a type hint; ints become floats where a float is wanted."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except XvlmError:
                continue
        raise XvlmError(f"config {key}={value!r}: expected {_describe(hint)}")
    if origin is Literal:
        if value not in args:
            raise XvlmError(f"config {key}={value!r}: choose one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise XvlmError(f"config {key}={value!r}: expected a list of {len(args)} values")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if isinstance(value, str):  # a single shard path given on the command line
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise XvlmError(f"config {key}={value!r}: expected a list")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise XvlmError(f"config {key}={value!r}: expected a mapping")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise XvlmError(f"config {key}={value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise XvlmError(f"config {key}={value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 5e-4 without a dot as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise XvlmError(f"config {key}={value!r}: expected a number")
        if not math.isfinite(value):
            raise XvlmError(f"config {key}={value!r} must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise XvlmError(f"config {key}={value!r}: expected a string")
        return value
    return value


def _describe(hint: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(hint))


def _check_loader_keys(overrides: dict[str, Any], where: str) -> None:
    """Name the valid loader keys early (the loader module validates values when the run builds it)."""
    try:
        from shards.loader_config import LoaderConfig
    except ImportError:  # the loader is optional for config-only work; keys are checked when training starts
        return
    known = {f.name for f in dataclasses.fields(LoaderConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        own = {f.name for f in dataclasses.fields(DataSection)} - {"overrides"}
        raise XvlmError(f"unknown config key {where}.{unknown[0]}; valid keys in {where}: {sorted(known | own)}")


# ---------------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`schedule.steps=20` -> (["schedule", "steps"], 20); the value is parsed as a YAML scalar / flow value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise XvlmError(f"override {text!r} is not of the form dotted.key=value (e.g. schedule.steps=20)")
    value = _yaml(raw, f"override {text!r}: the value") if raw.strip() else ""
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the nested mapping `values` with each `a.b.c=value` applied in order."""
    out = copy.deepcopy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise XvlmError(f"override {text!r}: {'.'.join(path[:i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (local or s3://; None = the defaults), apply `key=value` overrides, validate."""
    values: dict[str, Any] = {}
    if path:
        values = read_config_values(path)
    values = apply_overrides(values, list(overrides))
    _check_finite(values)
    return TrainConfig.from_dict(values)


EXTENDS = "extends"         # a config's first key may name the config it changes (a path relative to it)
MAX_EXTENDS = 8


def read_config_values(path: str, depth: int = 0) -> dict[str, Any]:
    """The mapping a config file describes: its own keys over those of the config it `extends` (recursively;
    mappings merge key by key, anything else is replaced). E.g. the quickstart's warm-up is `extends:
    quickstart_cpu.yaml` plus the settings it changes, and runs as it is with `xvlm train --config`."""
    values = _read_config_file(path)
    base = values.pop(EXTENDS, None)
    if base is None:
        return values
    if not isinstance(base, str) or not base.endswith((".yaml", ".yml")):
        raise XvlmError(f"config file {path}: `{EXTENDS}` must name a YAML config file, got {base!r}")
    if depth >= MAX_EXTENDS:
        raise XvlmError(f"config file {path}: `{EXTENDS}` chains more than {MAX_EXTENDS} files (a cycle?)")
    return _merged(read_config_values(_beside(path, base), depth + 1), values)


def _beside(path: str, name: str) -> str:
    """`name` as written in the config at `path`: absolute (or a URL) as it is, else relative to that config."""
    import storage

    if name.startswith("/") or "://" in name:
        return name
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    return storage.join(folder, name) if storage.local_path(path) is None else os.path.join(folder, name)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML config file (local or s3://), with a clear error for every way the file can be wrong."""
    import storage

    if storage.local_path(path) is not None and os.path.exists(path) and not os.path.isfile(path):
        kind = "a folder" if os.path.isdir(path) else "not a regular file"
        raise XvlmError(f"config file {path} is {kind}; give a YAML file such as train/configs/tiny_cpu.yaml")
    try:
        raw = storage.read_bytes(path, end=MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as err:
        raise XvlmError(f"config file {path} does not exist") from err
    except OSError as err:
        raise XvlmError(f"config file {path} cannot be read: {err.strerror or err}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise XvlmError(f"config file {path} is over {MAX_CONFIG_BYTES} bytes: not a config (they are a few KB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise XvlmError(f"config file {path} is not UTF-8 text (a binary file?); give a YAML config") from None
    if "\0" in text:
        raise XvlmError(f"config file {path} holds NUL bytes (a binary file?); give a YAML config")
    values = _yaml(text, f"config file {path}") or {}
    if not isinstance(values, dict):
        raise XvlmError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    return values
