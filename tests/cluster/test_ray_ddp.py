"""`--world-size 2`: two TorchTrainer workers with DDP on a real local Ray cluster (gloo, one CPU each).

The reference for every test is the in-process launcher with one worker accumulating two micro-batches:
the loop divides the loss by the global batch and DDP's hook sums the two ranks' gradients, so two workers
with one micro-batch each compute bit for bit what one worker computes with two (the same micro-batch
gradients, added once), and each slot reads the same samples (the sampler's partitions do not depend on the
world size). Every test is bounded by a timeout: a rank waiting forever in a collective fails it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray
import torch

from aios.bundle import BrainBundle
from aios.errors import AiosError
from aios.train import launch
from aios.train.checkpoint import COMPLETE, expected_files, list_checkpoints, verify_checkpoint
from tests.cli.test_train_e2e import aios, table_rows
from tests.cluster.test_ray_job import steps_logged
from tests.train.test_loop import assert_same_weights

pytestmark = pytest.mark.timeout(300)


def records(bundle: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (bundle / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs with the one thread each worker gets (2 CPUs, 2 workers): CPU kernels sum in an order
    that depends on the thread count, so bitwise equality holds at equal threads per worker. Module-scoped:
    the module's references (below) are computed under it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config(module_make_config, one_thread):
    # b=2 per worker; exploration on (per slot, from the step), halt_max_steps 3 leaves rows mid-sample.
    # Shared by the module's tests (one bundle directory): every run has a brain name of its own.
    return module_make_config(steps=8, checkpoint_every=3, batch_size=2, halt_exploration_prob=0.5)


@pytest.fixture(scope="module")
def one_worker(config):
    """The reference: one in-process worker accumulating the two micro-batches the two workers take."""
    return launch(config.replace(brain_name="one-worker", gradient_accumulation_steps=2))


@pytest.fixture(scope="module")
def constant_lr(module_make_config, one_thread):
    """The same runs with a constant learning rate, so that resumed stages' --steps do not change the
    schedule; and the reference: one in-process worker accumulating two micro-batches, 8 steps straight."""
    config = module_make_config(steps=8, checkpoint_every=3, batch_size=2, halt_exploration_prob=0.5,
                                warmup_steps=0, min_lr_ratio=1.0)
    return config, launch(config.replace(brain_name="constant-straight", gradient_accumulation_steps=2))


def two_workers(config, name: str, **changes):
    return launch(config.replace(brain_name=name, launcher="ray", world_size=2, **changes))


def test_two_workers_train_bit_for_bit_what_one_worker_accumulating_trains(ray_cluster, config, one_worker,
                                                                           tmp_path):
    result = two_workers(config, "ddp", ddp=True)  # --ddp is accepted (implied by --world-size 2)
    assert (result.reason, result.step) == ("steps", 8)
    assert_same_weights(one_worker.bundle, result.bundle)
    assert result.final_eval == one_worker.final_eval  # eval sharded over the ranks, its sums reduced
    ours, theirs = records(result.bundle, "step"), records(one_worker.bundle, "step")
    for key in ("samples_drawn", "halted", "segment_tokens_seen"):  # reduced over both ranks
        assert [r[key] for r in ours] == [r[key] for r in theirs], key
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12) and a["grad_norm"] == b["grad_norm"]
    # every checkpoint holds both ranks' files, all covered by the seal rank 0 wrote after both had written
    for checkpoint in list_checkpoints(result.bundle / "checkpoints"):
        sealed = json.loads((checkpoint / COMPLETE).read_text())["files"]
        assert sorted(sealed) == sorted(expected_files(2)) and verify_checkpoint(checkpoint) is None
    assert [p.name for p in (result.bundle / "checkpoints").iterdir() if p.name.startswith(".staging")] == []
    run = BrainBundle(result.bundle).metadata()["run"]
    assert (run["launcher"], run["world_size"], run["ray_version"]) == ("ray", 2, ray.__version__)
    tracker = BrainBundle(result.bundle).tracker()  # both ranks' samplers: the global view
    assert tracker["partitions"] == 4 and tracker["slots"] == 4
    assert tracker["state"] == BrainBundle(one_worker.bundle).tracker()["state"]
    # A checkpoint missing a rank's files from its seal is not intact: a copy of the first one (so the run's
    # own stay as they were), its seal edited as if rank 0 had sealed before rank 1 wrote.
    checkpoint = shutil.copytree(list_checkpoints(result.bundle / "checkpoints")[0], tmp_path / "step-000003")
    marker = checkpoint / COMPLETE
    sealed = json.loads(marker.read_text())
    assert verify_checkpoint(checkpoint) is None  # intact as copied
    del sealed["files"]["carry-rank1.safetensors"]
    marker.write_text(json.dumps(sealed))
    assert "carry-rank1.safetensors" in verify_checkpoint(checkpoint)


def test_the_end_of_the_data_on_one_rank_ends_both_before_the_step_and_experts_train_the_same(
        ray_cluster, make_config, small_text, tmp_path):
    """The end of the data, with a mixture of experts: experts that no token of a rank chose have no gradient
    there; one that no token at all chose keeps none (the optimizer skips it on one worker, and must on two)."""
    text = tmp_path / "short.txt"
    text.write_text(small_text.read_text()[:6000])  # a few hundred sequences: the partitions run out early
    config = make_config(dataset_file=str(text), steps=10_000, batch_size=2, halt_exploration_prob=0.5,
                         iterate=False, use_moe=True, num_experts=4, num_experts_per_tok=1)
    local = launch(config.replace(brain_name="eod-one", gradient_accumulation_steps=2))
    assert local.reason == "end_of_data"
    result = two_workers(config, "eod-two")
    assert (result.reason, result.step) == ("end_of_data", local.step)
    assert_same_weights(local.bundle, result.bundle)


# A SIGKILLed worker of two: tests/cluster/test_ray_s3.py (the same run, its checkpoints on S3); a SIGKILLed
# worker of one: test_ray_job.py; a raise without --max-failures, rerun: test_rerunning_the_job_... below.
# Each 2-worker job costs most of a minute of CI on 2 cores, so one job takes both faults here.
def test_an_out_of_memory_error_on_one_rank_backs_off_both_and_a_failed_worker_of_two_is_restarted(
        ray_cluster, config, one_worker, tmp_path, monkeypatch):
    """Rank 1 runs out of memory in the first forward of step 3: both ranks retry the step at micro-batch 1 x 2
    (the same samples); rank 1 then raises after step 5: the job restarts from the checkpoint of step 3 (its
    split kept) and ends at step 8."""
    monkeypatch.setenv("AIOS_TEST_FAULT", "oom:3,raise:5")  # rank 1 only
    monkeypatch.setenv("AIOS_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    monkeypatch.setenv("AIOS_TEST_FAULT_RANK", "1")
    result = two_workers(config, "oom-then-raise", max_failures=1)
    assert (tmp_path / "fired.0").exists() and (tmp_path / "fired.1").exists()
    assert (result.reason, result.step, result.trained_steps) == ("steps", 8, 5)
    steps = records(result.bundle, "step")
    assert [r["step"] for r in steps] == list(range(1, 9))  # steps 4 and 5 of the failed attempt dropped
    assert [(r["micro_batch"], r["grad_accum"]) for r in steps] == [(2, 1)] * 2 + [(1, 2)] * 6  # both ranks
    reference = records(one_worker.bundle, "step")
    assert [r["samples_drawn"] for r in steps] == [r["samples_drawn"] for r in reference]  # the same order
    for a, b in zip(steps, reference, strict=True):  # the same batch, summed in another order from step 3
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert BrainBundle(result.bundle).metadata()["run"]["ray_restarts"] == 1
    shown = aios("brains", "show", "oom-then-raise", "--bundle-dir", result.bundle.parent).stdout
    assert table_rows(shown)["trained by"] == "ray, 2 workers (1 restart)"


def test_a_run_resumes_across_world_sizes_and_a_stop_seen_by_one_rank_stops_both_after_the_same_step(
        ray_cluster, constant_lr, tmp_path, monkeypatch):
    """1 worker (2 micro-batches) to step 4; then 2 workers, of which only rank 1 sees a stop request after
    step 5: both stop after that step, with one checkpoint; then 1 worker (the split from the checkpoint's
    global batch: 2 accumulation steps of --batch-size 2) to 8. The run consumes the samples of, and ends bit
    for bit as, one uninterrupted worker (a constant learning rate: the stages' --steps do not change it)."""
    config, one_worker = constant_lr
    launch(config.replace(brain_name="elastic", steps=4, gradient_accumulation_steps=2))
    monkeypatch.setenv("AIOS_TEST_FAULT", "stop:5")  # only rank 1 sees a stop request, after step 5
    monkeypatch.setenv("AIOS_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    monkeypatch.setenv("AIOS_TEST_FAULT_RANK", "1")
    stopped = two_workers(config.replace(resume=True, steps=6), "elastic")
    assert (tmp_path / "fired").exists() and (stopped.reason, stopped.step) == ("stop", 5)
    assert [p.name for p in list_checkpoints(stopped.bundle / "checkpoints")] == [
        "step-000003", "step-000004", "step-000005"]  # the stop step's, of both ranks (verified when listed)
    assert [r["reason"] for r in records(stopped.bundle, "stop")] == ["a stop request seen by another worker"]
    monkeypatch.delenv("AIOS_TEST_FAULT")
    final = launch(config.replace(brain_name="elastic", resume=True))  # and it goes on as if never stopped
    assert final.step == 8
    ours, theirs = records(final.bundle, "step"), records(one_worker.bundle, "step")
    assert [r["samples_drawn"] for r in ours] == [r["samples_drawn"] for r in theirs]  # the consumed samples
    assert BrainBundle(final.bundle).tracker()["state"] == BrainBundle(one_worker.bundle).tracker()["state"]
    assert_same_weights(one_worker.bundle, final.bundle)  # the reduction order allows it: bit for bit
    assert [r["grad_accum"] for r in ours] == [2, 2, 2, 2, 1, 2, 2, 2]


def test_rerunning_the_job_with_its_run_name_resumes_it_on_two_workers(ray_cluster, constant_lr, tmp_path,
                                                                        monkeypatch):
    """A job that failed after step 5 (rank 0 raised; without --max-failures a failed worker fails the job, with
    its error) is run again, the same command, and continues from its checkpoint of step 3."""
    config, reference = constant_lr
    config = config.replace(run_name="job-1")
    monkeypatch.setenv("AIOS_TEST_FAULT", "raise:5")
    monkeypatch.setenv("AIOS_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    with pytest.raises(Exception, match="injected failure after step 5"):
        two_workers(config, "rerun")
    assert (tmp_path / "fired").exists()
    monkeypatch.delenv("AIOS_TEST_FAULT")
    result = two_workers(config, "rerun")  # the same command again: continues from the checkpoint of step 3
    assert (result.step, result.trained_steps) == (8, 5)
    assert_same_weights(reference.bundle, result.bundle)
    assert steps_logged(result.bundle) == list(range(1, 9))
    assert BrainBundle(result.bundle).metadata()["run"]["run_name"] == "job-1"


# DeepSpeed computes the gradient norm in its own order: 2e-5 relative off torch's clip_grad_norm_ here. With
# --grad-clip that norm scales the update, and the runs drift apart in float32 rounding (measured: losses within
# 1e-4 relative over the first steps); without it, ZeRO-2 steps bit for bit what DDP steps.
ZERO_NORM_RTOL = 1e-4
RAY_RUN_FILES = (".validate_storage_marker", "checkpoint_manager_snapshot.json")  # Ray Train's, in its run dir


@pytest.fixture(scope="module")
def zero_reference(config):
    """Without a gradient clip, and with an odd number of eval batches (ZeRO-3's eval must balance them over
    the ranks): one in-process worker accumulating two micro-batches, as DDP's reference above."""
    config = config.replace(grad_clip=0.0, eval_batches=3)
    return config, launch(config.replace(brain_name="zero-reference", gradient_accumulation_steps=2))


@pytest.mark.timeout(600)  # the first DeepSpeed use on a machine JIT-compiles its CPU communication op
def test_zero2_on_two_workers_trains_what_ddp_trains_and_a_failed_worker_resumes_every_ranks_shard(
        ray_cluster, zero_reference, tmp_path, monkeypatch):
    """--zero-stage zero2: DeepSpeed inside both workers (its CPU accelerator, on Ray's gloo group), the
    accumulation and the gradient reduction handed to it. Rank 0 raises after step 5: the restarted workers load
    the checkpoint of step 3, each its own optimizer shard, and end at step 8 bit for bit where the reference
    (one worker accumulating both micro-batches, which DDP matches bit for bit: above) ends."""
    config, reference = zero_reference
    monkeypatch.setenv("AIOS_TEST_FAULT", "raise:5")
    monkeypatch.setenv("AIOS_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    result = two_workers(config, "zero2", zero_stage="zero2", max_failures=1)
    assert (tmp_path / "fired").exists()
    assert (result.reason, result.step, result.trained_steps) == ("steps", 8, 5)
    assert BrainBundle(result.bundle).metadata()["run"]["ray_restarts"] == 1
    steps, theirs = records(result.bundle, "step"), records(reference.bundle, "step")
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert [r["samples_drawn"] for r in steps] == [r["samples_drawn"] for r in theirs]
    assert [r["loss"] for r in steps] == [r["loss"] for r in theirs]  # across the restart too
    for a, b in zip(steps, theirs, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=ZERO_NORM_RTOL)  # DeepSpeed's own norm
    assert_same_weights(reference.bundle, result.bundle)  # fresh Adam moments after the restart would not be
    assert result.final_eval == reference.final_eval
    # Every checkpoint holds both ranks' DeepSpeed shards beside aios's files, all under the seal
    checkpoints = list_checkpoints(result.bundle / "checkpoints")
    assert [c.name for c in checkpoints] == ["step-000003", "step-000006", "step-000008"]
    for checkpoint in checkpoints:
        sealed = json.loads((checkpoint / COMPLETE).read_text())["files"]
        assert sorted(sealed) == sorted(expected_files(2, "zero2")) and verify_checkpoint(checkpoint) is None
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "mp_rank_00_model_states.pt"} <= set(sealed) and "optimizer.pt" not in sealed
        state = json.loads((checkpoint / "state.json").read_text())
        assert (state["zero_stage"], state["optimizer_kind"], state["world_size"]) == ("zero2", "adamw+zero2", 2)
    # The shards load into ZeRO only: a resume without it is refused before anything is written
    def aios_files() -> list[tuple[str, int]]:  # Ray's own run-storage files (its snapshot, marker) aside
        return sorted((str(p.relative_to(result.bundle)), p.stat().st_mtime_ns) for p in result.bundle.rglob("*")
                      if p.is_file() and p.name not in RAY_RUN_FILES)

    before = aios_files()
    with pytest.raises(AiosError, match=r"holds adamw\+zero2 optimizer state, this run uses adamw: resume with "
                                        r"--optimizer adamw without --use-8bit-optimizer, with --zero-stage zero2 "
                                        r"and --launcher ray"):
        launch(config.replace(brain_name="zero2", resume=True, steps=10))
    with pytest.raises(AiosError, match=r"holds ZeRO optimizer state sharded over 2 workers, this run has 1: resume "
                                        r"it with --world-size 2"):  # refused inside the one worker, on Ray
        launch(config.replace(brain_name="zero2", resume=True, steps=10, launcher="ray", world_size=1,
                              zero_stage="zero2"))
    assert aios_files() == before


@pytest.mark.timeout(600)
def test_zero3_partitions_the_weights_and_still_saves_and_evaluates_them_whole(ray_cluster, zero_reference):
    """ZeRO-3 keeps a shard of each large weight per rank: the bundle and the checkpoints get them gathered
    whole, the parameter count is the model's, and an eval batch count that does not split evenly over the ranks
    (3 on 2) evaluates what one worker evaluates (the rank with fewer runs one more forward, dropped: ZeRO-3 may
    gather weights, a collective, in any forward)."""
    config, reference = zero_reference
    result = two_workers(config, "zero3", zero_stage="zero3")
    assert (result.reason, result.step) == ("steps", 8)
    assert [r["loss"] for r in records(result.bundle, "step")] == [r["loss"] for r in records(reference.bundle, "step")]
    assert_same_weights(reference.bundle, result.bundle)
    assert result.final_eval == reference.final_eval
    ours, theirs = (BrainBundle(b).metadata()["parameters"] for b in (result.bundle, reference.bundle))
    assert ours == theirs > 100_000
    newest = list_checkpoints(result.bundle / "checkpoints")[-1]
    sealed = json.loads((newest / COMPLETE).read_text())["files"]
    assert sorted(sealed) == sorted(expected_files(2, "zero3"))
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= set(sealed)
    assert_same_weights(reference.bundle / "checkpoints" / newest.name, newest)  # the checkpoint's, gathered too
