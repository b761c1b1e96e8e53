"""Reading raw text sources: .txt, .jsonl and .csv files, a directory of them, or a glob.

A source resolves to a sorted list of files. Each file is checked once up front (`inspect_file`: exists,
not empty, not binary, valid UTF-8, its sha256 for the cache fingerprint) so that reading it later
(`iter_segments`) can trust the encoding. Reading yields text segments; a segment flagged
`ends_document` is followed by EOS when packed.

Samples:
- .txt, text_mode "lines": one sample per non-blank line (the line without its line break).
- .txt, text_mode "document": the whole file is one sample. Long documents are yielded in pieces of about
  `DOCUMENT_PIECE_CHARS` that end at a line break, so a large file never has to be tokenised in one call;
  the caller only splits where that leaves the tokens unchanged (see prepare.py).
- .jsonl: one sample per line, the string in field `text_field` of the JSON object on that line.
- .csv: one sample per row, the cell in column `text_field` (the header names the columns).
Blank samples are skipped. With `ascii_only`, a sample that contains a non-ASCII character is dropped and
counted (for "document" mode that is the whole file). `text_mode` only affects .txt files and `text_field`
only .jsonl/.csv files (`OPTION_SUFFIXES`).

Errors name the flags of the calling command (`DataFlags`).
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import json
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aios.data.flags import DataFlags
from aios.errors import AiosError

TextMode = Literal["lines", "document"]
TEXT_MODES: tuple[str, ...] = ("lines", "document")
SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".csv")
BINARY_PROBE_BYTES = 8192  # a NUL byte in the first 8 KB marks a file as binary
HASH_BLOCK_BYTES = 1 << 20
DOCUMENT_PIECE_CHARS = 1 << 16
# The formats a text option affects (the other options affect every format).
OPTION_SUFFIXES: dict[str, tuple[str, ...]] = {"text_mode": (".txt",), "text_field": (".jsonl", ".csv")}


def option_applies(name: str, suffixes: Collection[str]) -> bool:
    """Whether option `name` affects how files with these suffixes are read."""
    return name not in OPTION_SUFFIXES or not set(suffixes).isdisjoint(OPTION_SUFFIXES[name])


def _fix_source(flags: DataFlags) -> str:
    return f"pass an existing .txt/.jsonl/.csv file, a directory of them, or a glob to {flags.source}"


@dataclass(frozen=True)
class SourceFile:
    """One input file, checked and hashed."""

    path: Path
    relative_name: str  # relative to the source root: part of the cache fingerprint
    size: int
    sha256: str
    is_ascii: bool


@dataclass
class ReadCounts:
    """What reading produced, reported in the manifest."""

    samples_read: int = 0  # non-blank samples kept
    samples_dropped_non_ascii: int = 0
    per_file: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Segment:
    text: str
    ends_document: bool


def resolve_source(source: str | os.PathLike, flags: DataFlags) -> list[tuple[Path, str]]:
    """The files of a source as (path, relative name), sorted by relative name.

    A file is itself; a directory gives every supported file inside it (recursively); a pattern with
    glob characters gives the supported files it matches. Unsupported files inside a directory or glob
    are ignored, an unsupported file named directly is an error.
    """
    text = os.fspath(source)
    if not text.strip():
        raise AiosError(f"no dataset given: {_fix_source(flags)}")
    if glob.has_magic(text):
        matches = [Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()]
        files = [p for p in matches if p.suffix.lower() in SUPPORTED_SUFFIXES]
        if not files:
            raise AiosError(
                f"the pattern '{text}' matches no .txt/.jsonl/.csv files ({len(matches)} other files): "
                f"fix the pattern or {_fix_source(flags)}"
            )
        root = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
        named = [(p, p.resolve().relative_to(root).as_posix()) for p in files]
        return sorted(named, key=lambda item: item[1])
    path = Path(text).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES]
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not files:
            raise AiosError(f"the directory '{path}' holds no .txt/.jsonl/.csv files: {_fix_source(flags)}")
        return sorted(((p, p.relative_to(path).as_posix()) for p in files), key=lambda item: item[1])
    if not path.exists():
        raise AiosError(f"dataset file '{path}' does not exist: {_fix_source(flags)}")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise AiosError(
            f"dataset file '{path}' has the unsupported extension '{path.suffix or '(none)'}': "
            f"convert it to .txt (plain text), .jsonl (one JSON object per line) or .csv"
        )
    return [(path, path.name)]


def inspect_file(path: Path, relative_name: str) -> SourceFile:
    """Check that a file is non-empty UTF-8 text and hash it, in one streaming pass."""
    size = path.stat().st_size
    if size == 0:
        raise AiosError(f"dataset file '{path}' is empty: put text in it or remove it from the dataset")
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    is_ascii = True
    offset = 0  # bytes of the file before the current block
    with open(path, "rb") as handle:
        first = True
        while block := handle.read(HASH_BLOCK_BYTES):
            if first and b"\x00" in block[:BINARY_PROBE_BYTES]:
                raise AiosError(
                    f"dataset file '{path}' looks binary (NUL bytes in its first 8 KB): "
                    f"pass a UTF-8 text file (.txt/.jsonl/.csv)"
                )
            first = False
            digest.update(block)
            pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
            if pending or not block.isascii():
                is_ascii = False
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as exc:
                    bad = offset - pending + exc.start
                    raise AiosError(
                        f"dataset file '{path}' is not valid UTF-8 (byte offset {bad}): "
                        f"re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8"
                    ) from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise AiosError(
                f"dataset file '{path}' is not valid UTF-8 (it ends inside a character, byte offset "
                f"{offset - len(decoder.getstate()[0])}): re-encode it as UTF-8"
            ) from None
    return SourceFile(path, relative_name, size, digest.hexdigest(), is_ascii)


def inspect_source(source: str | os.PathLike, flags: DataFlags) -> list[SourceFile]:
    """The files of a source, each checked and hashed (`resolve_source`, then `inspect_file`)."""
    return [inspect_file(path, name) for path, name in resolve_source(source, flags)]


def iter_segments(
    file: SourceFile,
    *,
    text_mode: TextMode,
    text_field: str,
    ascii_only: bool,
    counts: ReadCounts,
    flags: DataFlags,
) -> Iterator[Segment]:
    """The samples of one file as text segments, updating `counts`."""
    suffix = file.path.suffix.lower()
    if suffix == ".txt" and text_mode == "document":
        yield from _document_segments(file, ascii_only, counts)
        return
    if suffix == ".txt":
        samples = _txt_lines(file.path)
    elif suffix == ".jsonl":
        samples = _jsonl_texts(file.path, text_field, flags)
    else:
        samples = _csv_texts(file.path, text_field, flags)
    kept = 0
    for text in samples:
        if not text.strip():
            continue
        if ascii_only and not text.isascii():
            counts.samples_dropped_non_ascii += 1
            continue
        kept += 1
        yield Segment(text, ends_document=True)
    counts.samples_read += kept
    counts.per_file[file.relative_name] = kept


def _open_text(path: Path):
    # utf-8-sig drops a leading byte-order mark; universal newlines turn \r\n into \n.
    return open(path, encoding="utf-8-sig", newline=None)


def _txt_lines(path: Path) -> Iterator[str]:
    with _open_text(path) as handle:
        for line in handle:
            yield line.rstrip("\n")


def _document_segments(file: SourceFile, ascii_only: bool, counts: ReadCounts) -> Iterator[Segment]:
    if ascii_only and not file.is_ascii:
        counts.samples_dropped_non_ascii += 1
        counts.per_file[file.relative_name] = 0
        return
    pieces: list[str] = []
    size = 0
    emitted = False
    with _open_text(file.path) as handle:
        for line in handle:
            # Cut only between "x\n" and a line starting with a non-space character: see prepare.py.
            if size >= DOCUMENT_PIECE_CHARS and line[:1].strip() and _ends_cleanly(pieces[-1]):
                yield Segment("".join(pieces), ends_document=False)
                emitted, pieces, size = True, [], 0
            pieces.append(line)
            size += len(line)
    text = "".join(pieces)
    if not emitted and not text.strip():
        counts.per_file[file.relative_name] = 0
        return
    counts.samples_read += 1
    counts.per_file[file.relative_name] = 1
    yield Segment(text, ends_document=True)


def _ends_cleanly(line: str) -> bool:
    return len(line) >= 2 and line[-1] == "\n" and not line[-2].isspace()


def _name_the_field(flags: DataFlags, what: str, text_field: str) -> str:
    if flags.text_field:
        return f"pass {flags.text_field} with the name of the text {what}"
    return f"give every record a text {what} '{text_field}'"


def _jsonl_texts(path: Path, text_field: str, flags: DataFlags) -> Iterator[str]:
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AiosError(
                    f"'{path}' line {line_number} is not JSON ({exc.msg}): "
                    f'write one JSON object per line, e.g. {{"{text_field}": "..."}}'
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise AiosError(
                    f"'{path}' line {line_number} has no field '{text_field}' (found: {keys or 'nothing'}): "
                    f"{_name_the_field(flags, 'field', text_field)}"
                )
            value = record[text_field]
            if not isinstance(value, str):
                raise AiosError(
                    f"'{path}' line {line_number}: field '{text_field}' is {type(value).__name__}, not a "
                    f"string: {_name_the_field(flags, 'field', text_field)}"
                )
            yield value


def _csv_texts(path: Path, text_field: str, flags: DataFlags) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)  # a document per cell can be long; the default limit is 128 KB
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            columns = reader.fieldnames or []
            if text_field not in columns:
                raise AiosError(
                    f"'{path}' has no column '{text_field}' (columns: {', '.join(columns) or 'none'}): "
                    f"{_name_the_field(flags, 'column', text_field)}"
                )
            for row in reader:
                yield row[text_field] or ""
        except csv.Error as exc:
            raise AiosError(f"'{path}' line {reader.line_num} is not valid CSV ({exc}): fix the file or "
                            f"convert it to .jsonl") from None
