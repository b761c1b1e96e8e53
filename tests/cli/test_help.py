"""`--help` of every command, drawn by the real console script at 80 columns: nothing cut, every flag whole."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from aios.cli.main import app

REPO = Path(__file__).resolve().parents[2]
ROOT = typer.main.get_command(app)

# The commands the README documents; the test below also covers any command added later.
DOCUMENTED = {(), ("hrm-hf", "train-actv1"), ("hrm-hf", "generate"), ("hrm-hf", "eval"), ("brains", "list"),
              ("brains", "show"), ("brains", "plot"), ("data", "prepare"), ("data", "inspect"),
              ("tokenizer", "train"), ("tokenizer", "encode"), ("tokenizer", "info")}


def command_tree(command=ROOT, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    tree = {path: command}
    for name, sub in getattr(command, "commands", {}).items():
        tree.update(command_tree(sub, (*path, name)))
    return tree


TREE = command_tree()


def help_at_80_columns(path: tuple[str, ...]) -> str:
    result = subprocess.run([sys.executable, "-m", "aios.cli.main", *path, "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "COLUMNS": "80", "NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_documented_command_is_in_the_tree():
    assert DOCUMENTED <= set(TREE)


@pytest.mark.parametrize("path", sorted(TREE), ids=lambda path: " ".join(path) or "aios")
def test_help_at_80_columns_shows_every_flag_and_help_word_whole(path):
    text = help_at_80_columns(path)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    tokens = set(re.findall(r"(?<![\w-])-{1,2}[A-Za-z0-9][\w-]*", text))
    words = set(text.split())
    command = TREE[path]
    for param in command.params:
        if param.param_type_name == "option":
            for flag in [*param.opts, *param.secondary_opts]:
                assert flag in tokens, f"{flag} is not shown whole"
        for word in (param.help or "").split():
            assert word in words, f"{word!r} of the help of {param.name} is missing or cut"
    assert "--help" in tokens
    if path and not hasattr(command, "commands"):  # a command, not a group: --debug after it works too
        assert "--debug" in tokens
    for name, sub in getattr(command, "commands", {}).items():
        assert name in words
        summary = (sub.help or "").split("\n\n")[0]
        assert all(word in words for word in summary.split()), f"the summary of {name} is cut"


def test_a_long_flag_pair_keeps_its_help_in_a_wide_column():
    # The widest flags of train-actv1 (29 characters) leave the help 45 of the 80 columns.
    text = help_at_80_columns(("hrm-hf", "train-actv1"))
    row = next(i for i, line in enumerate(text.splitlines()) if "--gradient-checkpointing " in line)
    lines = text.splitlines()
    assert lines[row].startswith("│ --gradient-checkpointing ")
    assert lines[row + 1].startswith("│   --no-gradient-checkpointing  ")  # the off switch, on the next line
    help_column = lines[row].index("Recompute")
    assert len(lines[row]) - 2 - help_column >= 45
