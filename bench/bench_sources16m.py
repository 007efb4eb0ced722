"""Benchmark: the annotation stage (stage_sources + group_images + reading every group back) of the Open Images and
Objects365 sources on generated files of the real size and layout, against pandas.read_csv / json.load.

    python bench/bench_sources16m.py --scale 0.01                  # a quick run
    python bench/bench_sources16m.py --out /tmp/bench16m           # the real size: Open Images 15M box rows
                                                                   # (~2.3 GB CSV), Objects365 25M boxes (~4 GB JSON)

Each way runs in its own subprocess: peak RSS is that child's ru_maxrss, CPU time its user + system time (the fair
figure on a shared machine), wall time is measured around it. A watchdog kills a baseline whose RSS passes
--baseline-max-gb (default 8): the machine is shared. json.load of the full Objects365 file needs far more than
that, so it is measured on the first --json-fraction of the annotations (default 0.1) and its RSS and time scaled
up linearly (the table says so). Prints a table and, last, one JSON line. Targets: peak RSS <= 2 GB for the
streaming way. The generated files are removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

OI_IMAGES, OI_BOXES = 1_743_042, 14_610_229          # Open Images V6/V7 train boxes (oidv6-train-annotations-bbox)
O365_IMAGES, O365_BOXES = 1_742_292, 25_400_000       # Objects365 v2 train (zhiyuan_objv2_train.json)
OI_CLASSES, O365_CLASSES = 600, 365
OI_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,"
             "IsInside,XClick1X,XClick2X,XClick3X,XClick4X,XClick1Y,XClick2Y,XClick3Y,XClick4Y")
CHUNK_IMAGES = 20_000


# ---------------------------------------------------------------------------------------------- generated files


def _boxes_per_image(rng: np.random.Generator, images: int, mean: float) -> np.ndarray:
    """At least one box an image, `mean` on average (the release's boxes / images)."""
    return rng.poisson(mean - 1, size=images) + 1


def synthesize_openimages(out: str, scale: float, seed: int = 0) -> dict:
    """oidv6-train-annotations-bbox.csv (sorted by ImageID, 21 columns as the release), the V7 class descriptions."""
    rng = np.random.default_rng(seed)
    images = max(1, round(OI_IMAGES * scale))
    counts = _boxes_per_image(rng, images, OI_BOXES / OI_IMAGES)
    ids = np.sort(rng.choice(2 ** 62, size=images, replace=False))
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    labels = [f"/m/0{k:05x}" for k in range(OI_CLASSES)]
    with open(os.path.join(out, "oidv7-class-descriptions-boxable.csv"), "w") as f:
        f.write("LabelName,DisplayName\n" + "".join(f"{label},Class {k}\n" for k, label in enumerate(labels)))
    rows = 0
    with open(os.path.join(out, "oidv6-train-annotations-bbox.csv"), "w") as f:
        f.write(OI_HEADER + "\n")
        for start in range(0, images, CHUNK_IMAGES):
            lines = []
            for image_id, n in zip(ids[start:start + CHUNK_IMAGES], counts[start:start + CHUNK_IMAGES]):
                hex_id = f"{int(image_id):016x}"
                x0, y0 = rng.random(n) * 0.79, rng.random(n) * 0.79
                x1, y1 = x0 + rng.random(n) * 0.2 + 0.001, y0 + rng.random(n) * 0.2 + 0.001
                label = rng.integers(OI_CLASSES, size=n)
                group = rng.random(n) < 0.05
                for k in range(n):
                    a, b, c, d = x0[k], x1[k], y0[k], y1[k]
                    lines.append(f"{hex_id},xclick,{labels[label[k]]},1,{a:.6f},{b:.6f},{c:.6f},{d:.6f},0,0,"
                                 f"{int(group[k])},0,0,{a:.6f},{b:.6f},{a:.6f},{b:.6f},{c:.6f},{c:.6f},{d:.6f},{d:.6f}\n")
            rows += len(lines)
            f.write("".join(lines))
    size = os.path.getsize(os.path.join(out, "oidv6-train-annotations-bbox.csv"))
    return {"images": images, "boxes": rows, "bytes": size}


def synthesize_objects365(out: str, scale: float, seed: int = 0, fraction: float = 1.0) -> dict:
    """annotations/zhiyuan_objv2_train.json as v2 writes it (images, annotations, categories, licenses); with
    `fraction` < 1 only the first images and their boxes (the json.load baseline's subset)."""
    rng = np.random.default_rng(seed)
    images = max(1, round(O365_IMAGES * scale))
    counts = _boxes_per_image(rng, images, O365_BOXES / O365_IMAGES)
    images = max(1, round(images * fraction))
    counts = counts[:images]
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    path = os.path.join(out, "annotations", "zhiyuan_objv2_train.json")
    with open(path, "w") as f:
        f.write('{"images": [')
        for start in range(0, images, CHUNK_IMAGES):
            f.write(("" if start == 0 else ", ") + ", ".join(
                f'{{"height": 683, "id": {i}, "license": 5, "width": 1024, "file_name": '
                f'"images/v{1 + (i > 600000)}/patch{i // 34000}/objects365_v{1 + (i > 600000)}_{i:08d}.jpg", "url": ""}}'
                for i in range(start, min(images, start + CHUNK_IMAGES))))
        f.write('], "annotations": [')
        ann_id = 0
        for start in range(0, images, CHUNK_IMAGES):
            parts = []
            for image_id in range(start, min(images, start + CHUNK_IMAGES)):
                n = int(counts[image_id])
                xy = rng.random((n, 4)) * [900, 600, 120, 80] + [0, 0, 1, 1]
                cats = rng.integers(1, O365_CLASSES + 1, size=n)
                for k in range(n):
                    x, y, w, h = xy[k]
                    parts.append(f'{{"id": {ann_id}, "iscrowd": {int(k == 0 and image_id % 20 == 0)}, "isfake": 0, '
                                 f'"area": {w * h:.4f}, "isreflected": 0, "bbox": [{x:.2f}, {y:.2f}, {w:.2f}, {h:.2f}], '
                                 f'"image_id": {image_id}, "category_id": {int(cats[k])}}}')
                    ann_id += 1
            f.write(("" if start == 0 else ", ") + ", ".join(parts))
        categories = ", ".join(f'{{"name": "Category {k}", "id": {k}}}' for k in range(1, O365_CLASSES + 1))
        f.write(f'], "categories": [{categories}], "licenses": []}}')
    return {"images": images, "boxes": ann_id, "bytes": os.path.getsize(path)}


# ---------------------------------------------------------------------------------------------- the ways


def run_stream(source: str, data: str, work: str) -> dict:
    """The builder's annotation stage: stage, group into partitions of ~1M rows, read every group back."""
    from pipeline.build import GROUP_TARGET_ROWS
    from pipeline.group import GroupConfig, group_images, iter_groups
    from pipeline.stage import StageConfig, stage_sources

    stage = stage_sources({source: data}, work, StageConfig(progress=False))
    rows = sum(sum(kinds.values()) for kinds in stage.inputs.values())
    parts = group_images(work, max(1, -(-rows // GROUP_TARGET_ROWS)), GroupConfig(progress=False))
    groups = boxes = 0
    for part in parts:
        for group in iter_groups(part):
            groups += 1
            boxes += len(group.regions)
    return {"groups": groups, "boxes": boxes, "inputs": stage.inputs[source]}


def run_pandas(data: str) -> dict:
    """What a simple Open Images converter does: read_csv the box file, join the class names, group by image."""
    import pandas as pd

    boxes = pd.read_csv(os.path.join(data, "oidv6-train-annotations-bbox.csv"))
    names = pd.read_csv(os.path.join(data, "oidv7-class-descriptions-boxable.csv"))
    boxes = boxes.merge(names, on="LabelName", how="left")
    sizes = boxes.groupby("ImageID").size()
    return {"groups": int(len(sizes)), "boxes": int(sizes.sum())}


def run_json(data: str) -> dict:
    """What a simple COCO-style converter does: json.load, then a list of boxes per image."""
    with open(os.path.join(data, "annotations", "zhiyuan_objv2_train.json")) as f:
        release = json.load(f)
    names = {c["id"]: c["name"] for c in release["categories"]}
    by_image: dict[int, list] = {im["id"]: [] for im in release["images"]}
    for ann in release["annotations"]:
        by_image[ann["image_id"]].append((ann["bbox"], names[ann["category_id"]]))
    groups = [g for g in by_image.values() if g]
    return {"groups": len(groups), "boxes": sum(len(g) for g in groups)}


def _watch(proc: subprocess.Popen, limit_mb: float, peak: list[float]) -> None:
    """Kill the child when its RSS passes limit_mb (the shared machine must not swap or OOM)."""
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            rss = 0.0
        peak[0] = max(peak[0], rss)
        if rss > limit_mb:
            proc.kill()
            return
        time.sleep(0.2)


def measure(way: str, source: str, data: str, work: str, limit_mb: float) -> dict:
    """Run one way in a child: wall time around it, its own CPU time and peak RSS (getrusage(RUSAGE_SELF) in the
    child), or {"killed": ...} when it passed limit_mb."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", way, "--source", source,
                             "--data", data, "--work", work], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")})
    peak = [0.0]
    watchdog = threading.Thread(target=_watch, args=(proc, limit_mb, peak), daemon=True)
    watchdog.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        if peak[0] > limit_mb:
            return {"killed": f"RSS passed {limit_mb:,.0f} MB after {wall:.0f} s"}
        raise SystemExit(f"{way} on {source} failed:\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    return {"wall_s": wall, **report}


def _worker(way: str, source: str, data: str, work: str) -> None:
    import resource

    result = run_stream(source, data, work) if way == "stream" else run_pandas(data) if way == "pandas" \
        else run_json(data)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
                      "result": result}))


# ---------------------------------------------------------------------------------------------- the run


def _line(name: str, way: str, m: dict, rows: int, note: str = "") -> str:
    if "killed" in m:
        return f"{name:<11} {way:<7} killed: {m['killed']}"
    return (f"{name:<11} {way:<7} {m['wall_s']:9.1f} s wall {m['cpu_s']:9.1f} s CPU  peak RSS {m['peak_rss_mb']:8,.0f} MB"
            f"  {rows / m['cpu_s']:10,.0f} rows/CPU-s {rows / m['wall_s']:10,.0f} rows/s{note}")


def bench_openimages(out: str, args: argparse.Namespace, say) -> dict:
    data = os.path.join(out, "openimages")
    t = time.perf_counter()
    made = synthesize_openimages(data, args.scale, args.seed)
    say(f"openimages: {made['images']:,} images, {made['boxes']:,} box rows, {made['bytes'] / 1e9:.2f} GB CSV "
        f"(generated in {time.perf_counter() - t:.0f} s)")
    report = {"data": made}
    rows = made["boxes"]
    for way in ("stream", "pandas"):
        report[way] = measure(way, "openimages", data, os.path.join(out, f"work-oi-{way}"), args.baseline_max_gb * 1024)
        say(_line("openimages", way, report[way], rows))
    _ratios(report, "pandas", rows, 1.0, say)
    shutil.rmtree(os.path.join(out, "work-oi-stream"), ignore_errors=True)
    return report


def bench_objects365(out: str, args: argparse.Namespace, say) -> dict:
    data, subset = os.path.join(out, "objects365"), os.path.join(out, "objects365-subset")
    t = time.perf_counter()
    made = synthesize_objects365(data, args.scale, args.seed)
    part = synthesize_objects365(subset, args.scale, args.seed, fraction=args.json_fraction)
    say(f"objects365: {made['images']:,} images, {made['boxes']:,} boxes, {made['bytes'] / 1e9:.2f} GB JSON; "
        f"json.load subset {part['boxes']:,} boxes, {part['bytes'] / 1e9:.2f} GB (generated in "
        f"{time.perf_counter() - t:.0f} s)")
    report = {"data": made, "json_subset": part}
    report["stream"] = measure("stream", "objects365", data, os.path.join(out, "work-o365"), args.baseline_max_gb * 1024)
    say(_line("objects365", "stream", report["stream"], made["boxes"]))
    report["json"] = measure("json", "objects365", subset, "", args.baseline_max_gb * 1024)
    factor = made["boxes"] / part["boxes"]
    say(_line("objects365", "json", report["json"], part["boxes"], f"  (on {part['boxes']:,} boxes; x{factor:.1f} "
                                                                     f"for the full file)"))
    _ratios(report, "json", made["boxes"], factor, say, part["boxes"])
    shutil.rmtree(os.path.join(out, "work-o365"), ignore_errors=True)
    return report


def _ratios(report: dict, base: str, rows: int, factor: float, say, base_rows: int | None = None) -> None:
    s, b = report["stream"], report[base]
    if "killed" in s or "killed" in b:
        return
    base_rows = base_rows or rows
    report["rows_per_s"] = {"stream": rows / s["wall_s"], base: base_rows / b["wall_s"]}
    report["rows_per_cpu_s"] = {"stream": rows / s["cpu_s"], base: base_rows / b["cpu_s"]}
    report["speed_ratio_cpu"] = report["rows_per_cpu_s"]["stream"] / report["rows_per_cpu_s"][base]
    report["speed_ratio_wall"] = report["rows_per_s"]["stream"] / report["rows_per_s"][base]
    report["rss_ratio"] = s["peak_rss_mb"] / (b["peak_rss_mb"] * factor)
    scaled = " (baseline RSS scaled to the full file)" if factor != 1.0 else ""
    say(f"  stream / {base}: speed {report['speed_ratio_cpu']:.2f}x per CPU-second, {report['speed_ratio_wall']:.2f}x "
        f"wall; peak RSS {report['rss_ratio']:.2f}x{scaled}; stream peak {s['peak_rss_mb']:,.0f} MB (target <= 2048)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the real sizes (default 1.0)")
    parser.add_argument("--out", help="folder for the generated files (default: a temp folder); removed unless --keep")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--only", choices=("both", "openimages", "objects365"), default="both")
    parser.add_argument("--json-fraction", type=float, default=0.1,
                        help="share of the Objects365 images json.load reads (default 0.1: the full file needs "
                             "far more memory than --baseline-max-gb)")
    parser.add_argument("--baseline-max-gb", type=float, default=8.0, help="kill a way past this RSS (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("stream", "pandas", "json"), help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.source, args.data, args.work)
        return 0
    out = args.out or tempfile.mkdtemp(prefix="bench_sources16m_")
    os.makedirs(out, exist_ok=True)
    report: dict = {"scale": args.scale}

    def say(*parts: object) -> None:
        print(*parts, flush=True)

    try:
        if args.only in ("both", "openimages"):
            report["openimages"] = bench_openimages(out, args, say)
        if args.only in ("both", "objects365"):
            report["objects365"] = bench_objects365(out, args, say)
        print(json.dumps(report))
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
