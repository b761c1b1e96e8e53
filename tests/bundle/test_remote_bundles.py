"""`aios brains push | pull | list` against a real S3-compatible HTTP endpoint: moto's ThreadedMotoServer on
127.0.0.1 (as Ray's own test suite does), a bucket made by the test, the real CLI in a subprocess.

Every command runs with a planted secret as its AWS secret key: it must appear in no output, no error and
no stored object."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.cli.test_train_e2e import TINY, aios

SECRET = "PLANTED-secret-value-7f3a9c"
BUCKET = "aios-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port, with credentials (a planted secret) and a bucket; stopped after."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "aios-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    try:
        yield {"endpoint": env["AWS_ENDPOINT_URL"], "client": client, "server": server}
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote")
    aios("hrm-hf", "train-actv1", *TINY, "--steps", 2, "--checkpoint-every", 1, "--bundle-dir", out / "brains",
         "--data-cache-dir", out / "cache", "--brain-name", "pushed")
    return out / "brains" / "pushed"


def keys(client, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def no_secret(*results) -> None:
    for result in results:
        assert SECRET not in result.stdout + result.stderr


def test_push_then_pull_brings_the_same_brain_home_and_it_generates(s3, brain, tmp_path):
    pushed = aios("brains", "push", "pushed", "--bundle-dir", brain.parent, "--to", f"s3://{BUCKET}/brains")
    assert pushed.stdout.startswith(f"pushed pushed to s3://{BUCKET}/brains/pushed: version ")
    stored = keys(s3["client"], "brains/pushed/")
    [version] = {k.split("/")[3] for k in stored if "/versions/" in k}
    local_files = sorted(p.relative_to(brain).as_posix() for p in brain.rglob("*") if p.is_file())
    assert stored == sorted([f"brains/pushed/versions/{version}/{f}" for f in local_files]
                            + ["brains/pushed/LATEST.json"])  # everything, under the prefix, and the pointer
    listed = aios("brains", "list", "--bundle-dir", f"s3://{BUCKET}/brains")
    assert "pushed" in listed.stdout and str(len(local_files)) in listed.stdout

    home = tmp_path / "home"
    pulled = aios("brains", "pull", f"s3://{BUCKET}/brains/pushed", "--bundle-dir", home)
    assert pulled.stdout.strip() == f"pulled s3://{BUCKET}/brains/pushed into {home / 'pushed'}"
    for name in local_files:  # byte for byte
        assert (home / "pushed" / name).read_bytes() == (brain / name).read_bytes(), name
    generated = aios("hrm-hf", "generate", "--brain", "pushed", "--bundle-dir", home, "--prompt", "ROMEO:",
                     "--max-new-tokens", 4)
    assert generated.stdout.strip()
    again = aios("brains", "pull", f"s3://{BUCKET}/brains/pushed", "--bundle-dir", home, check=False)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].endswith(
        "already exists: pass --force to replace it with the pulled copy, or --bundle-dir elsewhere")
    no_secret(pushed, listed, pulled, again)
    for key in keys(s3["client"]):
        body = s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert SECRET.encode() not in body, key


def test_a_reader_sees_the_previous_version_until_a_push_is_complete(s3, brain, tmp_path):
    from aios.bundle.remote import LATEST
    from aios.storage import open_storage

    aios("brains", "push", "pushed", "--bundle-dir", brain.parent, "--to", f"s3://{BUCKET}/halves", "--no-checkpoints")
    first = json.loads(s3["client"].get_object(Bucket=BUCKET, Key=f"halves/pushed/{LATEST}")["Body"].read())
    assert not any(f.startswith("checkpoints/") for f in first["files"])
    # a second push that died half-way: some files of a new version uploaded, LATEST.json not yet switched
    remote = open_storage(f"s3://{BUCKET}/halves")
    remote.write_bytes("pushed/versions/20991231T000000Z-deadbeef/model.safetensors", b"half a model")
    pulled = aios("brains", "pull", f"s3://{BUCKET}/halves/pushed", "--bundle-dir", tmp_path)
    assert (tmp_path / "pushed" / "model.safetensors").read_bytes() == (brain / "model.safetensors").read_bytes()
    # a completed push switches readers to it and keeps one previous version, no older
    for _ in range(2):
        aios("brains", "push", "pushed", "--bundle-dir", brain.parent, "--to", f"s3://{BUCKET}/halves",
             "--no-checkpoints")
    latest = json.loads(s3["client"].get_object(Bucket=BUCKET, Key=f"halves/pushed/{LATEST}")["Body"].read())
    versions = {k.split("/")[3] for k in keys(s3["client"], "halves/pushed/versions/")} - {""}  # not the marker
    assert latest["version"] in versions and len(versions) == 2 and first["version"] not in versions
    no_secret(pulled)


def test_a_pulled_file_that_does_not_match_its_record_is_refused_and_nothing_is_installed(s3, brain, tmp_path):
    aios("brains", "push", "pushed", "--bundle-dir", brain.parent, "--to", f"s3://{BUCKET}/tampered",
         "--no-checkpoints")
    [key] = [k for k in keys(s3["client"], "tampered/") if k.endswith("/config.json")]
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=b'{"changed": true}')
    result = aios("brains", "pull", f"s3://{BUCKET}/tampered/pushed", "--bundle-dir", tmp_path, check=False)
    assert result.returncode == 2
    assert "config.json of version" in result.stderr and "does not match its recorded size and sha256" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no half-pulled bundle, no staging left


def test_bad_locations_are_one_line_each_with_exit_2(s3, brain, tmp_path):
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    cases = {
        "unknown bucket": (["brains", "list", "--bundle-dir", "s3://no-such-bucket/brains"],
                           "s3://no-such-bucket/brains: bucket 'no-such-bucket' does not exist at "),
        "wrong endpoint": (["brains", "list", "--bundle-dir", f"s3://{BUCKET}/brains", "--s3-endpoint-url", dead],
                           f"s3://{BUCKET}/brains: cannot reach the S3 endpoint at {dead}; check --s3-endpoint-url"),
        "no brain there": (["brains", "pull", f"s3://{BUCKET}/brains/nobody", "--bundle-dir", tmp_path],
                           f"s3://{BUCKET}/brains/nobody: no brain there (no LATEST.json)"),
        "no bucket": (["brains", "push", "pushed", "--bundle-dir", brain.parent, "--to", "s3:///x"],
                      "s3:///x: no bucket; write s3://BUCKET/PREFIX"),
    }
    for what, (args, message) in cases.items():
        result = aios(*args, check=False, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), (what, lines)
        no_secret(result)
    assert list(tmp_path.iterdir()) == []


def test_generate_opens_a_remote_brain_through_a_cached_copy_renewed_by_a_push(s3, brain, tmp_path):
    from aios.bundle.remote import PULLED, REMOTE_CACHE

    aios("brains", "push", "pushed", "--bundle-dir", brain.parent, "--to", f"s3://{BUCKET}/served", "--no-checkpoints")
    source = f"s3://{BUCKET}/served/pushed"
    args = ("hrm-hf", "generate", "--brain", source, "--bundle-dir", tmp_path, "--prompt", "ROMEO:",
            "--max-new-tokens", 4, "--temperature", 0)
    first = aios(*args)
    copy = tmp_path / REMOTE_CACHE / BUCKET / "served" / "pushed"
    marker = json.loads((copy / PULLED).read_text())
    assert marker["source"] == source and (copy / "model.safetensors").read_bytes() == (
        brain / "model.safetensors").read_bytes()
    inode = copy.stat().st_ino
    again = aios(*args)
    assert again.stdout == first.stdout and copy.stat().st_ino == inode  # the same version: not downloaded again
    aios("brains", "push", "pushed", "--bundle-dir", brain.parent, "--to", f"s3://{BUCKET}/served", "--no-checkpoints")
    aios(*args)
    renewed = json.loads((copy / PULLED).read_text())
    assert renewed["version"] != marker["version"]
    listed = aios("brains", "list", "--bundle-dir", tmp_path)
    assert "pushed" not in listed.stdout  # the cache is hidden from the local list
    no_secret(first, again, listed)
