"""Crash safety: `xvlm build-shards` killed with SIGKILL at several moments, then re-run, gives byte-identical
output to an uninterrupted run (every file of the dataset compared)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    from tools.sample_data import generate

    return generate(tmp_path_factory.mktemp("sample"), images=40, val_images=10, seed=5, progress=False)


@pytest.fixture
def ray_tmp():
    """A short private Ray temp dir (Unix socket paths are limited to ~107 bytes); Ray processes a killed run
    leaves behind are found by it and killed by pid, never with a broad `ray stop`."""
    path = tempfile.mkdtemp(prefix="xr", dir="/tmp")
    yield path
    _kill_ray_processes(path)
    shutil.rmtree(path, ignore_errors=True)


def _kill_ray_processes(ray_tmp: str) -> None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if ray_tmp.encode() in cmdline:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _command(sample: dict, out: Path) -> list[str]:
    command = [sys.executable, "-m", "tools.cli", "build-shards", "--out", str(out), "--samples-per-shard", "3",
               "--max-image-side", "128", "--workers", "1", "--no-progress"]
    for source in ("coco", "vg", "sbu", "cc"):
        command += ["--source", f"{source}={sample['paths'][source]}"]
    return command


def _env(ray_tmp: str) -> dict:
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    env.pop("AWS_ENDPOINT_URL", None)
    return env


def _dataset_files(out: Path) -> dict[str, bytes]:
    """Every file of the dataset (the _work resume state is not part of it)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _run_until(command: list[str], env: dict, ray_tmp: str, ready, timeout: float = 240) -> bool:
    """Start the CLI, SIGKILL its whole process group as soon as `ready()` holds; True if it was killed."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                _kill_ray_processes(ray_tmp)
                return True
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the build did not finish in time")
        assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def test_kill_9_at_several_points_then_rerun_is_byte_identical(sample, tmp_path, ray_tmp):
    out = tmp_path / "out"
    env = _env(ray_tmp)
    command = _command(sample, out)
    assert _run_until(command, env, ray_tmp, lambda: False) is False
    clean = _dataset_files(out)
    shard_names = [n for n in clean if n.endswith(".tar")]
    assert len(shard_names) >= 5 and "manifest.json" in clean
    shutil.rmtree(out)

    work = out / "_work"
    done = lambda: len(list(work.glob("shard-*.json"))) if work.exists() else 0  # noqa: E731
    kill_points = [
        ("while staging", lambda: (work / "stage").exists()),
        ("after the first shard", lambda: (out / shard_names[0]).exists()),
        ("half of the shards done", lambda: done() >= len(shard_names) // 2),
        ("all shards done but one", lambda: done() >= len(shard_names) - 1),
    ]
    killed = []
    for name, ready in kill_points:
        if _run_until(command, env, ray_tmp, ready):
            killed.append(name)
            assert not (out / "manifest.json").exists() or done() == len(shard_names)
    assert len(killed) >= 2, f"the build finished before most kill points: killed {killed}"
    _run_until(command, env, ray_tmp, lambda: False)
    resumed = _dataset_files(out)
    assert sorted(resumed) == sorted(clean)
    for name in clean:
        assert resumed[name] == clean[name], f"{name} differs after kill -9 and resume ({killed})"
