"""A private local Ray head for tests: 127.0.0.1, free ports, its own temp dir and token, stopped by its own
process group and temp dir only (never `ray stop`, which would kill every Ray on the machine)."""
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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RAY_BIN = Path(sys.executable).with_name("ray")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so that they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class RayHead:
    temp_dir: Path
    dashboard_url: str
    gcs_address: str
    token: str
    process: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)   # what a client process needs (auth token, loopback)

    def stop(self) -> None:
        """SIGTERM then SIGKILL our process group, then any process that still names our temp dir."""
        pgid = self.process.pid
        for sig, wait in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        for pid in _pids_naming(str(self.temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pids_naming(text: str) -> list[int]:
    """Pids of our own processes whose command line or environment mentions `text` (our unique temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(entry.name))
    return found


def start_ray_head(num_cpus: int = 2, timeout: float = 180.0, attempts: int = 3) -> RayHead:
    """Start a head; on a loaded machine Ray's fixed 30 s raylet-registration wait can expire, so retry afresh."""
    error: Exception | None = None
    for _ in range(attempts):
        try:
            return _start_once(num_cpus, timeout)
        except RuntimeError as err:
            error = err
    raise RuntimeError(f"could not start a Ray head in {attempts} attempts: {error}")


def _start_once(num_cpus: int, timeout: float) -> RayHead:
    # A short temp dir: Ray puts Unix sockets under it, and socket paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="xr", dir="/tmp"))
    (gcs, dashboard, client, node_manager, object_manager, agent_listen, agent_grpc, runtime_env_agent,
     metrics) = free_ports(9)
    token = secrets.token_hex(16)
    env = dict(os.environ)
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "TOKENIZERS_PARALLELISM": "false",
        # Every process of this head inherits this: `stop()` finds stragglers by it, and only ours.
        "XVLM_TEST_RAY_HEAD": str(temp_dir),
    })
    env.pop("RAY_ADDRESS", None)
    # Jobs run `python ...`: make that the interpreter running the tests (the project's venv).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [
        str(RAY_BIN), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
        f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
        f"--metrics-export-port={metrics}", f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--temp-dir={temp_dir}", "--disable-usage-stats", "--object-store-memory=200000000",
    ]
    log = open(temp_dir / "ray_start.log", "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(temp_dir, f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", token, process,
                   env={"RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                        "RAY_USAGE_STATS_ENABLED": "0", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"})
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            head.stop()
            raise RuntimeError(f"ray start exited with {process.returncode}: "
                               f"{(temp_dir / 'ray_start.log').read_text(errors='replace')[-3000:]}")
        # `ray start --block` prints this only once the raylet has registered (the dashboard answers earlier).
        started = b"Ray runtime started" in (temp_dir / "ray_start.log").read_bytes()
        try:
            request = urllib.request.Request(f"{head.dashboard_url}/api/version",
                                             headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=2) as response:
                if started and response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            text = (temp_dir / "ray_start.log").read_text(errors="replace")[-3000:]
            head.stop()
            raise RuntimeError(f"the Ray head did not come up within {timeout:.0f}s: {text}")
        time.sleep(1.0)
    return head
