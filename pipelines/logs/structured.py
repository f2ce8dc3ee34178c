"""Structured logs: JSONL (W&B history rows), CSV (W&B export), Megatron's golden-values JSON and Hugging
Face ``trainer_state.json`` (``log_history``)."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.logs.lines import _NUMBER, _Parsed, _Series, _bools, _floats, _np


STEP_KEYS = ("step", "_step", "iteration", "global_step", "iter", "trainer/global_step", "train/step")


LOSS_KEYS = ("loss", "train/loss", "train_loss", "lm loss", "lm_loss", "loss/train", "train/lm_loss",
             "train/ce loss", "train/crossentropyloss", "train/loss_step")


GRAD_KEYS = ("grad_norm", "train/grad_norm", "grad norm", "optim/total grad norm", "optim/total_grad_norm",
             "gradient_norm", "train/gradient_norm")


VAL_KEYS = ("val_loss", "eval_loss", "val/loss", "eval/loss", "validation/loss", "loss/val", "valid/loss")


#: exact counts of what the run consumed, which pin a step to its batch (``run`` checks them against the manifest):
#: Megatron's consumed samples; OLMo-core's ``throughput/total tokens`` (its ``global_train_tokens_seen``, exact in
#: W&B / JSONL metrics; the console rounds it, so the console reader does not take it)
CONSUMED_SAMPLES_KEYS = ("consumed_samples", "consumed samples", "consumed-samples")
CONSUMED_TOKENS_KEYS = ("consumed_tokens", "throughput/total tokens", "throughput/total_tokens")


log = logging.getLogger(__name__)


def _pick(columns, explicit, candidates, what, path):
    if explicit:
        if explicit in columns:
            return explicit
        raise UserError(f"{path}: no {what} key {explicit!r} (keys: {', '.join(sorted(map(str, columns))[:20])})")
    low = {}
    for c in columns:
        name = str(c)
        base = name.split(" - ", 1)[1] if " - " in name else name  # W&B export: "<run> - train/loss"
        low.setdefault(base.lower(), c)
    for cand in candidates:
        if cand in low:
            return low[cand]
    if what == "grad_norm":  # e.g. "optim/grad_norm", "train/global_grad_norm"
        for base in sorted(low):
            if re.search(r"grad(?:ient)?[_ ]?norm", base) and not base.endswith(("__min", "__max")):
                return low[base]
    return None


def _kv_metrics(columns, step_key, value_key, metric, path):
    step = _pick(columns, step_key, STEP_KEYS, "step", path)
    if step is None:
        raise UserError(f"{path}: no step key found (expected one of {', '.join(STEP_KEYS)}; "
                        f"use --step-key), keys: {', '.join(sorted(map(str, columns))[:20])}")
    wanted = {}
    main = _pick(columns, value_key, LOSS_KEYS, "value", path)
    if main is not None:
        wanted[metric or "train_loss"] = main
    if not value_key:
        for name, cands in (("grad_norm", GRAD_KEYS), ("val_loss", VAL_KEYS),
                            ("consumed_samples", CONSUMED_SAMPLES_KEYS), ("consumed_tokens", CONSUMED_TOKENS_KEYS)):
            c = _pick(columns, None, cands, name, path)
            if c is not None and c not in wanted.values():
                wanted[name] = c
    if not wanted:
        raise UserError(f"{path}: no loss key found (expected one of {', '.join(LOSS_KEYS)}; use --value-key), "
                        f"keys: {', '.join(sorted(map(str, columns))[:20])}")
    return step, wanted


MAX_STEP_FROM_FLOAT = 2 ** 53  # a step written as a float is exact only up to 2^53
_INT64_MAX = 2 ** 63 - 1
_EXPECTED_JSONL = '{"step": <int>, "loss": <float>} (step a non-negative integer)'
_MAX_KEYS_LISTED = 4096
_MAX_GRAD_LIKE = 8  # keys kept because they look like a grad norm (the first seen; the alphabetically first wins)
_GRAD_RE = re.compile(r"grad(?:ient)?[_ ]?norm")
_ALL_KEYS = frozenset(STEP_KEYS + LOSS_KEYS + GRAD_KEYS + VAL_KEYS + CONSUMED_SAMPLES_KEYS + CONSUMED_TOKENS_KEYS)


def _base(key: str) -> str:
    name = str(key)
    return (name.split(" - ", 1)[1] if " - " in name else name).lower()


def _float_steps(f: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 steps, ok): ok where ``f`` is a non-negative integral float no larger than 2^53."""
    with np.errstate(invalid="ignore"):
        ok = present & np.isfinite(f) & (f >= 0) & (f <= MAX_STEP_FROM_FLOAT) & (np.round(f) == f)
    return np.where(ok, f, 0).astype(np.int64), ok


class _KeyColumn:
    """One candidate key's values over the parsed JSONL rows, in pieces (numpy only)."""

    def __init__(self):
        self.pieces: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, row0, present, fval, fok, ival, iok):
        self.pieces.append((row0, present, fval, fok, ival, iok))

    def full(self, n: int):
        present, fok, iok = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        fval, ival = np.full(n, np.nan), np.zeros(n, np.int64)
        for row0, p, fv, fo, iv, io in self.pieces:
            sl = slice(row0, row0 + len(p))
            present[sl], fval[sl], fok[sl], ival[sl], iok[sl] = p, fv, fo, iv, io
        return present, fval, fok, ival, iok


_ASCII_NUMBER = re.compile(_NUMBER, re.ASCII)  # what the text readers accept: ASCII digits only


def _py_value(v) -> tuple[bool, float, bool, int, bool]:
    """(present, float value, value ok, int step, step ok) of one JSON value."""
    if v is None:
        return False, np.nan, False, 0, False
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return True, np.nan, False, 0, False
    if isinstance(v, int):
        try:
            f = float(v)
        except OverflowError:  # an integer beyond float64: it overflowed
            f = math.inf if v > 0 else -math.inf
        return True, f, True, (v if 0 <= v <= _INT64_MAX else 0), 0 <= v <= _INT64_MAX
    if isinstance(v, str) and not _ASCII_NUMBER.fullmatch(v):  # float() would take '\u0663' (3), ' 3', '1_0'
        return True, np.nan, False, 0, False
    try:
        f = float(v)
    except (ValueError, OverflowError):
        return True, np.nan, False, 0, False
    ok = math.isfinite(f) and f.is_integer() and 0 <= f <= MAX_STEP_FROM_FLOAT
    return True, f, True, int(f) if ok else 0, ok


class _JsonlParser:
    """JSONL, streamed: each chunk's object lines are parsed (Arrow's JSON reader, or ``json.loads`` per line
    when it rejects the chunk: NaN literals, mixed types, a broken line) and only the candidate keys' values are
    kept, as numpy arrays; the step and value keys are chosen at the end from every key seen."""

    def __init__(self, path=None, step_key=None, value_key=None, metric=None, strict=False, **_):
        self.path, self.step_key, self.value_key, self.metric = path, step_key, value_key, metric
        self.strict = strict
        self.keys: dict[str, None] = {}
        self.cols: dict[str, _KeyColumn] = {}
        self.row_lines: list[np.ndarray] = []
        self.n_rows = 0
        self._cand: dict[str, bool] = {}
        self._grad_like = 0
        self.nested: set = set()  # keys whose values are JSON objects (their keys are not read)

    def _is_candidate(self, key: str) -> bool:
        c = self._cand.get(key)
        if c is None:
            base = _base(key)
            c = key in (self.step_key, self.value_key) or base in _ALL_KEYS
            if not c and _GRAD_RE.search(base) and not base.endswith(("__min", "__max")) and (
                    self._grad_like < _MAX_GRAD_LIKE):
                self._grad_like += 1
                c = True
            self._cand[key] = c
            if c or len(self.keys) < _MAX_KEYS_LISTED:
                self.keys.setdefault(key, None)
        return c

    def _arrow(self, table: pa.Table) -> dict | None:
        """Candidate columns of an Arrow-parsed chunk, or None if one has a type only the slow path handles."""
        out = {}
        for key in table.column_names:
            if len(self.nested) < 8 and pa.types.is_struct(table.schema.field(key).type):
                self.nested.add(key)  # {"train": {"loss": ...}}: named if no loss key is found
            if not self._is_candidate(key):
                continue
            t = table.schema.field(key).type
            if not (pa.types.is_null(t) or pa.types.is_integer(t) or pa.types.is_floating(t)):
                # (checked before the data is touched: Arrow's JSON reader builds an invalid list<null> array
                # for [null, null], whose combine_chunks was an ArrowIndexError traceback)
                return None
            col = table.column(key).combine_chunks()
            n = len(col)
            if pa.types.is_null(t):
                z = np.zeros(n, bool)
                out[key] = (z, np.full(n, np.nan), z, np.zeros(n, np.int64), z)
                continue
            present = _bools(pc.is_valid(col))
            fval = _np(pc.fill_null(pc.cast(col, pa.float64()), np.nan)).astype(np.float64)
            if pa.types.is_integer(t):
                ival = _np(pc.fill_null(pc.cast(col, pa.int64(), safe=False), 0)).astype(np.int64)
                iok = present & (ival >= 0)
                if pa.types.is_unsigned_integer(t):
                    iok &= fval <= _INT64_MAX
                ival = np.where(iok, ival, 0)
            else:
                ival, iok = _float_steps(fval, present)
            out[key] = (present, fval, present.copy(), ival, iok)
        return out

    def _python(self, texts: list[str], nums: np.ndarray) -> tuple[dict, np.ndarray, list[int]]:
        """Slow path: json.loads per line. Returns (candidate columns, kept row positions, malformed lines)."""
        objs, keep, bad = [], [], []

        def pairs(items):  # an object naming a step/metric key twice is ambiguous: the line is malformed
            obj = dict(items)
            if len(obj) != len(items):
                seen = set()
                for k, _ in items:
                    if k in seen and self._is_candidate(k):
                        raise ValueError(f"key {k!r} twice")
                    seen.add(k)
            return obj

        for i, t in enumerate(texts):
            try:
                obj = json.loads(t, object_pairs_hook=pairs)
            except (ValueError, RecursionError):
                bad.append(int(nums[i]))
                continue
            if not isinstance(obj, dict):
                bad.append(int(nums[i]))
                continue
            objs.append(obj)
            keep.append(i)
            for k in obj:
                self._is_candidate(k)
        cols = {}
        cands = [k for k, c in self._cand.items() if c]
        for key in cands:
            vals = [_py_value(o.get(key)) for o in objs]
            if not any(v[0] for v in vals):
                continue
            cols[key] = (np.fromiter((v[0] for v in vals), bool, len(vals)),
                         np.fromiter((v[1] for v in vals), np.float64, len(vals)),
                         np.fromiter((v[2] for v in vals), bool, len(vals)),
                         np.fromiter((v[3] for v in vals), np.int64, len(vals)),
                         np.fromiter((v[4] for v in vals), bool, len(vals)))
        return cols, np.asarray(keep, np.int64), bad

    def feed(self, chunk) -> _Parsed:
        lines = chunk.lines
        first = pc.utf8_slice_codeunits(pc.utf8_ltrim_whitespace(lines), 0, 1)
        is_obj = _bools(pc.equal(first, "{"))
        blank = _bools(pc.equal(first, ""))
        n_ignored = int((~is_obj & ~blank).sum())
        idx = np.flatnonzero(is_obj)
        nums = idx + 1  # chunk-relative line numbers
        cols, keep, bad = None, None, []
        if len(idx):
            data = chunk.data if len(idx) == len(lines) else pc.binary_join(
                pa.ListArray.from_arrays(pa.array([0, len(idx)], pa.int32()), lines.take(pa.array(idx))),
                pa.scalar("\n", lines.type))[0].as_buffer().to_pybytes()
            try:
                import pyarrow.json as pj

                table = pj.read_json(io.BytesIO(data), pj.ReadOptions(block_size=max(1 << 20, len(data) + 1)))
                if table.num_rows == len(idx):
                    cols, keep = self._arrow(table), np.arange(len(idx))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                cols = None
            if cols is None:
                cols, keep, bad = self._python(lines.take(pa.array(idx)).to_pylist(), nums)
        if keep is not None and len(keep):
            for key, (p, fv, fo, iv, iok) in cols.items():
                self.cols.setdefault(key, _KeyColumn()).add(self.n_rows, p, fv, fo, iv, iok)
            self.row_lines.append(nums[keep] + chunk.first_line - 1)
            self.n_rows += len(keep)
        return _Parsed([], np.asarray(bad, np.int64), _EXPECTED_JSONL, n_ignored, len(lines))

    def finish(self) -> _Parsed:
        if not self.n_rows:
            return _Parsed([], np.zeros(0, np.int64), _EXPECTED_JSONL, 0, 0)
        try:
            step, wanted = _kv_metrics(list(self.keys), self.step_key, self.value_key, self.metric, self.path)
        except UserError as err:
            if not self.nested:
                raise
            raise UserError(f"{err}; the values of {', '.join(map(repr, sorted(self.nested)))} are JSON objects, whose "
                            f"keys are not read (write flat keys such as 'train/loss', or give --pattern)") from None
        n = self.n_rows
        lines = np.concatenate(self.row_lines)
        empty = _KeyColumn()
        _sp, _sf, _sfo, steps, s_ok = self.cols.get(step, empty).full(n)
        vals = {name: self.cols.get(key, empty).full(n)[:3] for name, key in wanted.items()}
        any_val = np.zeros(n, bool)
        bad_val = np.zeros(n, bool)
        for present, _v, ok in vals.values():
            any_val |= present
            bad_val |= present & ~ok
        bad = any_val & (~s_ok | bad_val)
        self._unread_losses(wanted, lines, s_ok, n)
        series = [_Series(name, steps[sel], v[sel], lines[sel])
                  for name, (present, v, ok) in vals.items() for sel in [present & ok & ~bad]]
        return _Parsed(series, lines[bad], _EXPECTED_JSONL, int((~any_val).sum()), 0)

    def _unread_losses(self, wanted: dict, lines: np.ndarray, s_ok: np.ndarray, n: int) -> None:
        """Records with a step and another loss key than the one read (a logger renamed ``loss`` to
        ``train/loss`` halfway): never left out silently; an error under ``--strict``."""
        main = wanted.get(self.metric or "train_loss")
        if main is None or self.value_key:
            return
        empty = _KeyColumn()
        has_main = self.cols.get(main, empty).full(n)[0]
        for key in LOSS_KEYS:
            if key == main or key in wanted.values() or key not in self.cols:
                continue
            other = self.cols[key].full(n)[0] & s_ok & ~has_main
            if other.any():
                first = int(lines[np.flatnonzero(other)[0]])
                msg = (f"line {first}: {int(other.sum())} records hold a step and {key!r} but not {main!r}, the loss "
                       f"key read: they are not read (a renamed key? --value-key {key} reads them)")
                if self.strict:
                    raise UserError(f"{self.path}: {msg}")
                log.warning("%s: %s", self.path, msg)


class _CsvParser:
    """CSV (W&B export), streamed: the header (the first non-blank line) picks the step and value columns; each
    chunk is parsed with the header in front, only those columns, as strings. A row's line number is its first
    physical line (a quoted value may hold newlines)."""

    expected = "'<step>,<value>,...' with an integer step and a number value"

    def __init__(self, path=None, step_key=None, value_key=None, metric=None, **_):
        self.path, self.step_key, self.value_key, self.metric = path, step_key, value_key, metric
        self.header: bytes | None = None

    def _read(self, data: bytes, columns: list[str], bad: list):
        import pyarrow.csv as pcsv

        def on_invalid(row):
            bad.append(row.number if row.number is not None else -1)
            return "skip"

        try:
            return pcsv.read_csv(
                io.BytesIO(data),
                parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
                read_options=pcsv.ReadOptions(use_threads=False, block_size=max(1 << 20, len(data) + 1)),
                convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                                    include_columns=columns, strings_can_be_null=True,
                                                    null_values=[""]))
        except pa.ArrowInvalid as err:
            raise UserError(f"{self.path}: not a readable CSV file: {str(err).splitlines()[0]}") from None

    def feed(self, chunk) -> _Parsed:
        import pyarrow.csv as pcsv

        lines = chunk.lines
        # a record's first physical line: not blank, and not inside a quoted field that began on an earlier line
        # (an odd count of '"' before it; an escaped "" counts two), so a value holding a newline shifts no number
        quotes = _np(pc.count_substring(lines, '"')).astype(np.int64)
        inside = ((np.cumsum(quotes) - quotes) & 1).astype(bool)
        nonblank = np.flatnonzero((_np(pc.utf8_length(pc.utf8_trim_whitespace(lines))) > 0) & ~inside) + 1
        if self.header is None:
            if not len(nonblank):
                return _Parsed([], np.zeros(0, np.int64), self.expected, 0, len(lines))
            h = int(nonblank[0])
            self.header = lines[h - 1].as_py().encode("utf-8")
            try:
                names = pcsv.read_csv(io.BytesIO(self.header + b"\n")).column_names
            except pa.ArrowInvalid as err:
                raise UserError(f"{self.path}:{h}: not a readable CSV header: {str(err).splitlines()[0]}") from None
            self.step, self.wanted = _kv_metrics(names, self.step_key, self.value_key, self.metric, self.path)
            twice = sorted({n for n in (self.step, *self.wanted.values()) if names.count(n) > 1})
            if twice:  # which of two columns of one name holds the values is a guess: refuse it
                raise UserError(f"{self.path}:{h}: the CSV header names column {twice[0]!r} twice "
                                f"({names.count(twice[0])} columns); expected one column per key")
            self.columns = list(dict.fromkeys([self.step, *self.wanted.values()]))
            data, shift, nonblank = chunk.data, 0, nonblank[1:]  # blank lines before the header are skipped
        else:
            data, shift = self.header + b"\n" + chunk.data, 1
        if not len(nonblank):  # nothing but the header (or blank lines) in this chunk
            return _Parsed([], np.zeros(0, np.int64), self.expected, 0, len(lines))
        bad: list[int] = []
        table = self._read(data, self.columns, bad)
        bad = np.asarray(bad, np.int64) - shift
        nums = np.setdiff1d(nonblank, bad)
        if len(nums) != table.num_rows:
            nums = np.arange(table.num_rows, dtype=np.int64) + (1 if shift else 2)
        col = pc.utf8_trim_whitespace(table.column(self.step).combine_chunks())
        s, s_ok = _floats(pc.fill_null(col, ""))
        s_present = _bools(pc.is_valid(col))
        steps, s_ok = _float_steps(s, s_ok)
        series = []
        any_val = np.zeros(table.num_rows, bool)
        malformed = np.zeros(table.num_rows, bool)
        for name, key in self.wanted.items():
            c = pc.utf8_trim_whitespace(table.column(key).combine_chunks())
            present = _bools(pc.is_valid(c))
            v, ok = _floats(pc.fill_null(c, ""))
            any_val |= present
            malformed |= present & ~ok
            sel = present & ok & s_ok
            series.append(_Series(name, steps[sel], v[sel], nums[sel]))
        malformed |= any_val & ~s_ok
        malformed &= s_present | any_val
        allbad = np.sort(np.concatenate([bad, nums[malformed]]))
        return _Parsed(series, allbad, self.expected, int((~any_val).sum()), len(lines))

    def finish(self) -> None:
        return None


def _as_float(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except OverflowError:  # an integer beyond float64
        return math.inf if v > 0 else -math.inf
    except (TypeError, ValueError):
        return None


def _as_step(v) -> int | None:
    """A JSON step: a non-negative integer that fits int64 (or an integral float <= 2^53), else None."""
    present, _f, _fok, step, ok = _py_value(v)
    return step if present and ok else None


_GOLDEN_NAMES = {"lm loss": "train_loss", "grad norm": "grad_norm", "grad-norm": "grad_norm",
                 "consumed samples": "consumed_samples"}


def _parse_golden(raw: bytes, path, **_):
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise UserError(f"{path}: expected a golden-values JSON document, got invalid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object of metrics, got {type(doc).__name__}")
    series, bad, n = [], [], 0
    odd = None  # the first metric whose 'values' is not an object (named if no metric can be read)
    for name, spec in doc.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("values"), dict):
            bad.append(max(n, 1))
            if odd is None:
                got = type(spec.get("values")).__name__ if isinstance(spec, dict) and "values" in spec else (
                    "no 'values'" if isinstance(spec, dict) else type(spec).__name__)
                odd = (name, got)
            continue
        steps, vals = [], []
        for k, v in spec["values"].items():
            n += 1
            fv = _as_float(v)
            sk = int(k) if re.fullmatch(r"\d{1,18}", str(k).strip()) else None  # < 2^63: never wraps
            if sk is None:
                fv = None
            if fv is None:
                bad.append(n)
                continue
            steps.append(sk)
            vals.append(fv)
        st_, va = np.array(steps, np.int64), np.array(vals, np.float64)
        o = np.argsort(st_, kind="stable")  # keys of an object name their steps; their order means nothing
        series.append(_Series(_GOLDEN_NAMES.get(name, name), st_[o], va[o]))
    if not series and odd is not None:
        raise UserError(f"{path}: metric {odd[0]!r}: expected 'values' to be an object {{\"<step>\": <float>}} "
                        f"(golden values with their step numbers), got {odd[1]}")
    return _Parsed(series, np.array(bad, np.int64), '{"<metric>": {"values": {"<step>": <float>}}}', 0,
                   raw.count(b"\n") + 1)


_HF_NAMES = {"loss": "train_loss", "grad_norm": "grad_norm", "eval_loss": "val_loss", "learning_rate": "lr"}


def _parse_hf(raw: bytes, path, **_):
    try:
        doc = json.loads(raw)
        hist = doc["log_history"]
        if not isinstance(hist, list):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise UserError(f"{path}: expected a trainer_state.json with a 'log_history' list") from None
    acc = {m: ([], []) for m in _HF_NAMES.values()}
    bad, ignored = [], 0
    for i, row in enumerate(hist):
        step = _as_step(row.get("step")) if isinstance(row, dict) and isinstance(row.get("step"), int) else None
        if step is None:
            bad.append(i + 1)
            continue
        used = False
        for key, m in _HF_NAMES.items():
            if key in row:
                fv = _as_float(row[key])
                if fv is None:
                    bad.append(i + 1)
                    continue
                acc[m][0].append(step)
                acc[m][1].append(fv)
                used = True
        ignored += not used
    # by step: a resumed Trainer restores log_history from the checkpoint and appends to it, so going back in it is
    # never a resume (a file merged or reordered by a tool); entries of one step keep their order (the last wins)
    series = []
    for m, (s, v) in acc.items():
        if s:
            st_, va = np.array(s, np.int64), np.array(v, np.float64)
            o = np.argsort(st_, kind="stable")
            series.append(_Series(m, st_[o], va[o]))
    return _Parsed(series, np.array(sorted(set(bad)), np.int64),
                   "log_history entries with a non-negative integer 'step'",
                   ignored, raw.count(b"\n") + 1)
