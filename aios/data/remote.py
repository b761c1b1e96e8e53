"""Prepared data in run storage, read by workers through a node-local chunk cache.

With an s3:// `--storage-path`, the driver prepares the data as always (in its --data-cache-dir) and then
publishes the prepared directory once into `<storage-path>/data/<fingerprint[:16]>/`: the chunk files and
stats.json first, manifest.json last (a reader that finds the manifest finds every chunk). A later run with
the same fingerprint finds the manifest and uploads nothing.

Workers never open the driver's directory: each opens a `CachedDataset`, which downloads the manifest and
then the chunk files its reads need into a node-local cache (`$AIOS_CACHE_DIR/chunks/<fingerprint[:16]>/`,
default ~/.cache/aios), shared by the workers of a node and kept within `$AIOS_CACHE_LIMIT_GB` (default 10)
by deleting the least recently used chunks (a chunk a reader has mapped stays readable; one downloaded and
not yet opened is never deleted). The chunk sampler tells it which chunk each
of its slots reads next (`prefetch`), and two background threads download those while training goes on, so
a step waits only for a chunk that was not asked for in time. It counts cache hits, downloads, bytes and
the time a read waited (stall), which the trainer adds to each step's metrics.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from aios.data.dataset import MANIFEST_NAME, PreparedDataset
from aios.errors import AiosError
from aios.storage import Storage, open_storage

log = logging.getLogger(__name__)

DATA = "data"  # under the storage path
STATS_NAME = "stats.json"
CACHE_ENV = "AIOS_CACHE_DIR"
CACHE_LIMIT_ENV = "AIOS_CACHE_LIMIT_GB"
DEFAULT_CACHE_LIMIT_GB = 10.0
PREFETCH_THREADS = 2
TOUCH_EVERY_S = 10.0  # how often a chunk read from an open memory map is marked as used (its mtime)


def _touch(path: Path) -> None:
    """Mark a chunk file as recently used (gone already: nothing to mark; a read finds out)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def _done() -> Future:
    future: Future = Future()
    future.set_result(None)
    return future


def remote_location(storage_path: str, dataset: PreparedDataset) -> str:
    return f"{storage_path.rstrip('/')}/{DATA}/{dataset.fingerprint[:16]}"


def publish_prepared(dataset: PreparedDataset, storage_path: str, endpoint_url: str | None = None) -> str:
    """Upload a prepared dataset into run storage once (manifest last); returns its location. Each file is
    retried on its own; a file an earlier, interrupted upload left at its full size is not uploaded again."""
    import json

    from aios.train.remote import with_retries

    location = remote_location(storage_path, dataset)
    storage = open_storage(location, endpoint_url)

    def retried(operation, what: str):
        return with_retries(operation, f"{what} of the prepared data {location}",
                            lambda problem: f"cannot upload the prepared data to {location} ({problem}); rerun once "
                                            f"the storage answers")

    held = retried(storage.sizes, "listing")
    if MANIFEST_NAME in held:
        log.info("reusing the prepared data %s (%d chunks)", location, dataset.num_chunks)
        return location
    for chunk in dataset.manifest["chunks"]:
        local = dataset.path / chunk["file"]
        if held.get(chunk["file"]) != local.stat().st_size:
            retried(lambda local=local, name=chunk["file"]: storage.upload_file(local, name), "upload")
    # the entropy the trainers log: stored with the data, so that no worker reads every chunk to compute it
    stats = json.dumps({"unigram_entropy": dataset.unigram_entropy()}) + "\n"
    retried(lambda: storage.write_bytes(STATS_NAME, stats.encode()), "upload")
    retried(lambda: storage.upload_file(dataset.path / MANIFEST_NAME, MANIFEST_NAME), "upload")  # last
    log.info("uploaded the prepared data %s (%d chunks)", location, dataset.num_chunks)
    return location


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "aios") / "chunks"


def cache_limit_bytes() -> int:
    try:
        return int(float(os.environ.get(CACHE_LIMIT_ENV, DEFAULT_CACHE_LIMIT_GB)) * 2**30)
    except ValueError:
        raise AiosError(f"${CACHE_LIMIT_ENV}={os.environ[CACHE_LIMIT_ENV]!r} is not a number of GB; set e.g. "
                        f"{CACHE_LIMIT_ENV}=10") from None


class CachedDataset(PreparedDataset):
    """A prepared dataset in run storage, read through this node's chunk cache (see the module docstring)."""

    prefetches = True

    def __init__(self, location: str, endpoint_url: str | None = None, *, cache_dir: Path | None = None,
                 limit_bytes: int | None = None):
        self.storage: Storage = open_storage(location, endpoint_url)
        self.location = location
        directory = (cache_dir or cache_root()) / location.rstrip("/").rpartition("/")[2]
        directory.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST_NAME, STATS_NAME):  # published together: the manifest last
            self._retrying(lambda name=name: self._download(name, directory / name), name)
        super().__init__(directory, check_files=False)
        self.limit = cache_limit_bytes() if limit_bytes is None else limit_bytes
        self.hits = self.downloads = self.bytes_downloaded = 0
        self.stall_s = 0.0
        self.downloaded_chunks: list[int] = []  # every chunk this reader downloaded, in order
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._fresh: set[int] = set()  # downloaded, not opened yet: never evicted by this process
        self._touched: dict[int, float] = {}  # when each open chunk's file was last marked as used
        self._pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="aios-prefetch")

    def cache_counters(self) -> list[float]:
        """Cumulative [hits, downloads, bytes, stall seconds] of this reader."""
        with self._lock:
            return [float(self.hits), float(self.downloads), float(self.bytes_downloaded), self.stall_s]

    def prefetch(self, chunks) -> None:
        for index in chunks:
            if int(index) not in self._open:  # mapped: readable whatever happens to its file
                self._fetch(int(index))

    def _chunk(self, index: int) -> np.ndarray:
        if index in self._open:
            now = time.monotonic()
            if now - self._touched.get(index, 0.0) > TOUCH_EVERY_S:  # still in use: not the least recent
                self._touched[index] = now
                _touch(self.path / self._name(index))
            return super()._chunk(index)
        started = time.perf_counter()
        waited = False
        for attempt in range(3):
            future = self._fetch(index, now=True)
            if future is not None:
                waited = True
                future.result()  # a prefetch under way: the read waits for it
            try:
                _touch(self.path / self._name(index))  # recently used
                rows = super()._chunk(index)
                break
            except (AiosError, FileNotFoundError):
                # another worker of this node evicted it between the download and the open: fetch it again
                if (self.path / self._name(index)).is_file() or attempt == 2:
                    raise
        with self._lock:
            if waited:
                self.stall_s += time.perf_counter() - started
            else:
                self.hits += 1
            self._fresh.discard(index)
        self._touched[index] = time.monotonic()
        return rows

    def _fetch(self, index: int, *, now: bool = False) -> Future | None:
        """None when the chunk is on disk (or, with `now`, was downloaded by this call, in this thread: a read
        that needs it does not queue behind prefetches); else its download under way, or started now on a
        prefetch thread (one that failed is started again)."""
        with self._lock:
            pending = self._pending.get(index)
            if pending is not None and not pending.done():
                return pending
            failed = pending is not None and pending.exception() is not None
            if not failed and (self.path / self._name(index)).is_file():
                return None
            if not now:
                future = self._pool.submit(self._download_chunk, index)
                self._pending[index] = future
                return future
        self._download_chunk(index)
        return _done()

    def _download_chunk(self, index: int) -> None:
        """Download one chunk, unless another worker of this node did it meanwhile (a lock file per chunk)."""
        name = self._name(index)
        target = self.path / name
        with open(self.path / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if target.is_file():
                    return  # another worker of this node downloaded it while this one waited
                size = self._retrying(lambda: self._download(name, target), name)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        with self._lock:
            self.downloads += 1
            self.bytes_downloaded += size
            self.downloaded_chunks.append(index)
            self._fresh.add(index)
            self._evict()

    def _download(self, name: str, target: Path) -> int:
        """`name` into `target`, whole or not at all (a worker of this node may read it at once); its size."""
        partial = target.with_name(f".{name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            self.storage.download_file(name, partial)
            size = partial.stat().st_size
            os.replace(partial, target)
            return size
        finally:
            partial.unlink(missing_ok=True)

    def _retrying(self, operation, name: str):
        from aios.train.remote import with_retries

        return with_retries(operation, f"download of {self.location}/{name}",
                            lambda problem: f"cannot download {self.location}/{name} ({problem}): rerun with "
                                            f"--resume once the storage answers")

    def _evict(self) -> None:
        """(Holding the lock.) Delete the least recently used chunk files beyond the size limit. A chunk a reader
        has mapped stays readable when its file is deleted (POSIX); one this process downloaded and has not
        opened yet is kept; files another worker of the node deletes meanwhile are skipped."""
        files = []
        for entry in os.scandir(self.path):
            if entry.name.startswith("chunk-") and entry.name.endswith(".npy"):
                try:
                    info = entry.stat()
                except FileNotFoundError:
                    continue
                files.append((info.st_mtime, info.st_size, entry.name))
        total = sum(size for _, size, _ in files)
        keep = {self._name(i) for i in self._fresh}
        for _, size, name in sorted(files):
            if total <= self.limit:
                break
            if name not in keep:
                (self.path / name).unlink(missing_ok=True)
                total -= size

    def _name(self, index: int) -> str:
        return self.manifest["chunks"][index]["file"]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def open_cached(location: str, endpoint_url: str | None = None) -> CachedDataset:
    dataset = CachedDataset(location, endpoint_url)
    log.info("reading the prepared data %s through the chunk cache %s", location, dataset.path)
    return dataset
