"""Experts: one more expert in every MoE layer of a trained (frozen) base brain, trained on a domain.

    <experts-dir>/<expert-id>/
      expert.safetensors       the added tensors of every MoE layer: added_gate_up (A, D, 2I), added_down
                               (A, I, D), added_router (A, D) (A = 1), by parameter name
      expert.json              id, the base brain (name, sha256 of its model.safetensors, model config),
                               dataset fingerprints, steps, and the final eval loss of the base alone vs
                               base + expert on the expert's eval data
      training_args.json, metadata.json, metrics.jsonl, chunk_tracker_state.json, checkpoints/  (as a brain's)

`aios hrm-hf train-actv1 --expert-id ID --base-brain NAME --dataset-file ...` trains one (the Trainer's own
loop, sampler, checkpoints and resume; only the new parameters require grad, so the optimizer never sees the
base); `generate` / `eval --experts ID[,ID]` attach them. An expert only attaches to the brain it was made
for: the sha256 of the base's model.safetensors must match.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from aios.atomic import atomic_write, atomic_write_json
from aios.bundle import BrainBundle
from aios.errors import AiosError
from aios.hashing import sha256_file
from aios.paths import CONFIG_NAME, WEIGHTS_NAME

if TYPE_CHECKING:
    import torch

    from aios.config import TrainingConfig
    from aios.models.hrm_act_v1 import HRMACTv1

EXPERT_WEIGHTS = "expert.safetensors"
EXPERT_MANIFEST = "expert.json"
FORMAT = 1


class ExpertBundle(BrainBundle):
    """An expert's directory: the Trainer writes it as it writes a brain bundle, but the weights are the
    added experts alone (expert.safetensors + expert.json) and there is no tokenizer (the base's is used)."""

    kind = "expert"

    def has_weights(self) -> bool:
        return (self.root / EXPERT_WEIGHTS).is_file()

    def write_expert(self, model: HRMACTv1, manifest: dict) -> None:
        from safetensors.torch import save_file

        from aios.hashing import tensors_digest
        from aios.models.hrm_act_v1 import DIGEST_KEY

        state = {k: v.detach().float().cpu().contiguous() for k, v in model.added_expert_state().items()}
        digest = tensors_digest(state)
        atomic_write(self.root / EXPERT_WEIGHTS,
                     lambda path: save_file(state, path, metadata={"format": "pt", DIGEST_KEY: digest}))
        atomic_write_json(self.root / EXPERT_MANIFEST, {**manifest, "format": FORMAT, "weights_sha256": digest})

    def manifest(self) -> dict:
        path = self.root / EXPERT_MANIFEST
        if not path.is_file():
            raise AiosError(f"no expert '{self.name}' in {self.root.parent} ({EXPERT_MANIFEST} is missing): pass "
                            f"the id of a trained expert (and --experts-dir where it lives), or train it with "
                            f"`aios hrm-hf train-actv1 --expert-id {self.name} --base-brain NAME ...`")
        data = self._read_json(EXPERT_MANIFEST)
        if data.get("format") != FORMAT or not isinstance(data.get("base"), dict):
            raise AiosError(f"{path} is not an expert manifest this aios reads (format {data.get('format')!r}): "
                            f"train the expert again")
        return data

    def load_tensors(self) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from aios.hashing import tensors_digest
        from aios.models.hrm_act_v1 import DIGEST_KEY

        path = self.root / EXPERT_WEIGHTS
        try:
            state = load_file(path)
            with safe_open(path, framework="pt") as f:
                recorded = (f.metadata() or {}).get(DIGEST_KEY)
        except (OSError, ValueError, RuntimeError) as exc:
            raise AiosError(f"expert '{self.name}': {path} cannot be read ({str(exc).splitlines()[0]}): train the "
                            f"expert again (--resume continues it from its checkpoints)") from None
        if recorded != tensors_digest(state):
            raise AiosError(f"expert '{self.name}': {path} does not match the checksum in its header (a torn or "
                            f"altered write): train the expert again (--resume continues it from its checkpoints)")
        return state


def expert_bundle(config: TrainingConfig) -> ExpertBundle:
    return ExpertBundle(Path(config.experts_dir) / config.expert_id)


def base_fingerprint(base: BrainBundle) -> str:
    """What identifies a base brain: the sha256 of its model.safetensors."""
    return sha256_file(base.root / WEIGHTS_NAME)


def open_base(config: TrainingConfig) -> BrainBundle:
    """The --base-brain bundle; AiosError (one line, with the fix) when it is missing or not a MoE brain."""
    try:
        base = BrainBundle.open(config.base_brain, config.bundle_dir)
    except AiosError as exc:
        raise AiosError(f"--base-brain: {exc}") from None
    model = json.loads((base.root / CONFIG_NAME).read_text())
    if not isinstance(model, dict) or not model.get("use_moe"):
        raise AiosError(f"--base-brain {config.base_brain}: brain '{base.name}' has no mixture-of-experts layers "
                        f"(it was trained without --use-moe), so there is no router to add an expert to: pass a "
                        f"brain trained with --use-moe")
    return base


def _model_settings() -> dict[str, str]:
    """TrainingConfig field -> HRMACTv1Config field, for every setting that decides the model."""
    from aios.config import TrainingConfig, field_group
    from aios.models.hrm_act_v1 import HRMACTv1Config
    from aios.train.loop import _MODEL_FIELD_OF

    by_lower = {f.name.lower(): f.name for f in dataclasses.fields(HRMACTv1Config)}
    return {name: _MODEL_FIELD_OF.get(name) or by_lower[name] for name in TrainingConfig.model_fields
            if field_group(name) == "Model" or name in _MODEL_FIELD_OF}


def expert_run_config(config: TrainingConfig) -> TrainingConfig:
    """The config an expert run trains with (`launch` calls this before anything is written): the base
    brain checked, its model settings and its tokenizer taken. A model flag that disagrees with the base is
    refused (the expert must fit the base), one left at its default takes the base's value."""
    from aios.config import TrainingConfig
    from aios.config.training import flag_name
    from aios.models.hrm_act_v1 import HRMACTv1Config
    from aios.storage import is_remote
    from aios.tokenizers import load_tokenizer, tokenizer_fingerprint

    if is_remote(config.bundle_dir) or is_remote(config.experts_dir):
        raise AiosError("--expert-id trains from a local base brain into a local --experts-dir: pull the base "
                        "first (`aios brains pull`) and pass a local --bundle-dir and --experts-dir")
    if config.storage_path:
        raise AiosError("--storage-path is not used by expert training: the expert's checkpoints live in "
                        "<experts-dir>/<expert-id>/checkpoints/; drop --storage-path")
    base = open_base(config)
    try:
        model = HRMACTv1Config.from_dict(json.loads((base.root / CONFIG_NAME).read_text()))
    except (ValueError, TypeError) as exc:
        raise AiosError(f"--base-brain {config.base_brain}: its config.json is unusable ({exc}): pass a brain "
                        f"trained by aios") from None
    defaults = TrainingConfig.model_fields
    changes = {}
    for name, model_name in _model_settings().items():
        theirs, ours = getattr(model, model_name), getattr(config, name)
        if name == "window_size" and not ours:
            ours = None
        if ours != theirs and ours != defaults[name].default:
            raise AiosError(f"{flag_name(name)} {ours} differs from base brain '{base.name}' ({theirs}): an expert "
                            f"takes the base's model settings; drop {flag_name(name)}")
        changes[name] = theirs
    if config.model != defaults["model"].default and Path(config.model).resolve() != base.root.resolve():
        if tokenizer_fingerprint(load_tokenizer(config.model)) != tokenizer_fingerprint(base.load_tokenizer()):
            raise AiosError(f"--model {config.model} is not the tokenizer of base brain '{base.name}': an expert "
                            f"uses the base's tokenizer; drop --model")
    return config.replace(model=str(base.root), **changes)


@dataclasses.dataclass
class ExpertRun:
    """What the Trainer needs in expert mode: the base bundle, its fingerprint, and the expert's id."""

    expert_id: str
    base: BrainBundle
    fingerprint: str

    @classmethod
    def of(cls, config: TrainingConfig) -> ExpertRun | None:
        if config.expert_id is None:
            return None
        base = open_base(config)
        return cls(config.expert_id, base, base_fingerprint(base))

    def identity(self) -> dict:
        """Saved in every checkpoint's state.json and checked on resume."""
        return {"expert_id": self.expert_id, "base_fingerprint": self.fingerprint}

    def prepare(self, model: HRMACTv1) -> None:
        """The base brain's weights into `model` (built with the base's config), then one new expert per MoE
        layer (initialised from torch's generator, seeded by the caller), the only parameters that train."""
        base_model = self.base.load_model()
        if base_model.config != model.config:
            raise AiosError(f"base brain '{self.base.name}' has another model config than this run: resume the "
                            f"expert with the base it was started on")
        if base_fingerprint(self.base) != self.fingerprint:
            raise AiosError(f"base brain '{self.base.name}' changed while the expert run started: wait for the "
                            f"run that writes it to finish, then start again")
        model.load_state_dict(base_model.state_dict())
        model.add_experts(1)
        model.freeze_all_but_added_experts()

    def manifest(self, model: HRMACTv1, **fields) -> dict:
        return {"id": self.expert_id,
                "base": {"brain": self.base.name, "path": str(self.base.root), "fingerprint": self.fingerprint,
                         "model_config": model.config.to_dict()},
                "experts_per_layer": 1, "layers": [name for name, _ in model.moe_layers()],
                "parameters": sum(t.numel() for t in model.added_expert_state().values()), **fields}


def parse_expert_ids(text: str | None) -> list[str]:
    """`--experts a,b` -> ["a", "b"]; AiosError for an empty or repeated id."""
    if text is None:
        return []
    ids = [part.strip() for part in text.split(",")]
    if not all(ids):
        raise AiosError(f"--experts {text!r} has an empty id: pass ID or ID,ID (e.g. --experts legal-v1)")
    if len(set(ids)) != len(ids):
        raise AiosError(f"--experts {text!r} names an expert twice: list each expert once")
    return ids


def attach_experts(model: HRMACTv1, base: BrainBundle, ids: list[str], experts_dir: str | Path) -> list[dict]:
    """Add the experts `ids` (trained for `base`) to every MoE layer of `model`, in that order; their manifests.

    Refused in one line when the brain has no MoE layers, an expert is missing, or one was made for another
    base brain (its recorded sha256 of the base's model.safetensors differs)."""
    import torch

    if not ids:
        return []
    if not model.moe_layers():
        raise AiosError(f"--experts: brain '{base.name}' has no mixture-of-experts layers (trained without "
                        f"--use-moe), so no expert attaches to it: drop --experts or pass the MoE brain the "
                        f"experts were trained for")
    fingerprint = base_fingerprint(base)
    manifests, states = [], []
    for expert_id in ids:
        expert = ExpertBundle(Path(experts_dir) / expert_id)
        manifest = expert.manifest()
        theirs = manifest["base"].get("fingerprint")
        if theirs != fingerprint:
            raise AiosError(f"expert '{expert_id}' was trained for another base brain ('{manifest['base'].get('brain')}', "
                            f"model.safetensors sha256 {str(theirs)[:12]}), not brain '{base.name}' "
                            f"({fingerprint[:12]}): attach it to the brain it was made for, or train an expert for "
                            f"this brain with --expert-id ID --base-brain {base.name}")
        states.append(expert.load_tensors())
        manifests.append(manifest)
    # name -> the base tensor whose shape past the first dimension each added tensor must have
    expected = {}
    for name, layer in model.moe_layers():
        expected.update({f"{name}.added_gate_up": layer.gate_up, f"{name}.added_down": layer.down,
                         f"{name}.added_router": layer.router.weight})
    counts = []
    for expert_id, state in zip(ids, states, strict=True):
        sizes = {state[k].shape[0] for k in state}
        if (set(state) != set(expected) or len(sizes) != 1
                or any(state[k].shape[1:] != expected[k].shape[1:] for k in expected)):
            raise AiosError(f"expert '{expert_id}' does not fit brain '{base.name}' (other layers or shapes): "
                            f"train it again with --base-brain {base.name}")
        counts.append(sizes.pop())
    model.add_experts(sum(counts))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in expected:
            params[key].copy_(torch.cat([state[key] for state in states]).to(params[key].device, params[key].dtype))
    return manifests
