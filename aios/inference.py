"""Using a trained HRM ACT v1 language model: evaluation and ACT generation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import numpy as np
import torch

from aios.models.hrm_act_v1 import (
    IGNORE_LABEL_ID,
    HRMACTv1,
    shift_labels,
    token_cross_entropy,
    token_log_probs,
)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on `device`, or nothing when dtype is None.

    Autocast casts each float32 weight once per outermost context and reuses the copy (also under no_grad):
    wrap all the segments that share weights in one context, not each segment in its own."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def evaluate_lm(model: HRMACTv1, batches: Iterable[np.ndarray], device: torch.device,
                amp_dtype: torch.dtype | None = None) -> dict:
    """Loss, perplexity and token accuracy after all M segments (evaluation runs every segment).

    `q_halt_segments` is the mean segment at which the Q-head first asked to halt (M if it never did):
    how much computation ACT inference (`generate`) would spend on these sequences.
    """
    return lm_eval_result(evaluate_lm_sums(model, batches, device, amp_dtype), model.config.halt_max_steps)


@torch.no_grad()
def evaluate_lm_sums(model: HRMACTv1, batches: Iterable[np.ndarray], device: torch.device,
                     amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """The sums behind `evaluate_lm` (so that shards of the batches can be evaluated apart and added)."""
    was_training = model.training
    model.eval()
    M = model.config.halt_max_steps
    loss_sum, tokens, correct, sequences, halt_segments = 0.0, 0, 0, 0, 0
    try:
        for window in batches:
            batch = shift_labels(torch.as_tensor(np.asarray(window), dtype=torch.long, device=device))
            carry = model.initial_carry(batch)
            first_halt = torch.full((batch["inputs"].shape[0],), M, device=device)
            with autocast_context(device, amp_dtype):  # one context: the weights are cast once for M segments
                for segment in range(1, M + 1):
                    carry, outputs = model(carry, batch)
                    wants_halt = (outputs["q_halt_logits"] > outputs["q_continue_logits"]) & (first_halt == M)
                    first_halt = torch.where(wants_halt, torch.full_like(first_halt, segment), first_halt)
            labels = batch["labels"]
            logits = outputs["logits"].float()
            mask = labels != IGNORE_LABEL_ID
            # The model's own loss (softmax or stablemax cross-entropy), as in training.
            loss_sum += float(token_cross_entropy(logits, labels, model.config.loss_type).sum())
            tokens += int(mask.sum())
            correct += int((mask & (logits.argmax(-1) == labels)).sum())
            sequences += labels.shape[0]
            halt_segments += float(first_halt.sum())
    finally:
        model.train(was_training)
    return {"loss_sum": loss_sum, "tokens": tokens, "correct": correct, "sequences": sequences,
            "halt_segments": halt_segments}


def lm_eval_result(sums: dict[str, float], segments: int) -> dict:
    """`evaluate_lm`'s figures from (possibly several shards') sums."""
    tokens, sequences = int(sums["tokens"]), int(sums["sequences"])
    if tokens == 0:
        raise ValueError("no evaluation tokens")
    loss = sums["loss_sum"] / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "token_accuracy": sums["correct"] / tokens,
            "segments": float(segments), "q_halt_segments": sums["halt_segments"] / sequences,
            "sequences": sequences, "tokens": tokens}


@torch.no_grad()
def generate(model: HRMACTv1, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, eos_id: int | None = None, device: torch.device | str = "cpu",
             generator: torch.Generator | None = None) -> tuple[list[int], float]:
    """Sample tokens one at a time with ACT inference: per token, run segments until the Q-head halts
    (q_halt > q_continue) or M. Returns (new token ids, mean segments used per token)."""
    model.eval()
    M, T = model.config.halt_max_steps, model.config.seq_len
    ids = list(prompt_ids)
    new_tokens: list[int] = []
    segments_used = 0
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-T:]], dtype=torch.long, device=device)  # (1, t)
        batch = {"inputs": context, "labels": torch.full_like(context, IGNORE_LABEL_ID)}
        carry = model.initial_carry(batch)
        for _ in range(M):
            carry, outputs = model(carry, batch)
            segments_used += 1
            if outputs["q_halt_logits"].item() > outputs["q_continue_logits"].item():
                break
        logits = outputs["logits"][0, -1].float()  # (V,)
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = token_log_probs(logits, model.config.loss_type).exp()  # the model's own distribution
            token = int(torch.multinomial(probs, 1, generator=generator))
        ids.append(token)
        new_tokens.append(token)
        if eos_id is not None and token == eos_id:
            break
    return new_tokens, segments_used / max(1, len(new_tokens))
