"""``read_log``: one log -> a ``LOSS_SERIES`` table and a ``LogReport``; the rules every reader shares are
in this package's docstring."""

from __future__ import annotations

import logging
from pathlib import Path
import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.schemas import LOSS_SERIES
from spike_audit.pipelines.logs.lines import (FORMATS, LogReport, MAX_MALFORMED_REPORTED, _const, _np, _read_bytes,
                                              _split_lines)
from spike_audit.pipelines.logs.restarts import _resolve_restarts
from spike_audit.pipelines.logs.sniff import _strip_compression, detect_format
from spike_audit.pipelines.logs.stdout import (_parse_llmc, _parse_megatron, _parse_modded, _parse_nanogpt,
                                               _parse_olmo, _parse_pattern, _parse_torchtitan)
from spike_audit.pipelines.logs.structured import _parse_csv, _parse_golden, _parse_hf, _parse_jsonl
from spike_audit.pipelines.logs.tensorboard import _parse_tensorboard


log = logging.getLogger(__name__)


_TEXT = {"modded-nanogpt": _parse_modded, "llmc": _parse_llmc, "nanogpt": _parse_nanogpt,
         "torchtitan": _parse_torchtitan, "megatron": _parse_megatron, "olmo": _parse_olmo,
         "pattern": _parse_pattern, "jsonl": _parse_jsonl}


_RAW = {"csv": _parse_csv, "megatron-golden": _parse_golden, "hf-trainer-state": _parse_hf}


def read_log(path, *, format=None, run=None, metric=None, step_key=None, value_key=None, pattern=None,
             tag=None, strict=False) -> tuple[pa.Table, LogReport]:
    """Read one training log into a ``LOSS_SERIES`` table (conforming to the schema) and a report."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if pattern and not format:
        format = "pattern"
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    run = run or (path.name if path.is_dir() else Path(_strip_compression(path.name)).stem)
    kw = dict(path=path, step_key=step_key, value_key=value_key, metric=metric, pattern=pattern, tag=tag)
    if fmt == "tensorboard":
        parsed = _parse_tensorboard(path, **{k: v for k, v in kw.items() if k != "path"})
    elif path.is_dir():
        raise UserError(f"{path}: is a directory (only --format tensorboard reads directories)")
    else:
        raw = _read_bytes(path)
        if fmt in _RAW:
            parsed = _RAW[fmt](raw, **kw)
        else:
            lines = _split_lines(raw)
            parsed = _TEXT[fmt](lines, raw=raw, **kw)
    malformed = np.unique(parsed.malformed.astype(np.int64))
    if strict and len(malformed):
        ln = int(malformed[0])
        got = ""
        if parsed.text_lines is not None and 0 < ln <= len(parsed.text_lines):
            got = parsed.text_lines[ln - 1].as_py()
        where = f"{path}:{ln}" if parsed.text_lines is not None else f"{path}: record {ln}"
        raise UserError(f"{where}: expected {parsed.expected}, got {got[:120]!r}")

    # runs: a change of the planned total (k/N) inside one file separates runs
    all_totals = [s.totals for s in parsed.series if s.totals is not None and len(s.totals)]
    distinct = np.unique(np.concatenate(all_totals)) if all_totals else np.array([], np.int64)
    multi = len(distinct[distinct >= 0]) > 1
    cols = {"run": [], "metric": [], "step": [], "value": [], "source_line": []}
    n_replaced = 0
    for s in parsed.series:
        if not len(s.steps):
            continue
        groups = [(run, np.ones(len(s.steps), bool))]
        if multi and s.totals is not None:
            groups = [(f"{run}@{t}" if t >= 0 else run, s.totals == t) for t in np.unique(s.totals)]
        for rname, sel in groups:
            steps = s.steps[sel]
            keep = _resolve_restarts(steps)
            n_replaced += int((~keep).sum())
            k = len(steps[keep])
            cols["run"].append(_const(rname, k))
            cols["metric"].append(_const(s.metric, k))
            cols["step"].append(pa.array(steps[keep], pa.int64()))
            cols["value"].append(pa.array(s.values[sel][keep], pa.float64()))
            cols["source_line"].append(pa.array(s.lines[sel][keep], pa.int64()) if s.lines is not None
                                       else pa.nulls(k, pa.int64()))
    if not cols["step"] or sum(len(a) for a in cols["step"]) == 0:
        extra = f"; {len(malformed)} malformed (first at line {malformed[0]})" if len(malformed) else ""
        raise UserError(f"{path}: no usable steps found for format {fmt} (expected {parsed.expected}){extra}")
    table = pa.Table.from_arrays(
        [pa.chunked_array(cols[n], type=t) for n, t in
         (("run", pa.string()), ("metric", pa.string()), ("step", pa.int64()), ("value", pa.float64()),
          ("source_line", pa.int64()))],
        names=["run", "metric", "step", "value", "source_line"])
    table = LOSS_SERIES.sorted(LOSS_SERIES.conform(table, source=str(path)))
    report = LogReport(
        path=str(path), format=fmt, run=run, n_lines=int(parsed.n_lines), n_values=table.num_rows,
        n_malformed=len(malformed), malformed_lines=[int(x) for x in malformed[:MAX_MALFORMED_REPORTED]],
        n_ignored=int(parsed.n_ignored), n_replaced=n_replaced,
        metrics=sorted(set(_np(table.column("metric")).tolist())),
        runs=sorted(set(_np(table.column("run")).tolist())),
    )
    if len(malformed):
        log.warning("%s: %d malformed lines (first: %s)", path, len(malformed), report.malformed_lines[:5])
    log.info("%s", report.summary())
    return table, report
