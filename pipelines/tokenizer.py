"""The run's tokenizer (a Hugging Face ``tokenizer.json``, or a tokenizer directory holding one, read with the
``tokenizers`` package, offline): decode token ids to text in batches, and its EOS and pad ids.

* :func:`decode_tokens`: an Arrow ``list<int>`` column -> an Arrow string column, through
  ``Tokenizer.decode_batch`` (Rust, multi-threaded), special tokens skipped (they are markup, not
  text: an ``<|endoftext|>`` between packed documents would count as punctuation). Each row decodes at
  most its first ``max_tokens`` tokens (default ``MAX_DOC_CHARS``: the text signals read at most that
  many characters, and a token is at least one character in practice). Ids outside the vocabulary
  are a one-line error (the wrong tokenizer, or token files read with the wrong dtype).
* :func:`special_ids`: EOS and pad from the directory's ``tokenizer_config.json`` /
  ``special_tokens_map.json`` (``eos_token`` / ``pad_token``, a string or ``{"content": ...}``) or
  ``config.json`` (``eos_token_id`` / ``pad_token_id``); otherwise from the special tokens of
  ``tokenizer.json`` by name (:data:`EOS_NAMES`, :data:`PAD_NAMES`, first match in that order). A pad
  equal to the EOS (a fine-tuning convention: ``pad_token = eos_token``) is no pad.

Decode cost is measured in ``benchmarks/auditors.py`` (tokens/s of ``decode_tokens``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError

log = logging.getLogger(__name__)

#: the text signals read at most this many characters of a document (``auditors.text.MAX_DOC_CHARS``)
MAX_DECODE_TOKENS = 100_000

#: special tokens that end a document, by tokenizer family (GPT-2 / NeoX / OLMo / Qwen; Llama-3; Llama-2 /
#: Mistral / T5; Gemma)
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|end|>")
#: padding tokens by name
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>", "<|PAD|>")


def tokenizer_file(path) -> str:
    p = str(path)
    if os.path.isdir(p):
        p = os.path.join(p, "tokenizer.json")
    return p


def load_tokenizer(path):
    """Load a ``tokenizer.json`` (the file, or a directory holding one). Offline: never downloads."""
    from tokenizers import Tokenizer

    p = tokenizer_file(path)
    if "://" in p:
        raise UserError(f"{p}: the tokenizer is read from a local path only (copy the tokenizer.json next to the job "
                        f"and give its path)")
    if not os.path.exists(p):
        raise UserError(f"{p}: tokenizer file not found (expected a Hugging Face tokenizer.json or a directory "
                        f"holding one)")
    from spike_audit.pipelines.files import check_regular

    check_regular(p, "tokenizer.json")  # a FIFO or a device is refused, never read
    try:
        return Tokenizer.from_file(p)
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"{p}: not a valid tokenizer.json ({str(err).splitlines()[0] if str(err) else err})") from None


def _check_vocab(tok, values: np.ndarray, what: str = "") -> None:
    if not len(values):
        return
    vocab = tok.get_vocab_size(with_added_tokens=True)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise UserError(f"{what}token id {bad} is outside the tokenizer's vocabulary of {vocab} (is this the "
                        f"run's tokenizer, and are the token files read with the right dtype?)")


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


def decode_tokens(tok, tokens: pa.Array, *, max_tokens: int = MAX_DECODE_TOKENS, skip_special_tokens: bool = True,
                  source: str = "") -> pa.Array:
    """An Arrow ``list<int>`` column decoded to an Arrow string column (null where the list is null), each row
    cut to its first ``max_tokens`` tokens, in one ``decode_batch`` call."""
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    n = len(tokens)
    if n == 0:
        return pa.array([], pa.string())
    valid = np.asarray(tokens.is_valid().to_numpy(zero_copy_only=False), bool)
    filled = tokens.fill_null(pa.scalar([], type=tokens.type)) if tokens.null_count else tokens
    offsets = np.asarray(filled.offsets, np.int64)
    values = filled.values.to_numpy(zero_copy_only=False)
    start, end = offsets[:-1], np.minimum(offsets[1:], offsets[:-1] + max_tokens)
    # the ids each row decodes, as one flat array (rows cut to max_tokens), then split into Python lists
    lengths = end - start
    keep = np.repeat(start - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(int(lengths.sum()))
    ids = values[keep].astype(np.int64, copy=False)
    _check_vocab(tok, ids, f"{source}: " if source else "")
    cuts = np.cumsum(lengths)[:-1]
    lists = [a.tolist() for a in np.split(ids, cuts)]
    texts = tok.decode_batch(lists, skip_special_tokens=skip_special_tokens)
    return pa.array(texts, pa.string(), mask=~valid)


@dataclass(frozen=True)
class SpecialIds:
    eos_id: int | None
    pad_id: int | None
    eos_token: str | None = None
    pad_token: str | None = None
    source: str = ""

    def to_meta(self) -> dict:
        return {"eos_id": self.eos_id, "eos_token": self.eos_token, "pad_id": self.pad_id,
                "pad_token": self.pad_token, "source": self.source}


def _token_content(v):
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def special_ids(path, tok=None) -> SpecialIds:
    """The tokenizer's EOS and pad ids (see the module docstring for where they are looked up)."""
    tok = tok if tok is not None else load_tokenizer(path)
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = pad = None
    eos_tok = pad_tok = None
    source = ""
    p = str(path)
    if os.path.isdir(p):
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            d = _read_json(os.path.join(p, name))
            e, q = _token_content(d.get("eos_token")), _token_content(d.get("pad_token"))
            if eos is None and e in vocab:
                eos, eos_tok, source = vocab[e], e, name
            if pad is None and q in vocab:
                pad, pad_tok = vocab[q], q
        cfg = _read_json(os.path.join(p, "config.json"))
        for key, cur in (("eos_token_id", "eos"), ("pad_token_id", "pad")):
            v = cfg.get(key)
            v = v[0] if isinstance(v, list) and v else v
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < tok.get_vocab_size(True):
                if cur == "eos" and eos is None:
                    eos, eos_tok, source = v, tok.id_to_token(v), "config.json"
                if cur == "pad" and pad is None:
                    pad, pad_tok = v, tok.id_to_token(v)
    specials = {t.content for t in _added_special(tok)}
    if eos is None:
        for name in EOS_NAMES:
            if name in vocab and (name in specials or not specials):
                eos, eos_tok, source = vocab[name], name, "tokenizer.json special tokens"
                break
    if pad is None:
        for name in PAD_NAMES:
            if name in vocab and (name in specials or not specials):
                pad, pad_tok = vocab[name], name
                break
    if pad is not None and pad == eos:
        pad, pad_tok = None, None
    return SpecialIds(eos, pad, eos_tok, pad_tok, source)


_OTHER_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token")


def megatron_pad_id(path) -> int | None:
    """The pad id megatron-core's GPTDataset feeds as 0: the tokenizer's pad, unless it is the same token as
    another special token of the tokenizer (megatron-core then resets it to -1, "no pad": nothing is changed)."""
    sp = special_ids(path)
    if sp.pad_id is None:
        return None
    p = str(path)
    if os.path.isdir(p):
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            d = _read_json(os.path.join(p, name))
            others = {_token_content(d.get(k)) for k in _OTHER_SPECIAL_KEYS}
            extra = d.get("additional_special_tokens")
            others |= {_token_content(t) for t in extra} if isinstance(extra, list) else set()
            if sp.pad_token in others:
                log.info("%s: the pad token %r is also another special token: megatron-core feeds no pad", p,
                         sp.pad_token)
                return None
    return sp.pad_id


def _added_special(tok):
    try:
        return [t for t in tok.get_added_tokens_decoder().values() if getattr(t, "special", False)]
    except AttributeError:  # tokenizers < 0.14
        return []


def resolve_special(tokenizer, eos_id: int | None = None, pad_id: int | None = None):
    """``(eos_id, pad_id, what the tokenizer says or None)``: the ids given, else the tokenizer's."""
    if not tokenizer:
        return eos_id, pad_id, None
    sp = special_ids(tokenizer)
    if eos_id is None and sp.eos_id is not None:
        eos_id = sp.eos_id
        log.info("EOS id %d (%s) from %s", eos_id, sp.eos_token, sp.source)
    if pad_id is None and sp.pad_id is not None:
        pad_id = sp.pad_id
        log.info("pad id %d (%s) from the tokenizer", pad_id, sp.pad_token)
    return eos_id, pad_id, sp.to_meta()
