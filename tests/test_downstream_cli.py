"""`xvlm eval --task retrieval|grounding` end to end on the sample downstream sets with a tiny checkpoint: local, from
S3 (annotations, refer files, images and checkpoint all on the SeaweedFS server), and its exit-2 user errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tools.cli import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest.py


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from model.config import preset
    from model.io import save_model
    from model.xvlm import build_model
    from sampledata import downstream
    from sampledata.sample_data import write_tokenizer

    root = tmp_path_factory.mktemp("dscli")
    downstream.write_all(root / "downstream", seed=5)
    write_tokenizer(Path(root / "tokenizer"))
    torch.manual_seed(0)
    save_model(build_model(preset("tiny")), str(root / "tiny.safetensors"))
    return root


def common(root: Path, checkpoint: str | None = None) -> list[str]:
    return ["--checkpoint", checkpoint or str(root / "tiny.safetensors"), "--tokenizer", str(root / "tokenizer"),
            "--no-progress"]


def test_retrieval_and_grounding_local(sample, tmp_path, capsys):
    d = sample / "downstream"
    out = tmp_path / "r.json"
    assert main(["eval", "--task", "retrieval", "--ann", str(d / "coco_test.json"), "--images", str(d / "images"),
                 "--k-test", "16", "--out", str(out), *common(sample)]) == 0
    table = capsys.readouterr().out
    assert "TR R@1" in table and "X-VLM 4M       80.40" in table and "coco_test: 30 images, 150 texts" in table
    report = json.loads(out.read_text())
    res = report["results"]["coco_test"]
    assert report["task"] == "retrieval" and res["k_test"] == 16 and res["texts"] == 150
    assert res["r_mean"] == pytest.approx((res["txt_r_mean"] + res["img_r_mean"]) / 2)
    assert main(["eval", "--task", "grounding", "--ann", str(d / "refcoco+_val.json"),
                 "--ann", str(d / "refcoco+_test.json"), "--images", str(d / "images"),
                 "--out", str(tmp_path / "g.json"), *common(sample)]) == 0
    table = capsys.readouterr().out
    assert "X-VLM 16M      84.51  89.00  76.91" in table
    grounding = json.loads((tmp_path / "g.json").read_text())["results"]["refcoco+"]
    assert set(grounding["splits"]) == {"val", "testA", "testB"}


@pytest.mark.s3
def test_retrieval_and_grounding_from_s3(sample, s3_prefix, capsys):
    import storage

    val = json.loads((sample / "downstream" / "coco_val.json").read_text())
    left_out = sample / "downstream" / "images" / val[3]["image"]         # one image not uploaded: counted
    for path in sorted((sample / "downstream").rglob("*")):
        if path.is_file() and path != left_out:
            storage.write_bytes(f"{s3_prefix}/{path.relative_to(sample).as_posix()}", path.read_bytes())
    storage.write_bytes(f"{s3_prefix}/tiny.safetensors", (sample / "tiny.safetensors").read_bytes())
    d = f"{s3_prefix}/downstream"
    checkpoint = f"{s3_prefix}/tiny.safetensors"
    assert main(["eval", "--task", "retrieval", "--ann", f"{d}/coco_val.json", "--images", f"{d}/images",
                 "--k-test", "8", "--out", f"{s3_prefix}/out/r.json", *common(sample, checkpoint)]) == 0
    res = json.loads(storage.read_text(f"{s3_prefix}/out/r.json"))["results"]["coco_val"]
    assert (res["images"], res["texts"], res["missing_images"]) == (11, 55, 1)
    assert res["images_listed"] == 12 and res["missing_by_reason"] == {"missing_image": 1}
    assert main(["eval", "--task", "grounding", "--ann", f"{d}/refcoco+_testB.json", "--images", f"{d}/images",
                 *common(sample, checkpoint)]) == 0
    assert "RefCOCO+ grounding" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--task", "retrieval", "--images", "x"], "needs --ann FILE"),
    (["--task", "grounding", "--ann", "a.json"], "needs --ann FILE (X-VLM's annotation file) and --images"),
    (["--task", "retrieval", "--ann", "a.json", "--images", "x", "--data", "d"], "--data is for held-out shards"),
    (["--ann", "a.json"], "needs --data DATASET"),
    (["--task", "retrieval", "--ann", "a.json", "--images", "x", "--refs", "r.p"], "belong to --task grounding"),
])
def test_argument_errors_exit_2(sample, args, message, capsys):
    assert main(["eval", *args, *common(sample)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_files_exit_2(sample, tmp_path, capsys):
    d = sample / "downstream"
    bad = tmp_path / "coco_test.json"
    bad.write_text(json.dumps([{"image": "val2014/x.jpg", "caption": "not a list"}]))
    assert main(["eval", "--task", "retrieval", "--ann", str(bad), "--images", str(d / "images"),
                 *common(sample)]) == 2
    assert "entry 0: \"caption\" is a str, not a list of captions" in capsys.readouterr().err
    # grounding files without their refer release beside them
    lone = tmp_path / "refcoco+_val.json"
    lone.write_text((d / "refcoco+_val.json").read_text())
    assert main(["eval", "--task", "grounding", "--ann", str(lone), "--images", str(d / "images"),
                 *common(sample)]) == 2
    assert "refs(unc).p does not exist" in capsys.readouterr().err
    # a refs file with a class in it: refused, nothing run
    import collections
    import pickle

    (tmp_path / "refcoco+").mkdir()
    (tmp_path / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps([collections.OrderedDict(ref_id=0)]))
    (tmp_path / "refcoco+" / "instances.json").write_text((d / "refcoco+" / "instances.json").read_text())
    assert main(["eval", "--task", "grounding", "--ann", str(lone), "--images", str(d / "images"),
                 *common(sample)]) == 2
    assert "asks for the global collections.OrderedDict" in capsys.readouterr().err
    # more tokens than the model has text positions (the tiny preset has 64)
    assert main(["eval", "--task", "retrieval", "--ann", str(d / "coco_val.json"), "--images", str(d / "images"),
                 "--max-tokens", "80", *common(sample)]) == 2
    assert "max_tokens 80 is more than the model's 64 text positions" in capsys.readouterr().err
    # every image missing: a clear error, not a metric over nothing
    assert main(["eval", "--task", "retrieval", "--ann", str(d / "coco_val.json"), "--images", str(tmp_path),
                 *common(sample)]) == 2
    assert "none of its 12 images could be read" in capsys.readouterr().err
