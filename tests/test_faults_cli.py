"""Fault injection at the command line and into storage: every config-file problem and every S3 credential, bucket
or endpoint failure is one line and exit 2 (no traceback, no secret printed); an ~8 s outage of the S3 server (a
separate SeaweedFS, stopped and restarted) does not end a training run; a failed metrics upload never ends a run;
a build to s3:// killed with -9 leaves no staging folder once the next build ran; `xvlm submit` passes no secret
unless asked to, and then warns."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import shardkit  # noqa: E402

import storage  # noqa: E402
from tools.cli import main as xvlm  # noqa: E402
from seaweed import start_seaweed  # noqa: E402
from train import checkpoint as ckpt  # noqa: E402
from train.metrics import METRICS_FILE, MetricsLogger, read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "train" / "configs" / "tiny_cpu.yaml")
SMOKE = ["data.synthetic=true", "schedule.warmup_steps=1", "logging.progress=false", "logging.tensorboard=false",
         "data.image_text_batch_size=4", "data.region_batch_size=4", "data.region_max_images=2"]


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------- config files


def _alias_bomb(path: Path) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path.write_text("\n".join(lines) + "\n")


CONFIG_FAULTS = {  # what is wrong -> (make the config file, extra overrides, a fragment of the error)
    "a binary file": (lambda p: p.write_bytes(bytes(range(256)) * 20), [], "is not UTF-8 text"),
    "a folder": (lambda p: p.mkdir(), [], "is a folder"),
    "a YAML alias bomb": (_alias_bomb, [], "aliases are not allowed"),
    "100k nested lists": (lambda p: p.write_text("a: " + "[" * 100_000 + "]" * 100_000), [], "nests too deeply"),
    "over a megabyte": (lambda p: p.write_text("# " + "x" * (1 << 20) + "\n"), [], "is over 1048576 bytes"),
    "not YAML": (lambda p: p.write_text("model: [unclosed\n"), [], "is not valid YAML"),
    "a list, not a mapping": (lambda p: p.write_text("- 1\n- 2\n"), [], "must hold a mapping"),
    "optim.lr=.inf": (None, ["optim.lr=.inf"], "optim.lr=inf must be a finite number"),
    "a NaN deep inside": (None, ["data.source_weights={coco: .nan}"], "data.source_weights.coco=nan must be finite"),
    "an alias in an override": (None, ["schedule.steps=&a 5"], None),
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_config_file_problems_are_one_line(tmp_path, capsys, fault):
    make, overrides, fragment = CONFIG_FAULTS[fault]
    config = TINY
    if make is not None:
        config = str(tmp_path / "bad.yaml")
        make(Path(config))
    code = xvlm(["train", "--config", config, "--out", str(tmp_path / "run"), *SMOKE, "schedule.steps=1",
                 *overrides])
    if fragment is None:          # an anchor without an alias is harmless YAML: the run just works
        assert code == 0
        return
    assert fragment.replace(" must be finite", "") in one_line_error(capsys, code)


# ---------------------------------------------------------------------------------------------- S3 errors


@pytest.fixture(scope="module")
def s3_dataset(s3, tmp_path_factory):
    local = shardkit.make_dataset(str(tmp_path_factory.mktemp("s3ds") / "ds"), samples=4, per_shard=4)
    return shardkit.upload(local, s3.url("faults/ds"))


def _commands(dataset: str, out: str, tmp: Path, sources: dict) -> dict[str, list[str]]:
    return {
        "verify": ["verify", dataset, "--no-progress"],
        "stats": ["stats", dataset, "--out", str(tmp / "r.html"), "--no-progress"],
        "show": ["show", dataset, "--random", "1", "--out", str(tmp / "show")],
        "train": ["train", "--config", TINY, "--out", out, *SMOKE, "schedule.steps=1"],
        "build-shards": ["build-shards", "--source", f"sbu={sources['sbu']}", "--out", out + "-shards",
                         "--no-progress"],
    }


@pytest.fixture(scope="module")
def sbu_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("sbu")
    (root / "SBU_captioned_photo_dataset_urls.txt").write_text("http://static.flickr.com/1/1_a.jpg\n")
    (root / "SBU_captioned_photo_dataset_captions.txt").write_text("a photo\n")
    return {"sbu": str(root)}


def _fresh_clients():
    storage.set_endpoint_url(None)     # drop cached clients: they hold the credentials they were made with


@pytest.mark.s3
@pytest.mark.parametrize("command", ["verify", "stats", "show", "train", "build-shards"])
def test_wrong_credentials_are_one_line_without_the_secret(s3, s3_dataset, sbu_release, tmp_path, capsys,
                                                           monkeypatch, command):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789")
    monkeypatch.setenv("XVLM_S3_MAX_ATTEMPTS", "2")
    _fresh_clients()
    try:
        args = _commands(s3_dataset, s3.url("faults/run-creds"), tmp_path, sbu_release)[command]
        err = one_line_error(capsys, xvlm(args))
    finally:
        monkeypatch.undo()
        _fresh_clients()
    assert "refused the credentials" in err and "AWS_SECRET_ACCESS_KEY" in err, err
    assert "not-the-secret" not in err and s3.secret_key not in err


@pytest.mark.s3
@pytest.mark.parametrize("command", ["verify", "stats", "show", "train", "build-shards"])
def test_a_missing_bucket_is_named_not_mistaken_for_a_missing_manifest(s3, sbu_release, tmp_path, capsys, command):
    args = _commands("s3://no-such-bucket-xvlm/ds", "s3://no-such-bucket-xvlm/run", tmp_path, sbu_release)[command]
    err = one_line_error(capsys, xvlm(args))
    assert "bucket 'no-such-bucket-xvlm' does not exist" in err and "manifest" not in err, err


@pytest.mark.s3
def test_an_endpoint_that_never_answers_is_one_line(s3, s3_dataset, tmp_path, capsys, monkeypatch):
    from seaweed import free_ports

    monkeypatch.setenv("XVLM_S3_MAX_ATTEMPTS", "2")
    _fresh_clients()
    try:
        err = one_line_error(capsys, xvlm(["verify", s3_dataset, "--no-progress", "--endpoint-url",
                                           f"http://127.0.0.1:{free_ports(1)[0]}"]))
    finally:
        monkeypatch.undo()
        _fresh_clients()
    assert "cannot reach the S3 endpoint http://127.0.0.1:" in err and "--endpoint-url" in err


@pytest.mark.s3
def test_a_failed_metrics_upload_warns_and_the_next_sync_sends_everything(s3, tmp_path, caplog, monkeypatch):
    logger = MetricsLogger(s3.url("faults/metrics"), 3, 0, local_dir=str(tmp_path), progress=False,
                           tensorboard=False)
    for step in (1, 2):
        logger.log({"step": step, "loss": 1.0 / step})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "revoked-0123456789")     # the upload is refused
    monkeypatch.setenv("XVLM_S3_MAX_ATTEMPTS", "2")
    _fresh_clients()
    try:
        with caplog.at_level(logging.WARNING, logger="train.metrics"):
            assert logger.sync() is False                   # never raises
    finally:
        monkeypatch.undo()
        _fresh_clients()
    assert any("uploaded again at the next checkpoint" in r.getMessage() for r in caplog.records)
    logger.log({"step": 3, "loss": 0.3})
    assert logger.sync() is True
    assert [e["step"] for e in read_metrics(logger.remote)] == [1, 2, 3]
    logger.close()


# ---------------------------------------------------------------------------------------------- S3 outage


@pytest.fixture
def own_seaweed(tmp_path):
    """A SeaweedFS server of this test alone (the session's is never stopped)."""
    server = start_seaweed(str(tmp_path / "seaweed"), bucket="outage")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.s3
@pytest.mark.slow
def test_an_s3_outage_of_8_seconds_does_not_end_training(own_seaweed, tmp_path):
    server = own_seaweed
    out = server.url("run")
    env = {**os.environ, **server.env(), "OMP_NUM_THREADS": "1", ckpt.SLOW_ENV: "0.2"}
    steps = 16
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "train", "--config", TINY, "--out", out, *SMOKE,
                             f"schedule.steps={steps}", "checkpoint.every=2", "checkpoint.keep=2",
                             f"logging.local_dir={tmp_path / 'metrics'}"],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        with server.in_environment():
            deadline = time.monotonic() + 300
            while not ckpt.committed_checkpoints(out):
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.1)
            server.restart(down_seconds=8.0)         # the store goes away mid-run, for 8 s plus its start time
            output, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, output[-4000:]
            assert "retry" in output                  # it was hit, and went on
            assert [s for s, _ in ckpt.committed_checkpoints(out)] == [steps - 2, steps]
            assert [e["step"] for e in read_metrics(storage.join(out, METRICS_FILE))] == list(range(1, steps + 1))
            assert ckpt.check(ckpt.checkpoint_path(out, steps)) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


# ---------------------------------------------------------------------------------------------- builds


@pytest.mark.s3
def test_a_build_to_s3_killed_with_9_leaves_no_staging_folder_after_the_next_run(s3, tmp_path, capsys):
    root = tmp_path / "sbu"
    root.mkdir()
    lines = 60_000      # staging takes a few seconds: time to catch it
    (root / "SBU_captioned_photo_dataset_urls.txt").write_text(
        "".join(f"http://static.flickr.com/1/{i}_a.jpg\n" for i in range(lines)))
    (root / "SBU_captioned_photo_dataset_captions.txt").write_text("".join(f"photo {i}\n" for i in range(lines)))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "build-shards", "--source", f"sbu={root}", "--out",
                             s3.url("faults/killed-build"), "--no-progress", "--workers", "1"],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp.glob("xvlm-build-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it staged"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)                  # by its pid: no `finally` runs
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = list(tmp.glob("xvlm-build-*"))
    assert len(left) == 1 and str(proc.pid) in left[0].name
    # The next build to S3 (here one that stops at once on a missing release) clears the dead one's folder.
    code = subprocess.run([sys.executable, "-m", "tools.cli", "build-shards", "--source", f"sbu={tmp_path / 'none'}",
                           "--out", s3.url("faults/next-build"), "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert code.returncode == 2 and "does not exist" in code.stderr, code.stderr
    assert list(tmp.glob("xvlm-build-*")) == []


# ---------------------------------------------------------------------------------------------- submit


def test_submit_passes_no_secret_unless_asked_and_then_warns(monkeypatch, caplog):
    from train.ray_jobs import job_environment

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.internal:8333")

    def env(**flags):
        args = argparse.Namespace(forward_env=[], env=[], forward_aws=False, forward_aws_credentials=False)
        vars(args).update(flags)
        return job_environment(args)

    with caplog.at_level(logging.WARNING, logger="train.ray_jobs"):
        plain = env(forward_aws=True)
        assert plain["AWS_ENDPOINT_URL"] == "http://s3.internal:8333"
        assert "AWS_SECRET_ACCESS_KEY" not in plain and "AWS_ACCESS_KEY_ID" not in plain
        assert not caplog.records
        with_secret = env(forward_aws_credentials=True)
    assert with_secret["AWS_SECRET_ACCESS_KEY"] == "very-secret-value"
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "AWS_SECRET_ACCESS_KEY" in warning and "dashboard" in warning and "very-secret-value" not in warning
