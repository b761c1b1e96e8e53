"""`App`: the typer app of every aios command group; its commands draw `--help` with `aios.cli.help`,
which stays readable at 80 columns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from aios.cli.help import print_help


class Command(TyperCommand):
    def format_help(self, ctx, formatter) -> None:
        print_help(self, ctx)


class Group(TyperGroup):
    def format_help(self, ctx, formatter) -> None:
        print_help(self, ctx)


class App(typer.Typer):
    """A typer app whose groups and commands draw --help with `aios.cli.help`."""

    def __init__(self, **settings: Any):
        super().__init__(cls=Group, pretty_exceptions_enable=False, **settings)

    def command(self, name: str | None = None, **settings: Any) -> Callable:
        return super().command(name, cls=Command, **settings)
