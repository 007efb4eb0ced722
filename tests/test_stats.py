"""`xvlm stats`: the report on sample-data shards shows the counts computed independently from the source files,
is one self-contained HTML page whose plots are real PNGs, opens in headless Chromium without console messages,
compares two datasets, reads s3://, and its accumulators agree with numpy on the same values."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402

import storage  # noqa: E402
from reports import stats  # noqa: E402
from tools.cli import main as xvlm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ---------------------------------------------------------------------------------------------- shared build


def sample_build(tmp_path_factory) -> tuple[Path, Path]:
    """(sample-data folder, dataset built from all four sources): built once per test session and shared by
    test_stats / test_show / test_verify through a folder in the session's base temp dir."""
    base = tmp_path_factory.getbasetemp() / "reports-sample-build"
    src, out = base / "src", base / "ds"
    if (out / "manifest.json").exists():
        return src, out
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    from sampledata.sample_data import generate

    generate(str(src), images=60, val_images=10, seed=0)
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "tools.cli", "build-shards", "--source", f"coco={src / 'coco'}",
           "--source", f"vg={src / 'vg'}", "--source", f"sbu={src / 'sbu'}", "--source", f"cc={src / 'cc'}",
           "--out", str(out), "--samples-per-shard", "20", "--workers", "2", "--no-progress"]
    for _attempt in range(3):   # a local Ray can time out starting on a loaded machine; the build resumes
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode == 0 or not ("timed out during startup" in done.stderr
                                        or "could not start a local Ray" in done.stderr):
            break
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "manifest.json").exists()
    return src, out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return sample_build(tmp_path_factory)


def source_counts(src: Path) -> dict:
    """Counts computed from the release files themselves (not from the builder's output)."""
    coco_caps = json.loads((src / "coco/annotations/captions_train2017.json").read_text())
    coco_inst = json.loads((src / "coco/annotations/instances_train2017.json").read_text())
    vg_images = json.loads((src / "vg/image_data.json").read_text())
    vg_regions = json.loads((src / "vg/region_descriptions.json").read_text())
    vg_objects = json.loads((src / "vg/objects.json").read_text())
    sbu_urls = (src / "sbu/SBU_captioned_photo_dataset_urls.txt").read_text().splitlines()
    cc_rows = (src / "cc/Train_GCC-training.tsv").read_text().splitlines()

    coco_ids = {im["id"] for im in coco_caps["images"]}
    overlap = {im["coco_id"] for im in vg_images if im["coco_id"] in coco_ids}
    vg_of_coco = {im["image_id"]: im["coco_id"] for im in vg_images if im["coco_id"] in coco_ids}
    caps_per = Counter(a["image_id"] for a in coco_caps["annotations"])
    objs_per = Counter(a["image_id"] for a in coco_inst["annotations"] if not a["iscrowd"])
    vg_regions_per = {r["id"]: len(r["regions"]) for r in vg_regions}
    vg_objects_per = {o["image_id"]: len(o["objects"]) for o in vg_objects}
    sbu_present = sum((src / "sbu/images" / u.rsplit("/", 1)[-1]).exists() for u in sbu_urls)
    cc_present = sum((src / f"cc/images/{i}.jpg").exists() for i in range(len(cc_rows)))
    merged_regions = sum(vg_regions_per.get(v, 0) for v in vg_of_coco)
    merged_vg_objects = sum(vg_objects_per.get(v, 0) for v in vg_of_coco)
    return {
        "records": {
            "coco": {"image": len(coco_caps["images"]), "caption": len(coco_caps["annotations"]),
                     "object": len(coco_inst["annotations"])},
            "vg": {"image": len(vg_images), "region": sum(vg_regions_per.values()),
                   "object": sum(vg_objects_per.values())},
            "sbu": {"image": len(sbu_urls), "caption": len(sbu_urls)},
            "cc": {"image": len(cc_rows), "caption": len(cc_rows)},
        },
        "crowd": sum(a["iscrowd"] for a in coco_inst["annotations"]),
        "sbu_missing": len(sbu_urls) - sbu_present,
        "cc_missing": len(cc_rows) - cc_present,
        "samples": {
            "coco": {"images": len(coco_ids) - len(overlap),
                     "captions": sum(n for i, n in caps_per.items() if i not in overlap),
                     "regions": 0, "objects": sum(n for i, n in objs_per.items() if i not in overlap)},
            "coco+vg": {"images": len(overlap), "captions": sum(caps_per[i] for i in overlap),
                        "regions": merged_regions,
                        "objects": sum(objs_per[i] for i in overlap) + merged_vg_objects},
            "vg": {"images": len(vg_images) - len(overlap), "captions": 0,
                   "regions": sum(vg_regions_per.values()) - merged_regions,
                   "objects": sum(vg_objects_per.values()) - merged_vg_objects},
            "sbu": {"images": sbu_present, "captions": sbu_present, "regions": 0, "objects": 0},
            "cc": {"images": cc_present, "captions": cc_present, "regions": 0, "objects": 0},
        },
        "caption_words": [len(a["caption"].split()) for a in coco_caps["annotations"]],
    }


class _Page(HTMLParser):
    """Tables as lists of rows of cell texts, img src values, and every other tag / URL attribute."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.tags, self.urls = [], [], Counter(), []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        for name in ("src", "href"):
            if attrs.get(name) and tag != "img":
                self.urls.append(attrs[name])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _table_rows(page: _Page, first_header: str) -> dict[str, list[str]]:
    for table in page.tables:
        if table and table[0] and table[0][0] == first_header:
            return {row[0]: row for row in table[1:]}
    raise AssertionError(f"no table starting with {first_header!r}")


def _num(cell: str) -> int:
    return int(cell.replace(",", ""))


# ---------------------------------------------------------------------------------------------- the report


@pytest.mark.ray
def test_report_counts_match_the_source_files(built, tmp_path):
    src, ds = built
    want = source_counts(src)
    out = tmp_path / "report.html"
    assert xvlm(["stats", str(ds), "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    summary = doc["datasets"][0]

    # input records per source and kind: the raw release files
    for source, kinds in want["records"].items():
        assert summary["records"][source]["inputs"] == kinds, source
    # what the builder's rules reject: crowd boxes, images that were never downloaded (listing + its caption)
    rejects = summary["rejects"]["by_reason_source"]
    assert rejects == {"crowd_box": {"coco": want["crowd"]},
                       "missing_image": {"sbu": 2 * want["sbu_missing"], "cc": 2 * want["cc_missing"]}}
    assert want["crowd"] > 0 and want["sbu_missing"] > 0 and want["cc_missing"] > 0
    # samples per source (COCO images that VG also has are one coco+vg sample)
    got = {name: {k: v for k, v in c.items() if k != "passthrough_images"}
           for name, c in summary["samples"]["by_source"].items()}
    assert got == want["samples"]
    totals = summary["samples"]["total"]
    assert totals["images"] == sum(s["images"] for s in want["samples"].values())

    # the HTML shows the same numbers
    page = _Page()
    page.feed(out.read_text())
    samples = _table_rows(page, "sample source")
    for name, counts in want["samples"].items():
        row = samples[name]
        assert [_num(c) for c in row[1:5]] == [counts["images"], counts["captions"], counts["regions"],
                                               counts["objects"]], name
    records = {(r[0], r[1]): r for t in page.tables if t and t[0][0] == "input source" for r in t[1:]}
    for source, kinds in want["records"].items():
        for kind, n in kinds.items():
            assert _num(records[(source, kind)][2]) == n
            assert records[(source, kind)][5] == "ok"

    # histograms: one entry per caption / box / image, and caption words as in the source text
    per_image = summary["per_image"]
    assert per_image["captions"]["all"]["n"] == totals["images"]
    assert sum(per_image["captions"]["all"]["counts"]) == totals["images"]
    assert summary["text"]["caption_words"]["all"]["n"] == totals["captions"]
    coco_words = summary["text"]["caption_words"]["by_source"]
    coco_n = coco_words["coco"]["n"] + coco_words["coco+vg"]["n"]
    coco_mean = (coco_words["coco"]["mean"] * coco_words["coco"]["n"]
                 + coco_words["coco+vg"]["mean"] * coco_words["coco+vg"]["n"]) / coco_n
    assert coco_n == len(want["caption_words"])
    assert coco_mean == pytest.approx(np.mean(want["caption_words"]))
    assert sum(summary["boxes"]["area_fraction"]["all"]["counts"]) == totals["regions"] + totals["objects"]
    assert 0 < summary["boxes"]["area_fraction"]["all"]["min"] <= summary["boxes"]["area_fraction"]["all"]["max"] <= 1
    assert np.asarray(summary["images"]["sizes"]["counts"]).sum() == totals["images"]
    assert summary["text"]["token_method"].startswith("whitespace")
    # shards: as the manifest lists them
    manifest = json.loads((ds / "manifest.json").read_text())
    assert summary["shards"]["bytes"] == [s["bytes"] for s in manifest["shards"]]
    # reject examples carry the file and line of the record
    example = summary["rejects"]["examples"]["sbu/missing_image"][0]
    assert example["reason"] == "missing_image" and example["file"] and example["where"]


@pytest.mark.ray
def test_report_is_self_contained_with_real_png_plots(built, tmp_path):
    _, ds = built
    out = tmp_path / "r.html"
    assert xvlm(["stats", str(ds), "--out", str(out), "--json", str(tmp_path / "s.json"), "--no-progress"]) == 0
    text = out.read_text()
    page = _Page()
    page.feed(text)
    assert len(page.images) >= 12
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.width > 100 and im.height > 100
    assert page.tags["script"] == 0 and page.tags["link"] == 0
    assert all(u.startswith("#") for u in page.urls), page.urls          # only in-page anchors
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text
    assert "@import" not in text and "url(" not in text


def _chromium_console(html_path: Path, tmp_path: Path) -> tuple[str, str]:
    profile = tmp_path / f"chrome-{html_path.stem}"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           "--dump-dom", html_path.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    console = "\n".join(line for line in done.stderr.splitlines()
                        if ":CONSOLE" in line or "Uncaught" in line)
    return done.stdout, console


@pytest.mark.ray
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_opens_in_headless_chromium_without_console_errors(built, tmp_path):
    _, ds = built
    out = tmp_path / "report.html"
    assert xvlm(["stats", str(ds), "--out", str(out), "--no-progress"]) == 0
    dom, console = _chromium_console(out, tmp_path)
    assert console == ""
    page = _Page()
    page.feed(dom)
    assert len(page.images) >= 12 and all(s.startswith("data:image/png;base64,") for s in page.images)
    assert "Counts per source" in dom
    # the detector sees console messages (a page that logs one is caught)
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html><body><script>console.error("boom")</script></body></html>')
    _, console = _chromium_console(control, tmp_path)
    assert "boom" in console


@pytest.mark.ray
def test_compare_puts_two_datasets_side_by_side(built, tmp_path):
    _, ds = built
    other = shardkit.make_dataset(str(tmp_path / "other"), samples=12, per_shard=5, sources=("coco", "sbu"))
    out = tmp_path / "cmp.html"
    assert xvlm(["stats", str(ds), "--compare", other, "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "cmp.json").read_text())
    first, second = doc["datasets"]
    assert first["dataset"] == str(ds) and second["dataset"] == other
    assert second["samples"]["total"]["images"] == 12
    assert second["samples"]["by_source"]["coco"]["images"] == 6
    page = _Page()
    page.feed(out.read_text())
    sample_tables = [t for t in page.tables if t and t[0][0] == "sample source"]
    assert len(sample_tables) == 2
    assert {r[0]: _num(r[1]) for r in sample_tables[1][1:]} == {"coco": 6, "sbu": 6, "total": 12}
    assert out.read_text().count('<div class="col">') >= 2 * len(stats.SECTIONS)


# ---------------------------------------------------------------------------------------------- smaller pieces


def test_binned_matches_numpy_over_batches():
    rng = np.random.default_rng(0)
    values = rng.lognormal(-4, 1.5, 20_000)
    groups = rng.integers(0, 3, values.size)
    edges = np.logspace(-5, 0, 41)
    binned = stats.Binned(edges, log10=True)
    for chunk in np.array_split(np.arange(values.size), 7):
        binned.add(values[chunk], groups[chunk])
    clipped = np.clip(values, edges[0], np.nextafter(edges[-1], 0))
    expected, _ = np.histogram(clipped, bins=edges)
    summary = binned.summary({"a": 0, "b": 1, "c": 2})
    assert summary["all"]["counts"] == expected.tolist()
    assert summary["all"]["n"] == values.size
    assert summary["all"]["mean"] == pytest.approx(values.mean())
    assert summary["by_source"]["b"]["n"] == int((groups == 1).sum())
    ints = stats.Binned(stats.int_edges(5))
    ints.add(np.array([0, 1, 1, 5, 9, 2]), np.zeros(6, int))
    assert ints.summary({"x": 0})["all"]["counts"] == [1, 2, 1, 0, 0, 2]   # 9 lands in the last bin (>= 5)


def test_bounded_counter_is_exact_until_full_and_bounded_after():
    counter = stats.BoundedCounter(capacity=3)
    counter.update(["a", "b", "a", "c"])
    assert counter.summary()["top"] == [["a", 2], ["b", 1], ["c", 1]] and counter.summary()["exact"]
    words = ["a"] * 50 + ["b"] * 20 + [f"rare{i}" for i in range(30)]
    counter = stats.BoundedCounter(capacity=3)
    for i in range(0, len(words), 4):
        counter.update(words[i:i + 4])
    top = dict(counter.summary()["top"])
    assert len(counter.counts) <= 6
    assert top["a"] <= 50 and top["a"] >= 50 - counter.error_bound
    assert top["b"] >= 20 - counter.error_bound and list(top)[:2] == ["a", "b"]


def _extended_index(path: str) -> None:
    """A dataset whose index has the optional columns (texts, boxes, labels, attributes)."""
    shardkit.make_dataset(path, samples=6, per_shard=6, sources=("vg",), size=(100, 50))
    index = pq.read_table(os.path.join(path, "index.parquet"))
    n = index.num_rows
    extra = {
        "captions": pa.array([["a red circle on the left side"]] * n, pa.list_(pa.string())),
        "region_texts": pa.array([["red circle", "a blue unicornish square"]] * n, pa.list_(pa.string())),
        "boxes": pa.array([[[0.0, 0.0, 50.0, 25.0], [75.0, 25.0, 25.0, 25.0]]] * n,
                          pa.list_(pa.list_(pa.float32()))),
        "object_labels": pa.array([["circle", "square"]] * n, pa.list_(pa.string())),
        "attributes": pa.array([["red", "blue", "red"]] * n, pa.list_(pa.string())),
    }
    index = index.drop_columns([name for name in extra if name in index.column_names])
    for name, column in extra.items():
        index = index.append_column(name, column)
    pq.write_table(index, os.path.join(path, "index.parquet"))


def test_optional_index_columns_fill_labels_boxes_and_tokens(tmp_path):
    path = str(tmp_path / "ext")
    _extended_index(path)
    tokenizer = str(tmp_path / "tok")
    from sampledata.sample_data import write_tokenizer

    write_tokenizer(Path(tokenizer))
    summary = stats.summarize(stats.collect(path, tokenizer=tokenizer, progress=False))
    assert summary["labels"]["top"] == [["circle", 6], ["square", 6]]
    assert summary["attributes"]["top"] == [["red", 12], ["blue", 6]]
    centres = np.asarray(summary["boxes"]["centres"]["counts"])
    assert centres.sum() == 12
    # box 1 centre (0.25, 0.25) and box 2 centre (0.875, 0.75) of a 100x50 image, on a 32x32 grid
    assert centres[8, 8] == 6 and centres[28, 24] == 6
    aspect = summary["boxes"]["aspect_ratio"]["all"]
    assert aspect["min"] == pytest.approx(1.0) and aspect["max"] == pytest.approx(2.0)
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(tokenizer)
    want = len(tok("a red circle on the left side", add_special_tokens=False)["input_ids"])
    assert summary["text"]["caption_tokens"]["all"]["mean"] == pytest.approx(want)
    assert summary["text"]["token_method"].startswith("WordPiece")
    region_tokens = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in ("red circle", "a blue unicornish square")]
    assert summary["text"]["region_tokens"]["all"]["mean"] == pytest.approx(np.mean(region_tokens))
    assert summary["text"]["region_words"]["all"]["mean"] == pytest.approx(3.0)
    html_text = stats.render_html([summary])
    assert "circle" in html_text and "box centres" in html_text


def test_errors_are_clear(tmp_path, capsys):
    assert xvlm(["stats", str(tmp_path / "nothing"), "--out", str(tmp_path / "r.html")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    path = shardkit.make_dataset(str(tmp_path / "ds"), samples=4, per_shard=4)
    os.remove(os.path.join(path, "index.parquet"))
    assert xvlm(["stats", path, "--out", str(tmp_path / "r.html"), "--no-progress"]) == 2
    assert "index.parquet does not exist" in capsys.readouterr().err


@pytest.mark.s3
def test_stats_reads_an_s3_dataset(s3, s3_prefix, tmp_path):
    local = shardkit.make_dataset(str(tmp_path / "ds"), samples=9, per_shard=4, sources=("coco", "cc"))
    for name in sorted(os.listdir(local)):
        storage.write_bytes(storage.join(s3_prefix, name), (Path(local) / name).read_bytes())
    out = storage.join(s3_prefix, "report/report.html")
    assert xvlm(["stats", s3_prefix, "--out", out, "--no-progress"]) == 0
    doc = json.loads(storage.read_bytes(storage.join(s3_prefix, "report/report.json")))
    assert doc["datasets"][0]["samples"]["total"]["images"] == 9
    assert storage.read_bytes(out).startswith(b"<!DOCTYPE html>")
    local_doc = stats.summarize(stats.collect(local, progress=False))
    assert local_doc["samples"] == doc["datasets"][0]["samples"]


def test_image_size_plots_fall_back_to_the_builders_max_side(tmp_path):
    """A manifest that does not record --max-image-side gets the builder's default (512), not another number."""
    from pipeline.images import ImageConfig
    from shards.format import DEFAULT_MAX_IMAGE_SIDE

    path = shardkit.make_dataset(str(tmp_path / "ds"), samples=4, per_shard=4)   # build config: {}
    collected = stats.collect(path, progress=False)
    assert collected.max_side == ImageConfig().max_side == DEFAULT_MAX_IMAGE_SIDE == 512
    assert collected.image_sizes.x_edges[-1] == 512
