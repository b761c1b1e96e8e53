"""`aios submit --dry-run` and the submit helpers that need no cluster: what a job would carry, what is refused
here, and the job-side check of the variables it requires. (The real cluster: tests/cluster/test_submit.py.)"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aios.cli.hrm_hf import parse_cli_args
from aios.cli.main import app
from aios.cluster import submit as jobs
from aios.config import TrainingConfig
from aios.errors import AiosError
from aios.train.metrics import MetricsLog

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
SECRET = "planted-secret-value-7f3a"


def dry_run(*args: str, **env: str) -> dict:
    result = runner.invoke(app, ["submit", *args, "--dry-run"], env={"AWS_SECRET_ACCESS_KEY": SECRET, **env})
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    return json.loads(result.output)


def test_the_entrypoint_is_the_resolved_run_with_its_run_name(monkeypatch):
    monkeypatch.chdir(REPO)
    job = dry_run("--config", "config/train/demo-cpu.yaml", "--steps", "50", "--bundle-dir", "/data/brains")
    argv = shlex.split(job["entrypoint"])
    assert argv[:3] == ["aios", "hrm-hf", "train-actv1"]
    # The preset is inlined (the cluster needs no copy of it) and the run name is the brain's.
    assert "--config" not in job["entrypoint"] and "--hidden-size=256" in argv and "--steps=50" in argv
    assert argv[-1] == "--run-name=shakespeare-demo"
    assert parse_cli_args(argv[3:]) == parse_cli_args(["--config", "config/train/demo-cpu.yaml", "--steps", "50",
                                                       "--bundle-dir", "/data/brains",
                                                       "--run-name", "shakespeare-demo"])
    assert job["metadata"] == {"aios_run": "shakespeare-demo", "aios_brain": "shakespeare-demo"}
    assert job["runtime_env"] == {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}


def test_the_runtime_env_holds_the_endpoint_and_names_never_values():
    job = dry_run("--dataset-file", "s3://b/data.txt", "--bundle-dir", "s3://b/brains", "--run-name", "n1",
                  "--require-env", "AWS_ACCESS_KEY_ID", "--require-env", "AWS_SECRET_ACCESS_KEY",
                  "--stop-grace-s", "30", AWS_ENDPOINT_URL="http://minio:9000")
    assert job["runtime_env"] == {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30", "AWS_ENDPOINT_URL":
                                               "http://minio:9000", "AIOS_REQUIRED_ENV":
                                               "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY"}}
    assert job["metadata"]["aios_run"] == "n1" and "--run-name=n1" in job["entrypoint"]
    # A local run carries no endpoint, even when this machine has one.
    assert "AWS_ENDPOINT_URL" not in dry_run("--dataset-file", "/d.txt", AWS_ENDPOINT_URL="http://minio:9000")[
        "runtime_env"]["env_vars"]


def test_the_working_dir_is_uploaded_without_local_brains(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.txt").write_text("text\n")
    job = dry_run("--working-dir", str(tmp_path), "--dataset-file", "data/t.txt", "--bundle-dir", "s3://b/x")
    assert job["runtime_env"]["working_dir"] == str(tmp_path.resolve())
    assert {".git", ".venv", "artifacts"} <= set(job["runtime_env"]["excludes"])


@pytest.mark.parametrize("args, message", [
    (["--dataset-file", "/d.txt", "--ray-address", "auto"], "--ray-address has no effect with aios submit"),
    (["--dataset-file", "/d.txt", "--device", "cuda", "--cuda-ids", "0"], "--cuda-ids has no effect with aios"),
    (["--dataset-file", "/d.txt", "--require-env", f"AWS_SECRET_ACCESS_KEY={SECRET}"], "pass only the variable's"),
    (["--dataset-file", "/d.txt", "--require-env", "1BAD"], "is not an environment variable name"),
    (["--dataset-file", "s3://b/d", "--s3-endpoint-url", f"http://user:{SECRET}@minio:9000"], "holds a user or"),
    (["--dataset-file", "/d.txt", "--lr", "-1"], "--lr"),
    (["--dataset-file", "/d.txt", "--working-dir", "/no/such/dir"], "--working-dir /no/such/dir: not a directory"),
])
def test_refused_here_in_one_line(args, message):
    result = runner.invoke(app, ["submit", *args, "--dry-run"])
    assert result.exit_code != 0
    assert isinstance(result.exception, AiosError) or "Error" in result.output, result.output
    text = str(result.exception) if isinstance(result.exception, AiosError) else result.output
    assert message in text and SECRET not in text.replace(f"AWS_SECRET_ACCESS_KEY={SECRET}", "")


def test_working_dir_paths(tmp_path):
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "x.txt").write_text("x\n")
    (tmp_path / "ok.txt").write_text("x\n")
    config = TrainingConfig.from_dict({"dataset_file": "/abs.txt"}, check_paths=False)  # the cluster's path

    def problem(**changes) -> str:
        with pytest.raises(AiosError) as raised:
            jobs.job_spec(config.replace(check_paths=False, **changes), working_dir=str(tmp_path), required_env=[],
                          stop_grace_s=5)
        return str(raised.value)

    assert "not found in --working-dir" in problem(dataset_file="missing.txt", bundle_dir="s3://b/x")
    assert "artifacts/ is not uploaded" in problem(dataset_file="artifacts/x.txt", bundle_dir="s3://b/x")
    assert "--bundle-dir artifacts/brains/actv1 is relative" in problem(dataset_file="ok.txt")
    assert "--log-file logs/m.jsonl is relative" in problem(dataset_file="ok.txt", bundle_dir="/abs",
                                                            log_file="logs/m.jsonl")
    spec = jobs.job_spec(config.replace(check_paths=False, dataset_file="ok.txt", bundle_dir="/abs"),
                         working_dir=str(tmp_path), required_env=[], stop_grace_s=5)
    assert "--dataset-file=ok.txt" in spec.entrypoint


def test_addresses(monkeypatch):
    for name in jobs.ADDRESS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(AiosError, match="pass --address http://HEAD:8265"):
        jobs.resolve_address(None)
    assert jobs.resolve_address("10.0.0.5:8265") == "http://10.0.0.5:8265"
    assert jobs.resolve_address("https://ray.example/") == "https://ray.example"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    with pytest.raises(AiosError, match="not a Jobs API address"):
        jobs.resolve_address(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert jobs.resolve_address(None) == "http://head:8265"
    with pytest.raises(AiosError, match="drop the user and password"):
        jobs.resolve_address("http://me:pw@head:8265")
    with pytest.raises(AiosError, match="nothing answers there"):
        jobs.connect("http://127.0.0.1:9", timeout_s=2)


def test_the_job_checks_the_variables_it_requires(monkeypatch):
    monkeypatch.setenv(jobs.REQUIRED_ENV, "AIOS_T_ONE,AIOS_T_TWO")
    monkeypatch.setenv("AIOS_T_ONE", "x")
    monkeypatch.delenv("AIOS_T_TWO", raising=False)
    with pytest.raises(AiosError, match=r"does not provide AIOS_T_TWO in the job's environment"):
        jobs.check_required_env()
    monkeypatch.setenv("AIOS_T_TWO", "y")
    jobs.check_required_env()
    monkeypatch.delenv(jobs.REQUIRED_ENV)
    jobs.check_required_env()  # not a submitted job: nothing required


def test_a_failing_metrics_sink_never_stops_the_log(tmp_path, caplog):
    seen = []

    def sink(record):
        seen.append(record["step"])
        raise RuntimeError("exporter down")

    log = MetricsLog(tmp_path / "m.jsonl", resume_step=0, sink=sink)
    log.write({"event": "step", "step": 1})
    log.write({"event": "step", "step": 2})
    log.close()
    assert seen == [1]  # dropped after its first failure
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2]
    assert "metrics export failed (RuntimeError: exporter down)" in caplog.text


def test_workers_that_may_run_anywhere_get_the_cpus_of_the_nodes_they_fit_on():
    """A KubeRay head runs the driver with num-cpus 0: a run in remote storage sizes its workers by the worker
    nodes (the most CPUs each with which they all fit), not by the driver's node."""
    from aios.cluster.job import cpus_for_workers

    def node(cpus: int, gpus: int = 0, alive: bool = True) -> dict:
        return {"Alive": alive, "Resources": {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}}

    head = node(0)
    assert cpus_for_workers([head, node(8), node(8)], 2) == 8
    assert cpus_for_workers([head, node(8), node(8)], 4) == 4
    assert cpus_for_workers([head, node(8), node(4)], 3) == 4  # 8 // 4 + 4 // 4
    assert cpus_for_workers([head, node(16, gpus=2), node(16, gpus=2)], 4, gpus=True) == 8  # one GPU each
    assert cpus_for_workers([head, node(16, gpus=1)], 2, gpus=True) == 1  # not enough GPUs yet: Ray waits
    assert cpus_for_workers([head, node(8, alive=False)], 1) == 1
    assert cpus_for_workers([head], 2) == 1  # the worker pods are still to come (an autoscaling cluster)
