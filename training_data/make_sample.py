"""Regenerate the shipped sample data from the shared Shakespeare corpus.

    python training_data/make_sample.py [--corpus ../shared/data/shakespeare_complete.txt] [--tokenizer]

Writes (atomically, byte-for-byte reproducible):
- training_data/curated_datasets/test_sample.txt: nine whole, contiguous works, from "A Lover's Complaint"
  to "Othello, the Moor of Venice" (about 1 MB).
- training_data/eval_test_dataset.txt: the opening of "The Tempest" (about 50 KB, cut at a blank line),
  a later part of the corpus that does not overlap the sample.
- with --tokenizer: training_data/tokenizers/shakespeare-bpe-2k/, a 2048-token byte-level BPE trained on
  the sample with aios.tokenizers.train_bpe_tokenizer (the CPU demo preset's tokenizer).

The corpus concatenates 41 texts; each title is glued to the last line of the text before it and followed
by "\\n\\nby William Shakespeare\\n", which is how the works are found here.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE.parent.parent / "shared" / "data" / "shakespeare_complete.txt"
SAMPLE_PATH = HERE / "curated_datasets" / "test_sample.txt"
EVAL_PATH = HERE / "eval_test_dataset.txt"
TOKENIZER_DIR = HERE / "tokenizers" / "shakespeare-bpe-2k"

SAMPLE_FIRST_WORK = "A LOVER'S COMPLAINT"
SAMPLE_LAST_WORK = "OTHELLO, THE MOOR OF VENICE"
EVAL_WORK = "THE TEMPEST"
EVAL_TARGET_BYTES = 50_000


def find_works(corpus: str) -> list[tuple[str, int, int]]:
    """(title, start, end) character offsets of every work in the corpus, in corpus order."""
    starts: list[tuple[str, int]] = []
    for match in re.finditer(r"\n\nby William Shakespeare\n", corpus):
        line_start = corpus.rfind("\n", 0, match.start()) + 1
        # The title is the upper-case tail of the line; "THE END" of the previous play may precede it.
        title = re.search(r"[A-Z][A-Z ,'-]*$", corpus[line_start : match.start()]).group(0)
        if title.startswith("THE END") and len(title) > len("THE END"):
            title = title[len("THE END") :]
        starts.append((title, match.start() - len(title)))
    ends = [start for _, start in starts[1:]] + [len(corpus)]
    return [(title, start, end) for (title, start), end in zip(starts, ends, strict=True)]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--tokenizer", action="store_true", help="also train tokenizers/shakespeare-bpe-2k")
    args = parser.parse_args(argv)

    corpus = args.corpus.read_text(encoding="utf-8")
    works = find_works(corpus)
    by_title = {title: (start, end) for title, start, end in works}
    titles = [title for title, _, _ in works]

    first, last = titles.index(SAMPLE_FIRST_WORK), titles.index(SAMPLE_LAST_WORK)
    sample_start, sample_end = by_title[SAMPLE_FIRST_WORK][0], by_title[SAMPLE_LAST_WORK][1]
    sample = corpus[sample_start:sample_end].rstrip() + "\n"

    eval_start, eval_end = by_title[EVAL_WORK]
    assert eval_start >= sample_end, "the evaluation text must come from outside the sample"
    cut = corpus.index("\n\n", eval_start + EVAL_TARGET_BYTES, eval_end)  # end at a paragraph break
    eval_text = corpus[eval_start:cut] + "\n"

    write_atomic(SAMPLE_PATH, sample)
    write_atomic(EVAL_PATH, eval_text)
    for path, start, end in ((SAMPLE_PATH, sample_start, sample_end), (EVAL_PATH, eval_start, cut)):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(
            f"{path.relative_to(HERE)}: {path.stat().st_size} bytes, corpus chars [{start}, {end}), "
            f"sha256 {digest}"
        )
    print("sample works:", "; ".join(titles[first : last + 1]))

    if args.tokenizer:
        sys.path.insert(0, str(HERE.parent))
        from aios.tokenizers import train_bpe_tokenizer

        out = train_bpe_tokenizer([SAMPLE_PATH], 2048, TOKENIZER_DIR)
        print(f"tokenizer: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
