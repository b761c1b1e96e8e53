"""`aios submit` and `aios jobs`: a training run as a Ray job on a remote cluster (the Ray Jobs API).

A run is submitted as the entrypoint `aios hrm-hf train-actv1 <flags> --run-name RUN`, with the run name as
its submission id and in its metadata. Ray never reuses a submission id, so a run's later jobs are RUN-2,
RUN-3, ...: submitting a run first looks at its jobs. One that is pending or running is reported (nothing is
submitted); otherwise a new job is submitted, and because it trains under the same --run-name it continues the
run from its newest checkpoint (train-actv1's run-name rule), or reports that the run already reached --steps.

What leaves this machine: the entrypoint (flags only), the run's metadata (run and brain names), and a
runtime env with the S3 endpoint, Ray's stop grace period and the *names* of the variables the job needs
(AIOS_REQUIRED_ENV; the cluster provides their values from its own environment or secrets, and the job
refuses to start without them). Never a value of this machine's environment: Ray logs runtime envs.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import re
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from aios.config import TrainingConfig
from aios.errors import AiosError

ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # as Ray's own `ray job` commands read them
RUN_KEY = "aios_run"  # job metadata: the run a job trains
BRAIN_KEY = "aios_brain"
REQUIRED_ENV = "AIOS_REQUIRED_ENV"  # names (comma-separated) the job's environment must provide
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"  # Ray's wait between a stop's SIGTERM and its SIGKILL (default 3 s)
DEFAULT_STOP_GRACE_S = 120
# Never uploaded with --working-dir (besides what .gitignore and .rayignore leave out, as Ray does): environments,
# caches, local brains (a job writes its own elsewhere) and the usual homes of credentials.
WORKING_DIR_EXCLUDES = (".git", ".venv", "venv", "artifacts", ".cache", "__pycache__", "*.pyc", ".pytest_cache",
                        ".ruff_cache", ".env", ".env.*", "*.pem", "*.key", ".aws", ".ray", ".kube", ".ssh", ".netrc",
                        "auth_token")
ACTIVE = ("PENDING", "RUNNING")
TOKEN_HELP = ("set RAY_AUTH_MODE=token and give this machine the cluster's token: the file ~/.ray/auth_token, "
              "a file named by $RAY_AUTH_TOKEN_PATH, or $RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ---- the cluster -------------------------------------------------------------------------------------

def resolve_address(address: str | None) -> str:
    """The Jobs API address: --address, else $RAY_API_SERVER_ADDRESS, else an http(s) $RAY_ADDRESS."""
    if address:
        flag = "--address"
    else:
        flag, address = next(((name, os.environ[name]) for name in ADDRESS_VARIABLES if os.environ.get(name)),
                             (None, None))
        if address is None:
            raise AiosError("no Ray cluster given: pass --address http://HEAD:8265 (the head's dashboard port) "
                            "or set RAY_API_SERVER_ADDRESS")
        if flag == "RAY_ADDRESS" and not address.startswith(("http://", "https://")):
            raise AiosError(f"RAY_ADDRESS {address} is not a Jobs API address: pass --address http://HEAD:8265 "
                            f"(the head's dashboard port, not the GCS port)")
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AiosError(f"{flag} {address}: expected http://HEAD:8265 (the Ray head's dashboard address)")
    if parts.username or parts.password:
        raise AiosError(f"{flag}: drop the user and password from the address (they would be logged); Ray's "
                        f"token authentication takes the token from the environment: {TOKEN_HELP}")
    return address.rstrip("/")


def connect(address: str | None, timeout_s: float = 5.0):
    """A JobSubmissionClient of the cluster at `address`, or one line that says why there is none."""
    url = resolve_address(address)
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:  # first, with a timeout: the client itself would wait on an address that drops packets
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise AiosError(f"{url}: nothing answers there ({exc.strerror or exc}); start the cluster (ray start "
                        f"--head --dashboard-host 0.0.0.0), port-forward its dashboard (kubectl port-forward "
                        f"svc/<cluster>-head-svc 8265:8265) or fix --address") from None
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(url)
        client.list_jobs()  # the version check does not need the token; this does
    except AuthenticationError as exc:
        raise AiosError(_auth_problem(url, exc)) from None
    except (ConnectionError, RuntimeError) as exc:
        raise AiosError(f"{url}: not the Jobs API of a Ray cluster ({_first_line(exc)}); pass the head's "
                        f"dashboard address, e.g. http://HEAD:8265") from None
    return client


def _auth_problem(url: str, exc: Exception) -> str:
    text = str(exc)
    if "failed" in text.split(":", 1)[0].lower():  # 403: a token was sent and refused
        return f"{url} refused this machine's Ray token: it is not the cluster's; {TOKEN_HELP}"
    return f"{url} requires a Ray token (the cluster runs with token authentication): {TOKEN_HELP}"


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def dashboard_url(client, job_id: str | None = None) -> str:
    url = client.get_address()
    return f"{url}/#/jobs/{job_id}" if job_id else url


def call(what: str, function, *args):
    """A Jobs API call, its failure one line (the server's traceback reduced to its last line)."""
    from ray.exceptions import AuthenticationError

    try:
        return function(*args)
    except AuthenticationError as exc:
        raise AiosError(_auth_problem("the cluster", exc)) from None
    except (RuntimeError, OSError, _request_errors()) as exc:  # OSError: the built-in ConnectionError too
        text = str(exc)
        if "does not exist" in text or "status code 404" in text:
            raise AiosError(f"{what}: no such job on this cluster; `aios jobs list` shows its jobs") from None
        if not isinstance(exc, RuntimeError):  # the cluster went away (a port-forward that ended?)
            raise AiosError(f"{what}: the cluster stopped answering ({_first_line(exc)}); check the address or "
                            f"the port-forward, then `aios jobs status`") from None
        raise AiosError(f"{what}: {_first_line(exc)}") from None


def _request_errors() -> type[Exception]:
    import requests

    return requests.exceptions.RequestException


# ---- what is submitted ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobSpec:
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]
    run: str


def job_spec(config: TrainingConfig, *, working_dir: str | None, required_env: list[str],
             stop_grace_s: int) -> JobSpec:
    """The entrypoint, runtime env and metadata of `config` as a Ray job, checked here first."""
    for flag, value, why in (
            ("--ray-address", config.ray_address, "the job runs on the cluster it is submitted to"),
            ("--cuda-ids", config.cuda_ids, "the cluster's GPUs are its own (Ray gives each worker one)"),
            ("--stop-file", config.stop_file, "a file on the cluster's head; `aios jobs stop ID` stops a job")):
        if value is not None:
            raise AiosError(f"{flag} has no effect with aios submit ({why}); drop {flag}")
    if config.dataset_file is None:
        raise AiosError("--dataset-file is required: pass the text to train on (a path on the cluster, in "
                        "--working-dir, or s3://...)")
    unavailable = config.unavailable_features()
    if unavailable:
        raise AiosError(unavailable[0])
    names = []
    for name in required_env:
        if "=" in name:
            raise AiosError(f"--require-env {name.split('=', 1)[0]}=...: pass only the variable's name; the cluster "
                            f"provides its value (a value here would be logged by Ray)")
        if not _NAME.fullmatch(name):
            raise AiosError(f"--require-env {name!r} is not an environment variable name (letters, digits, _)")
        names.append(name)
    if config.s3_endpoint_url:
        _check_no_credentials(config.s3_endpoint_url)
    run = config.run_name or config.brain_name  # the run name: a job retried or resubmitted continues it
    config = config.replace(run_name=run, check_paths=False)
    runtime_env: dict = {"env_vars": {STOP_WAIT_ENV: str(stop_grace_s)}}
    if config.s3_endpoint_url:  # (this machine's $AWS_ENDPOINT_URL is not sent: the cluster's may differ)
        runtime_env["env_vars"]["AWS_ENDPOINT_URL"] = config.s3_endpoint_url
    if names:
        runtime_env["env_vars"][REQUIRED_ENV] = ",".join(dict.fromkeys(names))
    if working_dir is not None:
        root = Path(working_dir)
        if not root.is_dir():
            raise AiosError(f"--working-dir {working_dir}: not a directory; pass the folder the job's relative "
                            f"paths are in (it is uploaded to the cluster)")
        _check_paths_in(config, root)
        runtime_env["working_dir"] = str(root.resolve())
        runtime_env["excludes"] = list(WORKING_DIR_EXCLUDES)
    entrypoint = shlex.join(["aios", "hrm-hf", "train-actv1", *config.to_cli_args()])
    return JobSpec(entrypoint=entrypoint, runtime_env=runtime_env, run=run,
                   metadata={RUN_KEY: run, BRAIN_KEY: config.brain_name})


def _check_no_credentials(url: str) -> None:
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise AiosError("the S3 endpoint URL holds a user or password, which would be logged by Ray: drop them "
                        "and let the cluster provide AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (--require-env)")


# Inputs the job reads (relative: inside the upload) and outputs it keeps (relative: lost with the upload).
_INPUTS = ("dataset_file", "eval_file")
_OUTPUTS = ("bundle_dir", "storage_path", "log_file")


def _check_paths_in(config: TrainingConfig, root: Path) -> None:
    """With --working-dir the job runs in a temporary copy of `root` on the cluster: a relative input must be
    in it (and not excluded from the upload), a relative output would be lost with the copy."""
    from aios.config.training import flag_name

    inputs = [(flag_name(name), getattr(config, name)) for name in _INPUTS]
    model = config.model  # a tokenizer directory by a relative path (here or in the upload), not a hub id
    if not os.path.isabs(model) and (os.path.exists(model) or (root / model).exists()):
        inputs.append(("--model", model))
    for flag, value in inputs:
        if not value or value.startswith("s3://") or os.path.isabs(value):
            continue
        matches = [Path(match) for match in glob.glob(str(root / value), recursive=True)]
        if not matches:
            raise AiosError(f"{flag} {value}: not found in --working-dir {root} (the job reads relative paths "
                            f"from its upload); pass a path inside it, an absolute path on the cluster or s3://")
        left_out = next((path for path in matches if not _uploaded(root, path)), None)
        if left_out is not None:
            raise AiosError(f"{flag} {value}: {left_out.relative_to(root)} is not uploaded with --working-dir (left "
                            f"out by aios' excludes, .gitignore or .rayignore); move it, unignore it, or pass an "
                            f"absolute path on the cluster or s3://")
    for name in _OUTPUTS:
        value = getattr(config, name)
        if value and not value.startswith("s3://") and not os.path.isabs(value):
            flag = flag_name(name)
            raise AiosError(f"{flag} {value} is relative: with --working-dir the job runs in a temporary copy of "
                            f"{root} on the cluster, where it would be lost; pass {flag} s3://BUCKET/PREFIX or an "
                            f"absolute path on the cluster's disk")


def _uploaded(root: Path, path: Path) -> bool:
    """Whether Ray uploads `path` with working_dir `root`: no exclude pattern and no .gitignore/.rayignore of a
    folder on the way matches it or a folder above it (the rules of Ray's packaging, which this follows)."""
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    root, path = root.absolute(), path.absolute()
    excludes = [_get_excludes(root, list(WORKING_DIR_EXCLUDES))]
    chain = [*reversed(path.relative_to(root).parents), path.relative_to(root)]  # ".", "a", "a/b", ..., path
    for relative in chain:
        current = root / relative
        if any(exclude(current) for exclude in excludes) and current != root:
            return False
        if current.is_dir():
            excludes.extend(get_excludes_from_ignore_files(current, include_gitignore=include_gitignore,
                                                           logger=_quiet_logger()))
    return True


def _quiet_logger() -> logging.Logger:
    logger = logging.getLogger("aios.submit.ignore-files")
    logger.setLevel(logging.WARNING)
    return logger


# ---- submitting -----------------------------------------------------------------------------------------

def run_jobs(jobs: list, spec: JobSpec) -> list:
    """The jobs (of `jobs`, as list_jobs returns them) of the run `spec` submits, oldest first: the run and
    brain names of their metadata (a run name belongs to its brain; submission ids are only ids)."""
    mine = [job for job in jobs if (job.metadata or {}).get(RUN_KEY) == spec.run
            and (job.metadata or {}).get(BRAIN_KEY) == spec.metadata[BRAIN_KEY]]
    return sorted(mine, key=lambda job: job.start_time or 0)


def _active(jobs: list):
    active = [job for job in jobs if str(job.status) in ACTIVE]
    return active[-1] if active else None


@dataclass(frozen=True)
class Submitted:
    job_id: str
    submitted: bool  # False: the run was already pending or running as job_id
    previous: object | None  # the run's latest job before this one (JobDetails)


def submit(client, spec: JobSpec) -> Submitted:
    """Submit `spec` unless a job of its run is pending or running (then that job is reported); never fails on
    a taken submission id."""
    for _ in range(3):  # another submitter may take the id between the listing and the submission
        jobs = call("listing the cluster's jobs", client.list_jobs)
        mine = run_jobs(jobs, spec)
        active = _active(mine)
        if active is not None:  # (also when another submitter has just submitted this run)
            return Submitted(job_id=active.submission_id, submitted=False, previous=active)
        job_id = _free_id(spec.run, {job.submission_id for job in jobs})
        try:
            client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env, metadata=spec.metadata,
                              submission_id=job_id)
        except RuntimeError as exc:
            if "already exists" in str(exc):
                continue  # taken since the listing: look again
            raise AiosError(f"submitting run {spec.run}: {_first_line(exc)}") from None
        except (OSError, _request_errors()) as exc:
            raise AiosError(f"submitting run {spec.run}: the cluster stopped answering ({_first_line(exc)})") from None
        return Submitted(job_id=job_id, submitted=True, previous=mine[-1] if mine else None)
    raise AiosError(f"submitting run {spec.run}: its submission ids kept being taken by other submitters; retry")


def _free_id(run: str, taken: set[str]) -> str:
    if run not in taken:
        return run
    n = 2
    while f"{run}-{n}" in taken:
        n += 1
    return f"{run}-{n}"


# ---- watching -------------------------------------------------------------------------------------------

def follow_logs(client, job_id: str, out: TextIO = sys.stdout) -> None:
    """Stream the job's log until the job ends (from its beginning)."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # not its "WebSocket closed"
    try:
        asyncio.run(tail())
    except (RuntimeError, OSError, _client_errors()) as exc:  # the connection closed before the job ended
        raise AiosError(f"following job {job_id}: {_first_line(exc)}; `aios jobs logs {job_id}` shows what "
                        f"was written") from None


def _client_errors() -> type[Exception]:
    import aiohttp

    return aiohttp.ClientError


def wait_for_end(client, job_id: str, *, poll_s: float = 1.0, say=None) -> str:
    """Wait until the job reaches a terminal status; `say(status)` on each change. Returns the status."""
    last = None
    while True:
        status = str(call(f"job {job_id}", client.get_job_status, job_id))
        if status != last and say is not None:
            say(status)
        last = status
        if status not in ACTIVE:
            return status
        time.sleep(poll_s)


def describe(job) -> dict:
    """A job's facts, for `aios jobs status` (JSON)."""
    metadata = job.metadata or {}
    return {
        "job": job.submission_id, "status": str(job.status), "run": metadata.get(RUN_KEY),
        "brain": metadata.get(BRAIN_KEY), "message": job.message, "entrypoint": job.entrypoint,
        "start_time": _iso(job.start_time), "end_time": _iso(job.end_time),
        "driver_exit_code": job.driver_exit_code,
    }


def _iso(millis: int | None) -> str | None:
    if not millis:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(millis / 1000))


def check_required_env() -> None:
    """In the job: the variables `aios submit --require-env` named must be set (the cluster provides them)."""
    names = [name for name in os.environ.get(REQUIRED_ENV, "").split(",") if name]
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        raise AiosError(f"the cluster does not provide {', '.join(missing)} in the job's environment (aios submit "
                        f"--require-env): set {'them' if len(missing) > 1 else 'it'} where the Ray nodes start, e.g. "
                        f"in the Kubernetes Secret the helm chart mounts with envFrom")
