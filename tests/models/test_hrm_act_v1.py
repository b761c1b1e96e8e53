"""HRM ACT v1 against ../shared/docs/HRM_ACTV1.md: shapes, init, one-step gradient, ACT carry, losses."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from aios.models.hrm_act_v1 import (
    IGNORE_LABEL_ID,
    ACTCarry,
    Attention,
    HRMACTv1,
    HRMACTv1Config,
    MixtureOfExperts,
    act_loss,
    shift_labels,
    sliding_window_mask,
    softmax_cross_entropy,
    stablemax_cross_entropy,
    swiglu_intermediate_size,
    trunc_normal_init_,
)


def tiny_config(**overrides) -> HRMACTv1Config:
    base = dict(vocab_size=50, seq_len=12, hidden_size=32, num_heads=4, expansion=2.0, H_layers=1, L_layers=1,
                H_cycles=2, L_cycles=2, halt_max_steps=4)
    base.update(overrides)
    return HRMACTv1Config(**base)


def lm_batch(config: HRMACTv1Config, rows: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return shift_labels(torch.randint(0, config.vocab_size, (rows, config.seq_len + 1), generator=g))


# --- shapes and parameter count ------------------------------------------------------------------


def test_reference_sudoku_shape_has_exactly_27_275_266_parameters():
    config = HRMACTv1Config(vocab_size=11, seq_len=81, hidden_size=512, num_heads=8, expansion=4, H_layers=4,
                            L_layers=4, H_cycles=2, L_cycles=2, pos_encodings="rope", causal=False,
                            puzzle_emb_ndim=512, num_puzzle_identifiers=1000)
    model = HRMACTv1(config)
    assert config.puzzle_emb_len == 1
    assert model.num_parameters() == 27_275_266
    assert model.num_parameters(include_puzzle_embedding=True) == 27_275_266 + 1000 * 512


def test_swiglu_width_rounds_up_to_multiple_of_256():
    assert swiglu_intermediate_size(512, 4) == 1536
    assert swiglu_intermediate_size(128, 2) == 256  # round(170.67) = 171 -> 256
    assert swiglu_intermediate_size(384, 4) == 1024
    model = HRMACTv1(tiny_config())
    block = model.inner.H_level.layers[0]
    assert block.mlp.gate_up_proj.weight.shape == (2 * 256, 32)
    assert block.self_attn.qkv_proj.weight.shape == (3 * 32, 32)
    assert all(m.bias is None for m in (block.mlp.gate_up_proj, block.mlp.down_proj, block.self_attn.qkv_proj))


def test_learned_positions_add_a_table_of_seq_len_rows():
    rope, learned = HRMACTv1(tiny_config()), HRMACTv1(tiny_config(pos_encodings="learned"))
    assert learned.num_parameters() - rope.num_parameters() == 12 * 32


# --- initialisation --------------------------------------------------------------------------------


def test_truncated_normal_has_requested_std_and_is_cut_at_two_sigma():
    torch.manual_seed(0)
    t = trunc_normal_init_(torch.empty(200_000), std=0.05)
    assert t.std().item() == pytest.approx(0.05, rel=0.02)
    assert t.abs().max().item() <= 2 * 0.05 / 0.8796 + 1e-6  # cut at +-2 of the pre-rescale sigma


def test_init_statistics_follow_the_spec():
    torch.manual_seed(0)
    config = HRMACTv1Config(vocab_size=1000, seq_len=16, hidden_size=256, num_heads=4, expansion=4, H_layers=2,
                            L_layers=2)
    inner = HRMACTv1(config).inner
    qkv = inner.H_level.layers[0].self_attn.qkv_proj.weight
    down = inner.H_level.layers[0].mlp.down_proj.weight
    assert qkv.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.03)
    assert down.std().item() == pytest.approx(1 / math.sqrt(config.intermediate_size), rel=0.03)
    assert inner.embed_tokens.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.03)
    assert inner.lm_head.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.03)
    assert torch.all(inner.q_head.weight == 0) and torch.all(inner.q_head.bias == -5)
    # H_init / L_init: fixed buffers with sigma 1, not trained.
    names = {n for n, _ in inner.named_parameters()}
    assert "H_init" not in names and "L_init" not in names
    assert {"H_init", "L_init"} <= set(inner.state_dict())
    both = torch.cat([inner.H_init, inner.L_init])
    assert both.std().item() == pytest.approx(1.0, rel=0.15)
    assert both.abs().max().item() <= 2 / 0.8796 + 1e-6


def test_embedding_is_scaled_by_sqrt_d_and_learned_sum_by_one_over_sqrt2():
    model = HRMACTv1(tiny_config(pos_encodings="learned"))
    inputs = torch.tensor([[1, 2, 3]])
    x = model.inner.embed(inputs, None)
    expected = math.sqrt(32) * 0.707106781 * (model.inner.embed_tokens(inputs) + model.inner.embed_pos.weight[:3])
    torch.testing.assert_close(x, expected)


# --- one segment: the one-step gradient -------------------------------------------------------------


def test_only_the_last_L_and_H_update_are_in_the_graph():
    config = tiny_config(H_cycles=3, L_cycles=2)
    inner = HRMACTv1(config).inner
    calls = {"H": [], "L": []}
    inner.H_level.register_forward_hook(lambda *_: calls["H"].append(torch.is_grad_enabled()))
    inner.L_level.register_forward_hook(lambda *_: calls["L"].append(torch.is_grad_enabled()))
    batch = lm_batch(config)
    z_H = inner.H_init.expand(3, 12, 32).clone().requires_grad_(True)
    z_L = inner.L_init.expand(3, 12, 32).clone().requires_grad_(True)
    new_H, new_L, logits, q, _ = inner(z_H, z_L, batch["inputs"])
    assert calls["L"] == [False] * 5 + [True]  # H_cycles * L_cycles applications, only the last with grad
    assert calls["H"] == [False] * 2 + [True]
    assert not new_H.requires_grad and not new_L.requires_grad  # the new carry is detached
    logits.sum().backward()
    # The incoming carry reaches the graph only through no-grad updates: it receives no gradient.
    assert z_H.grad is None and z_L.grad is None
    assert all(p.grad is not None for n, p in inner.named_parameters() if not n.startswith("q_head"))


def test_gradients_equal_a_hand_written_one_step_gradient():
    torch.manual_seed(0)
    config = tiny_config(H_cycles=2, L_cycles=3)
    model = HRMACTv1(config)
    inner = model.inner
    batch = lm_batch(config)
    z_H0 = inner.H_init.expand(3, 12, 32).clone()
    z_L0 = inner.L_init.expand(3, 12, 32).clone()
    _, _, logits, _, _ = inner(z_H0, z_L0, batch["inputs"])
    logits.square().mean().backward()
    ours = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
    inner.zero_grad()

    x = inner.embed(batch["inputs"], None)
    rot = inner.rotary(12)
    with torch.no_grad():  # 2*3 - 1 = 5 L updates and 1 H update without grad
        z_H, z_L = z_H0, z_L0
        for _ in range(3):
            z_L, _ = inner.L_level(z_L, z_H + x, rot)
        z_H, _ = inner.H_level(z_H, z_L, rot)
        for _ in range(2):
            z_L, _ = inner.L_level(z_L, z_H + x, rot)
    z_L, _ = inner.L_level(z_L, z_H + x, rot)
    z_H, _ = inner.H_level(z_H, z_L, rot)
    inner.lm_head(z_H).square().mean().backward()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, inner.get_parameter(name).grad, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = HRMACTv1(tiny_config())
    ckpt = HRMACTv1(tiny_config(), gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    batch = lm_batch(plain.config)
    for model in (plain, ckpt):
        model.eval()
        carry, out = model(model.initial_carry(batch), batch)
        act_loss(carry, out, model.config)[0].backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


def saved_activation_bytes(model: HRMACTv1, batch: dict[str, torch.Tensor], amp: bool = False) -> int:
    """Bytes the forward pass keeps for backward (what --gradient-checkpointing and --amp are there to cut);
    parameters, which autograd also references, are not counted."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in params:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        carry, out = model(model.initial_carry(batch), batch)
        act_loss(carry, out, model.config)[0].backward()
    return sum(saved)


def test_gradient_checkpointing_and_amp_keep_fewer_activation_bytes_for_backward():
    """The one-step gradient keeps only the last L and H pass in the graph; checkpointing keeps just each
    block's input of it, bf16 autocast keeps the matmul inputs at half width."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, seq_len=32, H_layers=2, L_layers=2)
    plain = HRMACTv1(config)
    ckpt = HRMACTv1(config, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    batch = lm_batch(config, rows=4)
    full = saved_activation_bytes(plain, batch)
    assert saved_activation_bytes(ckpt, batch) < 0.5 * full
    assert saved_activation_bytes(plain, batch, amp=True) < 0.85 * full


# --- causal LM mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_causal_changing_token_t_leaves_earlier_logits_unchanged(pos):
    torch.manual_seed(0)
    config = tiny_config(pos_encodings=pos)
    inner = HRMACTv1(config).inner
    inputs = torch.randint(0, 50, (2, 12))
    changed = inputs.clone()
    t = 7
    changed[:, t] = (changed[:, t] + 1) % 50
    z = inner.H_init.expand(2, 12, 32), inner.L_init.expand(2, 12, 32)
    _, _, a, _, _ = inner(*z, inputs)
    _, _, b, _, _ = inner(*z, changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-4  # every later position does see it


def test_non_causal_reference_mode_sees_the_whole_sequence():
    torch.manual_seed(0)
    inner = HRMACTv1(tiny_config(causal=False)).inner
    inputs = torch.randint(0, 50, (1, 12))
    changed = inputs.clone()
    changed[0, 11] += 1
    z = inner.H_init.expand(1, 12, 32), inner.L_init.expand(1, 12, 32)
    assert (inner(*z, inputs)[2][:, 0] - inner(*z, changed)[2][:, 0]).abs().max() > 1e-4


def test_labels_are_the_inputs_shifted_by_one():
    tokens = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 0]])
    pad = tokens == 0
    batch = shift_labels(tokens, pad_mask=pad)
    assert batch["inputs"].tolist() == [[10, 11, 12], [20, 21, 22]]
    assert batch["labels"].tolist() == [[11, 12, 13], [21, 22, IGNORE_LABEL_ID]]


def test_sliding_window_mask_keeps_the_w_most_recent_keys():
    mask = sliding_window_mask(6, 3, torch.device("cpu"))
    assert mask.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    assert mask[5].tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize("causal, window", [(True, 3), (True, None), (False, None)])
@pytest.mark.parametrize("use_flash", [False, True])  # flash asked for: SDPA serves it on CPU, the same maths
def test_attention_matches_an_explicit_softmax(causal, window, use_flash):
    """The semantics every backend must share (bench/gpu_check.sh holds flash-attn to them on CUDA): causal
    keys j <= i, and with a window w only the w most recent, i - w < j <= i; no mask when not causal."""
    torch.manual_seed(0)
    config = tiny_config(causal=causal, window_size=window)
    attn = Attention(config)
    attn.use_flash = use_flash
    x = torch.randn(2, 8, 32)
    out = attn(x, None)
    q, k, v = attn.qkv_proj(x).view(2, 8, 12, 8).split(4, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8)
    allowed = torch.tensor([[(not causal) or (i - (window or 8) < j <= i) for j in range(8)] for i in range(8)])
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = attn.o_proj(torch.einsum("bhij,bjhd->bihd", probs, v).reshape(2, 8, 32))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_flash_attn_request_falls_back_loudly_on_cpu(caplog):
    with caplog.at_level(logging.WARNING):
        model = HRMACTv1(tiny_config(), use_flash_attn=True)
    assert "falling back to torch scaled_dot_product_attention" in caplog.text
    plain = HRMACTv1(tiny_config())
    plain.load_state_dict(model.state_dict())
    batch = lm_batch(model.config)
    z = torch.zeros(3, 12, 32)
    torch.testing.assert_close(model.inner(z, z, batch["inputs"])[2], plain.inner(z, z, batch["inputs"])[2])


# --- ACT wrapper ---------------------------------------------------------------------------------------


def test_initial_carry_is_all_halted_so_every_row_takes_its_sample():
    model = HRMACTv1(tiny_config())
    batch = lm_batch(model.config)
    carry, _ = model(model.initial_carry(batch), batch)
    assert torch.equal(carry.current_data["inputs"], batch["inputs"])
    assert carry.steps.tolist() == [1, 1, 1]


def test_reset_replaces_only_halted_rows():
    torch.manual_seed(0)
    model = HRMACTv1(tiny_config()).eval()
    first, second = lm_batch(model.config, seed=1), lm_batch(model.config, seed=2)
    carry, _ = model(model.initial_carry(first), first)
    carry.halted = torch.tensor([True, False, False])
    before = carry
    after, _ = model(carry, second)
    assert torch.equal(after.current_data["inputs"][0], second["inputs"][0])  # halted row: new sample
    assert torch.equal(after.current_data["inputs"][1:], first["inputs"][1:])  # others keep theirs
    assert torch.equal(after.current_data["labels"][1:], first["labels"][1:])
    assert after.steps.tolist() == [1, 2, 2]
    # A kept row continues from its state; the reset row starts from H_init/L_init.
    fresh, _ = model(model.initial_carry(second), second)
    torch.testing.assert_close(after.z_H[0], fresh.z_H[0])
    continued = model.inner(before.z_H[1:], before.z_L[1:], first["inputs"][1:])[0]
    torch.testing.assert_close(after.z_H[1:], continued)


def test_eval_runs_exactly_M_segments_even_when_the_q_head_says_halt():
    model = HRMACTv1(tiny_config(halt_max_steps=5))
    with torch.no_grad():
        model.inner.q_head.bias.copy_(torch.tensor([5.0, -5.0]))  # q_halt > q_continue everywhere
    batch = lm_batch(model.config)
    model.eval()
    carry, segments = model.initial_carry(batch), 0
    with torch.no_grad():
        while True:
            carry, _ = model(carry, batch)
            segments += 1
            if carry.halted.all():
                break
    assert segments == 5 and carry.steps.tolist() == [5, 5, 5]
    model.train()
    torch.manual_seed(0)
    model.config.halt_exploration_prob = 0.0
    carry, _ = model(model.initial_carry(batch), batch)
    assert carry.halted.all()  # in training the Q-head halts after one segment


def test_exploration_sets_a_minimum_segment_count_in_2_to_M():
    torch.manual_seed(0)
    model = HRMACTv1(tiny_config(halt_max_steps=6, halt_exploration_prob=1.0)).train()
    with torch.no_grad():
        model.inner.q_head.bias.copy_(torch.tensor([5.0, -5.0]))
    batch = lm_batch(model.config, rows=64)
    carry = model.initial_carry(batch)
    halted_at = torch.zeros(64, dtype=torch.int32)
    with torch.no_grad():
        for _ in range(6):
            carry, _ = model(carry, batch)
            halted_at = torch.where((halted_at == 0) & carry.halted, carry.steps, halted_at)
            carry.halted = carry.halted & False  # keep every row running to observe its halt step
    assert halted_at.min() >= 2 and halted_at.max() <= 6
    assert len(set(halted_at.tolist())) >= 4


def test_q_continue_target_bootstraps_from_the_next_segment():
    torch.manual_seed(0)
    model = HRMACTv1(tiny_config(halt_max_steps=3)).train()
    with torch.no_grad():
        model.inner.q_head.weight.normal_()  # make the q logits differ per row
    batch = lm_batch(model.config)
    carry = model.initial_carry(batch)
    for step in range(1, 4):
        state = torch.random.get_rng_state()
        new, out = model(carry, batch)
        _, _, _, nq, _ = model.inner(new.z_H, new.z_L, new.current_data["inputs"])
        halt, cont = nq.unbind(-1)
        expected = torch.sigmoid(halt) if step == 3 else torch.sigmoid(torch.maximum(halt, cont))
        torch.testing.assert_close(out["target_q_continue"], expected)
        torch.random.set_rng_state(state)
        carry = new
        carry.halted = torch.zeros(3, dtype=torch.bool)  # keep going to reach the last step


def test_lm_q_halt_target_is_token_accuracy_not_exact_match():
    config = tiny_config(vocab_size=5)
    labels = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    logits = F.one_hot(torch.tensor([[0, 1, 4, 4], [0, 1, 2, 3]]), 5).float() * 10  # row 0: 2/4 right
    carry = ACTCarry(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), torch.ones(2, dtype=torch.int32),
                     torch.ones(2, dtype=torch.bool), {"inputs": labels, "labels": labels})
    q_halt = torch.tensor([0.3, -0.2])
    outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": torch.zeros(2),
               "aux_loss": torch.zeros(())}
    _, metrics = act_loss(carry, outputs, config)
    expected = F.binary_cross_entropy_with_logits(q_halt, torch.tensor([0.5, 1.0]), reduction="sum")
    torch.testing.assert_close(metrics["q_halt_loss"], expected)
    assert metrics["accuracy"].item() == pytest.approx(1.5)
    assert metrics["exact_accuracy"].item() == 1
    # The reference puzzle setting uses exact match instead.
    _, puzzle = act_loss(carry, outputs, tiny_config(vocab_size=5, causal=False))
    torch.testing.assert_close(puzzle["q_halt_loss"],
                               F.binary_cross_entropy_with_logits(q_halt, torch.tensor([0.0, 1.0]), reduction="sum"))


def test_total_loss_combines_token_and_q_losses_per_spec():
    torch.manual_seed(0)
    model = HRMACTv1(tiny_config()).train()
    batch = lm_batch(model.config)
    batch["labels"][0, :5] = IGNORE_LABEL_ID
    carry, out = model(model.initial_carry(batch), batch)
    total, m = act_loss(carry, out, model.config)
    per_token = F.cross_entropy(out["logits"].flatten(0, 1), batch["labels"].flatten(), reduction="none",
                                ignore_index=IGNORE_LABEL_ID).view(3, 12)
    lm = (per_token.sum(-1) / (batch["labels"] != IGNORE_LABEL_ID).sum(-1)).sum()
    torch.testing.assert_close(m["lm_loss"], lm)
    torch.testing.assert_close(total, lm + 0.5 * (m["q_halt_loss"] + m["q_continue_loss"]))


def test_stablemax_cross_entropy_matches_its_definition():
    logits = torch.tensor([[[2.0, -1.0, 0.0]]])
    labels = torch.tensor([[0]])
    s = torch.tensor([3.0, 0.5, 1.0], dtype=torch.float64)
    expected = -torch.log(s[0] / s.sum())
    torch.testing.assert_close(stablemax_cross_entropy(logits, labels)[0, 0], expected)
    assert stablemax_cross_entropy(logits, torch.tensor([[IGNORE_LABEL_ID]])).item() == 0
    torch.testing.assert_close(softmax_cross_entropy(logits, labels)[0, 0], -torch.log_softmax(logits[0, 0], -1)[0])


def test_carry_state_dict_round_trips():
    model = HRMACTv1(tiny_config())
    batch = lm_batch(model.config)
    carry, _ = model(model.initial_carry(batch), batch)
    again = ACTCarry.from_state_dict(carry.state_dict())
    for key, value in carry.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])


# --- mixture of experts -------------------------------------------------------------------------------


def test_moe_batched_dispatch_equals_a_per_token_reference():
    torch.manual_seed(0)
    moe = MixtureOfExperts(tiny_config(use_moe=True, num_experts=4, num_experts_per_tok=2,
                                       moe_capacity_factor=100.0))
    x = torch.randn(2, 5, 32)
    out, _ = moe(x)
    tokens = x.reshape(-1, 32)
    probs = moe.router(tokens).softmax(-1)
    top_p, top_e = probs.topk(2, -1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    expected = torch.zeros_like(tokens)
    for n in range(tokens.shape[0]):
        for p, e in zip(top_p[n], top_e[n], strict=True):
            gate, up = (tokens[n] @ moe.gate_up[e]).chunk(2)
            expected[n] += p * ((F.silu(gate) * up) @ moe.down[e])
    torch.testing.assert_close(out.reshape(-1, 32), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_moe_router_learns_from_the_task_loss(k):
    torch.manual_seed(0)
    moe = MixtureOfExperts(tiny_config(use_moe=True, num_experts=4, num_experts_per_tok=k,
                                       moe_capacity_factor=100.0))
    out, _ = moe(torch.randn(2, 5, 32))
    out.square().sum().backward()  # the output alone, no balancing loss
    assert moe.router.weight.grad.abs().sum() > 1e-2


def test_moe_top1_gate_is_the_router_probability():
    torch.manual_seed(0)
    moe = MixtureOfExperts(tiny_config(use_moe=True, num_experts=4, num_experts_per_tok=1,
                                       moe_capacity_factor=100.0))
    x = torch.randn(1, 3, 32)
    out, _ = moe(x)
    tokens = x.reshape(-1, 32)
    probs = moe.router(tokens).softmax(-1)
    p, e = probs.max(-1)
    for n in range(3):
        gate, up = (tokens[n] @ moe.gate_up[e[n]]).chunk(2)
        torch.testing.assert_close(out[0, n], p[n] * ((F.silu(gate) * up) @ moe.down[e[n]]), atol=1e-5, rtol=1e-5)


def test_moe_capacity_drops_overflow_tokens():
    torch.manual_seed(0)
    config = tiny_config(use_moe=True, num_experts=4, num_experts_per_tok=1, moe_capacity_factor=0.25)
    moe = MixtureOfExperts(config)
    out, _ = moe(torch.randn(1, 16, 32))
    # capacity = ceil(0.25 * 16 / 4) = 1 token per expert: at most 4 of 16 tokens get an output
    assert 1 <= int((out.abs().sum(-1) > 0).sum()) <= 4


def test_moe_load_balancing_loss_has_a_gradient_from_the_grad_pass_only():
    torch.manual_seed(0)
    config = tiny_config(use_moe=True, num_experts=4, num_experts_per_tok=2, H_cycles=2, L_cycles=2)
    model = HRMACTv1(config).train()
    batch = lm_batch(config)
    carry, out = model(model.initial_carry(batch), batch)
    aux = out["aux_loss"]
    assert aux.requires_grad and aux.item() >= 2 * 0.99  # >= 1 per MoE layer applied with grad (2 layers)
    aux.backward()
    router = model.inner.H_level.layers[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    # The no-grad cycles do not count: the sum covers exactly one L and one H application.
    model.eval()
    calls = []
    for level in (model.inner.H_level, model.inner.L_level):
        level.layers[0].mlp.register_forward_hook(lambda m, i, o: calls.append((torch.is_grad_enabled(), o[1])))
    _, out = model(model.initial_carry(batch), batch)
    assert [grad for grad, _ in calls] == [False] * 4 + [True] * 2  # 2x2 cycles: 3 L + 1 H without grad
    torch.testing.assert_close(out["aux_loss"], calls[4][1] + calls[5][1])


def test_moe_changes_parameter_count_as_configured():
    dense = HRMACTv1(tiny_config())
    moe = HRMACTv1(tiny_config(use_moe=True, num_experts=3))
    per_layer_dense = 32 * 512 + 256 * 32
    per_layer_moe = 3 * per_layer_dense + 32 * 3
    assert moe.num_parameters() - dense.num_parameters() == 2 * (per_layer_moe - per_layer_dense)


# --- save / load -----------------------------------------------------------------------------------------


def test_save_and_load_a_normal_model_directory(tmp_path):
    torch.manual_seed(0)
    model = HRMACTv1(tiny_config(window_size=4)).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = HRMACTv1.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    batch = lm_batch(model.config)
    with torch.no_grad():
        a = model(model.initial_carry(batch), batch)[1]["logits"]
        b = loaded(loaded.initial_carry(batch), batch)[1]["logits"]
    assert torch.equal(a, b)


def test_config_refuses_bad_shapes():
    with pytest.raises(ValueError, match="not divisible"):
        tiny_config(hidden_size=30)
    with pytest.raises(ValueError, match="must be positive"):
        tiny_config(H_layers=0)
    with pytest.raises(ValueError, match="causal"):
        tiny_config(causal=False, window_size=4)
    with pytest.raises(ValueError, match="unknown"):
        HRMACTv1Config.from_dict({**tiny_config().to_dict(), "bogus": 1})
