"""AdamATan2 against the reference update rule, the warmup + cosine schedule, optimizer selection."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from aios.train.optim import AdamATan2, Schedule, build_optimizer, lr_lambda


def test_adam_atan2_follows_the_reference_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = AdamATan2([p], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    expected = p.detach().clone()
    m, v = torch.zeros(5), torch.zeros(5)
    for t in range(1, 4):
        grad = torch.randn(5)
        p.grad = grad.clone()
        opt.step()
        expected *= 1 - 0.01 * 0.1
        m = 0.9 * m + 0.1 * grad
        v = 0.95 * v + 0.05 * grad * grad
        expected -= 0.01 / (1 - 0.9**t) * torch.atan2(m, v.sqrt() / math.sqrt(1 - 0.95**t))
        torch.testing.assert_close(p.detach(), expected)


def test_adam_atan2_state_round_trips_through_a_state_dict():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamATan2([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    again = AdamATan2([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    again.load_state_dict(opt.state_dict())
    assert again.state_dict()["state"][0]["step"].item() == 1


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    values = [lr_lambda(s, warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(16)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0)
    assert values[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert values[14] == pytest.approx(0.1) and values[15] == pytest.approx(0.1)  # floor, not below
    schedule = Schedule(lr=2.0, warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [schedule(s) for s in (0, 3, 14)] == [0.5, 2.0, 2.0 * values[14]]


def test_optimizer_choice_and_loud_8bit_fallback(caplog):
    model = torch.nn.Linear(4, 4)
    cpu = torch.device("cpu")
    built = build_optimizer(model, name="adam-atan2", lr=1e-3, weight_decay=0.1, use_8bit=False, device=cpu)
    assert isinstance(built.optimizer, AdamATan2) and built.kind == "adam-atan2"
    with caplog.at_level(logging.WARNING):
        built = build_optimizer(model, name="adam-atan2", lr=1e-3, weight_decay=0.1, use_8bit=True, device=cpu)
    assert built.kind == "adam-atan2"  # what the state really is, so a resume can tell 8-bit state from full
    assert "--use-8bit-optimizer applies to --optimizer adamw only" in caplog.text
    bnb = pytest.importorskip("bitsandbytes")
    built = build_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.1, use_8bit=True, device=cpu)
    assert isinstance(built.optimizer, bnb.optim.AdamW8bit) and built.kind == "adamw-8bit"  # on CPU too


def test_a_failed_begin_never_rolls_back_an_older_step(monkeypatch):
    from aios.train.optim import OptimizerTransaction

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    transaction = OptimizerTransaction(opt, [p])
    for _ in range(2):
        transaction.begin()
        p.grad = torch.ones(3)
        opt.step()
        transaction.commit()
    monkeypatch.setattr(torch.Tensor, "clone", lambda self: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError()))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        transaction.begin()
    monkeypatch.undo()
    transaction.roll_back()  # what the loop does after an OOM: must not undo step 2
    assert opt.state[p]["step"].item() == 2


def test_loaded_state_does_not_choose_this_process_s_kernels():
    from aios.train.optim import set_hyperparameters

    p = torch.nn.Parameter(torch.ones(3))
    fused = torch.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = torch.ones(3)
    fused.step()
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)  # a host without fused kernels
    plain.load_state_dict(fused.state_dict())
    assert plain.param_groups[0]["fused"] is True  # what load_state_dict does by itself
    set_hyperparameters(plain, lr=0.1, weight_decay=0.1)
    assert plain.param_groups[0]["fused"] == plain.defaults["fused"]
