"""Prepare a text dataset once: tokenise, pack into fixed windows, store as chunk files.

    options = PrepareOptions(max_seq_len=256, chunk_size=1024, text_mode="document")
    prepared = prepare_dataset("training_data/curated_datasets/test_sample.txt", tok, "shakespeare-bpe-2k",
                               options, flags=PREPARE, cache_dir="artifacts/prepared_data")

Samples are tokenised in batches with the fast tokenizer, each document is followed by EOS, and the token
stream is cut into non-overlapping windows of max_seq_len + 1 tokens (input and shifted target of one
sequence; no padding). The tail that does not fill a window is dropped and counted. Windows are stored in
stored (document) order as `chunk-00000.npy`, ... of `chunk_size` windows each (the last may be shorter),
uint16 when the vocabulary fits, else uint32, next to `manifest.json`.

The prepared directory is `<cache_dir>/<fingerprint[:16]>/`, where the fingerprint hashes everything that
decides its content (source bytes and names, tokenizer, window, chunk size, the text options that apply to
the sources' formats, holdout, format version). An existing directory with a valid manifest is reused
without tokenising again; it is built in a staging directory and renamed in whole, so a crash never leaves
a half dataset that would be reused.

The last ceil(holdout_fraction * N) sequences are held out for evaluation: a contiguous tail of the text,
and since windows do not overlap, no held-out token is ever seen in training.

Errors name the flags of the calling command, passed as `flags` (see flags.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aios.atomic import atomic_write_text, install_dir, make_staging_dir
from aios.data.dataset import FORMAT_VERSION, MANIFEST_NAME, PreparedDataset, chunk_file_name
from aios.data.flags import DataFlags, either
from aios.data.sources import (
    OPTION_SUFFIXES,
    TEXT_MODES,
    ReadCounts,
    Segment,
    SourceFile,
    TextMode,
    inspect_source,
    iter_segments,
    option_applies,
)
from aios.errors import AiosError
from aios.paths import DEFAULT_DATA_CACHE_DIR
from aios.tokenizers import tokenizer_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(DEFAULT_DATA_CACHE_DIR)
TOKENIZE_BATCH_CHARS = 1 << 20  # characters per tokenizer call: large enough for the Rust threads
TOKENIZE_BATCH_SAMPLES = 4096


@dataclass(frozen=True)
class PrepareOptions:
    """How a source is turned into windows: everything besides the source and tokenizer that decides
    the prepared content, so all of it is part of the fingerprint (once `applied_to` the sources)."""

    max_seq_len: int
    chunk_size: int
    text_mode: TextMode = "lines"
    text_field: str = "text"
    ascii_only: bool = False
    holdout_fraction: float = 0.0

    def validate(self, flags: DataFlags) -> None:
        """Raise AiosError for the first option out of range."""

        def fix(flag: str | None, value: str) -> str:
            return f": pass {flag} {value}" if flag else ""

        if self.max_seq_len < 1:
            raise AiosError(
                f"max_seq_len must be at least 1, got {self.max_seq_len}{fix(flags.max_seq_len, '>= 1')}"
            )
        if self.chunk_size < 1:
            raise AiosError(
                f"dataset chunk size must be at least 1, got {self.chunk_size}{fix(flags.chunk_size, '>= 1')}"
            )
        if self.text_mode not in TEXT_MODES:
            modes = f"lines or {flags.text_mode} document"
            raise AiosError(f"unknown text mode '{self.text_mode}'{fix(flags.text_mode, modes)}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise AiosError(
                f"holdout fraction must be in [0, 1), got {self.holdout_fraction}"
                f"{fix(flags.holdout_fraction, 'e.g. 0.05')}"
            )

    def identity(self) -> dict:
        """The options as fingerprint keys. The field names are those keys: renaming a field changes
        every fingerprint and so invalidates every existing prepared dataset."""
        return asdict(self)

    def applied_to(self, suffixes: Collection[str]) -> PrepareOptions:
        """These options with those that affect none of the formats `suffixes` (`OPTION_SUFFIXES`) set back
        to their defaults, so that they do not change the fingerprint: --text-mode only matters for .txt,
        --text-field only for .jsonl/.csv. (Resetting rather than dropping the key keeps the fingerprints of
        datasets prepared before this rule.)"""
        defaults = {f.name: f.default for f in fields(self)}
        unused = [name for name in OPTION_SUFFIXES if not option_applies(name, suffixes)]
        return replace(self, **{name: defaults[name] for name in unused})

    def text_options(self, suffixes: Collection[str]) -> dict:
        """The text options that affect the formats `suffixes`, as the manifest records them."""
        names = ("text_mode", "text_field", "ascii_only")
        return {name: getattr(self, name) for name in names if option_applies(name, suffixes)}


def warn_unused_options(
    options: PrepareOptions,
    datasets: Iterable[PreparedDataset],
    flags: DataFlags,
    names: Collection[str] = tuple(OPTION_SUFFIXES),
) -> list[str]:
    """Warn about each option of `names` that has a non-default value but affects none of the datasets'
    source formats, so it had no effect (preparation ignored it); returns those option names.

    The caller passes every dataset the options were used for (train-actv1: the training data and the
    --eval-file data), and only the options its user chose (eval leaves out those taken from the brain).
    """
    datasets = list(datasets)
    suffixes = {Path(s["name"]).suffix.lower() for d in datasets for s in d.manifest["sources"]}
    defaults = {f.name: f.default for f in fields(options)}
    unused = []
    for name in names:
        value = getattr(options, name)
        if value != defaults[name] and not option_applies(name, suffixes):
            flag = getattr(flags, name) or name
            where = " and ".join(f"'{d.manifest['source']}'" for d in datasets)
            log.warning("%s %s has no effect: it only applies to %s files and %s %s none; drop %s", flag, value,
                        "/".join(OPTION_SUFFIXES[name]), where, "have" if len(datasets) > 1 else "has", flag)
            unused.append(name)
    return unused


def dataset_fingerprint(sources: list[SourceFile], tokenizer_fp: str, options: PrepareOptions) -> str:
    """sha256 over everything that decides the prepared content."""
    identity = {
        "format_version": FORMAT_VERSION,
        "sources": [[s.relative_name, s.sha256] for s in sources],
        "tokenizer": tokenizer_fp,
        **options.identity(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def prepare_dataset(
    source: str | os.PathLike,
    tokenizer: PreTrainedTokenizerFast,
    tokenizer_name: str,
    options: PrepareOptions,
    *,
    flags: DataFlags,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    progress: bool = False,
    disjoint_from: PreparedDataset | None = None,
) -> PreparedDataset:
    """Prepare `source` (or reuse its cached preparation) and open it.

    `flags` names the calling command's flag for each input, for the fixes its errors suggest. With
    `disjoint_from` (the training data, when `source` is evaluation text), a source file with the same
    bytes as one of that dataset's sources is refused before any tokenising: a train/eval leak.

    Options that affect none of the sources' formats are ignored (`PrepareOptions.applied_to`); the caller
    warns about them with `warn_unused_options`.
    """
    options.validate(flags)
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        fix = f"pass a directory to {flags.cache_dir}" if flags.cache_dir else "remove the file"
        raise AiosError(f"the data cache {cache_dir} is a file, not a directory: {fix}")
    if getattr(tokenizer, "eos_token_id", None) is None:
        fix = (f"pass {flags.tokenizer} a tokenizer with an eos_token (aios tokenizers add <|endoftext|>)"
               if flags.tokenizer else "use a tokenizer with an eos_token (aios tokenizers add <|endoftext|>)")
        raise AiosError(f"tokenizer '{tokenizer_name}' has no EOS token, which separates documents: {fix}")

    sources = inspect_source(source, flags)
    if disjoint_from is not None:
        _refuse_shared_sources(sources, disjoint_from, os.fspath(source), flags)
    options = options.applied_to({s.path.suffix.lower() for s in sources})
    tokenizer_fp = tokenizer_fingerprint(tokenizer)
    fingerprint = dataset_fingerprint(sources, tokenizer_fp, options)
    final_dir = Path(cache_dir) / fingerprint[:16]
    existing = _open_if_valid(final_dir, fingerprint)
    if existing is not None:
        log.info("reusing prepared dataset %s", final_dir)
        return existing

    staging_dir = make_staging_dir(final_dir)
    try:
        manifest = _build(
            staging_dir,
            sources,
            tokenizer,
            tokenizer_name=tokenizer_name,
            tokenizer_fp=tokenizer_fp,
            fingerprint=fingerprint,
            source_spec=os.fspath(source),
            options=options,
            flags=flags,
            progress=progress,
        )
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    # A directory that exists here was judged invalid above (or was written by a concurrent preparer
    # meanwhile); keep a valid one, replace an invalid one.
    replace = _open_if_valid(final_dir, fingerprint, quiet=True) is None
    install_dir(staging_dir, final_dir, replace=replace)
    log.info("prepared %d sequences in %s", manifest["counts"]["sequences"], final_dir)
    return PreparedDataset(final_dir)


def _refuse_shared_sources(
    sources: list[SourceFile], other: PreparedDataset, source_spec: str, flags: DataFlags
) -> None:
    """AiosError when a file of `sources` has the bytes of a source of `other` (same file, a file inside
    its directory or glob, or a copy): compared by the sha256 that preparation computes anyway."""
    theirs = {s["sha256"]: s["name"] for s in other.manifest["sources"]}
    for mine in sources:
        if mine.sha256 in theirs:
            where = "" if mine.relative_name == Path(source_spec).name else f" ('{mine.relative_name}')"
            raise AiosError(
                f"'{source_spec}'{where} is part of the training data: it has the same bytes "
                f"as '{theirs[mine.sha256]}' of '{other.manifest['source']}', so the evaluation would "
                f"measure memorisation; pass text that is not in the training data to {flags.source}"
            )


def _open_if_valid(directory: Path, fingerprint: str, *, quiet: bool = False) -> PreparedDataset | None:
    if not directory.exists():
        return None
    try:
        dataset = PreparedDataset(directory)
    except AiosError as exc:
        if not quiet:
            log.warning("prepared dataset %s is unusable and will be prepared again (%s)", directory, exc)
        return None
    if dataset.fingerprint != fingerprint:
        if not quiet:
            log.warning("prepared dataset %s has another fingerprint and will be prepared again", directory)
        return None
    return dataset


def encode_batch(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added: `tokenizer(texts, add_special_tokens=False)`.

    A transformers fast tokenizer's call is its Rust backend's `encode_batch`; `encode_batch_fast` gives
    the same ids without building character offsets, about twice as fast, so it is used when present.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _newline_split_is_exact(tokenizer: PreTrainedTokenizerFast) -> bool:
    """Whether cutting text after "x\\n" before a non-space character leaves its tokens unchanged.

    True for byte-level BPE (GPT-2 style), whose pre-tokenizer ends a token at such a line break; not for
    tokenizers that add a prefix space at the start of every text (sentencepiece-style Metaspace). Probed
    on the tokenizer itself rather than assumed.
    """
    probes = [("The king is come.\n", "Enter HAMLET."), ("a, b\n", "'Tis so"), ("x 12\n", "[Exit.]")]
    for head, tail in probes:
        whole, *parts = encode_batch(tokenizer, [head + tail, head, tail])
        if whole != parts[0] + parts[1]:
            return False
    return True


def _merge_pieces(segments: Iterator[Segment]) -> Iterator[Segment]:
    """Join the pieces of each document back into one segment (for tokenizers that cannot split)."""
    pieces: list[str] = []
    for segment in segments:
        pieces.append(segment.text)
        if segment.ends_document:
            yield Segment("".join(pieces), ends_document=True)
            pieces = []


def _batches(segments: Iterator[Segment]) -> Iterator[list[Segment]]:
    batch: list[Segment] = []
    chars = 0
    for segment in segments:
        batch.append(segment)
        chars += len(segment.text)
        if chars >= TOKENIZE_BATCH_CHARS or len(batch) >= TOKENIZE_BATCH_SAMPLES:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _ChunkWriter:
    """Packs a token stream into (window,) rows and writes full chunks as they fill."""

    def __init__(self, directory: Path, window: int, chunk_size: int, dtype: np.dtype):
        self.directory, self.window, self.chunk_size, self.dtype = directory, window, chunk_size, dtype
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.chunks: list[dict] = []
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.tokens += len(ids)
        chunk_tokens = self.chunk_size * self.window
        if self.pending_tokens >= chunk_tokens:
            stream = np.concatenate(self.pending)
            full = len(stream) // chunk_tokens * chunk_tokens
            for start in range(0, full, chunk_tokens):
                self._write(stream[start : start + chunk_tokens])
            self.pending = [stream[full:]]
            self.pending_tokens = len(stream) - full

    def finish(self) -> int:
        """Write the last, shorter chunk; return the number of tail tokens dropped."""
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        usable = len(stream) // self.window * self.window
        if usable:
            self._write(stream[:usable])
        self.pending, self.pending_tokens = [], 0
        return len(stream) - usable

    def _write(self, tokens: np.ndarray) -> None:
        rows = tokens.reshape(-1, self.window)  # (n, window)
        name = chunk_file_name(len(self.chunks))
        np.save(self.directory / name, rows)
        self.chunks.append({"file": name, "sequences": int(rows.shape[0])})


def _build(
    directory: Path,
    sources: list[SourceFile],
    tokenizer: PreTrainedTokenizerFast,
    *,
    tokenizer_name: str,
    tokenizer_fp: str,
    fingerprint: str,
    source_spec: str,
    options: PrepareOptions,
    flags: DataFlags,
    progress: bool,
) -> dict:
    vocab_size = len(tokenizer)
    eos_id = int(tokenizer.eos_token_id)
    dtype = np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)
    window = options.max_seq_len + 1
    writer = _ChunkWriter(directory, window, options.chunk_size, dtype)
    counts = ReadCounts()
    split_documents = options.text_mode == "lines" or _newline_split_is_exact(tokenizer)

    bar = _ProgressBar(sum(s.size for s in sources), enabled=progress)
    with bar:
        for source in sources:
            segments = iter_segments(
                source,
                text_mode=options.text_mode,
                text_field=options.text_field,
                ascii_only=options.ascii_only,
                counts=counts,
                flags=flags,
            )
            if not split_documents:
                segments = _merge_pieces(segments)
            for batch in _batches(segments):
                stream: list[int] = []  # this batch's tokens, EOS after each finished document
                for segment, ids in zip(batch, encode_batch(tokenizer, [s.text for s in batch]), strict=True):
                    stream.extend(ids)
                    if segment.ends_document:
                        stream.append(eos_id)
                writer.add(np.array(stream, dtype=dtype))
                bar.advance(sum(len(s.text) for s in batch))
            bar.file_done(source.size)
        tail_dropped = writer.finish()

    more_text = f"more text to {flags.source}"
    if counts.samples_read == 0:
        dropped = counts.samples_dropped_non_ascii
        why, ascii_fix = "", None
        if dropped:
            why = f" ({dropped} non-ASCII samples dropped{f' by {flags.ascii_only}' if flags.ascii_only else ''})"
            ascii_fix = f"turn off {flags.ascii_only}" if flags.ascii_only else None
        raise AiosError(
            f"dataset '{source_spec}' has no usable text{why}: "
            f"{either(f'pass files with text in them to {flags.source}', ascii_fix)}"
        )
    num_sequences = sum(c["sequences"] for c in writer.chunks)
    smaller_seq_len = f"a smaller {flags.max_seq_len}" if flags.max_seq_len else None
    if num_sequences == 0:
        suggestion = max(1, 2 ** int(math.log2(max(2, writer.tokens // 8))))
        raise AiosError(
            f"dataset '{source_spec}' has {writer.tokens} tokens, fewer than one window of max_seq_len + 1 "
            f"= {window}: pass {either(smaller_seq_len and f'{smaller_seq_len} (e.g. {suggestion})', more_text)}"
        )
    holdout_fraction = options.holdout_fraction
    num_holdout = math.ceil(holdout_fraction * num_sequences) if holdout_fraction > 0 else 0
    if num_holdout >= num_sequences:
        smaller_holdout = f"a smaller {flags.holdout_fraction}" if flags.holdout_fraction else None
        raise AiosError(
            f"holdout fraction {holdout_fraction} of {num_sequences} sequences leaves none for training: "
            f"pass {either(smaller_holdout, smaller_seq_len, more_text)}"
        )

    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source_spec,
        "tokenizer": {
            "name": tokenizer_name,
            "fingerprint": tokenizer_fp,
            "vocab_size": vocab_size,
            "eos_id": eos_id,
        },
        "seq_len": options.max_seq_len,
        "window": window,
        "chunk_size": options.chunk_size,
        "dtype": dtype.name,
        "chunks": writer.chunks,
        "sources": [
            {
                "name": s.relative_name,
                "size": s.size,
                "sha256": s.sha256,
                "samples": counts.per_file.get(s.relative_name, 0),
            }
            for s in sources
        ],
        "text_options": options.text_options({s.path.suffix.lower() for s in sources}),
        "counts": {
            "samples_read": counts.samples_read,
            "samples_dropped_non_ascii": counts.samples_dropped_non_ascii,
            "tokens": writer.tokens,
            "sequences": num_sequences,
            "tokens_dropped_tail": tail_dropped,
        },
        "holdout": {
            "fraction": holdout_fraction,
            "num_train_sequences": num_sequences - num_holdout,
            "num_holdout_sequences": num_holdout,
        },
    }
    atomic_write_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest


class _ProgressBar:
    """A rich progress bar over source bytes (characters tokenised), or nothing when disabled."""

    def __init__(self, total_bytes: int, *, enabled: bool):
        from rich.console import Console

        console = Console(stderr=True)  # stdout keeps only the results
        # Off a terminal (logs, pipes) a bar is only noise.
        self.enabled = enabled and console.is_terminal
        self.done_files = 0  # bytes of files finished
        self.in_file = 0
        if self.enabled:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("tokenising"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,  # gone when done: an error stays one line
            )
            self.task = self.progress.add_task("tokenising", total=total_bytes)

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.stop()

    def advance(self, chars: int) -> None:
        self.in_file += chars
        if self.enabled:
            self.progress.update(self.task, completed=self.done_files + self.in_file)

    def file_done(self, size: int) -> None:
        self.done_files += size
        self.in_file = 0
        if self.enabled:
            self.progress.update(self.task, completed=self.done_files)
