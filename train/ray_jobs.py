"""Ray jobs of training runs, through the Ray Jobs API: the job's command (the `xvlm ray-train` entry), its
environment (secrets only on request, and warned about), submitting it to a cluster (waiting for a head that is
still starting), following its logs, and the rows `xvlm submit --list / --status` prints."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import storage
from storage.errors import XvlmError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]   # the folder uploaded as the job's working_dir
# Never uploaded with the working dir: environments, build outputs, data and runs (Ray caps the upload at 500 MiB).
WORKING_DIR_EXCLUDES = [".venv", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", "build", "dist", "runs",
                        "data", "xvlm-quickstart", ".whl", "*.tar", "*.parquet", "*.safetensors", "*.pt"]
# The job carries the config's text in this variable when the file does not travel with the working dir.
CONFIG_ENV = "XVLM_SUBMIT_CONFIG_YAML"
# Variables the workers need for loopback-only CPU clusters and quiet, deterministic runs; set when not given.
DEFAULT_JOB_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
# Where S3 is (not secret) and who may use it (secret: a job's runtime environment is readable by anyone with
# access to the Ray dashboard or Jobs API, so these travel only on an explicit --forward-aws-credentials).
AWS_SETTINGS = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
AWS_VARIABLES = AWS_SETTINGS + AWS_CREDENTIALS
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|(^|_)TOKEN($|_)")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SUBMIT_RETRY_S = 120.0       # how long to wait for the job agent of a head that is still starting


def auth_headers(token_file: str | None = None) -> dict[str, str]:
    """The Authorization header for a token-auth cluster, or {} when no token is configured."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = token_file or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as err:
            raise XvlmError(f"cannot read the Ray auth token file {path}: {err.strerror}") from None
        if not token:
            raise XvlmError(f"the Ray auth token file {path} is empty")
    if not token:
        default = Path.home() / ".ray" / "auth_token"
        token = default.read_text().strip() if default.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str, token_file: str | None = None):
    """A JobSubmissionClient for the cluster at `address` (errors become XvlmError with what to check)."""
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise XvlmError(f"--address must be the dashboard URL, http://HEAD:8265; got {address!r}")
    try:
        return JobSubmissionClient(address, headers=auth_headers(token_file))
    except (ConnectionError, RuntimeError) as err:
        raise XvlmError(f"cannot reach the Ray cluster at {address}: {err}. Is the head running "
                        "(`ray start --head --dashboard-host ...`) and the address its dashboard URL?") from None


def job_environment(args: argparse.Namespace) -> dict[str, str]:
    """The job's environment variables. Secrets in it are warned about (never printed): a Ray job's runtime
    environment is readable through the dashboard and the Jobs API."""
    env = dict(DEFAULT_JOB_ENV)
    aws = list(AWS_SETTINGS) if args.forward_aws or args.forward_aws_credentials else []
    aws += list(AWS_CREDENTIALS) if args.forward_aws_credentials else []
    for name in list(args.forward_env) + aws:
        if name in os.environ:
            env[name] = os.environ[name]
        elif name not in AWS_VARIABLES:
            raise XvlmError(f"--forward-env {name}: the variable is not set in this shell")
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise XvlmError(f"--env expects NAME=VALUE, got {item!r}")
        env[name] = value
    secrets = sorted(name for name in env if SECRET_NAME.search(name.upper()))
    if secrets:
        log.warning("passing %s to the job: anyone who can open this cluster's Ray dashboard or call its Jobs API can "
                    "read them in the job's runtime environment. Prefer the cluster's own credentials (instance "
                    "role / IRSA / ~/.aws on the nodes) or short-lived session credentials", ", ".join(secrets))
    return env


def entrypoint_and_config_env(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """The job's shell command, and env vars that carry the config when its file does not travel."""
    if not args.config:
        raise XvlmError("submitting a job needs --config CONFIG.yaml (or use --status / --logs / --stop / --list)")
    extra_env: dict[str, str] = {}
    if storage.local_path(args.config) is None:
        config_arg = args.config
    else:
        path = Path(args.config).resolve()
        if not path.is_file():
            raise XvlmError(f"config file {args.config} does not exist")
        working_dir = Path(args.working_dir).resolve()
        if path.is_relative_to(working_dir) and not any(part in (".venv", ".git") for part in path.parts):
            config_arg = str(path.relative_to(working_dir))
        else:
            # A config outside the uploaded folder travels inline in the job's environment.
            config_arg = f"env:{CONFIG_ENV}"
            import yaml

            from train.config import read_config_values

            extra_env[CONFIG_ENV] = yaml.safe_dump(read_config_values(str(path)), sort_keys=False)   # `extends` resolved
    for item in args.overrides:
        if "=" not in item:
            raise XvlmError(f"override {item!r} is not key=value")
    # Validate here, before anything is uploaded: unknown keys, bad values, paths the workers could not share.
    from train.config import load_config
    from train.ray_train import check_shared_paths

    check_shared_paths(load_config(args.config, list(args.overrides)))
    if args.num_workers < 1:
        raise XvlmError(f"--num-workers must be >= 1, got {args.num_workers}")
    if args.gpus_per_worker < 0 or args.cpus_per_worker < 0:
        raise XvlmError("--gpus-per-worker and --cpus-per-worker must be >= 0")
    command = ["python", "-m", "tools.cli", "ray-train", "--config", config_arg,
               "--num-workers", str(args.num_workers), "--gpus-per-worker", str(args.gpus_per_worker),
               "--cpus-per-worker", str(args.cpus_per_worker), "--max-failures", str(args.max_failures)]
    if args.storage_path:
        command += ["--storage-path", args.storage_path]
    command += list(args.overrides)
    return shlex.join(command), extra_env


def submit(args: argparse.Namespace) -> tuple[str, str]:
    """Submit the job (`args`: the options of `xvlm submit`); returns (its submission id, its entrypoint)."""
    entrypoint, config_env = entrypoint_and_config_env(args)
    working_dir = Path(args.working_dir).resolve()
    if not (working_dir / "train" / "ray_train.py").is_file():
        raise XvlmError(f"--working-dir {working_dir} is not the xvlm-pipeline project (no train/ray_train.py)")
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": WORKING_DIR_EXCLUDES,
        "env_vars": {**job_environment(args), **config_env},
    }
    if args.pip:
        runtime_env["pip"] = list(args.pip)
    job_id = args.job_id or f"xvlm-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    jobs = client(args.address, args.auth_token_file)
    # A head that has just started answers "No available agent to submit job, please try again later" for a
    # while; that is worth waiting for, any other refusal is not.
    deadline = time.monotonic() + SUBMIT_RETRY_S
    while True:
        try:
            job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id,
                                     metadata={"tool": "xvlm submit", "config": str(args.config)})
            break
        except RuntimeError as err:
            if "try again later" not in str(err) or time.monotonic() > deadline:
                raise XvlmError(f"the cluster at {args.address} refused the job: {err}") from None
            log.info("the cluster's job agent is not ready yet; retrying")
            time.sleep(2.0)
    return job_id, entrypoint


async def _tail(jobs, job_id: str) -> None:
    async for lines in jobs.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def follow(jobs, job_id: str) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    try:
        asyncio.run(_tail(jobs, job_id))
    except KeyboardInterrupt:
        print(f"\ndetached; job {job_id} keeps running (xvlm submit --stop {job_id} stops it)", file=sys.stderr)
        raise
    # The log stream closes when the job ends; the status may lag a moment behind it.
    deadline = time.monotonic() + 60
    status = str(jobs.get_job_status(job_id))
    while status.rsplit(".", 1)[-1] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        status = str(jobs.get_job_status(job_id))
    return status.rsplit(".", 1)[-1]


def job_row(job) -> dict[str, Any]:
    return {"job": job.submission_id or job.job_id, "status": str(job.status).rsplit(".", 1)[-1],
            "entrypoint": job.entrypoint, "message": job.message, "start_time": job.start_time,
            "end_time": job.end_time}
