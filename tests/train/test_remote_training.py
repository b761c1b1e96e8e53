"""Training with `--bundle-dir s3://...` and `--dataset-file s3://...` against a real S3-compatible endpoint
(moto's ThreadedMotoServer on 127.0.0.1, a bucket made by the test), the in-process launcher.

The run trains in a local copy of the remote brain and pushes it after every checkpoint and at the end; a
run on another machine (another local copy) resumes from what was pushed, bit for bit, and the endpoint
going away during a push stops the run in one line without touching the remote's last whole version."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from aios.bundle.remote import LATEST, pull
from aios.errors import AiosError
from aios.storage import open_storage
from aios.train import launch
from aios.train.loop import TrainCallbacks
from tests.bundle.test_remote_bundles import BUCKET, SECRET, keys, s3  # noqa: F401 - the module's S3 endpoint
from tests.cli.test_train_e2e import TINY, aios
from tests.cluster.test_ray_job import steps_logged
from tests.train.test_loop import assert_same_weights

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def remote_text(s3, tmp_path_factory):
    """The small training text as an object in the bucket."""
    from tests.train.conftest import SAMPLE

    s3["client"].put_object(Bucket=BUCKET, Key="data/small.txt", Body=SAMPLE.read_text()[:40_000].encode())
    return f"s3://{BUCKET}/data/small.txt"


def latest(s3, name: str, prefix: str = "runs") -> dict:
    return json.loads(s3["client"].get_object(Bucket=BUCKET, Key=f"{prefix}/{name}/{LATEST}")["Body"].read())


def test_a_run_on_s3_resumes_elsewhere_bit_for_bit_and_pull_brings_the_brain_home(s3, remote_text, make_config,
                                                                                  tmp_path, data_cache, small_text):
    reference_text = small_text.read_text()
    reference = launch(make_config(brain_name="reference", checkpoint_every=3))  # local, uninterrupted, 6 steps
    remote = dict(bundle_dir=f"s3://{BUCKET}/runs", dataset_file=remote_text, brain_name="far", checkpoint_every=3)
    first = launch(make_config(**remote, steps=3, local_bundle_dir=str(tmp_path / "machine-1")))
    assert first.step == 3 and first.bundle == tmp_path / "machine-1" / ".remote" / BUCKET / "runs" / "far"
    record = latest(s3, "far")
    assert record["metadata"]["steps"] == 3 and "checkpoints/step-000003/COMPLETE" in record["files"]
    held = keys(s3["client"], "runs/far/")
    assert {f"runs/far/objects/{f['sha256']}" for f in record["files"].values()} <= set(held)
    # the data came from the bucket: its download is what was prepared
    assert [p.read_text() for p in data_cache.glob("sources/*/small.txt")] == [reference_text]

    # another machine: an empty local copy; --resume pulls the pushed brain and trains steps 4..6 from it
    second = launch(make_config(**remote, steps=6, resume=True, local_bundle_dir=str(tmp_path / "machine-2")))
    assert (second.step, second.trained_steps) == (6, 3)
    assert_same_weights(reference.bundle, second.bundle)
    assert latest(s3, "far")["metadata"]["steps"] == 6

    home = pull(open_storage(f"s3://{BUCKET}/runs"), "far", tmp_path / "home")
    assert_same_weights(reference.bundle, home.root)
    assert steps_logged(home.root) == list(range(1, 7))  # the metrics log travels with the brain
    assert (home.root / "training_curves.png").is_file()  # pushed once more after the end
    assert SECRET not in (home.root / "metadata.json").read_text() + (home.root / "training_args.json").read_text()


class StopEndpointAfter(TrainCallbacks):
    def __init__(self, server, step: int):
        self.server, self.step = server, step

    def after_step(self, trainer, record: dict) -> None:
        if record["step"] == self.step:
            self.server.stop()


def test_an_endpoint_that_stops_answering_stops_the_run_in_one_line_and_the_remote_keeps_its_version(
        s3, remote_text, make_config, tmp_path, monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # this test's own endpoint
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AIOS_STORAGE_RETRY_S", "2")
    config = make_config(bundle_dir=f"s3://{BUCKET}/outage", brain_name="cut", checkpoint_every=3, steps=6,
                         s3_endpoint_url=endpoint, local_bundle_dir=str(tmp_path / "local"))
    try:
        with pytest.raises(AiosError) as stopped:
            launch(config, callbacks=StopEndpointAfter(server, 4))  # the push of step 6 finds no endpoint
        message = str(stopped.value)
        assert "\n" not in message and message.startswith(f"cannot push brain 'cut' to s3://{BUCKET}/outage/cut")
        assert "cannot reach the S3 endpoint" in message and "rerun with --resume" in message
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # back, same state
        server.start()
        assert latest(s3, "cut", "outage")["metadata"]["steps"] == 3  # the last whole version, untouched
        # the rerun finds the local copy ahead of the remote (step 6 was checkpointed): it pushes it
        again = launch(config.replace(resume=True))
        assert again.reason == "already_reached" and latest(s3, "cut", "outage")["metadata"]["steps"] == 6
    finally:
        server.stop()


def test_checkpoints_on_s3_an_upload_cut_short_publishes_nothing_and_the_rerun_resumes_bit_for_bit(
        s3, make_config, tmp_path, monkeypatch):
    """--storage-path s3://...: the checkpoints live there (files first, COMPLETE last). The endpoint stops in the
    middle of step 6's upload: the run stops in one line, step 6 has files but no COMPLETE, step 3 stays the
    newest checkpoint, and the rerun downloads step 3 and trains to the reference's weights."""
    from moto.server import ThreadedMotoServer

    from aios.storage import Storage

    reference = launch(make_config(brain_name="reference", checkpoint_every=3))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # this test's own endpoint
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="runs")
    monkeypatch.setenv("AIOS_STORAGE_RETRY_S", "2")
    monkeypatch.setenv("AIOS_SCRATCH_DIR", str(tmp_path / "scratch"))
    upload, uploaded = Storage.upload_file, []

    def upload_then_stop(self, local, relative):  # the real upload; the endpoint goes away after step 6's 2nd file
        upload(self, local, relative)
        uploaded.append(relative)
        if sum("step-000006" in name for name in uploaded) == 2:
            server.stop()

    monkeypatch.setattr(Storage, "upload_file", upload_then_stop)
    config = make_config(storage_path="s3://runs/store", brain_name="kept", checkpoint_every=3, steps=6,
                         s3_endpoint_url=endpoint)
    try:
        with pytest.raises(AiosError) as stopped:
            launch(config)
        message = str(stopped.value)
        assert "\n" not in message and message.startswith("cannot save checkpoint step-000006 to s3://runs/store/kept/"
                                                           "checkpoints (")
        assert "cannot reach the S3 endpoint" in message and "rerun with --resume" in message
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # back, same state
        server.start()
        held = sorted(o["Key"] for o in client.list_objects_v2(Bucket="runs", Prefix="store/")["Contents"])
        step3 = [k for k in held if "/step-000003/" in k]
        step6 = [k for k in held if "/step-000006/" in k]
        assert "store/kept/checkpoints/step-000003/COMPLETE" in step3 and len(step3) == 7  # 3 shared + 3 rank + seal
        assert len(step6) == 2 and not any(k.endswith("COMPLETE") for k in step6)  # cut short: not a checkpoint
        assert not list(config_bundle_checkpoints(config))  # nothing of the checkpoints on the local disk
        from aios.train.run_storage import RemoteCheckpoints

        client.put_object(Bucket="runs", Key="store/cut-first/checkpoints/step-000003/model.safetensors", Body=b"x")
        assert not RemoteCheckpoints("s3://runs/store", "cut-first", endpoint).has_any()  # a cut first upload: no work

        again = launch(config.replace(resume=True))  # step 3 downloaded, verified, resumed
        assert (again.step, again.trained_steps) == (6, 3)
        assert_same_weights(reference.bundle, again.bundle)
        start = [json.loads(line) for line in (again.bundle / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "start"][-1]
        assert start["resumed_from"] == "s3://runs/store/kept/checkpoints/step-000003"
        assert client.head_object(Bucket="runs", Key="store/kept/checkpoints/step-000006/COMPLETE")
        assert not list((tmp_path / "scratch").iterdir())  # the downloads and staging were removed

        handed_to_ray = pickle.dumps(RemoteCheckpoints("s3://runs/store", "kept", endpoint).ray_storage())
        assert SECRET.encode() not in handed_to_ray and b"aios-test-key" not in handed_to_ray
    finally:
        server.stop()


def test_a_local_storage_path_holds_the_checkpoints_and_a_resume_continues_from_there(make_config, tmp_path):
    reference = launch(make_config(brain_name="reference", checkpoint_every=3))
    store = tmp_path / "mounted" / "runs"  # e.g. a directory every node mounts
    config = make_config(storage_path=str(store), brain_name="stored", checkpoint_every=3, steps=3)
    launch(config)
    assert [p.name for p in (store / "stored" / "checkpoints").iterdir()] == ["step-000003"]
    assert config_bundle_checkpoints(config) == []
    again = launch(config.replace(steps=6, resume=True))
    assert (again.step, again.trained_steps) == (6, 3)
    assert_same_weights(reference.bundle, again.bundle)
    assert sorted(p.name for p in (store / "stored" / "checkpoints").iterdir()) == ["step-000003", "step-000006"]


def config_bundle_checkpoints(config):
    root = os.path.join(config.bundle_dir, config.brain_name, "checkpoints")
    return [name for name in os.listdir(root) if name.startswith("step-")] if os.path.isdir(root) else []


@pytest.mark.parametrize("problem, args, env, expected", [
    ("unknown bucket", ["--bundle-dir", "s3://no-such-bucket/runs"], {},
     "s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist"),
    ("wrong endpoint", ["--bundle-dir", f"s3://{BUCKET}/runs", "--s3-endpoint-url", "http://127.0.0.1:9"], {},
     "cannot reach the S3 endpoint at http://127.0.0.1:9"),
    ("missing credentials", ["--bundle-dir", f"s3://{BUCKET}/runs"],
     {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "no S3 credentials"),
    ("unknown bucket of --storage-path", ["--storage-path", "s3://no-such-bucket/runs", "--bundle-dir",
                                          f"s3://{BUCKET}/runs"], {},
     "s3://no-such-bucket/runs/bad/checkpoints: bucket 'no-such-bucket' does not exist"),
    ("missing object", ["--dataset-file", f"s3://{BUCKET}/data/none.txt", "--bundle-dir", f"s3://{BUCKET}/runs"], {},
     "no such object or prefix"),
])
def test_bad_s3_locations_are_refused_in_one_line_with_exit_2(s3, remote_text, tmp_path, monkeypatch, problem, args,
                                                              env, expected):
    for name, value in env.items():
        monkeypatch.delenv(name) if value is None else monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    dataset = [] if "--dataset-file" in args else ["--dataset-file", remote_text]
    result = aios("hrm-hf", "train-actv1", *TINY, "--steps", 1, *dataset, *args, "--data-cache-dir",
                  tmp_path / "cache", "--local-bundle-dir", tmp_path / "local", "--brain-name", "bad", check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert SECRET not in result.stdout + result.stderr
