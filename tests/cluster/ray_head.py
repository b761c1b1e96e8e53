"""A real Ray head node for tests: `ray start --head --block` on 127.0.0.1, in its own temp dir and on free ports,
stopped by the PID of the process the test started (never `ray stop`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent  # ray and aios of this environment


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Head:
    address: str  # the Jobs API (dashboard) address
    metrics_url: str  # the node's Prometheus endpoint
    cwd: Path  # where the head runs: a job's relative paths resolve here
    env: dict[str, str]  # what the head's processes (and so the jobs) inherit
    process: subprocess.Popen
    log: Path
    temp_dir: Path  # Ray's --temp-dir: sessions, logs, uploaded working directories


@contextlib.contextmanager
def ray_head(cwd: Path, *, env: dict[str, str], num_cpus: int = 2, timeout_s: float = 90.0):
    """Start a head node whose processes inherit `env` (on top of this one's, with this environment's bin first
    on PATH, so that a job's `aios` is this checkout's); yield a Head; stop it by PID."""
    temp_dir = Path(tempfile.mkdtemp(prefix="aios-ray-", dir="/tmp"))  # short: Ray's socket paths have a limit
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(9)
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "RAY_USAGE_STATS_ENABLED": "0", **env}
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_manager}",
               f"--object-manager-port={object_manager}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
               "--disable-usage-stats"]
    log = temp_dir / "ray-start.log"
    with open(log, "w") as out:
        # A session of its own: the head's processes are this one's group, stopped together below.
        process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    head = Head(address=f"http://127.0.0.1:{dashboard}", metrics_url=f"http://127.0.0.1:{metrics}/metrics",
                cwd=cwd, env=full_env, process=process, log=log, temp_dir=temp_dir)
    try:
        _wait_ready(head, timeout_s)
        yield head
    finally:
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_ready(head: Head, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(f"ray start exited {head.process.returncode}:\n{head.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{head.address}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (401 without a token, on a cluster with token auth)
            return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not answer within {timeout_s} s:\n{head.log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops the node's processes), then SIGKILL to its process group:
    the processes this test started, found by the PID it holds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever of its group outlived it (start_new_session: pgid = pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
