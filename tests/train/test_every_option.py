"""Every TrainingConfig field reaches the code that uses it, checked by its effect, not by its copy in a file.

`CHECKED_BY` names, for every field, the test that shows its effect; a field added without one fails
`test_every_field_has_a_test_of_its_effect`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from aios.config import TrainingConfig
from aios.data import PreparedDataset
from aios.train import launch
from aios.train.loop import TrainCallbacks
from aios.train.optim import lr_lambda
from aios.train.precision import cpu_has_native_bf16

HERE = "tests.train.test_every_option"
CHECKED_BY = {
    "model": f"{HERE}::test_data_flags_reach_the_prepared_data",
    "dataset_file": f"{HERE}::test_data_flags_reach_the_prepared_data",
    "ascii_only": f"{HERE}::test_data_flags_reach_the_prepared_data",
    "text_mode": f"{HERE}::test_data_flags_reach_the_prepared_data",
    "text_field": "tests.train.test_options::test_jsonl_text_field_is_used",
    "eval_file": f"{HERE}::test_eval_flags_reach_the_evaluation",
    "eval_batches": f"{HERE}::test_eval_flags_reach_the_evaluation",
    "eval_every": f"{HERE}::test_eval_flags_reach_the_evaluation",
    "max_seq_len": f"{HERE}::test_data_flags_reach_the_prepared_data",
    "dataset_chunk_size": f"{HERE}::test_data_flags_reach_the_prepared_data",
    "data_cache_dir": f"{HERE}::test_data_flags_reach_the_prepared_data",
    **{name: "tests.train.test_options::test_model_flags_reach_the_saved_model_config" for name in (
        "h_layers", "l_layers", "hidden_size", "expansion", "num_heads", "h_cycles", "l_cycles", "window_size",
        "pos_encodings", "halt_max_steps", "halt_exploration_prob", "loss_type", "use_moe", "num_experts",
        "num_experts_per_tok", "moe_capacity_factor", "moe_aux_loss_coef")},
    "steps": f"{HERE}::test_schedule_flags_reach_the_learning_rate",
    "batch_size": f"{HERE}::test_batch_layout_flags_reach_the_steps",
    "lr": f"{HERE}::test_schedule_flags_reach_the_learning_rate",
    "min_lr_ratio": f"{HERE}::test_schedule_flags_reach_the_learning_rate",
    "warmup_steps": f"{HERE}::test_schedule_flags_reach_the_learning_rate",
    "weight_decay": f"{HERE}::test_weight_decay_reaches_the_update_also_on_resume",
    "grad_clip": f"{HERE}::test_grad_clip_clips_the_gradient_the_optimizer_sees",
    "optimizer": "tests.train.test_options::test_adam_atan2_and_a_custom_log_file",
    "gradient_accumulation_steps": f"{HERE}::test_batch_layout_flags_reach_the_steps",
    "iterate": "tests.train.test_options::test_end_of_data_without_iterate_and_new_epochs_with_it",
    "stop_file": "tests.train.test_loop::test_stop_file_then_resume_ends_bitwise_equal_to_a_straight_run",
    "resume": "tests.train.test_loop::test_stop_file_then_resume_ends_bitwise_equal_to_a_straight_run",
    "seed": "tests.train.test_loop::test_same_seed_gives_bitwise_identical_weights",
    "log_file": "tests.train.test_options::test_adam_atan2_and_a_custom_log_file",
    "checkpoint_every": "tests.train.test_options::test_keep_checkpoints_prunes_the_oldest",
    "keep_checkpoints": "tests.train.test_options::test_keep_checkpoints_prunes_the_oldest",
    "progress": f"{HERE}::test_progress_and_eval_lines_reach_the_console",
    "gradient_checkpointing": f"{HERE}::test_runtime_flags_reach_the_model",
    "use_flash_attn": f"{HERE}::test_runtime_flags_reach_the_model",
    "amp": f"{HERE}::test_amp_sets_the_autocast_dtype_really_used",
    "compile": f"{HERE}::test_compile_compiles_the_trainer_s_segments",
    "amp_dtype": "tests.train.test_options::test_amp_bf16_trains_on_cpu_and_fp16_falls_back_loudly",
    "use_8bit_optimizer": "tests.train.test_memory_options::test_8bit_adamw_keeps_one_byte_moments_and_resumes_bitwise",
    "zero_stage": "tests.cluster.test_ray_ddp::"
                  "test_zero2_on_two_workers_trains_what_ddp_trains_and_a_failed_worker_resumes_every_ranks_shard",
    **{name: "tests.train.test_experts::test_expert_training_leaves_the_base_bit_identical_and_writes_only_the_expert_dir"
       for name in ("expert_id", "base_brain", "experts_dir")},
    "cuda_ids": "tests.train.test_options::test_cuda_ids_choose_the_gpus_and_are_refused_where_there_are_none",
    "parallel_independent":
        "tests.config.test_training_config::test_several_workers_need_the_ray_launcher_and_replace_parallel_independent",
    **{name: "tests.cluster.test_ray_ddp::test_two_workers_train_bit_for_bit_what_one_worker_accumulating_trains"
       for name in ("ddp", "world_size")},
    "device": "tests.train.test_options::test_device_cuda_without_cuda_is_refused",
    "launcher": "tests.cluster.test_ray_job::test_world_size_1_on_ray_trains_what_the_local_launcher_trains",
    "ray_address": "tests.cluster.test_ray_job::test_an_address_where_no_cluster_listens_is_one_line_and_writes_nothing",
    "cpus_per_worker":
        "tests.cluster.test_ray_job::test_the_stop_file_stops_the_worker_and_is_removed",
    "max_failures": "tests.cluster.test_ray_job::test_a_failed_worker_is_restarted_from_the_newest_checkpoint_to_the_same_weights",
    "preemption_check_every":
        "tests.cluster.test_ray_elastic::test_an_elastic_job_grows_and_shrinks_with_the_cluster_to_the_same_weights",
    "run_name": "tests.train.test_resume::test_the_same_run_name_continues_the_run_and_another_is_refused",
    "bundle_dir": "tests.train.test_loop::test_a_run_writes_a_complete_bundle_and_metrics",
    "brain_name": "tests.train.test_loop::test_a_run_writes_a_complete_bundle_and_metrics",
    "storage_path": "tests.train.test_remote_training::"
                    "test_checkpoints_on_s3_an_upload_cut_short_publishes_nothing_and_the_rerun_resumes_bit_for_bit",
    "local_bundle_dir":
        "tests.train.test_remote_training::test_a_run_on_s3_resumes_elsewhere_bit_for_bit_and_pull_brings_the_brain_home",
    "s3_endpoint_url": "tests.train.test_remote_training::"
                       "test_an_endpoint_that_stops_answering_stops_the_run_in_one_line_and_the_remote_keeps_its_version",
}


def test_every_field_has_a_test_of_its_effect():
    assert set(CHECKED_BY) == set(TrainingConfig.model_fields), (
        f"fields without a test of their effect: {sorted(set(TrainingConfig.model_fields) - set(CHECKED_BY))}")
    for target in set(CHECKED_BY.values()):
        module, function = target.split("::")
        assert callable(getattr(importlib.import_module(module), function, None)), target


def records(path: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


class Capture(TrainCallbacks):
    """Keeps the trainer, and the total gradient norm the optimizer is handed at each step."""

    def __init__(self):
        self.trainer, self.norms, self.dtypes = None, [], set()

    def at(self, trainer, point, micro_step):
        if self.trainer is None:
            self.trainer = trainer
            trainer.optimizer.register_step_pre_hook(self._norm)
            trainer.model.inner.lm_head.register_forward_hook(lambda m, a, out: self.dtypes.add(out.dtype))

    def _norm(self, optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_schedule_flags_reach_the_learning_rate(make_config):
    result = launch(make_config(steps=7, lr=2e-3, warmup_steps=3, min_lr_ratio=0.25))
    lrs = [r["lr"] for r in records(result.bundle / "metrics.jsonl", "step")]
    assert lrs == [2e-3 * lr_lambda(s, warmup_steps=3, total_steps=7, min_ratio=0.25) for s in range(7)]
    assert lrs[:3] == pytest.approx([2e-3 / 3, 4e-3 / 3, 2e-3]) and lrs[-1] == pytest.approx(
        2e-3 * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * 3 / 4))))


def test_grad_clip_clips_the_gradient_the_optimizer_sees(make_config):
    clipped, free = Capture(), Capture()
    a = launch(make_config(brain_name="clip", steps=3, grad_clip=0.05), callbacks=clipped)
    b = launch(make_config(brain_name="free", steps=3, grad_clip=0.0), callbacks=free)
    before = [r["grad_norm"] for r in records(a.bundle / "metrics.jsonl", "step")]
    assert all(norm > 0.05 for norm in before)  # grad_norm is the norm before clipping
    assert clipped.norms == pytest.approx([0.05] * 3, rel=1e-4)
    unclipped = [r["grad_norm"] for r in records(b.bundle / "metrics.jsonl", "step")]
    assert free.norms == pytest.approx(unclipped, rel=1e-5) and free.norms[0] == pytest.approx(before[0], rel=1e-5)


def test_weight_decay_reaches_the_update_also_on_resume(make_config):
    config = make_config(steps=2, weight_decay=0.1)
    launch(config.replace(brain_name="a"))
    launch(config.replace(brain_name="b"))
    seen = {}

    class Decay(Capture):
        def at(self, trainer, point, micro_step):
            super().at(trainer, point, micro_step)
            seen[trainer.config.brain_name] = {g["weight_decay"] for g in trainer.optimizer.param_groups}

    a = launch(config.replace(brain_name="a", steps=3, resume=True, weight_decay=0.0), callbacks=Decay())
    b = launch(config.replace(brain_name="b", steps=3, resume=True, weight_decay=5.0), callbacks=Decay())
    assert seen == {"a": {0.0}, "b": {5.0}}
    from safetensors.torch import load_file

    wa, wb = load_file(a.bundle / "model.safetensors"), load_file(b.bundle / "model.safetensors")
    name = "inner.lm_head.weight"
    # decoupled decay: the extra shrink of the b run is lr * wd * w per parameter
    assert wb[name].norm() < wa[name].norm() * (1 - 0.5 * 5.0 * records(b.bundle / "metrics.jsonl", "step")[-1]["lr"])


def test_batch_layout_flags_reach_the_steps(make_config):
    capture = Capture()
    result = launch(make_config(steps=2, batch_size=2, gradient_accumulation_steps=3), callbacks=capture)
    steps = records(result.bundle / "metrics.jsonl", "step")
    assert [(r["micro_batch"], r["grad_accum"], r["segment_tokens"]) for r in steps] == [(2, 3, 6 * 16)] * 2
    assert steps[0]["samples_drawn"] == 6 and len(capture.trainer.carries) == 3


def test_amp_sets_the_autocast_dtype_really_used(make_config):
    seen = {}
    for amp in (False, True, None):
        capture = Capture()
        result = launch(make_config(brain_name=f"amp-{amp}", steps=1, amp=amp), callbacks=capture)
        start = records(result.bundle / "metrics.jsonl", "start")[0]
        seen[amp] = (capture.dtypes, start["autocast"])
    auto = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert seen == {False: ({torch.float32}, "float32"), True: ({torch.bfloat16}, "bf16"),
                    None: ({auto}, "bf16" if auto == torch.bfloat16 else "float32")}


def test_runtime_flags_reach_the_model(make_config, monkeypatch, caplog):
    import aios.models.hrm_act_v1 as model_module

    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    capture = Capture()
    with caplog.at_level(logging.WARNING):
        launch(make_config(brain_name="gc", steps=1, gradient_checkpointing=True, use_flash_attn=True),
               callbacks=capture)
    assert calls and "falling back to torch scaled_dot_product_attention" in caplog.text
    attention = capture.trainer.model.inner.H_level.layers[0].self_attn
    assert attention.use_flash  # asked for; SDPA serves it on CPU
    calls.clear()
    launch(make_config(brain_name="plain", steps=1, gradient_checkpointing=False))
    assert not calls


def test_progress_and_eval_lines_reach_the_console(make_config, capsys, caplog):
    with caplog.at_level(logging.INFO):
        launch(make_config(brain_name="quiet", steps=4, eval_every=2, progress=False))
    lines = [r.getMessage() for r in caplog.records if "eval loss" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4"]  # every periodic eval, one line each
    assert "perplexity" in lines[0]
    capture = Capture()
    launch(make_config(brain_name="bar", steps=4, eval_every=2, progress=True), callbacks=capture)
    out = capsys.readouterr().out
    assert capture.trainer.console.enabled and "tok/s avg" in out
    assert "step 2: eval loss" in out and "step 4: eval loss" in out


def test_eval_flags_reach_the_evaluation(make_config, tmp_path):
    eval_text = tmp_path / "eval.txt"
    eval_text.write_text(Path(make_config().dataset_file).read_text()[-8000:])
    result = launch(make_config(steps=4, eval_every=3, eval_batches=3, eval_file=str(eval_text)))
    evals = records(result.bundle / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [3, 4]
    assert all(r["sequences"] == 3 * 4 for r in evals)  # --eval-batches x --batch-size
    start = records(result.bundle / "metrics.jsonl", "start")[0]
    cache = Path(make_config().data_cache_dir)
    eval_sets = [PreparedDataset(p) for p in cache.iterdir() if (p / "manifest.json").is_file()]
    assert start["eval_sequences"] in {d.num_sequences for d in eval_sets if d.manifest["source"] == str(eval_text)}


def test_data_flags_reach_the_prepared_data(make_config, tmp_path):
    text = tmp_path / "mixed.txt"
    lines = Path(make_config().dataset_file).read_text().splitlines()[:800]
    text.write_text("\n".join(lines + ["Caf\u00e9 cr\u00e8me, s'il vous pla\u00eet."] * 40) + "\n")
    cache = tmp_path / "cache"
    result = launch(make_config(dataset_file=str(text), data_cache_dir=str(cache), max_seq_len=24,
                                dataset_chunk_size=32, ascii_only=True, text_mode="lines", steps=1))
    (prepared,) = [PreparedDataset(p) for p in cache.iterdir()]
    assert prepared.window == 25 and prepared.manifest["chunk_size"] == 32
    assert prepared.manifest["counts"]["samples_dropped_non_ascii"] == 40
    assert prepared.manifest["tokenizer"]["name"] == make_config().model
    assert json.loads((result.bundle / "tokenizer.json").read_text())["model"]["vocab"] == json.loads(
        (Path(make_config().model) / "tokenizer.json").read_text())["model"]["vocab"]
    document = launch(make_config(brain_name="doc", dataset_file=str(text), data_cache_dir=str(cache),
                                  max_seq_len=24, dataset_chunk_size=32, text_mode="document", steps=1))
    lines_start = records(result.bundle / "metrics.jsonl", "start")[0]
    doc_start = records(document.bundle / "metrics.jsonl", "start")[0]
    assert doc_start["train_sequences"] != lines_start["train_sequences"]  # one EOS per file, not per line


def test_compile_compiles_the_trainer_s_segments(make_config, tmp_path):
    """The wiring; that compiled segments train like eager ones is tests/models (compiling costs seconds)."""
    from aios.models.hrm_act_v1 import CompiledOrEager
    from aios.train.loop import Trainer
    from aios.train.session import LocalSession

    def trainer(compile: bool) -> Trainer:
        config = make_config(compile=compile, brain_name=f"compile-{compile}")
        session = LocalSession(tmp_path / str(compile), device=torch.device("cpu"), keep_checkpoints=1,
                               resume=False)
        return Trainer(config, session)

    compiled, eager = trainer(True), trainer(False)
    assert isinstance(compiled.model.inner.forward, CompiledOrEager)
    assert isinstance(compiled.model.inner.q_logits, CompiledOrEager)
    assert not isinstance(eager.model.inner.forward, CompiledOrEager)
