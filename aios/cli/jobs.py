"""`aios submit` (a train-actv1 run as a Ray job on a remote cluster) and `aios jobs list|status|logs|stop`.

`submit` takes every train-actv1 flag (generated from TrainingConfig, as train-actv1's are) plus its own,
validates them here, and sends `aios hrm-hf train-actv1 <the resolved flags> --run-name RUN` to the cluster;
see aios/cluster/submit.py for what is submitted and how a run's jobs are found again.
"""

from __future__ import annotations

import inspect
import json
from typing import Annotated, Any

import typer

from aios.cli.app import App
from aios.cli.hrm_hf import _COMMAND_PARAMETERS, resolve_config
from aios.cli.options import with_config_options
from aios.config.training import TrainingConfig
from aios.errors import AiosError

app = App(no_args_is_help=True)

_PANEL = "Submit"
_ADDRESS_HELP = ("The Ray head's dashboard (Jobs API) address, e.g. http://10.0.0.5:8265 or, port-forwarded, "
                 "http://127.0.0.1:8265; default: $RAY_API_SERVER_ADDRESS, else an http:// $RAY_ADDRESS.")
AddressOption = Annotated[str | None, typer.Option("--address", help=_ADDRESS_HELP, rich_help_panel=_PANEL)]


def _option(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


_SUBMIT_PARAMETERS = [
    *[p for p in _COMMAND_PARAMETERS if p.name != "print_config"],
    _option("address", AddressOption, None),
    _option("working_dir", Annotated[str | None, typer.Option(
        "--working-dir", metavar="DIR", rich_help_panel=_PANEL,
        help="Upload DIR as the job's working directory (Ray's runtime_env working_dir; .git, .venv, artifacts/ "
             "and caches are left out): relative --dataset-file/--eval-file paths are looked for in it. Without "
             "it every path is the cluster's.")], None),
    _option("require_env", Annotated[list[str] | None, typer.Option(
        "--require-env", metavar="NAME", rich_help_panel=_PANEL,
        help="A variable the cluster must provide to the job (e.g. AWS_SECRET_ACCESS_KEY from a Secret); "
             "repeatable. Only the name is sent; the job refuses to start without it.")], None),
    _option("stop_grace_s", Annotated[int, typer.Option(
        "--stop-grace-s", min=1, rich_help_panel=_PANEL,
        help="On `aios jobs stop`: seconds the run has to finish its step and checkpoint before Ray kills it.")],
        120),
    _option("wait", Annotated[bool, typer.Option(
        "--wait/--no-wait", rich_help_panel=_PANEL,
        help="Wait for the job to end (exit 0 when it succeeded); Ctrl-C detaches, the job keeps running.")], True),
    _option("follow", Annotated[bool, typer.Option(
        "--follow", rich_help_panel=_PANEL, help="Stream the job's log while waiting (implies --wait).")], False),
    _option("dry_run", Annotated[bool, typer.Option(
        "--dry-run", rich_help_panel=_PANEL,
        help="Print the job (entrypoint, runtime env, metadata) as JSON and submit nothing.")], False),
]


@with_config_options(TrainingConfig, _SUBMIT_PARAMETERS)
def submit_command(ctx: typer.Context, config: str | None, address: str | None, working_dir: str | None,
                   require_env: list[str] | None, stop_grace_s: int, wait: bool, follow: bool, dry_run: bool,
                   **flag_values: Any) -> None:
    """Submit a train-actv1 run to a Ray cluster as a Ray job (every train-actv1 flag is accepted).

    The run name (--run-name, default the brain name) is the job's submission id: submitting a run that is
    running reports it; one that stopped or failed is submitted again and continues from its checkpoint.
    """
    from aios.cluster import submit as jobs

    training_config = resolve_config(ctx, config, flag_values, check_paths=False)  # the paths are the cluster's
    spec = jobs.job_spec(training_config, working_dir=working_dir, required_env=require_env or [],
                         stop_grace_s=stop_grace_s)
    if dry_run:
        typer.echo(json.dumps({"entrypoint": spec.entrypoint, "runtime_env": spec.runtime_env,
                               "metadata": spec.metadata}, indent=2))
        return
    client = jobs.connect(address)
    outcome = jobs.submit(client, spec)
    previous = outcome.previous
    if not outcome.submitted:
        typer.echo(f"run {spec.run} is already {previous.status} as job {outcome.job_id}: nothing submitted")
    elif previous is not None:
        typer.echo(f"submitted job {outcome.job_id}: it continues run {spec.run} from its newest checkpoint, if "
                   f"it has one (job {previous.submission_id} {previous.status})")
    else:
        typer.echo(f"submitted run {spec.run} as job {outcome.job_id}")
    typer.echo(f"Ray dashboard: {jobs.dashboard_url(client, outcome.job_id)}")
    if not (wait or follow):
        typer.echo(f"watch it: aios jobs logs {outcome.job_id} --follow --address {client.get_address()}")
        return
    _watch(client, outcome.job_id, follow=follow)


def _watch(client, job_id: str, *, follow: bool) -> None:
    """Wait for the job's end (streaming its log with `follow`); exit non-zero unless it succeeded."""
    from aios.cluster import submit as jobs

    try:
        if follow:
            jobs.follow_logs(client, job_id)
        status = jobs.wait_for_end(client, job_id, say=None if follow else
                                   (lambda status: typer.echo(f"job {job_id}: {status}", err=True)))
    except KeyboardInterrupt:
        typer.echo(f"detached from job {job_id}, which keeps running: aios jobs logs {job_id} --follow; "
                   f"aios jobs stop {job_id}", err=True)
        raise typer.Exit(130) from None
    if status == "SUCCEEDED":
        typer.echo(f"job {job_id} SUCCEEDED")
        return
    info = jobs.call(f"job {job_id}", client.get_job_info, job_id)
    typer.echo(f"job {job_id} {status}: {(info.message or '').strip()} (aios jobs logs {job_id}; submitting the "
               f"run again continues it from its newest checkpoint)", err=True)
    raise typer.Exit(1)


@app.callback()
def _jobs() -> None:
    """The Ray jobs of a cluster: list, status, logs, stop."""


@app.command("list")
def list_command(
    address: AddressOption = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="Every job of the cluster, not only aios runs.")] = False,
) -> None:
    """The cluster's aios jobs, oldest first: job id, status, run, brain, start time."""
    from aios.cluster import submit as jobs

    client = jobs.connect(address)
    found = sorted(jobs.call("listing the cluster's jobs", client.list_jobs), key=lambda job: job.start_time or 0)
    rows = [jobs.describe(job) for job in found if all_jobs or (job.metadata or {}).get(jobs.RUN_KEY)]
    if not rows:
        typer.echo("no aios jobs on this cluster" + ("" if all_jobs else " (--all lists every job)"))
        return
    header = ("JOB", "STATUS", "RUN", "BRAIN", "STARTED")
    table = [header, *[(row["job"] or "-", row["status"], row["run"] or "-", row["brain"] or "-",
                        row["start_time"] or "-") for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


@app.command("status")
def status_command(job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's submission id.")],
                   address: AddressOption = None) -> None:
    """A job's status, run, message and times (JSON)."""
    from aios.cluster import submit as jobs

    client = jobs.connect(address)
    info = jobs.call(f"job {job_id}", client.get_job_info, job_id)
    typer.echo(json.dumps({**jobs.describe(info), "dashboard": jobs.dashboard_url(client, job_id)}, indent=2))


@app.command("logs")
def logs_command(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's submission id.")],
    address: AddressOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")] = False,
) -> None:
    """A job's log (its driver's output: the run's progress, evals and result)."""
    from aios.cluster import submit as jobs

    client = jobs.connect(address)
    if follow:
        jobs.call(f"job {job_id}", client.get_job_status, job_id)  # an unknown id: one line, not a websocket error
        try:
            jobs.follow_logs(client, job_id)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        return
    typer.echo(jobs.call(f"job {job_id}", client.get_job_logs, job_id), nl=False)


@app.command("stop")
def stop_command(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's submission id.")],
    address: AddressOption = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the job has stopped.")] = True,
) -> None:
    """Stop a job: the run finishes its step, checkpoints and ends (SIGTERM; Ray kills it after the job's
    --stop-grace-s). Submitting the run again continues it from that checkpoint."""
    from aios.cluster import submit as jobs

    client = jobs.connect(address)
    stopping = jobs.call(f"job {job_id}", client.stop_job, job_id)
    if not stopping:
        status = jobs.call(f"job {job_id}", client.get_job_status, job_id)
        typer.echo(f"job {job_id} is not running ({status}): nothing to stop")
        return
    if not wait:
        typer.echo(f"job {job_id}: stop requested")
        return
    try:
        status = jobs.wait_for_end(client, job_id)
    except KeyboardInterrupt:
        typer.echo(f"job {job_id}: the stop was requested; `aios jobs status {job_id}` shows when it has stopped",
                   err=True)
        raise typer.Exit(130) from None
    typer.echo(f"job {job_id} {status}")
    if status not in ("STOPPED", "SUCCEEDED"):
        raise AiosError(f"job {job_id} ended {status} while stopping; see aios jobs logs {job_id}")
