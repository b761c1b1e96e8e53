"""The `aios` command line: one typer app with a sub-app per area."""

from __future__ import annotations

import logging
import os
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler

from aios import __version__
from aios.cli.app import DEBUG_HELP, App, debug_enabled, set_debug
from aios.errors import AiosError, Terminated

# Nothing is ever downloaded at run time: tokenizers and models resolve from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

err_console = Console(stderr=True)

app = App(
    name="aios",
    help="Train Hierarchical Reasoning Models (HRM ACT v1) on text.",
    no_args_is_help=True,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aios {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP + " Also accepted after the subcommand."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    set_debug(debug)  # a subcommand's own --debug, parsed after this, can still turn it on
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)])


def _register() -> None:
    from aios.cli import brains, data, hrm_hf, jobs, tokenizer

    app.add_typer(hrm_hf.app, name="hrm-hf", help="HRM models with Hugging Face tokenizers: train, generate, eval.")
    app.add_typer(tokenizer.app, name="tokenizer", help="Train, inspect and use tokenizers (offline).")
    app.add_typer(data.app, name="data", help="Prepare and inspect tokenized training data.")
    app.add_typer(brains.app, name="brains", help="List, inspect, plot, push and pull brain bundles.")
    app.command("submit")(jobs.submit_command)
    app.add_typer(jobs.app, name="jobs", help="The Ray jobs of a cluster: list, status, logs, stop.")


_register()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: user errors become one red line and a non-zero exit code."""
    set_debug(False)
    try:
        app(args=argv, standalone_mode=True)
    except AiosError as exc:
        if debug_enabled():
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except Terminated as exc:  # before training began: nothing was trained or written
        err_console.print(f"[bold]stopped:[/] {exc.signal_name} before training started; nothing was trained",
                          highlight=False)
        return 0
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        err_console.print("[bold red]interrupted[/]", highlight=False)
        return 130
    except SystemExit as exc:  # typer/click exit codes pass through
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
