"""Reading .txt (lines / document), .jsonl, .csv, directories and globs; ASCII filtering; bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from aios.data import PrepareOptions, prepare_dataset
from aios.data.flags import PREPARE
from aios.data.sources import (
    DOCUMENT_PIECE_CHARS,
    ReadCounts,
    inspect_file,
    iter_segments,
    resolve_source,
)
from aios.errors import AiosError

SONNET = [
    "Shall I compare thee to a summer's day?",
    "Thou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May,",
    "And summer's lease hath all too short a date;",
]


def read_samples(source, *, text_mode="lines", text_field="text", ascii_only=False):
    """(texts of finished samples, counts): segments of a document are joined back."""
    counts = ReadCounts()
    samples, pieces = [], []
    for path, name in resolve_source(source, PREPARE):
        for segment in iter_segments(
            inspect_file(path, name),
            text_mode=text_mode,
            text_field=text_field,
            ascii_only=ascii_only,
            counts=counts,
            flags=PREPARE,
        ):
            pieces.append(segment.text)
            if segment.ends_document:
                samples.append("".join(pieces))
                pieces = []
    assert not pieces, "a document was left without its end"
    return samples, counts


def test_txt_lines_mode_gives_one_sample_per_non_blank_line(tmp_path: Path):
    path = tmp_path / "sonnet.txt"
    path.write_text(SONNET[0] + "\n\n   \n" + "\r\n".join(SONNET[1:]) + "\n", encoding="utf-8")
    samples, counts = read_samples(path)
    assert samples == SONNET  # blank and whitespace-only lines skipped, \r\n normalised
    assert counts.samples_read == 4


def test_txt_document_mode_gives_the_whole_file_as_one_sample(tmp_path: Path, sample_text: str):
    text = sample_text[: 3 * DOCUMENT_PIECE_CHARS]
    path = tmp_path / "plays.txt"
    path.write_text(text, encoding="utf-8")
    counts = ReadCounts()
    segments = list(
        iter_segments(
            inspect_file(path, "plays.txt"),
            text_mode="document",
            text_field="text",
            ascii_only=False,
            counts=counts,
            flags=PREPARE,
        )
    )
    # A long document comes in pieces cut at line breaks, only the last one ends the document.
    assert len(segments) >= 2
    assert [s.ends_document for s in segments] == [False] * (len(segments) - 1) + [True]
    assert all(s.text.endswith("\n") and not s.text[-2].isspace() for s in segments[:-1])
    assert "".join(s.text for s in segments) == text
    assert counts.samples_read == 1


def test_a_leading_byte_order_mark_is_not_text(tmp_path: Path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + SONNET[0].encode())
    assert read_samples(path)[0] == [SONNET[0]]


def test_jsonl_reads_the_named_field(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    rows = [{"text": line, "body": line.upper(), "id": i} for i, line in enumerate(SONNET)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert read_samples(path)[0] == SONNET
    assert read_samples(path, text_field="body")[0] == [line.upper() for line in SONNET]


def test_csv_reads_the_named_column(tmp_path: Path):
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "content"])
        for i, line in enumerate(SONNET):
            writer.writerow([i, line + "\nsecond line, with a comma"])  # quoted, multi-line cells
    samples, counts = read_samples(path, text_field="content")
    assert samples == [line + "\nsecond line, with a comma" for line in SONNET]
    assert counts.samples_read == 4


def test_csv_cells_longer_than_the_csv_module_default_limit(tmp_path: Path):
    path = tmp_path / "docs.csv"
    document = "word " * 60_000  # 300 KB in one cell (the csv module's default limit is 128 KB)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["text"], [document]])
    assert read_samples(path)[0] == [document]


def test_directory_reads_supported_files_recursively_in_sorted_order(tmp_path: Path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("third\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "b" / "m.jsonl").write_text('{"text": "second"}\n')
    (tmp_path / "notes.md").write_text("not data\n")  # other extensions are ignored
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden\n")
    assert [name for _, name in resolve_source(tmp_path, PREPARE)] == ["a.txt", "b/m.jsonl", "b/z.txt"]
    assert read_samples(tmp_path)[0] == ["first", "second", "third"]


def test_glob_reads_matching_files_with_names_relative_to_their_common_folder(tmp_path: Path):
    for name in ("part-2.txt", "part-1.txt", "other.txt"):
        (tmp_path / name).write_text(name + "\n")
    files = resolve_source(str(tmp_path / "part-*.txt"), PREPARE)
    assert [name for _, name in files] == ["part-1.txt", "part-2.txt"]
    assert read_samples(str(tmp_path / "part-*.txt"))[0] == ["part-1.txt", "part-2.txt"]


def test_ascii_only_drops_and_counts_non_ascii_samples(tmp_path: Path):
    path = tmp_path / "mixed.txt"
    path.write_text("plain one\ncafé au lait\nplain two\nnaïve\n", encoding="utf-8")
    samples, counts = read_samples(path, ascii_only=True)
    assert samples == ["plain one", "plain two"]
    assert (counts.samples_read, counts.samples_dropped_non_ascii) == (2, 2)
    # In document mode the document is the sample.
    samples, counts = read_samples(path, text_mode="document", ascii_only=True)
    assert (samples, counts.samples_read, counts.samples_dropped_non_ascii) == ([], 0, 1)
    assert read_samples(path, text_mode="document")[0] == [path.read_text()]


def test_inspect_file_hashes_and_flags_ascii(tmp_path: Path):
    ascii_file = tmp_path / "a.txt"
    ascii_file.write_text("abc\n")
    unicode_file = tmp_path / "u.txt"
    unicode_file.write_text("âbc\n", encoding="utf-8")
    a, u = inspect_file(ascii_file, "a.txt"), inspect_file(unicode_file, "u.txt")
    assert a.sha256 == "edeaaff3f1774ad2888673770c6d64097e391bc362d7d6fb34982ddf0efd18cb"
    assert (a.size, a.is_ascii, u.is_ascii) == (4, True, False)


# ---- bad inputs: one line, naming the problem and the fix ----


def prepare_error(tmp_path: Path, tokenizer, source, **options) -> str:
    options = {"max_seq_len": 16, "chunk_size": 8, **options}
    with pytest.raises(AiosError) as info:
        prepare_dataset(
            str(source), tokenizer, "bpe-512", PrepareOptions(**options), flags=PREPARE, cache_dir=tmp_path / "cache"
        )
    message = str(info.value)
    assert "\n" not in message and ":" in message
    cache = tmp_path / "cache"
    assert not cache.exists() or not list(cache.iterdir()), "a failed preparation left files behind"
    return message


def test_missing_file(tmp_path: Path, tokenizer):
    message = prepare_error(tmp_path, tokenizer, tmp_path / "nope.txt")
    assert "does not exist" in message and "--dataset-file" in message


def test_empty_file(tmp_path: Path, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in prepare_error(tmp_path, tokenizer, tmp_path / "empty.txt")


def test_whitespace_only_file_has_no_usable_text(tmp_path: Path, tokenizer):
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    assert "no usable text" in prepare_error(tmp_path, tokenizer, tmp_path / "blank.txt")


def test_ascii_only_that_drops_everything_says_so(tmp_path: Path, tokenizer):
    (tmp_path / "u.txt").write_text("café\nnaïve\n", encoding="utf-8")
    message = prepare_error(tmp_path, tokenizer, tmp_path / "u.txt", ascii_only=True)
    assert "2 non-ASCII samples dropped" in message and "--ascii-only" in message


def test_binary_file(tmp_path: Path, tokenizer):
    (tmp_path / "weights.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    assert "looks binary" in prepare_error(tmp_path, tokenizer, tmp_path / "weights.txt")


def test_undecodable_file_names_the_byte_offset(tmp_path: Path, tokenizer):
    (tmp_path / "latin1.txt").write_bytes("Ye olde café\n".encode("latin-1"))
    message = prepare_error(tmp_path, tokenizer, tmp_path / "latin1.txt")
    assert "not valid UTF-8 (byte offset 11)" in message and "re-encode" in message


def test_undecodable_byte_after_the_first_block(tmp_path: Path, tokenizer):
    # A multi-byte character split across read blocks is fine; a bad byte later is found at its offset.
    data = b"a" * ((1 << 20) - 1) + "é".encode() + b"b" * 100 + b"\xff" + b"\n"
    (tmp_path / "big.txt").write_bytes(data)
    offset = data.index(b"\xff")
    assert f"byte offset {offset})" in prepare_error(tmp_path, tokenizer, tmp_path / "big.txt")


def test_unsupported_extension(tmp_path: Path, tokenizer):
    (tmp_path / "data.parquet").write_text("x")
    message = prepare_error(tmp_path, tokenizer, tmp_path / "data.parquet")
    assert "unsupported extension '.parquet'" in message and ".jsonl" in message


def test_directory_and_glob_without_supported_files(tmp_path: Path, tokenizer):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "readme.md").write_text("x")
    assert "holds no .txt/.jsonl/.csv files" in prepare_error(tmp_path, tokenizer, tmp_path / "d")
    assert "matches no .txt/.jsonl/.csv files (1 other files)" in prepare_error(
        tmp_path, tokenizer, tmp_path / "d" / "*"
    )


def test_jsonl_line_that_is_not_json_names_the_line(tmp_path: Path, tokenizer):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    message = prepare_error(tmp_path, tokenizer, tmp_path / "bad.jsonl")
    assert "line 2 is not JSON" in message


def test_jsonl_missing_field_names_line_and_field(tmp_path: Path, tokenizer):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"body": "x", "id": 3}\n')
    message = prepare_error(tmp_path, tokenizer, tmp_path / "bad.jsonl")
    assert "line 3 has no field 'text' (found: body, id)" in message and "--text-field" in message


def test_csv_missing_column_lists_the_columns(tmp_path: Path, tokenizer):
    (tmp_path / "bad.csv").write_text("id,content\n1,hello\n")
    message = prepare_error(tmp_path, tokenizer, tmp_path / "bad.csv")
    assert "no column 'text' (columns: id, content)" in message and "--text-field" in message


def test_max_seq_len_longer_than_the_data_says_how_many_tokens_there_are(tmp_path: Path, tokenizer):
    (tmp_path / "short.txt").write_text("\n".join(SONNET))
    tokens = sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) + 1 for line in SONNET)
    message = prepare_error(tmp_path, tokenizer, tmp_path / "short.txt", max_seq_len=4096)
    assert f"has {tokens} tokens, fewer than one window of max_seq_len + 1 = 4097" in message
    assert "--max-seq-len (e.g." in message


def test_bad_options(tmp_path: Path, tokenizer):
    (tmp_path / "s.txt").write_text("\n".join(SONNET))
    assert "--max-seq-len" in prepare_error(tmp_path, tokenizer, tmp_path / "s.txt", max_seq_len=0)
    assert "--dataset-chunk-size" in prepare_error(tmp_path, tokenizer, tmp_path / "s.txt", chunk_size=0)
    assert "--text-mode" in prepare_error(tmp_path, tokenizer, tmp_path / "s.txt", text_mode="paragraphs")
    assert "holdout fraction" in prepare_error(tmp_path, tokenizer, tmp_path / "s.txt", holdout_fraction=1.0)
    message = prepare_error(tmp_path, tokenizer, tmp_path / "s.txt", max_seq_len=4, holdout_fraction=0.99)
    assert "leaves none for training" in message
