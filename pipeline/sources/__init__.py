"""The source registry: every module in this package that defines NAME and iter_records is a source.

Adding a source is adding one file here. A source module defines:
- `NAME`: the name used in `--source NAME=PATH`;
- `iter_records(path) -> Iterator[ImageRef | Annotation | Reject]`: the release at `path` (local or s3://, read
  through storage/ only), parsed as streams, in a deterministic order;
- optionally `sample_key(source_id) -> str`: the tar-safe sample key of an image, starting with "NAME-" (default
  "NAME-SOURCE_ID");
- optionally `DESCRIPTION`: one line, listed by `xvlm build-shards --help` (its epilog and `--source` help come
  from this registry: adding a source touches nothing outside this package, its test and its docs);
- optionally `JOIN_BY_COCO_ID = "coco"`: an image of this source whose ImageRef.coco_id is an image of the staged
  `coco` source joins that sample (one sample with both sources' annotations; pipeline/group.py). VG and RefCOCO.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType

from storage.errors import XvlmError

SAFE_KEY = re.compile(r"[a-z0-9_-]+")
_registry: dict[str, ModuleType] | None = None


def _discover() -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "iter_records"):
            found[module.NAME] = module
    return found


def registry() -> dict[str, ModuleType]:
    """name -> source module, discovered once."""
    global _registry
    if _registry is None:
        _registry = _discover()
    return _registry


def get_source(name: str) -> ModuleType:
    sources = registry()
    if name not in sources:
        raise XvlmError(f"unknown source {name!r}; known sources: {', '.join(sorted(sources))} "
                        f"(use --source NAME=PATH)")
    return sources[name]


def sample_key(module: ModuleType, source_id: str) -> str:
    """The sample key of an image of `module`'s source (the module's own rule or "NAME-SOURCE_ID")."""
    rule = getattr(module, "sample_key", None)
    return rule(source_id) if rule is not None else f"{module.NAME}-{source_id}"


def safe_id(text: str) -> str:
    """A release id made tar-safe ([a-z0-9_-]); ids that had to change get a short hash so two never collide."""
    import hashlib

    lowered = text.lower()
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", lowered).strip("-") or "x"
    if cleaned != text:
        cleaned = f"{cleaned[:80]}-{hashlib.sha1(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return cleaned
