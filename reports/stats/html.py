"""The statistics report as one self-contained HTML page: inline CSS, plots as data: URIs, no script, one column
per dataset (two with --compare)."""
from __future__ import annotations

import datetime as dt
import html
import os

from reports.stats.plots import plot_bars, plot_grid, plot_hist, plot_rejects, plot_values

REPORT_VERSION = 1


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222;
     max-width:1800px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
h3{font-size:14px;margin:10px 0 4px}
.sub{color:#666;font-size:12px;word-break:break-all}
.cols{display:flex;gap:24px;align-items:flex-start;flex-wrap:wrap} .col{flex:1;min-width:420px}
.plots{display:flex;flex-wrap:wrap;gap:8px} .plots img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:12px;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 7px}
th{background:#f3f3f3;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff8e1;border-left:3px solid #f0b400;padding:4px 8px;font-size:12px;margin:4px 0}
.bad{color:#b00020;font-weight:600} .ok{color:#1b7f3b;font-weight:600}
code{font-size:11px;background:#f6f6f6;padding:1px 3px}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(n: object) -> str:
    return f"{n:,}" if isinstance(n, int) else _e(n)


def _table(header: list[str], rows: list[list[object]], cls: str = "") -> str:
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="n">{_num(v)}</td>' if isinstance(v, (int, float)) and
                                    not isinstance(v, bool) else f"<td>{_e(v)}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _mean(h: dict | None) -> str:
    return "-" if not h or h["all"]["mean"] is None else f"{h['all']['mean']:.2f}"


def _section_counts(s: dict) -> str:
    rows = []
    for name, c in s["samples"]["by_source"].items():
        n = c["images"] or 1
        rows.append([name, c["images"], c["captions"], c["regions"], c["objects"], round(c["captions"] / n, 2),
                     round((c["regions"] + c["objects"]) / n, 2)])
    t = s["samples"]["total"]
    n = t["images"] or 1
    rows.append(["total", t["images"], t["captions"], t["regions"], t["objects"], round(t["captions"] / n, 2),
                 round((t["regions"] + t["objects"]) / n, 2)])
    samples = _table(["sample source", "images", "captions", "regions", "objects", "captions/image",
                      "boxes/image"], rows, "counts")
    acc_rows = []
    for name, src in s["records"].items():
        inputs, written, rejected = src.get("inputs", {}), src.get("written", {}), src.get("rejected", {})
        for kind in sorted(inputs):
            rej = sum((rejected.get(kind) or {}).values())
            ok = inputs[kind] == written.get(kind, 0) + rej
            acc_rows.append([name, kind, inputs[kind], written.get(kind, 0), rej, "ok" if ok else "MISMATCH"])
        if src.get("clipped_boxes"):
            acc_rows.append([name, "boxes clipped to the image", src["clipped_boxes"], "", "", ""])
    records = _table(["input source", "record kind", "inputs", "written", "rejected", "inputs = written + rejected"],
                     acc_rows, "records")
    return (f"<h3>Samples in the shards (from index.parquet)</h3>{samples}"
            f"<h3>Input records (from manifest.json)</h3>{records}")


def _section_rejects(s: dict) -> str:
    r = s["rejects"]
    if not r["total"]:
        return "<p>No input record was rejected.</p>"
    parts = [_img(plot_rejects(s), "rejects by reason and source")]
    rows = [[src, kind, reason, n] for src, kind, reason, n in r["by_source_kind_reason"]]
    parts.append(_table(["source", "record kind", "reason", "rejected"], rows, "rejects"))
    ex_rows = [[key.split("/", 1)[0], row["kind"], row["reason"], row["file"], row["where"], row["detail"][:160]]
               for key, rows_ in r["examples"].items() for row in rows_]
    parts.append("<h3>Examples</h3>" + _table(["source", "kind", "reason", "file", "where", "detail"], ex_rows,
                                              "examples"))
    if r.get("eval_leak_images"):
        parts.append("<h3>Evaluation images removed (--exclude-eval)</h3>" + _table(
            ["evaluation split", "source", "images dropped"], r["eval_leak_images"], "eval-leaks"))
    return "".join(parts)


def _section_labels(s: dict) -> str:
    out = []
    for key, title in (("labels", "object labels"), ("attributes", "attributes")):
        part = s[key]
        if part is None:
            out.append(f'<div class="note">Most frequent {title}: not available — index.parquet has no '
                       f'`{"object_labels" if key == "labels" else "attributes"}` column.</div>')
            continue
        if not part["top"]:
            out.append(f"<p>No {title} in this dataset.</p>")
            continue
        names, values = [n for n, _ in part["top"]], [v for _, v in part["top"]]
        exact = "exact" if part["exact"] else f"approximate (each count may be low by up to {part['error_bound']})"
        out.append(_img(plot_bars(names, values, f"top {len(names)} {title} of {part['total']:,}", "count"), title))
        out.append(f'<div class="sub">{part["distinct_kept"]:,} distinct kept; counts {exact}</div>')
        out.append(_table([title[:-1] if title.endswith("s") else title, "count"], [[n, v] for n, v in part["top"]]))
    return "".join(out)


def render_column(s: dict) -> dict[str, str]:
    """The HTML of each section for one dataset."""
    per = s["per_image"]
    text = s["text"]
    boxes = s["boxes"]
    images = s["images"]
    sections = {
        "counts": _section_counts(s),
        "per_image": '<div class="plots">' + "".join([
            _img(plot_hist(per["captions"], f"captions per image (mean {_mean(per['captions'])})", "captions"), "captions per image"),
            _img(plot_hist(per["regions"], f"region boxes per image (mean {_mean(per['regions'])})", "regions"), "regions per image"),
            _img(plot_hist(per["objects"], f"object boxes per image (mean {_mean(per['objects'])})", "objects"), "objects per image"),
        ]) + "</div>",
    }
    text_plots = [_img(plot_hist(text["caption_words"], f"caption length in words (mean {_mean(text['caption_words'])})",
                                 "words"), "caption words"),
                  _img(plot_hist(text["caption_tokens"], f"caption length in tokens (mean {_mean(text['caption_tokens'])})",
                                 "tokens"), "caption tokens")]
    if text["region_words"] is not None:
        text_plots.append(_img(plot_hist(text["region_words"], "region / object text length in words", "words"), "region words"))
        text_plots.append(_img(plot_hist(text["region_tokens"], "region / object text length in tokens", "tokens"), "region tokens"))
    sections["text"] = (f'<div class="sub">tokens: {_e(text["token_method"])}</div><div class="plots">'
                        + "".join(text_plots) + "</div>")
    box_plots = [_img(plot_hist(boxes["area_fraction"], "box area / image area", "fraction (log scale)"), "box area")]
    if boxes["aspect_ratio"] is not None:
        box_plots.append(_img(plot_hist(boxes["aspect_ratio"], "box aspect ratio (w / h)", "w / h (log scale)"), "box aspect"))
        box_plots.append(_img(plot_grid(boxes["centres"], "box centres (fraction of width / height)", "x", "y",
                                        invert_y=True), "box centres"))
    sections["boxes"] = '<div class="plots">' + "".join(box_plots) + "</div>"
    t = s["samples"]["total"]
    sections["images"] = ('<div class="plots">' + "".join([
        _img(plot_grid(images["sizes"], "stored image sizes", "width (px)", "height (px)"), "image sizes"),
        _img(plot_hist(images["long_side"], "long side of the stored image", "pixels"), "long side"),
        _img(plot_hist(images["aspect_ratio"], "image aspect ratio (w / h)", "w / h (log scale)"), "image aspect"),
        _img(plot_hist(images["jpeg_kb"], "stored JPEG size", "KiB (log scale)"), "jpeg size"),
    ]) + f'</div><div class="sub">{t["passthrough_images"]:,} of {t["images"]:,} images stored as their source '
         f'bytes (pass-through), the rest re-encoded</div>')
    sections["labels"] = _section_labels(s)
    sections["rejects"] = _section_rejects(s)
    sh = s["shards"]
    shard_rows = [[sh["count"], sh["total_bytes"],
                   round(sh["total_bytes"] / sh["count"] / 1e6, 2) if sh["count"] else 0]]
    shard_html = _table(["shards", "bytes", "mean MB per shard"], shard_rows)
    if sh["bytes"]:
        shard_html += '<div class="plots">' + _img(plot_values([b / 1e6 for b in sh["bytes"]], "shard sizes", "MB"),
                                                   "shard sizes") + _img(
            plot_values(sh["samples"], "samples per shard", "samples"), "samples per shard") + "</div>"
    sections["shards"] = shard_html
    notes = "".join(f'<div class="note">{_e(n)}</div>' for n in s["notes"])
    sections["notes"] = notes or '<div class="sub">none</div>'
    return sections


SECTIONS = [("counts", "Counts per source"), ("per_image", "Captions and boxes per image"),
            ("text", "Text lengths"), ("boxes", "Boxes"), ("images", "Images"),
            ("labels", "Most frequent object labels and attributes"), ("rejects", "Rejected input records"),
            ("shards", "Shards"), ("notes", "Notes and limitations")]


def render_html(summaries: list[dict]) -> str:
    """One self-contained page: inline CSS, plots as data: URIs, no script, no external resource."""
    columns = [render_column(s) for s in summaries]
    title = "xvlm dataset report" if len(summaries) == 1 else "xvlm dataset comparison"
    head = "".join(f'<div class="col"><h1>{_e(os.path.basename(s["dataset"].rstrip("/")) or s["dataset"])}</h1>'
                   f'<div class="sub">{_e(s["dataset"])} · format {_e(s["format_version"])} · '
                   f'{s["samples"]["total"]["images"]:,} samples in {s["shards"]["count"]:,} shards</div>'
                   f'<div class="sub">built with: <code>{_e(" ".join(s["build_command"] or []))}</code></div></div>'
                   for s in summaries)
    body = [f'<div class="cols">{head}</div>']
    body.append('<div class="sub">Sections: ' + " · ".join(f'<a href="#{k}">{_e(t)}</a>' for k, t in SECTIONS)
                + "</div>")
    for key, heading in SECTIONS:
        cells = "".join(f'<div class="col">{c[key]}</div>' for c in columns)
        body.append(f'<h2 id="{key}">{_e(heading)}</h2><div class="cols">{cells}</div>')
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body.append(f'<p class="sub">generated by xvlm stats (report version {REPORT_VERSION}) on {generated}</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
