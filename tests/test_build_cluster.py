"""`xvlm build-shards` as a user runs it: a CLI subprocess against a `ray start --head` cluster (127.0.0.1, free
ports, token auth, a private temp dir), and crash safety: SIGKILL at several moments, re-run, byte-identical
output to an uninterrupted run (every dataset file compared). Only the head this module starts is stopped."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_using(folder: str) -> list[int]:
    """Pids whose command line or open files mention `folder` (the head's processes and its workers)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if folder.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folder):
                    pids.append(int(pid))
                    break
        except OSError:
            continue
    return pids


def _kill_all(folder: str) -> None:
    for pid in _processes_using(folder):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with token auth; yields (address, env for clients). Retried: on a busy machine
    Ray's fixed 30 s node-start deadline can pass."""
    temp_dir = tempfile.mkdtemp(prefix="xh", dir="/tmp")   # short: Unix socket paths are limited to ~107 bytes
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    env.pop("RAY_ADDRESS", None)
    address = None
    try:
        for _attempt in range(3):
            port = _free_port()
            result = subprocess.run(
                [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                 f"--dashboard-port={_free_port()}", "--num-cpus=2", f"--temp-dir={temp_dir}",
                 "--include-dashboard=false", "--disable-usage-stats"],
                env=env, capture_output=True, text=True, timeout=240, start_new_session=True)
            if result.returncode == 0:
                address = f"127.0.0.1:{port}"
                break
            _kill_all(temp_dir)
        if address is None:
            pytest.fail(f"ray start --head failed 3 times: {result.stderr[-2000:]}")
        yield address, env
    finally:
        _kill_all(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    from sampledata.sample_data import generate

    return generate(tmp_path_factory.mktemp("sample"), images=40, val_images=10, seed=5, progress=False)


def _command(sample: dict, out: Path, address: str) -> list[str]:
    command = [sys.executable, "-m", "tools.cli", "build-shards", "--out", str(out), "--samples-per-shard", "3",
               "--max-image-side", "128", "--workers", "1", "--no-progress", "--ray-address", address]
    for source in ("coco", "vg", "sbu", "cc"):
        command += ["--source", f"{source}={sample['paths'][source]}"]
    return command


def _dataset_files(out: Path) -> dict[str, bytes]:
    """Every file of the dataset (the _work resume state is not part of it)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _run_until(command: list[str], env: dict, ready, timeout: float = 300) -> tuple[bool, str]:
    """Run the CLI; SIGKILL its process group as soon as `ready()` holds. Returns (killed, stdout)."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return True, ""
            time.sleep(0.02)
        if proc.poll() is None:
            raise AssertionError("the build did not finish in time")
        output = proc.stdout.read().decode()
        assert proc.returncode == 0, output[-3000:]
        return False, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def test_cli_on_a_ray_head_cluster_and_kill_9_resume_is_byte_identical(sample, ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    command = _command(sample, out, address)
    killed_first, output = _run_until(command, env, lambda: False)
    # The per-source summary says that the counts add up.
    assert "inputs = written + rejected" in output and "MISMATCH" not in output
    for source in ("coco", "vg", "sbu", "cc"):
        assert any(line.startswith(source) and " ok " in line for line in output.splitlines()), source
    clean = _dataset_files(out)
    shard_names = [n for n in clean if n.endswith(".tar")]
    assert len(shard_names) >= 5 and "manifest.json" in clean
    shutil.rmtree(out)

    work = out / "_work"
    done = lambda: len(list(work.glob("shard-*.json"))) if work.exists() else 0  # noqa: E731
    kill_points = [
        ("while staging", lambda: (work / "stage").exists()),
        ("after the first shard tar", lambda: (out / shard_names[0]).exists()),
        ("all shards done but one", lambda: done() >= len(shard_names) - 1),
    ]
    killed = []
    for name, ready in kill_points:
        was_killed, _ = _run_until(command, env, ready)
        if was_killed:
            killed.append(name)
    assert len(killed) >= 2, f"the build finished before most kill points: killed only {killed}"
    _run_until(command, env, lambda: False)
    resumed = _dataset_files(out)
    assert sorted(resumed) == sorted(clean)
    for name in clean:
        assert resumed[name] == clean[name], f"{name} differs after kill -9 and resume (killed {killed})"
