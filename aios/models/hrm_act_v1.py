"""HRM ACT v1: the Hierarchical Reasoning Model with adaptive computation time.

Written to read like ../shared/docs/HRM_ACTV1.md, in the same order: config, init, block (attention,
SwiGLU or mixture of experts), embedding and heads, one segment (the inner model), the ACT wrapper,
the loss, save/load.

Shapes: B batch rows, T tokens, P puzzle-prefix positions (0 in LM mode), S = P + T, D hidden size,
H heads, hd = D / H head dim, V vocab, E experts.

Language-model mode (`causal=True`) differs from the reference puzzle model in exactly the ways the spec
lists: labels are the inputs shifted by one (`shift_labels`), attention is causal (optionally a sliding
window of w keys), and the q_halt target is the sequence's token accuracy instead of exact match.
One consequence of causal attention is spelled out here: the Q-head reads z_H at the LAST position,
the only one that has seen the whole sequence (the reference reads position 0, which under a causal
mask would see only the first token and could not judge the sequence).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from aios.atomic import atomic_write, atomic_write_json
from aios.hashing import tensors_digest
from aios.paths import CONFIG_NAME, WEIGHTS_NAME  # the bundle's file names (defined with its paths)

log = logging.getLogger(__name__)

IGNORE_LABEL_ID = -100
MODEL_TYPE = "hrm_act_v1"
# How the model runs, not what it is: set per run (`HRMACTv1(config, gradient_checkpointing=...)`), never
# saved in config.json, so toggling them keeps the model's identity (and a resume) intact.
RUNTIME_KEYS = ("gradient_checkpointing", "use_flash_attn")
DIGEST_KEY = "aios_tensors_sha256"  # in the safetensors header: `tensors_digest` of the weights
ADDED_EXPERT_PARAMS = ("added_gate_up", "added_down", "added_router")  # MixtureOfExperts.add_experts


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class HRMACTv1Config:
    vocab_size: int
    seq_len: int  # T: the longest token sequence the model sees (RoPE / learned position tables)
    hidden_size: int = 512
    num_heads: int = 8
    expansion: float = 4.0
    H_layers: int = 4
    L_layers: int = 4
    H_cycles: int = 2
    L_cycles: int = 2
    pos_encodings: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1
    causal: bool = True  # LM mode; False is the reference (bidirectional) puzzle setting
    window_size: int | None = None  # causal sliding window: each query sees its w most recent keys
    puzzle_emb_ndim: int = 0  # > 0 prepends ceil(ndim / D) learned per-puzzle positions
    num_puzzle_identifiers: int = 0
    loss_type: Literal["softmax", "stablemax"] = "softmax"
    use_moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_capacity_factor: float = 1.25
    moe_aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "hidden_size", "num_heads", "H_layers", "L_layers",
                     "H_cycles", "L_cycles", "halt_max_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.pos_encodings == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
        if self.pos_encodings not in ("rope", "learned"):
            raise ValueError(f"pos_encodings must be 'rope' or 'learned', got {self.pos_encodings!r}")
        if self.loss_type not in ("softmax", "stablemax"):
            raise ValueError(f"loss_type must be 'softmax' or 'stablemax', got {self.loss_type!r}")
        if self.window_size is not None and self.window_size <= 0:
            self.window_size = None  # 0 means full attention
        if self.window_size is not None and not self.causal:
            raise ValueError("window_size is a causal sliding window; it needs causal=True")
        if self.puzzle_emb_ndim > 0 and self.num_puzzle_identifiers <= 0:
            raise ValueError("puzzle_emb_ndim > 0 needs num_puzzle_identifiers > 0")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError("num_experts_per_tok must be between 1 and num_experts")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def puzzle_emb_len(self) -> int:
        return -(-self.puzzle_emb_ndim // self.hidden_size)  # ceil

    @property
    def intermediate_size(self) -> int:
        return swiglu_intermediate_size(self.hidden_size, self.expansion)

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> HRMACTv1Config:
        data = dict(data)
        for key in RUNTIME_KEYS:  # written by aios 0.1, which kept runtime choices in the model config
            data.pop(key, None)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"config.json describes a {model_type!r} model, not {MODEL_TYPE!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown HRM ACT v1 config keys: {', '.join(unknown)}")
        return cls(**data)


def swiglu_intermediate_size(hidden_size: int, expansion: float) -> int:
    """round(expansion * D * 2/3), rounded up to a multiple of 256 (D 512, expansion 4 -> 1536)."""
    inner = round(expansion * hidden_size * 2 / 3)
    return -(-inner // 256) * 256


# ----------------------------------------------------------------------------------------------------
# Initialisation


def trunc_normal_init_(tensor: torch.Tensor, std: float = 1.0, lower: float = -2.0, upper: float = 2.0):
    """Truncated normal at [lower, upper] sigma, rescaled so the realised std equals `std` (JAX style)."""
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        sqrt2 = math.sqrt(2)
        a, b = math.erf(lower / sqrt2), math.erf(upper / sqrt2)
        z = (b - a) / 2
        c = (2 * math.pi) ** -0.5
        pdf_u, pdf_l = c * math.exp(-0.5 * lower**2), c * math.exp(-0.5 * upper**2)
        comp_std = std / math.sqrt(1 - (upper * pdf_u - lower * pdf_l) / z - ((pdf_u - pdf_l) / z) ** 2)
        tensor.uniform_(a, b).erfinv_().mul_(sqrt2 * comp_std).clip_(lower * comp_std, upper * comp_std)
    return tensor


class Linear(nn.Linear):
    """Linear layer with LeCun truncated-normal init (sigma = 1/sqrt(fan_in)), no bias by default."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        trunc_normal_init_(self.weight, std=1.0 / math.sqrt(self.in_features))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# float32 matrix products on CPU go to oneDNN's GEMM rather than torch's default (MKL): the same float32
# arithmetic (no reduced precision; results differ from MKL's by summation order only), but MKL does not use
# AVX-512 on AMD CPUs, where oneDNN's GEMM runs about 2.2x faster (measured on this project's EPYC: 225 vs
# 100 GFLOP/s per core). Autocast (bf16) keeps F.linear, which already runs oneDNN's bf16 GEMM.
ONEDNN_FP32_LINEAR = True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), like F.linear; float32 CPU tensors outside autocast use oneDNN (see above)."""
    if (ONEDNN_FP32_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and onednn_linear_works()):
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return onednn_linear(x, weight, bias)  # the op: differentiable, and opaque to torch.compile
        return _onednn_gemm(x, weight, bias)  # the same product without the op's dispatch (~5 us a call)
    return F.linear(x, weight, bias)


def _onednn_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# A custom op rather than a bare call: inductor's own lowering of mkldnn._linear_pointwise expects prepacked
# inference weights and fails in training, while a custom op stays an opaque kernel call in compiled code.
@torch.library.custom_op("aios::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) by oneDNN's float32 GEMM (CPU); differentiable."""
    return _onednn_gemm(x, weight, bias)


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _onednn_linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_backward(ctx, grad):  # grad (..., out)
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear(grad, weight.t(), None)  # grad @ weight: (..., in)
    grad_2d = grad.reshape(-1, grad.shape[-1])  # (N, out)
    if ctx.needs_input_grad[1]:  # grad^T @ x: (out, in)
        x_2d = x.reshape(-1, x.shape[-1])  # (N, in)
        # oneDNN copies a transposed first operand into a contiguous one (not a transposed second): let the
        # narrower of x and grad be the one copied (for lm_head, x (N, D) rather than grad (N, V)).
        if x_2d.shape[1] <= grad_2d.shape[1]:
            grad_w = onednn_linear(x_2d.t(), grad_2d.t(), None).t()  # (x^T @ grad)^T
        else:
            grad_w = onednn_linear(grad_2d.t(), x_2d.t(), None)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad_2d.sum(0)
    return grad_x, grad_w, grad_b


onednn_linear.register_autograd(_onednn_linear_backward, setup_context=_onednn_linear_setup)

_onednn_linear_ok: bool | None = None  # a plain global, not functools.cache: torch.compile traces `linear`


def onednn_linear_works() -> bool:
    """Whether this torch has oneDNN's linear op and it agrees with F.linear; checked once, loudly if not."""
    global _onednn_linear_ok
    if _onednn_linear_ok is None:
        _onednn_linear_ok = _check_onednn_linear()
    return _onednn_linear_ok


def _check_onednn_linear() -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=g) for shape in ((5, 3, 16), (8, 16), (8,)))
        ok = torch.allclose(_onednn_gemm(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        reason = "its result differs from F.linear"
    except (AttributeError, RuntimeError) as exc:  # torch built without oneDNN, or the op changed
        ok, reason = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        log.warning("oneDNN float32 linear unavailable (%s); using F.linear (slower on AMD CPUs)", reason)
    return ok


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) in float32, cast back; no learnable gain."""
    return _RMSNorm.apply(x, eps)


class _RMSNorm(torch.autograd.Function):
    """rms_norm in two passes (sum of squares, scale) and a three-pass backward that needs only the output:
    y = x r with r = rsqrt(mean(x^2) + eps) gives dx = r (dy - y mean(dy y)). Autograd through the plain
    expression makes six passes and keeps x and its square."""

    @staticmethod
    def forward(ctx, x, eps):
        xf = x.float()
        r = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        y = xf * r  # float32 (..., D)
        ctx.save_for_backward(y, r)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, r = ctx.saved_tensors
        dot = (grad * y).mean(-1, keepdim=True)  # (..., 1) float32
        return torch.addcmul(grad, y, dot, value=-1).mul_(r).to(grad.dtype), None


# ----------------------------------------------------------------------------------------------------
# Attention


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE: inv_freq = theta^(-2i/hd), cos/sin = cat(freqs, freqs)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # (S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:length], self.sin[:length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in float32, cast back, with rotate_half(x) = cat(-x2, x1).

    x: (B, S, H, hd), any strides (q and k heads together in one call); cos/sin: (S, hd), the RotaryEmbedding
    tables, whose two halves are equal (cat(freqs, freqs))."""
    half = x.shape[-1] // 2
    return _Rotary.apply(x, cos[:, None, :half], sin[:, None, :half])  # tables (S, 1, hd/2)


class _Rotary(torch.autograd.Function):
    """RoPE by halves: out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin (the rotate-half form, since both table
    halves are equal), written straight into one float32 buffer: no rotated copy of x, no cat. The backward
    is the inverse rotation (sin -> -sin)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()  # once: on CPU a mixed-dtype op makes its own float copy of the bf16 operand, each time
    x1, x2 = xf[..., :half], xf[..., half:]
    if torch.compiler.is_compiling():  # out= into views does not trace; inductor fuses the plain form anyway
        return torch.cat((x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin), dim=-1).to(x.dtype)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out.to(x.dtype)


def sliding_window_mask(length: int, window: int, device: torch.device | str) -> torch.Tensor:
    """(S, S) bool, True where query i may attend key j: i - window < j <= i.

    Built once per (length, window, device) and shared by every attention call: read-only."""
    if torch.compiler.is_compiling():  # a constant of the graph; dynamo would trace past the cache anyway
        return _window_mask.__wrapped__(length, window, str(torch.device(device)))
    return _window_mask(length, window, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _window_mask(length: int, window: int, device: str) -> torch.Tensor:
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & (j > i - window)


def position_slice(position: int) -> slice:
    """The slice of one sequence position (negative counts from the end): keeps the dimension."""
    return slice(position, position + 1 or None)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


# bf16 attention on CPU over short sequences computes its (S, S) score matrix explicitly: torch's CPU
# flash-attention kernel is slow at these sizes in bf16 (measured on this project's CPU at B 4, 8 heads,
# S 128, hd 64: forward 1.9 vs 0.7 ms, forward + backward 10 vs 3 ms), and at this length the score matrix is
# small. From SCORES_ATTENTION_MAX_LEN keys on, the flash kernel's tiling wins (about even at 256). Float32
# keeps torch's kernel, which is as fast there.
SCORES_ATTENTION_MAX_LEN = 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
              rows: slice | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for q (B, H, Sq, hd) and k, v (B, H, S, hd): non-causal with window
    None, else causal over the last `window` keys (S for plain causal). `rows`: the query positions q holds
    (Sq < S), as a slice of 0..S-1; all S by default."""
    S = k.shape[-2]
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and S <= SCORES_ATTENTION_MAX_LEN:
        bias = None if window is None else window_bias(S, window, q.device)
        return _ScoresAttention.apply(q, k, v, bias if bias is None or rows is None else bias[rows])
    if window is None:
        return F.scaled_dot_product_attention(q, k, v)
    if rows is None and window >= S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = sliding_window_mask(S, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if rows is None else mask[rows])


def window_bias(length: int, window: int, device: torch.device | str) -> torch.Tensor:
    """(S, S) float32: 0 where `sliding_window_mask` is True, -inf elsewhere. Cached like the mask."""
    if torch.compiler.is_compiling():
        return _window_bias.__wrapped__(length, window, str(torch.device(device)))
    return _window_bias(length, window, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _window_bias(length: int, window: int, device: str) -> torch.Tensor:
    mask = _window_mask.__wrapped__(length, window, device)
    return torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))


class _ScoresAttention(torch.autograd.Function):
    """Attention through an explicit score matrix, for bf16 on CPU (see SCORES_ATTENTION_MAX_LEN): the
    products in bf16 with float32 accumulation (oneDNN), the scores, softmax and its backward in float32.
    Saves q, k, v and the probabilities p; with dS = p (dP - rowsum(dP p)), dP = dO v^T:
    dq = dS k / sqrt(hd), dk = dS^T q / sqrt(hd), dv = p^T dO."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        scale = q.shape[-1] ** -0.5
        scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)  # (B, H, Sq, S) float32
        if bias is not None:
            scores.add_(bias)
        p = torch.softmax(scores, dim=-1)
        p_low = p.to(q.dtype)
        ctx.save_for_backward(q, k, v, p, p_low)
        ctx.scale = scale
        return torch.matmul(p_low, v)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, p, p_low = ctx.saved_tensors
        grad = grad.to(q.dtype)
        grad_v = torch.matmul(p_low.transpose(-1, -2), grad)
        dp = torch.matmul(grad, v.transpose(-1, -2)).float()  # (B, H, Sq, S)
        ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p).mul_(ctx.scale).to(q.dtype)
        return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), grad_v, None


class Attention(nn.Module):
    def __init__(self, config: HRMACTv1Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.causal = config.causal
        self.window = config.window_size
        self.use_flash = False  # a runtime choice: HRMACTv1(..., use_flash_attn=True)
        self.qkv_proj = Linear(config.hidden_size, 3 * config.hidden_size)  # q-heads, k-heads, v-heads
        self.o_proj = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                query: int | None = None) -> torch.Tensor:
        """(B, S, D) -> (B, S, D); with `query`, the output (B, 1, D) of that position alone, whose keys and
        values still come from every position."""
        B, S, D = x.shape
        H = self.num_heads
        qkv = self.qkv_proj(x).view(B, S, 3 * H, self.head_dim)
        if rotary is not None:
            qk, v = qkv.split((2 * H, H), dim=2)
            q, k = apply_rotary(qk, *rotary).split(H, dim=2)  # each (B, S, H, hd)
        else:
            q, k, v = qkv.split(H, dim=2)
        if query is not None:
            rows = position_slice(query)
            q, k, v = (t.transpose(1, 2) for t in (q[:, rows], k, v))  # (B, H, 1, hd), (B, H, S, hd) x 2
            out = attention(q, k, v, self._window(S), rows).transpose(1, 2)  # (B, 1, H, hd)
            return self.o_proj(out.reshape(B, 1, D))
        if self.use_flash and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func

            window = (self.window - 1, 0) if self.window else (-1, -1)  # w keys: itself + w-1 before
            out = flash_attn_func(q, k, v, causal=self.causal, window_size=window)  # (B, S, H, hd)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
            out = attention(q, k, v, self._window(S)).transpose(1, 2)  # (B, S, H, hd)
        return self.o_proj(out.reshape(B, S, D))

    def _window(self, length: int) -> int | None:
        """The `attention` window: None without a causal mask, else the keys each query sees."""
        return (self.window or length) if self.causal else None


# ----------------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU, or a mixture of SwiGLU experts


class SwiGLU(nn.Module):
    def __init__(self, config: HRMACTv1Config):
        super().__init__()
        inner = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * inner)  # gate first, then up
        self.down_proj = Linear(inner, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class MixtureOfExperts(nn.Module):
    """Top-k routed SwiGLU experts with a capacity limit and a Switch-style load-balancing loss.

    Dispatch is batched: tokens are sorted into an (E, C, D) buffer, every expert runs as one batched
    matmul, and results are scattered back weighted by their router probability. Tokens past an
    expert's capacity C = ceil(capacity_factor * N * k / E) are dropped for that expert (the residual
    connection carries them).

    Added experts (`add_experts`: expert training, `--experts`): A more experts kept as parameters of their
    own (`added_gate_up` (A, D, 2I), `added_down` (A, I, D), `added_router` (A, D): the router's new rows),
    concatenated after the E base ones in forward, so that routing, capacity and the load-balancing loss run
    over E + A experts. The base parameters are left as they are (expert training freezes them); with no
    added experts (or `added_active` False) forward computes exactly what the base layer computes.
    """

    def __init__(self, config: HRMACTv1Config):
        super().__init__()
        D, inner, E = config.hidden_size, config.intermediate_size, config.num_experts
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.capacity_factor = config.moe_capacity_factor
        self.router = Linear(D, E)
        self.gate_up = nn.Parameter(torch.empty(E, D, 2 * inner))
        self.down = nn.Parameter(torch.empty(E, inner, D))
        trunc_normal_init_(self.gate_up, std=1.0 / math.sqrt(D))
        trunc_normal_init_(self.down, std=1.0 / math.sqrt(inner))
        self.num_added = 0  # A: experts added to the trained layer (add_experts)
        self.added_active = True  # False: forward leaves the added experts out (the base layer alone)

    def add_experts(self, count: int) -> None:
        """`count` new experts and router rows, initialised like the base ones (from torch's generator)."""
        if self.num_added:
            raise ValueError(f"this layer already has {self.num_added} added experts")
        D, two_inner = self.gate_up.shape[1:]
        inner = two_inner // 2
        device = self.gate_up.device
        self.added_gate_up = nn.Parameter(trunc_normal_init_(torch.empty(count, D, two_inner, device=device),
                                                             std=1.0 / math.sqrt(D)))
        self.added_down = nn.Parameter(trunc_normal_init_(torch.empty(count, inner, D, device=device),
                                                          std=1.0 / math.sqrt(inner)))
        self.added_router = nn.Parameter(trunc_normal_init_(torch.empty(count, D, device=device),
                                                            std=1.0 / math.sqrt(D)))
        self.num_added = count

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, D = x.shape
        A = self.num_added if self.added_active else 0
        E, k = self.num_experts + A, self.top_k
        tokens = x.reshape(-1, D)  # (N, D)
        N = tokens.shape[0]
        router_logits = self.router(tokens)  # (N, E base)
        gate_up_weights, down_weights = self.gate_up, self.down
        if A:  # the added experts after the base ones: (N, E + A) logits, (E + A, ...) weights
            router_logits = torch.cat((router_logits, linear(tokens, self.added_router)), dim=-1)
            gate_up_weights = torch.cat((gate_up_weights, self.added_gate_up), dim=0)
            down_weights = torch.cat((down_weights, self.added_down), dim=0)
        probs = router_logits.float().softmax(dim=-1)  # (N, E)
        top_p, top_e = probs.topk(k, dim=-1)  # (N, k)
        if k > 1:  # renormalise over the chosen experts; with k = 1 the raw probability is the gate
            top_p = top_p / top_p.sum(-1, keepdim=True)  # (Switch), else the router gets no task gradient

        # Load balancing (Switch Transformer): E * sum_e f_e * P_e, f = share of routed slots, P = mean prob.
        routed = F.one_hot(top_e, E).float().sum(1)  # (N, E)
        aux_loss = E * ((routed.mean(0) / k) * probs.mean(0)).sum()

        capacity = max(1, math.ceil(self.capacity_factor * N * k / E))
        flat_e = top_e.reshape(-1)  # (N*k,) expert of each assignment, token-major
        one_hot = F.one_hot(flat_e, E)  # (N*k, E)
        slot = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1)  # position of each assignment in its expert
        keep = slot < capacity
        token_idx = torch.arange(N, device=x.device).repeat_interleave(k)[keep]
        expert_idx, slot_idx = flat_e[keep], slot[keep]
        weight = top_p.reshape(-1)[keep]

        buffer = tokens.new_zeros(E, capacity, D)
        buffer[expert_idx, slot_idx] = tokens[token_idx]
        gate, up = torch.bmm(buffer, gate_up_weights.to(buffer.dtype)).chunk(2, dim=-1)  # (E, C, inner)
        expert_out = torch.bmm(F.silu(gate) * up, down_weights.to(buffer.dtype))  # (E, C, D)
        picked = expert_out[expert_idx, slot_idx] * weight[:, None].to(expert_out.dtype)
        out = torch.zeros_like(tokens, dtype=expert_out.dtype).index_add_(0, token_idx, picked)
        return out.view(B, S, D).to(x.dtype), aux_loss


# ----------------------------------------------------------------------------------------------------
# Block and reasoning module


class Block(nn.Module):
    """Post-norm: h = rms(h + attn(h)); h = rms(h + ffn(h))."""

    def __init__(self, config: HRMACTv1Config):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = MixtureOfExperts(config) if config.use_moe else SwiGLU(config)

    def forward(self, h: torch.Tensor, rotary, query: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) -> (B, S, D), or (B, 1, D) at position `query` alone (see Attention)."""
        attn = self.self_attn(h, rotary, query)
        if query is not None:
            h = h[:, position_slice(query)]
        h = rms_norm(h + attn, self.eps)
        if isinstance(self.mlp, MixtureOfExperts):
            ffn, aux = self.mlp(h)
        else:
            ffn, aux = self.mlp(h), h.new_zeros((), dtype=torch.float32)
        return rms_norm(h + ffn, self.eps), aux


class ReasoningModule(nn.Module):
    """f(z, injection) = blocks(z + injection): input injection by addition."""

    def __init__(self, config: HRMACTv1Config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(num_layers))
        self.gradient_checkpointing = False  # a runtime choice: HRMACTv1(..., gradient_checkpointing=True)

    def forward(self, z: torch.Tensor, injection: torch.Tensor, rotary,
                query: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D) -> (B, S, D); with `query`, the last block computes position `query` alone: (B, 1, D)."""
        h = z + injection
        aux = h.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            last_query = query if i == len(self.layers) - 1 else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h, layer_aux = checkpoint(layer, h, rotary, last_query, use_reentrant=False)
            else:
                h, layer_aux = layer(h, rotary, last_query)
            aux = aux + layer_aux
        return h, aux


# ----------------------------------------------------------------------------------------------------
# One segment: the inner model


class HRMInner(nn.Module):
    def __init__(self, config: HRMACTv1Config):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.embed_scale = math.sqrt(D)
        self.prefix_len = config.puzzle_emb_len  # P
        positions = config.seq_len + self.prefix_len  # S_max

        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        trunc_normal_init_(self.embed_tokens.weight, std=1.0 / self.embed_scale)
        if config.puzzle_emb_ndim > 0:
            # The reference keeps this table sparse with its own optimizer; here it is dense, zero-initialised.
            self.puzzle_emb = nn.Embedding(config.num_puzzle_identifiers, config.puzzle_emb_ndim)
            nn.init.zeros_(self.puzzle_emb.weight)
        if config.pos_encodings == "rope":
            self.rotary = RotaryEmbedding(config.head_dim, positions, config.rope_theta)
        else:
            self.embed_pos = nn.Embedding(positions, D)
            trunc_normal_init_(self.embed_pos.weight, std=1.0 / self.embed_scale)

        self.H_level = ReasoningModule(config, config.H_layers)
        self.L_level = ReasoningModule(config, config.L_layers)
        self.lm_head = Linear(D, config.vocab_size)
        self.q_head = Linear(D, 2, bias=True)  # (halt, continue)
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)
        self.register_buffer("H_init", trunc_normal_init_(torch.empty(D), std=1.0))
        self.register_buffer("L_init", trunc_normal_init_(torch.empty(D), std=1.0))
        # Under a causal mask only the last position has seen the whole sequence (see module docstring).
        self.q_position = -1 if config.causal else 0

    def embed(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor | None) -> torch.Tensor:
        x = self.embed_tokens(inputs)  # (B, T, D)
        if self.prefix_len:
            prefix = self.puzzle_emb(puzzle_identifiers)  # (B, ndim)
            prefix = F.pad(prefix, (0, self.prefix_len * x.shape[-1] - prefix.shape[-1]))
            x = torch.cat((prefix.view(x.shape[0], self.prefix_len, -1).to(x.dtype), x), dim=1)  # (B, S, D)
        if self.config.pos_encodings == "learned":
            x = 0.707106781 * (x + self.embed_pos.weight[: x.shape[1]])
        return self.embed_scale * x

    def forward(self, z_H: torch.Tensor, z_L: torch.Tensor, inputs: torch.Tensor,
                puzzle_identifiers: torch.Tensor | None = None):
        """One segment. Returns (z_H, z_L) detached, logits (B, T, V), q logits (B, 2), MoE aux loss."""
        z_H, z_L, aux = self.segment(z_H, z_L, inputs, puzzle_identifiers)
        logits = self.lm_head(z_H)[:, self.prefix_len:]  # (B, T, V)
        q_logits = self.q_head(z_H[:, self.q_position]).float()  # (B, 2)
        return z_H.detach(), z_L.detach(), logits, q_logits, aux

    def q_logits(self, z_H: torch.Tensor, z_L: torch.Tensor, inputs: torch.Tensor,
                 puzzle_identifiers: torch.Tensor | None = None) -> torch.Tensor:
        """Only the q logits (B, 2) of a segment, for the ACT q_continue target: no lm_head, and the last H
        block computes z_H at the Q-head's position alone. With MoE the whole last block runs (expert capacity
        depends on the number of tokens routed)."""
        query = None if self.config.use_moe else self.q_position
        z_H, _, _ = self.segment(z_H, z_L, inputs, puzzle_identifiers, query=query)  # (B, 1 or S, D)
        return self.q_head(z_H[:, self.q_position]).float()

    def segment(self, z_H: torch.Tensor, z_L: torch.Tensor, inputs: torch.Tensor,
                puzzle_identifiers: torch.Tensor | None = None, query: int | None = None):
        """The H and L cycles of one segment: (z_H, z_L, MoE aux loss), z_H at position `query` alone if given."""
        cfg = self.config
        x = self.embed(inputs, puzzle_identifiers)  # (B, S, D)
        rotary = self.rotary(x.shape[1]) if cfg.pos_encodings == "rope" else None
        with torch.no_grad():  # all but the very last L and H update
            for h_step in range(cfg.H_cycles):
                for l_step in range(cfg.L_cycles):
                    if not (h_step == cfg.H_cycles - 1 and l_step == cfg.L_cycles - 1):
                        z_L, _ = self.L_level(z_L, z_H + x, rotary)
                if h_step != cfg.H_cycles - 1:
                    z_H, _ = self.H_level(z_H, z_L, rotary)
        # The one-step gradient: only these two updates are in the autograd graph.
        z_L, aux_L = self.L_level(z_L, z_H + x, rotary)
        z_H, aux_H = self.H_level(z_H, z_L, rotary, query)
        return z_H, z_L, aux_L + aux_H


# ----------------------------------------------------------------------------------------------------
# ACT wrapper


@dataclass
class ACTCarry:
    """Per-row state that persists across optimizer steps while a sample is being worked on."""

    z_H: torch.Tensor  # (B, S, D)
    z_L: torch.Tensor  # (B, S, D)
    steps: torch.Tensor  # (B,) int32: segments run on the current sample
    halted: torch.Tensor  # (B,) bool: row is done; the next call resets it with a new sample
    current_data: dict[str, torch.Tensor]  # the sample each row works on: inputs, labels, ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors (for safetensors checkpoints)."""
        state = {"z_H": self.z_H, "z_L": self.z_L, "steps": self.steps, "halted": self.halted}
        state.update({f"data.{k}": v for k, v in self.current_data.items()})
        return {k: v.detach().contiguous() for k, v in state.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ACTCarry:
        data = {k[len("data."):]: v for k, v in state.items() if k.startswith("data.")}
        return cls(state["z_H"], state["z_L"], state["steps"], state["halted"].bool(), data)

    def to(self, device: torch.device | str) -> ACTCarry:
        return ACTCarry(self.z_H.to(device), self.z_L.to(device), self.steps.to(device),
                        self.halted.to(device), {k: v.to(device) for k, v in self.current_data.items()})


class CompiledOrEager:
    """`torch.compile(fn)`, or `fn` itself for good (with a warning naming the reason) once compiling fails."""

    def __init__(self, fn: Callable, name: str, backend: str | Callable = "inductor"):
        self.eager, self.name = fn, name
        self.compiled = torch.compile(fn, dynamic=False, backend=backend)
        self.failure: str | None = None  # why compiling failed, once it has

    def __call__(self, *args, **kwargs):
        if self.failure is None:
            try:
                return self.compiled(*args, **kwargs)
            # Compile errors only (torch.compile has imported torch._dynamo); others propagate.
            except torch._dynamo.exc.TorchDynamoException as exc:
                message = str(exc).strip().splitlines()
                self.failure = f"{type(exc).__name__}: {message[0] if message else ''}"
                log.warning("torch.compile of %s failed (%s); running it eager", self.name, self.failure)
        return self.eager(*args, **kwargs)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (B,) row mask against a (B, ...) tensor."""
    return mask.view((-1,) + (1,) * (like.ndim - 1))


class HRMACTv1(nn.Module):
    """The model: `forward(carry, batch) -> (carry, outputs)` runs one ACT segment for every row.

    `batch` holds a candidate sample per row ("inputs" (B, T), "labels" (B, T), optional
    "puzzle_identifiers" (B,)); only rows whose carry is halted take theirs, the others keep working on
    `carry.current_data`. A training loop therefore refills just the halted rows (see `carry.halted`).
    """

    def __init__(self, config: HRMACTv1Config, *, gradient_checkpointing: bool = False,
                 use_flash_attn: bool = False):
        super().__init__()
        self.config = config
        self.inner = HRMInner(config)
        self.set_runtime(gradient_checkpointing=gradient_checkpointing, use_flash_attn=use_flash_attn)

    def set_runtime(self, *, gradient_checkpointing: bool, use_flash_attn: bool) -> None:
        """How the model runs (RUNTIME_KEYS): the same weights give the same results either way."""
        if use_flash_attn and not flash_attn_available():
            log.warning("--use-flash-attn: flash-attn is not installed or CUDA is unavailable; "
                        "falling back to torch scaled_dot_product_attention")
        for module in self.modules():
            if isinstance(module, ReasoningModule):
                module.gradient_checkpointing = gradient_checkpointing
            elif isinstance(module, Attention):
                module.use_flash = use_flash_attn

    def compile_segments(self, backend: str | Callable = "inductor") -> None:
        """torch.compile each ACT segment (HRMInner.forward, and q_logits for the q_continue target), as the
        reference compiles its model. Compiling happens on first use (and again for a new shape, grad mode or
        autocast state); where it fails (no C++ compiler, an unsupported op, ...), a warning names the reason
        and that segment runs eager from then on. Meant for training: generation's growing context would
        compile once per length."""
        inner = self.inner
        if isinstance(inner.forward, CompiledOrEager):
            return
        onednn_linear_works()  # decided now, not while tracing
        inner.forward = CompiledOrEager(inner.forward, "the ACT segment (HRMInner.forward)", backend)
        inner.q_logits = CompiledOrEager(inner.q_logits, "the q_continue target's segment (HRMInner.q_logits)",
                                         backend)

    def num_parameters(self, include_puzzle_embedding: bool = False) -> int:
        # ds_numel: a weight DeepSpeed ZeRO-3 partitioned (its local tensor is a placeholder)
        return sum(getattr(p, "ds_numel", p.numel()) for name, p in self.named_parameters()
                   if include_puzzle_embedding or not name.startswith("inner.puzzle_emb."))

    # -- added experts (expert training, `--experts`) ------------------------------------------------------

    def moe_layers(self) -> list[tuple[str, MixtureOfExperts]]:
        """(name, layer) of every mixture-of-experts layer, in module order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, MixtureOfExperts)]

    def add_experts(self, count: int = 1) -> None:
        """Add `count` experts (and router rows) to every MoE layer; the base weights are left as they are."""
        layers = self.moe_layers()
        if not layers:
            raise ValueError("the model has no mixture-of-experts layers (it was not built with use_moe)")
        for _, layer in layers:
            layer.add_experts(count)

    def freeze_all_but_added_experts(self) -> None:
        """requires_grad only on the added experts' parameters: an optimizer built from the parameters that
        require grad (and its weight decay) never touches the base."""
        for name, param in self.named_parameters():
            param.requires_grad_(name.rsplit(".", 1)[-1] in ADDED_EXPERT_PARAMS)

    def added_expert_state(self) -> dict[str, torch.Tensor]:
        """The added experts' tensors, by parameter name (what expert.safetensors holds)."""
        return {f"{name}.{param}": getattr(layer, param) for name, layer in self.moe_layers() if layer.num_added
                for param in ADDED_EXPERT_PARAMS}

    @contextlib.contextmanager
    def added_experts_off(self):
        """Within the block, every MoE layer computes as the base layer alone (its added experts left out)."""
        layers = [layer for _, layer in self.moe_layers()]
        before = [layer.added_active for layer in layers]
        for layer in layers:
            layer.added_active = False
        try:
            yield self
        finally:
            for layer, active in zip(layers, before, strict=True):
                layer.added_active = active

    def initial_carry(self, batch: dict[str, torch.Tensor]) -> ACTCarry:
        """A carry with every row halted, so the first call takes every row's sample."""
        inputs = batch["inputs"]
        B, T = inputs.shape
        S, D = T + self.inner.prefix_len, self.config.hidden_size
        z = torch.zeros(B, S, D, device=inputs.device)
        return ACTCarry(
            z_H=z, z_L=z.clone(),
            steps=torch.zeros(B, dtype=torch.int32, device=inputs.device),
            halted=torch.ones(B, dtype=torch.bool, device=inputs.device),
            current_data={k: torch.zeros_like(v) for k, v in batch.items()},
        )

    def forward(self, carry: ACTCarry, batch: dict[str, torch.Tensor]) -> tuple[ACTCarry, dict[str, torch.Tensor]]:
        cfg, inner = self.config, self.inner
        # 1. Reset halted rows: fresh state, steps 0, the new sample. Other rows keep theirs.
        reset = carry.halted
        z_H = torch.where(_rows(reset, carry.z_H), inner.H_init.to(carry.z_H.dtype), carry.z_H)
        z_L = torch.where(_rows(reset, carry.z_L), inner.L_init.to(carry.z_L.dtype), carry.z_L)
        steps = torch.where(reset, 0, carry.steps)
        data = {k: torch.where(_rows(reset, v), batch[k], v) for k, v in carry.current_data.items()}

        # 2. One segment.
        z_H, z_L, logits, q_logits, aux_loss = inner(z_H, z_L, data["inputs"], data.get("puzzle_identifiers"))
        q_halt, q_continue = q_logits.unbind(-1)  # (B,), (B,)
        outputs = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_continue,
                   "aux_loss": aux_loss}

        with torch.no_grad():
            steps = steps + 1
            is_last = steps >= cfg.halt_max_steps
            halted = is_last
            # 3. Training: learned halting with exploration, and the bootstrapped continue target.
            if self.training and cfg.halt_max_steps > 1:
                halted = halted | (q_halt > q_continue)
                min_steps = batch.get("min_halt_steps")  # given by the trainer: drawn per sample slot
                if min_steps is None:  # the reference's draw, from torch's global generator
                    explore = torch.rand_like(q_halt) < cfg.halt_exploration_prob
                    min_steps = explore * torch.randint_like(steps, low=2, high=cfg.halt_max_steps + 1)
                halted = halted & (steps >= min_steps)
                next_q = inner.q_logits(z_H, z_L, data["inputs"], data.get("puzzle_identifiers"))  # next segment
                next_halt, next_continue = next_q.unbind(-1)
                outputs["target_q_continue"] = torch.sigmoid(
                    torch.where(is_last, next_halt, torch.maximum(next_halt, next_continue)))
            # 4. Evaluation: every row runs all M segments.
        return ACTCarry(z_H, z_L, steps.to(torch.int32), halted, data), outputs

    # -- save / load: a normal model directory (config.json + model.safetensors, no pickle) --------

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        metadata = {"format": "pt", DIGEST_KEY: tensors_digest(state)}  # checked by from_pretrained
        atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(state, path, metadata=metadata))
        atomic_write_json(directory / CONFIG_NAME, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> HRMACTv1:
        from safetensors import safe_open
        from safetensors.torch import load_file

        directory = Path(directory)
        config = HRMACTv1Config.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        model = cls(config)
        state = load_file(directory / WEIGHTS_NAME)
        with safe_open(directory / WEIGHTS_NAME, framework="pt") as f:
            recorded = (f.metadata() or {}).get(DIGEST_KEY)
        if recorded is not None and recorded != tensors_digest(state):
            raise ValueError(f"{WEIGHTS_NAME} does not match the checksum in its header (a torn or altered write)")
        model.load_state_dict(state)
        return model.to(device)


# ----------------------------------------------------------------------------------------------------
# Loss


def shift_labels(tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """LM batch from token windows (B, T+1): predict token t+1 from tokens <= t; padding -> -100."""
    labels = tokens[:, 1:].clone()
    if pad_mask is not None:
        labels[pad_mask[:, 1:]] = IGNORE_LABEL_ID
    return {"inputs": tokens[:, :-1].contiguous(), "labels": labels}


def token_log_probs(logits: torch.Tensor, loss_type: str) -> torch.Tensor:
    """log p(token) (..., V) under the model's own output distribution: the one its loss trains.

    softmax: log_softmax in float32. stablemax: s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0), normalised,
    in float64 (a logit of -inf gets probability 0 under both)."""
    if loss_type == "stablemax":
        x = logits.to(torch.float64)
        s = torch.where(x < 0, 1 / (1 - x), x + 1)
        return torch.log(s / s.sum(-1, keepdim=True))
    return F.log_softmax(logits.float(), dim=-1)


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss (B, T) under stablemax (see `token_log_probs`), float64, 0 where labels are ignored."""
    logprobs = token_log_probs(logits, "stablemax")
    valid = labels != IGNORE_LABEL_ID
    picked = logprobs.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return -torch.where(valid, picked, 0)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss (B, T), float32, 0 where labels are ignored."""
    return token_loss_and_predictions(logits, labels, "softmax")[0]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Per-token loss (B, T) of the model's `loss_type`: what training minimises and evaluation reports."""
    return token_loss_and_predictions(logits, labels, loss_type)[0]


def token_loss_and_predictions(logits: torch.Tensor, labels: torch.Tensor,
                               loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token loss (B, T) of `loss_type` and the argmax predictions (B, T), from one read of the logits."""
    if loss_type == "stablemax":
        return stablemax_cross_entropy(logits, labels), logits.argmax(-1)
    loss, predictions = _SoftmaxCrossEntropy.apply(logits.flatten(0, 1), labels.flatten())
    return loss.view(labels.shape), predictions.view(labels.shape)


# Rows of logits the softmax loss takes at a time: a few MiB of float32, so neither the forward nor the
# backward ever holds a float32 copy of all (N, V) logits (N * V * 4 bytes: 32 MiB at 1024 tokens x 8192).
_LOSS_CHUNK_ELEMENTS = 1 << 20


def _row_chunks(rows: int, width: int):
    step = max(1, _LOSS_CHUNK_ELEMENTS // width)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Per-token softmax cross-entropy (N,) in float32 and the argmax predictions (N,) of logits (N, V).

    loss = logsumexp(x) - x[label], 0 where the label is IGNORE_LABEL_ID. The backward forms
    (softmax(x) - one_hot(label)) * grad from the saved logits and logsumexp, a chunk of rows at a time, in
    float32, stored once in the logits' dtype: one pass and one (N, V) tensor, where F.cross_entropy on
    float32 logits makes four (the float copy, log-probabilities, the nll gradient, the log-softmax gradient).
    """

    @staticmethod
    def forward(ctx, logits, labels):
        valid = labels != IGNORE_LABEL_ID
        safe = torch.where(valid, labels, 0).long()
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        predictions = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for rows in _row_chunks(*logits.shape):
            x = logits[rows].float()  # (n, V)
            predictions[rows] = x.argmax(-1)
            lse[rows] = torch.logsumexp(x, -1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, lse, safe, valid)
        ctx.mark_non_differentiable(predictions)
        return torch.where(valid, lse - picked, 0), predictions

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_predictions):
        logits, lse, safe, valid = ctx.saved_tensors
        scale = torch.where(valid, grad_loss, 0)  # (N,)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        in_place = grad.dtype == torch.float32
        for rows in _row_chunks(*logits.shape):
            if in_place:
                p = torch.sub(logits[rows], lse[rows, None], out=grad[rows]).exp_()  # softmax
            else:  # one float copy of the rows (a mixed-dtype sub would make its own)
                p = logits[rows].float().sub_(lse[rows, None]).exp_()
            p[torch.arange(p.shape[0], device=p.device), safe[rows]] -= 1
            p.mul_(scale[rows, None])
            if not in_place:
                grad[rows] = p
        return grad, None


def act_loss(carry: ACTCarry, outputs: dict[str, torch.Tensor], config: HRMACTv1Config):
    """Loss of one segment, summed over rows (the caller divides by the global batch size).

    total = token loss + 0.5 * (q_halt loss + q_continue loss) [+ MoE coef * aux * B].
    Returns (total, metrics) where metrics are sums over rows (divide by `count` / `rows` to average):
      count, accuracy, exact_accuracy, q_halt_accuracy, steps  -- over rows that halted this segment
      rows, token_accuracy_all, lm_loss, q_halt_loss, q_continue_loss, aux_loss -- over all rows
    """
    labels = carry.current_data["labels"]
    logits = outputs["logits"]
    mask = labels != IGNORE_LABEL_ID  # (B, T)
    counts = mask.sum(-1)  # (B,)
    divisor = counts.clamp_min(1)

    per_token, predictions = token_loss_and_predictions(logits, labels, config.loss_type)  # (B, T) each
    with torch.no_grad():
        correct = mask & (predictions == labels)
        token_acc = correct.sum(-1) / divisor  # (B,)
        seq_correct = correct.sum(-1) == counts
        # LM mode rewards halting by token accuracy (a soft target); exact match in the puzzle setting.
        q_halt_target = token_acc.float() if config.causal else seq_correct.float()
        q_halt = outputs["q_halt_logits"]
        valid = carry.halted & (counts > 0)
        metrics = {
            "count": valid.sum(),
            "accuracy": torch.where(valid, token_acc, 0).sum(),
            "exact_accuracy": (valid & seq_correct).sum(),
            "q_halt_accuracy": (valid & ((q_halt >= 0) == (q_halt_target >= 0.5))).sum(),
            "steps": torch.where(valid, carry.steps, 0).sum(),
            "rows": torch.tensor(labels.shape[0], device=labels.device),
            "token_accuracy_all": token_acc.sum(),
        }

    lm_loss = (per_token / divisor[:, None]).sum()
    q_halt_loss = F.binary_cross_entropy_with_logits(q_halt, q_halt_target, reduction="sum")
    total = lm_loss + 0.5 * q_halt_loss
    q_continue_loss = torch.zeros((), device=labels.device)
    if "target_q_continue" in outputs:
        q_continue_loss = F.binary_cross_entropy_with_logits(
            outputs["q_continue_logits"], outputs["target_q_continue"], reduction="sum")
        total = total + 0.5 * q_continue_loss
    aux = outputs["aux_loss"]
    if config.use_moe:
        total = total + config.moe_aux_loss_coef * aux * labels.shape[0]
    metrics.update({"lm_loss": lm_loss.detach(), "q_halt_loss": q_halt_loss.detach(),
                    "q_continue_loss": q_continue_loss.detach(), "aux_loss": aux.detach()})
    return total, metrics
