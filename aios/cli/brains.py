"""`aios brains ...`: list and inspect brain bundles."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from aios.bundle import BrainBundle, list_bundles
from aios.cli.app import App
from aios.errors import AiosError
from aios.paths import DEFAULT_BUNDLE_DIR

app = App(no_args_is_help=True)
console = Console()

BundleDir = Annotated[str, typer.Option("--bundle-dir", help="Directory that holds brain bundles.")]


@app.command("list")
def list_command(bundle_dir: BundleDir = DEFAULT_BUNDLE_DIR) -> None:
    """Every bundle under --bundle-dir with its steps, size and last evaluation."""
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
def show_command(name: Annotated[str, typer.Argument(help="Bundle name or directory.")],
                 bundle_dir: BundleDir = DEFAULT_BUNDLE_DIR) -> None:
    """Metadata, model config, data progress and checkpoints of one bundle (JSON)."""
    from aios.train.checkpoint import list_checkpoints, verify_checkpoint

    bundle = BrainBundle.open(name, bundle_dir)
    checkpoints = [{"name": p.name, "status": verify_checkpoint(p) or "complete"}
                   for p in list_checkpoints(bundle.checkpoints_dir)]
    info = {"path": str(bundle.root), "metadata": bundle.metadata(),
            "config": json.loads((bundle.root / "config.json").read_text()),
            "chunk_tracker_state": bundle.tracker(), "checkpoints": checkpoints}
    typer.echo(json.dumps(info, indent=2))
