"""A prepared dataset on disk: `manifest.json` + `chunk-00000.npy`, ... (see prepare.py).

Sequences have global ids 0..N-1 in stored (document) order; chunk k holds ids
[offset_k, offset_k + n_k). The first `num_train` ids are for training, the rest are the held-out tail.
Chunk files are opened lazily with np.load(mmap_mode="r"), so a reader touches only the chunks it asks for.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from aios.atomic import atomic_write_text
from aios.errors import AiosError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
OPEN_CHUNKS_CACHED = 8  # memory maps kept open at once


def chunk_file_name(index: int) -> str:
    return f"chunk-{index:05d}.npy"


class PreparedDataset:
    """Read access to a prepared dataset directory."""

    prefetches = False  # a dataset whose chunks come over the network says so (aios.data.remote.CachedDataset)

    def __init__(self, path: str | Path, *, check_files: bool = True):
        path = Path(path)
        if path.name == MANIFEST_NAME:
            path = path.parent
        self.path = path
        self.manifest = _read_manifest(path, check_files=check_files)
        m = self.manifest
        self.window: int = m["window"]
        self.seq_len: int = m["seq_len"]
        self.vocab_size: int = m["tokenizer"]["vocab_size"]
        self.eos_id: int = m["tokenizer"]["eos_id"]
        self.fingerprint: str = m["fingerprint"]
        self.chunk_sizes = np.array([c["sequences"] for c in m["chunks"]], dtype=np.int64)
        self.chunk_offsets = np.concatenate([[0], np.cumsum(self.chunk_sizes)])  # (num_chunks + 1,)
        self.num_sequences = int(self.chunk_offsets[-1])
        self.num_holdout: int = m["holdout"]["num_holdout_sequences"]
        self.num_train: int = self.num_sequences - self.num_holdout
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self.opened_chunks: set[int] = set()  # every chunk id this reader has opened (for monitoring)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_sizes)

    def __len__(self) -> int:
        return self.num_sequences

    def __repr__(self) -> str:
        return (
            f"PreparedDataset('{self.path}', sequences={self.num_sequences}, train={self.num_train}, "
            f"holdout={self.num_holdout}, window={self.window}, chunks={self.num_chunks})"
        )

    def train_sizes(self) -> np.ndarray:
        """Train sequences per chunk (a chunk cut by the held-out tail counts only its train part)."""
        starts = self.chunk_offsets[:-1]
        return np.clip(self.num_train - starts, 0, self.chunk_sizes)

    def get(self, global_ids: np.ndarray) -> np.ndarray:
        """Sequences by global id: (len(global_ids), window) int64, in the order asked."""
        ids = np.asarray(global_ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_sequences):
            raise IndexError(f"sequence ids must lie in [0, {self.num_sequences})")
        out = np.empty((len(ids), self.window), dtype=np.int64)
        chunk_of = np.searchsorted(self.chunk_offsets, ids, side="right") - 1
        for chunk in np.unique(chunk_of):
            rows = np.nonzero(chunk_of == chunk)[0]
            out[rows] = self._chunk(int(chunk))[ids[rows] - self.chunk_offsets[chunk]]
        return out

    def unigram_entropy(self) -> float:
        """Entropy (nats per token) of the train tokens' unigram distribution: the loss of a model that
        ignores context, the baseline a trained model's eval loss should fall well below. Computed once
        and kept in `stats.json` beside the manifest."""
        stats_path = self.path / "stats.json"
        try:
            return float(json.loads(stats_path.read_text())["unigram_entropy"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for start in range(0, self.num_train, 4096):
            rows = self.get(np.arange(start, min(start + 4096, self.num_train)))  # (n, window)
            counts += np.bincount(rows[:, 1:].ravel(), minlength=self.vocab_size)[: self.vocab_size]
        p = counts[counts > 0] / max(1, counts.sum())
        entropy = float(-(p * np.log(p)).sum())
        try:
            atomic_write_text(stats_path, json.dumps({"unigram_entropy": entropy}) + "\n")
        except OSError:  # a read-only cache still works; the value is recomputed next time
            pass
        return entropy

    def holdout_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[np.ndarray]:
        """The held-out sequences in stored order, in batches of (<= batch_size, window) int64."""
        return self.sequential_batches(batch_size, max_batches, start=self.num_train)

    def sequential_batches(
        self, batch_size: int, max_batches: int | None = None, *, start: int = 0, stop: int | None = None
    ) -> Iterator[np.ndarray]:
        """Sequences start..stop-1 in stored order, in batches (e.g. all of a separate evaluation set)."""
        stop = self.num_sequences if stop is None else stop
        for count, first in enumerate(range(start, stop, batch_size)):
            if max_batches is not None and count >= max_batches:
                return
            yield self.get(np.arange(first, min(first + batch_size, stop)))

    def prefetch(self, chunks) -> None:
        """A hint: these chunks are read soon (the chunks on disk need nothing)."""

    def _chunk(self, index: int) -> np.ndarray:
        rows = self._open.get(index)
        if rows is not None:
            self._open.move_to_end(index)
            return rows
        file = self.path / self.manifest["chunks"][index]["file"]
        try:
            rows = np.load(file, mmap_mode="r")  # (n, window)
        except (OSError, ValueError) as exc:
            raise AiosError(
                f"prepared chunk '{file}' cannot be read ({exc}): delete '{self.path}' to prepare it again"
            ) from None
        if rows.shape != (self.chunk_sizes[index], self.window):
            raise AiosError(
                f"prepared chunk '{file}' has shape {rows.shape}, the manifest says "
                f"({self.chunk_sizes[index]}, {self.window}): delete '{self.path}' to prepare it again"
            )
        self._open[index] = rows
        self.opened_chunks.add(index)
        if len(self._open) > OPEN_CHUNKS_CACHED:
            self._open.popitem(last=False)
        return rows


def _read_manifest(directory: Path, *, check_files: bool = True) -> dict:
    """The manifest, checked for the fields and files readers rely on; AiosError when unusable."""
    file = directory / MANIFEST_NAME
    fix = f"delete '{directory}' and prepare the dataset again (aios data prepare)"
    if not file.is_file():
        raise AiosError(f"'{directory}' is not a prepared dataset directory (no {MANIFEST_NAME}): pass "
                        f"<cache-dir>/<fingerprint>/ as printed by `aios data prepare`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
        version = manifest["format_version"]
        if version != FORMAT_VERSION:
            raise AiosError(
                f"prepared dataset '{directory}' has format version {version}, this aios reads "
                f"{FORMAT_VERSION}: {fix}"
            )
        window, chunks = int(manifest["window"]), manifest["chunks"]
        ok = (
            window == int(manifest["seq_len"]) + 1
            and isinstance(manifest["fingerprint"], str)
            and int(manifest["tokenizer"]["vocab_size"]) > 0
            and int(manifest["tokenizer"]["eos_id"]) >= 0
            and len(chunks) > 0
            and all(c["file"] == chunk_file_name(i) and int(c["sequences"]) > 0 for i, c in enumerate(chunks))
        )
        total = sum(int(c["sequences"]) for c in chunks)
        holdout = int(manifest["holdout"]["num_holdout_sequences"])
        ok = ok and 0 <= holdout < total
    except AiosError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise AiosError(
            f"the manifest of '{directory}' is corrupt ({type(exc).__name__}: {exc}): {fix}"
        ) from None
    if not ok:
        raise AiosError(f"the manifest of '{directory}' is inconsistent: {fix}")
    missing = [c["file"] for c in chunks if check_files and not (directory / c["file"]).is_file()]
    if missing:
        raise AiosError(
            f"prepared dataset '{directory}' lacks {len(missing)} chunk files ({missing[0]}, ...): {fix}"
        )
    return manifest
