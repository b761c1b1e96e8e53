"""`--help` of every aios command: usage, description, one panel per option group, subcommands.

typer's own layout gives each option four columns (flag, short flag, `--no-` flag, value type) next to
its help. At 80 columns a pair like `--gradient-checkpointing/--no-gradient-checkpointing` then leaves
the help a few characters, and rich cuts flag names and defaults with "…". Here an option is two cells:
its flags and its help. The flag column is at least as wide as the longest single flag, and as wide as
the longest whole row of flags while that leaves the help two thirds of the width; the `--no-` form and
the value type join the flag's line when they fit and otherwise go on the next line, indented. The help
cell wraps (and folds a word longer than the cell), so nothing is ever cut.
"""

from __future__ import annotations

import inspect
import re
from collections import defaultdict
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

ARGUMENTS = "Arguments"
OPTIONS = "Options"
COMMANDS = "Commands"
_INDENT = "  "  # continuation lines of a flag cell
_PANEL_EDGES = 4  # a panel's border and padding, left and right
_GAP = 2  # between the flag cell and the help cell
_STYLES = {"flag": "bold cyan", "negative": "bold magenta", "value": "yellow", "extra": "dim"}


def print_help(command: Any, ctx: Any) -> None:
    """Print the help page of a click `command` (as typer builds it) for `ctx` to stdout.

    Printed, not returned, as typer's own help is: typer shows the help for a bare group command
    (`no_args_is_help`) by calling `ctx.get_help()` and discarding the text.
    """
    console = Console(highlight=False)  # width: $COLUMNS, else the terminal, else 80
    inner = console.width - _PANEL_EDGES
    console.print(Padding(Text(command.get_usage(ctx), style="bold"), (1, 1)))
    description = _paragraphs(command.help or "")
    if description:
        text = Text(description[0])
        for paragraph in description[1:]:
            text.append("\n\n" + paragraph, style="dim")
        console.print(Padding(text, (0, 1, 1, 1)))
    panels = _option_panels(command, ctx)
    rows = [cells for panel in panels.values() for cells, _ in panel]
    if rows:
        # Every piece must fit whole; whole rows on one line as long as the help keeps 2/3 of the width.
        width = max(max(map(_widest_piece, rows)), min(max(map(_one_line, rows)), inner // 3))
        help_width = inner - width - _GAP
        for title, panel in panels.items():
            console.print(_panel(title, [(_flag_cell(cells, width), _help_cell(help_text, extra, help_width,
                                                                               console))
                                         for cells, (help_text, extra) in panel], width))
    commands = _command_rows(command, ctx)
    if commands:
        names = max(len(name) for name, _ in commands)
        console.print(_panel(COMMANDS, [(Text(name, style=_STYLES["flag"]), Text(help_text))
                                        for name, help_text in commands], names))
    if command.epilog:
        console.print(Padding(Text(" ".join(command.epilog.split())), (1, 1)))


def _paragraphs(text: str) -> list[str]:
    """Docstring-style help as paragraphs, single line breaks joined (text after a \\f line dropped)."""
    text = inspect.cleandoc(text).partition("\f")[0]
    return [" ".join(paragraph.split()) for paragraph in text.split("\n\n") if paragraph.strip()]


# ---- options ----------------------------------------------------------------------------------------

# One flag cell: (text, style) pieces; the first piece starts the cell, each later one joins the current
# line when it fits and otherwise starts an indented line.
Cells = list[tuple[str, str]]


def _option_panels(command: Any, ctx: Any) -> dict[str, list[tuple[Cells, tuple[str, str]]]]:
    """Panel title -> rows of (flag cell pieces, (help, [default: ...])), in typer's order: arguments, then
    options, each with the default panel first, then the named panels in the order of their first member."""
    arguments: dict[str, list] = defaultdict(list)
    options: dict[str, list] = defaultdict(list)
    arguments[ARGUMENTS], options[OPTIONS] = [], []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None or getattr(param, "hidden", False):
            continue
        is_argument = param.param_type_name == "argument"
        panel = getattr(param, "rich_help_panel", None) or (ARGUMENTS if is_argument else OPTIONS)
        (arguments if is_argument else options)[panel].append((_flag_pieces(param, ctx), _split_extra(record[1])))
    return {title: rows for title, rows in (*arguments.items(), *options.items()) if rows}


def _flag_pieces(param: Any, ctx: Any) -> Cells:
    pieces: Cells = [(_join_names(param.opts), "flag")]
    if param.secondary_opts:
        pieces.append(("/ " + _join_names(param.secondary_opts), "negative"))
    if not (getattr(param, "is_flag", False) or getattr(param, "count", False)):
        value = param.display_type_rich(ctx)  # what get_help_record shows: <int>, <lines|document>, FILE.yaml
        if value:
            pieces.append((str(value), "value"))
    return pieces


def _join_names(names: list[str]) -> str:
    return ", ".join(sorted(names, key=lambda name: name.startswith("--")))  # -m, --model


def _widest_piece(pieces: Cells) -> int:
    """The narrowest flag column that shows every piece whole: the longest piece on a line of its own."""
    first, *rest = pieces
    return max([len(first[0]), *(len(_INDENT + _strip_slash(text)) for text, _ in rest)])


def _one_line(pieces: Cells) -> int:
    return len(" ".join(text for text, _ in pieces))


def _strip_slash(text: str) -> str:
    return text.removeprefix("/ ")


def _flag_cell(pieces: Cells, width: int) -> Text:
    cell = Text(no_wrap=True)
    line = 0
    for i, (text, style) in enumerate(pieces):
        if i == 0:
            cell.append(text, style=_STYLES[style])
            line = len(text)
        elif line + 1 + len(text) <= width:
            cell.append(" " + text, style=_STYLES[style])
            line += 1 + len(text)
        else:
            text = _INDENT + _strip_slash(text)
            cell.append("\n" + text, style=_STYLES[style])
            line = len(text)
    return cell


def _split_extra(help_text: str) -> tuple[str, str]:
    """click's help record `"Help.  [default: 8]"` -> ("Help.", "[default: 8]")."""
    match = re.search(r"(?:^|\s\s)(\[[^\[\]]*\])$", help_text)
    if not match:
        return " ".join(help_text.split()), ""
    return " ".join(help_text[:match.start()].split()), match.group(1)


def _help_cell(help_text: str, extra: str, width: int, console: Console) -> Text:
    """The help, then its [default: ...] on the same line when it fits there, else on a line of its own."""
    text = Text(help_text)
    if extra:
        last_line = text.wrap(console, width)[-1].cell_len if help_text else 0
        separator = "" if not help_text else (" " if last_line + 1 + len(extra) <= width else "\n")
        text.append(separator + extra, style=_STYLES["extra"])
    return text


# ---- subcommands ------------------------------------------------------------------------------------

def _command_rows(command: Any, ctx: Any) -> list[tuple[str, str]]:
    if not hasattr(command, "list_commands"):
        return []
    rows = []
    for name in command.list_commands(ctx):
        sub = command.get_command(ctx, name)
        if sub is not None and not sub.hidden:
            rows.append((name, (_paragraphs(sub.short_help or sub.help or "") or [""])[0]))
    return rows


def _panel(title: str, rows: list[tuple[Text, Text]], first_width: int) -> Panel:
    table = Table.grid(padding=(0, 2), expand=True)
    table.add_column(no_wrap=True, width=first_width)
    table.add_column(ratio=1, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return Panel(table, title=title, title_align="left", border_style="dim")
