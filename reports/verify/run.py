"""`xvlm verify RUN`: check a training run's checkpoints as `xvlm verify` checks a dataset's shards — every file a
committed checkpoint's marker lists present, of the recorded size and sha256, the marker naming its own step — and
say which checkpoint `--resume auto` would continue from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

import storage
from train import checkpoint as ckpt


@dataclass
class RunCheck:
    run: str
    committed: int = 0
    partial: list[str] = field(default_factory=list)       # folders without a marker: resume ignores them
    unverified: list[str] = field(default_factory=list)    # markers of format 1, without hashes: loaded unchecked
    problems: list[tuple[str, str]] = field(default_factory=list)   # (checkpoint folder name, problem)
    resume_from: str | None = None                          # what `--resume auto` takes: the newest that passes

    @property
    def ok(self) -> bool:
        return not self.problems


def is_run(path: str) -> bool:
    """A run folder (it has checkpoint folders) or one checkpoint folder, rather than a dataset."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return bool(ckpt.list_checkpoints(path)) or bool(ckpt.CKPT_NAME.match(name))


def verify_run(path: str, progress: bool = True) -> RunCheck:
    """Check every committed checkpoint of the run at `path` (or the one checkpoint folder `path`)."""
    path = path.rstrip("/")
    name = path.rsplit("/", 1)[-1]
    if ckpt.CKPT_NAME.match(name):
        found = [(int(ckpt.CKPT_NAME.match(name).group(1)), path,
                  storage.exists(storage.join(path, ckpt.MARKER)))]
    else:
        found = ckpt.list_checkpoints(path)
    result = RunCheck(run=path)
    total = sum(e.size for _step, folder, committed in found if committed for e in storage.list_files(folder))
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=not progress,
               mininterval=0.5, dynamic_ncols=True)
    for _step, folder, committed in reversed(found):     # newest first: the first that passes is resume's pick
        label = folder.rsplit("/", 1)[-1]
        if not committed:
            result.partial.append(label)
            continue
        result.committed += 1
        if not ckpt.verifiable(folder):
            result.unverified.append(label)
        problems = ckpt.check(folder, on_bytes=bar.update)
        result.problems.extend((label, p) for p in problems)
        if not problems and result.resume_from is None:
            result.resume_from = label
    bar.close()
    return result


def report_lines(result: RunCheck, max_listed: int = 200) -> list[str]:
    lines = []
    if result.partial:
        lines.append(f"note: {len(result.partial)} checkpoint folder(s) without a {ckpt.MARKER} marker (a save that "
                     f"did not finish, or one under way; resume ignores them): {', '.join(result.partial)}")
    if result.unverified:
        lines.append(f"note: {len(result.unverified)} checkpoint(s) written before checkpoints recorded their files' "
                     f"hashes: nothing to verify them against (resume loads them with a warning): "
                     f"{', '.join(result.unverified)}")
    pick = (f"`--resume auto` continues from {result.resume_from}" if result.resume_from
            else "no checkpoint passes: `--resume auto` would stop with an error")
    if result.problems:
        lines.append(f"PROBLEMS in {result.run}:")
        lines += [f"  {where}: [checkpoint] {p}" for where, p in result.problems[:max_listed]]
        if len(result.problems) > max_listed:
            lines.append(f"  ... and {len(result.problems) - max_listed} more (--max-listed to see them)")
        bad = len({where for where, _p in result.problems})
        lines.append(f"FAILED: {bad} of {result.committed} committed checkpoint(s) fail their checks; {pick}")
    elif result.committed == 0:
        lines.append(f"FAILED: {result.run} has no committed checkpoint")
    else:
        lines.append(f"OK: {result.run}: {result.committed} committed checkpoint(s), every file matches its "
                     f"marker; {pick}")
    return lines
