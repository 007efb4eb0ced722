"""The JSON summary of one dataset's statistics: everything the report plots, as numbers."""
from __future__ import annotations

from reports.stats.collect import DatasetStats


def summarize(stats: DatasetStats) -> dict:
    """The JSON summary of one dataset (everything the report plots, as numbers)."""
    m = stats.manifest
    slots = stats.slots
    per_source = {name: {"images": int(stats.images[i]), "captions": int(stats.captions[i]),
                         "regions": int(stats.regions[i]), "objects": int(stats.objects[i]),
                         "passthrough_images": int(stats.passthrough[i])} for name, i in sorted(slots.items())}
    totals = {k: sum(v[k] for v in per_source.values())
              for k in ("images", "captions", "regions", "objects", "passthrough_images")}
    reasons: dict[str, dict[str, int]] = {}
    for (source, kind, reason), n in sorted(stats.rejects.items()):
        reasons.setdefault(reason, {}).setdefault(source, 0)
        reasons[reason][source] += n
    shards = m.shards
    return {
        "dataset": stats.path,
        "format_version": m.format_version,
        "build_command": m.build.get("command"),
        "index_columns": stats.index_columns,
        "samples": {"by_source": per_source, "total": totals},
        "records": {name: counts.to_json() for name, counts in sorted(m.sources.items())},
        "per_image": {"captions": stats.captions_per_image.summary(slots),
                      "regions": stats.regions_per_image.summary(slots),
                      "objects": stats.objects_per_image.summary(slots)},
        "text": {"token_method": stats.token_method,
                 "caption_words": stats.caption_words.summary(slots),
                 "caption_tokens": stats.caption_tokens.summary(slots),
                 "region_words": stats.region_words.summary(slots) if "region_texts" in stats.index_columns else None,
                 "region_tokens": stats.region_tokens.summary(slots) if "region_texts" in stats.index_columns else None},
        "boxes": {"area_fraction": stats.box_area.summary(slots),
                  "aspect_ratio": stats.box_aspect.summary(slots) if "boxes" in stats.index_columns else None,
                  "centres": stats.box_centres.summary() if "boxes" in stats.index_columns else None},
        "images": {"sizes": stats.image_sizes.summary(), "long_side": stats.long_side.summary(slots),
                   "aspect_ratio": stats.image_aspect.summary(slots), "jpeg_kb": stats.jpeg_kb.summary(slots)},
        "labels": stats.labels.summary() if "object_labels" in stats.index_columns else None,
        "attributes": stats.attributes.summary() if "attributes" in stats.index_columns else None,
        "rejects": {"total": int(sum(stats.rejects.values())),
                    "by_reason_source": reasons,
                    "by_source_kind_reason": [[s, k, r, n] for (s, k, r), n in sorted(stats.rejects.items())],
                    "examples": {f"{s}/{r}": rows for (s, r), rows in sorted(stats.reject_examples.items())},
                    "eval_leak_images": [[split, s, n] for (split, s), n in sorted(stats.eval_leaks.items())]},
        "shards": {"count": len(shards), "bytes": [s.bytes for s in shards][:10_000],
                   "samples": [s.samples for s in shards][:10_000],
                   "total_bytes": sum(s.bytes for s in shards)},
        "notes": list(stats.notes),
    }
