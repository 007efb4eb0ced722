"""Training end to end on tiny shards: 1 and 2 gloo processes, checkpoints locally and on SeaweedFS, kill -9 during
training and during a checkpoint upload, then `--resume auto` repeats the uninterrupted run's losses bit for bit."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402
from test_loader_split import TOKENIZER  # noqa: E402

import storage  # noqa: E402
from seaweed import free_ports  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train.metrics import METRICS_FILE, local_metrics_dir, read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = 5                         # checkpoints at 2, 4 and 5 (every 2 and at the end), keep 2
COMPARED = ("step", "optimizer_steps", "loss", "losses", "lr", "kinds", "grad_norm", "grad_norm_region")
TIMEOUT = 600


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return shardkit.make_dataset(str(tmp_path_factory.mktemp("train-shards")), samples=32, per_shard=8,
                                 sources=("coco", "vg"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, dataset):
    path = tmp_path_factory.mktemp("train-config") / "tiny_test.yaml"
    path.write_text(f"""
model: {{preset: tiny}}
data:
  datasets: [{dataset}]
  preset: tiny
  tokenizer: {TOKENIZER}
  image_text_batch_size: 4
  region_batch_size: 4
  region_max_images: 2
  shuffle_buffer: 8
optim: {{lr: 1.0e-3}}
schedule: {{steps: {STEPS}, warmup_steps: 1, mode: summed, iter_perc: 0.7}}
checkpoint: {{every: 2, keep: 2}}
logging: {{progress: false, tensorboard: false}}
""")
    return str(path)


def launch(config: str, out: str, world: int, env: dict[str, str] | None = None, *extra: str) -> list[subprocess.Popen]:
    """`xvlm train` in `world` processes (torchrun's environment variables), each in its own session so that a
    whole 'node' can be killed at once."""
    port = free_ports(1)[0]
    procs = []
    for rank in range(world):
        proc_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        if world > 1:
            proc_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", RANK=str(rank),
                            LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        cmd = [sys.executable, "-m", "tools.cli", "--log-level", "WARNING", "train", "--config", config, "--out", out,
               *extra]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=proc_env, start_new_session=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        output, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, output[-4000:]


def kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.communicate(timeout=60)


def wait_for(condition, procs: list[subprocess.Popen], what: str) -> None:
    deadline = time.time() + TIMEOUT
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                output = proc.communicate()[0]
                raise AssertionError(f"run ended (rc {proc.returncode}) before {what}:\n{output[-4000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def metrics_path(out: str) -> str:
    return os.path.join(local_metrics_dir(out), METRICS_FILE)


def compared(entries: list[dict]) -> list[dict]:
    return [{k: e.get(k) for k in COMPARED} for e in entries]


def final_metrics(out: str) -> list[dict]:
    return read_metrics(storage.join(out, METRICS_FILE))


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    """Per (world size, step mode): the per-step metrics of an uninterrupted run, and its run folder."""
    done: dict[tuple[int, str], tuple[list[dict], str]] = {}

    def get(world: int, mode: str) -> tuple[list[dict], str]:
        if (world, mode) not in done:
            out = str(tmp_path_factory.mktemp(f"reference-{world}-{mode}"))
            finish(launch(config_file, out, world, None, f"schedule.mode={mode}"))
            done[world, mode] = (final_metrics(out), out)
        return done[world, mode]
    return get


def steps_logged(out: str) -> int:
    entries = read_metrics(metrics_path(out))
    return entries[-1]["step"] if entries else 0


def writing_checkpoint(out: str, step: int) -> bool:
    """Some file of checkpoint `step` exists but its marker does not: the save is under way."""
    folder = ckpt.checkpoint_path(out, step)
    names = {e.path.rsplit("/", 1)[-1] for e in storage.list_files(folder)}
    return bool(names) and ckpt.MARKER not in names


def kill_resume_chain(config: str, out: str, world: int, mode: str) -> list[dict]:
    """Kill -9 in the middle of training, resume; kill -9 while checkpoint 4 is being written, resume to the end."""
    mode_arg = f"schedule.mode={mode}"
    procs = launch(config, out, world, None, mode_arg)
    wait_for(lambda: steps_logged(out) >= 3, procs, "step 3")
    kill(procs)
    assert [s for s, _ in ckpt.committed_checkpoints(out)] == [2]

    procs = launch(config, out, world, {ckpt.SLOW_ENV: "1.5"}, mode_arg)
    wait_for(lambda: writing_checkpoint(out, 4), procs, "checkpoint 4 to start")
    kill(procs)
    assert [s for s, _ in ckpt.committed_checkpoints(out)] == [2], "a partial checkpoint must not count"

    summary = os.path.join(local_metrics_dir(out), "summary.json")
    procs = launch(config, out, world, None, mode_arg, "--resume", "auto", "--summary-json", summary)
    finish(procs)
    assert json.loads(Path(summary).read_text())["start_step"] == 2
    return final_metrics(out)


@pytest.mark.slow
def test_kill_and_resume_one_process_local(config_file, reference, tmp_path):
    expected, ref_out = reference(1, "summed")
    assert [e["step"] for e in expected] == list(range(1, STEPS + 1))
    assert {k for e in expected for k in e["losses"]} == {
        "region/itc", "region/itm", "region/mlm", "region/bbox", "region/giou",
        "image_text/itc", "image_text/itm", "image_text/mlm"}
    assert any(e["kinds"]["region"] and e["kinds"]["image_text"] for e in expected)  # summed: both in one step
    assert all(e["samples_per_s"] > 0 and 0 <= e["data_wait_frac"] <= 1 for e in expected)
    # keep 2: checkpoints 4 and 5 are left, both committed, and hold every rank's part
    assert [s for s, _ in ckpt.committed_checkpoints(ref_out)] == [4, 5]
    assert sorted(p.name for p in (Path(ref_out) / "checkpoints").iterdir()) == ["ckpt-00000004", "ckpt-00000005"]
    assert (Path(ref_out) / "config.yaml").is_file()

    out = str(tmp_path / "run")
    got = kill_resume_chain(config_file, out, world=1, mode="summed")
    assert compared(got) == compared(expected)


@pytest.mark.slow
def test_kill_and_resume_compiled(config_file, tmp_path):
    """compile on (dynamo with its eager backend: the same graphs and guards, no code generation): a run killed with
    kill -9 after step 3 and resumed repeats the uninterrupted compiled run's losses exactly."""
    compiled = ("schedule.mode=summed", "compile=true", "compile_backend=eager")
    ref_out, out = str(tmp_path / "reference"), str(tmp_path / "run")
    finish(launch(config_file, ref_out, 1, None, *compiled))
    expected = final_metrics(ref_out)
    assert [e["step"] for e in expected] == list(range(1, STEPS + 1))
    assert any(e["kinds"]["region"] for e in expected) and any(e["kinds"]["image_text"] for e in expected)
    procs = launch(config_file, out, 1, None, *compiled)
    wait_for(lambda: steps_logged(out) >= 3, procs, "step 3")
    kill(procs)
    assert [s for s, _ in ckpt.committed_checkpoints(out)] == [2]
    finish(launch(config_file, out, 1, None, *compiled, "--resume", "auto"))
    assert compared(final_metrics(out)) == compared(expected)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.s3
def test_kill_and_resume_two_processes_on_s3(config_file, reference, s3_prefix):
    expected, ref_out = reference(2, "alternating")
    assert [s for s, _ in ckpt.committed_checkpoints(ref_out)] == [4, 5]
    assert {p.name for p in (Path(ref_out) / "checkpoints" / "ckpt-00000005").iterdir()} >= {
        "rank-00000.pt", "rank-00001.pt", "model.safetensors", "trainer.pt", "COMMITTED"}
    got = kill_resume_chain(config_file, s3_prefix, world=2, mode="alternating")
    # X-VLM's iterations: one image-text step, a region step before it with probability iter_perc (0.7)
    assert all(e["kinds"]["image_text"] == 1 for e in got) and any(e["kinds"]["region"] for e in got)
    assert [e["optimizer_steps"] for e in got] == list(itertools.accumulate(1 + e["kinds"]["region"] for e in got))
    assert compared(got) == compared(expected)
    assert [s for s, _ in ckpt.committed_checkpoints(s3_prefix)] == [4, 5]
