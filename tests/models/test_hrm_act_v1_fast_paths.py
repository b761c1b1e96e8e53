"""The model's fast paths compute what the plain formulas of ../shared/docs/HRM_ACTV1.md compute.

Each fused or re-routed computation is checked, forward and backward, against the straightforward torch
expression it replaces, in float32 and (where it runs under autocast) bf16.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import aios.models.hrm_act_v1 as hrm
from aios.models.hrm_act_v1 import linear


def grads(fn, *tensors, weights_dtype=None):
    """(fn(*tensors), gradients of a fixed random projection of it), so every output element matters.

    The projection weights are rounded to `weights_dtype` (default: the output's), so a float64 run can
    use exactly the weights of a bf16 one."""
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(weights_dtype or out.dtype)
    weights = weights.to(out.dtype)
    (out * weights).float().sum().backward()
    return out.detach(), [t.grad for t in tensors]


# --- linear: float32 products through oneDNN ------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["3d", "strided"])
@pytest.mark.parametrize("out_features", [16, 40])  # narrower and wider than the input: both weight-grad forms
def test_linear_equals_f_linear_forward_and_backward(bias, layout, out_features):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 40, generator=g)
    x = x[..., :24] if layout == "strided" else x[..., :24].contiguous()  # (3, 7, 24)
    w, b = torch.randn(out_features, 24, generator=g), torch.randn(out_features, generator=g)
    args = (x, w, b) if bias else (x, w)
    ours, our_grads = grads(lambda *t: linear(*t), *args)
    ref, ref_grads = grads(lambda *t: F.linear(*t), *args)
    torch.testing.assert_close(ours, ref)
    for a, e in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, e)


def test_float32_cpu_linear_runs_onednn(monkeypatch):
    if not hrm.onednn_linear_works():
        pytest.skip("this torch has no working oneDNN linear")
    calls = []
    real = hrm._onednn_gemm
    monkeypatch.setattr(hrm, "_onednn_gemm", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 8, requires_grad=True)
    linear(x, torch.randn(5, 8, requires_grad=True)).sum().backward()
    assert len(calls) == 3  # the forward product and both backward products


def test_linear_under_autocast_is_f_linear_in_bf16():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = linear(x, w), F.linear(x, w)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, ref)


def test_linear_falls_back_to_f_linear_loudly_when_onednn_fails(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(hrm, "_onednn_gemm", broken)
    monkeypatch.setattr(hrm, "_onednn_linear_ok", None)  # checked again, and restored afterwards
    with caplog.at_level(logging.WARNING):
        x, w = torch.randn(4, 8), torch.randn(5, 8)
        assert torch.equal(linear(x, w), F.linear(x, w))
    assert "oneDNN float32 linear unavailable (RuntimeError: no oneDNN here); using F.linear" in caplog.text


# --- rms_norm and RoPE ---------------------------------------------------------------------------------------


def plain_rms_norm(x, eps):
    return (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_plain_expression_forward_and_backward(dtype):
    x = (3 * torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(0))).to(dtype)
    ours, (our_grad,) = grads(lambda t: hrm.rms_norm(t, 1e-5), x)
    ref, (ref_grad,) = grads(lambda t: plain_rms_norm(t, 1e-5), x)
    assert ours.dtype == dtype and our_grad.dtype == dtype
    torch.testing.assert_close(ours, ref)
    if dtype == torch.float32:
        torch.testing.assert_close(our_grad, ref_grad)
    else:  # both round to bf16, differently: ours must be at least as close to the float64 truth
        _, (truth,) = grads(lambda t: plain_rms_norm(t, 1e-5), x.double(), weights_dtype=dtype)
        ours_error, plain_error = ((g.double() - truth).abs().max() for g in (our_grad, ref_grad))
        assert ours_error <= plain_error


def plain_rotary(x, cos, sin):
    """The spec's rotate-half form, in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_the_rotate_half_form_forward_and_backward(dtype):
    cos, sin = hrm.RotaryEmbedding(8, 10, 10000.0)(10)  # (10, 8) each
    qkv = torch.randn(2, 10, 3 * 4, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    qk = qkv[:, :, : 2 * 4]  # the q and k heads of a fused projection: a strided view, as in Attention
    ours, (our_grad,) = grads(lambda t: hrm.apply_rotary(t, cos, sin), qk)
    ref, (ref_grad,) = grads(lambda t: plain_rotary(t, cos, sin), qk)
    assert ours.dtype == dtype and our_grad.dtype == dtype
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(our_grad, ref_grad)


# --- attention: an explicit score matrix for bf16 on CPU, torch's kernel elsewhere --------------------------


def plain_attention(q, k, v, window, rows=None):
    """softmax(q k^T / sqrt(hd) + mask) v by the textbook formula, in q's dtype."""
    S = k.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if window is not None:
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        allowed = (j <= i) & (j > i - window)
        scores = scores.masked_fill(~(allowed if rows is None else allowed[rows]), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("window, rows", [
    (None, None),  # non-causal (the reference)
    (10, None),  # causal
    (4, None),  # causal sliding window
    (10, slice(-1, None)),  # the Q-head's position alone, causal
    (4, slice(-1, None)),
    (None, slice(0, 1)),  # the reference's Q-head position, non-causal
])
def test_bf16_cpu_attention_is_the_formula_as_close_as_torchs_kernel(window, rows):
    g = torch.Generator().manual_seed(0)
    q, k, v = (2 * torch.randn(2, 3, 10, 16, generator=g) for _ in range(3))
    q = q if rows is None else q[:, :, rows]
    low = [t.bfloat16() for t in (q, k, v)]
    ours, our_grads = grads(lambda *t: hrm.attention(*t, window, rows), *low)
    kernel, kernel_grads = grads(lambda *t: plain_kernel(*t, window, rows), *low)
    truth, true_grads = grads(lambda *t: plain_attention(*t, window, rows), *(t.double() for t in low),
                              weights_dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and all(grad.dtype == torch.bfloat16 for grad in our_grads)
    # the formula to bf16 accuracy, and within a small factor of torch's own kernel's error
    torch.testing.assert_close(ours.double(), truth, rtol=0.02, atol=0.02)
    assert (ours.double() - truth).abs().max() <= 2 * (kernel.double() - truth).abs().max() + 1e-2
    for mine, theirs, true in zip(our_grads, kernel_grads, true_grads, strict=True):
        torch.testing.assert_close(mine.double(), true, rtol=0.03, atol=0.03)
        assert (mine.double() - true).abs().max() <= 2 * (theirs.double() - true).abs().max() + 1e-2


def plain_kernel(q, k, v, window, rows):
    """torch's scaled_dot_product_attention with the same mask."""
    S = k.shape[-2]
    if window is None:
        return F.scaled_dot_product_attention(q, k, v)
    mask = hrm.sliding_window_mask(S, window, "cpu")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if rows is None else mask[rows])


@pytest.mark.parametrize("dtype, length, scores", [
    (torch.bfloat16, hrm.SCORES_ATTENTION_MAX_LEN, True),
    (torch.bfloat16, hrm.SCORES_ATTENTION_MAX_LEN + 1, False),  # longer: torch's flash kernel tiles better
    (torch.float32, 16, False),  # float32: torch's kernel is as fast
])
def test_attention_takes_the_score_matrix_only_for_short_bf16_cpu_sequences(dtype, length, scores, monkeypatch):
    calls = []
    original = hrm._ScoresAttention.apply
    monkeypatch.setattr(hrm._ScoresAttention, "apply", lambda *a: calls.append(1) or original(*a))
    q = k = v = torch.randn(1, 1, length, 8, dtype=dtype)
    out = hrm.attention(q, k, v, length)
    torch.testing.assert_close(out, plain_attention(q, k, v, length), rtol=0.02, atol=0.02)
    assert bool(calls) == scores


def test_bf16_model_matches_its_float64_self_through_score_attention(monkeypatch):
    """A whole segment under bf16 autocast stays as close to float64 as with torch's attention kernel."""
    torch.manual_seed(0)
    config = hrm.HRMACTv1Config(vocab_size=50, seq_len=12, hidden_size=32, num_heads=4, expansion=2.0,
                                H_layers=1, L_layers=1, halt_max_steps=2, window_size=6)
    inner = hrm.HRMACTv1(config).inner
    inputs = torch.randint(0, 50, (3, 12))
    z = torch.randn(3, 12, 32)

    def logits(max_len):
        monkeypatch.setattr(hrm, "SCORES_ATTENTION_MAX_LEN", max_len)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return inner(z, z, inputs)[2].double()

    ours, kernel = logits(hrm.SCORES_ATTENTION_MAX_LEN), logits(0)
    with torch.no_grad():
        truth = inner.double()(z.double(), z.double(), inputs)[2]
    assert (ours - truth).abs().max() <= 2 * (kernel - truth).abs().max() + 1e-2
    assert not torch.equal(ours, kernel)  # the two paths really differ


# --- the softmax loss: chunked, with its argmax -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 20, 7])  # one chunk, or rows in chunks of 7 // vocab = 1
def test_softmax_loss_and_gradient_equal_f_cross_entropy(dtype, chunk, monkeypatch):
    monkeypatch.setattr(hrm, "_LOSS_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 5, 11, generator=g)).to(dtype)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, 2] = labels[2, 4] = hrm.IGNORE_LABEL_ID

    def reference(x):
        return F.cross_entropy(x.float().flatten(0, 1), labels.flatten(), reduction="none",
                               ignore_index=hrm.IGNORE_LABEL_ID).view(3, 5)

    ours, (our_grad,) = grads(lambda x: hrm.softmax_cross_entropy(x, labels), logits)
    ref, (ref_grad,) = grads(reference, logits)
    assert ours.dtype == torch.float32 and our_grad.dtype == dtype
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(our_grad, ref_grad)
    assert ours[0, 2] == 0 and torch.all(our_grad[0, 2] == 0)  # ignored: no loss, no gradient
    _, predictions = hrm.token_loss_and_predictions(logits, labels, "softmax")
    assert torch.equal(predictions, logits.argmax(-1))


# --- the q_continue target's segment: z_H at the Q-head's position only ----------------------------------


@pytest.mark.parametrize("overrides", [
    {},  # causal LM: the Q-head reads the last position
    {"window_size": 5, "pos_encodings": "learned"},  # causal sliding window
    {"causal": False, "puzzle_emb_ndim": 40, "num_puzzle_identifiers": 3},  # reference: position 0, a prefix
    {"use_moe": True, "num_experts": 3},  # MoE runs the whole last block (capacity depends on the tokens)
])
def test_q_logits_equal_the_full_segments_q_logits(overrides):
    torch.manual_seed(0)
    config = hrm.HRMACTv1Config(**{**dict(vocab_size=50, seq_len=12, hidden_size=32, num_heads=4, expansion=2.0,
                                          H_layers=2, L_layers=1, halt_max_steps=4), **overrides})
    inner = hrm.HRMACTv1(config).inner
    with torch.no_grad():
        inner.q_head.weight.normal_()  # q logits that depend on z_H
    inputs = torch.randint(0, 50, (3, 12))
    puzzle = torch.tensor([0, 2, 1]) if config.puzzle_emb_ndim else None
    S = 12 + inner.prefix_len
    z_H, z_L = torch.randn(3, S, 32), torch.randn(3, S, 32)
    rows = []
    inner.H_level.layers[-1].mlp.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    with torch.no_grad():
        full = inner(z_H, z_L, inputs, puzzle)[3]
        fast = inner.q_logits(z_H, z_L, inputs, puzzle)
    torch.testing.assert_close(fast, full)
    assert rows == [S, S, S, S if config.use_moe else 1]  # H_cycles 2: the final H update saw one position


# --- compile_segments: torch.compile each ACT segment, eager where it cannot ------------------------------


def two_training_steps(model):
    """Loss, q_continue target and gradients after two ACT training steps on a fixed batch."""
    batch = hrm.shift_labels(torch.randint(0, 50, (3, 13), generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(1)  # the same exploration draws
    carry = model.initial_carry(batch)
    for _ in range(2):
        carry, outputs = model(carry, batch)
        loss, _ = hrm.act_loss(carry, outputs, model.config)
        loss.backward()
    return loss.detach(), outputs["target_q_continue"], {n: p.grad for n, p in model.named_parameters()}


def compile_pair():
    torch.manual_seed(0)
    config = hrm.HRMACTv1Config(vocab_size=50, seq_len=12, hidden_size=32, num_heads=4, expansion=2.0, H_layers=1,
                                L_layers=1, H_cycles=2, L_cycles=1, halt_max_steps=4)
    eager = hrm.HRMACTv1(config).train()
    compiled = hrm.HRMACTv1(config).train()
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def assert_same_training(eager, compiled):
    for ours, ref in zip(two_training_steps(compiled)[:2], two_training_steps(eager)[:2], strict=True):
        torch.testing.assert_close(ours, ref)
    for name, param in compiled.named_parameters():
        torch.testing.assert_close(param.grad, eager.get_parameter(name).grad, msg=name)


def test_compiled_segments_train_like_eager():
    eager, compiled = compile_pair()
    compiled.compile_segments()
    assert_same_training(eager, compiled)
    assert compiled.inner.forward.failure is None and compiled.inner.q_logits.failure is None  # really compiled


def test_compile_falls_back_to_eager_loudly_without_a_cxx_compiler(monkeypatch, caplog):
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # compile now, not from the cache
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    eager, compiled = compile_pair()
    compiled.compile_segments()
    with caplog.at_level(logging.WARNING):
        assert_same_training(eager, compiled)
    expected = "torch.compile of the ACT segment (HRMInner.forward) failed (InductorError: InvalidCxxCompiler"
    assert expected in caplog.text
    assert "running it eager" in caplog.text
    assert "No working C++ compiler" in compiled.inner.forward.failure
    torch._dynamo.reset()  # nothing compiled under the broken compiler setting outlives the test
