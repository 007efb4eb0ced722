"""`xvlm import-xvlm` / `xvlm export-xvlm` without the official code: the round trip is bit-exact, the key mapping
covers the official layouts both ways (their key names and shapes, taken once from the official code, are a fixture),
fine-tuned layouts need --new-heads, and every bad input is one clear line with exit 2.
(tests/test_official_xvlm.py runs the official code itself when it is available.)"""
from __future__ import annotations

import argparse
import json
import shlex
import zipfile
from pathlib import Path

import pytest
import torch

from model.config import preset
from model.errors import ModelError
from model.io import load_model, save_model
from model.official import (PRETRAIN_TEXT, Layout, export_official, import_official, official_buffers,
                            official_config, to_official, to_ours)
from model.xvlm import build_model
from tools.cli import main as xvlm

KEYS = Path(__file__).parent / "data" / "official_xvlm_base_keys.json"


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest.py


def tiny_swin(**overrides):
    """Our base model family at a size a CPU test builds in a second: Swin 32-wide, 4 stages of 2 blocks at 128 px,
    window 4 (shifted blocks in 3 stages), BERT 128-wide 2 + 2 layers."""
    values = dict(vision_kwargs={"embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], "window_size": 4},
                  image_res=128, vocab_size=1100, hidden_size=128, num_attention_heads=2, intermediate_size=256,
                  text_layers=2, fusion_layers=2, max_position_embeddings=64, embed_dim=32)
    values.update(overrides)
    return preset("base", **values)


def random_model(config, seed: int = 0):
    """A model whose every weight (LayerNorms and biases included) differs, so a swapped tensor shows."""
    torch.manual_seed(seed)
    model = build_model(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        model.itc.temp.fill_(0.06)
    return model


def official_file(model, path: Path, *, ours_config: bool = True, edit=None) -> Path:
    """An official-style checkpoint of `model`; without our config in it (as the official code writes them) and
    with `edit(state)` applied to its weights."""
    state = dict(export_official(model))
    config = official_config(model.config, state)
    if not ours_config:
        config = {k: config[k] for k in ("image_res", "embed_dim", "temp", "patch_size", "use_swin")}
    if edit:
        edit(state)
    torch.save({"model": state, "config": config}, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = random_model(tiny_swin())
    save_model(model, str(root / "ours" / "model.safetensors"))
    return model, root


# ---------------------------------------------------------------------------------------------- round trip
def test_round_trip_import_export_import_is_bit_exact(tiny, tmp_path):
    model, root = tiny
    assert xvlm(["export-xvlm", str(root / "ours"), "--out", str(tmp_path / "a.pth")]) == 0
    assert xvlm(["import-xvlm", str(tmp_path / "a.pth"), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (root / "ours" / "model.safetensors").read_bytes()
    assert xvlm(["export-xvlm", str(tmp_path / "b"), "--out", str(tmp_path / "b.pth")]) == 0
    assert (tmp_path / "b.pth").read_bytes() == (tmp_path / "a.pth").read_bytes()


def test_sizes_are_read_off_an_official_file_without_our_config(tiny, tmp_path):
    """The official code's checkpoints carry only its own config: the sizes come from the tensors (and its
    image_res); BERT's head count is width / 64. The weights arrive bit for bit."""
    model, _ = tiny
    path = official_file(model, tmp_path / "official.pth", ours_config=False)
    assert xvlm(["import-xvlm", str(path), "--out", str(tmp_path / "b")]) == 0
    imported = load_model(str(tmp_path / "b" / "model.safetensors"))
    assert imported.config == model.config
    for (name, mine), theirs in zip(model.state_dict().items(), imported.state_dict().values()):
        assert torch.equal(mine, theirs), name
    report = json.loads((tmp_path / "b" / "import.json").read_text())
    assert report["kind"] == "pretrain" and report["new_heads"] == [] and report["official_config"]["image_res"] == 128
    # 4 stages x 2 blocks of relative position indices, 3 shifted-window masks, position_ids; 2 tied MLM tensors
    assert report["checked_not_copied"] == 8 + 3 + 1 + 2


def test_the_pretrained_base_layout_gives_exactly_the_base_preset():
    """A pretrained X-VLM-base (Swin-B 224 / window 7, BERT-base 6 + 6) imports as our `base` preset unchanged, and a
    384 px / window 12 fine-tune as base with the registered window-12 tower."""
    from model.official import infer_config, layout

    keys = json.loads(KEYS.read_text())
    state = {k: torch.empty(shape) for k, shape in keys["pretrain"]}
    assert infer_config(state, layout(state, "f"), {"image_res": 224, "embed_dim": 256, "temp": 0.07}, "f") == \
        preset("base")
    for key in [k for k in state if k.endswith("relative_position_bias_table")]:
        state[key] = torch.empty(23 * 23, state[key].shape[1])        # window 12
    config = infer_config(state, layout(state, "f"), {"image_res": 384}, "f")
    assert config == preset("base", image_res=384, vision_name="swin_base_patch4_window12_384")


# ---------------------------------------------------------------------------------------------- key coverage
def _base_on_meta():
    try:
        with torch.device("meta"):
            return build_model(preset("base"))
    except NotImplementedError:       # timm 1.0.9 cannot build Swin on meta (the low-end CI run)
        return build_model(preset("base"))


def test_export_has_exactly_the_official_base_keys_and_shapes():
    """The official key names and shapes (tests/data/official_xvlm_base_keys.json, listed once from the official
    models/model_pretrain.py XVLM at base size) are exactly what we export: strict=True cannot miss."""
    expected = {k: tuple(shape) for k, shape in json.loads(KEYS.read_text())["pretrain"]}
    model = _base_on_meta()
    exported = {k: tuple(v.shape) for k, v in export_official(model).items()}
    assert sorted(set(expected) - set(exported)) == [] and sorted(set(exported) - set(expected)) == []
    assert exported == expected


@pytest.mark.parametrize("kind", ["pretrain", "retrieval", "grounding"])
def test_every_official_key_has_one_place_in_our_base_model(kind):
    """Official -> ours: every key of each official layout maps to one of our tensors with its shape, or is a buffer
    we recompute (checked), or a tied copy; for pretraining every one of our tensors is reached."""
    official = {k: tuple(shape) for k, shape in json.loads(KEYS.read_text())[kind]}
    model = _base_on_meta()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = PRETRAIN_TEXT if kind == "pretrain" else "text_encoder."
    lay = Layout(prefix, 6, 12)
    buffers = official_buffers(model, prefix)
    reached = set()
    for key, shape in official.items():
        mine = to_ours(key, lay)
        if mine is None:
            assert key in buffers and tuple(buffers[key].shape) == shape, key
            continue
        assert not mine.startswith("?") and ours[mine] == shape, (key, mine)
        assert to_official(mine, 6).removeprefix(PRETRAIN_TEXT) == key.removeprefix(prefix), key
        reached.add(mine)
    if kind == "pretrain":
        assert reached == set(ours)
    else:
        missing_heads = {k.split(".")[0] for k in set(ours) - reached}
        assert missing_heads == ({"mlm_head", "box_head"} if kind == "retrieval" else {"mlm_head", "itc", "itm_head"})


# ---------------------------------------------------------------------------------------------- fine-tuned layouts
def _finetune(kind: str):
    """The official fine-tuning layouts: a BertModel without `bert.` and without the MLM head; Retrieval keeps ITC
    and ITM, Grounding_bbox only the box head."""
    dropped = ("bbox_head.",) if kind == "retrieval" else ("vision_proj.", "text_proj.", "temp", "itm_head.")

    def edit(state: dict) -> None:
        for key in list(state):
            value = state.pop(key)
            if key.startswith(("text_encoder.cls.", *dropped)):
                continue
            state[key.replace(PRETRAIN_TEXT, "text_encoder.")] = value
    return edit


@pytest.mark.parametrize("kind,new", [("retrieval", ["mlm_head", "box_head"]),
                                      ("grounding", ["itc", "itm_head", "mlm_head"])])
def test_fine_tuned_checkpoints_need_new_heads_and_keep_every_tensor(tiny, tmp_path, capsys, kind, new):
    model, _ = tiny
    path = official_file(model, tmp_path / f"{kind}.pth", ours_config=False, edit=_finetune(kind))
    assert xvlm(["import-xvlm", str(path), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"has no {', '.join(new)}" in err and "--new-heads" in err
    assert not (tmp_path / "refused").exists()
    assert xvlm(["import-xvlm", str(path), "--out", str(tmp_path / "b"), "--new-heads"]) == 0
    assert json.loads((tmp_path / "b" / "import.json").read_text())["new_heads"] == new
    imported = load_model(str(tmp_path / "b" / "model.safetensors"))
    kept = [k for k in model.state_dict() if not any(k.startswith(h + ".") for h in new)]
    assert len(kept) > 100
    for key in kept:
        assert torch.equal(model.state_dict()[key], imported.state_dict()[key]), key


# ---------------------------------------------------------------------------------------------- errors
def _edited(key: str, change):
    def edit(state: dict) -> None:
        state[key] = change(state[key]) if key in state else change(None)
    return edit


ERRORS = {
    "unmapped": (_edited("text_encoder.bert.pooler.dense.weight", lambda _: torch.zeros(128, 128)),
                 "text_encoder.bert.pooler.dense.weight (128, 128) has no place in our X-VLM"),
    "missing": (lambda s: s.pop("vision_encoder.layers.1.blocks.0.mlp.fc1.bias"),
                "weight vision_encoder.layers.1.blocks.0.mlp.fc1.bias (our vision.backbone.layers.1.blocks.0.mlp.fc1"
                ".bias) is missing"),
    "missing downsample": (lambda s: s.pop("vision_encoder.layers.0.downsample.norm.weight"),
                           "weight vision_encoder.layers.0.downsample.norm.weight (our vision.backbone.layers.1."
                           "downsample.norm.weight) is missing"),
    "shape": (_edited("itm_head.3.weight", lambda t: torch.zeros(3, t.shape[1])),
              "weight itm_head.3.weight has shape (3, 256) but our model sized from this checkpoint's "
              "itm_head.net.3.weight has (2, 256)"),
    "window mask": (_edited("vision_encoder.layers.0.blocks.1.attn_mask", lambda t: torch.zeros_like(t)),
                    "buffer vision_encoder.layers.0.blocks.1.attn_mask (64, 16, 16) differs"),
    "position index": (_edited("vision_encoder.layers.2.blocks.0.attn.relative_position_index", lambda t: t.flip(0)),
                       "buffer vision_encoder.layers.2.blocks.0.attn.relative_position_index (16, 16) differs"),
    "position ids": (_edited("text_encoder.bert.embeddings.position_ids", lambda t: t[:, :32]),
                     "buffer text_encoder.bert.embeddings.position_ids (1, 32) differs"),
    "untied": (_edited("text_encoder.cls.predictions.decoder.weight", lambda t: t + 1),
               "text_encoder.cls.predictions.decoder.weight is not tied"),
    "no cross-attention": (lambda s: [s.pop(k) for k in list(s) if ".crossattention." in k],
                           "no BERT layer has cross-attention"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_a_bad_tensor_is_an_error_naming_its_key(tiny, tmp_path, capsys, case):
    model, _ = tiny
    edit, message = ERRORS[case]
    path = official_file(model, tmp_path / "bad.pth", ours_config=False, edit=edit)
    assert xvlm(["import-xvlm", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


class Opaque:   # any class: unpickling it would run code
    pass


def _files(tmp_path: Path, tiny_path: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.pth"
    text.write_text("just some text\n")
    other = tmp_path / "other.pth"
    torch.save({"weights": {"a": torch.zeros(2)}, "epoch": 3}, other)
    flat = tmp_path / "flat.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, flat)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_path.read_bytes()[: tiny_path.stat().st_size // 2])
    code = tmp_path / "code.pth"
    torch.save({"model": {"temp": torch.tensor(0.07)}, "config": argparse.Namespace(lr=1e-4), "x": Opaque()}, code)
    damaged = tmp_path / "damaged.pth"  # a sound zip whose pickle is garbage
    with zipfile.ZipFile(tiny_path) as source, zipfile.ZipFile(damaged, "w") as target:
        for name in source.namelist():
            target.writestr(name, b"\x80\x02garbage" if name.endswith("data.pkl") else source.read(name))
    large = tmp_path / "large.pth"       # X-VLM-large's first tensors (Swin-L 192 wide, BERT-large): into base
    torch.save({"model": {"vision_encoder.patch_embed.proj.weight": torch.zeros(192, 3, 4, 4),
                          "text_encoder.bert.encoder.layer.0.crossattention.self.key.weight": torch.zeros(1024, 1536)},
                "config": {"image_res": 224}}, large)
    return {
        "not a torch file": (text, "is not a torch checkpoint (neither torch's zip format nor a pickle)"),
        "not X-VLM (wrapped)": (other, "is not an X-VLM checkpoint: it holds a dict with keys ['epoch', 'weights']"),
        "not X-VLM (flat)": (flat, "is not an X-VLM checkpoint: it has no vision_encoder.* and text_encoder.*"),
        "truncated": (truncated, "is truncated or damaged"),
        "code execution": (code, "needs code execution to load, which torch.load(weights_only=True) refuses "
                                 "(Unsupported global: GLOBAL argparse.Namespace was not an allowed global by "
                                 "default); we never unpickle code"),
        "damaged pickle": (damaged, "cannot be read with torch.load(weights_only=True) (Unsupported operand 103): "
                                    "it is damaged"),
        "large into base": (large, "weight vision_encoder.patch_embed.proj.weight has shape (192, 3, 4, 4) but our "
                                   "base model's vision.backbone.patch_embed.proj.weight has (128, 3, 4, 4)"),
        "missing": (tmp_path / "absent.pth", "does not exist"),
    }


@pytest.mark.parametrize("case", ["not a torch file", "not X-VLM (wrapped)", "not X-VLM (flat)", "truncated",
                                  "code execution", "damaged pickle", "large into base", "missing"])
def test_a_bad_file_is_one_clear_line_and_exit_2(tiny, tmp_path, capsys, case):
    model, _ = tiny
    good = official_file(model, tmp_path / "good.pth")
    path, message = _files(tmp_path, good)[case]
    args = ["import-xvlm", str(path), "--out", str(tmp_path / "out")] + (["--preset", "base"] if "base" in case else [])
    assert xvlm(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("xvlm import-xvlm: error: ") and message in err, err


def test_models_the_official_layout_cannot_hold_are_refused(tmp_path, capsys):
    save_model(build_model(preset("tiny")), str(tmp_path / "vit" / "model.safetensors"))
    assert xvlm(["export-xvlm", str(tmp_path / "vit"), "--out", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert "cannot be expressed in the official X-VLM layout" in err and "vision tower vit_tiny_patch16_224" in err
    assert xvlm(["export-xvlm", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.pth")]) == 2
    assert not (tmp_path / "x.pth").exists()


# ---------------------------------------------------------------------------------------------- using the folder
def test_train_starts_from_the_imported_folder_with_the_printed_overrides(tiny, tmp_path, capsys):
    """`xvlm train ... <the overrides import-xvlm prints> model.init=DIR` accepts the folder."""
    from train.config import load_config
    from train.loop import train

    model, _ = tiny
    path = official_file(model, tmp_path / "official.pth", ours_config=False)
    assert xvlm(["import-xvlm", str(path), "--out", str(tmp_path / "imported")]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "train from it" in line][0]
    overrides = shlex.split(printed.split("--config C.yaml", 1)[1])
    assert overrides[-1] == f"model.init={tmp_path / 'imported'}"
    cfg = load_config("train/configs/tiny_cpu.yaml", overrides + [
        f"out={tmp_path / 'run'}", "data.synthetic=true", "schedule.steps=1", "schedule.warmup_steps=1",
        "data.image_text_batch_size=2", "data.region_batch_size=4", "data.region_max_images=2",
        "checkpoint.every=1", "logging.progress=false", "logging.tensorboard=false"])
    train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "ckpt-00000001" / "COMMITTED").exists()
