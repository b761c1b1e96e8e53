from __future__ import annotations

import os

import pytest

from tests.train.conftest import data_cache, make_config, small_text  # noqa: F401 - the same tiny runs


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster for the module (2 CPUs, its dashboard on 127.0.0.1 for the state API), started
    and stopped by the test.

    Token authentication is off for it (RAY_AUTH_MODE=disabled), so the tests neither need nor write a
    token under ~/.ray; the cluster is this process's own, on this machine."""
    import ray

    previous = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous
