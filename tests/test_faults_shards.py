"""Fault injection into datasets: hostile samples (100k-deep JSON, a lone surrogate, a 3 GiB sparse member, an
oversized member, NaN boxes, an image bomb, a 144-megapixel JPEG, non-image bytes, a 5 MB JSON) are skipped and
counted by the loader (training goes on, memory stays flat), listed by `xvlm verify`, refused one line at a time by
`xvlm show`; bad manifests and indexes are refused by the loader, verify, stats and show with the same one-line
error (exit 2)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402
import shardkit  # noqa: E402
from test_loader_split import TOKENIZER  # noqa: E402

from shards import format as shard_format  # noqa: E402
from shards.dataset import open_dataset  # noqa: E402
from storage.errors import XvlmError  # noqa: E402
from shards.loader import MultiGrainedLoader  # noqa: E402
from shards.loader_config import preset  # noqa: E402
from tools.cli import main as xvlm  # noqa: E402
from reports.verify import VerifyOptions, verify  # noqa: E402

CAP = 256 * 1024          # MAX_MEMBER_BYTES while these tests run (the real one is 64 MiB)
# key -> (members replaced, what the loader counts, what verify says, does `xvlm show` draw it)
HOSTILE = {
    "coco-000001": ({"json": b"[" * 100_000 + b"]" * 100_000}, "bad_json", "100000 deep", False),
    "coco-000002": ({"json": hostile.sample_json("coco-000002", captions=["coco-000002 a \ud800 red circle"])},
                    None, None, True),
    "coco-000003": ([hostile.regular("coco-000003.json", hostile.sample_json("coco-000003")),
                     hostile.sparse("coco-000003.jpg", 3 << 30)], "unsafe_member", "is a sparse file", False),
    "coco-000004": ({"jpg": os.urandom(CAP + 1000)}, "unsafe_member", "more than the 262144 allowed", False),
    "coco-000005": ({"json": hostile.sample_json("coco-000005", regions=[
        {"bbox": [float("nan"), 0, 10, 10], "text": "nan box", "kind": "region", "attributes": []},
        {"bbox": ["x", 1, 2, 3], "text": "string box", "kind": "region", "attributes": []},
        {"bbox": [5, 5, -4, 10], "text": "negative box", "kind": "object", "attributes": []}])},
        None, "is not 4 finite numbers", True),
    "coco-000006": ({"jpg": hostile.png_claiming(100_000, 100_000)}, "corrupt_image", "DecompressionBombError", False),
    "coco-000007": ({"jpg": hostile.jpeg_claiming(12_000, 12_000),
                     "json": hostile.sample_json("coco-000007", width=12_000, height=12_000)},
                    "too_many_pixels", "exceeds the loader's max_pixels", False),
    "coco-000009": ({"jpg": b"<html><body>404 not found</body></html>"}, "corrupt_image", "does not decode", False),
    "coco-000010": ({"json": hostile.sample_json("coco-000010", captions=["x" * 5_000_000])}, "unsafe_member",
                    "holds 5000218 bytes, more than the 262144 allowed", False),
}


@pytest.fixture(autouse=True)
def small_member_cap(monkeypatch):
    monkeypatch.setattr(shard_format, "MAX_MEMBER_BYTES", CAP)


@pytest.fixture(scope="module")
def hostile_dataset(tmp_path_factory) -> str:
    path = shardkit.make_dataset(str(tmp_path_factory.mktemp("hostile") / "ds"), samples=24, per_shard=8)
    hostile.replace_samples(path, {key: members for key, (members, *_rest) in HOSTILE.items()})
    return path


def test_sample_json_is_parsed_with_bounded_size_and_depth():
    from shards.samples import SkipSample, parse_meta

    for data, message in ((hostile.sample_json("k-1", captions=["x" * 5_000_000]), "more than the 4194304 allowed"),
                          (b"[" * 100_000 + b"]" * 100_000, "100000 deep"),
                          (b'{"captions": "' + b"[" * 1000 + b'"}', None)):       # brackets inside a string
        if message is None:
            with pytest.raises(SkipSample, match="`captions` is not a list"):
                parse_meta(data)
            continue
        with pytest.raises(SkipSample, match=message) as skip:
            parse_meta(data)
        assert skip.value.reason == "bad_json"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("iter_perc", [0.0, 1.0])
def test_loader_skips_and_counts_every_hostile_sample_in_flat_memory(hostile_dataset, iter_perc):
    before = _peak_rss_mb()
    # per_batch: iter_perc 1.0 gives region batches only (X-VLM's per-iteration mode always has image-text batches)
    loader = MultiGrainedLoader([hostile_dataset], preset("tiny", tokenizer=TOKENIZER, iter_perc=iter_perc,
                                                          iter_perc_mode="per_batch", image_text_batch_size=4,
                                                          region_batch_size=4, region_max_images=2,
                                                          shuffle_buffer=4))
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    skips = batches[-1]["skips"]
    keys = {k for b in batches for k in b["keys"]}
    for key, (_members, reason, _verify, _draws) in HOSTILE.items():
        if reason is not None:
            assert skips.get(reason, 0) >= 1, (key, reason, skips)
            assert key not in keys, key
    if iter_perc == 0.0:
        assert "coco-000002" in keys                      # the caption with a lone surrogate trains
        assert "coco-000005" in keys                      # NaN boxes do not matter to an image-text batch
    else:
        assert "coco-000005" not in keys and skips.get("no_region", 0) >= 1
    assert _peak_rss_mb() - before < 1024, "the sparse member must not be expanded in memory"


def test_training_on_hostile_data_runs_and_resumes(hostile_dataset, tmp_path):
    from train.config import load_config
    from train.loop import train
    from train.metrics import read_metrics

    tiny = str(Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_cpu.yaml")

    def run(steps: int) -> dict:
        return train(load_config(tiny, [
            f"out={json.dumps(str(tmp_path / 'run'))}", f"data.datasets=[{hostile_dataset}]",
            f"data.tokenizer={TOKENIZER}", f"schedule.steps={steps}", "schedule.warmup_steps=1",
            "checkpoint.every=2", "logging.progress=false", "logging.tensorboard=false",
            "data.image_text_batch_size=8", "data.region_batch_size=4", "data.region_max_images=2",
            "data.shuffle_buffer=4", "data.num_workers=0"]))

    assert run(2)["steps"] == 2
    assert run(4)["start_step"] == 2                      # the resume meets the same samples again, and goes on
    entries = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [e["step"] for e in entries] == [1, 2, 3, 4]
    assert sum(sum(e["skips"].values()) for e in entries[-1:]) >= 1


def test_verify_lists_every_hostile_sample_without_crashing(hostile_dataset):
    result = verify(VerifyOptions(hostile_dataset, progress=False, workers=2))
    assert not result.ok
    for key, (_members, _reason, expected, _draws) in HOSTILE.items():
        if expected is None:
            continue
        found = [p for p in result.problems if key in p.where or key in p.detail]
        assert any(expected in p.detail for p in found), (key, expected, [p.line() for p in found])


@pytest.mark.parametrize("key", list(HOSTILE))
def test_show_draws_what_it_can_and_refuses_the_rest_in_one_line(hostile_dataset, tmp_path, capsys, key):
    draws = HOSTILE[key][3]
    code = xvlm(["show", hostile_dataset, key, "--out", str(tmp_path / "show")])
    out = capsys.readouterr()
    if draws:
        assert code == 0 and (tmp_path / "show" / f"{key}.png").is_file(), out.err
    else:
        assert code == 2 and len(out.err.strip().splitlines()) == 1 and key in out.err, out.err
        assert "Traceback" not in out.err


# ---------------------------------------------------------------------------------------------- bad metadata


def _manifest(path: str, change) -> None:
    data = json.loads(Path(path, "manifest.json").read_text())
    change(data)
    Path(path, "manifest.json").write_text(json.dumps(data))


def _index(path: str, table) -> None:
    pq.write_table(table, os.path.join(path, "index.parquet"))


def _index_table(path: str) -> pa.Table:
    return pq.read_table(os.path.join(path, "index.parquet"))


BAD_METADATA = {  # damage -> a fragment of the one error every reader gives
    "counts are strings": (lambda p: _manifest(p, lambda m: m["shards"][0].update(samples="4")),
                           "shards[0].samples is '4', not a count"),
    "shard without a name": (lambda p: _manifest(p, lambda m: m["shards"][0].pop("name")),
                             "shards[0] has no valid name"),
    "shards not a list": (lambda p: _manifest(p, lambda m: m.update(shards={"a": 1})), "`shards` is dict, not a list"),
    "shard name with ../": (lambda p: _manifest(p, lambda m: m["shards"][0].update(name="../../etc/x-000000.tar")),
                            "shards[0] has no valid name"),
    "index name with ../": (lambda p: _manifest(p, lambda m: m.update(files={"index": "../../x.parquet"})),
                            "files.index is '../../x.parquet'"),
    "sources counts not numbers": (lambda p: _manifest(p, lambda m: m["sources"]["coco"].update(inputs={"image": "x"})),
                                   "sources.coco.inputs is not a mapping"),
    "manifest not JSON": (lambda p: Path(p, "manifest.json").write_bytes(b"\x89PNG not json"),
                          "manifest.json is not UTF-8 JSON"),
    "manifest a JSON list": (lambda p: Path(p, "manifest.json").write_text("[1, 2]"),
                             "holds a JSON list, not a dataset manifest"),
    "manifest 100k deep": (lambda p: Path(p, "manifest.json").write_bytes(b"[" * 100_000 + b"]" * 100_000),
                           "nests arrays / objects 100000 deep"),
    "index random bytes": (lambda p: Path(p, "index.parquet").write_bytes(os.urandom(5000)),
                           "index.parquet is not a readable parquet file"),
    "index without offset": (lambda p: _index(p, _index_table(p).drop_columns(["offset"])), "no column 'offset'"),
    "index offsets as text": (lambda p: _index(p, _index_table(p).set_column(
        2, "offset", pa.array([str(v) for v in _index_table(p).column("offset").to_pylist()]))),
        "column 'offset' is string"),
}


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory) -> str:
    return shardkit.make_dataset(str(tmp_path_factory.mktemp("meta") / "ds"), samples=8, per_shard=4)


@pytest.mark.parametrize("damage", list(BAD_METADATA))
def test_bad_metadata_is_refused_by_every_reader_with_the_same_error(clean_dataset, tmp_path, capsys, damage):
    breaks, fragment = BAD_METADATA[damage]
    path = str(tmp_path / "ds")
    shutil.copytree(clean_dataset, path)
    breaks(path)
    with pytest.raises(XvlmError, match=None) as loader_error:
        open_dataset(path)
    assert fragment in str(loader_error.value)
    for command in (["verify", path, "--no-progress"], ["stats", path, "--out", str(tmp_path / "r.html"),
                                                         "--no-progress"],
                    ["show", path, "--random", "1", "--out", str(tmp_path / "show")]):
        code = xvlm(command)
        err = capsys.readouterr().err.strip()
        assert code == 2 and fragment in err and len(err.splitlines()) == 1, (command, err)


def test_index_offsets_outside_the_shard_are_refused_by_the_loader(clean_dataset, tmp_path):
    path = str(tmp_path / "ds")
    shutil.copytree(clean_dataset, path)
    table = _index_table(path)
    _index(path, table.set_column(2, "offset", pa.array([10**12] + table.column("offset").to_pylist()[1:],
                                                        pa.int64())))
    with pytest.raises(XvlmError, match="an offset outside its .* bytes"):
        open_dataset(path)
    assert ("shard-000000.tar: coco-000000", "index") in {
        (p.where, p.kind) for p in verify(VerifyOptions(path, progress=False)).problems}
