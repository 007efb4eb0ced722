"""`xvlm submit` against a private local Ray head (2 CPUs, token auth, 127.0.0.1): a Ray Train job runs the trainer
on 2 gloo workers to completion with the project's checkpoints and metrics; a worker killed mid-run is restarted
by the failure config and the run resumes from its last committed checkpoint; --status / --logs / --list / --stop.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ray_head import start_ray_head

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head():
    head = start_ray_head(num_cpus=2)
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """A small built dataset and a tokenizer folder (absolute paths: every Ray worker must see them)."""
    from shardkit import make_dataset
    from sampledata.sample_data import write_tokenizer

    root = tmp_path_factory.mktemp("raydata")
    dataset = make_dataset(str(root / "shards"), samples=32, per_shard=8, sources=("coco", "vg"))
    write_tokenizer(root / "tokenizer")
    return dataset, str(root / "tokenizer")


def xvlm_submit(head, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **head.env}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "tools.cli", "submit", "--address", head.dashboard_url, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train_args(out: Path, data, steps: int, every: int) -> list[str]:
    dataset, tokenizer = data
    return ["--config", "train/configs/tiny_cpu.yaml", f"out={out}", f"data.datasets=[{dataset}]",
            f"data.tokenizer={tokenizer}", f"schedule.steps={steps}", "schedule.warmup_steps=1",
            f"checkpoint.every={every}", "checkpoint.keep=2", "logging.tensorboard=false",
            "--num-workers", "2", "--env", "GLOO_SOCKET_IFNAME=lo", "--env", "MASTER_ADDR=127.0.0.1"]


def job_id(stdout: str) -> str:
    match = re.search(r"submitted job (\S+)", stdout)
    assert match, stdout
    return match.group(1)


def metric_steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def committed(out: Path) -> list[str]:
    return sorted(p.parent.name for p in (out / "checkpoints").glob("ckpt-*/COMMITTED"))


def wait_status(head, job: str, wanted: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        result = xvlm_submit(head, "--status", job, timeout=60)
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)["status"]
        if status in wanted:
            return status
        time.sleep(2)
    raise AssertionError(f"job {job} still {status} after {timeout}s")


def test_submit_runs_to_completion_with_checkpoints_and_metrics(ray_head, train_data, tmp_path):
    out = tmp_path / "run"
    result = xvlm_submit(ray_head, *train_args(out, train_data, steps=4, every=2))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    job = job_id(result.stdout)
    assert "xvlm ray_train result" in result.stdout             # the job's own logs streamed back
    assert f"job {job}: SUCCEEDED" in result.stdout
    assert committed(out) == ["ckpt-00000002", "ckpt-00000004"]
    marker = json.loads((out / "checkpoints" / "ckpt-00000004" / "COMMITTED").read_text())
    assert marker["world_size"] == 2                              # both Ray workers trained in one process group
    assert metric_steps(out) == [1, 2, 3, 4]
    assert (out / "config.yaml").is_file()

    status = xvlm_submit(ray_head, "--status", job)
    assert json.loads(status.stdout)["status"] == "SUCCEEDED"
    listed = xvlm_submit(ray_head, "--list")
    assert job in listed.stdout and "SUCCEEDED" in listed.stdout
    logs = xvlm_submit(ray_head, "--logs", job)
    assert "xvlm ray_train result" in logs.stdout


@pytest.mark.slow
def test_killed_worker_restarts_and_resumes_from_the_last_checkpoint(ray_head, train_data, tmp_path):
    out = tmp_path / "run"
    result = xvlm_submit(ray_head, *train_args(out, train_data, steps=40, every=3), "--max-failures", "2",
                         "--no-wait")
    assert result.returncode == 0, result.stderr
    job = job_id(result.stdout)
    deadline = time.monotonic() + 300
    while not committed(out):
        assert time.monotonic() < deadline, "no checkpoint was committed"
        time.sleep(0.5)
    workers = [pid for pid in ray_worker_pids(ray_head) if b"RayTrainWorker" in cmdline(pid)]
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0], signal.SIGKILL)
    assert wait_status(ray_head, job, {"SUCCEEDED", "FAILED", "STOPPED"}, timeout=500) == "SUCCEEDED", \
        xvlm_submit(ray_head, "--logs", job).stdout[-4000:]
    assert metric_steps(out) == list(range(1, 41))      # metrics.jsonl is cut back to the checkpoint on resume
    logs = xvlm_submit(ray_head, "--logs", job).stdout
    resumed = [int(step) for step in re.findall(r"resumed from \S+ckpt-\d+ at step (\d+)", logs)]
    assert resumed and all(step % 3 == 0 for step in resumed), logs[-4000:]
    assert committed(out)[-1] == "ckpt-00000040"


def test_stop_and_errors(ray_head, train_data, tmp_path):
    out = tmp_path / "run"
    result = xvlm_submit(ray_head, *train_args(out, train_data, steps=100000, every=1000), "--no-wait")
    job = job_id(result.stdout)
    stopped = xvlm_submit(ray_head, "--stop", job)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout
    assert wait_status(ray_head, job, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=120) == "STOPPED"

    unknown = xvlm_submit(ray_head, "--status", "no-such-job")
    assert unknown.returncode == 2 and "no-such-job" in unknown.stderr
    relative = xvlm_submit(ray_head, "--config", "train/configs/tiny_cpu.yaml", "out=runs/relative",
                           "data.synthetic=true")
    assert relative.returncode == 2 and "relative path" in relative.stderr
    no_token = subprocess.run([sys.executable, "-m", "tools.cli", "submit", "--address", ray_head.dashboard_url,
                               "--list"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")})
    assert no_token.returncode != 0 and "auth" in (no_token.stdout + no_token.stderr).lower()


def cmdline(pid: int) -> bytes:
    """The command line of a process, or b"" when it ended after it was listed (Ray's short-lived helpers do)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def ray_worker_pids(head) -> list[int]:
    from ray_head import _pids_naming

    return _pids_naming(str(head.temp_dir))
