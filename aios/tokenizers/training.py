"""Train a byte-level BPE tokenizer (GPT-2 style) on text files and save it as a Hugging Face directory."""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from aios.atomic import install_dir, make_staging_dir
from aios.errors import AiosError
from aios.tokenizers.gpt2 import ENDOFTEXT

SPECIAL_TOKENS = (ENDOFTEXT,)  # id 0; serves as eos, bos, unk and pad
BYTE_ALPHABET_SIZE = 256  # byte-level BPE starts from one token per byte, so any text encodes
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)

# What save_pretrained and the common tokenizer formats write. An existing output directory is replaced
# only if it holds nothing else, so a typo like `--output .` cannot delete unrelated files.
_TOKENIZER_FILE_NAMES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
    }
)


def train_bpe_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int,
    output_dir: str | Path,
    *,
    min_frequency: int = 2,
    ascii_only: bool = False,
    show_progress: bool = False,
) -> Path:
    """Train a byte-level BPE on `files` and write it to `output_dir` (replaced whole). Returns the directory.

    `min_frequency`: a pair must occur at least this often to be merged. `ascii_only`: non-ASCII characters
    are left out of the training text, so every learned merge is ASCII; such characters still encode,
    byte by byte. The result may hold fewer than `vocab_size` tokens if the text has too few frequent pairs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    input_paths = _check_inputs(files)
    if vocab_size < MIN_VOCAB_SIZE:
        raise AiosError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"({BYTE_ALPHABET_SIZE} bytes + {len(SPECIAL_TOKENS)} special token); pass --vocab-size "
            f"{MIN_VOCAB_SIZE} or more"
        )
    if min_frequency < 1:
        raise AiosError(f"min frequency {min_frequency} must be at least 1: pass --min-frequency 1 or more")
    output_dir = Path(output_dir).expanduser()
    _check_output_dir(output_dir)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(_read_lines(input_paths, ascii_only=ascii_only), trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
    )
    staging = make_staging_dir(output_dir)
    try:
        wrapped.save_pretrained(str(staging))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    install_dir(staging, output_dir, replace=True)
    return output_dir


def _check_inputs(files: Sequence[str | Path]) -> list[Path]:
    if isinstance(files, (str, Path)):  # one file given bare, not in a list
        files = [files]
    if not files:
        raise AiosError("no training text given: pass one or more text files with --input")
    paths = [Path(f).expanduser() for f in files]
    for path in paths:
        if not path.exists():
            raise AiosError(f"training file '{path}' does not exist: pass an existing text file to --input")
        if not path.is_file():
            raise AiosError(
                f"training input '{path}' is not a file: pass text files (not directories) to --input"
            )
        if path.stat().st_size == 0:
            raise AiosError(f"training file '{path}' is empty: pass a text file with content to --input")
    return paths


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise AiosError(f"output '{output_dir}' is a file: pass a new or tokenizer directory to --output")
    if output_dir.is_dir():
        other_files = sorted(p.name for p in output_dir.iterdir() if p.name not in _TOKENIZER_FILE_NAMES)
        if other_files:
            raise AiosError(
                f"output directory '{output_dir}' holds files that are not tokenizer files "
                f"({', '.join(other_files[:5])}{', ...' if len(other_files) > 5 else ''}) "
                "and would be replaced: "
                "pass a new directory or an existing tokenizer directory to --output"
            )


def _read_lines(paths: list[Path], *, ascii_only: bool) -> Iterator[str]:
    """Stream the files line by line (newlines kept: the tokenizer should learn them too)."""
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    yield line.encode("ascii", "ignore").decode("ascii") if ascii_only else line
        except UnicodeDecodeError as exc:
            raise AiosError(
                f"training file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}): "
                "convert it to UTF-8 or leave it out"
            ) from None
