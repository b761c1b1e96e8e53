"""`aios brains ...`: list, inspect and plot brain bundles; push and pull them to and from S3."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from aios.cli.app import App
from aios.errors import AiosError
from aios.paths import DEFAULT_BUNDLE_DIR

# aios.bundle (and torch with it) is imported inside the commands: `aios ... --help` must not pay for it.

app = App(no_args_is_help=True)
console = Console()

BundleDir = Annotated[str, typer.Option("--bundle-dir", help="Directory that holds brain bundles.")]
RemoteBundleDir = Annotated[str, typer.Option(
    "--bundle-dir", help="Directory that holds brain bundles: a local one, or s3://BUCKET/PREFIX.")]
EndpointUrl = Annotated[str | None, typer.Option(
    "--s3-endpoint-url", help="Endpoint of an S3-compatible service (MinIO, Ceph, R2); default: "
    "$AWS_ENDPOINT_URL, else AWS. Credentials: the standard AWS variables, profile or instance role.")]
BrainName = Annotated[str, typer.Argument(help="Bundle name under --bundle-dir, or a bundle directory.")]
MISSING = "-"  # what a field absent from an (older) bundle's files shows as


@app.command("list")
def list_command(bundle_dir: RemoteBundleDir = DEFAULT_BUNDLE_DIR, s3_endpoint_url: EndpointUrl = None) -> None:
    """Every bundle under --bundle-dir (local or s3://) with its steps, size and last evaluation."""
    from aios.bundle import list_bundles
    from aios.storage import is_remote

    if is_remote(bundle_dir):
        _list_remote(bundle_dir, s3_endpoint_url)
        return
    bundles = list_bundles(bundle_dir)
    if not bundles:
        typer.echo(f"no brain bundles in {bundle_dir}")
        return
    table = Table("name", "steps", "parameters", "eval loss", "updated", "status")
    for bundle in bundles:
        try:
            meta = bundle.metadata()
        except AiosError as exc:  # one broken bundle must not hide the others
            table.add_row(bundle.name, "-", "-", "-", "-", str(exc).split(":")[0])
            continue
        last_eval = meta.get("last_eval") or {}
        loss = f"{last_eval['loss']:.3f}" if "loss" in last_eval else "-"
        table.add_row(bundle.name, str(meta.get("steps", "-")), f"{meta.get('parameters', 0):,}", loss,
                      meta.get("updated", "-"), bundle.missing() or "ok")
    console.print(table)


@app.command("show")
def show_command(
    name: BrainName,
    bundle_dir: RemoteBundleDir = DEFAULT_BUNDLE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print everything as one JSON object instead.")] = False,
    s3_endpoint_url: EndpointUrl = None,
    local_bundle_dir: Annotated[str, typer.Option(
        "--local-bundle-dir", help="With an s3:// --bundle-dir: the local bundle directory whose .remote/ holds "
        "the copy shown (the one generate --brain s3://... opens).")] = DEFAULT_BUNDLE_DIR,
) -> None:
    """Summary of one bundle: metadata, model config, data progress and checkpoints (of an s3:// bundle dir:
    its newest version, through the local copy generate opens)."""
    from aios.bundle import BrainBundle
    from aios.storage import is_remote
    from aios.train.checkpoint import list_checkpoints, verify_checkpoint

    if is_remote(bundle_dir):
        from aios.bundle.remote import cached_brain

        bundle = cached_brain(f"{bundle_dir.rstrip('/')}/{name}", local_bundle_dir, s3_endpoint_url)
    else:
        if local_bundle_dir != DEFAULT_BUNDLE_DIR:
            raise AiosError("--local-bundle-dir has no effect with a local --bundle-dir; drop it")
        bundle = BrainBundle.open(name, bundle_dir)
    checkpoints = [{"name": p.name, "status": verify_checkpoint(p) or "complete"}
                   for p in list_checkpoints(bundle.checkpoints_dir)]
    info = {"path": str(bundle.root), "metadata": bundle.metadata(),
            "config": json.loads((bundle.root / "config.json").read_text()),
            "chunk_tracker_state": bundle.tracker(), "checkpoints": checkpoints}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for table in summary_tables(bundle.name, info):
        console.print(table)


@app.command("plot")
def plot_command(name: BrainName, bundle_dir: BundleDir = DEFAULT_BUNDLE_DIR) -> None:
    """Plot training loss, eval loss and ACT segments against step into <bundle>/training_curves.png."""
    from aios.bundle import BrainBundle
    from aios.bundle.plot import plot_training_curves

    bundle = BrainBundle.open(name, bundle_dir)
    typer.echo(str(plot_training_curves(bundle.root)))


def _list_remote(bundle_dir: str, endpoint_url: str | None) -> None:
    from aios.bundle.remote import list_remote
    from aios.storage import open_storage

    records = list_remote(open_storage(bundle_dir, endpoint_url))
    if not records:
        typer.echo(f"no brain bundles in {bundle_dir}")
        return
    table = Table("name", "steps", "parameters", "eval loss", "pushed", "files")
    for record in records:
        meta = record.get("metadata") or {}
        last_eval = meta.get("last_eval") or {}
        loss = f"{last_eval['loss']:.3f}" if "loss" in last_eval else "-"
        table.add_row(record["name"], str(meta.get("steps", "-")), f"{meta.get('parameters', 0):,}", loss,
                      record.get("pushed", "-"), str(len(record["files"])))
    console.print(table)


@app.command("push")
def push_command(
    name: BrainName,
    to: Annotated[str, typer.Option("--to", help="Remote bundle dir: s3://BUCKET/PREFIX.")],
    bundle_dir: BundleDir = DEFAULT_BUNDLE_DIR,
    s3_endpoint_url: EndpointUrl = None,
    checkpoints: Annotated[bool, typer.Option(
        "--checkpoints/--no-checkpoints", help="Push the full-state checkpoints too (needed to resume there).")] = True,
) -> None:
    """Upload a brain as a new version under --to; readers see the previous version until it is complete."""
    from aios.bundle import BrainBundle
    from aios.bundle.remote import push
    from aios.storage import is_remote, open_storage

    if not is_remote(to):
        raise AiosError(f"--to {to}: push goes to S3 (s3://BUCKET/PREFIX); a local copy of a bundle is a plain "
                        f"directory copy (cp -r)")
    bundle = BrainBundle.open(name, bundle_dir)
    remote = open_storage(to, s3_endpoint_url)
    record = push(bundle, remote, checkpoints=checkpoints)
    size = sum(f["size"] for f in record["files"].values())
    typer.echo(f"pushed {bundle.name} to {remote.describe(bundle.name)}: version {record['version']}, "
               f"{len(record['files'])} files, {size / 1e6:.1f} MB ({record['uploaded'] / 1e6:.1f} MB uploaded, "
               f"the rest held already)")


@app.command("pull")
def pull_command(
    source: Annotated[str, typer.Argument(help="The remote brain: s3://BUCKET/PREFIX/NAME.")],
    bundle_dir: BundleDir = DEFAULT_BUNDLE_DIR,
    s3_endpoint_url: EndpointUrl = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a local bundle of the same name.")] = False,
) -> None:
    """Download a pushed brain into --bundle-dir (checked file by file), where generate and eval open it."""
    from aios.bundle.remote import pull, split_remote_brain
    from aios.storage import open_storage

    parent, name = split_remote_brain(source)
    bundle = pull(open_storage(parent, s3_endpoint_url), name, bundle_dir, replace=force)
    typer.echo(f"pulled {source} into {bundle.root}")


# ---- `brains show`: the tables ------------------------------------------------------------------------

def summary_tables(name: str, info: dict) -> list[Table]:
    """The tables `brains show` prints for the JSON object `brains show --json` prints."""
    meta, config, tracker = (_mapping(info.get(key)) for key in ("metadata", "config", "chunk_tracker_state"))
    last_eval = _mapping(meta.get("last_eval"))
    datasets = _mapping(meta.get("datasets"))
    brain = _fields_table(f"brain {name}", [
        ("name", _text(meta.get("name"))),
        ("path", _text(info.get("path"))),
        ("steps", _count(meta.get("steps"))),
        ("sample tokens seen", _count(meta.get("sample_tokens_seen"))),  # data
        # compute (rows x tokens per step); bundles from before the split called it tokens_seen
        ("segment tokens seen", _count(meta.get("segment_tokens_seen", meta.get("tokens_seen")))),
        ("parameters", _count(meta.get("parameters"))),
        ("eval loss", _eval_loss(last_eval)),
        ("eval perplexity", _number(last_eval.get("perplexity"), ".1f")),
        ("eval token accuracy", _number(last_eval.get("token_accuracy"), ".3f")),
        ("created", _text(meta.get("created"))),
        ("updated", _text(meta.get("updated"))),
        ("tokenizer", _source(meta.get("tokenizer"), "name")),
        ("train data", _source(datasets.get("train"), "source")),
        ("eval data", _source(datasets.get("eval"), "source")),
        ("trained by", _run(meta.get("run"))),
    ])
    model = _fields_table("model", [
        ("hidden size D", _text(config.get("hidden_size"))),
        ("heads", _text(config.get("num_heads"))),
        ("layers H / L", _pair(config.get("H_layers"), config.get("L_layers"))),
        ("cycles H / L", _pair(config.get("H_cycles"), config.get("L_cycles"))),
        ("M (halt max steps)", _text(config.get("halt_max_steps"))),
        ("sequence length", _text(config.get("seq_len"))),
        ("vocabulary", _count(config.get("vocab_size"))),
        ("loss", _text(config.get("loss_type"))),
        ("MoE", _moe(config)),
    ])
    progress = _fields_table("data progress", [
        ("epoch", _text(tracker.get("epoch"))),
        ("partitions", _text(tracker.get("partitions"))),
        ("chunks completed", _of(tracker.get("chunks_completed"), tracker.get("total_chunks"))),
        ("sequences consumed", _passes(tracker.get("sequences_consumed"), tracker.get("total_train_sequences"))),
        ("updated", _text(tracker.get("updated"))),
    ])
    checkpoints = Table("checkpoint", "status", title="checkpoints", title_justify="left")
    for checkpoint in info.get("checkpoints") or []:
        checkpoints.add_row(checkpoint["name"], checkpoint["status"])
    if not checkpoints.row_count:
        checkpoints.add_row(MISSING, "none")
    return [brain, model, progress, checkpoints]


def _fields_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")  # long paths wrap instead of being cut
    for label, value in rows:
        table.add_row(label, value)
    return table


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: Any) -> str:
    return MISSING if value is None or value == "" else str(value)


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _text(value)


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if _is_number(value) else MISSING


def _pair(first: Any, second: Any) -> str:
    return MISSING if first is None and second is None else f"{_text(first)} / {_text(second)}"


def _of(done: Any, total: Any) -> str:
    return MISSING if done is None else f"{_count(done)} of {_count(total)}"


def _passes(consumed: Any, per_epoch: Any) -> str:
    """Sequences drawn over all epochs, and how many passes over the training data that is."""
    if consumed is None:
        return MISSING
    if not isinstance(per_epoch, int) or isinstance(per_epoch, bool) or per_epoch <= 0:
        return _count(consumed)
    return f"{_count(consumed)} ({consumed / per_epoch:.2f} passes over {_count(per_epoch)})"


def _eval_loss(last_eval: dict) -> str:
    loss = _number(last_eval.get("loss"), ".3f")
    step = last_eval.get("step")
    return f"{loss} (step {step:,})" if loss != MISSING and isinstance(step, int) else loss


def _source(entry: Any, name_key: str) -> str:
    """`name (fingerprint[:12])` of a tokenizer or dataset entry of metadata.json."""
    entry = _mapping(entry)
    name, fingerprint = entry.get(name_key), entry.get("fingerprint")
    if name is None and fingerprint is None:
        return MISSING
    return f"{_text(name)} ({str(fingerprint)[:12] if fingerprint else MISSING})"


def _moe(config: dict) -> str:
    if "use_moe" not in config:
        return MISSING
    if not config["use_moe"]:
        return "off"
    return f"{_text(config.get('num_experts'))} experts, top-{_text(config.get('num_experts_per_tok'))}"


def _run(run: object) -> str:
    """How the brain was last trained: "ray, 2 workers (run nightly-1, 1 restart)", "local, 1 worker"."""
    if not isinstance(run, dict) or not run.get("launcher"):
        return "-"
    workers = run.get("world_size")
    text = f"{run['launcher']}, {workers} worker{'s' if workers != 1 else ''}" if workers else str(run["launcher"])
    extra = []
    if run.get("run_name"):
        extra.append(f"run {run['run_name']}")
    if run.get("ray_restarts"):
        extra.append(f"{run['ray_restarts']} restart{'s' if run['ray_restarts'] != 1 else ''}")
    return text + (f" ({', '.join(extra)})" if extra else "")

