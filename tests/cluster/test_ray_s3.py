"""The Ray job with its checkpoints, bundle and data on a real S3-compatible endpoint (moto's ThreadedMotoServer on
127.0.0.1), two workers. Its own module: the endpoint and its credentials exist before the cluster starts, so
the cluster's processes inherit them as an embedded cluster's do (aios never forwards a credential)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aios.bundle import BrainBundle
from aios.train.checkpoint import list_checkpoints
from tests.bundle.test_remote_bundles import s3  # noqa: F401 - the module's S3 endpoint
from tests.cluster.test_ray_ddp import config, one_thread, one_worker, two_workers  # noqa: F401 - the same runs
from tests.cluster.test_ray_job import steps_logged
from tests.train.test_loop import assert_same_weights

pytestmark = pytest.mark.timeout(300)



@pytest.fixture(scope="module")
def node_cache(tmp_path_factory):
    """The node-local chunk cache of the cluster's workers ($AIOS_CACHE_DIR, set before the cluster starts)."""
    import os

    path = tmp_path_factory.mktemp("node-cache")
    saved = os.environ.get("AIOS_CACHE_DIR")
    os.environ["AIOS_CACHE_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("AIOS_CACHE_DIR")
    else:
        os.environ["AIOS_CACHE_DIR"] = saved


def test_two_workers_with_data_checkpoints_and_bundle_on_s3_survive_a_killed_worker_bit_for_bit(
        s3, node_cache, ray_cluster, config, one_worker, tmp_path, monkeypatch):
    """The Ray job with --storage-path, --bundle-dir and --dataset-file on a real S3 endpoint: every rank
    uploads its own checkpoint files from its own staging directory and rank 0 seals them; rank 1 is SIGKILLed
    after step 5, Ray restarts the group from the checkpoint of step 3 (downloaded by each rank), and what was
    pushed is bit for bit the reference."""
    from aios.bundle.remote import pull
    from aios.storage import open_storage
    from tests.bundle.test_remote_bundles import BUCKET, keys

    s3["client"].put_object(Bucket=BUCKET, Key="ddp/small.txt", Body=Path(config.dataset_file).read_bytes())
    monkeypatch.setenv("AIOS_TEST_FAULT", "sigkill:5")
    monkeypatch.setenv("AIOS_TEST_FAULT_RANK", "1")
    monkeypatch.setenv("AIOS_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    result = two_workers(config, "on-s3", max_failures=1, bundle_dir=f"s3://{BUCKET}/ddp-runs",
                         storage_path=f"s3://{BUCKET}/ddp-store", dataset_file=f"s3://{BUCKET}/ddp/small.txt",
                         local_bundle_dir=str(tmp_path / "local"))
    assert (tmp_path / "fired").exists() and (result.reason, result.step) == ("steps", 8)
    metadata = BrainBundle(result.bundle).metadata()["run"]
    assert metadata["ray_restarts"] == 1 and metadata["ray_storage"] == f"s3://{BUCKET}/ddp-store/on-s3/checkpoints"
    home = pull(open_storage(f"s3://{BUCKET}/ddp-runs"), "on-s3", tmp_path / "home")
    assert_same_weights(one_worker.bundle, home.root)
    assert steps_logged(home.root) == list(range(1, 9))
    starts = [r for r in map(json.loads, (home.root / "metrics.jsonl").read_text().splitlines()) if r["event"] == "start"]
    assert [r["resumed_from"] for r in starts] == ["", f"s3://{BUCKET}/ddp-store/on-s3/checkpoints/step-000003"]
    assert list_checkpoints(home.root / "checkpoints") == []  # the checkpoints live in the storage path
    stored = keys(s3["client"], "ddp-store/on-s3/checkpoints/")
    sealed = sorted({k.split("/")[3] for k in stored if k.endswith("/COMPLETE")})
    assert sealed == ["step-000003", "step-000006", "step-000008"]  # --keep-checkpoints 3 (the default)
    for rank in (0, 1):  # both ranks' files, every one covered by the seal
        assert f"ddp-store/on-s3/checkpoints/step-000008/carry-rank{rank}.safetensors" in stored
    # the prepared data was published once under the storage path and read through the node's chunk cache
    data = sorted({k.split("/")[2] for k in keys(s3["client"], "ddp-store/data/")})
    assert len(data) == 1 and f"ddp-store/data/{data[0]}/manifest.json" in keys(s3["client"], "ddp-store/data/")
    cached = sorted(p.name for p in (node_cache / "chunks" / data[0]).glob("chunk-*.npy"))
    steps = [r for r in map(json.loads, (home.root / "metrics.jsonl").read_text().splitlines()) if r["event"] == "step"]
    assert cached and sum(r["data_cache"]["downloads"] for r in steps) <= len(cached)  # each chunk once per node
    assert not (tmp_path / "local" / ".remote" / BUCKET / "ddp-runs" / "on-s3" / "checkpoints").exists() or not any(
        (tmp_path / "local" / ".remote" / BUCKET / "ddp-runs" / "on-s3" / "checkpoints").iterdir())
