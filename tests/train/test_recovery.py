"""Recovery paths are exact: an out-of-memory retry at any point of a step, checkpoints that cannot be loaded,
re-saving a step, durability, leftovers of killed runs, links in checkpoints/, a crash past a checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aios.bundle import BrainBundle
from aios.errors import AiosError
from aios.train import checkpoint as ckpt
from aios.train import launch
from aios.train.loop import TrainCallbacks
from aios.train.optim import OptimizerTransaction

OOM = torch.cuda.OutOfMemoryError


def weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "model.safetensors")


def assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, f"weights differ: {different[:5]}"


def records(path: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


class Recipe(TrainCallbacks):
    """Both runs of a comparison: exploration decides halting (so the RNG matters), rows stay mid-sample
    across steps (so the carries matter), optionally a GradScaler (on CPU, to reach the unscale path)."""

    def __init__(self, scaler: bool = False):
        self.scaler = scaler

    def at(self, trainer, point, micro_step):
        if point == "forward" and trainer.step == 0 and micro_step == 0:
            with torch.no_grad():
                trainer.model.inner.q_head.bias.copy_(torch.tensor([5.0, -5.0]))
            if self.scaler and trainer.scaler is None:
                trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)


class ResplitAfter(Recipe):
    """The reference: a run that has half the micro-batch (twice the accumulation) from step `step` + 1 on."""

    def __init__(self, step: int, **kw):
        super().__init__(**kw)
        self.step = step

    def after_step(self, trainer, record):
        if record["step"] == self.step:
            trainer._resplit(trainer.micro_batch // 2, trainer.grad_accum * 2)


class OOMAt(Recipe):
    """Raise CUDA out-of-memory once, at `point` of step `step` + 1 (a callback point, or inside a torch
    function the optimizer step calls: `patch` = (module, name, calls that succeed first))."""

    def __init__(self, step: int, point: str, micro_step: int | None = None, patch=None, **kw):
        super().__init__(**kw)
        self.step, self.point, self.micro_step, self.patch = step, point, micro_step, patch
        self.raised = 0

    def at(self, trainer, point, micro_step):
        super().at(trainer, point, micro_step)
        if self.raised or trainer.step != self.step or point != self.point or micro_step != self.micro_step:
            return
        if self.patch is None:
            self.raised += 1
            raise OOM("CUDA out of memory (injected)")
        module, name, succeed = self.patch
        original, calls = getattr(module, name), [0]

        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] > succeed:
                setattr(module, name, original)
                self.raised += 1
                raise OOM("CUDA out of memory (injected inside the optimizer step)")
            return original(*args, **kwargs)

        setattr(module, name, failing)


CASES = {
    # name: (config overrides, step, point, micro_step, patch, scaler)
    "forward": ({}, 2, "forward", 0, None, False),
    "backward of the second micro-batch": ({"gradient_accumulation_steps": 2}, 2, "backward", 1, None, False),
    "after unscale (clip)": ({}, 2, "clip", None, None, True),
    "before the optimizer step": ({}, 2, "optimizer_step", None, None, False),
    "inside fused AdamW, after the step counters moved": ({}, 2, "optimizer_step", None,
                                                          (torch, "_fused_adamw_", 0), False),
    "inside the first step, state half created": ({}, 0, "optimizer_step", None, (torch, "zeros_like", 3), False),
    "inside AdamATan2, updates half computed": ({"optimizer": "adam-atan2"}, 2, "optimizer_step", None,
                                                (torch, "atan2", 2), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_oom_retry_continues_bit_identical_to_a_run_with_the_smaller_micro_batch(make_config, case):
    overrides, step, point, micro_step, patch, scaler = CASES[case]
    config = make_config(steps=5, halt_exploration_prob=0.5, **overrides)
    inject = OOMAt(step, point, micro_step, patch, scaler=scaler)
    retried = launch(config.replace(brain_name="oom"), callbacks=inject)
    assert inject.raised == 1
    if step == 0:  # halved from the first step: the same as asking for the smaller split
        mb, acc = config.batch_size // 2, config.gradient_accumulation_steps * 2
        reference = launch(config.replace(brain_name="ref", batch_size=mb, gradient_accumulation_steps=acc),
                           callbacks=Recipe(scaler=scaler))
    else:
        reference = launch(config.replace(brain_name="ref"), callbacks=ResplitAfter(step, scaler=scaler))
    steps = records(retried.bundle / "metrics.jsonl", "step")
    assert [r["micro_batch"] for r in steps] == [4] * step + [2] * (5 - step)
    assert [r["loss"] for r in steps] == [r["loss"] for r in records(reference.bundle / "metrics.jsonl", "step")]
    assert_bitwise_equal(retried.bundle, reference.bundle)
    a = torch.load(retried.bundle / "checkpoints" / "step-000005" / "optimizer.pt", weights_only=True)
    b = torch.load(reference.bundle / "checkpoints" / "step-000005" / "optimizer.pt", weights_only=True)
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), (key, name)


def test_without_the_roll_back_the_retry_would_differ(make_config, monkeypatch):
    """The test above can fail: with the optimizer roll-back disabled, an OOM after fused AdamW moved its
    step counters gives other weights."""
    monkeypatch.setattr(OptimizerTransaction, "roll_back", lambda self: None)
    config = make_config(steps=5, halt_exploration_prob=0.5)
    retried = launch(config.replace(brain_name="oom"),
                     callbacks=OOMAt(2, "optimizer_step", patch=(torch, "_fused_adamw_", 0)))
    reference = launch(config.replace(brain_name="ref"), callbacks=ResplitAfter(2))
    with pytest.raises(AssertionError, match="weights differ"):
        assert_bitwise_equal(retried.bundle, reference.bundle)


def test_an_optimizer_that_cannot_step_atomically_is_snapshotted(make_config, monkeypatch):
    """Without fused kernels AdamW falls back to its multi-tensor path, which is not atomic: the step is then
    snapshotted, so even an error after the whole update (a step hook) is undone exactly."""
    real_adamw = torch.optim.AdamW

    def no_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("fused kernels unavailable (simulated)")
        return real_adamw(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)

    class OOMAfterTheUpdate(Recipe):
        raised = 0

        def at(self, trainer, point, micro_step):
            super().at(trainer, point, micro_step)
            if point == "optimizer_step" and trainer.step == 2 and not self.raised:
                assert not trainer.transaction.atomic

                def hook(optimizer, args, kwargs):
                    handle.remove()
                    self.raised += 1
                    raise OOM("CUDA out of memory (injected after the update)")

                handle = trainer.optimizer.register_step_post_hook(hook)

    config = make_config(steps=5, halt_exploration_prob=0.5)
    inject = OOMAfterTheUpdate()
    retried = launch(config.replace(brain_name="oom"), callbacks=inject)
    reference = launch(config.replace(brain_name="ref"), callbacks=ResplitAfter(2))
    assert inject.raised == 1
    assert_bitwise_equal(retried.bundle, reference.bundle)


# -- checkpoints that cannot be loaded -------------------------------------------------------------------

def _reseal(directory: Path) -> None:
    """Make an edited checkpoint's hashes valid again: a checkpoint whose content is bad but sealed."""
    (directory / ckpt.COMPLETE).unlink()
    ckpt.seal_checkpoint(directory)
    assert ckpt.verify_checkpoint(directory) is None


def _bad_state(directory: Path) -> None:
    state = json.loads((directory / "state.json").read_text())
    state["micro_batch"] = "four"
    (directory / "state.json").write_text(json.dumps(state))


def _optimizer_weights_only_refuses(directory: Path) -> None:
    torch.save({"optimizer": logging.getLogger("x")}, directory / "optimizer.pt")  # not a plain type


def _carry_of_another_shape(directory: Path) -> None:
    from safetensors.torch import save_file

    flat = load_file(directory / "carry-rank0.safetensors")
    flat["0.z_H"] = flat["0.z_H"][:, :3].contiguous()
    save_file(flat, directory / "carry-rank0.safetensors")


@pytest.mark.parametrize("spoil", [_bad_state, _optimizer_weights_only_refuses, _carry_of_another_shape],
                         ids=["state.json values", "optimizer.pt refused by weights_only", "carry shape"])
def test_a_sealed_checkpoint_that_cannot_be_loaded_is_set_aside_and_the_previous_used(make_config, caplog, spoil):
    config = make_config(steps=4, checkpoint_every=2)
    first = launch(config)
    checkpoints = first.bundle / "checkpoints"
    spoil(checkpoints / "step-000004")
    _reseal(checkpoints / "step-000004")
    with caplog.at_level(logging.WARNING):
        second = launch(config.replace(steps=6, resume=True))
    assert "cannot be loaded" in caplog.text
    assert records(second.bundle / "metrics.jsonl", "start")[-1]["resumed_from"].endswith("step-000002")
    assert second.step == 6
    assert any(p.name.startswith("step-000004.invalid-") for p in checkpoints.iterdir())  # kept, not deleted
    straight = launch(config.replace(steps=6, brain_name="straight"))
    assert_bitwise_equal(straight.bundle, second.bundle)


def test_a_checkpoint_of_an_older_format_is_refused_not_taken_for_corruption(make_config):
    config = make_config(steps=2)
    first = launch(config)
    directory = first.bundle / "checkpoints" / "step-000002"
    state = json.loads((directory / "state.json").read_text())
    del state["format"]
    (directory / "state.json").write_text(json.dumps(state))
    _reseal(directory)
    with pytest.raises(AiosError, match="written by an older aios"):
        launch(config.replace(steps=4, resume=True))
    assert ckpt.list_checkpoints(first.bundle / "checkpoints") == [directory]  # not set aside


# -- publishing, durability, leftovers, links -----------------------------------------------------------------

def _sealed(tmp_path: Path, name: str, content: str) -> Path:
    staged = tmp_path / "staging" / name
    staged.mkdir(parents=True)
    for file in ckpt.expected_files(1):  # placeholders: these tests move directories, they load nothing
        (staged / file).write_text(file)
    (staged / "state.json").write_text(json.dumps({"world_size": 1, "content": content}))
    ckpt.seal_checkpoint(staged)
    return staged


def _content(directory: Path) -> str:
    return json.loads((directory / "state.json").read_text())["content"]


def test_saving_a_step_again_swaps_it_in_one_step(tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    ckpt.publish_checkpoint(_sealed(tmp_path, "a", "old"), checkpoints, 6, keep=3)
    final = checkpoints / "step-000006"
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((str(a), str(b))), real_replace(a, b))[1])
    removed = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):  # at the moment the old copy is deleted, step-6 is the new, intact one
        removed.append(Path(path).read_text() if Path(path).is_file() else _content(Path(path)))
        assert ckpt.verify_checkpoint(final) is None and _content(final) == "new"
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    ckpt.publish_checkpoint(_sealed(tmp_path, "b", "new"), checkpoints, 6, keep=3)
    assert not any(str(final) == source for source, _ in renames)  # never renamed away
    assert removed == ["old"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000006"]


def test_without_an_atomic_swap_the_existing_step_is_kept(tmp_path, monkeypatch, caplog):
    checkpoints = tmp_path / "checkpoints"
    ckpt.publish_checkpoint(_sealed(tmp_path, "a", "old"), checkpoints, 6, keep=3)
    monkeypatch.setattr(ckpt, "exchange_dirs", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    with caplog.at_level(logging.WARNING):
        ckpt.publish_checkpoint(_sealed(tmp_path, "b", "new"), checkpoints, 6, keep=3)
    assert _content(checkpoints / "step-000006") == "old"
    assert "cannot swap directories atomically" in caplog.text


def test_checkpoint_and_bundle_files_are_flushed_to_disk(make_config, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    result = launch(make_config(steps=2))
    step_dir = result.bundle / "checkpoints" / "step-000002"
    staged = [Path(p) for p in synced if Path(p).parent.name == "step-000002"]  # before the rename into place
    for name in ("model.safetensors", "optimizer.pt", "rng-rank0.pt", "carry-rank0.safetensors", "state.json",
                 "sampler-rank0.json", ".COMPLETE.tmp"):  # COMPLETE is flushed before its rename
        assert name in {p.name for p in staged}, name
    assert any(p.endswith("/step-000002") for p in synced)  # the directory with COMPLETE in it
    assert str(result.bundle / "checkpoints") in synced  # the rename into place
    assert ckpt.verify_checkpoint(step_dir) is None
    bundle_files = [Path(p).name for p in synced if Path(p).parent == result.bundle]
    assert any(name.startswith(".model.safetensors.") for name in bundle_files)  # flushed, then renamed
    assert str(result.bundle) in synced


def test_a_torn_bundle_weights_file_is_caught_on_load(make_config):
    result = launch(make_config(steps=2))
    weights_file = result.bundle / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-4096:] = bytes(4096)  # a power loss before the data blocks reached the disk: zeros, same size
    weights_file.write_bytes(bytes(data))
    with pytest.raises(AiosError, match="does not match the checksum in its header"):
        BrainBundle(result.bundle).load_model()


def test_staging_left_by_killed_runs_is_removed_at_start(make_config):
    config = make_config(steps=2)
    first = launch(config)
    checkpoints = first.bundle / "checkpoints"
    for i in range(3):  # what a run killed while writing a checkpoint leaves
        (checkpoints / f".staging-killed{i}" / "step-000003").mkdir(parents=True)
        (checkpoints / f".staging-killed{i}" / "step-000003" / "model.safetensors").write_bytes(b"x" * 1000)
    launch(config.replace(steps=3, resume=True))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000003"]


def test_a_symlink_in_checkpoints_is_left_alone(make_config, tmp_path, caplog):
    config = make_config(steps=2, checkpoint_every=1, keep_checkpoints=1)
    first = launch(config)
    checkpoints = first.bundle / "checkpoints"
    elsewhere = tmp_path / "user-files"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (checkpoints / "step-000001").symlink_to(elsewhere, target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        second = launch(config.replace(steps=4, resume=True))  # publishes and prunes past the link
    assert second.step == 4 and "a symbolic link" in caplog.text
    assert (checkpoints / "step-000001").is_symlink() and (elsewhere / "keep.txt").read_text() == "mine"
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["step-000004"]


# -- a crash past the last checkpoint -----------------------------------------------------------------------

class CrashAfter(TrainCallbacks):
    def __init__(self, step: int):
        self.step = step

    def after_step(self, trainer, record):
        if record["step"] == self.step:
            raise RuntimeError("simulated crash")


def test_each_step_is_logged_once_after_a_crash_past_the_last_checkpoint(make_config):
    config = make_config(steps=7, checkpoint_every=3, eval_every=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        launch(config, callbacks=CrashAfter(5))
    log = BrainBundle.for_run(config.bundle_dir, config.brain_name).metrics_path
    assert [r["step"] for r in records(log, "step")] == [1, 2, 3, 4, 5]
    resumed = launch(config.replace(resume=True))
    assert [r["step"] for r in records(log, "step")] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["step"] for r in records(log, "eval")] == [2, 4, 6, 7]
    assert [r["step"] for r in records(log, "start")] == [0, 3]
    straight = launch(config.replace(brain_name="straight"))
    straight_losses = [r["loss"] for r in records(straight.bundle / "metrics.jsonl", "step")]
    assert [r["loss"] for r in records(log, "step")] == straight_losses
    assert_bitwise_equal(straight.bundle, resumed.bundle)


# -- found in review: the machine's problems are not the checkpoint's, and each step commits once ---------

def test_an_oom_while_loading_a_checkpoint_does_not_set_it_aside(make_config, monkeypatch):
    config = make_config(steps=2)
    first = launch(config)

    def full(self, state):
        raise OOM("CUDA out of memory (injected while loading the optimizer state)")

    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", full)
    with pytest.raises(OOM):
        launch(config.replace(steps=4, resume=True))
    assert [p.name for p in (first.bundle / "checkpoints").iterdir()] == ["step-000002"]  # not moved aside


def test_a_checkpoint_that_cannot_be_read_is_refused_not_set_aside(make_config, monkeypatch):
    config = make_config(steps=2)
    first = launch(config)
    ckpt._verified.clear()

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ckpt, "sha256_file", denied)
    with pytest.raises(AiosError, match="cannot read checkpoint .*PermissionError.*fix its permissions"):
        launch(config.replace(steps=4, resume=True))
    assert [p.name for p in (first.bundle / "checkpoints").iterdir()] == ["step-000002"]


def _rng_malformed(directory: Path) -> None:
    rng = torch.load(directory / "rng-rank0.pt", weights_only=True)
    rng["numpy"][1] = "not a tensor"
    torch.save(rng, directory / "rng-rank0.pt")


def test_a_malformed_rng_file_falls_back_like_corruption(make_config, caplog):
    config = make_config(steps=4, checkpoint_every=2)
    first = launch(config)
    _rng_malformed(first.bundle / "checkpoints" / "step-000004")
    _reseal(first.bundle / "checkpoints" / "step-000004")
    with caplog.at_level(logging.WARNING):
        second = launch(config.replace(steps=5, resume=True))
    assert "cannot be loaded (AttributeError" in caplog.text
    assert records(second.bundle / "metrics.jsonl", "start")[-1]["resumed_from"].endswith("step-000002")


def test_an_oom_while_committing_a_skipped_step_retries_it_once(make_config):
    from tests.train.faults import PoisonLogits

    class OOMInCommit(PoisonLogits):
        raised = 0

        def at(self, trainer, point, micro_step):
            super().at(trainer, point, micro_step)
            if point == "optimizer_step" and trainer.step == 2 and not self.raised:
                real = torch.ones_like

                def failing(*args, **kwargs):
                    torch.ones_like = real
                    self.raised += 1
                    raise OOM("CUDA out of memory (injected while resetting the poisoned rows)")

                torch.ones_like = failing

    inject = OOMInCommit({3})
    result = launch(make_config(steps=5), callbacks=inject)
    assert inject.raised == 1
    steps = records(result.bundle / "metrics.jsonl", "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5] and steps[2]["skipped"]
    assert steps[-1]["nonfinite_total"] == 1


def test_an_odd_micro_batch_backs_off_to_its_largest_divisor(make_config):
    class OOMAbove(Recipe):
        def at(self, trainer, point, micro_step):
            if point == "forward" and trainer.step >= 1 and trainer.micro_batch > 1:
                raise OOM("CUDA out of memory (injected)")

    result = launch(make_config(steps=3, batch_size=6), callbacks=OOMAbove())
    steps = records(result.bundle / "metrics.jsonl", "step")
    assert [(r["micro_batch"], r["grad_accum"]) for r in steps] == [(6, 1), (1, 6), (1, 6)]  # 6 -> 3 -> 1


def test_evaluation_after_a_back_off_reads_the_same_sequences(make_config):
    import numpy as np

    from aios.inference import evaluate_lm

    class Keep(OOMAt):
        def after_step(self, trainer, record):
            self.trainer = trainer

    inject = Keep(1, "forward", 0)
    result = launch(make_config(), callbacks=inject)
    trainer = inject.trainer
    assert trainer.micro_batch == 2 and result.final_eval["sequences"] == 8  # --eval-batches 2 x --batch-size 4
    chunks = list(trainer.eval_batches())
    assert [len(c) for c in chunks] == [2, 2, 2, 2]  # at most the micro-batch that fits
    whole = list(trainer.dataset.holdout_batches(4, 2))  # what an evaluation without the back-off reads
    assert np.array_equal(np.concatenate(chunks), np.concatenate(whole))
    again = evaluate_lm(trainer.model, whole, trainer.device, trainer.amp_dtype)
    assert result.final_eval["loss"] == pytest.approx(again["loss"], rel=1e-6)


def test_a_stop_file_that_appears_after_the_last_step_is_removed(make_config, tmp_path):
    stop = tmp_path / "STOP"

    class TouchAtTheEnd(TrainCallbacks):
        def after_step(self, trainer, record):
            if record["step"] == trainer.config.steps:
                stop.touch()

    result = launch(make_config(steps=2, stop_file=str(stop)), callbacks=TouchAtTheEnd())
    assert result.reason == "steps" and not stop.exists()


def test_a_resume_never_rewrites_a_log_file_of_another_brain(make_config, tmp_path):
    own = tmp_path / "own.jsonl"
    config = make_config(steps=2, log_file=str(own))
    launch(config)
    launch(config.replace(steps=3, resume=True))  # its own log: continued
    assert [json.loads(line)["event"] for line in own.read_text().splitlines()].count("start") == 2
    other = tmp_path / "other.jsonl"
    other.write_text('# a user\'s notes\n{"step": 99}\n')
    with pytest.raises(AiosError, match="is not a metrics log of brain 'tiny'"):
        launch(config.replace(steps=4, resume=True, log_file=str(other)))
    assert other.read_text() == '# a user\'s notes\n{"step": 99}\n'


def test_a_cpu_run_keeps_no_cuda_rng_state():
    assert "cuda" not in ckpt.capture_rng_state(torch.device("cpu"))


def test_when_no_verified_checkpoint_loads_the_resume_is_refused_not_started_over(tmp_path):
    """A load that failed part-way may have applied some of a checkpoint: starting from step 0 on top of it
    would train a mixture (and, on several workers, ranks in different states)."""
    from aios.train.session import restore_newest

    checkpoints = tmp_path / "checkpoints"
    ckpt.publish_checkpoint(_sealed(tmp_path, "a", "one"), checkpoints, 3, keep=3)
    tried = []

    def load(directory):
        tried.append(directory.name)
        raise ckpt.CheckpointUnusable("half applied")

    with pytest.raises(AiosError, match="no checkpoint in .* could be loaded .*moved aside"):
        restore_newest(checkpoints, load, require=False)
    assert tried == ["step-000003"] and ckpt.list_checkpoints(checkpoints) == []  # set aside, not deleted
    assert restore_newest(checkpoints, load, require=False) is None  # nothing left to try: a fresh start
