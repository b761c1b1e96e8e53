"""The worker loop in one process: bundle, metrics, determinism, resume, stop, OOM back-off, accumulation."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aios.bundle import BrainBundle
from aios.config import TrainingConfig
from aios.errors import AiosError
from aios.train import launch
from aios.train.checkpoint import list_checkpoints, verify_checkpoint
from aios.train.loop import TrainCallbacks
from tests.train.faults import PoisonLogits

SAMPLE = Path(__file__).resolve().parents[2] / "training_data" / "curated_datasets" / "test_sample.txt"

STEP_KEYS = {"event", "step", "epoch", "lr", "loss", "lm_loss", "q_halt_loss", "q_continue_loss", "aux_loss",
             "grad_norm", "token_accuracy", "halted", "segments", "samples_drawn", "sample_tokens",
             "segment_tokens", "sample_tokens_seen", "segment_tokens_seen", "tokens_per_s", "step_time_s", "skipped", "nonfinite_total", "micro_batch", "grad_accum",
             "peak_rss_mb", "time"}


def records(path: Path, event: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if event is None or r["event"] == event]


def weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_a_run_writes_a_complete_bundle_and_metrics(make_config):
    config = make_config(eval_every=3)
    result = launch(config)
    root = result.bundle
    assert (result.reason, result.step) == ("steps", 6)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metadata.json", "training_args.json",
                 "chunk_tracker_state.json", "metrics.jsonl"):
        assert (root / name).is_file(), name
    assert [p.name for p in list_checkpoints(root / "checkpoints")] == ["step-000006"]
    assert verify_checkpoint(root / "checkpoints" / "step-000006") is None
    assert result.plot == root / "training_curves.png"  # drawn at the end of the run
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert BrainBundle(root).metadata()["run"] == {"launcher": "local", "world_size": 1}

    steps = records(root / "metrics.jsonl", "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(STEP_KEYS <= set(r) for r in steps)
    assert steps[0]["samples_drawn"] == 4  # every row starts halted and draws
    assert [r["event"] for r in records(root / "metrics.jsonl")][0] == "start"
    assert [r["step"] for r in records(root / "metrics.jsonl", "eval")] == [3, 6]
    end = records(root / "metrics.jsonl", "end")[0]
    assert end["reason"] == "steps" and end["segment_tokens_seen"] == 6 * 4 * 16  # every row, every step
    drawn = sum(r["samples_drawn"] for r in steps)
    assert 4 <= drawn < 6 * 4 and end["sample_tokens_seen"] == drawn * 16  # each sample once
    assert sum(r["samples_drawn"] for r in steps) == BrainBundle(root).tracker()["sequences_consumed"]
    # The held-out tail is the eval set when no --eval-file is given.
    assert result.final_eval["sequences"] == 2 * 4 and math.isfinite(result.final_eval["loss"])

    meta = BrainBundle(root).metadata()
    assert meta["steps"] == 6 and meta["segment_tokens_seen"] == 6 * 4 * 16 and meta["name"] == "tiny"
    assert meta["sample_tokens_seen"] == drawn * 16 and meta["autocast"] == "float32"
    assert meta["datasets"]["train"]["fingerprint"] and meta["versions"]["torch"] == torch.__version__
    saved = TrainingConfig.from_json((root / "training_args.json").read_text(), check_paths=False)
    assert saved == config
    # The bundle's weights are the final checkpoint's, and the bundle loads with nothing else.
    ckpt_weights = load_file(root / "checkpoints" / "step-000006" / "model.safetensors")
    model = BrainBundle(root).load_model()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ckpt_weights[name]), name


def test_training_brings_the_eval_loss_well_below_the_unigram_entropy(make_config, tmp_path):
    """The issue's bar for the demo, at test size: 200 KB of the sample, a 128-wide model, 400 steps."""
    text = tmp_path / "sample-200k.txt"
    text.write_text(SAMPLE.read_text()[:200_000])
    result = launch(make_config(dataset_file=str(text), text_mode="document", max_seq_len=32,
                                dataset_chunk_size=256, hidden_size=128, halt_max_steps=2, batch_size=16,
                                steps=400, lr=5e-3, warmup_steps=10, eval_batches=8, iterate=True))
    start = records(result.bundle / "metrics.jsonl", "start")[0]
    assert 5.0 < start["unigram_entropy"] < math.log(2048)
    assert result.final_eval["loss"] < start["unigram_entropy"] - 0.5  # measured: 5.18 vs 5.93


def test_same_seed_gives_bitwise_identical_weights(make_config):
    a = launch(make_config(brain_name="a"))
    b = launch(make_config(brain_name="b"))
    assert_same_weights(a.bundle, b.bundle)
    c = launch(make_config(brain_name="c", seed=8))
    assert not torch.equal(weights(a.bundle)["inner.lm_head.weight"], weights(c.bundle)["inner.lm_head.weight"])


class EagerHalting(TrainCallbacks):
    """Bias the fresh Q-head towards halting, so that exploration (the RNG) decides when rows halt."""

    def at(self, trainer, point, micro_step):
        if point == "forward" and trainer.step == 0 and micro_step == 0:
            with torch.no_grad():
                trainer.model.inner.q_head.bias.copy_(torch.tensor([5.0, -5.0]))


class StopAtStep(EagerHalting):
    def __init__(self, stop_file: Path, step: int):
        self.stop_file, self.step = stop_file, step

    def after_step(self, trainer, record):
        if record["step"] == self.step:
            self.stop_file.touch()


def test_stop_file_then_resume_ends_bitwise_equal_to_a_straight_run(make_config, tmp_path):
    config = make_config(brain_name="straight", steps=8, checkpoint_every=3, halt_exploration_prob=0.5)
    straight = launch(config, callbacks=EagerHalting())
    straight_steps = records(straight.bundle / "metrics.jsonl", "step")
    assert len({r["segments"] for r in straight_steps if r["halted"]}) > 1  # exploration (the RNG) matters
    # Stop where some rows are mid-sample, so the resumed run must restore their ACT carry.
    at = next(r["step"] for r in straight_steps if 4 <= r["step"] <= 7 and r["halted"] < 4)
    stop_file = tmp_path / "STOP"
    config = config.replace(brain_name="resumed", stop_file=str(stop_file))
    first = launch(config, callbacks=StopAtStep(stop_file, at))
    assert (first.reason, first.step) == ("stop", at)
    assert not stop_file.exists()  # consumed, so the resumed run does not stop at once
    assert [p.name for p in list_checkpoints(first.bundle / "checkpoints")][-1] == f"step-{at:06d}"
    stop = records(first.bundle / "metrics.jsonl", "stop")[0]
    assert stop["step"] == at and "stop file" in stop["reason"]
    assert BrainBundle(first.bundle).metadata()["steps"] == at

    second = launch(config.replace(resume=True))
    assert (second.reason, second.step) == ("steps", 8)
    assert_same_weights(straight.bundle, second.bundle)
    # The resumed steps saw the same losses as the straight run.
    straight_losses = {r["step"]: r["loss"] for r in records(straight.bundle / "metrics.jsonl", "step")}
    resumed = [r for r in records(second.bundle / "metrics.jsonl", "step") if r["step"] > at]
    assert [r["loss"] for r in resumed] == [straight_losses[r["step"]] for r in resumed]
    assert records(second.bundle / "metrics.jsonl", "start")[-1]["resumed_from"].endswith(f"step-{at:06d}")


def test_a_new_run_refuses_a_brain_with_a_trained_model(make_config):
    first = launch(make_config(steps=2))
    before = (first.bundle / "model.safetensors").read_bytes()
    with pytest.raises(AiosError, match="already holds a trained model.*--resume"):
        launch(make_config(steps=2))
    assert (first.bundle / "model.safetensors").read_bytes() == before


def test_resume_refuses_a_different_model(make_config):
    launch(make_config(steps=2))
    with pytest.raises(AiosError, match="different model.*hidden_size"):
        launch(make_config(steps=4, hidden_size=64, resume=True))


def test_a_corrupt_or_partial_checkpoint_is_skipped_and_kept(make_config, caplog):
    config = make_config(steps=4, checkpoint_every=2)
    first = launch(config)
    checkpoints = first.bundle / "checkpoints"
    newest = checkpoints / "step-000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash during a copy
    (checkpoints / "step-000006").mkdir()  # a partial write: no COMPLETE marker
    with caplog.at_level(logging.WARNING):
        second = launch(config.replace(steps=6, resume=True))
    assert "skipping checkpoint" in caplog.text and "does not match its recorded sha256" in caplog.text
    assert records(second.bundle / "metrics.jsonl", "start")[-1]["resumed_from"].endswith("step-000002")
    assert second.step == 6
    kept_aside = sorted(p.name for p in checkpoints.iterdir() if ".invalid-" in p.name)
    assert [name.split(".")[0] for name in kept_aside] == ["step-000004", "step-000006"]  # moved, not deleted
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000002", "step-000004", "step-000006"]
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(checkpoints))


def test_pruning_never_deletes_intact_checkpoints_in_favour_of_corrupt_ones(make_config):
    config = make_config(steps=4, checkpoint_every=1, keep_checkpoints=3)
    first = launch(config)
    checkpoints = first.bundle / "checkpoints"
    corrupt = checkpoints / "step-000004" / "optimizer.pt"
    corrupt.write_bytes(b"garbage")
    second = launch(config.replace(steps=5, keep_checkpoints=1, resume=True))
    assert second.step == 5
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000005"]
    assert verify_checkpoint(checkpoints / "step-000005") is None
    assert any(p.name.startswith("step-000004.invalid-") for p in checkpoints.iterdir())


def test_resume_with_no_intact_checkpoint_refuses_and_keeps_the_bundle(make_config):
    config = make_config(steps=2)
    first = launch(config)
    before = (first.bundle / "model.safetensors").read_bytes()
    (first.bundle / "checkpoints" / "step-000002" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(AiosError, match="--resume: no intact checkpoint"):
        launch(config.replace(steps=4, resume=True))
    assert (first.bundle / "model.safetensors").read_bytes() == before
    assert BrainBundle(first.bundle).metadata()["steps"] == 2


def test_flags_typed_on_resume_take_effect(make_config):
    config = make_config(steps=2, lr=1e-3)
    launch(config)
    resumed = launch(config.replace(steps=4, lr=5e-3, weight_decay=0.0, batch_size=2,
                                    gradient_accumulation_steps=2, resume=True))
    steps = records(resumed.bundle / "metrics.jsonl", "step")
    assert [(r["micro_batch"], r["grad_accum"]) for r in steps] == [(4, 1), (4, 1), (2, 2), (2, 2)]
    # warmup_steps=2 is over: the cosine now runs from the new peak of 5e-3
    assert steps[2]["lr"] == pytest.approx(5e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0 / 2))))
    assert steps[3]["lr"] == pytest.approx(5e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 2))))


def test_resume_refuses_another_optimizer(make_config):
    config = make_config(steps=2, optimizer="adam-atan2")
    launch(config)
    with pytest.raises(AiosError, match="--optimizer adam-atan2"):
        launch(config.replace(steps=4, optimizer="adamw", resume=True))


class InjectOOM(TrainCallbacks):
    """Raise a CUDA out-of-memory error (on CPU) while the micro-batch is above `limit` from step `start`."""

    def __init__(self, limit: int, start: int = 2):
        self.limit, self.start, self.raised = limit, start, 0

    def at(self, trainer, point, micro_step):
        if point == "forward" and trainer.step >= self.start and trainer.micro_batch > self.limit:
            self.raised += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")


def test_oom_halves_the_micro_batch_and_keeps_batch_and_order(make_config):
    clean = launch(make_config(brain_name="clean", halt_exploration_prob=0.0))
    inject = InjectOOM(limit=2)
    backoff = launch(make_config(brain_name="oom", halt_exploration_prob=0.0), callbacks=inject)
    assert inject.raised == 1
    steps = records(backoff.bundle / "metrics.jsonl", "step")
    assert [(r["micro_batch"], r["grad_accum"]) for r in steps] == [(4, 1)] * 2 + [(2, 2)] * 4
    clean_steps = records(clean.bundle / "metrics.jsonl", "step")
    assert [r["samples_drawn"] for r in steps] == [r["samples_drawn"] for r in clean_steps]
    for a, b in zip(steps, clean_steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # the loss is scaled as before
    assert BrainBundle(backoff.bundle).tracker()["state"] == BrainBundle(clean.bundle).tracker()["state"]
    wa, wb = weights(clean.bundle), weights(backoff.bundle)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


def test_oom_at_micro_batch_one_gives_up_with_a_clear_message(make_config):
    with pytest.raises(AiosError, match="out of memory at micro-batch 1"):
        launch(make_config(), callbacks=InjectOOM(limit=0, start=0))


class GradientsBeforeTheUpdate(TrainCallbacks):
    """The gradients the optimizer is handed, step by step (Adam and clipping would hide a wrong scale)."""

    def __init__(self):
        self.grads, self.hooked = [], False

    def at(self, trainer, point, micro_step):
        if not self.hooked:
            self.hooked = True
            trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.grads.append(
                [p.grad.clone() for group in opt.param_groups for p in group["params"]]))


def test_accumulation_1x8_equals_2x4(make_config):
    grads_one, grads_two = GradientsBeforeTheUpdate(), GradientsBeforeTheUpdate()
    one = launch(make_config(brain_name="1x8", batch_size=8, gradient_accumulation_steps=1,
                             halt_exploration_prob=0.0, grad_clip=0.0), callbacks=grads_one)
    two = launch(make_config(brain_name="2x4", batch_size=4, gradient_accumulation_steps=2,
                             halt_exploration_prob=0.0, grad_clip=0.0), callbacks=grads_two)
    la = [r["loss"] for r in records(one.bundle / "metrics.jsonl", "step")]
    lb = [r["loss"] for r in records(two.bundle / "metrics.jsonl", "step")]
    assert la == pytest.approx(lb, rel=1e-4)
    na = [r["grad_norm"] for r in records(one.bundle / "metrics.jsonl", "step")]
    nb = [r["grad_norm"] for r in records(two.bundle / "metrics.jsonl", "step")]
    assert na == pytest.approx(nb, rel=1e-4)  # the same scale, not only the same direction
    for step_a, step_b in zip(grads_one.grads, grads_two.grads, strict=True):
        for ga, gb in zip(step_a, step_b, strict=True):
            # float32 sums in another order: close relative to the tensor's scale (a 2x scale error is far off)
            torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-4 * float(ga.abs().max()))
    wa, wb = weights(one.bundle), weights(two.bundle)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


def test_a_non_finite_step_is_skipped_and_counted(make_config):
    result = launch(make_config(), callbacks=PoisonLogits({3}))
    steps = records(result.bundle / "metrics.jsonl", "step")
    assert [r["skipped"] for r in steps] == [False, False, True, False, False, False]
    assert steps[2]["loss"] is None and steps[-1]["nonfinite_total"] == 1
    assert all(torch.isfinite(t).all() for t in weights(result.bundle).values())


def test_non_finite_steps_in_a_row_stop_the_run(make_config):
    with pytest.raises(AiosError, match="non-finite for 10 steps in a row"):
        launch(make_config(steps=20), callbacks=PoisonLogits(range(1, 21)))


def test_flags_that_cannot_work_together_are_refused_before_training(make_config):
    with pytest.raises(AiosError, match="--zero-stage zero2 runs inside the Ray job's workers"):
        launch(make_config(zero_stage="zero2"))  # make_config: --launcher local


def test_missing_dataset_is_refused(make_config):
    with pytest.raises(AiosError, match="--dataset-file is required"):
        launch(make_config(dataset_file=None))


def test_the_final_eval_after_the_last_checkpoint_reaches_the_bundle_metadata(make_config):
    result = launch(make_config(steps=4, checkpoint_every=2, eval_every=0))  # saved at 4, then evaluated
    last_eval = BrainBundle(result.bundle).metadata()["last_eval"]
    assert last_eval == result.final_eval and last_eval["step"] == 4
