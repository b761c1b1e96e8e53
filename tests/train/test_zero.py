"""--zero-stage without a cluster: the shipped DeepSpeed settings, what aios adds to them and refuses in them,
and the checkpoint files a ZeRO run must seal. Training with it: tests/cluster/test_ray_ddp.py (two workers)."""

from __future__ import annotations

import json

import pytest

from aios.errors import AiosError
from aios.train import zero
from aios.train.checkpoint import expected_files, files_written_by
from aios.train.optim import optimizer_kind_hint


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_the_shipped_settings_of_each_stage_get_the_run_s_batch_split_and_clip(stage):
    settings = zero.deepspeed_config(stage, micro_batch=3, grad_accum=2, world_size=4, grad_clip=0.5)
    assert zero.stage_config_path(stage) == zero.CONFIG_DIRS[0] / f"{stage}.json"  # config/deepspeed/
    assert settings["zero_optimization"]["stage"] == zero.STAGES[stage]
    assert (settings["train_micro_batch_size_per_gpu"], settings["gradient_accumulation_steps"],
            settings["train_batch_size"], settings["gradient_clipping"]) == (3, 2, 24, 0.5)
    assert settings["zero_allow_untested_optimizer"] is True  # the run's own optimizer, sharded


@pytest.fixture
def settings_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(zero, "CONFIG_DIRS", (tmp_path,))
    return tmp_path


@pytest.mark.parametrize(("content", "message"), [
    ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4},
     "sets gradient_accumulation_steps, which aios sets from its own flags"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, "sets bf16, which aios sets from its own flags"),
    ({"zero_optimization": {"stage": 3}}, "has zero_optimization.stage 3, not 2: fix the file"),
    ("{not json", "is not valid JSON"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}},
     "sets zero_optimization.offload_optimizer, which aios does not support"),
    ({"zero_optimization": {"stage": 2}, "checkpoint": {"writer": {"type": "fast"}}},
     "sets checkpoint, which aios does not support"),
])
def test_settings_that_fight_aios_s_flags_are_refused_in_one_line(settings_dir, content, message):
    (settings_dir / "zero2.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(AiosError, match=message) as caught:
        zero.deepspeed_config("zero2", micro_batch=1, grad_accum=1, world_size=2, grad_clip=1.0)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("--zero-stage zero2: ")


def test_missing_settings_name_the_file(settings_dir):
    with pytest.raises(AiosError, match=r"--zero-stage zero1: its DeepSpeed settings .*zero1.json are missing"):
        zero.deepspeed_config("zero1", micro_batch=1, grad_accum=1, world_size=2, grad_clip=1.0)


def test_a_zero_checkpoint_holds_every_rank_s_deepspeed_files_instead_of_optimizer_pt():
    plain = expected_files(2)
    assert "optimizer.pt" in plain
    z2 = expected_files(2, "zero2")
    assert set(z2) == (set(plain) - {"optimizer.pt"}) | {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert expected_files(2, "zero1") == z2
    z3 = expected_files(2, "zero3")  # ZeRO-3 partitions the weights too: a model-state file per rank
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= set(z3)
    assert "mp_rank_00_model_states.pt" not in z3
    # what each rank writes (and uploads to remote storage) covers the checkpoint exactly once
    for stage, every in (("zero2", z2), ("zero3", z3), (None, plain)):
        written = [name for rank in range(2) for name in files_written_by(rank, 2, stage)]
        assert sorted(written) == sorted(every), stage


def test_the_optimizer_kind_of_a_zero_checkpoint_names_the_flags_that_resume_it():
    assert optimizer_kind_hint("adamw+zero2") == ("--optimizer adamw without --use-8bit-optimizer, with "
                                                  "--zero-stage zero2 and --launcher ray")
    assert optimizer_kind_hint("adam-atan2+zero1").startswith("--optimizer adam-atan2, with --zero-stage zero1")
