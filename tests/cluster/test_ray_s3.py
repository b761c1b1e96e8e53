"""The Ray job with its bundle and data on a real S3-compatible endpoint (moto's ThreadedMotoServer on
127.0.0.1), two workers. Its own module: the endpoint and its credentials exist before the cluster starts, so
the cluster's processes inherit them as an embedded cluster's do (aios never forwards a credential)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aios.bundle import BrainBundle
from aios.train.checkpoint import list_checkpoints
from tests.bundle.test_remote_bundles import s3  # noqa: F401 - the module's S3 endpoint
from tests.cluster.test_ray_ddp import config, one_thread, one_worker, two_workers  # noqa: F401 - the same runs
from tests.cluster.test_ray_job import steps_logged
from tests.train.test_loop import assert_same_weights

pytestmark = pytest.mark.timeout(300)



def test_two_workers_with_bundle_and_data_on_s3_survive_a_killed_worker_bit_for_bit(
        s3, ray_cluster, config, one_worker, tmp_path, monkeypatch):
    """The Ray job with --bundle-dir and --dataset-file on a real S3 endpoint: rank 1 is SIGKILLed after step 5,
    Ray restarts the group from the checkpoint of step 3, and what was pushed is bit for bit the reference."""
    from aios.bundle.remote import pull
    from aios.storage import open_storage
    from tests.bundle.test_remote_bundles import BUCKET

    s3["client"].put_object(Bucket=BUCKET, Key="ddp/small.txt", Body=Path(config.dataset_file).read_bytes())
    monkeypatch.setenv("AIOS_TEST_FAULT", "sigkill:5")
    monkeypatch.setenv("AIOS_TEST_FAULT_RANK", "1")
    monkeypatch.setenv("AIOS_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    result = two_workers(config, "on-s3", max_failures=1, bundle_dir=f"s3://{BUCKET}/ddp-runs",
                         dataset_file=f"s3://{BUCKET}/ddp/small.txt", local_bundle_dir=str(tmp_path / "local"))
    assert (tmp_path / "fired").exists() and (result.reason, result.step) == ("steps", 8)
    assert BrainBundle(result.bundle).metadata()["run"]["ray_restarts"] == 1
    home = pull(open_storage(f"s3://{BUCKET}/ddp-runs"), "on-s3", tmp_path / "home")
    assert_same_weights(one_worker.bundle, home.root)
    assert steps_logged(home.root) == list(range(1, 9))
    assert [p.name for p in list_checkpoints(home.root / "checkpoints")][-1] == "step-000008"
