"""X-VLM's downstream files: the readers (shards/downstream.py) on the sample sets and on every bad input the issue
lists, and the sample sets themselves (sampledata/downstream.py): formats, read-back, scenes disjoint from training."""
from __future__ import annotations

import collections
import hashlib
import json
import pickle
from pathlib import Path

import pytest

from shards import downstream as ds
from storage.errors import XvlmError


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    from sampledata import downstream

    root = tmp_path_factory.mktemp("downstream") / "downstream"
    downstream.write_all(root, seed=7)
    return root


def write(path: Path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


# ---------------------------------------------------------------------------------------------- the sample sets


def test_retrieval_sets_read_back(sets):
    train = ds.read_retrieval_train(str(sets / "coco_train.json"))
    assert len(train) == 60 * 5 and len({p.image_id for p in train}) == 60
    assert all(p.image.startswith("train2014/COCO_train2014_") and p.caption for p in train)
    test = ds.read_retrieval_eval(str(sets / "coco_test.json"))
    assert test.name == "coco_test" and len(test.images) == 30 and len(test.texts) == 150
    # the official numbering (re_dataset.py:60-68): texts in file order, image_texts / text_image inverse maps
    assert all(test.text_image[t] == i for i, texts in enumerate(test.image_texts) for t in texts)
    assert sorted(t for texts in test.image_texts for t in texts) == list(range(150))
    for rel in test.images:
        pixels, (w, h) = ds.read_pixels(str(sets / "images"), rel, 32)
        assert pixels.shape == (32, 32, 3) and max(w, h) <= 480


def test_grounding_sets_read_back(sets):
    refs = pickle.loads((sets / "refcoco+" / "refs(unc).p").read_bytes())
    by_split = collections.Counter(r["split"] for r in refs for _ in r["sentences"])
    for name in ("train", "val", "testA", "testB"):
        got = ds.read_grounding(str(sets / f"refcoco+_{name}.json"))
        assert len(got) == by_split[name] > 0 and {g.split for g in got} == {name} and got.skipped == {}
    test = ds.read_grounding(str(sets / "refcoco+_test.json"))
    assert {g.split for g in test} == {"testA", "testB"}
    # every box is its object's tight box, inside its image
    image, ref = test[0], next(r for r in refs if r["ref_id"] == test[0].ref_id)
    instances = json.loads((sets / "refcoco+" / "instances.json").read_text())
    ann = next(a for a in instances["annotations"] if a["id"] == ref["ann_id"])
    assert list(image.box) == ann["bbox"]
    assert all(0 <= g.box[0] and g.box[0] + g.box[2] <= g.width and g.box[1] + g.box[3] <= g.height for g in test)


def test_sample_scenes_are_not_training_pictures(tmp_path):
    from sampledata import sample_data

    summary = sample_data.generate(tmp_path / "s", images=20, val_images=2, seed=0, progress=False)
    root = Path(summary["out"])
    down = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (root / "downstream").rglob("*.jpg")}
    train = {hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.jpg")
             if "downstream" not in p.parts}
    assert len(down) == 60 + 12 + 30 + 60 and not down & train
    assert summary["counts"]["downstream"]["grounding"]["refs"] > 0
    assert summary["paths"]["downstream"] == str(root / "downstream")


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ({"image": "a.jpg"}, "not the list of entries"),
    ([], "an empty split"),
    (["a.jpg"], "entry 0 is a str"),
    ([{"image": "a.jpg", "caption": "one caption"}], "entry 0: \"caption\" is a str, not a list"),
    ([{"image": "a.jpg", "caption": []}], "empty caption list"),
    ([{"image": "a.jpg", "caption": ["ok", 3]}], "caption 1 is a int"),
    ([{"caption": ["x"]}], "\"image\" is None"),
])
def test_retrieval_eval_bad_input(tmp_path, content, message):
    path = write(tmp_path / "coco_test.json", content)
    with pytest.raises(XvlmError, match=message) as err:
        ds.read_retrieval_eval(path)
    assert path in str(err.value)


@pytest.mark.parametrize("content, message", [
    ([{"image": "a.jpg", "caption": ["x"], "image_id": 1}], "\"caption\" is a list, not a string"),
    ([{"image": "a.jpg", "caption": "x"}], "\"image_id\" is None"),
    ([{"image": "a.jpg", "caption": "x", "image_id": True}], "\"image_id\" is True"),
])
def test_retrieval_train_bad_input(tmp_path, content, message):
    with pytest.raises(XvlmError, match=message):
        ds.read_retrieval_train(write(tmp_path / "coco_train.json", content))


def test_missing_annotation_file(tmp_path):
    with pytest.raises(XvlmError, match="does not exist"):
        ds.read_retrieval_eval(str(tmp_path / "nope.json"))


def refer_release(folder: Path, refs: list[dict], images=((1, 100, 80),), boxes=((10, 1, [5, 5, 20, 20]),)) -> None:
    (folder / "refcoco+").mkdir(parents=True, exist_ok=True)
    (folder / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    write(folder / "refcoco+" / "instances.json",
          {"images": [{"id": i, "width": w, "height": h} for i, w, h in images],
           "annotations": [{"id": a, "image_id": im, "bbox": b} for a, im, b in boxes]})


def ref(ref_id: int, ann_id: int = 10, image_id: int = 1, split: str = "val") -> dict:
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "sentences": []}


def test_grounding_counts_refs_without_box_and_boxes_outside(tmp_path):
    refer_release(tmp_path, [ref(0), ref(1, ann_id=11), ref(2, ann_id=12)],
                  boxes=((10, 1, [5, 5, 20, 20]), (11, 1, [90, 5, 20, 20]), (12, 1, [5, 5, 0, 20])))
    ann = write(tmp_path / "refcoco+_val.json", [
        {"image": "train2014/x.jpg", "text": "the red circle", "ref_id": 0},
        {"image": "train2014/x.jpg", "text": "no such ref", "ref_id": 99},
        {"image": "train2014/x.jpg", "text": "outside", "ref_id": 1},
        {"image": "train2014/x.jpg", "text": "empty box", "ref_id": 2},
    ])
    got = ds.read_grounding(ann)
    assert [g.ref_id for g in got] == [0] and got[0].box == (5.0, 5.0, 20.0, 20.0) and got[0].split == "val"
    assert got.skipped == {"ref_without_box": 1, "box_outside_image": 2}


def test_grounding_all_skipped_or_empty_is_an_error(tmp_path):
    refer_release(tmp_path, [ref(0)])
    with pytest.raises(XvlmError, match="none of its 1 entries has a usable box"):
        ds.read_grounding(write(tmp_path / "a.json", [{"image": "x.jpg", "text": "t", "ref_id": 7}]))
    with pytest.raises(XvlmError, match="an empty split"):
        ds.read_grounding(write(tmp_path / "b.json", []))
    with pytest.raises(XvlmError, match="\"ref_id\" is '0', not an integer"):
        ds.read_grounding(write(tmp_path / "c.json", [{"image": "x.jpg", "text": "t", "ref_id": "0"}]))


def test_grounding_refuses_a_pickle_with_a_class(tmp_path):
    refer_release(tmp_path, [ref(0)])
    (tmp_path / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps([collections.OrderedDict(ref_id=0)]))
    ann = write(tmp_path / "refcoco+_val.json", [{"image": "x.jpg", "text": "t", "ref_id": 0}])
    with pytest.raises(XvlmError, match="refused: it asks for the global collections.OrderedDict"):
        ds.read_grounding(ann)


def test_grounding_explicit_refer_paths_and_bad_refs(tmp_path):
    refer_release(tmp_path / "elsewhere", [ref(0)])
    ann = write(tmp_path / "refcoco+_val.json", [{"image": "x.jpg", "text": "t", "ref_id": 0}])
    with pytest.raises(XvlmError, match="refs.*does not exist"):
        ds.read_grounding(ann)
    refer = tmp_path / "elsewhere" / "refcoco+"
    assert len(ds.read_grounding(ann, str(refer / "refs(unc).p"), str(refer / "instances.json"))) == 1
    assert len(ds.read_grounding(ann, str(refer / "refs(unc).p"))) == 1      # instances.json beside the refs
    (refer / "refs(unc).p").write_bytes(pickle.dumps({"ref_id": 0}))
    with pytest.raises(XvlmError, match="holds a dict, not the list of refs"):
        ds.read_grounding(ann, str(refer / "refs(unc).p"), str(refer / "instances.json"))


def test_images_missing_corrupt_or_outside_the_root(tmp_path, sets):
    root = str(sets / "images")
    with pytest.raises(ds.ImageProblem) as err:
        ds.read_pixels(root, "val2014/none.jpg", 16)
    assert err.value.reason == "missing_image"
    with pytest.raises(ds.ImageProblem) as err:
        ds.load_downstream_image(root, "../refcoco+/instances.json")
    assert err.value.reason == "missing_image" and "leaves the image root" in str(err.value)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(ds.ImageProblem) as err:
        ds.read_pixels(str(tmp_path), "bad.jpg", 16)
    assert err.value.reason == "corrupt_image"
