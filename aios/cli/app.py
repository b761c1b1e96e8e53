"""`App`: the typer app of every aios command group.

Two things every command gets from it:

- `--help` drawn by `aios.cli.help`, which stays readable at 80 columns;
- `--debug`, accepted after the subcommand as well as before it (`aios --debug brains show x` and
  `aios brains show x --debug`): user errors (`AiosError`) then show their traceback. `aios.cli.main`
  asks `debug_enabled()` when it catches one.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from aios.cli.help import print_help

DEBUG_HELP = "Show full tracebacks for errors."

_debug = {"enabled": False}


def debug_enabled() -> bool:
    return _debug["enabled"]


def set_debug(enabled: bool) -> None:
    _debug["enabled"] = enabled
    if enabled:
        logging.getLogger().setLevel(logging.DEBUG)


def _debug_flag(value: bool) -> bool:
    if value:  # --debug given to a subcommand: on, whatever the group before it said
        set_debug(True)
    return value


DebugOption = Annotated[bool, typer.Option("--debug", help=DEBUG_HELP, is_eager=True, callback=_debug_flag)]


class Command(TyperCommand):
    def format_help(self, ctx, formatter) -> None:
        print_help(self, ctx)


class Group(TyperGroup):
    def format_help(self, ctx, formatter) -> None:
        print_help(self, ctx)


class App(typer.Typer):
    """A typer app whose commands take --debug and draw --help with `aios.cli.help`."""

    def __init__(self, **settings: Any):
        super().__init__(cls=Group, pretty_exceptions_enable=False, **settings)

    def command(self, name: str | None = None, **settings: Any) -> Callable:
        register = super().command(name, cls=Command, **settings)

        def decorator(func: Callable) -> Callable:
            register(_with_debug_option(func))
            return func

        return decorator


def _with_debug_option(func: Callable) -> Callable:
    """`func` with one more keyword parameter, the --debug option, which it never sees."""
    signature = inspect.signature(func, eval_str=True)
    assert "debug" not in signature.parameters, f"{func.__name__} declares its own --debug"

    @functools.wraps(func)
    def command(*, debug: bool = False, **kwargs: Any) -> Any:  # typer passes every parameter by keyword
        return func(**kwargs)

    parameters = [*signature.parameters.values(),
                  inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=DebugOption)]
    command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    # typer also resolves annotations through typing.get_type_hints, which reads __annotations__.
    command.__annotations__ = {p.name: p.annotation for p in parameters if p.annotation is not p.empty}
    return command
