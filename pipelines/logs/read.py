"""``read_log``: one log -> a ``LOSS_SERIES`` table and a ``LogReport``; the rules every reader shares are
in this package's docstring."""

from __future__ import annotations

import logging
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.errors import UserError
from spike_audit.schemas import LOSS_SERIES
from spike_audit.schemas.steps import FORMAT_TRAINER
from spike_audit.pipelines.logs.lines import (FORMATS, LogReport, MAX_MALFORMED_REPORTED, TextStream, _Parsed, _no_nul,
                                              _Series, _const, _np, read_document)
from spike_audit.pipelines.logs.restarts import resolve_restarts
from spike_audit.pipelines.logs.sniff import _strip_compression, detect_format
from spike_audit.pipelines.logs.stdout import (_parse_llmc, _parse_megatron, _parse_modded, _parse_nanogpt,
                                               _parse_olmo, _parse_pattern, _parse_torchtitan)
from spike_audit.pipelines.logs.structured import _CsvParser, _JsonlParser, _parse_golden, _parse_hf
from spike_audit.pipelines.logs.tensorboard import _parse_tensorboard


log = logging.getLogger(__name__)


_TEXT = {"modded-nanogpt": _parse_modded, "llmc": _parse_llmc, "nanogpt": _parse_nanogpt,
         "torchtitan": _parse_torchtitan, "megatron": _parse_megatron, "olmo": _parse_olmo,
         "pattern": _parse_pattern}


_STREAMED = {"jsonl": _JsonlParser, "csv": _CsvParser}


_RAW = {"megatron-golden": _parse_golden, "hf-trainer-state": _parse_hf}


# The last characters of a line that may have been cut inside a number.
_NUMBERISH = frozenset("0123456789.eE+-")


class _LineParser:
    """A line-local parser run chunk by chunk; ``state`` carries what a format needs across chunks."""

    def __init__(self, fn, **kw):
        self.fn, self.kw, self.state = fn, kw, {}

    def feed(self, chunk) -> _Parsed:
        return self.fn(chunk.lines, raw=chunk.data, state=self.state, **self.kw)

    def finish(self) -> _Parsed | None:
        return None


class _Collector:
    """Chunk results -> one ``_Parsed``: per-metric numpy pieces (no per-line Python objects), malformed line
    numbers, counts."""

    def __init__(self):
        self.parts: dict[str, list[_Series]] = {}
        self.malformed: list[np.ndarray] = []
        self.n_ignored = 0
        self.expected = ""

    def add(self, parsed: _Parsed | None, offset: int = 0) -> None:
        if parsed is None:
            return
        self.expected = parsed.expected or self.expected
        self.n_ignored += int(parsed.n_ignored)
        if len(parsed.malformed):
            self.malformed.append(np.asarray(parsed.malformed, np.int64) + offset)
        for s in parsed.series:
            lines = None if s.lines is None else np.asarray(s.lines, np.int64) + offset
            totals = s.totals
            if totals is not None and len(totals) and (totals == totals[0]).all():
                totals = np.broadcast_to(np.int64(totals[0]), len(totals))  # one planned total: no memory
            self.parts.setdefault(s.metric, []).append(_Series(s.metric, s.steps, s.values, lines, totals))

    @property
    def first_malformed(self) -> int | None:
        return int(min(m.min() for m in self.malformed)) if self.malformed else None

    def drop_line(self, line: int) -> bool:
        """Remove the values of one line (an unterminated last line cut mid-number); True if it had any."""
        hit = False
        for metric, pieces in self.parts.items():
            for i, s in enumerate(pieces):
                if s.lines is None:
                    continue
                sel = s.lines != line
                if not sel.all():
                    hit = True
                    pieces[i] = _Series(s.metric, s.steps[sel], s.values[sel], s.lines[sel],
                                        None if s.totals is None else s.totals[sel])
        if hit:
            self.malformed.append(np.array([line], np.int64))
        return hit

    def finish(self, n_lines: int) -> _Parsed:
        series = []
        for metric in list(self.parts):
            pieces = self.parts.pop(metric)  # freed as it is concatenated
            has_lines = all(p.lines is not None for p in pieces)
            totals = None
            if all(p.totals is not None for p in pieces):
                firsts = {int(p.totals[0]) for p in pieces if len(p.totals)}
                if all(p.totals.strides == (0,) for p in pieces if len(p.totals)) and len(firsts) <= 1:
                    totals = np.broadcast_to(np.int64(firsts.pop() if firsts else -1), sum(len(p.totals) for p in pieces))
                else:
                    totals = np.concatenate([np.asarray(p.totals) for p in pieces])
            series.append(_Series(
                metric,
                np.concatenate([p.steps for p in pieces]).astype(np.int64, copy=False),
                np.concatenate([p.values for p in pieces]).astype(np.float64, copy=False),
                np.concatenate([p.lines for p in pieces]) if has_lines else None,
                totals))
            del pieces
        malformed = np.concatenate(self.malformed) if self.malformed else np.zeros(0, np.int64)
        return _Parsed(series, malformed, self.expected, self.n_ignored, n_lines, None)


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _line_text(path, lineno: int) -> str:
    """The text of one line of a log (error messages only: streams the log up to that line)."""
    for chunk in TextStream(path):
        k = lineno - chunk.first_line
        if 0 <= k < len(chunk.lines):
            return chunk.lines[k].as_py()
    return ""


def _strict_error(path, line: int, expected: str, cut: bool) -> UserError:
    got = _line_text(path, line)
    if cut:
        return UserError(f"{path}:{line}: expected a complete last line, got {got[:120]!r} (the log ends without a "
                         f"newline right after a number: cut mid-value?)")
    return UserError(f"{path}:{line}: expected {expected}, got {got[:120]!r}")


#: Record lines of each text format (what its parser reads), to notice a log that mixes two formats: the lines of
#: the format not chosen would be ignored as unrelated text.
_RECORD_MARKERS = {
    "megatron": r"\biteration\s+\d+\s*/\s*\d+\s*\|",
    "modded-nanogpt": r"^step:\d+/\d+ (?:train|val)_loss:",
    "llmc": r"^s:\d+ t[re]l:",
    "nanogpt": r"^iter \d+: loss ",
    "torchtitan": r"\bstep:\s*\d+\s+loss:\s*\S",
    "olmo": r"\[step=\d+/",
    "jsonl": r'^\s*\{.*"(?:step|_step|iteration|global_step)"\s*:\s*\d',
}


def _other_records(lines: pa.Array, fmt: str, counts: dict, first_line: int = 1) -> None:
    """Add to ``counts`` the lines of ``lines`` that are record lines of another text format than ``fmt`` (and, under
    ``counts["first-line", format]``, the first such line's number; ``lines`` start at ``first_line``)."""
    others = {f: rx for f, rx in _RECORD_MARKERS.items() if f != fmt}
    if not len(lines) or not others:
        return
    any_other = _np(pc.match_substring_regex(lines, "|".join(f"(?:{rx})" for rx in others.values())))
    if not any_other.any():
        return
    at = np.flatnonzero(any_other)
    sub = lines.filter(pa.array(any_other))
    for f, rx in others.items():
        hit = _np(pc.match_substring_regex(sub, rx))
        if hit.any():
            counts[f] = counts.get(f, 0) + int(hit.sum())
            counts.setdefault(("first-line", f), int(at[np.flatnonzero(hit)[0]]) + first_line)


def _parse_text(path: Path, fmt: str, strict: bool, kw: dict) -> tuple[_Parsed, int | None, dict]:
    """Stream a text log chunk by chunk. Returns the parse, the number of a cut last line (or None) and, per other
    text format, how many lines look like its records."""
    parser = _STREAMED[fmt](**kw, strict=strict) if fmt in _STREAMED else _LineParser(_TEXT[fmt], **kw)
    stream = TextStream(path)
    coll = _Collector()
    others: dict = {}
    for chunk in stream:
        parsed = parser.feed(chunk)
        coll.add(parsed, chunk.first_line - 1)
        if fmt != "pattern" and parsed is not None and parsed.n_ignored:  # only where lines were left unread
            _other_records(chunk.lines, fmt, others, chunk.first_line)
        if b"\x00" in chunk.data:  # any line with a crash's zeros in it is malformed, whatever it matched
            nul = ~_no_nul(chunk.lines)
            coll.malformed.append(np.flatnonzero(nul).astype(np.int64) + chunk.first_line)
        if strict and coll.malformed and fmt not in _STREAMED:
            first = coll.first_malformed
            raise _strict_error(path, first, coll.expected, False)
    coll.add(parser.finish())
    cut = None
    if (not stream.terminated and stream.last_line.rstrip(" \t")[-1:] in _NUMBERISH
            and stream.last_line.strip() and coll.drop_line(stream.n_lines)):
        cut = stream.n_lines
    return coll.finish(stream.n_lines), cut, others


def read_log(path, *, format=None, run=None, metric=None, step_key=None, value_key=None, pattern=None,
             tag=None, strict=False) -> tuple[pa.Table, LogReport]:
    """Read one training log into a ``LOSS_SERIES`` table (conforming to the schema) and a report.

    ``path`` may be a URL (``s3://``, ``gs://``): the log (or TensorBoard logdir) is copied to a temporary
    directory through the one filesystem layer and read from there; the report names the URL."""
    from spike_audit.pipelines import fs
    from spike_audit.pipelines.files import check_regular

    if fs.is_url(path):
        with fs.local_copy(path) as local:
            table, report = read_log(local, format=format, run=run, metric=metric, step_key=step_key,
                                     value_key=value_key, pattern=pattern, tag=tag, strict=strict)
        report.path = str(path)
        return table, report
    path = Path(path)
    if not path.exists():
        from spike_audit.pipelines.files import missing

        raise missing(path, f"{path}: no such file or directory")
    if not path.is_dir():
        check_regular(path, "log")
    if pattern and not format:
        format = "pattern"
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise UserError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    for flag, given, applies in (("--step-key", step_key, ("jsonl", "csv")), ("--value-key", value_key, ("jsonl", "csv")),
                                 ("--tag", tag, ("tensorboard",))):
        if given and fmt not in applies:  # ignored, it would audit another metric than the one asked for
            raise UserError(f"{path}: {flag} {given!r} applies to {' and '.join(applies)} logs; this log is read as "
                            f"{fmt}{'' if format else ' (detected)'}: use --pattern for a text log, or --format")
    run = run or (path.name if path.is_dir() else Path(_strip_compression(path.name)).stem)
    from spike_audit.pipelines.logs.multirun import split_runs

    with split_runs(path, fmt, run) as parts:
        if parts:
            return _read_runs(path, fmt, parts, metric=metric, step_key=step_key, value_key=value_key,
                              pattern=pattern, tag=tag, strict=strict)
    kw = dict(path=path, step_key=step_key, value_key=value_key, metric=metric, pattern=pattern, tag=tag)
    cut = None
    others: dict = {}
    if fmt == "tensorboard":
        parsed = _parse_tensorboard(path, **{k: v for k, v in kw.items() if k != "path"})
    elif path.is_dir():
        raise UserError(f"{path}: is a directory (only --format tensorboard reads directories)")
    elif fmt in _RAW:
        parsed = _RAW[fmt](read_document(path), **kw)
    else:
        parsed, cut, others = _parse_text(path, fmt, strict, kw)
    malformed = np.unique(parsed.malformed.astype(np.int64))
    if strict and len(malformed):
        ln = int(malformed[0])
        if fmt in _TEXT or fmt in _STREAMED:
            raise _strict_error(path, ln, parsed.expected, ln == cut)
        raise UserError(f"{path}: record {ln}: expected {parsed.expected}")

    # runs: a change of the planned total (k/N) inside one file separates runs
    all_totals = [np.unique(s.totals[:1]) if s.totals.strides == (0,) else np.unique(s.totals)
                  for s in parsed.series if s.totals is not None and len(s.totals)]
    distinct = np.unique(np.concatenate(all_totals)) if all_totals else np.array([], np.int64)
    multi = len(distinct[distinct >= 0]) > 1
    expected, n_lines, n_ignored = parsed.expected, parsed.n_lines, parsed.n_ignored
    groups: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray | None]] = []
    n_replaced = 0
    out_of_order: list[tuple[str, int, int, int, str]] = []  # (where, step, the step before it, count, metric)
    while parsed.series:
        s = parsed.series.pop(0)  # each series' arrays are freed once its groups are built
        if not len(s.steps):
            continue
        parts = [(run, None)]
        if multi and s.totals is not None:
            parts = [(f"{run}@{t}" if t >= 0 else run, s.totals == t) for t in np.unique(s.totals)]
        for rname, sel in parts:
            steps = s.steps if sel is None else s.steps[sel]
            keep, ooo = resolve_restarts(steps)
            n_replaced += int(len(keep) - keep.sum())
            values = s.values if sel is None else s.values[sel]
            lines = None if s.lines is None else (s.lines if sel is None else s.lines[sel])
            if ooo.any():
                at = int(np.flatnonzero(ooo)[0])
                before = int(steps[:at].max())
                where = f"line {int(lines[at])}" if lines is not None else f"value {at + 1} of {s.metric}"
                out_of_order.append((where, int(steps[at]), before, int(ooo.sum()), s.metric))
            if not keep.all():
                steps, values, lines = steps[keep], values[keep], None if lines is None else lines[keep]
            if ooo.any():  # kept out-of-order values go to their place: every group is sorted by step
                o = np.argsort(steps, kind="stable")
                steps, values, lines = steps[o], values[o], None if lines is None else lines[o]
            groups.append((rname, s.metric, steps, values, lines))
    parsed = None  # the parse's arrays are no longer needed
    if out_of_order:
        where, st, before, _, metric = out_of_order[0]
        n_ooo = sum(x[3] for x in out_of_order)
        msg = (f"{where}: step {st} of {metric} is logged after step {before} and the log then goes on past step "
               f"{before}: out of order (a late or stray line), not a resume")
        if strict:
            raise UserError(f"{path}: {msg}")
        log.warning("%s: %s; %d such values read at their own steps (a resume would have replaced every value "
                    "after them)", path, msg, n_ooo)
    if sum(len(g[2]) for g in groups) == 0:
        extra = f"; {len(malformed)} malformed (first at line {malformed[0]})" if len(malformed) else ""
        if not n_lines or (not expected and not n_ignored and not len(malformed)):
            raise UserError(f"{path}: the log is empty (no {fmt} records; expected a training log with steps and "
                            f"losses)")
        raise UserError(f"{path}: no usable steps found for format {fmt} (expected {expected or fmt + ' records'})"
                        f"{extra}")
    # Sorted as LOSS_SERIES.sort_keys without a table sort: groups by (run, metric) (Python's str order is
    # UTF-8 byte order), and within a group the restart rule leaves steps strictly increasing.
    groups = [g for g in groups if len(g[2])]
    groups.sort(key=lambda g: (g[0], g[1]))
    keys = [(g[0], g[1]) for g in groups]
    n = [len(g[2]) for g in groups]
    table = pa.Table.from_arrays(
        [pa.chunked_array([_const(g[0], k) for g, k in zip(groups, n)], pa.string()),
         pa.chunked_array([_const(g[1], k) for g, k in zip(groups, n)], pa.string()),
         pa.array(_cat([g[2] for g in groups]), pa.int64()),
         pa.array(_cat([g[3] for g in groups]), pa.float64()),
         pa.chunked_array([pa.array(g[4], pa.int64()) if g[4] is not None else pa.nulls(k, pa.int64())
                           for g, k in zip(groups, n)], pa.int64())],
        names=["run", "metric", "step", "value", "source_line"])
    groups = None
    table = LOSS_SERIES.conform(table, source=str(path))
    if len(set(keys)) != len(keys):  # the same (run, metric) twice: not expected, but sort to be exact
        table = LOSS_SERIES.sorted(table)
    report = LogReport(
        path=str(path), format=fmt, run=run, n_lines=int(n_lines), n_values=table.num_rows,
        n_malformed=len(malformed), malformed_lines=[int(x) for x in malformed[:MAX_MALFORMED_REPORTED]],
        n_ignored=int(n_ignored), n_replaced=n_replaced,
        metrics=sorted({m for _r, m in keys}),
        runs=sorted({r for r, _m in keys}),
        trainer=FORMAT_TRAINER.get(fmt), n_out_of_order=sum(x[3] for x in out_of_order),
    )
    if len(malformed):
        log.warning("%s: %d malformed lines (first: %s)", path, len(malformed), report.malformed_lines[:5])
    if n_replaced > table.num_rows:  # a shuffled or merged log read as a chain of resumes loses most of its values
        log.warning("%s: %d values were replaced by later lines that log an earlier step (the resume rule) and %d "
                    "are kept: is this log sorted by step within each run? (a resume replaces the values from the "
                    "resume point on)", path, n_replaced, table.num_rows)
    lines_read = int(np.unique(table.column("source_line").drop_null().to_numpy()).size) if any(others.values()) else 0
    structured = fmt in ("jsonl", "csv")  # every line is a record there: one loss line of another format is a loss
    firsts = {k[1]: v for k, v in others.items() if isinstance(k, tuple)}
    counts = {k: v for k, v in others.items() if not isinstance(k, tuple)}
    for other, k in sorted(counts.items(), key=lambda kv: -kv[1]):
        if k >= (1 if structured else max(10, 0.05 * max(lines_read, 1))):  # the other format's records were ignored
            msg = (f"line {firsts.get(other, '?')}: read as {fmt}, but {k} lines look like {other} records and were "
                   f"ignored as unrelated text: a log mixing two formats? (--format {other} reads those; or split "
                   f"the log)")
            if strict and structured:
                raise UserError(f"{path}: {msg}")
            log.warning("%s: %s", path, msg)
            break
    log.info("%s", report.summary())
    return table, report


def _read_runs(path: Path, fmt: str, parts, **kw) -> tuple[pa.Table, LogReport]:
    """A log holding several runs (see :mod:`.multirun`): each part read as its own run, the tables concatenated
    and one report over all of them (its ``runs`` lists every run)."""
    tables, reports = [], []
    for name, part in parts:
        try:
            t, r = read_log(part, format=fmt, run=name, **kw)
        except UserError as err:
            raise UserError(str(err).replace(str(part), f"{path} (run {name})")) from None
        tables.append(t)
        reports.append(r)
    table = LOSS_SERIES.sorted(LOSS_SERIES.conform(pa.concat_tables(tables), source=str(path)))
    report = LogReport(
        path=str(path), format=fmt, run=reports[0].run, n_lines=max(r.n_lines for r in reports),
        n_values=table.num_rows, n_malformed=sum(r.n_malformed for r in reports),
        malformed_lines=sorted({x for r in reports for x in r.malformed_lines})[:MAX_MALFORMED_REPORTED],
        n_ignored=sum(r.n_ignored for r in reports), n_replaced=sum(r.n_replaced for r in reports),
        metrics=sorted({m for r in reports for m in r.metrics}), runs=sorted({x for r in reports for x in r.runs}),
        n_out_of_order=sum(r.n_out_of_order for r in reports))
    log.info("%s: %d runs (%s)", path, len(report.runs), ", ".join(report.runs[:10]))
    return table, report
