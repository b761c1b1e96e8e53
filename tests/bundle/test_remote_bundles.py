"""`aios brains push | pull | list` against a real S3-compatible HTTP endpoint: moto's ThreadedMotoServer on
127.0.0.1 (as Ray's own test suite does), a bucket made by the test, the real CLI in a subprocess.

Every command runs with a planted secret as its AWS secret key: it must appear in no output, no error and
no stored object."""

from __future__ import annotations

import hashlib
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
    local_files = sorted(p.relative_to(brain).as_posix() for p in brain.rglob("*") if p.is_file())
    digests = {hashlib.sha256((brain / f).read_bytes()).hexdigest() for f in local_files}
    assert keys(s3["client"], "brains/pushed/") == sorted([f"brains/pushed/objects/{d}" for d in digests]
                                                         + ["brains/pushed/LATEST.json"])  # all, under the prefix
    assert keys(s3["client"]) == keys(s3["client"], "brains/")
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
    shown = aios("brains", "show", "pushed", "--bundle-dir", f"s3://{BUCKET}/brains", "--json", "--local-bundle-dir",
                 tmp_path / "copies")
    assert json.loads(shown.stdout)["metadata"]["steps"] == 2  # the newest version, through a cached copy
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
    # a second push that died half-way: a new object uploaded, LATEST.json not yet switched
    remote = open_storage(f"s3://{BUCKET}/halves")
    orphan = hashlib.sha256(b"half a model").hexdigest()
    remote.write_bytes(f"pushed/objects/{orphan}", b"half a model")
    pulled = aios("brains", "pull", f"s3://{BUCKET}/halves/pushed", "--bundle-dir", tmp_path)
    assert (tmp_path / "pushed" / "model.safetensors").read_bytes() == (brain / "model.safetensors").read_bytes()
    # the next push uploads nothing it holds already, switches readers to it, and drops what no version lists
    again = aios("brains", "push", "pushed", "--bundle-dir", brain.parent, "--to", f"s3://{BUCKET}/halves",
                 "--no-checkpoints")
    assert "(0.0 MB uploaded, the rest held already)" in again.stdout
    latest = json.loads(s3["client"].get_object(Bucket=BUCKET, Key=f"halves/pushed/{LATEST}")["Body"].read())
    assert latest["version"] != first["version"]
    # (pyarrow leaves an empty "objects/" marker after a delete, to keep the directory: not an object of ours)
    held = {k.rsplit("/", 1)[1] for k in keys(s3["client"], "halves/pushed/objects/")} - {""}
    assert held == {f["sha256"] for f in latest["files"].values()} and orphan not in held
    no_secret(pulled, again)


def test_a_pulled_file_that_does_not_match_its_record_is_refused_and_nothing_is_installed(s3, brain, tmp_path):
    aios("brains", "push", "pushed", "--bundle-dir", brain.parent, "--to", f"s3://{BUCKET}/tampered",
         "--no-checkpoints")
    digest = hashlib.sha256((brain / "config.json").read_bytes()).hexdigest()
    s3["client"].put_object(Bucket=BUCKET, Key=f"tampered/pushed/objects/{digest}", Body=b'{"changed": true}')
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
        "not S3": (["brains", "push", "pushed", "--bundle-dir", brain.parent, "--to", tmp_path / "elsewhere"],
                   f"--to {tmp_path / 'elsewhere'}: push goes to S3 (s3://BUCKET/PREFIX)"),
    }
    for what, (args, message) in cases.items():
        result = aios(*args, check=False, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), (what, lines)
        no_secret(result)
    assert list(tmp_path.iterdir()) == []


def test_missing_credentials_are_one_line_with_exit_2(s3, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no key, no profile, no files
    env.update(AWS_ENDPOINT_URL=s3["endpoint"], AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "aios.cli.main", "brains", "list", "--bundle-dir",
                             f"s3://{BUCKET}/brains"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: s3://{BUCKET}/brains: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
        f"AWS_PROFILE (~/.aws/credentials), or run where an instance role provides them")


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


@pytest.fixture(scope="module")
def planted_push(s3, brain) -> dict:
    """The brain pushed once for the tests below: its LATEST.json as the push wrote it (each test writes its
    own edited copy over it, so none sees another's)."""
    aios("brains", "push", "pushed", "--bundle-dir", brain.parent, "--to", f"s3://{BUCKET}/planted",
         "--no-checkpoints")
    return json.loads(s3["client"].get_object(Bucket=BUCKET, Key="planted/pushed/LATEST.json")["Body"].read())


@pytest.mark.parametrize("planted", ["../outside.txt", "/tmp/absolute.txt", ".hidden/x", "checkpoints/../../up"])
def test_a_listing_naming_a_path_outside_the_bundle_is_refused_before_anything_is_written(s3, planted_push,
                                                                                         tmp_path, planted):
    key = "planted/pushed/LATEST.json"
    record = json.loads(json.dumps(planted_push))  # a copy
    some = next(iter(record["files"].values()))
    record["files"][planted] = some  # whoever can write the bucket can write this record
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=json.dumps(record).encode())
    home = tmp_path / "home"
    result = aios("brains", "pull", f"s3://{BUCKET}/planted/pushed", "--bundle-dir", home, check=False)
    assert result.returncode == 2 and f"lists {planted!r}, which is not a file of a bundle" in result.stderr
    assert not home.exists() or list(home.iterdir()) == []
    assert not (tmp_path / "outside.txt").exists() and not Path("/tmp/absolute.txt").exists()
