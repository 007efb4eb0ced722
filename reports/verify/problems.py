"""What `xvlm verify` finds and how it says so: one Problem per finding (where, kind, detail), the options and
the result of a check, and the printed report."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from storage.errors import XvlmError


@dataclass(frozen=True)
class Problem:
    where: str        # "manifest.json", "shard-000001.tar", "shard-000001.tar: coco-000000000139"
    kind: str         # short code: missing_shard, size, sha256, sample_count, tar, member_name, schema, image, ...
    detail: str

    def line(self) -> str:
        return f"{self.where}: [{self.kind}] {self.detail}"


@dataclass
class VerifyOptions:
    dataset: str
    images: bool = True           # decode every image
    workers: int = 4              # shards checked in parallel (threads: I/O and Pillow decoding release the GIL)
    progress: bool = True
    max_listed: int = 200         # problems printed in full; all are counted

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise XvlmError(f"--workers must be positive, got {self.workers}")


@dataclass
class VerifyResult:
    dataset: str
    shards: int = 0
    samples: int = 0              # samples read from the shards
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def report_lines(result: VerifyResult, max_listed: int = 200) -> list[str]:
    """The printed report: one line per problem (grouped by place, in order), then a one-line verdict."""
    lines = []
    if result.problems:
        lines.append(f"PROBLEMS in {result.dataset}:")
        for problem in result.problems[:max_listed]:
            lines.append("  " + problem.line())
        if len(result.problems) > max_listed:
            lines.append(f"  ... and {len(result.problems) - max_listed} more (--max-listed to see them)")
        kinds = Counter(p.kind for p in result.problems)
        places = len({p.where.split(": ", 1)[0] for p in result.problems})
        lines.append(f"FAILED: {len(result.problems)} problem(s) in {places} file(s): "
                     + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    else:
        lines.append(f"OK: {result.dataset}: {result.shards} shards, {result.samples} samples; every check passed")
    return lines
