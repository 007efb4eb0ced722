"""Runs the OFFICIAL X-VLM code (github.com/zengyan-97/X-VLM; not part of this repository, never copied into it)
for tests/test_official_xvlm.py, in a separate process whose PYTHONPATH starts with the official checkout and a
transformers 4.x (its models/xbert.py imports 4.x-only names):

  build --size base|tiny --out DIR      random-weight official models -> DIR/{pretrain,retrieval,grounding}.pth
                                        (official-style checkpoints), DIR/inputs.pt, DIR/outputs-<kind>.pt
  load CHECKPOINT --size S --work DIR   the official pretraining XVLM loads CHECKPOINT with strict=True, then writes
                                        its outputs on DIR/inputs.pt to DIR/outputs-loaded.pt
  keys --out FILE                       the official base key names and shapes of the three layouts (a test fixture)

Every parameter is perturbed with seeded noise after building (LayerNorm weights are not all 1, biases not all 0), so
that a swapped or mis-mapped tensor changes the outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

SIZES = {
    # configs/config_swinB_224.json and configs/config_bert.json of the official repository
    "base": {"vision": {"vision_width": 1024, "image_res": 224, "window_size": 7, "embed_dim": 128,
                        "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]},
             "text": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
                      "num_hidden_layers": 12, "fusion_layer": 6, "vocab_size": 30522,
                      "max_position_embeddings": 512},
             "embed_dim": 256},
    "tiny": {"vision": {"vision_width": 256, "image_res": 128, "window_size": 4, "embed_dim": 32,
                        "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]},
             "text": {"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256,
                      "num_hidden_layers": 4, "fusion_layer": 2, "vocab_size": 1100, "max_position_embeddings": 64},
             "embed_dim": 32},
}
BERT_COMMON = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_act": "gelu",
               "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1, "initializer_range": 0.02,
               "layer_norm_eps": 1e-12, "pad_token_id": 0, "type_vocab_size": 2}


def _config(size: str, work: str) -> dict:
    """An official run config (the model keys of configs/Pretrain_XVLM_base_4m.yaml) with its json files and the
    random initial towers it loads (a Swin checkpoint and a BERT folder) written under `work`."""
    sizes = SIZES[size]
    os.makedirs(work, exist_ok=True)
    vision_json, text_json = os.path.join(work, "config_swin.json"), os.path.join(work, "config_bert.json")
    bert_dir, swin_ckpt = os.path.join(work, "bert"), os.path.join(work, "swin.pth")
    vision = {**sizes["vision"], "ckpt": swin_ckpt}
    text = {**BERT_COMMON, **sizes["text"], "encoder_width": sizes["vision"]["vision_width"]}
    if not os.path.exists(swin_ckpt):
        from models.swin_transformer import SwinTransformer
        from transformers import BertConfig, BertForMaskedLM

        with open(vision_json, "w") as f:
            json.dump(vision, f)
        with open(text_json, "w") as f:
            json.dump(text, f)
        torch.manual_seed(0)
        swin = SwinTransformer(img_size=vision["image_res"], patch_size=4, in_chans=3, embed_dim=vision["embed_dim"],
                               depths=vision["depths"], num_heads=vision["num_heads"],
                               window_size=vision["window_size"])
        torch.save({"model": swin.state_dict()}, swin_ckpt)
        BertForMaskedLM(BertConfig(**{k: v for k, v in text.items() if k != "fusion_layer"})).save_pretrained(bert_dir)
    return {"use_clip_vit": False, "use_swin": True, "vision_config": vision_json,
            "image_res": sizes["vision"]["image_res"], "patch_size": 32, "use_roberta": False,
            "text_config": text_json, "text_encoder": bert_dir, "load_bertL_by_sep": False,
            "embed_dim": sizes["embed_dim"], "temp": 0.07, "max_words": 40, "max_tokens": 40}


def _perturb(model: torch.nn.Module, seed: int, only: tuple[str, ...] = ()) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not only or name.startswith(only):
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        if hasattr(model, "temp") and (not only or "temp" in only):
            model.temp.fill_(0.05)


def _inputs(size: str) -> dict[str, torch.Tensor]:
    """2 images, 4 texts (rows 0-1 pair with images 0-1; region rows 0,1 -> image 0 and 2,3 -> image 1)."""
    sizes = SIZES[size]
    res, vocab = sizes["vision"]["image_res"], sizes["text"]["vocab_size"]
    grid = res // 32
    g = torch.Generator().manual_seed(7)
    lengths = [9, 6, 12, 4]
    ids = torch.zeros(4, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 0] = 101
        ids[row, 1:n] = torch.randint(1000, vocab, (n - 1,), generator=g)
    atts = (ids != 0).long()
    masked_pos = torch.tensor([[1, 3, 0], [2, 0, 0], [4, 5, 9], [1, 0, 0]])
    masked = ids.clone()
    masked.scatter_(1, masked_pos, 103)
    masked[:, 0] = 101
    patch_mask = torch.zeros(4, grid, grid)
    patch_mask[0] = 1.0                                     # the whole image
    patch_mask[1, : grid // 2 + 1, : grid // 2] = 1.0
    patch_mask[2, grid // 2:, 1:] = 1.0
    patch_mask[3, 1:2, grid - 1:] = 1.0
    return {"image": torch.randn(2, 3, res, res, generator=g), "text_ids": ids, "text_atts": atts,
            "text_ids_masked": masked, "masked_pos": masked_pos, "image_idx": torch.tensor([0, 0, 1, 1]),
            "patch_mask": patch_mask.flatten(1), "is_image": torch.tensor([1.0, 0.0, 0.0, 0.0]),
            "target_bbox": torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.3, 0.4, 0.5, 0.6], [0.6, 0.7, 0.6, 0.5],
                                         [0.9, 0.2, 0.1, 0.15]])}


@torch.no_grad()
def _outputs(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official model's forward pieces on `x` (what each head of this model kind has)."""
    model.eval()
    idx, atts, ids = x["image_idx"], x["text_atts"], x["text_ids"]
    out = {}
    vision = model.vision_encoder(x["image"])
    rows = vision[idx]
    full = torch.ones(rows.shape[:2], dtype=torch.long)
    text = model.get_text_embeds(ids, atts)
    out.update(vision=vision, text=text)
    fused = model.get_cross_embeds(rows, full, text_embeds=text, text_atts=atts)[:, 0]
    out["fused_cls"] = fused
    if hasattr(model, "vision_proj"):
        model.temp.clamp_(0.001, 0.5)
        image_feat, text_feat = model.get_features(vision, text)
        out.update(image_feat=image_feat, text_feat=text_feat, temp=model.temp.detach().clone(),
                   sim=image_feat @ text_feat.t() / model.temp, itc=model.get_contrastive_loss(image_feat, text_feat[:2]))
    region_atts = torch.cat([torch.ones(4, 1), x["patch_mask"]], dim=1).long()
    concept, _, full_rows = model.get_vision_embeds(x["image"], image_atts=region_atts, idx_to_group_img=idx)
    out["concept"] = concept
    if hasattr(model, "itm_head"):
        out["itm"] = model.itm_head(fused)
        out["concept_feat"] = model.get_features(image_embeds=concept)
        concept_fused = model.get_cross_embeds(concept, region_atts, text_embeds=text, text_atts=atts)[:, 0]
        out.update(concept_fused_cls=concept_fused, concept_itm=model.itm_head(concept_fused))
    if hasattr(model.text_encoder, "cls"):
        out["mlm"] = model.text_encoder(x["text_ids_masked"], attention_mask=atts, encoder_hidden_states=rows,
                                        encoder_attention_mask=full, return_dict=True, return_logits=True,
                                        masked_pos=x["masked_pos"])
    if hasattr(model, "bbox_head"):
        boxes = model.predict_bbox(full_rows, text, atts)
        out["boxes"] = boxes
        out["bbox"], out["giou"] = model.get_bbox_loss(boxes, x["target_bbox"], x["is_image"])
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _save_checkpoint(model: torch.nn.Module, config: dict, path: str) -> None:
    torch.save({"model": model.state_dict(), "config": config}, path)


def build(size: str, out: str) -> None:
    from models.model_bbox import XVLM as Grounding
    from models.model_pretrain import XVLM as Pretrain
    from models.model_retrieval import XVLM as Retrieval

    os.makedirs(out, exist_ok=True)
    config = _config(size, out)
    inputs = _inputs(size)
    torch.save(inputs, os.path.join(out, "inputs.pt"))
    torch.manual_seed(1)
    pretrain = Pretrain(config)
    _perturb(pretrain, 2)
    _save_checkpoint(pretrain, config, os.path.join(out, "pretrain.pth"))
    torch.save(_outputs(pretrain, inputs), os.path.join(out, "outputs-pretrain.pth"))
    for kind, cls, heads in (("retrieval", Retrieval, ("vision_proj", "text_proj", "itm_head", "temp")),
                             ("grounding", Grounding, ("bbox_head",))):
        torch.manual_seed(3)
        model = cls(config)
        model.load_pretrained(os.path.join(out, "pretrain.pth"), config)   # the official fine-tuning start
        _perturb(model, 4, heads)                                         # "fine-tuned" heads
        _save_checkpoint(model, config, os.path.join(out, f"{kind}.pth"))
        torch.save(_outputs(model, inputs), os.path.join(out, f"outputs-{kind}.pth"))


def load(checkpoint: str, size: str, work: str) -> None:
    from models.model_pretrain import XVLM as Pretrain

    torch.manual_seed(5)
    model = Pretrain(_config(size, work))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state, strict=True)
    inputs = torch.load(os.path.join(work, "inputs.pt"), weights_only=True)
    torch.save(_outputs(model, inputs), os.path.join(work, "outputs-loaded.pth"))


def keys(out: str) -> None:
    from models.model_bbox import XVLM as Grounding
    from models.model_pretrain import XVLM as Pretrain
    from models.model_retrieval import XVLM as Retrieval

    work = os.path.dirname(os.path.abspath(out))
    config = _config("base", os.path.join(work, "keys-work"))
    result = {}
    for kind, cls in (("pretrain", Pretrain), ("retrieval", Retrieval), ("grounding", Grounding)):
        result[kind] = [[k, list(v.shape)] for k, v in cls(config).state_dict().items()]
    with open(out, "w") as f:      # one [key, shape] per line: a readable fixture
        f.write("{\n" + ",\n".join(
            f'"{kind}": [\n' + ",\n".join(json.dumps(entry) for entry in entries) + "\n]"
            for kind, entries in result.items()) + "\n}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["build", "load", "keys"])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--out")
    parser.add_argument("--work")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    # The official ITC gathers over ranks with torch.distributed even in one process.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        if args.mode == "build":
            build(args.size, args.out)
        elif args.mode == "load":
            load(args.checkpoint, args.size, args.work)
        else:
            keys(args.out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
