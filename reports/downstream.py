"""The downstream results as the X-VLM paper lays them out (retrieval: TR R@1 R@5 R@10 | IR R@1 R@5 R@10 | mean;
RefCOCO+: val testA testB), with the paper's X-VLM-base numbers for the same setting beside ours.

The paper's numbers (arXiv 2111.08276, fine-tuned X-VLM-base) are those of /work/shared/XVLM_REFERENCE.md ("Paper
results"); where it gives none (R@5, R@10, the means) the table prints a dash rather than a number from memory.
"""
from __future__ import annotations

from typing import Any

PAPER_SOURCE = "X-VLM paper (arXiv 2111.08276), X-VLM-base fine-tuned"
# set -> {row label: {metric: value}}
PAPER: dict[str, dict[str, dict[str, float]]] = {
    "coco": {"X-VLM 4M": {"txt_r1": 80.4, "img_r1": 63.1}, "X-VLM 16M": {"txt_r1": 81.2, "img_r1": 63.4}},
    "flickr30k": {"X-VLM 4M": {"txt_r1": 96.8, "img_r1": 86.1}, "X-VLM 16M": {"txt_r1": 97.1, "img_r1": 86.9}},
    "refcoco+": {"X-VLM 4M": {"val": 80.17, "testA": 86.36, "testB": 71.00},
                 "X-VLM 16M": {"val": 84.51, "testA": 89.00, "testB": 76.91}},
}
PAPER_SETTING = {"coco": "COCO 5k test", "flickr30k": "Flickr30K 1k test", "refcoco+": "RefCOCO+ (box)"}
RETRIEVAL_COLUMNS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


def paper_set(name: str) -> str | None:
    """Which paper setting a set's name is (coco_test -> coco, flickr30k_test -> flickr30k), or None."""
    lowered = name.lower()
    if lowered.startswith("coco"):
        return "coco"
    if lowered.startswith("flickr"):
        return "flickr30k"
    return None


def _cell(value: Any) -> str:
    return f"{value:6.2f}" if isinstance(value, (int, float)) else f"{'—':>6}"


def retrieval_table(name: str, result: dict[str, Any]) -> str:
    """One retrieval set's table: ours, then the paper's rows when the set is COCO or Flickr30K."""
    head = (f"{name}: {result['images']} images, {result['texts']} texts ({result['missing_images']} images missing"
            f" of {result['images_listed']}), ITM re-ranks the top {result['k_test']} by ITC")
    line = f"{'':<12}  {'TR R@1':>6} {'R@5':>6} {'R@10':>6} | {'IR R@1':>6} {'R@5':>6} {'R@10':>6} | {'mean':>6}"
    rows = [head, line]

    def row(label: str, values: dict[str, Any]) -> str:
        cells = [_cell(values.get(c)) for c in RETRIEVAL_COLUMNS]
        return f"{label:<12}  {' '.join(cells[:3])} | {' '.join(cells[3:6])} | {cells[6]}"

    rows.append(row("ours", result))
    if "itc_r_mean" in result and result["k_test"]:
        rows.append(row("ours (ITC)", {c: result.get(f"itc_{c}") for c in RETRIEVAL_COLUMNS}))
    setting = paper_set(name)
    if setting:
        rows += [row(label, values) for label, values in PAPER[setting].items()]
        rows.append(f"paper rows: {PAPER_SOURCE}, {PAPER_SETTING[setting]} (— = not in our reference notes)")
    return "\n".join(rows)


def grounding_table(result: dict[str, Any]) -> str:
    """RefCOCO+ accuracy (IoU >= threshold, percent) per split, ours and the paper's."""
    splits = ("val", "testA", "testB")
    head = (f"RefCOCO+ grounding: {result['refs']} refs of {result['refs_listed']} listed on {result['images']} images "
            f"({result['missing_images']} images missing; skipped: {result['skipped'] or 'none'}), "
            f"acc@IoU {result['iou_threshold']}")
    rows = [head, f"{'':<12}  " + " ".join(f"{s:>6}" for s in splits)]
    ours = {s: result["splits"][s]["acc"] for s in splits if s in result["splits"]}
    rows.append(f"{'ours':<12}  " + " ".join(_cell(ours.get(s)) for s in splits))
    counts = {s: result["splits"][s]["refs"] for s in splits if s in result["splits"]}
    rows.append(f"{'  refs':<12}  " + " ".join(f"{counts.get(s, 0):>6}" for s in splits))
    for label, values in PAPER["refcoco+"].items():
        rows.append(f"{label:<12}  " + " ".join(_cell(values.get(s)) for s in splits))
    rows.append(f"paper rows: {PAPER_SOURCE}, {PAPER_SETTING['refcoco+']}")
    return "\n".join(rows)


def downstream_tables(report: dict[str, Any]) -> str:
    """All tables of an `xvlm eval --task retrieval|grounding` report."""
    if report["task"] == "retrieval":
        return "\n\n".join(retrieval_table(name, res) for name, res in report["results"].items())
    return grounding_table(report["results"]["refcoco+"])
