from __future__ import annotations

import contextlib
import os

import pytest

from aios.cluster.job import CONTROLLER_POLL_S
from tests.train.conftest import data_cache, make_config, module_make_config, small_text  # noqa: F401 - the same tiny runs


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster for the module (2 CPUs, its dashboard on 127.0.0.1 for the state API), started
    and stopped by the test.

    Token authentication is off for it (RAY_AUTH_MODE=disabled), so the tests neither need nor write a
    token under ~/.ray; the cluster is this process's own, on this machine. Its Train controller collects
    reports as often as an embedded cluster's does (aios.cluster.job.CONTROLLER_POLL_S)."""
    import ray

    with cluster_env(RAY_AUTH_MODE="disabled", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=CONTROLLER_POLL_S):
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
        try:
            yield ray
        finally:
            ray.shutdown()


@contextlib.contextmanager
def cluster_env(**variables: str):
    """Environment variables for a cluster the test starts (its processes inherit them), restored after."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
