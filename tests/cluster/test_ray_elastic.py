"""`--world-size MIN-MAX`: an elastic job on a real two-node Ray cluster (`ray.cluster_utils.Cluster`, one CPU a
node, both on this machine), and preemption: a node drained through Ray's own drain API (`ray drain-node
--reason DRAIN_NODE_REASON_PREEMPTION`, what the autoscaler sends before a spot reclaim).

One job: it starts with one worker on the head (the only node), grows to two when a node joins, is told that
node is being preempted (a checkpoint at once), loses it, and finishes on one worker again. The stream of
samples and the global batch do not depend on the world size, so its weights equal, bit for bit, those of
one in-process worker accumulating two micro-batches (one thread each, as in test_ray_ddp).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from aios.bundle import BrainBundle
from aios.cluster.job import CONTROLLER_POLL_S
from aios.train import launch
from tests.bundle.test_remote_bundles import BUCKET, keys, s3  # noqa: F401 - the module's S3 endpoint
from tests.cluster.conftest import cluster_env
from tests.cluster.test_ray_ddp import records
from tests.train.test_loop import assert_same_weights

pytestmark = pytest.mark.timeout(420)

EVENT_WAIT_S = 150  # the longest wait for one change of the job (Ray re-plans its resources every 20 s)


@pytest.fixture(scope="module")
def head_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("head-node-cache")


@pytest.fixture(scope="module")
def two_node_cluster(s3, head_cache):
    """A head with one CPU, and the means to add and remove a second node of one CPU. Ray Train's wait for a
    worker group that cannot be placed (a node just lost) is cut from 60 to 15 s; it is read by the Train
    controller, a process of the cluster, so it is set before the cluster starts (and so are the S3 endpoint's
    variables, and the head's own chunk cache, $AIOS_CACHE_DIR)."""
    import ray
    from ray.cluster_utils import Cluster

    with cluster_env(RAY_AUTH_MODE="disabled", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="15",
                     RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=CONTROLLER_POLL_S, AIOS_CACHE_DIR=str(head_cache)):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        ray.init(address=cluster.address, log_to_driver=True)
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wait_for(what: str, check, timeout_s: float = EVENT_WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def logged(bundle: Path, event: str) -> list[dict]:
    path = bundle / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [r for r in map(json.loads, [line for line in lines if line.endswith("}")]) if r["event"] == event]


def drain(cluster, node, deadline_s: int) -> None:
    """What Ray's autoscaler does before a spot instance is reclaimed."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_cli, "drain-node", "--address", cluster.address, "--node-id", node.node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                    "--deadline-remaining-seconds", str(deadline_s)], check=True, capture_output=True, timeout=60)


def test_an_elastic_job_grows_and_shrinks_with_the_cluster_to_the_same_weights(two_node_cluster, make_config,
                                                                             tmp_path, monkeypatch):
    config = make_config(steps=120, checkpoint_every=5, batch_size=2, halt_exploration_prob=0.5, warmup_steps=0,
                         min_lr_ratio=1.0)
    reference = launch(config.replace(brain_name="one-worker", gradient_accumulation_steps=2))

    pace = tmp_path / "pace"  # each step waits 0.4 s while this file exists: time to change the cluster
    pace.touch()
    monkeypatch.setenv("AIOS_TEST_STEP_SLEEP_S", "0.4")
    monkeypatch.setenv("AIOS_TEST_SLEEP_WHILE", str(pace))
    monkeypatch.setenv("AIOS_ELASTIC_RESIZE_INTERVAL_S", "2")
    elastic = config.replace(brain_name="elastic", launcher="ray", world_size="1-2", cpus_per_worker=1,
                             max_failures=3, preemption_check_every=1)
    bundle = Path(elastic.bundle_dir) / "elastic"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = launch(elastic)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    job = threading.Thread(target=run, daemon=True)
    job.start()
    try:
        # 1. one node: the job starts with one worker (accumulating two micro-batches)
        wait_for("the first steps", lambda: len(logged(bundle, "step")) >= 3)
        assert {r["grad_accum"] for r in logged(bundle, "step")} == {2}
        # 2. a node joins: Ray grows the job to two workers (one micro-batch each), from the newest checkpoint
        node = two_node_cluster.add_node(num_cpus=1)
        wait_for("the job to grow to 2 workers", lambda: any(r["grad_accum"] == 1 for r in logged(bundle, "step")))
        grown_at = len(logged(bundle, "start"))
        # 3. that node is about to be preempted: a checkpoint at once; at the deadline Ray stops the workers
        drain(two_node_cluster, node, deadline_s=4)
        [notice] = wait_for("the preemption notice", lambda: logged(bundle, "preemption"))
        assert "is being drained" in notice["notice"]
        wait_for("the checkpoint of that step",
                 lambda: notice["step"] in {r["step"] for r in logged(bundle, "checkpoint")}, timeout_s=30)
        time.sleep(5)
        two_node_cluster.remove_node(node)  # the reclaim
        # 4. the job goes on with one worker
        wait_for("the job to shrink to 1 worker",
                 lambda: len(logged(bundle, "start")) > grown_at and logged(bundle, "step")[-1]["grad_accum"] == 2)
    finally:
        pace.unlink(missing_ok=True)  # the rest at full speed
        job.join(timeout=EVENT_WAIT_S)
    assert not job.is_alive(), "the elastic job did not end"
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    assert (result.reason, result.step) == ("steps", 120)

    assert_same_weights(reference.bundle, result.bundle)  # the same samples, the same sums: bit for bit
    ours, theirs = records(result.bundle, "step"), records(reference.bundle, "step")
    last = {r["step"]: r for r in ours}  # a step redone after a restart: its last record
    assert [last[s]["samples_drawn"] for s in range(1, 121)] == [r["samples_drawn"] for r in theirs]
    assert BrainBundle(result.bundle).tracker()["state"] == BrainBundle(reference.bundle).tracker()["state"]
    starts = records(result.bundle, "start")
    assert len(starts) >= 3 and all(s["global_batch"] == 4 for s in starts)
    resumed = [int(Path(s["resumed_from"]).name.split("-")[1]) for s in starts[2:]]
    assert max(resumed) >= notice["step"]  # the shrunk job resumed from the preemption checkpoint (or later)
    run = BrainBundle(result.bundle).metadata()["run"]
    assert run["world_size"] == 1 and run["ray_restarts"] >= 2


def test_an_elastic_job_the_cluster_cannot_start_is_one_line(two_node_cluster, make_config):
    config = make_config(launcher="ray", world_size="3-4", cpus_per_worker=1, batch_size=2,
                         gradient_accumulation_steps=3)
    with pytest.raises(Exception, match=r"--world-size 3-4: the cluster has room for \d workers of 1 CPUs, fewer "
                                        r"than the 3 the job needs to start"):
        launch(config)
    assert not (Path(config.bundle_dir) / config.brain_name / "model.safetensors").exists()


def test_an_elastic_job_refuses_nodes_on_other_machines(two_node_cluster, make_config):
    import ray

    from aios.cluster.job import anywhere_problem, elastic_cluster_problem

    config = make_config(launcher="ray", world_size="1-2")
    nodes = ray.nodes()  # the real records, one of them moved to another machine
    here = nodes[0]["NodeManagerAddress"]
    assert elastic_cluster_problem(config, 1, nodes, here) is None
    moved = [{**nodes[0], "NodeManagerAddress": "10.9.8.7"}, *nodes[1:]]
    problem = elastic_cluster_problem(config, 1, moved + [{**nodes[0], "NodeID": "x"}], here)
    assert problem.startswith("--world-size 1-2: an elastic job runs on every node, and this cluster has nodes on "
                              "other machines (10.9.8.7)")
    assert "(the checkpoints and prepared data are on this machine's disk (pass an s3:// --storage-path))" in problem
    remote = config.replace(storage_path="s3://bucket/runs", bundle_dir="s3://bucket/brains")
    assert anywhere_problem(remote) is None and anywhere_problem(remote.replace(log_file="m.jsonl"))
    assert elastic_cluster_problem(remote, 1, moved, here, anywhere=True) is None  # nothing on this machine's disk


def test_workers_on_two_nodes_read_only_their_chunks_through_their_own_caches(two_node_cluster, head_cache, s3,
                                                                            make_config, tmp_path, monkeypatch):
    """Checkpoints, prepared data and bundle on S3: the workers need no disk of the driver's, so a fixed-size
    job spreads over both nodes. The prepared data is published once; each node's worker downloads the chunks
    its slots read into its own cache, once (the driver's prepared directory is moved away meanwhile: nothing
    reads it); the two caches overlap only where a chunk is shared (a stretch boundary, the eval batches)."""
    import ray

    import aios.data.remote as remote_data
    from aios.data.dataset import PreparedDataset

    other_cache = tmp_path / "node-2-cache"
    node = two_node_cluster.add_node(num_cpus=1, env_vars={"AIOS_CACHE_DIR": str(other_cache)})
    wait_for("the second node", lambda: sum(n["Alive"] for n in ray.nodes()) == 2, timeout_s=60)
    publish, hidden = remote_data.publish_prepared, []

    def publish_then_hide(dataset, *args, **kwargs):  # the real upload; then the driver's copy is out of reach
        location = publish(dataset, *args, **kwargs)
        hidden.append((dataset.path, dataset.path.with_name(dataset.path.name + ".hidden")))
        dataset.path.rename(hidden[-1][1])
        return location

    monkeypatch.setattr(remote_data, "publish_prepared", publish_then_hide)
    config = make_config(steps=6, checkpoint_every=3, batch_size=2, launcher="ray", world_size=2, cpus_per_worker=1,
                         storage_path=f"s3://{BUCKET}/spread", bundle_dir=f"s3://{BUCKET}/spread-brains",
                         local_bundle_dir=str(tmp_path / "local"), brain_name="spread")
    try:
        result = launch(config)
    finally:
        for original, moved in hidden:
            moved.rename(original)
        two_node_cluster.remove_node(node)
    assert (result.reason, result.step) == ("steps", 6) and len(hidden) == 1
    [fingerprint] = {k.split("/")[2] for k in keys(s3["client"], "spread/data/")}
    chunks = PreparedDataset(hidden[0][0]).num_chunks
    assert len(keys(s3["client"], f"spread/data/{fingerprint}/")) == chunks + 2  # + stats.json, manifest.json
    head = {p.name for p in (head_cache / "chunks" / fingerprint).glob("chunk-*.npy")}
    other = {p.name for p in (other_cache / "chunks" / fingerprint).glob("chunk-*.npy")}
    assert head and other, "a worker on each node read through its own cache"
    assert len(head) < chunks and len(other) < chunks and len(head & other) <= 3  # only what its slots read
    steps = records(result.bundle, "step")
    assert sum(r["data_cache"]["downloads"] for r in steps) <= len(head) + len(other)  # each chunk once a node
    assert steps[0]["data_cache"]["downloads"] >= 2  # both workers' first chunks, summed over the ranks
    assert sum(r["data_cache"]["bytes"] for r in steps) > 0
    run = BrainBundle(result.bundle).metadata()["run"]
    assert run["world_size"] == 2
