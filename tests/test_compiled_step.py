"""The compiled step on CPU (tiny): no graph break in the forward of either batch kind, one graph per kind over 50
steps whose region batches vary in rows and images, and the features of a fast step that must not change results
(activation checkpointing, SDPA attention)."""
from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
import torch
from torch._dynamo.utils import counters

from model.config import preset
from model.synthetic import image_text_batch, region_batch
from model.xvlm import build_model
from shards.collate import pad_batch
from train.compiled import static_shapes, use_compile
from train.config import load_config
from train.loop import train

TINY = "train/configs/tiny_cpu.yaml"
OBJECTIVES = ("itc", "itm", "mlm", "bbox", "giou")


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest.py


def tiny_batches(model, rows: int, images: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    vocab, grid = model.config.vocab_size, model.grid_size
    region = region_batch(2, 2, 64, grid, vocab, 16, 4, generator=generator)
    image_text = image_text_batch(4, 64, vocab, 16, 4, generator)
    return {"region": pad_batch(region, rows, images), "image_text": pad_batch(image_text, 4, 4)}


def test_no_graph_break_in_either_batch_kind():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(preset("tiny")).train()
    for kind, batch in tiny_batches(model, 6, 3).items():
        explained = torch._dynamo.explain(model)(kind, objectives=OBJECTIVES, **batch)
        reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
        assert explained.graph_break_count == 0 and explained.graph_count == 1, (kind, reasons)


class VaryingStream:
    """Region batches of 2 to 4 rows from 1 or 2 images (as packed loader batches vary), each followed by an
    image-text batch; the loader's state_dict interface."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(0)
        self.grid = build_model(preset("tiny")).grid_size
        self.index = 0
        self.seed = seed

    def batch(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + index)
        if index % 2:
            return {"kind": "image_text", **image_text_batch(4, 64, 30522, 16, 4, generator)}
        images = 1 + index % 4 // 2
        rows = 2 + index % 3 if images == 2 else 2
        full = region_batch(images, 2, 64, self.grid, 30522, 16, 4, generator=generator)
        out = {k: v if k == "image" else v[:rows] for k, v in full.items()}
        return {"kind": "region", **out}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            batch = self.batch(self.index)
            self.index += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = state["index"]


def test_fifty_steps_compile_once_per_batch_kind(tmp_path):
    stream = VaryingStream()
    shapes = {(int(b["text_ids"].shape[0]), int(b["image"].shape[0])) for b in map(stream.batch, range(0, 100, 2))}
    assert len(shapes) >= 3                     # region batches of several row and image counts
    cfg = load_config(TINY, [f"out={json.dumps(str(tmp_path / 'run'))}", "schedule.steps=50",
                             "schedule.warmup_steps=1", "schedule.mode=summed", "schedule.iter_perc_mode=per_batch",
                             "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=1000",
                             "data.image_text_batch_size=4", "data.region_batch_size=4", "data.region_max_images=2",
                             "compile=true", "compile_backend=eager"])
    torch._dynamo.reset()
    counters.clear()
    summary = train(cfg, device="cpu", stream=stream)
    assert summary["steps"] == 50 and stream.index >= 50
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])   # one per batch kind
    assert not counters["graph_break"], dict(counters["graph_break"])
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(e["kinds"]["region"] for e in entries) and len(entries) == 50
    # the images counted are the real ones, not the padded ones
    assert {e["samples_per_s"] > 0 for e in entries} == {True}


def test_compile_setting_and_shapes():
    cfg = load_config(TINY, ["data.region_batch_size=16", "data.region_max_images=6"])
    assert cfg.compile == "auto" and static_shapes(cfg) == {"image_text": (8, 8), "region": (16, 6)}
    assert not use_compile("auto", torch.device("cpu")) and use_compile("auto", torch.device("cuda"))
    assert use_compile(True, torch.device("cpu")) and not use_compile(False, torch.device("cuda"))
    with pytest.raises(Exception, match="compile"):
        load_config(TINY, ["compile=sometimes"])


def losses_and_grads(model, batches, seed: int = 5):
    torch.manual_seed(seed)    # dropout on: the same masks both times
    model.zero_grad(set_to_none=True)
    total = 0
    losses = {}
    for kind, batch in batches.items():
        out = model(kind, objectives=OBJECTIVES, **batch)
        losses.update({f"{kind}/{k}": v.detach() for k, v in out.items()})
        total = total + sum(out.values())
    total.backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    torch.manual_seed(0)
    model = build_model(preset("tiny")).train()
    batches = tiny_batches(model, 4, 2)
    want_losses, want_grads = losses_and_grads(model, batches)
    model.set_activation_checkpointing(True)
    assert model.text.checkpointing and model.vision.backbone.grad_checkpointing
    got_losses, got_grads = losses_and_grads(model, batches)
    assert got_losses == want_losses
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-5, atol=1e-7, msg=name)


def set_attention(model, fused: bool) -> None:
    """SDPA (fused) or the explicit softmax(QK^T)V of every attention block: BERT text/fusion layers, timm blocks."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "sdpa" if fused else "eager"


@pytest.mark.parametrize("vision", ["tiny", "swin"])
def test_sdpa_attention_matches_eager_attention(vision):
    torch.manual_seed(0)
    overrides = {} if vision == "tiny" else {
        "vision_name": "swin_tiny_patch4_window7_224", "image_res": 56,
        "vision_kwargs": {"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 2], "window_size": 7,
                          "drop_path_rate": 0.0}}
    model = build_model(preset("tiny", **overrides)).eval()
    fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    assert fused, "timm attention blocks should use F.scaled_dot_product_attention"
    assert model.text.layer[0].attention.self.config._attn_implementation == "sdpa"
    res = model.config.image_res
    region = region_batch(2, 2, res, model.grid_size, model.config.vocab_size, 16, 4)
    with torch.no_grad():
        want = model("region", objectives=("itc", "mlm", "bbox"), **region)
        vision_want = model.vision(region["image"])
        set_attention(model, fused=False)
        got = model("region", objectives=("itc", "mlm", "bbox"), **region)
        vision_got = model.vision(region["image"])
    torch.testing.assert_close(vision_got, vision_want, rtol=1e-4, atol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
