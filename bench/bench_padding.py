"""What the compiled step's padding costs: over the real loader's batches, the fraction of padded text rows and padded
images when every batch is padded to its kind's fixed shape (train/compiled.py), for pooled (X-VLM) and packed
(ours) region batches. The padded images cost vision-tower compute, the padded rows text, fusion and head compute.

    python bench/bench_padding.py --dataset data/shards --tokenizer data/sample/tokenizer --batches 200
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from shards.loader import MultiGrainedLoader  # noqa: E402
from shards.loader_config import preset  # noqa: E402
from storage.errors import XvlmError  # noqa: E402


def measure(datasets: list[str], tokenizer: str, loader_preset: str, batching: str, batches: int,
            sizes: dict[str, int]) -> dict[str, Any]:
    """Real and padded rows and images per batch kind over `batches` loader batches (epochs repeat as needed)."""
    config = preset(loader_preset, tokenizer=tokenizer, region_batching=batching, num_workers=0, **sizes)
    fixed = {"image_text": (config.image_text_batch_size, config.image_text_batch_size),
             "region": (config.region_batch_size, config.region_max_images)}
    loader = MultiGrainedLoader(datasets, config)
    totals = {kind: {"batches": 0, "rows": 0, "images": 0, "padded_rows": 0, "padded_images": 0} for kind in fixed}
    seen = 0
    with tqdm(total=batches, desc=f"{loader_preset} {batching}", unit="batch") as bar:
        while seen < batches:
            before = seen
            for batch in loader:
                kind = batch["kind"]
                rows, images = int(batch["text_ids"].shape[0]), int(batch["image"].shape[0])
                t = totals[kind]
                t["batches"] += 1
                t["rows"] += rows
                t["images"] += images
                t["padded_rows"] += fixed[kind][0] - rows
                t["padded_images"] += fixed[kind][1] - images
                seen += 1
                bar.update()
                if seen >= batches:
                    break
            if seen == before:
                raise XvlmError("the loader yielded no batch: the dataset is too small for the batch sizes")
    for t in totals.values():
        t["padded_rows_frac"] = t["padded_rows"] / max(1, t["rows"] + t["padded_rows"])
        t["padded_images_frac"] = t["padded_images"] / max(1, t["images"] + t["padded_images"])
    return {"preset": loader_preset, "region_batching": batching, "fixed": fixed, "kinds": totals}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", action="append", required=True, help="a built dataset (folder or s3://); repeatable")
    p.add_argument("--tokenizer", required=True, help="BERT vocab folder")
    p.add_argument("--preset", default="base", choices=("tiny", "base"), help="loader preset (default base)")
    p.add_argument("--batches", type=int, default=200, help="loader batches to read per batching (default 200)")
    p.add_argument("--image-text-batch", type=int, default=0, help="override the preset's image-text batch size")
    p.add_argument("--region-batch", type=int, default=0, help="override the preset's region batch rows")
    p.add_argument("--region-max-images", type=int, default=0, help="override the preset's images per region batch")
    p.add_argument("--json", default="", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    sizes = {k: v for k, v in (("image_text_batch_size", args.image_text_batch),
                               ("region_batch_size", args.region_batch),
                               ("region_max_images", args.region_max_images)) if v}
    try:
        results = [measure(args.dataset, args.tokenizer, args.preset, batching, args.batches, sizes)
                   for batching in ("pooled", "packed")]
    except XvlmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'region batching':16s} {'kind':11s} {'batches':>7s} {'fixed rows x images':>20s} "
          f"{'padded rows':>11s} {'padded images':>13s}")
    for r in results:
        for kind, t in r["kinds"].items():
            rows, images = r["fixed"][kind]
            print(f"{r['region_batching']:16s} {kind:11s} {t['batches']:7d} {f'{rows} x {images}':>20s} "
                  f"{t['padded_rows_frac']:11.1%} {t['padded_images_frac']:13.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
