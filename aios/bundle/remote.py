"""Brain bundles in a remote bundle dir (`s3://bucket/prefix`): push, pull, list.

Layout under the bundle dir, for brain NAME:

    NAME/objects/<sha256>           the content of every file pushed, once, named by its sha256
    NAME/LATEST.json                {"version", "pushed", "files": {path: {"sha256", "size"}}, "metadata"}

A push uploads the objects the remote does not hold yet (a brain pushed again after more training uploads
only what changed: new checkpoints, the weights, the metadata), then writes LATEST.json in one PUT: a reader
sees the previous version or the new one, whole, never a half-uploaded one (S3 has no rename). Objects
that neither the new nor the previous LATEST.json lists are then deleted (the previous version stays
readable for a reader that read LATEST.json just before; a push that died half-way left only such objects).
A pull reads LATEST.json, downloads exactly the files it lists, checks every size and sha256, and installs
the copy under the local bundle dir in one rename.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from pathlib import Path, PurePosixPath

from aios.atomic import fsync_tree, install_dir, make_staging_dir
from aios.bundle import CHECKPOINTS, METADATA, BrainBundle
from aios.errors import AiosError
from aios.hashing import sha256_file
from aios.paths import HIDDEN_PREFIX
from aios.storage import Storage

LATEST = "LATEST.json"
PULLED = ".pulled.json"  # in a pulled copy: its source and version (hidden: never pushed)
REMOTE_CACHE = ".remote"  # under a local bundle dir: copies of remote brains that generate and eval opened
OBJECTS = "objects"
FORMAT = 1


def bundle_files(bundle: BrainBundle, *, checkpoints: bool) -> list[str]:
    """The bundle's files to push, relative and sorted: no hidden entries (staging), at any depth."""
    files = []
    for path in sorted(bundle.root.rglob("*")):
        relative = path.relative_to(bundle.root)
        if any(part.startswith(HIDDEN_PREFIX) for part in relative.parts) or not path.is_file():
            continue
        if not checkpoints and relative.parts[0] == CHECKPOINTS:
            continue
        files.append(relative.as_posix())
    return files


def push(bundle: BrainBundle, remote: Storage, *, checkpoints: bool = True) -> dict:
    """Upload `bundle` as a new version of remote/<name>; returns the LATEST.json record written, with the
    bytes this push uploaded under "uploaded" (not stored)."""
    problem = bundle.missing()
    if problem:
        raise AiosError(f"'{bundle.root}' is not a brain bundle ({problem}): push a trained brain")
    remote.check()
    name = bundle.name
    held = set(remote.list_files(f"{name}/{OBJECTS}"))
    files, uploaded = {}, 0
    for relative in bundle_files(bundle, checkpoints=checkpoints):
        local = bundle.root / relative
        digest = sha256_file(local)
        files[relative] = {"sha256": digest, "size": local.stat().st_size}
        if digest not in held:
            remote.upload_file(local, f"{name}/{OBJECTS}/{digest}")
            held.add(digest)
            uploaded += files[relative]["size"]
    previous = _latest(remote, name)
    version = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    record = {"format": FORMAT, "name": name, "version": version, "pushed": time.strftime("%Y-%m-%dT%H:%M:%SZ",
              time.gmtime()), "files": files, "metadata": bundle.metadata()}
    remote.write_bytes(f"{name}/{LATEST}", (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    listed = {f["sha256"] for r in (record, previous or {"files": {}}) for f in r["files"].values()}
    for digest in held - listed:
        remote.delete_file(f"{name}/{OBJECTS}/{digest}")
    return {**record, "uploaded": uploaded}


def split_remote_brain(source: str) -> tuple[str, str]:
    """s3://BUCKET/PREFIX/NAME -> (s3://BUCKET/PREFIX, NAME)."""
    parent, _, name = source.rstrip("/").rpartition("/")
    if not name or not parent or parent.endswith(":/"):
        raise AiosError(f"{source}: expected the remote brain as s3://BUCKET/PREFIX/NAME")
    return parent, name


def pull(remote: Storage, name: str, bundle_dir: Path, *, replace: bool = False) -> BrainBundle:
    """Download remote/<name>'s latest version into bundle_dir/<name> (checked file by file, installed in one
    rename), with PULLED recording where it came from. An existing local bundle of that name is refused
    unless `replace`."""
    remote.check()
    return _pull(remote, name, _latest_or_refuse(remote, name), Path(bundle_dir) / name, replace=replace)


def cached_brain(source: str, bundle_dir: Path, endpoint_url: str | None = None) -> BrainBundle:
    """A local copy of the remote brain `source` (s3://BUCKET/PREFIX/NAME) for generate and eval: kept under
    <bundle_dir>/.remote/ (hidden from `brains list`), downloaded again only when a newer version was pushed."""
    from aios.storage import open_storage

    parent, name = split_remote_brain(source)
    remote = open_storage(parent, endpoint_url)
    remote.check()
    record = _latest_or_refuse(remote, name)
    final = local_copy(remote, name, Path(bundle_dir))
    marker = final / PULLED
    if marker.is_file() and BrainBundle(final).missing() is None:
        try:
            if json.loads(marker.read_text()).get("version") == record["version"]:
                return BrainBundle(final)
        except ValueError:
            pass  # a damaged marker: pull again
    return _pull(remote, name, record, final, replace=True)


def local_copy(remote: Storage, name: str, bundle_dir: Path) -> Path:
    """Where the local copy of remote/<name> lives under a local bundle dir (for generate/eval and for training)."""
    return Path(bundle_dir) / REMOTE_CACHE / remote.bucket / remote.path().partition("/")[2] / name


def _latest_or_refuse(remote: Storage, name: str) -> dict:
    record = _latest(remote, name)
    if record is None:
        raise AiosError(f"{remote.describe(name)}: no brain there (no {LATEST}); see `aios brains list "
                        f"--bundle-dir {remote.uri}`")
    return record


def _pull(remote: Storage, name: str, record: dict, final: Path, *, replace: bool) -> BrainBundle:
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not replace:
        raise AiosError(f"{final} already exists: pass --force to replace it with the pulled copy, or "
                        f"--bundle-dir elsewhere")
    _check_listing(remote, name, record)
    staging = make_staging_dir(final)
    try:
        for relative, expected in record["files"].items():
            local = staging / relative
            remote.download_file(f"{name}/{OBJECTS}/{expected['sha256']}", local)
            if local.stat().st_size != expected["size"] or sha256_file(local) != expected["sha256"]:
                raise AiosError(f"{remote.describe(name)}: {relative} of version {record['version']} does not match "
                                f"its recorded size and sha256 (changed after the push?); push the brain again")
        (staging / PULLED).write_text(json.dumps({"source": remote.describe(name), "version": record["version"]})
                                      + "\n")
        fsync_tree(staging)
        if not install_dir(staging, final, replace=replace):
            raise AiosError(f"{final} appeared while pulling: pass --force to replace it with the pulled copy")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BrainBundle(final)


def list_remote(remote: Storage) -> list[dict]:
    """The LATEST.json record of every brain under the remote bundle dir."""
    remote.check()
    records = []
    for name in remote.list_dirs():
        record = _latest(remote, name)
        if record is not None:
            records.append(record)
    return records


def _latest(remote: Storage, name: str) -> dict | None:
    if not remote.exists(f"{name}/{LATEST}"):
        return None
    try:
        record = json.loads(remote.read_bytes(f"{name}/{LATEST}"))
    except ValueError as exc:
        raise AiosError(f"{remote.describe(name)}/{LATEST} is not valid JSON ({exc}); push the brain again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("files"), dict):
        raise AiosError(f"{remote.describe(name)}/{LATEST}: not a record this aios reads (format "
                        f"{record.get('format') if isinstance(record, dict) else '?'}); push the brain again")
    return record


def _check_listing(remote: Storage, name: str, record: dict) -> None:
    """Refuse, before anything is written, a LATEST.json whose names could leave the bundle directory (absolute,
    "..", hidden parts) or whose digests are not sha256 hex: the record comes from whoever can write the bucket."""
    for relative, expected in record["files"].items():
        parts = PurePosixPath(relative).parts if isinstance(relative, str) else ()
        digest = expected.get("sha256") if isinstance(expected, dict) else None
        if (not parts or relative.startswith("/") or "\\" in relative
                or any(p in ("", ".", "..") or p.startswith(HIDDEN_PREFIX) for p in parts)
                or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest)
                or not isinstance(expected.get("size"), int)):
            raise AiosError(f"{remote.describe(name)}/{LATEST} lists {relative!r}, which is not a file of a bundle "
                            f"(a path inside it with a sha256 and a size); nothing was pulled: push the brain again")


__all__ = ["LATEST", "METADATA", "bundle_files", "cached_brain", "list_remote", "pull", "push"]
