"""Real text from this machine for the spike lab, tokenized once and cached.

Sources (each file is one document, nothing de-duplicated, boilerplate left in):

* ``stdlib``: the Python standard library's sources (code, docstrings, licence headers, the
  encodings' hex tables), its test suites included;
* ``pydoc``: the reference topics of the Python documentation (``pydoc_data.topics``);
* ``debian``: ``/usr/share/doc/*/copyright`` (the same licence texts many times over),
  ``changelog*.gz``, ``NEWS*``, ``README*``;
* ``licenses``: ``/usr/share/common-licenses``;
* ``man``: troff sources of the manual pages under ``/usr/share/man`` (English sections, and a
  small share of the German/French/Spanish/Italian translations as they come);
* ``site_packages``: documentation and text files of the installed Python packages
  (``METADATA`` long descriptions, ``LICENSE`` files, ``*.md``/``*.rst``/``*.txt``).

Files are drawn per source in a fixed seeded order up to a character budget per source, so the
mix is broad and identical on every call. A byte-level BPE tokenizer (``tokenizers``) is trained on
a sample of it offline; special tokens: ``<|endoftext|>`` = 0 (EOS), ``<|pad|>`` = 1.

The pool is cached as plain data (``tokenizer.json``, ``pool.npz`` without pickles, ``pool.json``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("spikelab.corpus")

EOS_ID = 0
PAD_ID = 1
POOL_VERSION = 3
MAX_DOC_CHARS = 120_000
MIN_DOC_CHARS = 100


@dataclass(frozen=True)
class PoolConfig:
    # characters per source (the whole source when it is smaller)
    budget: tuple = (("stdlib", 24_000_000), ("man", 14_000_000), ("debian", 10_000_000),
                     ("site_packages", 5_000_000), ("pydoc", 2_000_000), ("licenses", 1_000_000))
    vocab_size: int = 8192
    train_chars: int = 6_000_000
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(dict(asdict(self), version=POOL_VERSION, python=sys.version_info[:2]), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


QUICK_POOL = PoolConfig(budget=(("stdlib", 3_800_000), ("man", 1_900_000), ("debian", 1_700_000),
                                ("site_packages", 1_200_000), ("pydoc", 500_000), ("licenses", 300_000)),
                        train_chars=2_500_000)


def _read(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\x00" in raw[:4096]:
        return None  # binary
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    if len(text) < MIN_DOC_CHARS:
        return None
    return text[:MAX_DOC_CHARS]


def _files(source: str) -> list[Path]:
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts
                and "dist-packages" not in p.parts]
    if source == "debian":
        root = Path("/usr/share/doc")
        out = []
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if not d.is_dir():
                continue
            for f in sorted(d.iterdir()):
                n = f.name
                if f.is_file() and (n == "copyright" or n.startswith(("changelog", "NEWS", "README"))) \
                        and not n.endswith((".html", ".pdf", ".png")):
                    out.append(f)
        return out
    if source == "licenses":
        root = Path("/usr/share/common-licenses")
        return sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    if source == "man":
        root = Path("/usr/share/man")
        if not root.is_dir():
            return []
        english = sorted(root.glob("man[1-8]/*.gz"))
        other = sorted(p for lang in ("de", "fr", "es", "it") for p in root.glob(f"{lang}/man[1-8]/*.gz"))
        # translations as a small share of what is drawn: every 40th file
        return english + other[::40]
    if source == "site_packages":
        roots = {Path(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
        out = []
        for root in sorted(roots):
            if not root.is_dir():
                continue
            for p in sorted(root.rglob("*")):
                n = p.name
                if not p.is_file() or "__pycache__" in p.parts:
                    continue
                if n in ("METADATA", "DESCRIPTION.rst") or n.startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE")) \
                        or p.suffix in (".md", ".rst", ".txt"):
                    if p.suffix == ".txt" and n in ("RECORD", "top_level.txt", "entry_points.txt", "SOURCES.txt"):
                        continue
                    out.append(p)
        return out
    raise ValueError(source)


def gather_documents(cfg: PoolConfig) -> tuple[list[str], list[str], list[str]]:
    """(texts, source of each, name of each): each source's files in a seeded order up to its budget."""
    texts, sources, names = [], [], []
    rng = np.random.default_rng(cfg.seed)
    for source, budget in cfg.budget:
        if source == "pydoc":
            import pydoc_data.topics as topics

            items = [(f"pydoc:{k}", topics.topics[k]) for k in sorted(topics.topics)]
            got = 0
            for name, text in items:
                if len(text) >= MIN_DOC_CHARS and got < budget:
                    texts.append(text[:MAX_DOC_CHARS]); sources.append(source); names.append(name)
                    got += len(text)
            log.info("corpus: %-13s %5d documents, %6.1f MB", source, sum(s == source for s in sources), got / 1e6)
            continue
        files = _files(source)
        order = rng.permutation(len(files)) if files else []
        got, n = 0, 0
        for i in order:
            if got >= budget:
                break
            t = _read(files[int(i)])
            if t is None:
                continue
            texts.append(t); sources.append(source); names.append(str(files[int(i)]))
            got += len(t); n += 1
        log.info("corpus: %-13s %5d documents, %6.1f MB (of %d files)", source, n, got / 1e6, len(files))
    # a machine without some of these (no man pages, no /usr/share/doc): the rest from the stdlib
    deficit = sum(b for _, b in cfg.budget) - sum(map(len, texts))
    if deficit > 0.1 * sum(b for _, b in cfg.budget):
        used = set(names)
        extra = 0
        for p in _files("stdlib"):
            if extra >= deficit:
                break
            if str(p) in used:
                continue
            t = _read(p)
            if t is not None:
                texts.append(t); sources.append("stdlib"); names.append(str(p))
                extra += len(t)
        log.info("corpus: %.1f MB more from the stdlib (other sources are small on this machine)", extra / 1e6)
    return texts, sources, names


def train_tokenizer(texts: list[str], cfg: PoolConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(cfg.seed + 1)
    sample, got = [], 0
    for i in rng.permutation(len(texts)):
        if got >= cfg.train_chars:
            break
        sample.append(texts[int(i)]); got += len(texts[int(i)])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample, trainer=trainer)
    return tok


@dataclass
class Pool:
    """Every document's tokens (flat + offsets), its source and name, and the tokenizer."""

    dir: Path
    tokens: np.ndarray  # uint16 flat
    offsets: np.ndarray  # int64, n_docs + 1
    source: np.ndarray  # int16 index into sources
    sources: list[str]
    names: list[str]
    vocab_size: int

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.dir / "tokenizer.json"))


def build_pool(cache: Path, cfg: PoolConfig) -> Pool:
    """The cached pool for ``cfg`` (built on first use)."""
    d = Path(cache) / f"pool-{cfg.key()}"
    if not (d / "pool.json").exists():
        log.info("corpus: building the token pool in %s (once)", d)
        texts, sources, names = gather_documents(cfg)
        tok = train_tokenizer(texts, cfg)
        log.info("corpus: tokenizer trained (vocab %d); tokenizing %d documents, %.1f MB", tok.get_vocab_size(),
                 len(texts), sum(map(len, texts)) / 1e6)
        ids = [e.ids for e in tok.encode_batch(texts)]
        lens = np.array([len(x) for x in ids], dtype=np.int64)
        flat = np.concatenate([np.asarray(x, dtype=np.uint16) for x in ids]) if ids else np.zeros(0, np.uint16)
        src_names = [s for s, _ in cfg.budget]
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        tok.save(str(tmp / "tokenizer.json"))
        np.savez(tmp / "pool.npz", tokens=flat, offsets=np.concatenate([[0], np.cumsum(lens)]),
                 source=np.array([src_names.index(s) for s in sources], dtype=np.int16))
        (tmp / "pool.json").write_text(json.dumps({"sources": src_names, "names": names,
                                                   "vocab_size": tok.get_vocab_size(), "config": asdict(cfg),
                                                   "chars": int(sum(map(len, texts)))}))
        if d.exists():  # another process built it meanwhile
            import shutil

            shutil.rmtree(tmp)
        else:
            tmp.rename(d)
    with np.load(d / "pool.npz", allow_pickle=False) as z:
        tokens, offsets, source = z["tokens"], z["offsets"], z["source"]
    meta = json.loads((d / "pool.json").read_text())
    pool = Pool(d, tokens, offsets, source, meta["sources"], meta["names"], int(meta["vocab_size"]))
    log.info("corpus: pool %s: %d documents, %.2fM tokens, vocab %d", d.name, pool.n_docs, len(tokens) / 1e6,
             pool.vocab_size)
    return pool


def describe(pool: Pool) -> dict:
    """Per-source documents and tokens (for the results file)."""
    lens = np.diff(pool.offsets)
    out = {}
    for k, s in enumerate(pool.sources):
        m = pool.source == k
        out[s] = {"documents": int(m.sum()), "tokens": int(lens[m].sum())}
    return out
