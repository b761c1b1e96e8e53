"""The GPU-only paths, checked on a real GPU: one line per check (PASS, FAIL or SKIP, and what it saw).

    bash bench/gpu_check.sh          # what a lent GPU machine runs (installs the gpu extra first)
    python bench/gpu_check.py        # the checks alone, in an environment that has them

Checks, each on the real Trainer or model code:
  cuda          the device torch sees
  flash-attn    flash-attn against torch SDPA in bf16: causal, causal sliding window, non-causal (same weights,
                same inputs; max |difference| within bf16 tolerance)
  amp-bf16      3 training steps with bf16 autocast: finite losses
  amp-fp16      3 training steps with fp16 autocast and the GradScaler: finite losses, the scaler in use
  adamw-8bit    3 training steps with --use-8bit-optimizer: bitsandbytes' AdamW8bit, one-byte moments
  oom-backoff   a real CUDA out-of-memory error (this process capped to a small share of the GPU's memory):
                the step retries at a smaller micro-batch and completes
  ddp-nccl      2 Ray Train workers on 2 GPUs (NCCL), 3 steps (only when two GPUs are visible)
Without CUDA every check reports SKIP. Exit status: 1 if any check failed, else 0.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "training_data" / "tokenizers" / "shakespeare-bpe-2k"
DATASET = REPO / "training_data" / "curated_datasets" / "test_sample.txt"
RESULTS: list[tuple[str, str, str]] = []


def report(name: str, status: str, detail: str) -> None:
    RESULTS.append((name, status, detail))
    print(f"{status:4} {name:12} {detail}", flush=True)


def config(work: Path, name: str, **overrides):
    from aios.config.training import TrainingConfig

    settings = dict(model=str(TOKENIZER), dataset_file=str(DATASET), max_seq_len=128, dataset_chunk_size=256,
                    data_cache_dir=str(work / "data"), hidden_size=256, num_heads=4, expansion=2.0, h_layers=2,
                    l_layers=2, h_cycles=2, l_cycles=2, halt_max_steps=4, batch_size=8, steps=3, lr=1e-3,
                    warmup_steps=0, eval_every=0, eval_batches=1, checkpoint_every=0, amp=False,
                    progress=False, bundle_dir=str(work / "brains"), brain_name=name, device="cuda",
                    launcher="local", iterate=True)
    settings.update(overrides)
    return TrainingConfig(**settings)


def trainer(work: Path, name: str, **overrides):
    import torch

    from aios.train.loop import Trainer
    from aios.train.session import LocalSession

    cfg = config(work, name, **overrides)
    session = LocalSession(work / f"checkpoints-{name}", device=torch.device("cuda"), keep_checkpoints=1,
                           resume=False)
    return Trainer(cfg, session)


def steps(t, n: int = 3) -> list[float]:
    losses = []
    for _ in range(n):
        record = t.train_step()
        if not isinstance(record, dict):
            raise RuntimeError(f"train_step returned {record!r}")
        losses.append(record["loss"])
    return losses


def check_flash_attn(work: Path) -> str:
    import torch

    from aios.models.hrm_act_v1 import Attention, HRMACTv1Config, flash_attn_available

    if not flash_attn_available():
        return "SKIP:flash-attn is not installed"
    worst = []
    for causal, window in ((True, None), (True, 16), (False, None)):
        cfg = HRMACTv1Config(vocab_size=64, seq_len=128, hidden_size=256, num_heads=4, expansion=2.0, H_layers=1,
                             L_layers=1, H_cycles=1, L_cycles=1, causal=causal, window_size=window)
        torch.manual_seed(0)
        attn = Attention(cfg).cuda().to(torch.bfloat16)
        x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
        attn.use_flash = False
        sdpa = attn(x, None).float()
        attn.use_flash = True
        flash = attn(x, None).float()
        diff = (flash - sdpa).abs().max().item()
        worst.append(diff)
        if not diff < 2e-2:
            raise AssertionError(f"causal={causal} window={window}: max |flash - sdpa| = {diff:.3g}")
    return f"max |flash - sdpa| {max(worst):.2g} (causal, window 16, non-causal; bf16)"


def check_amp(work: Path, dtype: str) -> str:
    import math

    t = trainer(work, f"amp-{dtype}", amp=True, amp_dtype=dtype)
    losses = steps(t)
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"losses {losses}")
    if dtype == "fp16" and t.scaler is None:
        raise AssertionError("fp16 autocast without a GradScaler")
    scale = f", GradScaler scale {t.scaler.get_scale():.0f}" if t.scaler is not None else ""
    return f"autocast {t.amp_dtype}, losses {', '.join(f'{x:.3f}' for x in losses)}{scale}"


def check_8bit(work: Path) -> str:
    import torch

    t = trainer(work, "adamw-8bit", use_8bit_optimizer=True)
    if t.optimizer_kind != "adamw-8bit":
        return "SKIP:bitsandbytes is not installed"
    losses = steps(t)
    moments = [s.get("state1") for s in t.optimizer.state.values()]
    one_byte = sum(m is not None and m.dtype == torch.uint8 for m in moments)
    if not one_byte:
        raise AssertionError("no one-byte moments in the optimizer state")
    return f"{type(t.optimizer).__name__}, {one_byte} tensors with uint8 moments, losses {losses[0]:.3f} -> {losses[-1]:.3f}"


def check_oom(work: Path) -> str:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    fraction = min(0.5, 3 * 2**30 / total)  # about 3 GiB: the model fits, a micro-batch of 256 x 512 does not
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        t = trainer(work, "oom", batch_size=256, max_seq_len=512, hidden_size=512, num_heads=8)
        record = t.train_step()
        if not isinstance(record, dict):
            raise AssertionError(f"train_step returned {record!r}")
        if t.micro_batch >= 256:
            return f"SKIP:no OOM at micro-batch 256 within {fraction * total / 2**30:.1f} GiB"
        return f"OOM at micro-batch 256 within {fraction * total / 2**30:.1f} GiB: step done at {t.micro_batch} x {t.grad_accum}"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def check_ddp(work: Path) -> str:
    import torch

    from aios.train import launch

    if torch.cuda.device_count() < 2:
        return f"SKIP:{torch.cuda.device_count()} GPU visible, 2 needed"
    result = launch(config(work, "ddp", launcher="ray", world_size="2", iterate=False))
    return f"2 workers on NCCL: step {result.step}, {result.reason}"


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        for name in ("cuda", "flash-attn", "amp-bf16", "amp-fp16", "adamw-8bit", "oom-backoff", "ddp-nccl"):
            report(name, "SKIP", "CUDA is not available")
        return 0
    report("cuda", "PASS", f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}")
    checks = [("flash-attn", check_flash_attn), ("amp-bf16", lambda w: check_amp(w, "bf16")),
              ("amp-fp16", lambda w: check_amp(w, "fp16")), ("adamw-8bit", check_8bit),
              ("oom-backoff", check_oom), ("ddp-nccl", check_ddp)]
    with tempfile.TemporaryDirectory(prefix="aios-gpu-check-") as tmp:
        for name, check in checks:
            try:
                detail = check(Path(tmp))
            except Exception as exc:  # noqa: BLE001 - one line per check, the next one still runs
                report(name, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                traceback.print_exc(file=sys.stderr)
                continue
            if detail.startswith("SKIP:"):
                report(name, "SKIP", detail[5:])
            else:
                report(name, "PASS", detail)
    return 1 if any(status == "FAIL" for _, status, _ in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
