"""prepare_dataset: exact packing, chunk files, dtype, manifest, cache reuse and invalidation, holdout."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from aios.data import PreparedDataset, PrepareOptions, prepare_dataset
from aios.data.flags import PREPARE
from aios.data.prepare import dataset_fingerprint
from aios.data.sources import DOCUMENT_PIECE_CHARS
from aios.tokenizers import load_tokenizer, tokenizer_fingerprint


def prepare(source, tokenizer, name: str = "bpe-512", *, cache_dir, **options) -> PreparedDataset:
    """prepare_dataset with PrepareOptions(**options), as `aios data prepare` calls it."""
    return prepare_dataset(str(source), tokenizer, name, PrepareOptions(**options), flags=PREPARE, cache_dir=cache_dir)


def chunk_stream(dataset: PreparedDataset) -> np.ndarray:
    """All stored tokens, chunk after chunk, flattened."""
    return np.concatenate([np.load(dataset.path / c["file"]).reshape(-1) for c in dataset.manifest["chunks"]])


@pytest.fixture
def two_plays(tmp_path: Path, sample_text: str) -> Path:
    """A directory with a long document (cut into pieces while reading) and a short one."""
    folder = tmp_path / "plays"
    folder.mkdir()
    (folder / "a.txt").write_text(sample_text[: 2 * DOCUMENT_PIECE_CHARS + 5000], encoding="utf-8")
    (folder / "b.txt").write_text(sample_text[300_000:310_000], encoding="utf-8")
    return folder


def test_document_packing_is_exactly_the_eos_joined_token_stream(two_plays: Path, tokenizer, tmp_path: Path):
    dataset = prepare(two_plays, tokenizer, max_seq_len=63, chunk_size=100, cache_dir=tmp_path / "cache",
                      text_mode="document")
    eos = tokenizer.eos_token_id
    expected = []
    for name in ("a.txt", "b.txt"):
        expected += tokenizer((two_plays / name).read_text(), add_special_tokens=False)["input_ids"] + [eos]
    window = 64
    num_sequences = len(expected) // window
    stored = chunk_stream(dataset)
    assert np.array_equal(stored, np.array(expected[: num_sequences * window]))
    assert dataset.num_sequences == num_sequences
    counts = dataset.manifest["counts"]
    assert counts == {
        "samples_read": 2,
        "samples_dropped_non_ascii": 0,
        "tokens": len(expected),
        "sequences": num_sequences,
        "tokens_dropped_tail": len(expected) % window,
    }
    # Chunks of chunk_size sequences, the last one shorter.
    sizes = [c["sequences"] for c in dataset.manifest["chunks"]]
    assert sizes == [100] * (num_sequences // 100) + ([num_sequences % 100] if num_sequences % 100 else [])
    assert [c["file"] for c in dataset.manifest["chunks"]] == [
        f"chunk-{i:05d}.npy" for i in range(len(sizes))
    ]
    first = np.load(dataset.path / "chunk-00000.npy")
    assert first.shape == (100, 64) and first.dtype == np.uint16


def test_lines_packing_puts_eos_after_every_sample(tmp_path: Path, tokenizer, sample_text: str):
    lines = [line for line in sample_text[:20_000].splitlines() if line.strip()]
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps({"text": line}) for line in lines) + "\n", encoding="utf-8")
    dataset = prepare(source, tokenizer, max_seq_len=20, chunk_size=7, cache_dir=tmp_path / "cache")
    expected = []
    for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        expected += ids + [tokenizer.eos_token_id]
    stored = chunk_stream(dataset)
    assert len(stored) == len(expected) // 21 * 21
    assert np.array_equal(stored, np.array(expected[: len(stored)]))
    assert dataset.manifest["counts"]["samples_read"] == len(lines)


def test_vocabularies_over_65536_tokens_are_stored_as_uint32(tmp_path: Path, tokenizer_dir: Path):
    big = load_tokenizer(str(tokenizer_dir))
    big.add_tokens([f"<extra_{i}>" for i in range(65_600)])
    assert len(big) > 65_536
    source = tmp_path / "s.txt"
    source.write_text("To be <extra_65599> or not to be <extra_65000>\n" * 8)
    dataset = prepare(source, big, "big", max_seq_len=15, chunk_size=4, cache_dir=tmp_path / "c")
    assert dataset.manifest["dtype"] == "uint32"
    assert np.load(dataset.path / "chunk-00000.npy").dtype == np.uint32
    stored = dataset.get(np.arange(dataset.num_sequences))
    extra_id = big.convert_tokens_to_ids("<extra_65599>")
    assert extra_id > 65_535 and (stored == extra_id).sum() >= 4  # not truncated to 16 bits


def test_manifest_records_what_made_the_dataset(two_plays: Path, tokenizer, tmp_path: Path):
    dataset = prepare(two_plays, tokenizer, max_seq_len=31, chunk_size=50, cache_dir=tmp_path / "cache",
                      text_mode="document", holdout_fraction=0.05)
    m = json.loads((dataset.path / "manifest.json").read_text())
    assert m == dataset.manifest
    assert m["format_version"] == 1
    assert m["tokenizer"] == {
        "name": "bpe-512",
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": 512,
        "eos_id": tokenizer.eos_token_id,
    }
    assert (m["seq_len"], m["window"], m["chunk_size"], m["dtype"]) == (31, 32, 50, "uint16")
    assert m["text_options"] == {"text_mode": "document", "ascii_only": False}  # text_field: .jsonl/.csv only
    assert [(s["name"], s["size"], s["samples"]) for s in m["sources"]] == [
        ("a.txt", (two_plays / "a.txt").stat().st_size, 1),
        ("b.txt", (two_plays / "b.txt").stat().st_size, 1),
    ]
    import hashlib

    assert m["sources"][0]["sha256"] == hashlib.sha256((two_plays / "a.txt").read_bytes()).hexdigest()
    n = m["counts"]["sequences"]
    assert m["holdout"] == {
        "fraction": 0.05,
        "num_train_sequences": n - math.ceil(0.05 * n),
        "num_holdout_sequences": math.ceil(0.05 * n),
    }
    assert m["created"] and m["fingerprint"].startswith(dataset.path.name)
    assert len(dataset.path.name) == 16


class CountingTokenizer:
    """The real tokenizer, counting the encode calls made through it or its Rust backend."""

    def __init__(self, inner):
        self.inner = inner
        self.encodes = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __call__(self, *args, **kwargs):
        self.encodes += 1
        return self.inner(*args, **kwargs)

    @property
    def backend_tokenizer(self):
        owner = self

        class CountingBackend:
            def __getattr__(self, name):
                attribute = getattr(owner.inner.backend_tokenizer, name)
                if not name.startswith("encode"):
                    return attribute

                def counted(*args, **kwargs):
                    owner.encodes += 1
                    return attribute(*args, **kwargs)

                return counted

        return CountingBackend()


def test_second_prepare_reuses_the_cached_dataset_without_tokenising(
    two_plays: Path, tokenizer, tmp_path: Path
):
    options = dict(max_seq_len=63, chunk_size=64, cache_dir=tmp_path / "cache", text_mode="document")
    counting = CountingTokenizer(tokenizer)
    first = prepare(two_plays, counting, **options)
    assert counting.encodes > 0
    stamps = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}

    counting.encodes = 0
    again = prepare(two_plays, counting, **options)
    assert counting.encodes == 0
    assert again.path == first.path
    assert {p.name: p.stat().st_mtime_ns for p in again.path.iterdir()} == stamps
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.path.name]  # no staging left


def test_a_changed_source_byte_tokenizer_or_option_gives_a_new_fingerprint(
    two_plays: Path, tokenizer, tokenizer_dir: Path, tmp_path: Path
):
    options = dict(max_seq_len=63, chunk_size=64, cache_dir=tmp_path / "cache", text_mode="document")
    base = prepare(two_plays, tokenizer, **options)

    changed_tokenizer = load_tokenizer(str(tokenizer_dir))
    changed_tokenizer.add_tokens(["<stage>"])
    by_tokenizer = prepare(two_plays, changed_tokenizer, **options)
    by_seq_len = prepare(two_plays, tokenizer, **{**options, "max_seq_len": 62})
    by_mode = prepare(two_plays, tokenizer, **{**options, "text_mode": "lines"})

    data = bytearray((two_plays / "b.txt").read_bytes())
    data[100] = ord("X") if data[100] != ord("X") else ord("Y")
    (two_plays / "b.txt").write_bytes(bytes(data))
    by_source = prepare(two_plays, tokenizer, **options)

    fingerprints = {d.fingerprint for d in (base, by_tokenizer, by_seq_len, by_mode, by_source)}
    assert len(fingerprints) == 5
    assert len({d.path for d in (base, by_tokenizer, by_seq_len, by_mode, by_source)}) == 5
    assert by_source.manifest["sources"][1]["sha256"] != base.manifest["sources"][1]["sha256"]


def test_fingerprint_depends_on_relative_names(tmp_path: Path):
    from aios.data.sources import SourceFile

    def fp(name):
        source = SourceFile(tmp_path / name, name, 3, "ab" * 32, True)
        return dataset_fingerprint([source], "tok", PrepareOptions(max_seq_len=8, chunk_size=4))

    assert fp("a.txt") != fp("b.txt")


def test_a_corrupt_manifest_is_prepared_again_with_a_warning(
    two_plays: Path, tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    options = dict(max_seq_len=63, chunk_size=64, cache_dir=tmp_path / "cache", text_mode="document")
    first = prepare(two_plays, tokenizer, **options)
    expected = first.get(np.arange(first.num_sequences))
    (first.path / "manifest.json").write_text('{"format_version": 1, "chunks": [')  # a torn write
    with caplog.at_level(logging.WARNING, logger="aios.data.prepare"):
        again = prepare(two_plays, tokenizer, **options)
    assert "is unusable and will be prepared again" in caplog.text and "corrupt" in caplog.text
    assert again.path == first.path
    assert np.array_equal(again.get(np.arange(again.num_sequences)), expected)

    (again.path / "chunk-00001.npy").unlink()  # a missing chunk is just as unusable
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aios.data.prepare"):
        third = prepare(two_plays, tokenizer, **options)
    assert "lacks 1 chunk files" in caplog.text
    assert (third.path / "chunk-00001.npy").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.path.name]


def test_holdout_is_the_last_sequences_in_stored_order(small_dataset: PreparedDataset):
    n = small_dataset.num_sequences
    assert small_dataset.num_holdout == math.ceil(0.1 * n) > 0
    assert small_dataset.num_train == n - small_dataset.num_holdout
    batches = list(small_dataset.holdout_batches(batch_size=10))
    assert [len(b) for b in batches[:-1]] == [10] * (len(batches) - 1)
    held_out = np.concatenate(batches)
    assert np.array_equal(held_out, small_dataset.get(np.arange(small_dataset.num_train, n)))
    assert len(list(small_dataset.holdout_batches(batch_size=10, max_batches=2))) == 2
    # An evaluation set prepared on its own is read the same way, from the start.
    everything = np.concatenate(list(small_dataset.sequential_batches(batch_size=64)))
    assert np.array_equal(everything, small_dataset.get(np.arange(n)))
    # The held-out tail cuts a chunk: that chunk's train part counts for training.
    assert small_dataset.train_sizes().sum() == small_dataset.num_train


def test_get_reads_only_the_chunks_it_needs(small_dataset: PreparedDataset):
    reader = PreparedDataset(small_dataset.path / "manifest.json")  # the manifest path works too
    ids = np.array([40, 3, 17, 41])  # chunks 2, 0, 1, 2 (16 sequences per chunk)
    rows = reader.get(ids)
    assert rows.shape == (4, 33) and rows.dtype == np.int64
    assert reader.opened_chunks == {0, 1, 2}
    for row, i in zip(rows, ids, strict=True):
        chunk = np.load(small_dataset.path / f"chunk-{i // 16:05d}.npy")
        assert np.array_equal(row, chunk[i % 16])
    with pytest.raises(IndexError):
        reader.get(np.array([reader.num_sequences]))


def test_options_that_affect_none_of_the_formats_leave_the_fingerprint_alone(tmp_path: Path, tokenizer, caplog):
    from aios.data import warn_unused_options

    text = tmp_path / "plays.txt"
    text.write_text("\n".join(f"Line {i} of the play, spoken aloud." for i in range(300)) + "\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"Row {i}.", "body": f"Body {i}."}) + "\n" for i in range(300)))
    both = tmp_path / "both"
    both.mkdir()
    for file in (text, rows):
        (both / file.name).write_bytes(file.read_bytes())

    def fingerprint(source, **options):
        return prepare(source, tokenizer, max_seq_len=15, chunk_size=32, cache_dir=tmp_path / "cache",
                       **options).fingerprint

    # --text-field only affects .jsonl/.csv, --text-mode only .txt: elsewhere they change nothing.
    assert fingerprint(text, text_field="body") == fingerprint(text)
    assert fingerprint(rows, text_mode="document") == fingerprint(rows)
    assert fingerprint(rows, text_field="body") != fingerprint(rows)
    assert fingerprint(both, text_field="body") != fingerprint(both)
    assert fingerprint(both, text_mode="document") != fingerprint(both)
    # The manifest records the options that apply.
    txt_only = prepare(text, tokenizer, max_seq_len=15, chunk_size=32, cache_dir=tmp_path / "c2")
    assert txt_only.manifest["text_options"] == {"text_mode": "lines", "ascii_only": False}
    jsonl_only = prepare(rows, tokenizer, max_seq_len=15, chunk_size=32, cache_dir=tmp_path / "c2")
    assert jsonl_only.manifest["text_options"] == {"text_field": "text", "ascii_only": False}

    # The caller warns about each one that had no effect on any of its datasets.
    document = PrepareOptions(max_seq_len=15, chunk_size=32, text_mode="document", text_field="body")
    with caplog.at_level(logging.WARNING, logger="aios.data.prepare"):
        assert warn_unused_options(document, [jsonl_only], PREPARE) == ["text_mode"]
        assert warn_unused_options(document, [txt_only], PREPARE) == ["text_field"]
        assert warn_unused_options(document, [txt_only, jsonl_only], PREPARE) == []
        assert warn_unused_options(PrepareOptions(max_seq_len=15, chunk_size=32), [txt_only], PREPARE) == []
    assert [r.getMessage() for r in caplog.records] == [
        f"--text-mode document has no effect: it only applies to .txt files and '{rows}' has none; drop --text-mode",
        f"--text-field body has no effect: it only applies to .jsonl/.csv files and '{text}' has none; "
        f"drop --text-field",
    ]


def test_fingerprints_of_datasets_prepared_with_default_options_are_unchanged(two_plays: Path, tokenizer, tmp_path):
    # Existing prepared caches (and the checkpoints that name their fingerprint) stay valid: the identity of
    # every option, applicable or not, is still part of the hash, exactly as before.
    import hashlib

    dataset = prepare(two_plays, tokenizer, max_seq_len=63, chunk_size=64, cache_dir=tmp_path / "cache",
                      text_mode="document", holdout_fraction=0.05)
    identity = {
        "format_version": 1,
        "sources": [[s["name"], s["sha256"]] for s in dataset.manifest["sources"]],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": 63, "chunk_size": 64, "text_mode": "document", "text_field": "text", "ascii_only": False,
        "holdout_fraction": 0.05,
    }
    assert dataset.fingerprint == hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def test_a_source_with_the_bytes_of_a_training_source_is_refused_before_tokenising(
    two_plays: Path, tokenizer, tmp_path: Path
):
    from aios.errors import AiosError

    train = prepare(two_plays, tokenizer, max_seq_len=63, chunk_size=64, cache_dir=tmp_path / "cache",
                    text_mode="document")
    copy = tmp_path / "held-out.txt"
    copy.write_bytes((two_plays / "b.txt").read_bytes())
    counting = CountingTokenizer(tokenizer)
    options = PrepareOptions(max_seq_len=63, chunk_size=64)
    with pytest.raises(AiosError, match=r"'.*held-out.txt' is part of the training data: it has the same bytes "
                                        r"as 'b.txt' of '.*plays'"):
        prepare_dataset(str(copy), counting, "bpe-512", options, flags=PREPARE, cache_dir=tmp_path / "cache",
                        disjoint_from=train)
    assert counting.encodes == 0
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [train.path.name]
    other = tmp_path / "other.txt"
    other.write_text((two_plays / "b.txt").read_text() + "One more line.\n")
    held_out = prepare_dataset(str(other), tokenizer, "bpe-512", options, flags=PREPARE,
                               cache_dir=tmp_path / "cache", disjoint_from=train)
    assert held_out.num_sequences > 0
