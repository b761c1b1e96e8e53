"""A training run's s3:// locations: `--bundle-dir s3://...` and `--dataset-file s3://...`.

Bundle. A run whose --bundle-dir is remote trains in a local copy of the brain (the same copy `generate` and
`eval --brain s3://...` open: `<local bundle dir>/.remote/<bucket>/<prefix>/<name>`, hidden from `brains
list`) and pushes it (aios.bundle.remote: content-addressed objects, then LATEST.json in one PUT) after every
checkpoint and once more at the end, checkpoints included, so the remote brain always holds a whole version
that `aios brains pull` brings home and a later run resumes from. Before training, the copy is brought up to
the remote's version: kept when it is the version it last pushed or pulled (it may hold newer checkpoints that
a failed push did not carry), else pulled again. A push that fails is retried with backoff for
$AIOS_STORAGE_RETRY_S seconds (default 60), then the run stops in one line; the remote keeps its previous
version, the local copy keeps everything, and a rerun with --resume pushes it.

Data. A remote --dataset-file (one object, or every object directly under a prefix) is downloaded into
`<data cache>/sources/<hash of the URI>/` and prepared from there as a local file is; it is downloaded again
only when an object's size or modification time changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from aios.atomic import atomic_write_text
from aios.bundle import BrainBundle
from aios.errors import AiosError
from aios.paths import DEFAULT_BUNDLE_DIR
from aios.storage import is_remote, open_storage

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_ENV = "AIOS_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 60.0
SOURCES = "sources"  # under the data cache: downloaded remote sources
SOURCE_RECORD = ".source.json"


def retry_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError:
        raise AiosError(f"${RETRY_ENV}={os.environ[RETRY_ENV]!r} is not a number of seconds; set e.g. "
                        f"{RETRY_ENV}=60") from None


class RemoteBrain:
    """The remote home (s3://BUCKET/PREFIX/NAME) of a training run's bundle, and its local working copy."""

    def __init__(self, bundle_dir: str, name: str, endpoint_url: str | None = None,
                 local_bundle_dir: str | Path = DEFAULT_BUNDLE_DIR):
        from aios.bundle.remote import local_copy

        self.storage = open_storage(bundle_dir, endpoint_url)
        self.name = name
        self.local = BrainBundle(local_copy(self.storage, name, Path(local_bundle_dir)))

    @classmethod
    def of(cls, config) -> RemoteBrain | None:
        """The remote bundle of a TrainingConfig, or None when its --bundle-dir is local."""
        if not is_remote(config.bundle_dir):
            return None
        return cls(config.bundle_dir, config.brain_name, config.s3_endpoint_url, config.local_bundle_dir)

    def describe(self) -> str:
        return self.storage.describe(self.name)

    def bring_up_to_date(self) -> BrainBundle:
        """Before a run (the driver): refuse an unusable bucket/endpoint/credentials in one line, then make the
        local copy hold the remote's version (see the module docstring). Returns the local copy."""
        from aios.bundle.remote import PULLED, _latest, _pull

        self.storage.check()
        record = _latest(self.storage, self.name)
        if record is None:
            return self.local  # nothing pushed yet: a new brain (or a copy whose first push failed)
        try:
            synced = json.loads((self.local.root / PULLED).read_text()).get("version")
        except (OSError, ValueError, AttributeError):
            synced = None
        if synced == record["version"] and self.local.missing() is None:
            return self.local
        log.info("pulling brain %s (version %s) into %s", self.describe(), record["version"], self.local.root)
        _pull(self.storage, self.name, record, self.local.root, replace=True)
        return self.local

    def push(self) -> dict:
        """Push the local copy (checkpoints included) as a new version, retrying with backoff; record the
        version in the copy. Raises AiosError in one line when the storage does not answer in time."""
        from aios.bundle.remote import PULLED, push

        record = with_retries(
            lambda: push(self.local, self.storage, checkpoints=True), f"push to {self.describe()}",
            lambda problem: f"cannot push brain '{self.name}' to {self.describe()} ({problem}); the remote keeps its "
                            f"previous version, {self.local.root} holds this run's work: rerun with --resume once the "
                            f"storage answers")
        atomic_write_text(self.local.root / PULLED,
                          json.dumps({"source": self.describe(), "version": record["version"]}) + "\n")
        return record


def with_retries(operation: Callable[[], T], what: str, failure: Callable[[str], str]) -> T:
    """`operation()`, retried with backoff while it fails with AiosError (a storage that does not answer) for
    $AIOS_STORAGE_RETRY_S seconds; then AiosError(failure(its last one-line error))."""
    deadline = time.monotonic() + retry_seconds()
    delay = 0.5
    while True:
        try:
            return operation()
        except AiosError as exc:
            if time.monotonic() + delay > deadline:
                raise AiosError(failure(str(exc))) from None
            log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def training_bundle(config) -> BrainBundle:
    """The bundle a run writes: <bundle-dir>/<brain-name>, or the local copy of a remote one; with --expert-id
    the expert's directory <experts-dir>/<expert-id>."""
    if config.expert_id:
        from aios.experts import expert_bundle

        return expert_bundle(config)
    remote = RemoteBrain.of(config)
    return remote.local if remote is not None else BrainBundle.for_run(config.bundle_dir, config.brain_name)


def download_remote_source(uri: str, cache_dir: str | Path, endpoint_url: str | None, flag: str) -> Path:
    """A local copy of the remote training text `uri` (one object, or the objects directly under a prefix),
    downloaded only when it changed since the last download; returns the file or directory to prepare."""
    from pyarrow import fs

    parent, _, leaf = uri.rstrip("/").rpartition("/")
    storage = open_storage(parent, endpoint_url)
    storage.check()
    info = storage._call(lambda: storage.filesystem().get_file_info(storage.path(leaf)), leaf)
    if info.type == fs.FileType.File:
        objects = {leaf: (info.size, info.mtime_ns)}
        source = storage
    elif info.type == fs.FileType.Directory:
        source = open_storage(uri.rstrip("/"), endpoint_url)
        selector = fs.FileSelector(source.path(), allow_not_found=True)
        infos = source._call(lambda: source.filesystem().get_file_info(selector), "")
        objects = {i.base_name: (i.size, i.mtime_ns) for i in infos if i.type == fs.FileType.File and i.base_name}
        if not objects:
            raise AiosError(f"{flag} {uri}: no objects under that prefix; upload the .txt/.jsonl/.csv files there")
    else:
        raise AiosError(f"{flag} {uri}: no such object or prefix{storage._where()}; check the key (see `aws s3 ls`)")
    key = hashlib.sha256(f"{uri.rstrip('/')}|{storage.endpoint_url}".encode()).hexdigest()[:16]
    target = Path(cache_dir) / SOURCES / key
    record = {"uri": uri, "objects": {name: list(v) for name, v in sorted(objects.items())}}
    try:
        if json.loads((target / SOURCE_RECORD).read_text()) == record:
            log.info("reusing the download of %s in %s", uri, target)
            return target / leaf if info.type == fs.FileType.File else target
    except (OSError, ValueError):
        pass
    staging = target.with_name(f".{key}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for name in objects:
            source.download_file(name, staging / name)
        (staging / SOURCE_RECORD).write_text(json.dumps(record) + "\n")
        shutil.rmtree(target, ignore_errors=True)  # an older download of the same URI (aios's own directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("downloaded %s (%d object%s) into %s", uri, len(objects), "" if len(objects) == 1 else "s", target)
    return target / leaf if info.type == fs.FileType.File else target


def with_local_sources(config):
    """The config with its s3:// --dataset-file / --eval-file replaced by their local downloads."""
    changes = {}
    for name, flag in (("dataset_file", "--dataset-file"), ("eval_file", "--eval-file")):
        value = getattr(config, name)
        if value and is_remote(value):
            changes[name] = str(download_remote_source(value, config.data_cache_dir, config.s3_endpoint_url, flag))
    return config.replace(**changes, check_paths=False) if changes else config


__all__ = ["RemoteBrain", "download_remote_source", "training_bundle", "with_local_sources"]
