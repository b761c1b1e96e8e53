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
                  "--s3-endpoint-url", "http://minio:9000", "--require-env", "AWS_ACCESS_KEY_ID",
                  "--require-env", "AWS_SECRET_ACCESS_KEY", "--stop-grace-s", "30")
    assert job["runtime_env"] == {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30", "AWS_ENDPOINT_URL":
                                               "http://minio:9000", "AIOS_REQUIRED_ENV":
                                               "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY"}}
    assert job["metadata"]["aios_run"] == "n1" and "--run-name=n1" in job["entrypoint"]
    # This machine's endpoint (a port-forward, say) is not the cluster's: it is never sent.
    sent = dry_run("--dataset-file", "s3://b/data.txt", AWS_ENDPOINT_URL="http://127.0.0.1:9000")
    assert "AWS_ENDPOINT_URL" not in sent["runtime_env"]["env_vars"] and "127.0.0.1:9000" not in json.dumps(sent)


def test_the_working_dir_is_uploaded_without_local_brains(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.txt").write_text("text\n")
    job = dry_run("--working-dir", str(tmp_path), "--dataset-file", "data/t.txt", "--bundle-dir", "s3://b/x")
    assert job["runtime_env"]["working_dir"] == str(tmp_path.resolve())
    assert {".git", ".venv", "artifacts"} <= set(job["runtime_env"]["excludes"])


@pytest.mark.parametrize("args, message", [
    (["--dataset-file", "/d.txt", "--ray-address", "auto"], "--ray-address has no effect with aios submit (the "
     "job runs on the cluster it is submitted to); drop --ray-address"),
    (["--dataset-file", "/d.txt", "--device", "cuda", "--cuda-ids", "0"], "--cuda-ids has no effect with aios "
     "submit (the cluster's GPUs are its own (Ray gives each worker one)); drop --cuda-ids"),
    (["--dataset-file", "/d.txt", "--stop-file", "/tmp/stop"], "--stop-file has no effect with aios submit (a "
     "file on the cluster's head; `aios jobs stop ID` stops a job); drop --stop-file"),
    (["--brain-name", "x"], "--dataset-file is required: pass the text to train on"),
    (["--dataset-file", "/d.txt", "--zero-stage", "zero1", "--use-8bit-optimizer"],
     "--zero-stage zero1 with --use-8bit-optimizer: DeepSpeed does not shard bitsandbytes' 8-bit state"),
    (["--dataset-file", "/d.txt", "--require-env", f"AWS_SECRET_ACCESS_KEY={SECRET}"],
     "--require-env AWS_SECRET_ACCESS_KEY=...: pass only the variable's name; the cluster provides its value"),
    (["--dataset-file", "/d.txt", "--require-env", "1BAD"], "--require-env '1BAD' is not an environment variable "
     "name (letters, digits, _)"),
    (["--dataset-file", "s3://b/d", "--s3-endpoint-url", f"http://user:{SECRET}@minio:9000"],
     "the S3 endpoint URL holds a user or password, which would be logged by Ray"),
    (["--dataset-file", "/d.txt", "--lr", "-1"], "--lr must be greater than 0.0, got -1.0; pass a positive number"),
    (["--dataset-file", "/d.txt", "--working-dir", "/no/such/dir"], "--working-dir /no/such/dir: not a directory"),
])
def test_refused_here_in_one_line(args, message):
    result = runner.invoke(app, ["submit", *args, "--dry-run"])
    assert isinstance(result.exception, AiosError), result.output  # main() prints it as one line, exit 2
    text = str(result.exception)
    assert text.startswith(message) and "\n" not in text and SECRET not in text, text


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
    assert "artifacts/x.txt is not uploaded with --working-dir" in problem(dataset_file="artifacts/x.txt",
                                                                         bundle_dir="s3://b/x")
    # What .gitignore or .rayignore leaves out (as Ray's upload does), at any depth, is not uploaded either.
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "big.txt").write_text("x\n")
    (tmp_path / "data" / "kept.txt").write_text("x\n")
    (tmp_path / ".gitignore").write_text("raw/\n")
    assert "data/raw/big.txt is not uploaded" in problem(dataset_file="data/raw/big.txt", bundle_dir="/abs")
    assert "data/raw/big.txt is not uploaded" in problem(dataset_file="data/**/*.txt", bundle_dir="/abs")
    (tmp_path / "data" / ".rayignore").write_text("kept.txt\n")
    assert "data/kept.txt is not uploaded" in problem(dataset_file="data/kept.txt", bundle_dir="/abs")
    (tmp_path / "tok").mkdir()
    (tmp_path / ".rayignore").write_text("tok\n")
    assert "--model tok: tok is not uploaded" in problem(dataset_file="ok.txt", bundle_dir="/abs", model="tok")
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
    assert cpus_for_workers([head, node(16, gpus=1)], 2, gpus=True) == 1  # too few GPUs: the room check refuses
    assert cpus_for_workers([head, node(8, alive=False)], 1) == 1
    assert cpus_for_workers([head], 2) == 1  # no worker pods yet: likewise


class FakeJobs:
    """A Jobs API stand-in for the id rules (the real cluster: tests/cluster/test_submit.py): jobs as
    list_jobs returns them, and submit_job refusing a taken id as Ray does."""

    def __init__(self, *jobs, taken_at_submit=()):
        self.jobs = list(jobs)
        self.taken_at_submit = list(taken_at_submit)  # jobs another submitter adds just before our submission
        self.submitted = []

    def list_jobs(self):
        return list(self.jobs)

    def submit_job(self, *, entrypoint, runtime_env, metadata, submission_id):
        if self.taken_at_submit:
            self.jobs.append(self.taken_at_submit.pop(0))
        if submission_id in {job.submission_id for job in self.jobs}:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists. Please use a different one.")
        self.submitted.append(submission_id)
        self.jobs.append(job(submission_id, "PENDING", run=metadata["aios_run"], brain=metadata["aios_brain"]))


def job(submission_id, status, *, run=None, brain="b", start=0):
    from types import SimpleNamespace

    metadata = {"aios_run": run, "aios_brain": brain} if run else {}
    return SimpleNamespace(submission_id=submission_id, status=status, metadata=metadata, start_time=start)


def spec(run="foo", brain="b"):
    return jobs.JobSpec(entrypoint="aios hrm-hf train-actv1", runtime_env={}, run=run,
                        metadata={"aios_run": run, "aios_brain": brain})


def test_a_run_s_jobs_are_found_by_run_and_brain_not_by_id():
    # Run foo's second job is foo-2: a run named foo-2 is another run, and so is foo of another brain.
    cluster = FakeJobs(job("foo", "STOPPED", run="foo", start=1), job("foo-2", "RUNNING", run="foo", start=2),
                       job("bar", "RUNNING", run="foo", brain="other", start=3))
    outcome = jobs.submit(cluster, spec("foo-2"))
    assert outcome.submitted and outcome.job_id == "foo-2-2" and outcome.previous is None
    outcome = jobs.submit(FakeJobs(*cluster.jobs[:3]), spec("foo"))
    assert not outcome.submitted and outcome.job_id == "foo-2"  # the running one is reported
    # A job not of aios, or of no run, never counts as the run's.
    plain = FakeJobs(job("foo", "RUNNING"))
    assert jobs.submit(plain, spec("foo")).job_id == "foo-2"


def test_any_running_job_of_the_run_is_reported_and_a_race_does_not_start_it_twice():
    older_running = FakeJobs(job("foo", "RUNNING", run="foo", start=1), job("foo-2", "FAILED", run="foo", start=2))
    outcome = jobs.submit(older_running, spec())
    assert not outcome.submitted and outcome.job_id == "foo" and older_running.submitted == []
    # Another submitter submits the run between our listing and our submission: it is reported, not doubled.
    raced = FakeJobs(job("foo", "FAILED", run="foo", start=1),
                     taken_at_submit=[job("foo-2", "PENDING", run="foo", start=2)])
    outcome = jobs.submit(raced, spec())
    assert not outcome.submitted and outcome.job_id == "foo-2" and raced.submitted == []
    # An id taken by an unrelated job in that moment: the next free one.
    other = FakeJobs(job("foo", "SUCCEEDED", run="foo", start=1), taken_at_submit=[job("foo-2", "RUNNING")])
    outcome = jobs.submit(other, spec())
    assert outcome.submitted and outcome.job_id == "foo-3" and outcome.previous.submission_id == "foo"


def test_ray_metrics_follow_the_records(monkeypatch):
    import aios.cluster.metrics as metrics

    values: dict[str, list[float]] = {}

    class Recorded:  # what ray.util.metrics.Gauge receives (the exported values: tests/cluster/test_submit.py)
        def __init__(self, name, description, tag_keys):
            self.name, self.tags = name, None
            assert tag_keys == ("brain", "run")

        def set_default_tags(self, tags):
            self.tags = tags

        def set(self, value):
            assert self.tags == {"brain": "b", "run": "r"}
            values.setdefault(self.name, []).append(value)

    monkeypatch.setattr(metrics, "Gauge", Recorded)
    sink = metrics.RayMetrics("b", "r", restarts=2, world_size=3)
    sink({"event": "step", "step": 5, "loss": 4.5, "lm_loss": 4.0, "tokens_per_s": 100.0, "segments": None})
    sink({"event": "eval", "step": 5, "loss": 3.5, "perplexity": 33.1, "segments": 2.0})
    sink({"event": "checkpoint", "step": 5, "path": "x"})
    sink({"event": "step", "step": 6, "loss": 4.25, "lm_loss": 3.9, "tokens_per_s": 120.0, "segments": 2.5})
    assert values == {"aios_train_restarts": [2.0, 2.0], "aios_train_world_size": [3.0, 3.0],
                      "aios_train_loss": [4.5, 4.25], "aios_train_lm_loss": [4.0, 3.9],
                      "aios_train_tokens_per_s": [100.0, 120.0], "aios_train_segments": [2.5],
                      "aios_train_step": [5.0, 6.0], "aios_eval_loss": [3.5], "aios_eval_perplexity": [33.1]}
