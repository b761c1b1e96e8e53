"""What a resume keeps and refuses, and what a run may write: runtime flags, optimizer kinds, steps already
reached, attempts that train nothing, non-finite weights, strict JSON, the stop file, the log file, the lock."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aios.bundle import BrainBundle
from aios.errors import AiosError
from aios.train import already_reached_message, launch
from aios.train import checkpoint as ckpt
from aios.train.loop import TrainCallbacks
from tests.train.faults import PoisonLogits
from tests.train.test_loop import assert_same_weights


def weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "model.safetensors")


def records(path: Path, event: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if event is None or r["event"] == event]


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `root` with its mtime and bytes: what "changed nothing" compares."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_runtime_flags_toggle_on_resume_and_give_the_same_weights(make_config):
    config = make_config(steps=6, checkpoint_every=3)
    straight = launch(config.replace(brain_name="straight"))
    launch(config.replace(brain_name="toggled", steps=3))
    resumed = launch(config.replace(brain_name="toggled", resume=True, gradient_checkpointing=True,
                                    use_flash_attn=True))  # flash-attn falls back to SDPA on CPU, loudly
    assert resumed.step == 6
    for name, tensor in weights(straight.bundle).items():
        torch.testing.assert_close(weights(resumed.bundle)[name], tensor, rtol=0, atol=0, msg=name)
    saved = json.loads((resumed.bundle / "config.json").read_text())
    assert not {"gradient_checkpointing", "use_flash_attn"} & set(saved)


def test_optimizer_state_of_another_kind_is_refused(make_config):
    """A checkpoint whose optimizer state is bitsandbytes' 8-bit AdamW must not load into a full-precision
    AdamW (the other way round: tests/train/test_memory_options.py)."""
    config = make_config(steps=2)
    first = launch(config)
    directory = first.bundle / "checkpoints" / "step-000002"
    state = json.loads((directory / "state.json").read_text())
    assert state["optimizer_kind"] == "adamw"
    state["optimizer_kind"] = "adamw-8bit"
    (directory / "state.json").write_text(json.dumps(state))
    (directory / ckpt.COMPLETE).unlink()
    ckpt.seal_checkpoint(directory)
    with pytest.raises(AiosError, match="holds adamw-8bit optimizer state, this run uses adamw: resume with "
                                        "--optimizer adamw --use-8bit-optimizer"):
        launch(config.replace(steps=4, resume=True))


def test_resume_with_steps_already_reached_changes_nothing(make_config):
    config = make_config(steps=6)
    first = launch(config)
    before = tree(first.bundle)
    for steps in (3, 6):
        result = launch(config.replace(steps=steps, resume=True, eval_every=1))
        assert (result.reason, result.step, result.trained_steps) == ("already_reached", 6, 0)
    assert tree(first.bundle) == before
    assert already_reached_message(config.replace(steps=3), 6) == (
        "brain 'tiny' is at step 6; --steps 3 is already reached: nothing to train (pass a larger --steps to "
        "continue it)")


def test_an_attempt_that_trains_no_step_rewrites_nothing(make_config, tmp_path, monkeypatch):
    from aios.train.session import LocalSession

    stop_file = tmp_path / "STOP"
    config = make_config(steps=4, stop_file=str(stop_file))
    first = launch(config.replace(steps=2))
    before = {k: v for k, v in tree(first.bundle).items() if k != "metrics.jsonl"}
    enter_loop = LocalSession.enter_loop

    def enter_loop_then_stop(self):  # the stop request arrives as the loop begins: before its first step
        enter_loop(self)
        stop_file.touch()

    monkeypatch.setattr(LocalSession, "enter_loop", enter_loop_then_stop)
    result = launch(config.replace(resume=True))
    assert (result.reason, result.step, result.trained_steps) == ("stop", 2, 0)
    assert {k: v for k, v in tree(first.bundle).items() if k != "metrics.jsonl"} == before
    assert not stop_file.exists()  # consumed: it appeared during the run
    assert [r["event"] for r in records(first.bundle / "metrics.jsonl")][-3:] == ["start", "stop", "end"]


def test_non_finite_weights_never_overwrite_a_good_bundle(make_config):
    config = make_config(steps=2)
    first = launch(config)
    before = tree(first.bundle)
    with pytest.raises(AiosError, match="the weights became non-finite by step 3 .*nothing was saved"):
        launch(config.replace(steps=3, resume=True, lr=1e39))  # finite as a number, inf as a float32 update
    after = tree(first.bundle)
    assert {k: v for k, v in after.items() if k != "metrics.jsonl"} == {
        k: v for k, v in before.items() if k != "metrics.jsonl"}
    assert ckpt.verify_checkpoint(first.bundle / "checkpoints" / "step-000002") is None


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_file_is_strict_json_even_after_a_non_finite_step(make_config):
    result = launch(make_config(steps=3, eval_every=1), callbacks=PoisonLogits({3}))
    lines = (result.bundle / "metrics.jsonl").read_text().splitlines()
    parsed = [_strict_json(line) for line in lines]
    poisoned = next(r for r in parsed if r["event"] == "step" and r["step"] == 3)
    assert poisoned["loss"] is None and poisoned["grad_norm"] is None and poisoned["skipped"] is True
    for name in ("metadata.json", "training_args.json", "chunk_tracker_state.json", "config.json"):
        _strict_json((result.bundle / name).read_text())
    _strict_json((result.bundle / "checkpoints" / "step-000003" / "state.json").read_text())


def test_a_skipped_step_leaves_weights_and_optimizer_state_unchanged(make_config):
    seen = {}

    class Watch(PoisonLogits):
        def at(self, trainer, point, micro_step):
            super().at(trainer, point, micro_step)
            if point == "optimizer_step" and trainer.step == 2:  # before the poisoned step's update
                seen["weights"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
                seen["moments"] = {k: {n: t.clone() for n, t in s.items()}
                                   for k, s in trainer.optimizer.state_dict()["state"].items()}

        def after_step(self, trainer, record):
            if record["step"] == 3:
                assert record["skipped"]
                for name, tensor in trainer.model.state_dict().items():
                    assert torch.equal(tensor, seen["weights"][name]), name
                for key, state in trainer.optimizer.state_dict()["state"].items():
                    for name, tensor in state.items():
                        assert torch.equal(tensor, seen["moments"][key][name]), (key, name)
                seen["checked"] = True

    launch(make_config(steps=4), callbacks=Watch({3}))
    assert seen["checked"]


def test_metadata_created_is_when_the_first_run_started(make_config):
    started = time.time()
    config = make_config(steps=2, checkpoint_every=0)
    first = launch(config)
    created = time.mktime(time.strptime(BrainBundle(first.bundle).metadata()["created"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs((created - time.timezone) - started) < 3  # the run's start (the first checkpoint is later)
    meta = BrainBundle(first.bundle).metadata()
    launch(config.replace(steps=3, resume=True))
    assert BrainBundle(first.bundle).metadata()["created"] == meta["created"]


# -- the stop file, the log file, the lock ----------------------------------------------------------------

def test_an_existing_stop_file_is_refused_and_kept(make_config, tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("a user's file")
    with pytest.raises(AiosError, match="the stop file already exists; remove it first"):
        launch(make_config(stop_file=str(mine)))
    assert mine.read_text() == "a user's file"
    (tmp_path / "adir").mkdir()
    with pytest.raises(AiosError, match="is a directory: pass the path of a file that does not exist yet"):
        launch(make_config(stop_file=str(tmp_path / "adir")))
    with pytest.raises(AiosError, match="its directory .* does not exist"):
        launch(make_config(stop_file=str(tmp_path / "no" / "STOP")))
    assert not (tmp_path / "brains").exists()


def test_a_stop_directory_that_appears_stops_the_run_and_is_left_alone(make_config, tmp_path, caplog):
    stop = tmp_path / "STOP"

    class MakeDir(TrainCallbacks):
        def after_step(self, trainer, record):
            if record["step"] == 2:
                stop.mkdir()

    with caplog.at_level(logging.WARNING):
        result = launch(make_config(stop_file=str(stop)), callbacks=MakeDir())
    assert (result.reason, result.step) == ("stop", 2)
    assert stop.is_dir() and "is a directory: left in place" in caplog.text
    assert ckpt.verify_checkpoint(result.bundle / "checkpoints" / "step-000002") is None


def test_a_fresh_run_refuses_an_existing_log_file(make_config, tmp_path):
    log_file = tmp_path / "shared.jsonl"
    log_file.write_text('{"a user": "record"}\n')
    with pytest.raises(AiosError, match="--log-file .* already exists: pass a new file"):
        launch(make_config(log_file=str(log_file)))
    assert log_file.read_text() == '{"a user": "record"}\n'


def test_a_second_run_on_a_brain_being_trained_is_refused(make_config):
    config = make_config(steps=2)
    with BrainBundle.for_run(config.bundle_dir, config.brain_name).lock():
        with pytest.raises(AiosError, match="is being trained by another process"):
            launch(config)
    assert launch(config).step == 2  # the lock goes with its holder


def test_a_run_that_fails_before_writing_leaves_no_brain_directory(make_config, tmp_path):
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"\x00\x01" * 100)
    config = make_config(dataset_file=str(binary))
    with pytest.raises(AiosError, match="binary"):
        launch(config)
    assert not (Path(config.bundle_dir) / config.brain_name).exists()


def test_the_same_run_name_continues_the_run_and_another_is_refused(make_config):
    # a constant learning rate: the two attempts' --steps do not change the schedule
    config = make_config(steps=8, checkpoint_every=2, warmup_steps=0, min_lr_ratio=1.0, run_name="nightly")
    straight = launch(config.replace(brain_name="straight"))
    first = launch(config.replace(steps=4))
    assert BrainBundle(first.bundle).metadata()["run"]["run_name"] == "nightly"
    again = launch(config)  # the same command, no --resume: e.g. after the driver was killed
    assert (again.step, again.trained_steps) == (8, 4)
    assert_same_weights(straight.bundle, again.bundle)
    for other in (config.replace(run_name="weekly"), config.replace(run_name=None)):
        with pytest.raises(AiosError, match="already holds a trained model .*--run-name it was trained with"):
            launch(other)
    with pytest.raises(AiosError, match="--run-name .a b. is not a plain name"):
        config.replace(run_name="a b")
