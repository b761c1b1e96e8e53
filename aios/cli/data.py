"""`aios data ...`: prepare a text dataset into packed chunk files, inspect a prepared one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from aios.cli.app import App
from aios.data import (
    DEFAULT_CACHE_DIR,
    PreparedDataset,
    PrepareOptions,
    flags,
    prepare_dataset,
    warn_unused_options,
)
from aios.data.sampler import distinct_chunks_per_step
from aios.tokenizers import load_tokenizer

app = App(no_args_is_help=True, help="Prepare text datasets (tokenise once, pack, shard by chunk) and inspect them.")
console = Console()


@app.command()
def prepare(
    dataset_file: Annotated[
        str,
        typer.Option(
            "--dataset-file",
            help="A .txt/.jsonl/.csv file, a directory of them (recursive) or a quoted glob.",
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="Tokenizer: 'gpt2', a tokenizer directory or tokenizer.json file."
        ),
    ],
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", help="Tokens per training sequence.")],
    dataset_chunk_size: Annotated[
        int, typer.Option("--dataset-chunk-size", help="Sequences per chunk file (the unit of sharding).")
    ],
    cache_dir: Annotated[
        Path, typer.Option("--cache-dir", help="Where prepared datasets live, one folder per fingerprint.")
    ] = DEFAULT_CACHE_DIR,
    text_mode: Annotated[
        Literal["lines", "document"],
        typer.Option(
            "--text-mode", help=".txt files: one sample per non-blank line, or the whole file as one."
        ),
    ] = "lines",
    text_field: Annotated[
        str, typer.Option("--text-field", help="The text field of .jsonl records / the text column of .csv.")
    ] = "text",
    ascii_only: Annotated[
        bool, typer.Option("--ascii-only", help="Drop samples containing non-ASCII characters (counted).")
    ] = False,
    holdout_fraction: Annotated[
        float,
        typer.Option(
            "--holdout-fraction", help="Hold out this last fraction of the sequences for evaluation."
        ),
    ] = 0.0,
) -> None:
    """Tokenise a dataset once into packed (max_seq_len + 1)-token windows; reuse it when nothing changed."""
    tokenizer = load_tokenizer(model)
    options = PrepareOptions(
        max_seq_len=max_seq_len,
        chunk_size=dataset_chunk_size,
        text_mode=text_mode,
        text_field=text_field,
        ascii_only=ascii_only,
        holdout_fraction=holdout_fraction,
    )
    dataset = prepare_dataset(
        dataset_file, tokenizer, model, options, flags=flags.PREPARE, cache_dir=cache_dir, progress=True
    )
    warn_unused_options(options, [dataset], flags.PREPARE)
    counts = dataset.manifest["counts"]
    console.print(f"prepared dataset: {dataset.path}", highlight=False, soft_wrap=True)
    console.print(
        f"{counts['samples_read']} samples ({counts['samples_dropped_non_ascii']} dropped non-ASCII), "
        f"{counts['tokens']} tokens -> {dataset.num_sequences} sequences of {dataset.window} tokens "
        f"in {dataset.num_chunks} chunks ({dataset.num_train} train, {dataset.num_holdout} held out; "
        f"{counts['tokens_dropped_tail']} tail tokens dropped)",
        highlight=False,
    )


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A prepared dataset directory or its manifest.json.")],
    global_batch: Annotated[int, typer.Option(min=1, help="Rows per optimizer step, for the mixing figure "
                                                          "(--batch-size x accumulation x workers).")] = 16,
) -> None:
    """Summarise a prepared dataset: tokenizer, sequence length, chunks, counts, sources, batch mixing."""
    dataset = PreparedDataset(path)
    m = dataset.manifest
    counts, tokenizer, options = m["counts"], m["tokenizer"], m["text_options"]
    table = Table(title=f"prepared dataset {dataset.path}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("fingerprint", m["fingerprint"]),
        ("created", m["created"]),
        ("tokenizer", f"{tokenizer['name']} (vocab {tokenizer['vocab_size']}, eos {tokenizer['eos_id']})"),
        ("tokenizer fingerprint", tokenizer["fingerprint"]),
        ("seq len / window", f"{m['seq_len']} / {m['window']} ({m['dtype']})"),
        ("chunks", f"{dataset.num_chunks} of {m['chunk_size']} sequences"),
        ("sequences", f"{dataset.num_sequences} ({dataset.num_train} train, {dataset.num_holdout} held out)"),
        ("tokens", f"{counts['tokens']} ({counts['tokens_dropped_tail']} dropped at the tail)"),
        (
            "samples",
            f"{counts['samples_read']} read, {counts['samples_dropped_non_ascii']} dropped non-ASCII",
        ),
        ("text options", ", ".join(f"{k}={v}" for k, v in options.items())),
        ("mixing", f"{distinct_chunks_per_step(dataset, global_batch):.1f} distinct chunks per global batch of "
                   f"{global_batch} rows (at most {min(int((dataset.train_sizes() > 0).sum()), global_batch)}; "
                   f"--global-batch)"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    for source in m["sources"]:
        table.add_row(
            "source", f"{source['name']} ({source['size']} bytes, sha256 {source['sha256'][:12]}...)"
        )
    console.print(table)
