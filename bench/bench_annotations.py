"""Benchmark: the streaming annotation stage (stage_sources + group_images) against json.load + group-by-image,
on synthetic Visual Genome files of the real size (108,077 images, ~5.4M regions, ~3.8M objects).

    python bench/bench_annotations.py --scale 0.1          # a quick run (10,808 images)
    python bench/bench_annotations.py                      # the real size (~1.3 GB of JSON; the json.load way
                                                           # needs many GB of RAM)

Each way runs in its own subprocess; peak RSS is that child's ru_maxrss (resource.getrusage(RUSAGE_CHILDREN)),
wall time is measured around it, CPU time is the child's user + system time (the fair figure on a shared machine). Prints a table with the ratios and, last, one JSON line. Targets: streaming peak
RSS <= 2 GB and <= 0.3x the json.load way's.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REAL_IMAGES = 108_077
REGIONS_PER_IMAGE = (20, 80)    # mean 50   -> ~5.4M regions at the real size
OBJECTS_PER_IMAGE = (10, 60)    # mean 35   -> ~3.8M objects
NOUNS = ("man", "woman", "shirt", "tree", "sky", "building", "window", "car", "table", "plate", "dog", "grass",
         "street", "sign", "cloud", "hair", "hand", "wall", "water", "light", "pole", "fence", "leaf", "chair")
ADJECTIVES = ("white", "black", "blue", "green", "red", "large", "small", "wooden", "tall", "metal", "brown", "dark")
RELATIONS = ("on", "next to", "behind", "in front of", "under", "near", "holding", "wearing", "above")


def synthesize(out: str, scale: float, seed: int = 0) -> dict:
    """Write image_data.json, region_descriptions.json and attributes.json in VG 1.2's format, streaming."""
    rng = random.Random(seed)
    images = max(1, round(REAL_IMAGES * scale))
    os.makedirs(out, exist_ok=True)
    counts = {"images": images, "regions": 0, "objects": 0}
    region_id, object_id = 1, 1
    with open(os.path.join(out, "image_data.json"), "w") as fi, \
            open(os.path.join(out, "region_descriptions.json"), "w") as fr, \
            open(os.path.join(out, "attributes.json"), "w") as fa:
        for f in (fi, fr, fa):
            f.write("[")
        for image_id in range(1, images + 1):
            sep = ", " if image_id > 1 else ""
            w, h = rng.randint(300, 1024), rng.randint(300, 1024)
            coco = str(rng.randint(1, 581929)) if image_id % 2 else "null"
            fi.write(f'{sep}{{"width": {w}, "url": "https://cs.stanford.edu/people/rak248/VG_100K/{image_id}.jpg", '
                     f'"height": {h}, "image_id": {image_id}, "coco_id": {coco}, "flickr_id": null}}')
            parts = []
            for _ in range(rng.randint(*REGIONS_PER_IMAGE)):
                x, y = rng.randint(0, w - 20), rng.randint(0, h - 20)
                phrase = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(RELATIONS)} the {rng.choice(NOUNS)}"
                parts.append(f'{{"region_id": {region_id}, "width": {rng.randint(1, w - x)}, "height": '
                             f'{rng.randint(1, h - y)}, "image_id": {image_id}, "phrase": "{phrase}", "y": {y}, "x": {x}}}')
                region_id += 1
            counts["regions"] += len(parts)
            fr.write(f'{sep}{{"regions": [{", ".join(parts)}], "id": {image_id}}}')
            parts = []
            for _ in range(rng.randint(*OBJECTS_PER_IMAGE)):
                x, y = rng.randint(0, w - 20), rng.randint(0, h - 20)
                name = rng.choice(NOUNS)
                attrs = ", ".join(f'"{a}"' for a in rng.sample(ADJECTIVES, rng.randint(0, 2)))
                parts.append(f'{{"synsets": ["{name}.n.01"], "h": {rng.randint(1, h - y)}, "object_id": {object_id}, '
                             f'"names": ["{name}"], "w": {rng.randint(1, w - x)}, "y": {y}, "x": {x}, '
                             f'"attributes": [{attrs}]}}')
                object_id += 1
            counts["objects"] += len(parts)
            fa.write(f'{sep}{{"image_id": {image_id}, "attributes": [{", ".join(parts)}]}}')
        for f in (fi, fr, fa):
            f.write("]")
    counts["bytes"] = sum(os.path.getsize(os.path.join(out, n))
                          for n in ("image_data.json", "region_descriptions.json", "attributes.json"))
    return counts


# ---------------------------------------------------------------------------------------------- the two ways


def run_stream(data: str, work: str, partitions: int, max_rows: int) -> dict:
    from pipeline.group import GroupConfig, group_images, iter_groups
    from pipeline.stage import StageConfig, stage_sources

    stage_sources({"vg": data}, work, StageConfig(progress=False))
    parts = group_images(work, partitions, GroupConfig(progress=False, max_rows_per_bucket=max_rows))
    groups = regions = objects = 0
    for part in parts:  # read every group back, as the shard tasks will
        for group in iter_groups(part):
            groups += 1
            for region in group.regions:
                if region["kind"] == "region":
                    regions += 1
                else:
                    objects += 1
    return {"groups": groups, "regions": regions, "objects": objects}


def run_json_load(data: str) -> dict:
    """What X-VLM-style preparation scripts do: json.load every file, then a dict per image."""
    with open(os.path.join(data, "image_data.json")) as f:
        images = json.load(f)
    with open(os.path.join(data, "region_descriptions.json")) as f:
        region_file = json.load(f)
    with open(os.path.join(data, "attributes.json")) as f:
        attribute_file = json.load(f)
    by_image = {im["image_id"]: {"image": im, "regions": [], "objects": []} for im in images}
    for item in region_file:
        for region in item["regions"]:
            by_image[region["image_id"]]["regions"].append(region)
    for item in attribute_file:
        for obj in item["attributes"]:
            by_image[item["image_id"]]["objects"].append(obj)
    groups = [g for g in by_image.values() if g["regions"] or g["objects"]]
    return {"groups": len(groups), "regions": sum(len(g["regions"]) for g in groups),
            "objects": sum(len(g["objects"]) for g in groups)}


def measure(way: str, data: str, work: str, partitions: int, max_rows: int) -> dict:
    """Run one way in a child process; its wall time and peak RSS (RUSAGE_CHILDREN of a fresh parent)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "out = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "wall = time.perf_counter() - t\n"
            "if out.returncode:\n"
            "    sys.stderr.write(out.stderr); sys.exit(out.returncode)\n"
            "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps({'wall_s': wall, 'cpu_s': usage.ru_utime + usage.ru_stime,\n"
            "                  'peak_rss_mb': usage.ru_maxrss / 1024, 'result': json.loads(out.stdout)}))\n")
    worker = [sys.executable, os.path.abspath(__file__), "--worker", way, "--data", data, "--work", work,
              "--partitions", str(partitions), "--max-rows-per-bucket", str(max_rows)]
    proc = subprocess.run([sys.executable, "-c", code, *worker], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if proc.returncode:
        raise SystemExit(f"{way} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real VG size (default 1.0)")
    parser.add_argument("--out", help="folder for the synthetic files and work dirs (default: a temp folder, removed)")
    parser.add_argument("--only", choices=("both", "stream", "json"), default="both", help="which ways to run")
    parser.add_argument("--partitions", type=int, default=8, help="group partitions (default 8)")
    parser.add_argument("--max-rows-per-bucket", type=int, default=500_000, help="grouping bucket size (default 500000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="print only the final JSON line")
    parser.add_argument("--worker", choices=("stream", "json"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = run_stream(args.data, args.work, args.partitions, args.max_rows_per_bucket) \
            if args.worker == "stream" else run_json_load(args.data)
        print(json.dumps(result))
        return 0

    say = (lambda *a: None) if args.quiet else print  # noqa: E731 - a print switch
    out = args.out or tempfile.mkdtemp(prefix="bench_annotations_")
    data = os.path.join(out, "vg")
    try:
        t = time.perf_counter()
        counts = synthesize(data, args.scale, args.seed)
        say(f"synthesized {counts['images']:,} images, {counts['regions']:,} regions, {counts['objects']:,} objects "
            f"({counts['bytes'] / 1e6:,.0f} MB of JSON) in {time.perf_counter() - t:.1f} s")
        report: dict = {"scale": args.scale, "data": counts}
        for way in (("stream", "json") if args.only == "both" else (args.only,)):
            report[way] = measure(way, data, os.path.join(out, f"work-{way}"), args.partitions,
                                  args.max_rows_per_bucket)
            say(f"{way:>6}: {report[way]['wall_s']:8.1f} s wall  {report[way]['cpu_s']:8.1f} s CPU  "
                f"peak RSS {report[way]['peak_rss_mb']:8,.0f} MB  {report[way]['result']}")
        if "stream" in report and "json" in report:
            s, j = report["stream"], report["json"]
            if s["result"] != j["result"]:
                raise SystemExit(f"the two ways disagree: {s['result']} vs {j['result']}")
            report["rss_ratio"] = s["peak_rss_mb"] / j["peak_rss_mb"]
            report["time_ratio"] = s["wall_s"] / j["wall_s"]
            report["cpu_ratio"] = s["cpu_s"] / j["cpu_s"]
            say(f"stream / json.load: peak RSS {report['rss_ratio']:.2f}x (target <= 0.3x), "
                f"wall time {report['time_ratio']:.2f}x, CPU time {report['cpu_ratio']:.2f}x; "
                f"stream peak {s['peak_rss_mb']:,.0f} MB (target <= 2048 MB)")
        print(json.dumps(report))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
