"""`aios submit` and `aios jobs` against a real Ray head (`ray start --head` on 127.0.0.1, token authentication
on, started and stopped by the test): submit, watch, stop, resubmit; secrets never leave this machine. (A cluster
without token authentication: tests/cluster/test_ray_job.py, on its module's cluster.)

Every command runs as a user runs it: the `aios` executable in a subprocess, with a timeout."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.cluster.ray_head import BIN, ray_head
from tests.train.conftest import REPO, SAMPLE, TOKENIZER

pytestmark = pytest.mark.timeout(600)

PLANTED = "planted-secret-" + secrets.token_hex(8)  # in the submitter's environment only
CLUSTER_VALUE = "cluster-provided-" + secrets.token_hex(4)  # what the cluster itself provides
TINY = ["--max-seq-len=16", "--dataset-chunk-size=64", "--hidden-size=32", "--num-heads=2", "--expansion=2",
        "--h-layers=1", "--l-layers=1", "--h-cycles=1", "--l-cycles=2", "--halt-max-steps=3", "--batch-size=4",
        "--lr=3e-3", "--warmup-steps=2", "--eval-batches=2", "--no-amp", "--no-progress", "--seed=7",
        "--world-size=1", "--cpus-per-worker=1"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """What a user uploads with --working-dir: a folder with their text and tokenizer (and local brains, which
    are not uploaded)."""
    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    (root / "data" / "text.txt").write_text(SAMPLE.read_text()[:40_000])
    shutil.copytree(TOKENIZER, root / "tok")
    (root / "artifacts").mkdir()
    (root / "artifacts" / "big-local-file.bin").write_bytes(b"x" * 1000)
    return root


@pytest.fixture(scope="module")
def token(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("token") / "auth_token"
    path.write_text(secrets.token_hex(32))
    return path


@pytest.fixture(scope="module")
def head(tmp_path_factory, token):
    cwd = tmp_path_factory.mktemp("head-cwd")
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
           "RAY_metrics_report_interval_ms": "1000", "AIOS_TEST_CREDENTIAL": CLUSTER_VALUE}
    with ray_head(cwd, env=env) as started:
        yield started


def aios(*args: str, token: Path | None, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """The aios CLI as a user on another machine runs it: with the planted secret in its environment, and the
    cluster's token (None: no token, token auth not configured)."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("RAY_AUTH", "RAY_ADDRESS", "RAY_API_SERVER"))}
    environment.update({"AWS_SECRET_ACCESS_KEY": PLANTED, "AWS_ACCESS_KEY_ID": "AKIA" + PLANTED, **env})
    if token is not None:
        environment.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    return subprocess.run([str(BIN / "aios"), *args], capture_output=True, text=True, timeout=timeout,
                          env=environment, cwd=REPO)


def submit_args(head, project: Path, bundles: Path, brain: str, steps: int, *extra: str) -> list[str]:
    return ["submit", "--address", head.address, "--working-dir", str(project), "--dataset-file=data/text.txt",
            "--model=tok", f"--bundle-dir={bundles}", f"--brain-name={brain}", f"--steps={steps}",
            f"--data-cache-dir={bundles.parent / 'cache'}", *TINY, *extra]


def job_info(head, token: Path, job_id: str) -> dict:
    result = aios("jobs", "status", job_id, "--address", head.address, token=token)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def raw_job_details(head, token: Path) -> str:
    """Everything the cluster keeps about its jobs (entrypoints, runtime envs, metadata), as the Jobs API
    serves it."""
    request = urllib.request.Request(f"{head.address}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def _metrics(head) -> str:
    with urllib.request.urlopen(head.metrics_url, timeout=5) as response:
        return response.read().decode()


def _checkpoints(bundle: Path) -> list[str]:
    folder = bundle / "checkpoints"
    return sorted(p.name for p in folder.glob("step-*") if (p / "COMPLETE").exists()) if folder.is_dir() else []


def test_submit_watch_stop_and_resubmit_a_run(head, project, token, tmp_path):
    """The life of a run on a cluster: submitted, reported while it runs, in the dashboard's metrics, stopped
    (checkpointing), submitted again (continuing from that checkpoint to success and a bundle), and again
    (already done: nothing retrained, nothing failed); no secret of this machine reaches the cluster."""
    bundles = tmp_path / "brains"
    bundle = bundles / "sub"
    args = submit_args(head, project, bundles, "sub", 100_000, "--checkpoint-every=3", "--eval-every=3",
                       "--iterate", "--stop-grace-s=60", "--require-env", "AIOS_TEST_CREDENTIAL")
    started = aios(*args, "--no-wait", token=token)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "submitted run sub as job sub" in started.stdout
    assert f"Ray dashboard: {head.address}/#/jobs/sub" in started.stdout

    # While it trains: a second submission of the run reports it, and the dashboard's metrics have it.
    deadline = time.monotonic() + 240
    while not _checkpoints(bundle):
        assert time.monotonic() < deadline, aios("jobs", "logs", "sub", "--address", head.address,
                                                 token=token).stdout
        time.sleep(1)
    again = aios(*args, "--no-wait", token=token)
    assert again.returncode == 0, again.stderr
    assert "run sub is already RUNNING as job sub: nothing submitted" in again.stdout
    series = {}
    while time.monotonic() < deadline and not {"ray_aios_train_loss", "ray_aios_eval_loss",
                                               "ray_aios_train_restarts"} <= set(series):
        for line in _metrics(head).splitlines():
            match = re.match(r'(ray_aios_\w+)\{([^}]*)\} (\S+)', line)
            if match and 'brain="sub"' in match.group(2) and 'run="sub"' in match.group(2):
                series[match.group(1)] = float(match.group(3))
        time.sleep(1)
    for name in ("ray_aios_train_loss", "ray_aios_eval_loss", "ray_aios_train_tokens_per_s",
                 "ray_aios_train_segments", "ray_aios_train_step"):
        assert name in series, sorted(series)
    assert 0 < series["ray_aios_train_loss"] < 50 and series["ray_aios_train_tokens_per_s"] > 0
    assert 1 <= series["ray_aios_train_segments"] <= 3
    assert series.get("ray_aios_train_restarts") == 0 and series.get("ray_aios_train_world_size") == 1, \
        [line for line in _metrics(head).splitlines() if "aios" in line]

    stopped = aios("jobs", "stop", "sub", "--address", head.address, token=token, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "job sub STOPPED" in stopped.stdout
    logs = aios("jobs", "logs", "sub", "--address", head.address, token=token).stdout
    assert "SIGTERM received" in logs, logs[-3000:]
    records = [json.loads(line) for line in (bundle / "metrics.jsonl").read_text().splitlines()]
    stop_step = next(r["step"] for r in records if r.get("event") == "end")
    assert next(r for r in records if r.get("event") == "stop")["reason"] == "SIGTERM"
    assert _checkpoints(bundle)[-1] == f"step-{stop_step:06d}"  # checkpointed at the stop, not killed

    # Submitted again (with a nearer end): a new job continues the run from that checkpoint.
    args = [a for a in args if not a.startswith("--steps=")] + [f"--steps={stop_step + 2}"]
    resumed = aios(*args, "--follow", token=token)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "submitted job sub-2: it continues run sub from its newest checkpoint, if it has one (job sub STOPPED)" \
        in resumed.stdout
    followed = " ".join(resumed.stdout.split())  # the job's log, its lines wrapped at 80 columns
    assert "run 'sub' has trained brain 'sub' before: continuing it from its newest checkpoint" in followed
    assert f"steps: {stop_step + 2} steps; bundle {bundle}" in followed and "job sub-2 SUCCEEDED" in followed
    records = [json.loads(line) for line in (bundle / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("event") == "start"]
    assert starts[-1]["step"] == stop_step and starts[-1]["resumed_from"].endswith(f"step-{stop_step:06d}")
    assert [r["step"] for r in records if r.get("event") == "step"][-3:] == [stop_step, stop_step + 1,
                                                                            stop_step + 2]
    assert (bundle / "model.safetensors").is_file()
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["run"]["run_name"] == "sub" and metadata["run"]["launcher"] == "ray"
    info = job_info(head, token, "sub-2")
    assert info["status"] == "SUCCEEDED" and info["run"] == "sub" and info["brain"] == "sub"
    assert "--run-name=sub" in info["entrypoint"] and info["dashboard"] == f"{head.address}/#/jobs/sub-2"

    # Once more: a new job, which finds the run done: no failure, nothing retrained.
    done = aios(*args, token=token)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted job sub-3: it continues run sub from its newest checkpoint, if it has one (job sub-2 SUCCEEDED)" in done.stdout
    logs = aios("jobs", "logs", "sub-3", "--address", head.address, token=token).stdout
    assert f"brain 'sub' is at step {stop_step + 2}; --steps {stop_step + 2} is already reached" in logs, logs

    listed = aios("jobs", "list", "--address", head.address, token=token)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [row[:4] for row in rows if row[2] == "sub"] == [["sub", "STOPPED", "sub", "sub"],
                                                            ["sub-2", "SUCCEEDED", "sub", "sub"],
                                                            ["sub-3", "SUCCEEDED", "sub", "sub"]]

    # Secrets of the submitting machine never reach the cluster: not in any job's entrypoint, runtime env or
    # metadata, nor in what it printed; the required variable went by name only, its value the cluster's.
    details = raw_job_details(head, token)
    assert PLANTED not in details and CLUSTER_VALUE not in details
    assert '"AIOS_REQUIRED_ENV": "AIOS_TEST_CREDENTIAL"' in details
    for result in (started, resumed, done):
        assert PLANTED not in result.stdout + result.stderr
    # The upload: the project's files, without its local brains (artifacts/).
    uploaded = list(head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/data/text.txt"))
    assert uploaded, sorted(str(p) for p in head.temp_dir.glob("session_*/runtime_resources/*/*"))
    assert not list(head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/artifacts"))


def test_a_required_variable_the_cluster_lacks_fails_the_job_in_one_line(head, project, token, tmp_path):
    result = aios(*submit_args(head, project, tmp_path / "brains", "sub-noenv", 2, "--require-env",
                               "AIOS_NOT_ON_THE_CLUSTER"), token=token)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "job sub-noenv FAILED" in result.stderr
    logs = aios("jobs", "logs", "sub-noenv", "--address", head.address, token=token).stdout
    assert ("error: the cluster does not provide AIOS_NOT_ON_THE_CLUSTER in the job's environment (aios submit "
            "--require-env)") in logs
    assert not (tmp_path / "brains" / "sub-noenv").exists()


def test_flags_are_checked_here_before_anything_is_submitted(head, project, token, tmp_path):
    """(Each refusal is in tests/cli/test_submit_cli.py, without a cluster.) A refused run reaches no cluster."""
    def refused(*args: str) -> str:
        result = aios(*args, token=token)
        assert result.returncode != 0, result.stdout
        return one_line(result)

    base = ["submit", "--address", head.address, "--working-dir", str(project), "--model=tok",
            f"--bundle-dir={tmp_path}", "--brain-name=refused"]
    assert "not found in --working-dir" in refused(*base, "--dataset-file=data/missing.txt")
    assert "--lr" in refused(*base, "--dataset-file=data/text.txt", "--lr=-1")
    listed = aios("jobs", "list", "--address", head.address, token=token).stdout
    assert "refused" not in listed, listed
    assert "no such job on this cluster" in refused("jobs", "status", "no-such-job", "--address", head.address)
    assert "no such job on this cluster" in refused("jobs", "stop", "no-such-job", "--address", head.address)


def test_a_missing_or_wrong_token_is_one_line(head, tmp_path):
    missing = aios("jobs", "list", "--address", head.address, token=None)
    assert missing.returncode != 0
    assert "requires a Ray token" in one_line(missing) and "RAY_AUTH_MODE=token" in one_line(missing)
    wrong = tmp_path / "wrong"
    wrong.write_text(secrets.token_hex(32))
    refused = aios("jobs", "list", "--address", head.address, token=wrong)
    assert refused.returncode != 0 and "refused this machine's Ray token" in one_line(refused)
