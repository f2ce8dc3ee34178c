"""Scheduled mode: the control steps' scores kept in the run state, so a rerun with new spikes reads only the new
windows' rows (and the controls again only when the control draw changes).

What is kept, per control step (record part files, :mod:`spike_audit.pipelines.records`: data, never pickles,
validated as they are read): the inputs of the row-level evidence as the scoring pass gave them, before "seen
elsewhere" is filled in (the duplicate reference changes as spikes are added, so it is matched again on every run
from the kept row hashes and positions): every row's signal values, row hash, shard, row range, unit and tokens,
the step's row and token counts and its suite signals; plus the control steps' unigram histogram (the reference
of the baseline-relative signals of the window steps). ``state.json`` says which controls, with which signal
list and which unigram reference, and the size of every part.

Valid when the run's control steps are exactly the kept ones (the unigram reference is theirs, so a control left
out changes every control's scores), or, with ``--baseline`` (a fixed unigram reference), a subset of them.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from spike_audit.pipelines.errors import UserError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
KIND = "state_controls"
HIST_KIND = "state_control_hist"
KINDS = (KIND, HIST_KIND)


def _signal_order() -> list[str]:
    from spike_audit.auditors.rows import SIGNAL_ORDER

    return list(SIGNAL_ORDER)


def to_record(item) -> tuple[str, dict]:
    """A scored control step (``graph.score_step``'s output) -> its state record."""
    step, d = item
    shard_names, shard_idx = np.unique(np.asarray(d["shard"]).astype(str), return_inverse=True)
    unit_names, unit_idx = np.unique(np.asarray(d["unit"]).astype(str), return_inverse=True)
    return KIND, {"step": int(step), "n_rows": int(d["n_rows"]), "n_tokens": int(d["n_tokens"]),
                  "signals": {k: float(v) for k, v in d["signals"].items()},
                  "values": np.asarray(d["values"], dtype=np.float64), "hash": np.asarray(d["hash"], dtype=np.uint64),
                  "shard_names": shard_names.tolist(), "shard_idx": shard_idx.astype(np.int32),
                  "row": np.asarray(d["row"], dtype=np.int64), "row_end": np.asarray(d["row_end"], dtype=np.int64),
                  "unit_names": unit_names.tolist(), "unit_idx": unit_idx.astype(np.int32),
                  "row_tokens": np.asarray(d["row_tokens"], dtype=np.int64)}


def hist_record(hist) -> tuple[str, dict]:
    """The control steps' unigram histogram -> its state record."""
    return HIST_KIND, {"hist": np.asarray(hist, dtype=np.int64)}


def _from_record(rec, path: str):
    try:
        n = int(rec["n_rows"])
        values = rec["values"]
        arrays = [rec[k] for k in ("hash", "shard_idx", "row", "row_end", "unit_idx", "row_tokens")]
        ok = (isinstance(values, np.ndarray) and values.shape == (n, len(_signal_order()))
              and all(isinstance(a, np.ndarray) and a.shape == (n,) for a in arrays)
              and isinstance(rec["signals"], dict) and isinstance(rec["shard_names"], list)
              and isinstance(rec["unit_names"], list))
        if ok and n:
            ok = (0 <= rec["shard_idx"].min() and rec["shard_idx"].max() < len(rec["shard_names"])
                  and 0 <= rec["unit_idx"].min() and rec["unit_idx"].max() < len(rec["unit_names"]))
        if not ok:
            raise ValueError("arrays do not match the step's rows and signals")
        d = {"n_rows": n, "n_tokens": int(rec["n_tokens"]), "signals": dict(rec["signals"]), "values": values,
             "hash": rec["hash"], "shard": np.asarray(rec["shard_names"], dtype=object)[rec["shard_idx"]],
             "row": rec["row"], "row_end": rec["row_end"],
             "unit": np.asarray(rec["unit_names"], dtype=object)[rec["unit_idx"]], "row_tokens": rec["row_tokens"],
             "rb": None}
        return int(rec["step"]), d
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise UserError(f"{path}: not a control-step record of a run state ({' '.join(str(err).split())[:200]})") from None


def load_controls(path: str, controls: frozenset):
    """A kept part file -> the scored control steps still among ``controls`` (read inside the pipeline)."""
    from apache_beam.io.filesystems import FileSystems

    from spike_audit.pipelines import records as rec_io

    with FileSystems.open(path) as f:
        recs = rec_io.from_bytes(f.read(), path, KIND)
    for rec in recs:
        step, d = _from_record(rec, path) if isinstance(rec, dict) else (None, None)
        if step is None:
            raise UserError(f"{path}: not a control-step record of a run state")
        if step in controls:
            yield step, d


def load_hist(path: str):
    from apache_beam.io.filesystems import FileSystems

    from spike_audit.pipelines import records as rec_io

    with FileSystems.open(path) as f:
        recs = rec_io.from_bytes(f.read(), path, HIST_KIND)
    for rec in recs:
        h = rec.get("hist") if isinstance(rec, dict) else None
        if not isinstance(h, np.ndarray) or h.ndim != 1 or h.dtype.kind not in "iu":
            raise UserError(f"{path}: not a unigram histogram record (expected a 1-d integer array 'hist')")
        yield h.astype(np.int64)


def sum_hist(hists) -> np.ndarray:
    from spike_audit.pipelines.beam.scoring import sum_histograms

    return sum_histograms(hists)


def check_entry(entry, state_dir: str) -> dict | None:
    """``state.json``'s ``control_cache`` validated (a UserError naming the file when malformed), with the kept
    part files' paths; None when absent or written with another signal list (the controls are read again)."""
    from spike_audit.pipelines import records as rec_io

    if entry is None:
        return None
    p = Path(state_dir) / "state.json"
    if not (isinstance(entry, dict) and entry.get("version") == CACHE_VERSION and isinstance(entry.get("controls"), list)
            and all(type(c) is int for c in entry["controls"]) and isinstance(entry.get("files"), dict)
            and entry.get("unigram") in ("controls", "baseline") and isinstance(entry.get("signals"), list)):
        raise UserError(f"{p}: control_cache: expected version {CACHE_VERSION}, controls (integer steps), unigram, "
                        "signals and files")
    if entry["signals"] != _signal_order():
        log.warning("%s: control scores kept with another signal list; the control steps are read again", p)
        return None
    parts = {k: [] for k in KINDS}
    for name, size in sorted(entry["files"].items()):
        kind, _, base = name.partition("/")
        if kind not in KINDS or "/" in base or not base.startswith("part-") or not isinstance(size, int):
            raise UserError(f"{p}: control_cache: unexpected file {name!r}")
        f = Path(state_dir) / name
        if not f.is_file() or f.stat().st_size != size:
            raise UserError(f"{f}: missing or not {size} bytes (state.json lists it): the run state is corrupt")
        rec_io.check_file(str(f), kind)
        parts[kind].append(str(f))
    return dict(entry, parts=parts)


def usable(cache: dict | None, controls: list[int], baseline: bool) -> bool:
    """Whether the kept scores stand for this run's control steps (see the module docstring)."""
    if cache is None:
        return False
    kept = set(cache["controls"])
    if baseline != (cache["unigram"] == "baseline"):
        return False
    if baseline:
        return set(controls) <= kept
    if set(controls) == kept and cache["parts"][HIST_KIND]:
        return True
    return False


def save_cache(files: Path, stage: Path | None, state_dir: str, cache: dict | None, used: bool, controls: list[int],
               baseline: bool) -> dict | None:
    """Into the new state version ``files``: the parts this run's pipeline wrote (``stage``), or the kept ones
    when they were used; returns the ``control_cache`` entry of ``state.json``."""
    wrote = stage is not None and (stage / KIND).is_dir()
    if not wrote and not used:
        return None
    names = {}
    for kind in KINDS:
        (files / kind).mkdir()
        if wrote:
            src = sorted((stage / kind).iterdir()) if (stage / kind).is_dir() else []
            for s in src:
                os.replace(s, files / kind / s.name)
        else:
            for s in cache["parts"][kind]:
                try:
                    os.link(s, files / kind / Path(s).name)  # same file system: no data copied
                except OSError:
                    shutil.copy2(s, files / kind / Path(s).name)
        for f in sorted((files / kind).iterdir()):
            names[f"{kind}/{f.name}"] = f.stat().st_size
    kept = sorted(int(c) for c in controls) if wrote else list(cache["controls"])
    return {"version": CACHE_VERSION, "controls": kept, "unigram": "baseline" if baseline else "controls",
            "signals": _signal_order(), "files": names}
