"""`--launcher ray`: the Trainer as a Ray Train job (TorchTrainer) on a real local Ray cluster.

At world size 1 the job must train exactly what the in-process launcher trains, and recover from a failed
worker (an exception, a SIGKILLed process) to the very same weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import ray

from aios.bundle import BrainBundle
from aios.errors import AiosError
from aios.train import launch
from aios.train.checkpoint import list_checkpoints
from tests.train.test_loop import assert_same_weights

pytestmark = pytest.mark.timeout(300)  # a hang fails the test instead of stalling CI


def steps_logged(bundle: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (bundle / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "step"]


@pytest.fixture(scope="module")
def config(module_make_config):
    # exploration makes the RNG matter; halt_max_steps 3 leaves rows mid-sample at the checkpoints (carries).
    # Shared by the module's tests (one bundle directory): every run has a brain name of its own.
    return module_make_config(steps=8, checkpoint_every=3, halt_exploration_prob=0.5)


@pytest.fixture(scope="module")
def local_run(config):
    """The reference, computed once for the module: tests read it and never train it further."""
    return launch(config.replace(brain_name="local"))


def test_world_size_1_on_ray_trains_what_the_local_launcher_trains(ray_cluster, config, local_run):
    """And Ray prunes nothing itself: aios keeps the newest --keep-checkpoints intact ones."""
    result = launch(config.replace(brain_name="on-ray", launcher="ray", keep_checkpoints=2))
    assert (result.reason, result.step, result.trained_steps) == ("steps", 8, 8)
    assert result.final_eval["loss"] == local_run.final_eval["loss"]
    assert_same_weights(local_run.bundle, result.bundle)
    # Ray's run directory is the bundle's checkpoints/: the same step-N layout as the local launcher's
    assert [p.name for p in list_checkpoints(local_run.bundle / "checkpoints")] == ["step-000003", "step-000006",
                                                                                   "step-000008"]
    checkpoints = result.bundle / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000006", "step-000008"]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".staging-")]  # staging cleaned
    assert actors("DatasetManager") == 0  # no Ray Dataset, no Ray Data actors (aios.cluster.job._Trainer)
    assert steps_logged(result.bundle) == list(range(1, 9))
    assert (result.bundle / "training_curves.png").is_file()
    assert BrainBundle(result.bundle).metadata()["run"] == {
        "launcher": "ray", "world_size": 1, "ray_version": ray.__version__,
        "ray_storage": str(result.bundle / "checkpoints"), "ray_restarts": 0, "torch_threads": 2}  # the node's CPUs


def test_too_many_cpus_per_worker_are_refused(ray_cluster, config):
    # that --cpus-per-worker sets the worker's CPUs and threads: test_the_stop_file_stops_the_worker_... (its job)
    with pytest.raises(AiosError, match="2 workers x 2 CPUs need 4 CPUs on this node, which has 2: lower "
                                        "--cpus-per-worker or --world-size"):
        launch(config.replace(brain_name="too-many", launcher="ray", world_size=2, cpus_per_worker=2))


# An exception (a worker that raised) is restarted the same way: on 2 workers in test_ray_ddp.py (rank 1), where a
# job without --max-failures that fails is the rerun test's first half. Each restart costs half a minute of CI.
@pytest.mark.parametrize("fault", ["sigkill"])
def test_a_failed_worker_is_restarted_from_the_newest_checkpoint_to_the_same_weights(
        ray_cluster, config, local_run, tmp_path, monkeypatch, fault):
    once = tmp_path / f"fault-{fault}-fired"
    monkeypatch.setenv("AIOS_TEST_FAULT", f"{fault}:5")  # after step 5: the checkpoint of step 3 is the newest
    monkeypatch.setenv("AIOS_TEST_FAULT_ONCE", str(once))
    result = launch(config.replace(brain_name=f"fault-{fault}", launcher="ray", max_failures=1))
    assert once.exists()  # the fault really fired
    assert (result.reason, result.step) == ("steps", 8)
    assert result.trained_steps == 5  # the restarted attempt trained steps 4..8
    assert_same_weights(local_run.bundle, result.bundle)
    assert steps_logged(result.bundle) == list(range(1, 9))  # steps 4 and 5 of the failed attempt dropped
    assert BrainBundle(result.bundle).metadata()["run"]["ray_restarts"] == 1


def actors(class_name: str) -> int:
    """Actors of that class this cluster has started, alive or not."""
    from ray.util.state import list_actors

    return len(list_actors(filters=[("class_name", "=", class_name)], limit=10_000))


def test_a_worker_refusal_is_raised_as_it_is_and_not_retried(ray_cluster, config, local_run, small_text, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(small_text.read_text()[::-1])
    shutil.copytree(local_run.bundle, local_run.bundle.with_name("refused"))  # the module's reference stays as it is
    resume = config.replace(brain_name="refused", resume=True, steps=10, dataset_file=str(other))
    with pytest.raises(AiosError) as in_process:
        launch(resume)
    before = actors("RayTrainWorker")
    with pytest.raises(AiosError) as on_ray:
        launch(resume.replace(launcher="ray", max_failures=2))
    # the Trainer's own refusal, as the local launcher gives it, not Ray's wrapping of it
    assert str(on_ray.value) == str(in_process.value) and "trained on other data" in str(on_ray.value)
    assert actors("RayTrainWorker") - before == 1  # one worker: a refusal is the same on every retry


def test_launchers_take_turns_on_one_brain_and_end_where_in_process_turns_end(ray_cluster, config):
    """Ray to step 4, in-process to 6 (pruning what Ray's run snapshot lists), Ray again to 8: each attempt
    resumes from the newest checkpoint on disk, and the weights are those of in-process turns 4, 6, 8."""
    turns = config.replace(keep_checkpoints=1)
    for name, launchers in (("in-process", ("local", "local", "local")), ("mixed", ("ray", "local", "ray"))):
        for steps, launcher in zip((4, 6, 8), launchers, strict=True):
            result = launch(turns.replace(brain_name=name, launcher=launcher, resume=steps > 4, steps=steps))
            assert (result.step, result.trained_steps) == (steps, 2 if steps > 4 else 4)
    assert_same_weights(result.bundle.parent / "in-process", result.bundle)
    assert steps_logged(result.bundle) == list(range(1, 9))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "aios.cli.main", *args]


def tiny_flags(config) -> list[str]:
    return [arg for arg in config.to_cli_args() if arg != "--no-progress"] + ["--no-progress"]


# Ctrl-C (SIGINT) goes through the same handler: test_relative_paths_... sends it to this process during a job
# (Ray's own SIGINT handler, installed by a fit() on the main thread, would abort the run without a checkpoint).
@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_signal_to_the_driver_stops_the_workers_after_a_step_with_a_checkpoint(config, tmp_path, signum):
    """Through the CLI, on the embedded local cluster the run starts itself (this test's module cluster is
    another process's business): the driver's SIGTERM reaches the worker, which checkpoints and ends (ray.init
    installs a SIGTERM handler of its own that exits at once: the driver's is put back after it)."""
    run = config.replace(brain_name="signalled", launcher="ray", steps=100_000, checkpoint_every=0, iterate=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(cli("hrm-hf", "train-actv1", *tiny_flags(run)), env=env, text=True, stdout=out,
                                  stderr=subprocess.STDOUT)
    metrics = Path(run.bundle_dir) / "signalled" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and len(steps_logged_safe(metrics)) >= 3):
        assert driver.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.5)
    # While it trains, the dashboard the log names answers on 127.0.0.1.
    dashboard = re.search(r"Ray dashboard: (http://127\.0\.0\.1:\d+)", log.read_text())
    assert dashboard, log.read_text()
    with urllib.request.urlopen(dashboard.group(1) + "/api/version", timeout=30) as response:
        assert response.status == 200 and "ray_version" in json.loads(response.read())
    with urllib.request.urlopen(dashboard.group(1) + "/api/v0/actors?limit=100", timeout=30) as response:
        actors = response.read().decode()
    assert "TrainController" in actors and "RayTrainWorker" in actors  # the job's actors are shown
    driver.send_signal(signum)
    driver.wait(timeout=120)
    output = log.read_text()
    assert driver.returncode == 0, output
    assert "embedded local Ray cluster" in output
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    stop = [r for r in records if r["event"] == "stop"]
    assert len(stop) == 1 and stop[0]["reason"] == signal.Signals(signum).name
    end = records[-1]
    assert end["event"] == "end" and end["reason"] == "stop"
    checkpoints = list_checkpoints(metrics.parent / "checkpoints")
    assert [p.name for p in checkpoints] == [f"step-{end['step']:06d}"]  # the stop step, saved


def steps_logged_safe(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return [r for r in rows if r.get("event") == "step"]


def test_an_address_where_no_cluster_listens_is_one_line_and_writes_nothing(config, tmp_path):
    run = config.replace(brain_name="nowhere", launcher="ray", ray_address="127.0.0.1:1")
    done = subprocess.run(cli("hrm-hf", "train-actv1", *tiny_flags(run)), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --ray-address 127.0.0.1:1: nothing answers there (Connection refused); start the cluster "
        "(ray start --head) or fix the address"]
    assert not (Path(run.bundle_dir) / "nowhere").exists()


def test_data_that_cannot_be_prepared_is_refused_before_any_cluster_starts(config, tmp_path, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("To be.\n")
    run = config.replace(brain_name="short", dataset_file=str(short))
    with pytest.raises(AiosError) as local:
        launch(run)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("a Ray cluster was started for bad data"))
    with pytest.raises(AiosError) as on_ray:
        launch(run.replace(launcher="ray"))
    assert str(on_ray.value) == str(local.value) and "fewer than one window" in str(local.value)
    assert not (Path(run.bundle_dir) / "short").exists()


def test_the_stop_file_stops_the_worker_and_is_removed(ray_cluster, config, tmp_path):
    """And --cpus-per-worker sets the worker's CPUs and its torch threads (the default is the node's CPUs:
    test_world_size_1_on_ray_...)."""
    stop_file = tmp_path / "STOP"
    run = config.replace(brain_name="stop-file", launcher="ray", steps=100_000, checkpoint_every=0, iterate=True,
                         stop_file=str(stop_file), cpus_per_worker=1)
    metrics = Path(run.bundle_dir) / "stop-file" / "metrics.jsonl"

    def stop_after_three_steps():
        deadline = time.monotonic() + 180
        while not (metrics.exists() and len(steps_logged_safe(metrics)) >= 3) and time.monotonic() < deadline:
            time.sleep(0.2)
        stop_file.touch()

    threading.Thread(target=stop_after_three_steps, daemon=True).start()
    result = launch(run)
    assert result.reason == "stop" and 3 <= result.step < 1000
    assert not stop_file.exists()  # it appeared during the run: removed, so a --resume does not stop at once
    assert [p.name for p in list_checkpoints(metrics.parent / "checkpoints")] == [f"step-{result.step:06d}"]
    assert BrainBundle(metrics.parent).metadata()["run"]["torch_threads"] == 1


def test_relative_paths_mean_the_driver_s_working_directory_and_ctrl_c_stops_the_workers(
        ray_cluster, config, tmp_path, monkeypatch):
    """The default --bundle-dir (artifacts/brains/actv1) is relative: the worker works in the driver's
    directory, and the checkpoints it hands to Ray are absolute paths (Ray reads a relative one as a URI).

    And Ctrl-C: a SIGINT to this process (the driver) during the job asks the workers to stop after their step,
    as SIGTERM does (test_a_signal_to_the_driver_...): the job ends with reason stop and a checkpoint of that
    step, and no KeyboardInterrupt (the test's own handler, under aios', must not see the signal either)."""
    monkeypatch.chdir(tmp_path)
    run = config.replace(brain_name="relative", launcher="ray", bundle_dir="brains", steps=100_000,
                         checkpoint_every=0, iterate=True)
    metrics = tmp_path / "brains" / "relative" / "metrics.jsonl"
    done, unhandled = threading.Event(), []

    def ctrl_c_after_three_steps():
        deadline = time.monotonic() + 180
        while not (metrics.exists() and len(steps_logged_safe(metrics)) >= 3) and time.monotonic() < deadline:
            if done.wait(0.2):
                return
        os.kill(os.getpid(), signal.SIGINT)

    def not_aios(signum, frame):  # SIGINT reached the test, not aios' handler
        unhandled.append(signum)
        raise AssertionError("SIGINT was not handled by aios during the job")

    previous = signal.signal(signal.SIGINT, not_aios)
    try:
        threading.Thread(target=ctrl_c_after_three_steps, daemon=True).start()
        result = launch(run)
    finally:
        done.set()
        signal.signal(signal.SIGINT, previous)
    assert not unhandled
    assert result.reason == "stop" and 3 <= result.step < 1000
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["reason"] for r in records if r["event"] == "stop"] == ["SIGINT"]
    assert [p.name for p in list_checkpoints(tmp_path / "brains" / "relative" / "checkpoints")] == [
        f"step-{result.step:06d}"]  # the stop step's, where the relative --bundle-dir says


def test_aios_submit_to_a_cluster_without_token_authentication(ray_cluster, small_text, tmp_path):
    """This module's cluster runs with RAY_AUTH_MODE=disabled: a client with no token configured submits to it,
    lists and stops its jobs (a cluster with token authentication: tests/cluster/test_submit.py)."""
    from tests.cluster.test_submit import TINY, aios
    from tests.train.conftest import TOKENIZER

    address = "http://" + ray_cluster._private.worker._global_node.address_info["webui_url"]
    submitted = aios("submit", "--address", address, "--dataset-file", str(small_text), "--model", str(TOKENIZER),
                     "--bundle-dir", str(tmp_path / "brains"), "--brain-name", "open", "--steps", "1000", "--no-wait",
                     *TINY, token=None)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "submitted run open as job open" in submitted.stdout
    listed = aios("jobs", "list", "--address", address, token=None)
    assert listed.returncode == 0 and listed.stdout.splitlines()[1].split()[0::2][:2] == ["open", "open"], listed.stdout
    stopped = aios("jobs", "stop", "open", "--address", address, token=None, timeout=120)
    assert stopped.returncode == 0 and "job open STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
