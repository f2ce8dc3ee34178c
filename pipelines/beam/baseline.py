"""Saved baselines (``spike-audit shards CORPUS --save-baseline B``, then ``shards NEW --baseline B`` and
``run ... --baseline B``): what new data is judged against, without reading the trusted corpus again.

A baseline is a directory of data, never pickles:

* ``baseline.json``: format name and version, the tool version, the settings it was made with (those that change
  what a row scores), the signal families and bin count, the corpus's shard, row and token counts, and the
  SHA-256 and size of every other file;
* ``reference.parquet`` (schema ``baseline_reference``): the trusted rows' bin counts per signal family, the
  natural rates of the row-level evidence (:mod:`spike_audit.auditors.evidence`);
* ``unigram.parquet`` (schema ``baseline_unigram``): the token unigram histogram, the reference distribution of
  the baseline-relative signals;
* ``shard_signals.parquet`` (schema ``baseline_shard_signals``): every trusted shard's suite signals, the
  reference of a new shard's signals' robust z;
* ``row_hashes/part-*.records.parquet`` (:mod:`spike_audit.pipelines.records`, kind ``baseline_row_hashes``):
  the distinct 64-bit row hashes of the corpus (8 bytes a distinct row), for "seen elsewhere": a new row is
  seen elsewhere when its tokens are in the baseline. They are read inside the pipeline, never by the driver.

Loading validates everything and refuses, in one line naming the file, a baseline that is not one, a corrupt
one (checksums), another format version, or one made with settings that change the scores.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError

FORMAT = "spike-audit-baseline"
VERSION = 1
META_FILE = "baseline.json"
REFERENCE_FILE = "reference.parquet"
UNIGRAM_FILE = "unigram.parquet"
SIGNALS_FILE = "shard_signals.parquet"
HASH_DIR = "row_hashes"
HASH_KIND = "baseline_row_hashes"

#: Settings of ``shards`` that change what a row scores (a baseline made with others is refused).
SHARD_KEYS = ("seed", "threshold", "eos_id", "pad_id", "vocab_size", "dtype", "rows", "seq_len", "text_from_tokenizer",
              "tokenizer_special")
#: Of those, the ones ``run --baseline`` (the unigram reference) depends on.
RUN_KEYS = ("eos_id", "pad_id", "vocab_size", "tokenizer_special")


def compat_settings(cfg) -> dict:
    """The settings of ``cfg`` (a shard-audit or run config) a baseline must share, as JSON values."""
    out = {}
    for k in SHARD_KEYS:
        if k == "text_from_tokenizer":
            out[k] = bool(getattr(cfg, "tokenizer", None))
        elif k == "tokenizer_special":
            v = getattr(cfg, "tokenizer_special", None)
            out[k] = {str(a): b for a, b in v} if v else None
        elif hasattr(cfg, k):
            v = getattr(cfg, k)
            out[k] = float(v) if k == "threshold" else v
    return out


def _families() -> list[str]:
    from spike_audit.auditors.rows import FAMILIES

    return [f.name for f in FAMILIES]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Baseline:
    path: str
    meta: dict
    reference: np.ndarray  # families x NBINS, int64, in FAMILIES order
    unigram: np.ndarray  # int64 counts by token id
    hash_parts: tuple[str, ...]
    shard_signals: tuple = ()  # one {signal: value} per trusted shard (the reference of the signals' z)

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])


# --------------------------------------------------------------------------------------------- saving


def bucket_hashes(kv):
    """One exact-hash bucket of the trusted corpus -> its distinct row hashes, sorted (a baseline part)."""
    from spike_audit.pipelines.beam.scoring import concat_parts

    cols = concat_parts(kv[1])
    if cols is None or not len(cols[0]):
        return
    yield HASH_KIND, {"hash": np.unique(np.asarray(cols[0], dtype=np.uint64))}


def write_baseline(files: Path, hash_stage: Path | None, unigram: np.ndarray, reference: np.ndarray, n_shards: int,
                   cfg, shard_signals: list[dict] = ()) -> dict:
    """Write a baseline into ``files`` (a staging directory published by the caller): the tables, the row-hash
    parts moved from ``hash_stage`` (where the pipeline wrote them), and ``baseline.json`` last."""
    from spike_audit.auditors.evidence import NBINS
    from spike_audit.pipelines.io import write_json, write_table
    from spike_audit.pipelines.settings import tool_version
    from spike_audit.schemas import BASELINE_REFERENCE, BASELINE_SHARD_SIGNALS, BASELINE_UNIGRAM

    fams = _families()
    reference = np.asarray(reference, dtype=np.int64)
    if reference.shape != (len(fams), NBINS):
        raise RuntimeError(f"baseline reference of shape {reference.shape}, expected {(len(fams), NBINS)}")
    f, b = np.nonzero(reference)
    write_table(BASELINE_REFERENCE.from_arrays({"family": np.asarray(fams, dtype=object)[f], "bin": b.astype(np.int32),
                                                "count": reference[f, b]}), files / REFERENCE_FILE, BASELINE_REFERENCE)
    unigram = np.asarray(unigram, dtype=np.int64)
    tok = np.flatnonzero(unigram)
    write_table(BASELINE_UNIGRAM.from_arrays({"token": tok.astype(np.int64), "count": unigram[tok]}),
                files / UNIGRAM_FILE, BASELINE_UNIGRAM)
    rows = [(r["shard"], k, v if v == v else None) for r in shard_signals for k, v in sorted(r["signals"].items())]
    write_table(BASELINE_SHARD_SIGNALS.from_pylist([{"shard": a, "signal": k, "value": v} for a, k, v in rows]),
                files / SIGNALS_FILE, BASELINE_SHARD_SIGNALS)
    (files / HASH_DIR).mkdir()
    src = hash_stage / HASH_KIND if hash_stage is not None else None
    if src is not None and src.is_dir():
        for p in sorted(src.iterdir()):
            os.replace(p, files / HASH_DIR / p.name)
    listed = {REFERENCE_FILE: None, UNIGRAM_FILE: None, SIGNALS_FILE: None}
    listed.update({f"{HASH_DIR}/{p.name}": None for p in sorted((files / HASH_DIR).iterdir())})
    meta = {"format": FORMAT, "version": VERSION, "tool": "spike-audit", "tool_version": tool_version(),
            "settings": compat_settings(cfg), "families": fams, "nbins": NBINS, "shards": int(n_shards),
            "rows": int(reference.sum(axis=1).max()) if reference.size else 0, "tokens": int(unigram.sum()),
            "files": {n: {"sha256": _sha256(files / n), "size": (files / n).stat().st_size} for n in listed}}
    write_json(meta, files / META_FILE)
    return meta


# -------------------------------------------------------------------------------------------- loading


def _bad(path, what: str) -> UserError:
    return UserError(f"{path}: {what}")


def load_baseline(path: str, cfg, keys: tuple[str, ...] = SHARD_KEYS) -> Baseline:
    """A saved baseline, validated (see the module docstring); ``keys``: the settings that must match ``cfg``."""
    import pyarrow.parquet as pq

    from spike_audit.auditors.evidence import NBINS
    from spike_audit.pipelines import fs
    from spike_audit.schemas import BASELINE_REFERENCE, BASELINE_SHARD_SIGNALS, BASELINE_UNIGRAM, SchemaError

    if fs.is_url(str(path)):
        raise UserError(f"{path}: --baseline must be a local directory (saved by shards --save-baseline)")
    root = Path(path)
    mf = root / META_FILE
    if not root.is_dir():
        what = "is a file, not" if root.exists() else "not found: expected"
        raise _bad(path, f"baseline {what} a directory saved by spike-audit shards --save-baseline")
    if not mf.is_file():
        raise _bad(mf, "missing: not a spike-audit baseline (saved by spike-audit shards --save-baseline)")
    try:
        meta = json.loads(mf.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise _bad(mf, f"not a spike-audit baseline ({' '.join(str(err).split())[:200]})") from None
    except OSError as err:
        raise _bad(mf, f"cannot read the baseline ({err.strerror or err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(mf, f"not a spike-audit baseline (expected format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise _bad(mf, f"baseline format version {meta.get('version')!r}, expected {VERSION} (save it again with "
                       "this spike-audit)")
    for k, t in (("settings", dict), ("families", list), ("nbins", int), ("rows", int), ("shards", int),
                 ("files", dict)):
        if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool):
            raise _bad(mf, f"expected {k!r} ({t.__name__})")
    fams = _families()
    if meta["families"] != fams or meta["nbins"] != NBINS:
        raise _bad(mf, "made with another set of signal families or bins (another spike-audit version): save the "
                       "baseline again")
    mine = compat_settings(cfg)
    for k in keys:
        have, want = meta["settings"].get(k), mine.get(k)
        if k in ("vocab_size", "tokenizer_special") and want is None:
            continue  # not given here: nothing to contradict
        if have != want:
            raise _bad(mf, f"made with {k}={have!r}, this audit has {k}={want!r}: use the baseline's settings or "
                           "save a new baseline")
    files = meta["files"]
    for name in (REFERENCE_FILE, UNIGRAM_FILE, SIGNALS_FILE):
        if name not in files:
            raise _bad(mf, f"does not list {name}")
    hash_parts = []
    for name, e in sorted(files.items()):
        p = root / name
        if not (isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)):
            raise _bad(mf, f"file {name!r}: expected sha256 and size")
        if "/" in name and not (name.startswith(HASH_DIR + "/") and name.count("/") == 1 and ".." not in name):
            raise _bad(mf, f"file {name!r}: not a baseline file")
        if not p.is_file():
            raise _bad(p, "missing from the baseline (baseline.json lists it)")
        if p.stat().st_size != e["size"]:
            raise _bad(p, f"{p.stat().st_size} bytes, baseline.json says {e['size']}: the baseline is corrupt")
        if name.startswith(HASH_DIR + "/"):
            from spike_audit.pipelines import records as rec_io

            rec_io.check_file(str(p), HASH_KIND)
            hash_parts.append(str(p))
        elif _sha256(p) != e["sha256"]:
            raise _bad(p, "checksum differs from baseline.json: the baseline is corrupt")

    def table(name, spec):
        p = root / name
        try:
            return spec.conform(pq.read_table(p), source=str(p))
        except SchemaError as err:
            raise UserError(str(err)) from None
        except (OSError, pa.ArrowException) as err:
            raise _bad(p, f"not a readable {spec.name} table ({' '.join(str(err).split())[:200]})") from None

    ref_t = table(REFERENCE_FILE, BASELINE_REFERENCE)
    index = {n: i for i, n in enumerate(fams)}
    fam = ref_t.column("family").to_pylist()
    bins = ref_t.column("bin").to_numpy(zero_copy_only=False).astype(np.int64)
    cnt = ref_t.column("count").to_numpy(zero_copy_only=False).astype(np.int64)
    unknown = sorted({f for f in fam if f not in index})
    if unknown:
        raise _bad(root / REFERENCE_FILE, f"unknown signal family {unknown[0]!r}")
    if len(bins) and (bins.min() < 0 or bins.max() >= NBINS or cnt.min() < 0):
        raise _bad(root / REFERENCE_FILE, f"expected bins 0..{NBINS - 1} and counts >= 0")
    reference = np.zeros((len(fams), NBINS), dtype=np.int64)
    np.add.at(reference, (np.array([index[f] for f in fam], dtype=np.int64), bins), cnt)
    totals = reference.sum(axis=1)
    if len(totals) and (totals != meta["rows"]).any():
        raise _bad(root / REFERENCE_FILE, f"every family must count the baseline's {meta['rows']} rows")
    uni_t = table(UNIGRAM_FILE, BASELINE_UNIGRAM)
    tok = uni_t.column("token").to_numpy(zero_copy_only=False).astype(np.int64)
    ucnt = uni_t.column("count").to_numpy(zero_copy_only=False).astype(np.int64)
    if len(tok) and (tok.min() < 0 or ucnt.min() < 0 or tok.max() >= (1 << 31)):
        raise _bad(root / UNIGRAM_FILE, "expected token ids in 0..2^31 and counts >= 0")
    unigram = np.zeros(int(tok.max()) + 1 if len(tok) else 0, dtype=np.int64)
    np.add.at(unigram, tok, ucnt)
    sig_t = table(SIGNALS_FILE, BASELINE_SHARD_SIGNALS)
    by_shard: dict[str, dict] = {}
    for a, k, v in zip(sig_t.column("shard").to_pylist(), sig_t.column("signal").to_pylist(),
                       sig_t.column("value").to_pylist()):
        by_shard.setdefault(a, {})[k] = float("nan") if v is None else float(v)
    return Baseline(str(root), meta, reference, unigram, tuple(hash_parts),
                    tuple(by_shard[a] for a in sorted(by_shard)))


def baseline_hash_items(path: str, buckets: int, node: int):
    """A baseline's row-hash part -> ``(bucket, (hashes, nodes))`` per bucket, every node ``node`` (the baseline
    as one more shard of the exact-duplicate join); read inside the pipeline, validated as it is read."""
    from apache_beam.io.filesystems import FileSystems

    from spike_audit.pipelines import records as rec_io
    from spike_audit.pipelines.beam.scoring import split_by_bucket

    with FileSystems.open(path) as f:
        recs = rec_io.from_bytes(f.read(), path, HASH_KIND)
    for rec in recs:
        h = rec.get("hash") if isinstance(rec, dict) else None
        if not isinstance(h, np.ndarray) or h.dtype != np.uint64 or h.ndim != 1:
            raise UserError(f"{path}: not a baseline row-hash record (expected a 1-d uint64 array 'hash')")
        yield from split_by_bucket(h, buckets, h, np.full(len(h), node, dtype=np.int64))
