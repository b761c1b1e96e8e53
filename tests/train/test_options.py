"""Every training option reaches what it controls: none is silently ignored."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from aios.errors import AiosError
from aios.train import launch
from aios.train.checkpoint import list_checkpoints


def test_model_flags_reach_the_saved_model_config(make_config):
    result = launch(make_config(steps=2, h_layers=2, l_layers=1, h_cycles=2, l_cycles=1, expansion=3.0,
                                window_size=5, pos_encodings="learned", halt_max_steps=2,
                                halt_exploration_prob=0.3, loss_type="stablemax", use_moe=True, num_experts=3,
                                num_experts_per_tok=1, moe_capacity_factor=2.0, moe_aux_loss_coef=0.05,
                                gradient_checkpointing=True))
    saved = json.loads((result.bundle / "config.json").read_text())
    assert {k: saved[k] for k in ("H_layers", "L_layers", "H_cycles", "L_cycles", "expansion", "window_size",
                                  "pos_encodings", "halt_max_steps", "halt_exploration_prob", "loss_type",
                                  "use_moe", "num_experts", "num_experts_per_tok", "moe_capacity_factor",
                                  "moe_aux_loss_coef", "seq_len", "hidden_size",
                                  "num_heads", "causal")} == {
        "H_layers": 2, "L_layers": 1, "H_cycles": 2, "L_cycles": 1, "expansion": 3.0, "window_size": 5,
        "pos_encodings": "learned", "halt_max_steps": 2, "halt_exploration_prob": 0.3, "loss_type": "stablemax",
        "use_moe": True, "num_experts": 3, "num_experts_per_tok": 1, "moe_capacity_factor": 2.0,
        "moe_aux_loss_coef": 0.05, "seq_len": 16, "hidden_size": 32,
        "num_heads": 2, "causal": True}
    assert not {"gradient_checkpointing", "use_flash_attn"} & set(saved)  # how it ran, not what it is
    steps = [json.loads(line) for line in (result.bundle / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in steps if r["event"] == "step")  # the MoE balance loss is live


def test_amp_bf16_trains_on_cpu_and_fp16_falls_back_loudly(make_config, caplog):
    with caplog.at_level(logging.WARNING):
        result = launch(make_config(steps=2, amp=True, amp_dtype="fp16"))
    assert "--amp-dtype fp16 needs CUDA" in caplog.text
    steps = [json.loads(line) for line in (result.bundle / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line and '"event": "step"' in line]
    assert all(r["loss"] is not None and not r["skipped"] for r in steps)


def test_adam_atan2_and_a_custom_log_file(make_config, tmp_path):
    log_file = tmp_path / "logs" / "run.jsonl"
    result = launch(make_config(steps=2, optimizer="adam-atan2", log_file=str(log_file)))
    assert not (result.bundle / "metrics.jsonl").exists()
    assert [json.loads(line)["event"] for line in log_file.read_text().splitlines()][:2] == ["start", "step"]


def test_keep_checkpoints_prunes_the_oldest(make_config):
    result = launch(make_config(steps=5, checkpoint_every=1, keep_checkpoints=2))
    assert [p.name for p in list_checkpoints(result.bundle / "checkpoints")] == ["step-000004", "step-000005"]


def test_end_of_data_without_iterate_and_new_epochs_with_it(make_config, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text(Path(make_config().dataset_file).read_text()[:3000])  # a few dozen 17-token windows
    ended = launch(make_config(brain_name="once", dataset_file=str(tiny), steps=500, halt_max_steps=1))
    assert ended.reason == "end_of_data" and 1 < ended.step < 500
    looped = launch(make_config(brain_name="loop", dataset_file=str(tiny), steps=ended.step + 20,
                                halt_max_steps=1, iterate=True))
    assert looped.reason == "steps"
    tracker = json.loads((looped.bundle / "chunk_tracker_state.json").read_text())
    assert tracker["epoch"] >= 1


def test_jsonl_text_field_is_used(make_config, tmp_path):
    data = tmp_path / "d.jsonl"
    lines = Path(make_config().dataset_file).read_text().splitlines()
    data.write_text("\n".join(json.dumps({"body": line, "text": "x"}) for line in lines if line.strip()) + "\n")
    result = launch(make_config(dataset_file=str(data), text_field="body", steps=2))
    start = json.loads((result.bundle / "metrics.jsonl").read_text().splitlines()[0])
    assert start["train_sequences"] > 500  # the Shakespeare lines, not the one-letter "text" field
    with pytest.raises(AiosError, match="has no field 'nope'"):
        launch(make_config(brain_name="other", dataset_file=str(data), text_field="nope", steps=2))


def test_device_cuda_without_cuda_is_refused(make_config):
    with pytest.raises(AiosError, match="no CUDA device"):
        launch(make_config(device="cuda"))


def test_cuda_ids_choose_the_gpus_and_are_refused_where_there_are_none(make_config, monkeypatch):
    from aios.cluster.job import _visible_devices

    if not torch.cuda.is_available():  # this machine: one line, before anything is written
        config = make_config(cuda_ids="0")
        with pytest.raises(AiosError, match=r"^--cuda-ids 0: no CUDA device is visible on this machine; drop "):
            launch(config)
        assert not (Path(config.bundle_dir) / config.brain_name).exists()
    # the embedded cluster starts with exactly these GPUs visible; ids count within an existing restriction
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with _visible_devices("1,0"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,0"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    with _visible_devices("2,0"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,4"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6"


def test_an_eval_file_without_usable_text_is_refused(make_config, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(AiosError, match="^--eval-file: "):
        launch(make_config(eval_file=str(empty)))
