"""Anomalous rows for the spike lab, each kind built from real material where there is some.

Every generator returns ``k`` token arrays. Lengths follow the run: in ``docs`` layout a planted row
takes a length drawn from the run's own natural row lengths, in ``packed`` layout exactly the
sequence length (only ``long_doc`` breaks the length on purpose). Text kinds are written as text and
tokenized with the run's tokenizer, so they look to the tool exactly as they would in a real corpus.
"""

from __future__ import annotations

import base64
import functools
import gettext
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab_corpus import EOS_ID, PAD_ID

log = logging.getLogger("spikelab.plant")

KINDS = {
    "random_tokens": "uniform random token ids (a corrupted or mis-tokenized shard)",
    "base64_hex": "base64 of compressed bytes and xxd hex dumps of binaries, as text",
    "numeric": "CSV tables of numbers, as text",
    "repeated_ngram": "a phrase of real text repeated to the row's end (the OLMo 2 failure)",
    "dup_in_batch": "exact copies of one document within the batch",
    "dup_copied": "rows copied one to one from rows consumed at another step of the run (a replay)",
    "near_dup": "copies of one document with ~6% of tokens substituted",
    "foreign_script": "Cyrillic / CJK / Arabic / Greek ... text from the machine's gettext catalogs",
    "eos_pad_flood": "rows that are mostly EOS (empty documents) or mostly padding",
    "long_doc": "very long rows: untruncated documents (docs layout) or unsplit packs (packed layout)",
}

FOREIGN_LANGS = ("ru", "zh_CN", "ar", "ja", "uk", "ko", "el", "he", "zh_TW", "bg")


@dataclass
class PlantContext:
    rng: np.random.Generator
    tok: object  # tokenizers.Tokenizer
    vocab_size: int
    layout: str  # "docs" | "packed"
    seq_len: int
    natural_lengths: np.ndarray  # the run's natural row lengths
    unigram: np.ndarray  # the run's token frequencies (for substitutions)
    reserve: list  # natural rows not consumed by the run (token arrays)

    def length(self) -> int:
        if self.layout == "packed":
            return self.seq_len
        return int(self.rng.choice(self.natural_lengths))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, dtype=np.int64)

    def fill_text(self, make_text, n: int) -> np.ndarray:
        """Tokens of generated text, generated until there are at least ``n``, cut to ``n``."""
        parts, got = [], 0
        while got < n:
            t = self.encode(make_text())
            if len(t) == 0:
                continue
            parts.append(t)
            got += len(t)
        return np.concatenate(parts)[:n]


# ---------------------------------------------------------------------------------- material


_FOREIGN_CACHE: dict = {}


def foreign_texts(lang: str) -> list[str]:
    """Translated messages of one language from the gettext catalogs under /usr/share/locale."""
    if lang in _FOREIGN_CACHE:
        return _FOREIGN_CACHE[lang]
    out = []
    d = Path("/usr/share/locale") / lang / "LC_MESSAGES"
    for mo in sorted(d.glob("*.mo")) if d.is_dir() else []:
        try:
            with open(mo, "rb") as f:
                cat = gettext.GNUTranslations(f)._catalog
        except Exception:  # a malformed catalog: skip it
            continue
        for k, v in cat.items():
            if isinstance(v, str) and k and len(v) > 20 and sum(ord(c) > 0x2FF for c in v) > len(v) / 3:
                out.append(v)
    _FOREIGN_CACHE[lang] = out
    return out


def _generated_script(rng: np.random.Generator) -> str:
    """Fallback when no catalog exists: words from a Unicode block (Cyrillic, CJK, Arabic)."""
    lo, hi = [(0x430, 0x44F), (0x4E00, 0x9FFF), (0x627, 0x64A)][int(rng.integers(3))]
    words = ["".join(chr(int(c)) for c in rng.integers(lo, hi + 1, size=int(rng.integers(2, 9))))
             for _ in range(60)]
    return " ".join(words) + ".\n"


@functools.lru_cache(maxsize=None)
def _binary_files() -> list[Path]:
    out = []
    for d in ("/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib"):
        p = Path(d)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and not f.is_symlink()
                          and f.stat().st_size > 65536)[:400]
    return out


@functools.lru_cache(maxsize=None)
def _compressed_files() -> list[Path]:
    p = Path("/usr/share/man/man1")
    return sorted(p.glob("*.gz"))[:2000] if p.is_dir() else []


def _read_chunk(rng, files: list[Path], n: int) -> bytes:
    if files:
        for _ in range(5):
            f = files[int(rng.integers(len(files)))]
            try:
                data = f.read_bytes()
            except OSError:
                continue
            if len(data) > 16:
                a = int(rng.integers(0, max(1, len(data) - n)))
                return data[a:a + n]
    return rng.bytes(n)


def base64_text(rng) -> str:
    raw = _read_chunk(rng, _compressed_files(), int(rng.integers(1500, 4000)))
    b = base64.b64encode(raw).decode()
    lines = "\n".join(b[i:i + 76] for i in range(0, len(b), 76))
    head = ["", "data:image/png;base64,", "-----BEGIN CERTIFICATE-----\n", "Content-Transfer-Encoding: base64\n\n"]
    return head[int(rng.integers(len(head)))] + lines + "\n"


def hexdump_text(rng) -> str:
    raw = _read_chunk(rng, _binary_files(), 16 * int(rng.integers(40, 120)))
    base = int(rng.integers(0, 1 << 20)) * 16
    lines = []
    for i in range(0, len(raw), 16):
        chunk = raw[i:i + 16]
        hx = " ".join(chunk[j:j + 2].hex() for j in range(0, len(chunk), 2))
        asc = "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
        lines.append(f"{base + i:08x}: {hx:<39}  {asc}")
    return "\n".join(lines) + "\n"


def numeric_text(rng) -> str:
    cols = int(rng.integers(3, 12))
    style = int(rng.integers(3))
    rows = []
    for r in range(int(rng.integers(20, 60))):
        v = rng.normal(0, 10 ** rng.integers(0, 4), size=cols)
        if style == 0:
            rows.append(",".join(f"{x:.4f}" for x in v))
        elif style == 1:
            rows.append("\t".join(str(int(x)) for x in v))
        else:
            rows.append(f"{1600000000 + 60 * r}," + ",".join(f"{x:.6e}" for x in v))
    header = ",".join(f"c{j}" for j in range(cols))
    return header + "\n" + "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------ kinds


def plant_rows(kind: str, k: int, ctx: PlantContext, copy_sources: list | None = None,
               event_state: dict | None = None) -> list[np.ndarray]:
    """``k`` anomalous rows of ``kind``. ``copy_sources``: for ``dup_copied``, the natural rows to copy.
    ``event_state`` carries what one event shares across its steps (the duplicated document, the
    repeated phrase, the language)."""
    rng = ctx.rng
    st = event_state if event_state is not None else {}
    if kind == "random_tokens":
        return [rng.integers(2, ctx.vocab_size, size=ctx.length()) for _ in range(k)]
    if kind == "base64_hex":
        return [ctx.fill_text(lambda: base64_text(rng) if i % 2 == 0 else hexdump_text(rng), ctx.length())
                for i in range(k)]
    if kind == "numeric":
        return [ctx.fill_text(lambda: numeric_text(rng), ctx.length()) for _ in range(k)]
    if kind == "repeated_ngram":
        if "phrase" not in st:
            src = ctx.reserve[int(rng.integers(len(ctx.reserve)))]
            words = ctx.tok.decode(src.tolist()).split()
            n = int(rng.integers(3, 13))
            a = int(rng.integers(0, max(1, len(words) - n)))
            st["phrase"] = (" ".join(words[a:a + n]) or "lorem ipsum dolor") + " "
        n = ctx.length()
        unit = ctx.encode(st["phrase"] * 4)
        reps = -(-n // max(1, len(unit))) + 1
        return [np.tile(unit, reps)[int(rng.integers(0, max(1, len(unit)))):][:n] for _ in range(k)]
    if kind in ("dup_in_batch", "near_dup"):
        n_src = max(1, k // 8)
        if "docs" not in st:
            st["docs"] = [ctx.reserve[int(i)] for i in rng.choice(len(ctx.reserve), size=n_src, replace=False)]
        docs = st["docs"]
        out = []
        for i in range(k):
            d = docs[i % len(docs)].copy()
            if ctx.layout == "packed" and len(d) != ctx.seq_len:
                d = np.resize(d, ctx.seq_len)
            if kind == "near_dup":
                n_sub = max(1, int(round(0.06 * len(d))))
                pos = rng.choice(len(d), size=n_sub, replace=False)
                d[pos] = rng.choice(len(ctx.unigram), size=n_sub, p=ctx.unigram)
            out.append(d)
        return out
    if kind == "dup_copied":
        assert copy_sources is not None and len(copy_sources) == k
        return [np.asarray(c).copy() for c in copy_sources]
    if kind == "foreign_script":
        if "lang" not in st:
            st["lang"] = FOREIGN_LANGS[int(rng.integers(len(FOREIGN_LANGS)))]
        texts = foreign_texts(st["lang"])
        if texts:
            return [ctx.fill_text(lambda: "\n".join(texts[int(j)] for j in rng.integers(0, len(texts), 8)),
                                  ctx.length()) for _ in range(k)]
        return [ctx.fill_text(lambda: _generated_script(rng), ctx.length()) for _ in range(k)]
    if kind == "eos_pad_flood":
        out = []
        for i in range(k):
            n = ctx.seq_len  # a flood fills the sequence to its full length
            if i % 2 == 0:  # empty documents: EOS everywhere, a few real tokens in between
                row = np.full(n, EOS_ID, dtype=np.int64)
                src = ctx.reserve[int(rng.integers(len(ctx.reserve)))]
                m = max(1, n // 12)
                pos = np.sort(rng.choice(n, size=m, replace=False))
                row[pos] = src[np.arange(m) % len(src)]
            else:  # a short document padded to the full length
                src = ctx.reserve[int(rng.integers(len(ctx.reserve)))]
                m = int(rng.integers(4, max(5, n // 10)))
                row = np.concatenate([src[:m], [EOS_ID], np.full(max(0, n - m - 1), PAD_ID)])[:n]
            out.append(row.astype(np.int64))
        return out
    if kind == "long_doc":
        out = []
        for _ in range(k):
            factor = int(rng.integers(4, 17)) if ctx.layout == "docs" else int(rng.integers(2, 5))
            n = factor * ctx.seq_len
            parts, got = [], 0
            while got < n:  # consecutive real text without document breaks
                d = ctx.reserve[int(rng.integers(len(ctx.reserve)))]
                d = d[d != EOS_ID]
                parts.append(d)
                got += len(d)
            out.append(np.concatenate(parts)[:n])
        return out
    raise ValueError(f"unknown kind {kind!r}")
