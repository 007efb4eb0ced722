"""The quickstart's run report: loss and held-out metric curves (PNG), metrics.json, report.md and a
self-contained report.html, from the results of its training stages and evaluations."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import storage

# What "visibly learns" means on the 200 held-out scenes (chance: R@1 = 1/200; a constant box scores ~0.01).
TARGETS = {"i2t_r1": 0.5, "grounding_acc": 0.45}


def plot_curves(results: list[dict], path: Path) -> None:
    """Loss per objective (smoothed) and the held-out metrics along training, one line style per box head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = ["-", "--", ":"]
    for n, result in enumerate(results):
        curve = result["curve"]
        style = styles[n % len(styles)]
        names = sorted({k for e in curve for k in e.get("losses", {})})
        for name in names:
            points = [(e["step"], e["losses"][name]) for e in curve if name in e.get("losses", {})]
            if not points:
                continue
            steps, values = map(np.asarray, zip(*points))
            window = max(1, len(values) // 30)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axes[0].plot(steps[window - 1:], smooth, style, label=f"{name} ({result['box_head']})", lw=1.2)
        # A summed step holds a varying number of batches: plot the loss per batch.
        total = [(e["step"], e["loss"] / max(1, sum(e.get("kinds", {}).values()))) for e in curve]
        if total:
            steps, values = map(np.asarray, zip(*total))
            axes[1].plot(steps, values, style, label=f"loss per batch ({result['box_head']})", lw=1.0, alpha=0.8)
        evals = [(e["step"], e["eval"]) for e in curve if e.get("eval")]
        for key, colour in (("i2t_r1", "tab:blue"), ("t2i_r1", "tab:green"), ("grounding_acc", "tab:red")):
            pts = [(s, v[key]) for s, v in evals if key in v]
            if pts:
                xs, ys = zip(*pts)
                axes[2].plot(xs, ys, style, color=colour, marker="o", ms=3, label=f"{key} ({result['box_head']})")
    for key, value in TARGETS.items():
        axes[2].axhline(value, color="grey", lw=0.6, ls=":")
    axes[0].set_title("losses per objective (smoothed)")
    axes[1].set_title("summed loss per batch")
    images = results[0]["metrics"].get("images", 0)
    axes[2].set_title(f"held-out metrics ({images} scenes)")
    axes[2].set_ylim(0, 1)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(metrics: dict, smoke: bool) -> dict[str, Any]:
    out = {}
    for key, target in TARGETS.items():
        value = metrics.get(key)
        out[key] = {"value": value, "target": target, "met": value is not None and value >= target}
    out["all_met"] = all(v["met"] for v in out.values() if isinstance(v, dict))
    out["checked"] = not smoke
    return out


def render_markdown(document: dict) -> str:
    lines = ["# xvlm quickstart report", ""]
    main = document["results"][0]
    m = main["metrics"]
    warmup = ""
    if main.get("box_warmup_steps"):
        warmup = (f"a box warm-up of {main['box_warmup_steps']} steps (region batches only, mostly COCO pictures) "
                  f"in {main['box_warmup_wall_s'] / 60:.1f} min, then ")
    lines += [f"Held-out: {m['images']} COCO val2017 sample scenes, {m['captions']} captions, {m['regions']} box "
              f"texts. Training: {warmup}{main['steps']} steps in {main['train_wall_s'] / 60:.1f} min on CPU "
              f"({document['threads']} threads).", ""]
    lines += ["| box head | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | ITC-only i2t R@1 | "
              "grounding acc@0.5 | mean IoU | constant box |", "|" + "---|" * 11]
    for r in document["results"]:
        x = r["metrics"]
        lines.append(f"| {r['box_head']} | {x.get('i2t_r1', 0):.3f} | {x.get('i2t_r5', 0):.3f} | "
                     f"{x.get('i2t_r10', 0):.3f} | {x.get('t2i_r1', 0):.3f} | {x.get('t2i_r5', 0):.3f} | "
                     f"{x.get('t2i_r10', 0):.3f} | {x.get('itc_i2t_r1', 0):.3f} | {x.get('grounding_acc', 0):.3f} | "
                     f"{x.get('grounding_miou', 0):.3f} | {x.get('grounding_acc_constant_box', 0):.3f} |")
    v = document["verdict"]
    lines += ["", "Targets (" + ("checked" if v["checked"] else "not checked in --smoke mode") + "):"]
    for key, item in v.items():
        if isinstance(item, dict):
            value = "n/a" if item["value"] is None else f"{item['value']:.3f}"
            lines.append(f"- {key} = {value} (target >= {item['target']}): {'met' if item['met'] else 'NOT met'}")
    lines += ["", f"Chance: R@1 = 1/{m['images']} = {1 / max(1, m['images']):.3f}.", ""]
    lines += finetune_lines(main.get("finetune") or {})
    lines += ["![curves](curves.png)", ""]
    if document.get("stats"):
        lines += [f"Dataset statistics: [{Path(document['stats']).name}]({Path(document['stats']).name})", ""]
    return "\n".join(lines)


def finetune_lines(finetune: dict) -> list[str]:
    """The fine-tuning stage's table: each downstream test set's scores zero-shot and after fine-tuning."""
    if not finetune:
        return []
    lines = ["Fine-tuning (`xvlm finetune`) on the sample downstream sets (scenes no training picture shows), "
             "scores on their test split, in percent:", "",
             "| task | test set | metric | zero-shot | fine-tuned | steps | minutes |", "|" + "---|" * 7]
    for task, r in finetune.items():
        for key, after in r["fine_tuned"].items():
            before = r["zero_shot"].get(key)
            lines.append(f"| {task} | {r['test_file']} | {key} | {'n/a' if before is None else f'{before:.1f}'} | "
                         f"{after:.1f} | {r['steps']} | {r['wall_s'] / 60:.1f} |")
    return lines + [""]


def render_html(markdown_text: str, png: Path) -> str:
    """A self-contained HTML page: the report's table and lists, the curves embedded as a data URI."""
    body = []
    rows: list[list[str]] = []
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                rows.append(cells)
            continue
        if rows:
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" +
                        "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest) +
                        "</table>")
            rows = []
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.startswith("![") and png.is_file():
            data = base64.b64encode(png.read_bytes()).decode()
            body.append(f'<img alt="curves" style="max-width:100%" src="data:image/png;base64,{data}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}")
    return f"<!doctype html><meta charset=utf-8><title>xvlm quickstart</title><style>{style}</style>" + "".join(body)


def write_report(report: Path, results: list[dict], smoke: bool, stats: str | None, threads: int) -> dict:
    """curves.png, metrics.json, report.md and report.html in the folder `report`; returns the JSON document."""
    report.mkdir(parents=True, exist_ok=True)
    plot_curves(results, report / "curves.png")
    document = {"results": [{k: v for k, v in r.items() if k != "curve"} for r in results],
                "verdict": verdict(results[0]["metrics"], smoke), "smoke": smoke, "stats": stats,
                "threads": threads, "targets": TARGETS}
    storage.write_text(str(report / "metrics.json"), json.dumps(document, indent=2) + "\n")
    markdown_text = render_markdown(document)
    storage.write_text(str(report / "report.md"), markdown_text)
    storage.write_text(str(report / "report.html"), render_html(markdown_text, report / "curves.png"))
    return document
