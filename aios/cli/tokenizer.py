"""`aios tokenizer ...`: train, inspect and use tokenizers, offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from aios.cli.app import App
from aios.tokenizers import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

app = App(no_args_is_help=True, help="Train, inspect and use tokenizers (offline).")

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Tokenizer: 'gpt2', a directory with tokenizer.json, a tokenizer.json file, "
        "or a Hugging Face id already in the local cache.",
    ),
]


@app.command()
def train(
    inputs: Annotated[
        list[Path],
        typer.Option("--input", "-i", help="UTF-8 text file to train on; repeat for several files."),
    ],
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="Number of tokens, including the 256 bytes and <|endoftext|>.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory to write the tokenizer to (replaced whole).")
    ],
    min_frequency: Annotated[
        int, typer.Option("--min-frequency", help="Merge a pair only if it occurs at least this often.")
    ] = 2,
    ascii_only: Annotated[
        bool,
        typer.Option(
            "--ascii-only",
            help="Learn merges from ASCII text only (other characters still encode, byte by byte).",
        ),
    ] = False,
) -> None:
    """Train a byte-level BPE tokenizer (GPT-2 style, <|endoftext|> = id 0) on text files."""
    # The trainer draws its own progress bars on stderr; off a terminal they are only noise.
    saved_dir = train_bpe_tokenizer(
        inputs,
        vocab_size,
        output,
        min_frequency=min_frequency,
        ascii_only=ascii_only,
        show_progress=sys.stderr.isatty(),
    )
    tok = load_tokenizer(str(saved_dir))
    typer.echo(f"Saved tokenizer to {saved_dir} (vocab size {len(tok)})")
    if len(tok) < vocab_size:
        typer.echo(
            f"Note: asked for {vocab_size} tokens; the text has only enough pairs occurring "
            f"{min_frequency}+ times for {len(tok)}."
        )


@app.command()
def encode(
    text: Annotated[str, typer.Argument(help="Text to encode, exactly as given (no special tokens added).")],
    model: ModelOption = "gpt2",
) -> None:
    """Print the token ids of TEXT as a JSON list."""
    tok = load_tokenizer(model)
    typer.echo(json.dumps(tok.encode(text, add_special_tokens=False)))


@app.command()
def info(model: ModelOption = "gpt2") -> None:
    """Print a tokenizer's class, vocab size, eos/pad ids, fingerprint and source directory."""
    tok = load_tokenizer(model)
    rows = {
        "class": type(tok).__name__,
        "vocab size": str(len(tok)),
        "eos": f"{tok.eos_token_id} {tok.eos_token!r}",
        "pad": f"{tok.pad_token_id} {tok.pad_token!r}",
        "fingerprint": tokenizer_fingerprint(tok),
        "source": str(tok.name_or_path),
    }
    width = max(len(key) for key in rows)
    for key, value in rows.items():
        typer.echo(f"{key + ':':<{width + 1}} {value}")
