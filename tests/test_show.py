"""`xvlm show`: boxes are drawn where they are (pixel checks on known samples of the sample-data build), the
image is placed unchanged, and the --augmented views are the loader's own samples: after crop, flip and resize,
each drawn box still sits on its object (the pixel at its centre has the object's colour)."""
from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402
from test_stats import sample_build  # noqa: E402

from shards import boxes as box_math  # noqa: E402
from shards import samples  # noqa: E402
from shards.augment import to_tensor  # noqa: E402
from shards.loader_config import preset  # noqa: E402
from shards.manifest import read_dataset_manifest  # noqa: E402
from shards.plan import rng_for  # noqa: E402
from reports import show  # noqa: E402
from tools.cli import main as xvlm  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return sample_build(tmp_path_factory)


def _shard_samples(ds: Path) -> dict[str, tuple[bytes, dict]]:
    """Every sample of the dataset, read with tarfile directly (independently of reports/show/)."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(ds.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return {k: (v["jpg"], json.loads(v["json"])) for k, v in out.items()}


def _rgb(jpg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpg)) as im:
        return np.asarray(im.convert("RGB"))


def _outline_band(box: tuple[float, float, float, float], k: int) -> tuple[int, int, int, int]:
    x, y, w, h = box
    x0, y0 = int(round(x * k)), int(round(y * k))
    return x0, y0, max(x0 + 1, int(round((x + w) * k)) - 1), max(y0 + 1, int(round((y + h) * k)) - 1)


def _on_outline(px: int, py: int, rect: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = rect
    w = show.LINE_WIDTH - 1
    return x0 <= px <= x1 and y0 <= py <= y1 and (px <= x0 + w or px >= x1 - w or py <= y0 + w or py >= y1 - w)


def assert_outlines(png: np.ndarray, drawn: list[tuple[float, float, float, float]], k: int) -> None:
    """At the middle of each edge of box i, just inside the box, the pixel has box_colour(i) — or, where a box
    drawn later has its outline on the same pixel (VG regions and objects often share a box), that box's colour."""
    rects = [_outline_band(b, k) for b in drawn]
    for i, (x, y, w, h) in enumerate(drawn):
        mid_x, mid_y = int((x + w / 2) * k), int((y + h / 2) * k)
        points = {"left": (int(round(x * k)) + 1, mid_y), "right": (int(round((x + w) * k)) - 2, mid_y),
                  "top": (mid_x, int(round(y * k)) + 1), "bottom": (mid_x, int(round((y + h) * k)) - 2)}
        for side, (px, py) in points.items():
            owner = max(j for j in range(len(rects)) if j == i or _on_outline(px, py, rects[j]))
            assert png[py, px].tolist() == list(show.box_colour(owner)), (i, side, owner)


@pytest.mark.ray
def test_show_draws_each_box_on_its_edges(built, tmp_path):
    _, ds = built
    all_samples = _shard_samples(ds)
    # a COCO sample (objects never overlap in the sample data) and a merged coco+vg sample
    coco_key = next(k for k, (_, m) in sorted(all_samples.items()) if m["source"] == "coco" and len(m["regions"]) >= 3)
    assert xvlm(["show", str(ds), coco_key, "--out", str(tmp_path)]) == 0
    jpg, meta = all_samples[coco_key]
    stored = _rgb(jpg)
    png = np.asarray(Image.open(tmp_path / f"{coco_key}.png").convert("RGB"))
    k = show.scale_factor(meta["width"], meta["height"])
    assert png.shape[0] > meta["height"] * k and png.shape[1] >= meta["width"] * k   # image + text panel
    assert_outlines(png, [tuple(r["bbox"]) for r in meta["regions"]], k)
    mask = np.ones(stored.shape[:2], bool)
    for r in meta["regions"]:   # away from each box, its number tag (above or inside it) and a margin
        x, y, w, h = r["bbox"]
        mask[max(0, int(y) - 24):int(y + h) + 4, max(0, int(x) - 4):int(x + w) + 40] = False
    rows, cols = np.nonzero(mask)
    assert rows.size > 100
    picks = np.linspace(0, rows.size - 1, 25).astype(int)
    for r_, c_ in zip(rows[picks], cols[picks]):
        assert png[r_ * k, c_ * k].tolist() == stored[r_, c_].tolist()


@pytest.mark.ray
def test_show_random_and_unknown_key(built, tmp_path, capsys):
    _, ds = built
    assert xvlm(["show", str(ds), "--random", "4", "--seed", "3", "--out", str(tmp_path / "a")]) == 0
    first = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert len(first) == 4
    assert xvlm(["show", str(ds), "--random", "4", "--seed", "3", "--out", str(tmp_path / "b")]) == 0
    assert sorted(p.name for p in (tmp_path / "b").glob("*.png")) == first
    capsys.readouterr()
    assert xvlm(["show", str(ds), "coco-999", "--out", str(tmp_path / "c")]) == 2
    assert "coco-999 not in" in capsys.readouterr().err
    assert xvlm(["show", str(ds), "--out", str(tmp_path / "c")]) == 2
    assert xvlm(["show", str(ds), "--random", "1", "--augmented", "--out", str(tmp_path / "c")]) == 2
    assert "--augmented needs --tokenizer" in capsys.readouterr().err


@pytest.mark.ray
def test_augmented_views_keep_boxes_on_their_objects(built, tmp_path):
    src, ds = built
    tokenizer = str(src / "tokenizer")
    all_samples = _shard_samples(ds)
    keys = [k for k, (_, m) in sorted(all_samples.items()) if len(m["regions"]) >= 2][:6]
    # photometric RandAugment off (it changes colours on purpose); always flipped, to check flips
    config = preset("base", tokenizer=tokenizer, randaug_n=0, hflip_prob=1.0)
    checked = 0
    for key in keys:
        jpg, meta = all_samples[key]
        stored = _rgb(jpg)
        sample = samples.region_sample(jpg, meta, rng_for(0, key, "region"), config)
        assert sample["flipped"]
        image = np.asarray(show.tensor_to_image(sample["image"])).astype(int)
        drawn, _ = show.region_boxes(sample, config.image_res)
        for box in drawn:
            # the source region this row came from: the one the loader's arithmetic maps onto the drawn box
            matches = [r for r in meta["regions"]
                       if box_math.inside_fraction(tuple(r["bbox"]), sample["crop"]) == 1.0 and
                       np.allclose(box_math.box_in_output(tuple(r["bbox"]), sample["crop"], True,
                                                          config.image_res, config.image_res), box.bbox, atol=1e-3)]
            if not matches:
                continue   # a box clipped by the crop: its centre need not be on the object
            x, y, w, h = matches[0]["bbox"]
            want = stored[int(y + h / 2), int(x + w / 2)].astype(int)
            bx, by, bw, bh = box.bbox
            got = image[int(by + bh / 2), int(bx + bw / 2)]
            assert np.abs(got - want).max() <= 40, (key, box.text, got, want)
            checked += 1
        # and the drawn PNG outlines exactly those boxes
        canvas = np.asarray(show.draw_sample(show.tensor_to_image(sample["image"]), drawn, ["x"]))
        assert_outlines(canvas, [b.bbox for b in drawn], show.scale_factor(config.image_res, config.image_res))
    assert checked >= 4


@pytest.mark.ray
def test_show_augmented_cli_writes_the_loader_views(built, tmp_path, capsys):
    src, ds = built
    assert xvlm(["show", str(ds), "--random", "3", "--augmented", "--tokenizer", str(src / "tokenizer"),
                 "--preset", "tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    raws = [n for n in names if n.count(".") == 1]
    assert len(raws) == 3
    for raw in raws:
        key = raw[:-4]
        assert f"{key}.image_text.png" in names or f"{key}: no image-text view" in out
        assert f"{key}.region.png" in names or f"{key}: no region view" in out
    assert any(n.endswith(".region.png") for n in names) and any(n.endswith(".image_text.png") for n in names)
    region = next(p for p in tmp_path.glob("*.region.png"))
    with Image.open(region) as im:
        assert im.width >= show.PANEL_WIDTH and im.height > 64 * show.scale_factor(64, 64)


def test_tensor_to_image_undoes_the_loader_normalisation():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), "RGB")
    back = np.asarray(show.tensor_to_image(to_tensor(image))).astype(int)
    assert np.abs(back - np.asarray(image).astype(int)).max() <= 1


def test_show_by_key_on_a_tiny_dataset(tmp_path):
    path = shardkit.make_dataset(str(tmp_path / "ds"), samples=6, per_shard=3, size=(400, 300))
    written = show.show(show.ShowOptions(dataset=path, keys=["coco-000004"], out=str(tmp_path / "out")))
    assert [Path(p).name for p in written] == ["coco-000004.png"]
    manifest = read_dataset_manifest(path)
    row = show.find_rows(manifest, ["coco-000004"])[0]
    sample = show.read_sample(manifest, row)
    assert sample.meta["key"] == "coco-000004" and row["shard"] == "shard-000001.tar"
    png = np.asarray(Image.open(written[0]).convert("RGB"))
    assert_outlines(png, [tuple(r["bbox"]) for r in sample.meta["regions"]], 1)
