"""Measure the leak filter of `xvlm build-shards --exclude-eval` on sample data with planted copies of evaluation
pictures (exact, re-encoded at JPEG quality 70, resized to 70 %, cropped by 3-5 px a side: sampledata/sources16m.py).

    python bench/bench_leak_filter.py --images 1000          # ~42 planted copies, ~1,300 other web pictures

Builds all eight sources with the filter (local Ray), then compares the eval_leak rejects with eval/planted.json:
recall per kind of copy (planted copies dropped / planted), false positives (web pictures dropped that are no
copy: CC, SBU, CC12M, Open Images, Objects365), and the Hamming distances of both groups to their nearest
evaluation picture (so the margin at the threshold is visible). Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import Counter, defaultdict

WEB = ("cc", "sbu", "cc12m", "openimages", "objects365")
EIGHT = ("coco", "vg", "sbu", "cc", "cc12m", "objects365", "openimages", "refcoco")


def _exclude(ev: str) -> list[str]:
    return [f"coco-karpathy={ev}/coco_test.json,images={ev}/images", f"coco-karpathy={ev}/coco_val.json",
            f"refcoco+={ev}/refcoco+_val.json", f"refcoco+={ev}/refcoco+_test.json",
            f"flickr30k={ev}/flickr30k_test.json,images={ev}/images",
            f"flickr30k={ev}/flickr30k_val.json,images={ev}/images"]


def _web_pictures(out: str) -> dict[str, str]:
    """sample key -> file of every web picture that has a file (the image stage rejects the others as missing)."""
    import glob

    files = {f"cc12m-{int(os.path.basename(p)[:-4]):09d}": p for p in glob.glob(f"{out}/cc12m/images/*.jpg")}
    files.update({f"cc-{int(os.path.basename(p)[:-4]):09d}": p for p in glob.glob(f"{out}/cc/images/*.jpg")})
    files.update({f"openimages-{os.path.basename(p)[:-4]}": p for p in glob.glob(f"{out}/openimages/train/*.jpg")})
    files.update({f"objects365-{int(p[-12:-4])}": p for p in glob.glob(f"{out}/objects365/train/*/*.jpg")})
    from pipeline.sources import safe_id

    files.update({f"sbu-{safe_id(os.path.basename(p)[:-4])}": p for p in glob.glob(f"{out}/sbu/images/*.jpg")})
    return files


def measure(out: str, workers: int, threshold: int) -> dict:
    import pyarrow.parquet as pq

    from pipeline.build import BuildConfig, run_build
    from pipeline.evalsets import parse_spec
    from pipeline.leak import build_index

    sample_root, built = os.path.join(out, "sample"), os.path.join(out, "built")
    config = BuildConfig(sources={s: os.path.join(sample_root, s) for s in EIGHT}, out=built, samples_per_shard=200,
                         workers=workers, progress=False, exclude_eval=_exclude(f"{sample_root}/eval"),
                         leak_max_distance=threshold)
    run_build(config)
    rejects = pq.read_table(os.path.join(built, "rejects.parquet")).to_pylist()
    index = pq.read_table(os.path.join(built, "index.parquet"), columns=["key"]).column("key").to_pylist()
    planted = {p["key"]: p for p in json.loads(open(f"{sample_root}/eval/planted.json").read())}
    # an image reject's (file, where) names the listing; map it back to sample keys through the groups' keys
    dropped_keys = _dropped_keys(sample_root, rejects)
    web = _web_pictures(sample_root)
    index_set = set(index)
    evaluation = build_index([parse_spec(s) for s in _exclude(f"{sample_root}/eval") if "images=" in s], False)
    nearest = {k: evaluation.nearest(open(p, "rb").read())[0] for k, p in web.items()}
    kinds: dict[str, Counter] = defaultdict(Counter)
    for key, row in planted.items():
        kinds[row["kind"]]["planted"] += 1
        kinds[row["kind"]]["dropped"] += key in dropped_keys
        assert key not in index_set or key not in dropped_keys
    others = [k for k in web if k not in planted]
    false = [k for k in others if k in dropped_keys]
    # Over every source (COCO, VG, RefCOCO too): samples dropped by content that are no planted copy.
    by_content = sum(1 for r in rejects if r["reason"] == "eval_leak" and r["kind"] == "image"
                     and " by content: " in r["detail"])
    planted_dropped = sum(c["dropped"] for c in kinds.values())
    by_kind = defaultdict(list)
    for key, row in planted.items():
        if key in nearest:
            by_kind[row["kind"]].append(nearest[key])
    return {"recall": {k: {"planted": c["planted"], "dropped": c["dropped"], "recall": c["dropped"] / c["planted"]}
                       for k, c in sorted(kinds.items())},
            "max_distance_by_kind": {k: max(v) for k, v in sorted(by_kind.items())},
            "false_positives": len(false), "web_pictures_not_copies": len(others),
            "content_drops_not_planted_all_sources": by_content - planted_dropped,
            "samples_written": len(index),
            "false_positive_rate": len(false) / max(1, len(others)),
            "distance_copies": dict(sorted(Counter(nearest[k] for k in planted if k in nearest).items())),
            "distance_others_min": min(nearest[k] for k in others), "threshold": threshold,
            "distance_others_hist": dict(sorted(Counter(min(nearest[k] // 8 * 8, 128) for k in others).items()))}


def _dropped_keys(sample_root: str, rejects: list[dict]) -> set[str]:
    """Sample keys of the web images dropped as eval_leak: their image reject rows name the listing (file, where),
    which the source's ImageRef of that key carries."""
    from pipeline.records import ImageRef
    from pipeline.sources import get_source, sample_key

    leaks = {(r["source"], r["file"], r["where"]) for r in rejects if r["reason"] == "eval_leak" and r["kind"] == "image"}
    keys = set()
    for source in WEB:
        module = get_source(source)
        for record in module.iter_records(os.path.join(sample_root, source)):
            if isinstance(record, ImageRef):
                file, _, where = record.ref.rpartition("#")
                if (source, file, where) in leaks:
                    keys.add(sample_key(module, record.source_id))
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="sample-data --images (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threshold", type=int, default=None, help="--leak-max-distance (default: the builder's)")
    parser.add_argument("--out", help="work folder (default: a temp folder, removed)")
    args = parser.parse_args(argv)
    from pipeline.leak import HAMMING_THRESHOLD
    from sampledata.sample_data import generate

    out = args.out or tempfile.mkdtemp(prefix="bench_leak_")
    try:
        generate(os.path.join(out, "sample"), images=args.images, val_images=max(20, args.images // 10),
                 seed=args.seed, progress=False)
        report = measure(out, args.workers, HAMMING_THRESHOLD if args.threshold is None else args.threshold)
        for kind, r in report["recall"].items():
            print(f"{kind:<10} planted {r['planted']:4d}  dropped {r['dropped']:4d}  recall {r['recall']:.1%}")
        print(f"largest distance of a copy to its original, by kind: {report['max_distance_by_kind']}")
        print(f"dropped by content but no planted copy, all sources: {report['content_drops_not_planted_all_sources']} "
              f"({report['samples_written']} samples written)")
        print(f"false positives: {report['false_positives']} of {report['web_pictures_not_copies']} other web "
              f"pictures ({report['false_positive_rate']:.2%}); nearest-distance of copies "
              f"{report['distance_copies']}, of the others >= {report['distance_others_min']} (threshold "
              f"{report['threshold']})")
        print(json.dumps(report))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
