"""Generate typer options from a pydantic config: one list of fields, no hand-written flag list.

Each field of the config becomes one keyword parameter of the command function,
`Annotated[<field type>, typer.Option("--kebab-name", help=..., rich_help_panel=<group>)] = <default>`:
Literal fields become choices, booleans become `--x/--no-x`, defaults are shown in `--help`.
`with_config_options` installs those parameters as the function's signature, which is what typer reads.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

from aios.config.training import flag_name, negative_flag_name

F = TypeVar("F", bound=Callable[..., Any])

# Sources that mean "the user asked for this value" (as opposed to a default). Compared by name because
# typer ships its own copy of click, whose ParameterSource enum is not part of typer's public API.
_USER_SOURCES = frozenset({"COMMANDLINE", "ENVIRONMENT"})


def config_parameters(config_cls: type[BaseModel]) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of `config_cls`, in field order."""
    parameters = []
    for name, field in config_cls.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        decls = flag_name(name)
        if field.annotation in (bool, bool | None):
            decls = f"{flag_name(name)}/{negative_flag_name(name)}"
        option = typer.Option(
            decls,
            help=field.description,
            rich_help_panel=str(extra.get("group")) if extra.get("group") else None,
            show_default=field.default is not None,
        )
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=field.default,
                annotation=Annotated[field.annotation, option],
            )
        )
    return parameters


def with_config_options(config_cls: type[BaseModel], leading: Iterable[inspect.Parameter]) -> Callable[[F], F]:
    """Give the decorated function the signature `(*leading, *<one option per config field>)`.

    The function itself should accept `**settings`: typer passes every generated option by keyword.
    """

    def install(func: F) -> F:
        parameters = [*leading, *config_parameters(config_cls)]
        names = [p.name for p in parameters]
        assert len(names) == len(set(names)), f"a command option clashes with a config field: {names}"
        func.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        # typer also resolves annotations through typing.get_type_hints, which reads __annotations__.
        func.__annotations__ = {p.name: p.annotation for p in parameters if p.annotation is not p.empty}
        return func

    return install


def typed_by_user(ctx: typer.Context, names: Iterable[str]) -> set[str]:
    """The parameters among `names` whose value came from the command line (or environment), not a default."""
    typed = set()
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in _USER_SOURCES:
            typed.add(name)
    return typed


def finite_number(ctx: typer.Context, param: typer.CallbackParam, value: float | None) -> float | None:
    """A typer callback for float options: NaN and infinity are refused like any other bad value."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value!r} is not a finite number; pass e.g. 0.8")
    return value
