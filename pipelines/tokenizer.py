"""Decode token ids with a Hugging Face ``tokenizer.json`` (via the ``tokenizers`` package)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from spike_audit.pipelines.errors import UserError


def load_tokenizer(path):
    """Load a ``tokenizer.json`` (the file, or a directory holding one). Offline: never downloads."""
    from tokenizers import Tokenizer

    p = str(path)
    if os.path.isdir(p):
        p = os.path.join(p, "tokenizer.json")
    if not os.path.exists(p):
        raise UserError(f"{p}: tokenizer file not found (expected a Hugging Face tokenizer.json)")
    try:
        return Tokenizer.from_file(p)
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"{p}: not a valid tokenizer.json ({str(err).splitlines()[0] if str(err) else err})") from None


def decode_batch(tok, sequences: Sequence[Sequence[int] | np.ndarray], skip_special_tokens: bool = False) -> list[str]:
    """Decode each token sequence to text (special tokens kept by default, so EOS/BOS show up).
    Ids outside the vocabulary raise a one-line :class:`UserError`."""
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
    vocab = tok.get_vocab_size(with_added_tokens=True)
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    bad = np.flatnonzero((flat < 0) | (flat >= vocab))
    if len(bad):
        row = int(np.searchsorted(np.cumsum([len(s) for s in seqs]), bad[0], side="right"))
        raise UserError(f"sequence {row}: token id {int(flat[bad[0]])} is outside the tokenizer's vocabulary "
                        f"of {vocab}")
    return tok.decode_batch([s.tolist() for s in seqs], skip_special_tokens=skip_special_tokens)
