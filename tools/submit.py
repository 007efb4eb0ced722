"""`xvlm submit`: submit a Ray Train job to a Ray cluster through the Ray Jobs API (train/ray_jobs.py), stream its
logs, and inspect / stop / list jobs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from storage.errors import XvlmError
from train.ray_jobs import PROJECT_ROOT, client, follow, job_row, submit

DESCRIPTION = (
    "Submit a training run to a Ray cluster as a Ray job: the job runs `xvlm ray-train`, whose Ray Train\n"
    "TorchTrainer starts --num-workers training processes that each run the project's trainer. Checkpoints go to\n"
    "the config's run folder `out` (shared storage: an absolute path every node mounts, or s3://); when a worker fails,\n"
    "Ray restarts the worker group (up to --max-failures times) and the trainer resumes from the last committed\n"
    "checkpoint. The job's logs stream back until it ends (Ctrl-C detaches; the job keeps running).\n\n"
    "Authentication: when the cluster uses Ray token auth (RAY_AUTH_MODE=token), the token is read from\n"
    "RAY_AUTH_TOKEN, or the file in RAY_AUTH_TOKEN_PATH / --auth-token-file, or ~/.ray/auth_token.\n\n"
    "S3 credentials: give the cluster its own (an instance role / IRSA, or ~/.aws/credentials or AWS_* variables\n"
    "set on every node): boto3 on the workers finds them through its standard chain. --forward-aws passes only the\n"
    "region and endpoint of this shell. Secrets passed to a job (--forward-aws-credentials, --env, --forward-env) go\n"
    "into its runtime environment, which anyone who can open the Ray dashboard or call the Jobs API can read."
)
EPILOG = (
    "examples:\n"
    "  xvlm submit --address http://HEAD:8265 --config train/configs/xvlm_base_4m.yaml \\\n"
    "      data.train=s3://bucket/shards checkpoint.dir=s3://bucket/runs/base4m --num-workers 16 --gpus-per-worker 1\n"
    "  xvlm submit --address http://127.0.0.1:8265 --config train/configs/tiny_cpu.yaml --num-workers 2   # CPU\n"
    "  xvlm submit --address http://HEAD:8265 --status JOB_ID\n"
    "  xvlm submit --address http://HEAD:8265 --logs JOB_ID [--follow]\n"
    "  xvlm submit --address http://HEAD:8265 --stop JOB_ID\n"
    "  xvlm submit --address http://HEAD:8265 --list\n\n"
    "The address defaults to $RAY_ADDRESS, else http://127.0.0.1:8265. The project folder is uploaded as the job's\n"
    "working_dir (without .venv, .git, data and runs); the cluster's Python must have the project's dependencies\n"
    "(or pass --pip 'xvlm-pipeline==VERSION' to install them into the job's environment)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
                        help="Ray dashboard address of the cluster's head, http://HEAD:8265 "
                             "(default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--status", metavar="JOB", help="print the status of job JOB and exit")
    action.add_argument("--logs", metavar="JOB", help="print the logs of job JOB (with --follow: until it ends)")
    action.add_argument("--stop", metavar="JOB", help="ask job JOB to stop")
    action.add_argument("--list", action="store_true", help="list the cluster's jobs")
    parser.add_argument("--config", help="training config YAML (local path inside or outside the project, or s3://)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as `xvlm train`")
    parser.add_argument("--num-workers", type=int, default=1, help="training processes (Ray Train workers); default 1")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="GPUs per worker (0: train on CPU with gloo); default 0")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker; default 1")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="worker-group restarts after failures before the job fails (-1: unlimited); default 3")
    parser.add_argument("--storage-path",
                        help="Ray Train's own run folder (shared storage); default: <checkpoint dir>/ray")
    parser.add_argument("--job-id", help="submission id to use (default: xvlm-<random>)")
    parser.add_argument("--working-dir", default=str(PROJECT_ROOT),
                        help=f"folder uploaded as the job's working_dir (default: this project, {PROJECT_ROOT})")
    parser.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                        help="pip requirement installed into the job's environment (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the job and its workers (repeatable)")
    parser.add_argument("--forward-env", action="append", default=[], metavar="NAME",
                        help="pass this variable of the submitting shell to the job (repeatable)")
    parser.add_argument("--forward-aws", action="store_true",
                        help="pass this shell's AWS region and endpoint variables (AWS_DEFAULT_REGION, AWS_REGION, "
                             "AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3) to the job; no secrets. Credentials should "
                             "come from the cluster's own chain (instance role, IRSA, ~/.aws on the nodes)")
    parser.add_argument("--forward-aws-credentials", action="store_true",
                        help="also pass AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (opt-in, with "
                             "a warning: they become readable by anyone with access to the Ray dashboard / Jobs "
                             "API; use short-lived session credentials if you must)")
    parser.add_argument("--auth-token-file", help="file holding the cluster's Ray auth token")
    parser.add_argument("--no-wait", action="store_true", help="submit and print the job id; do not stream logs")
    parser.add_argument("--follow", action="store_true", help="with --logs: keep streaming until the job ends")


def run(args: argparse.Namespace) -> int:
    if args.status or args.logs or args.stop or args.list:
        jobs = client(args.address, args.auth_token_file)
        try:
            if args.status:
                print(json.dumps(job_row(jobs.get_job_info(args.status)), indent=2))
            elif args.logs:
                if args.follow:
                    status = follow(jobs, args.logs)
                    print(f"job {args.logs}: {status}")
                    return 0 if status == "SUCCEEDED" else 1
                sys.stdout.write(jobs.get_job_logs(args.logs))
            elif args.stop:
                stopped = jobs.stop_job(args.stop)
                print(f"job {args.stop}: {'stop requested' if stopped else 'already finished'}")
            else:
                for job in sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0):
                    row = job_row(job)
                    print(f"{row['job']}\t{row['status']}\t{row['entrypoint']}")
        except RuntimeError as err:   # the Jobs API reports unknown ids and HTTP errors as RuntimeError
            raise XvlmError(str(err)) from None
        return 0
    job_id, entrypoint = submit(args)
    print(f"submitted job {job_id} to {args.address}")
    print(f"  entrypoint: {entrypoint}")
    print(f"  follow it:  xvlm submit --address {args.address} --logs {job_id} --follow")
    if args.no_wait:
        return 0
    status = follow(client(args.address, args.auth_token_file), job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1
