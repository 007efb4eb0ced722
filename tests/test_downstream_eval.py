"""Downstream evaluation (train/downstream_eval.py): the official retrieval score matrix and itm_eval on a small fixed
example with hand-checked ranks, the official IoU, and evaluate_retrieval / evaluate_grounding on the sample sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.downstream_eval import (DownstreamEvalConfig, evaluate_grounding, evaluate_retrieval, itm_eval,
                                   official_iou, official_score_matrices, official_score_matrix, pixel_boxes)

# 3 images, 6 texts: image 0 has texts 0, 1; image 1 texts 2, 3; image 2 texts 4, 5 (img2txt of re_dataset.py).
TEXT_IMAGE = torch.tensor([0, 0, 1, 1, 2, 2])
ITC = torch.tensor([                      # image x text ITC similarity
    [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],
    [0.7, 0.6, 0.1, 0.5, 0.2, 0.3],
    [0.1, 0.2, 0.3, 0.4, 0.6, 0.5],
])
ITM = torch.tensor([                      # image x text ITM match logit
    [2.0, 0.0, 3.0, 0.0, 0.0, 0.0],
    [1.0, 0.5, 0.0, 0.1, 0.0, 0.4],
    [0.0, 0.7, 0.9, 0.2, -1.0, 0.5],
])


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest.py


def test_hand_checked_ranks_with_k_test_2():
    calls = []

    def i2t_pairs(q, c):
        calls.append(len(q))
        return ITM[q, c]

    i2t = official_score_matrix(ITC, 2, i2t_pairs)
    t2i = official_score_matrix(ITC.t(), 2, lambda t, i: ITM[i, t])
    assert calls == [6]                                      # all 3 x 2 pairs in one call
    # Each image's top-2 texts by ITC hold their ITM logit, the rest -100 (Retrieval.py:110-131).
    assert i2t.tolist() == [[2.0, -100, 3.0, -100, -100, -100],       # top-2: texts 0, 2
                            [1.0, 0.5, -100, -100, -100, -100],       # top-2: texts 0, 1
                            [-100, -100, -100, -100, -1.0, 0.5]]      # top-2: texts 4, 5
    assert t2i[1].tolist() == pytest.approx([-100, 0.5, 0.7]) and t2i[4].tolist() == [0.0, -100, -1.0]
    got = itm_eval(i2t, t2i, TEXT_IMAGE)
    # By hand. Image -> text, best positive's rank: image 0: text 2 (a negative, 3.0) beats text 0 (2.0) -> 1;
    # image 1: its texts 2, 3 are outside its top-2 -> behind texts 0, 1 and tied with 4, 5 at -100 -> 4;
    # image 2: text 5 (0.5) first -> 0. Ranks [1, 4, 0]: R@1 1/3, R@5 3/3, R@10 3/3.
    # Text -> image: t0: img0 2.0 > img1 1.0 -> 0; t1: img0 outside its top-2 (img1, img2) -> 2; t2: img1 outside
    # (img0, img2) -> 2; t3: img1 0.1 < img2 0.2 -> 1; t4: img2 -1.0 < img0 0.0 -> 1; t5: img2 0.5 > img1 0.4 -> 0.
    # Ranks [0, 2, 2, 1, 1, 0]: R@1 2/6, R@5 6/6, R@10 6/6.
    expected = {"txt_r1": 100 / 3, "txt_r5": 100.0, "txt_r10": 100.0, "img_r1": 100 / 3, "img_r5": 100.0,
                "img_r10": 100.0}
    expected["txt_r_mean"] = expected["img_r_mean"] = (100 / 3 + 200) / 3
    expected["r_mean"] = (100 / 3 + 200) / 3
    assert got == pytest.approx(expected)
    # Both directions at once: the same matrices, each distinct pair scored once: 6 + 12 top-2 pairs, 12 distinct
    # (every image's top-2 pair is also in its text's top 2 here).
    pairs = []

    def both(i, t):
        pairs.extend(zip(i.tolist(), t.tolist()))
        return ITM[i, t]

    i2t_both, t2i_both = official_score_matrices(ITC, 2, both)
    assert torch.equal(i2t_both, i2t) and torch.equal(t2i_both, t2i)
    top_i = {(i, t) for i in range(3) for t in ITC[i].topk(2).indices.tolist()}
    top_t = {(i, t) for t in range(6) for i in ITC[:, t].topk(2).indices.tolist()}
    assert sorted(pairs) == sorted(top_i | top_t) and len(pairs) == 12
    # ITC alone (k_test 0): image ranks [0, 2, 0], text ranks [0, 2, 2, 0, 0, 0].
    itc = itm_eval(ITC, ITC.t(), TEXT_IMAGE)
    assert itc["txt_r1"] == pytest.approx(200 / 3) and itc["img_r1"] == pytest.approx(400 / 6)


def official_itm_eval_numpy(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: list[int],
                            img2txt: list[list[int]]) -> dict[str, float]:
    """Retrieval.py:166-210's computation written out with numpy (argsort ranks), to compare against."""
    def ranks(scores, positives):
        out = []
        for index, score in enumerate(scores):
            order = np.argsort(score)[::-1]
            out.append(min(int(np.where(order == i)[0][0]) for i in positives(index)))
        return np.array(out)

    tr = ranks(scores_i2t, lambda i: img2txt[i])
    ir = ranks(scores_t2i, lambda t: [txt2img[t]])
    res = {f"txt_r{k}": 100.0 * np.mean(tr < k) for k in (1, 5, 10)}
    res.update({f"img_r{k}": 100.0 * np.mean(ir < k) for k in (1, 5, 10)})
    return res


def test_matches_the_official_argsort_computation_without_ties():
    gen = torch.Generator().manual_seed(3)
    n_img, per = 15, 3
    text_image = torch.arange(n_img).repeat_interleave(per)
    itc, itm = torch.rand(n_img, n_img * per, generator=gen), torch.randn(n_img, n_img * per, generator=gen)
    k = 12                                     # >= 10: no -100 ties can reach R@10
    i2t = official_score_matrix(itc, k, lambda q, c: itm[q, c])
    t2i = official_score_matrix(itc.t(), k, lambda t, i: itm[i, t])
    ours = itm_eval(i2t, t2i, text_image)
    theirs = official_itm_eval_numpy(i2t.numpy(), t2i.numpy(), text_image.tolist(),
                                     [list(range(i * per, (i + 1) * per)) for i in range(n_img)])
    assert {key: ours[key] for key in theirs} == pytest.approx(theirs)


def test_official_iou_and_pixel_boxes():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 4, 4]])
    b = torch.tensor([[5.0, 5, 10, 10], [0, 0, 10, 10], [20, 20, 5, 5], [3, 3, 4, 4]])
    # (9-5+1)^2 = 25 over 100 + 100 - 25; identical boxes 1; disjoint 0; corner overlap x1=3 !< x2=3 -> 0
    assert official_iou(a, b).tolist() == pytest.approx([25 / 175, 1.0, 0.0, 0.0])
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    assert pixel_boxes(pred, torch.tensor([[100, 50]])).tolist() == [[40.0, 15.0, 20.0, 20.0]]


# ---------------------------------------------------------------------------------------------- on the sample sets


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from pathlib import Path

    from sampledata import downstream
    from sampledata.sample_data import write_tokenizer

    root = tmp_path_factory.mktemp("ds")
    downstream.write_all(root / "downstream", seed=3)
    write_tokenizer(Path(root / "tokenizer"))
    return root / "downstream", str(root / "tokenizer")


def tiny_model():
    from model.config import preset
    from model.xvlm import build_model

    torch.manual_seed(0)
    return build_model(preset("tiny"))


def test_evaluate_retrieval_batched_equals_per_query_and_counts_missing(sample, tmp_path):
    import json
    import shutil

    from shards.downstream import read_retrieval_eval

    folder, tokenizer = sample
    model = tiny_model()
    data = read_retrieval_eval(str(folder / "coco_test.json"))
    big = evaluate_retrieval(model, data, str(folder / "images"),
                             DownstreamEvalConfig(tokenizer=tokenizer, k_test=8, itm_batch=512, progress=False))
    one = evaluate_retrieval(model, data, str(folder / "images"),
                             DownstreamEvalConfig(tokenizer=tokenizer, k_test=8, itm_batch=8, progress=False))
    numbers = [k for k, v in big.items() if isinstance(v, float)]
    assert len(numbers) == 18 and {k: big[k] for k in numbers} == pytest.approx({k: one[k] for k in numbers})
    assert big["images"] == 30 and big["texts"] == 150 and big["missing_images"] == 0
    assert set(big) >= {"txt_r1", "img_r10", "r_mean", "itc_r_mean"}
    assert 8 * 150 <= big["itm_pairs"] <= (30 + 150) * 8     # distinct pairs: at least the text side's
    # one image missing: it and its 5 captions are left out, and the result says so
    images = tmp_path / "images"
    shutil.copytree(folder / "images", images)
    (images / data.images[4]).unlink()
    got = evaluate_retrieval(model, data, str(images),
                             DownstreamEvalConfig(tokenizer=tokenizer, k_test=8, progress=False))
    assert (got["images"], got["texts"], got["missing_images"]) == (29, 145, 1)
    assert got["missing_by_reason"] == {"missing_image": 1}
    json.dumps(got)


def test_evaluate_grounding_per_split(sample):
    from shards.downstream import read_grounding

    folder, tokenizer = sample
    refs = read_grounding(str(folder / "refcoco+_test.json"))
    got = evaluate_grounding(tiny_model(), refs, str(folder / "images"),
                             DownstreamEvalConfig(tokenizer=tokenizer, batch_size=4, progress=False))
    assert set(got["splits"]) == {"testA", "testB"} and got["refs"] == len(refs) == got["refs_listed"]
    assert sum(s["refs"] for s in got["splits"].values()) == len(refs)
    for split, res in got["splits"].items():
        assert 0 <= res["acc"] <= 100 and res["acc"] == pytest.approx(100 * got[f"{split}_d"])
