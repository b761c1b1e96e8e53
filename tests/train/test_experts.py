"""Expert training (`--expert-id ID --base-brain NAME`) and attaching experts (`--experts ID[,ID]`), end to end.

One tiny MoE base brain is trained on Shakespeare; one expert for it on the GPL v3 text (training_data/domain,
a domain the base never saw). Every run here is a real `launch` (the local launcher runs the Trainer the Ray
workers run).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aios.bundle import BrainBundle
from aios.cli.main import main as aios_main
from aios.config import TrainingConfig
from aios.errors import AiosError
from aios.experts import attach_experts
from aios.train import launch
from aios.train.loop import TrainCallbacks

REPO = Path(__file__).resolve().parents[2]
DOMAIN = REPO / "training_data" / "domain" / "gpl-3.0.txt"
# M = 1: training and evaluation both run one ACT segment (with M > 1 the frozen Q-head of this barely trained
# base halts training rows after one segment while evaluation runs all M, and the tiny expert gains less).
MODEL = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, halt_max_steps=1)
STEPS = 30


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """Every file under root with its sha256 (what a refused run must leave as it was)."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(module_make_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    base_config = module_make_config(brain_name="base", steps=STEPS, lr=1e-2, batch_size=8, **MODEL)
    launch(base_config)
    base = Path(base_config.bundle_dir) / "base"
    base_files = tree(base)

    def expert_config(expert_id: str, **overrides) -> TrainingConfig:
        settings = dict(expert_id=expert_id, base_brain="base", experts_dir=str(out / "experts"),
                        dataset_file=str(DOMAIN), steps=STEPS, lr=1e-2, batch_size=8, checkpoint_every=15, **MODEL)
        return module_make_config(**{**settings, **overrides})

    result = launch(expert_config("gpl"))
    return {"base": base, "base_files": base_files, "bundle_dir": Path(base_config.bundle_dir),
            "experts_dir": out / "experts", "expert": out / "experts" / "gpl", "result": result,
            "expert_config": expert_config, "cache": base_config.data_cache_dir}


def test_expert_training_leaves_the_base_bit_identical_and_writes_only_the_expert_dir(runs):
    assert tree(runs["base"]) == runs["base_files"]  # every file of the base, byte for byte
    expert = runs["expert"]
    assert runs["result"].reason == "steps" and runs["result"].bundle == expert
    names = {p.name for p in expert.iterdir()}
    assert {"expert.safetensors", "expert.json", "training_args.json", "metadata.json", "metrics.jsonl",
            "checkpoints"} <= names
    assert "model.safetensors" not in names and "tokenizer.json" not in names
    tensors = load_file(expert / "expert.safetensors")
    base_model = BrainBundle(runs["base"]).load_model()
    layers = [name for name, _ in base_model.moe_layers()]
    assert sorted(tensors) == sorted(f"{layer}.{p}" for layer in layers
                                     for p in ("added_gate_up", "added_down", "added_router"))
    D, inner = 32, base_model.config.intermediate_size
    assert tensors[f"{layers[0]}.added_gate_up"].shape == (1, D, 2 * inner)
    assert tensors[f"{layers[0]}.added_down"].shape == (1, inner, D)
    assert tensors[f"{layers[0]}.added_router"].shape == (1, D)
    # The trained model (the expert's newest checkpoint holds all of it): base weights bit for bit the base's.
    trained = load_file(sorted((expert / "checkpoints").glob("step-*"))[-1] / "model.safetensors")
    base_state = base_model.state_dict()
    assert set(trained) == set(base_state) | set(tensors)
    changed = [k for k in base_state if not torch.equal(trained[k], base_state[k])]
    assert changed == []
    assert all(torch.equal(trained[k], tensors[k]) for k in tensors)
    manifest = json.loads((expert / "expert.json").read_text())
    assert manifest["base"]["fingerprint"] == sha256(runs["base"] / "model.safetensors")
    assert manifest["base"]["brain"] == "base" and manifest["steps"] == STEPS
    prepared = json.loads((expert / "metadata.json").read_text())["datasets"]["train"]
    assert manifest["dataset"] == {"source": str(DOMAIN), "fingerprint": prepared["fingerprint"]}
    assert manifest["parameters"] == sum(t.numel() for t in tensors.values())


def test_the_expert_lowers_the_loss_on_its_domain(runs):
    metrics = json.loads((runs["expert"] / "expert.json").read_text())["metrics"]
    assert metrics["eval_step"] == STEPS
    assert metrics["eval_loss_with_expert"] == pytest.approx(runs["result"].final_eval["loss"])
    # Measured here: 7.154 -> 7.080 nats/token on the held-out tail of the GPL text (deterministic on CPU).
    assert metrics["eval_loss_with_expert"] < metrics["eval_loss_base"] - 0.03, metrics
    # The same through `aios hrm-hf eval`: the base alone, and with --experts.
    common = ["hrm-hf", "eval", "--brain", str(runs["base"]), "--eval-file", str(DOMAIN), "--eval-batches", "4",
              "--batch-size", "8", "--data-cache-dir", str(runs["cache"]), "--device", "cpu"]
    alone, with_expert = (_eval(common), _eval([*common, "--experts", "gpl", "--experts-dir", str(runs["experts_dir"])]))
    assert alone["experts"] == [] and with_expert["experts"] == ["gpl"]
    assert with_expert["tokens"] == alone["tokens"] > 0
    assert with_expert["loss"] < alone["loss"] - 0.03, (alone["loss"], with_expert["loss"])


def _eval(args: list[str]) -> dict:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert aios_main(args) == 0
    return json.loads(buffer.getvalue())


def test_generate_takes_experts_and_the_frozen_base_computes_as_before_without_them(runs, capsys):
    base = BrainBundle(runs["base"])
    args = ["hrm-hf", "generate", "--brain", str(runs["base"]), "--prompt", "This License", "--max-new-tokens",
            "6", "--temperature", "0", "--device", "cpu"]
    assert aios_main([*args, "--experts", "gpl", "--experts-dir", str(runs["experts_dir"])]) == 0
    assert capsys.readouterr().out.startswith("This License")
    # Attached, then switched off: exactly the base brain's outputs (the base weights are untouched).
    plain, attached = base.load_model(), base.load_model()
    attach_experts(attached, base, ["gpl"], runs["experts_dir"])
    batch = {"inputs": torch.arange(16)[None] % 50, "labels": torch.zeros(1, 16, dtype=torch.long)}
    plain.eval(), attached.eval()
    with torch.no_grad(), attached.added_experts_off():
        expected = plain(plain.initial_carry(batch), batch)[1]["logits"]
        assert torch.equal(attached(attached.initial_carry(batch), batch)[1]["logits"], expected)
    with torch.no_grad():
        assert not torch.equal(attached(attached.initial_carry(batch), batch)[1]["logits"], expected)


def another_base(runs, other: Path) -> Path:
    """A copy of the base brain with one weight changed: the same shape, another fingerprint."""
    shutil.copytree(runs["base"], other, ignore=shutil.ignore_patterns("checkpoints"))
    model = BrainBundle(other).load_model()
    with torch.no_grad():
        model.inner.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(other)
    return other


def test_an_expert_made_for_another_base_brain_is_refused(runs, tmp_path, capsys):
    other = another_base(runs, tmp_path / "other")
    with pytest.raises(AiosError, match=r"^expert 'gpl' was trained for another base brain .*: attach it to the "
                                        r"brain it was made for, or train an expert for this brain with --expert-id"):
        attach_experts(BrainBundle(other).load_model(), BrainBundle(other), ["gpl"], runs["experts_dir"])
    code = aios_main(["hrm-hf", "eval", "--brain", str(other), "--eval-file", str(DOMAIN), "--experts", "gpl",
                      "--experts-dir", str(runs["experts_dir"]), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and "was trained for another base brain" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(AiosError, match=r"no expert 'nope' in .*train-actv1 --expert-id nope --base-brain"):
        attach_experts(BrainBundle(other).load_model(), BrainBundle(other), ["nope"], runs["experts_dir"])


class StopAt(TrainCallbacks):
    def __init__(self, step: int, stop_file: Path):
        self.step, self.stop_file = step, stop_file

    def after_step(self, trainer, record):
        if record["step"] == self.step:
            self.stop_file.write_text("stop")


def test_resume_continues_the_expert_bit_for_bit(runs, tmp_path):
    config = runs["expert_config"]
    stop = tmp_path / "STOP"
    first = launch(config("resumed", stop_file=str(stop)), callbacks=StopAt(10, stop))
    assert first.reason == "stop" and first.step == 10
    with pytest.raises(AiosError, match=r"^expert 'resumed' already exists in .*: pass --resume to continue it"):
        launch(config("resumed"))
    second = launch(config("resumed", resume=True))
    assert second.step == STEPS and second.trained_steps == STEPS - 10
    straight = load_file(runs["expert"] / "expert.safetensors")
    resumed = load_file(runs["experts_dir"] / "resumed" / "expert.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert tree(runs["base"]) == runs["base_files"]


def test_resuming_an_expert_on_another_base_is_refused_and_changes_nothing(runs, tmp_path):
    other = another_base(runs, tmp_path / "other")
    experts = tmp_path / "experts"
    shutil.copytree(runs["expert"], experts / "gpl")
    before = tree(experts)
    config = runs["expert_config"]("gpl", base_brain=str(other), experts_dir=str(experts), steps=STEPS + 5,
                                   resume=True)
    with pytest.raises(AiosError, match=r"^checkpoint .* is not of this expert run .*: resume it with the base brain "
                                        r"it was trained on, or choose a new --expert-id$"):
        launch(config)
    assert tree(experts) == before


def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, module_make_config):
    config = runs["expert_config"]
    before = tree(runs["experts_dir"])
    settings = config("x").to_dict()  # what the CLI and the presets validate (TrainingConfig.from_dict)
    with pytest.raises(AiosError, match=r"^--expert-id x needs --base-brain NAME: .*add --base-brain$"):
        TrainingConfig.from_dict({**settings, "base_brain": None})
    with pytest.raises(AiosError, match=r"^--base-brain has no effect without --expert-id"):
        TrainingConfig.from_dict({**settings, "expert_id": None})
    with pytest.raises(AiosError, match=r"^--expert-id '../escape' is not a single directory name"):
        TrainingConfig.from_dict({**settings, "expert_id": "../escape"})
    with pytest.raises(AiosError, match=r"^--base-brain: 'missing' is not a brain bundle"):
        launch(config("x", base_brain="missing"))
    plain = tmp_path / "plain"  # a brain without MoE layers (config.json is what says so)
    shutil.copytree(runs["base"], plain, ignore=shutil.ignore_patterns("checkpoints"))
    settings = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**settings, "use_moe": False}))
    with pytest.raises(AiosError, match=r"has no mixture-of-experts layers .*: pass a brain trained with --use-moe"):
        launch(config("x", base_brain=str(plain)))
    with pytest.raises(AiosError, match=r"^--hidden-size 64 differs from base brain 'base' \(32\): .*drop --hidden-size"):
        launch(config("x", hidden_size=64))
    with pytest.raises(AiosError, match=r"^expert 'gpl' already exists in .*: pass --resume"):
        launch(config("gpl"))
    assert tree(runs["experts_dir"]) == before and not (runs["experts_dir"] / "x").exists()
    assert tree(runs["base"]) == runs["base_files"]


def test_an_added_expert_computes_what_the_same_expert_as_a_base_expert_computes():
    """E base experts + 1 added = a layer of E + 1 base experts with the same weights (routing, capacity and
    the load-balancing loss over all of them); switched off, exactly the E-expert layer."""
    from aios.models.hrm_act_v1 import HRMACTv1Config, MixtureOfExperts

    def layer(experts: int) -> MixtureOfExperts:
        return MixtureOfExperts(HRMACTv1Config(vocab_size=16, seq_len=8, hidden_size=32, num_heads=2, use_moe=True,
                                               num_experts=experts, num_experts_per_tok=2,
                                               moe_capacity_factor=0.75))

    torch.manual_seed(0)
    wide, narrow = layer(5), layer(4)
    with torch.no_grad():
        narrow.router.weight.copy_(wide.router.weight[:4])
        narrow.gate_up.copy_(wide.gate_up[:4])
        narrow.down.copy_(wide.down[:4])
    x = torch.randn(3, 8, 32)
    alone, alone_aux = narrow(x)
    narrow.add_experts(1)
    with torch.no_grad():
        narrow.added_router.copy_(wide.router.weight[4:])
        narrow.added_gate_up.copy_(wide.gate_up[4:])
        narrow.added_down.copy_(wide.down[4:])
    out, aux = narrow(x)
    expected, expected_aux = wide(x)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(aux, expected_aux, atol=1e-6)
    narrow.added_active = False
    off, off_aux = narrow(x)
    assert torch.equal(off, alone) and torch.equal(off_aux, alone_aux)
