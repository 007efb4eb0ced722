"""Evaluation: retrieval recall, ITM re-ranking and grounding IoU on hand-built cases with known answers, then an
end-to-end `evaluate` call on a tiny model over built held-out shards."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from storage.errors import XvlmError
from train.evaluate import (best_positive_rank, box_iou_pairs, grounding_accuracy, recall_at_k, rerank_top_k,
                            retrieval_metrics)


def scores_with_ranks(ranks: list[int], n_cand: int) -> torch.Tensor:
    """[Q, n_cand] scores where query q's positive (candidate q) is beaten by exactly ranks[q] negatives."""
    scores = torch.full((len(ranks), n_cand), -1.0)
    for q, rank in enumerate(ranks):
        scores[q, q] = 0.0
        negatives = [c for c in range(n_cand) if c != q][:rank]
        scores[q, negatives] = 1.0 + torch.arange(len(negatives), dtype=torch.float32)
    return scores


def test_recall_at_k_on_known_ranks():
    ranks = list(range(12))                    # query q is ranked at position q: R@k = k / 12
    scores = scores_with_ranks(ranks, 12)
    positives = torch.eye(12, dtype=torch.bool)
    assert best_positive_rank(scores, positives).tolist() == ranks
    assert recall_at_k(scores, positives) == pytest.approx({1: 1 / 12, 5: 5 / 12, 10: 10 / 12})


def test_retrieval_metrics_with_several_texts_per_image():
    # 3 images, 6 texts: texts 0,1 -> image 0; 2,3 -> image 1; 4,5 -> image 2.
    text_image = torch.tensor([0, 0, 1, 1, 2, 2])
    i2t = torch.tensor([
        [0.1, 0.9, 0.8, 0.0, 0.0, 0.0],    # best positive (text 1) first            -> rank 0
        [0.9, 0.0, 0.1, 0.2, 0.0, 0.0],    # best positive (text 3, 0.2) after text 0 -> rank 1
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],    # best positive (text 4, 0.5) after 4      -> rank 4
    ])
    t2i = torch.tensor([
        [0.9, 0.1, 0.0],   # text 0 -> image 0 first      rank 0
        [0.1, 0.9, 0.0],   # text 1 -> image 0 second     rank 1
        [0.0, 0.9, 0.1],   # rank 0
        [0.0, 0.1, 0.9],   # rank 1
        [0.5, 0.4, 0.1],   # rank 2
        [0.0, 0.0, 0.9],   # rank 0
    ])
    m = retrieval_metrics(i2t, t2i, text_image)
    assert m["i2t_r1"] == pytest.approx(1 / 3)
    assert m["i2t_r5"] == pytest.approx(1.0)
    assert m["t2i_r1"] == pytest.approx(3 / 6)
    assert m["t2i_r5"] == pytest.approx(1.0)
    assert m["i2t_r10"] == m["t2i_r10"] == 1.0
    assert m["r_mean"] == pytest.approx((1 / 3 + 1 + 1 + 0.5 + 1 + 1) / 6)


def test_ties_count_against_the_model():
    # A model that scores every candidate alike must not look perfect.
    scores = torch.zeros(20, 20)
    positives = torch.eye(20, dtype=torch.bool)
    assert recall_at_k(scores, positives) == {1: 0.0, 5: 0.0, 10: 0.0}
    assert best_positive_rank(scores, positives).tolist() == [19] * 20


def test_metric_input_errors():
    with pytest.raises(XvlmError, match="no positive"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(XvlmError, match="shape"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(XvlmError, match="scores_t2i"):
        retrieval_metrics(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([0, 0, 1, 1]))


def test_rerank_top_k_reorders_only_the_top_k():
    itc = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5],
                        [0.1, 0.2, 0.3, 0.4, 0.5]])
    # The finer score prefers higher candidate index for row 0 and lower index for row 1.
    fine = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0],
                         [4.0, 3.0, 2.0, 1.0, 0.0]])
    calls: list[tuple[int, int]] = []

    def score_pairs(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.extend(zip(q.tolist(), c.tolist()))
        return fine[q, c]

    out = rerank_top_k(itc, 3, score_pairs)
    assert sorted(calls) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (1, 4)]   # only the ITC top-3 are scored
    order = out.argsort(dim=1, descending=True).tolist()
    assert order[0] == [2, 1, 0, 3, 4]    # top-3 by the finer score, the rest in ITC order
    assert order[1] == [2, 3, 4, 1, 0]
    # A correct answer outside the ITC top-k cannot be rescued by the re-ranker, one inside can.
    positives = torch.zeros(2, 5, dtype=torch.bool)
    positives[0, 2] = positives[1, 0] = True
    assert best_positive_rank(out, positives).tolist() == [0, 4]


def test_rerank_k_larger_than_candidates_and_nan_guard():
    itc = torch.tensor([[0.2, 0.1]])
    out = rerank_top_k(itc, 10, lambda q, c: c.float())
    assert out.argsort(dim=1, descending=True).tolist() == [[1, 0]]
    with pytest.raises(XvlmError, match="NaN"):
        rerank_top_k(itc, 2, lambda q, c: torch.full((len(q),), float("nan")))


def test_box_iou_known_values():
    pred = torch.tensor([[0.5, 0.5, 0.4, 0.4],      # identical                     -> 1
                         [0.25, 0.5, 0.5, 1.0],     # [0, 0, .5, 1] vs [.25, 0, .75, 1] -> 0.25 / 0.75
                         [0.2, 0.2, 0.2, 0.2],      # disjoint                      -> 0
                         [0.5, 0.5, 0.5, 0.5]])     # inside a box 4x its area      -> 0.25
    target = torch.tensor([[0.5, 0.5, 0.4, 0.4],
                           [0.5, 0.5, 0.5, 1.0],
                           [0.8, 0.8, 0.2, 0.2],
                           [0.5, 0.5, 1.0, 1.0]])
    assert box_iou_pairs(pred, target).tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.25])
    # threshold is inclusive: IoU 0.5 exactly counts
    half = torch.tensor([[0.5, 0.5, 1.0, 0.5]]), torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    assert box_iou_pairs(*half).item() == pytest.approx(0.5)
    assert grounding_accuracy(*half, threshold=0.5) == 1.0
    assert grounding_accuracy(pred, target, threshold=0.5) == 0.25
    assert grounding_accuracy(pred, target, threshold=0.2) == 0.75


def test_box_iou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    pred = torch.cat([torch.rand(64, 2, generator=g), torch.rand(64, 2, generator=g) * 0.5 + 0.01], dim=1)
    target = torch.cat([torch.rand(64, 2, generator=g), torch.rand(64, 2, generator=g) * 0.5 + 0.01], dim=1)
    expected = box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy")).diagonal()
    assert torch.allclose(box_iou_pairs(pred, target), expected, atol=1e-6)
    with pytest.raises(XvlmError, match="zero region"):
        grounding_accuracy(torch.zeros(0, 4), torch.zeros(0, 4))


# ---------------------------------------------------------------------------------------------- end to end


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest.py


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """A 12-image held-out dataset (2 shards) with one damaged image, and a tokenizer folder."""
    from pathlib import Path

    from shardkit import corrupt_member, make_dataset
    from sampledata.sample_data import write_tokenizer

    root = tmp_path_factory.mktemp("heldout")
    dataset = make_dataset(str(root / "val"), samples=12, per_shard=6, size=(96, 72))
    corrupt_member(dataset, "shard-000001.tar", "coco-000007", "jpg")
    write_tokenizer(Path(root / "tokenizer"))
    return dataset, str(root / "tokenizer")


def tiny_model(box_head: str = "xvlm"):
    from model.config import preset
    from model.xvlm import build_model

    torch.manual_seed(0)
    return build_model(preset("tiny", box_head=box_head))


def test_load_eval_set_counts_and_skips(held_out):
    from train.evaluate import load_eval_set

    dataset, tokenizer = held_out
    data = load_eval_set(dataset, image_res=64, tokenizer=tokenizer, max_words=16, max_tokens=16, progress=False)
    assert len(data.keys) == 11 and "coco-000007" not in data.keys
    assert data.skipped == {"corrupt_image": 1}
    assert data.images.shape == (11, 3, 64, 64) and data.images.dtype == torch.uint8
    assert data.caption_ids.shape == (11, 16) and data.caption_image.tolist() == list(range(11))
    assert data.region_ids.shape[0] == 22 and data.region_boxes.shape == (22, 4)
    assert bool((data.region_boxes > 0).all() and (data.region_boxes <= 1).all())
    # objects carry their attributes in front of the name, as in training
    assert any(len(t.split()) == 2 for t in data.region_texts)
    limited = load_eval_set(dataset, image_res=64, tokenizer=tokenizer, max_images=4, progress=False)
    assert len(limited.keys) == 4


def test_evaluate_tiny_model_end_to_end(held_out):
    from train.evaluate import EvalConfig, evaluate

    dataset, tokenizer = held_out
    cfg = EvalConfig(k_test=4, batch_size=5, tokenizer=tokenizer, max_words=16, max_tokens=16, progress=False)
    for box_head in ("xvlm", "softargmax", "dense"):
        model = tiny_model(box_head)
        model.train()
        first = evaluate(model, [dataset], cfg)
        assert model.training, "evaluate must restore the model's mode"
        assert first["images"] == 11 and first["captions"] == 11 and first["regions"] == 22
        for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "itc_i2t_r1", "grounding_acc",
                    "grounding_miou", "grounding_acc_constant_box"):
            assert 0.0 <= first[key] <= 1.0, key
        assert first["i2t_r1"] <= first["i2t_r5"] <= first["i2t_r10"]
        assert first["skipped"] == {"corrupt_image": 1}
        # deterministic: no augmentation, dropout off
        assert evaluate(model, [dataset], cfg) == first
        # k_test 0 (a model trained without ITM): the ITC ranking is the result
        itc_only = evaluate(model, [dataset], EvalConfig(**{**cfg.__dict__, "k_test": 0}))
        assert all(itc_only[key] == first[f"itc_{key}"] for key in ("i2t_r1", "i2t_r10", "t2i_r1", "r_mean"))
        assert itc_only["grounding_acc"] == first["grounding_acc"]


def test_evaluate_from_a_train_config(held_out):
    """The trainer's periodic evaluation passes its TrainConfig: eval.datasets and the data section's tokenizer."""
    from train.config import load_config
    from train.evaluate import evaluate

    dataset, tokenizer = held_out
    cfg = load_config(None, ["data.synthetic=true", f"data.tokenizer={tokenizer}", f"eval.datasets=[{dataset}]",
                             "eval.every=1", "eval.max_samples=6", "eval.options={k_test: 3}"])
    result = evaluate(tiny_model(), cfg, "cpu")
    assert result["images"] == 6 and result["k_test"] == 3
    cfg.loss.itm = 0.0
    cfg.eval.options = {}
    assert evaluate(tiny_model(), cfg, "cpu")["k_test"] == 0   # no ITM head trained: ITC ranking


def test_evaluate_errors(held_out, tmp_path):
    from train.evaluate import EvalConfig, evaluate

    dataset, tokenizer = held_out
    with pytest.raises(XvlmError, match="tokenizer"):
        evaluate(tiny_model(), [dataset], EvalConfig())
    with pytest.raises(XvlmError, match="does not exist"):
        evaluate(tiny_model(), [str(tmp_path / "missing")], EvalConfig(tokenizer=tokenizer))
    with pytest.raises(XvlmError, match="unknown eval option"):
        evaluate(tiny_model(), [dataset], {"k": 3})
    with pytest.raises(XvlmError, match="k_test"):
        EvalConfig(k_test=-1)


def test_eval_cli_on_a_trained_checkpoint(held_out, tmp_path, capsys):
    """`xvlm eval --checkpoint auto` finds the run's newest committed checkpoint and writes the metrics JSON."""
    import json

    from tools.cli import main
    from train.config import load_config
    from train.loop import train

    dataset, tokenizer = held_out
    run = str(tmp_path / "run")
    cfg = load_config("train/configs/tiny_cpu.yaml", [f"out={run}", "data.synthetic=true", "schedule.steps=2",
                                                      "schedule.warmup_steps=1", "checkpoint.every=1",
                                                      "logging.progress=false", "logging.tensorboard=false"])
    train(cfg)
    out = tmp_path / "eval.json"
    code = main(["eval", "--checkpoint", "auto", "--run", run, "--data", dataset, "--tokenizer", tokenizer,
                 "--k-test", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert metrics["checkpoint"].endswith("ckpt-00000002/model.safetensors")
    assert metrics["images"] == 11 and 0.0 <= metrics["grounding_acc"] <= 1.0
    assert json.loads(capsys.readouterr().out) == metrics
    assert main(["eval", "--checkpoint", "auto", "--run", str(tmp_path / "none"), "--data", dataset]) == 2


def test_eval_cli_ranks_by_itc_for_a_run_trained_without_itm(held_out, tmp_path):
    import json

    from tools.cli import main
    from train.config import load_config
    from train.loop import train

    dataset, tokenizer = held_out
    run = str(tmp_path / "run")
    train(load_config("train/configs/tiny_cpu.yaml", [f"out={run}", "data.synthetic=true", "schedule.steps=1",
                                                      "schedule.warmup_steps=1", "loss.itm=0",
                                                      "logging.progress=false", "logging.tensorboard=false"]))
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", "auto", "--run", run, "--data", dataset, "--tokenizer", tokenizer,
                 "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["k_test"] == 0 and metrics["i2t_r1"] == metrics["itc_i2t_r1"]
    assert main(["eval", "--checkpoint", "auto", "--run", run, "--data", dataset, "--tokenizer", tokenizer,
                 "--k-test", "2", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["k_test"] == 2


def test_eval_cli_on_an_imported_official_checkpoint(held_out, tmp_path):
    """`xvlm eval --checkpoint DIR` takes a folder written by `xvlm import-xvlm`; its text limits default to the
    official config's (a 16M checkpoint: 30 words / 30 tokens)."""
    import argparse
    import json

    from model.config import preset
    from model.official import export_official, official_config
    from model.xvlm import build_model
    from tools.cli import main
    from train.eval_checkpoint import imported_text_settings

    dataset, tokenizer = held_out
    torch.manual_seed(0)
    model = build_model(preset("base", vision_kwargs={"embed_dim": 32, "depths": [2, 2, 2, 2],
                                                      "num_heads": [1, 2, 4, 8], "window_size": 4},
                               image_res=128, hidden_size=128, num_attention_heads=2, intermediate_size=256,
                               text_layers=2, fusion_layers=2, max_position_embeddings=64, embed_dim=32))
    state = export_official(model)
    config = {**official_config(model.config, state), "max_words": 30, "max_tokens": 30}
    torch.save({"model": state, "config": config}, tmp_path / "official.pth")
    assert main(["import-xvlm", str(tmp_path / "official.pth"), "--out", str(tmp_path / "imported")]) == 0
    args = argparse.Namespace(max_words=None, max_tokens=None)
    imported_text_settings(str(tmp_path / "imported"), args)
    assert (args.max_words, args.max_tokens) == (30, 30)
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "imported"), "--data", dataset, "--tokenizer", tokenizer,
                 "--k-test", "3", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["checkpoint"] == str(tmp_path / "imported" / "model.safetensors") and metrics["images"] == 11
    assert main(["eval", "--checkpoint", str(tmp_path), "--data", dataset, "--tokenizer", tokenizer]) == 2
