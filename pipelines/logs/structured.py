"""Structured logs: JSONL (W&B history rows), CSV (W&B export), Megatron's golden-values JSON and Hugging
Face ``trainer_state.json`` (``log_history``)."""

from __future__ import annotations

import io
import json
import re
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.logs.lines import _Parsed, _Series, _floats, _np, _split_lines


STEP_KEYS = ("step", "_step", "iteration", "global_step", "iter", "trainer/global_step", "train/step")


LOSS_KEYS = ("loss", "train/loss", "train_loss", "lm loss", "lm_loss", "loss/train", "train/lm_loss",
             "train/ce loss", "train/crossentropyloss", "train/loss_step")


GRAD_KEYS = ("grad_norm", "train/grad_norm", "grad norm", "optim/total grad norm", "optim/total_grad_norm",
             "gradient_norm", "train/gradient_norm")


VAL_KEYS = ("val_loss", "eval_loss", "val/loss", "eval/loss", "validation/loss", "loss/val", "valid/loss")


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
        for name, cands in (("grad_norm", GRAD_KEYS), ("val_loss", VAL_KEYS)):
            c = _pick(columns, None, cands, name, path)
            if c is not None and c not in wanted.values():
                wanted[name] = c
    if not wanted:
        raise UserError(f"{path}: no loss key found (expected one of {', '.join(LOSS_KEYS)}; use --value-key), "
                        f"keys: {', '.join(sorted(map(str, columns))[:20])}")
    return step, wanted


def _parse_jsonl(lines, path=None, step_key=None, value_key=None, metric=None, raw=None, **_):
    first = _np(pc.utf8_slice_codeunits(pc.utf8_ltrim_whitespace(lines), 0, 1))
    is_obj = first == "{"
    blank = first == ""
    n_ignored = int((~is_obj & ~blank).sum())
    idx = np.flatnonzero(is_obj)
    table = None
    if len(idx) == len(lines):  # fast path: every line is an object (Arrow's reader: no NaN literals)
        try:
            import pyarrow.json as pj

            table = pj.read_json(io.BytesIO(raw), pj.ReadOptions(block_size=1 << 24))
            if table.num_rows != len(lines):
                table = None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            table = None
    bad = []
    if table is not None:
        step, wanted = _kv_metrics(table.column_names, step_key, value_key, metric, path)
        scol = table.column(step)
        if not (pa.types.is_integer(scol.type) or pa.types.is_floating(scol.type)):
            table = None
    if table is not None:
        s = _np(pc.fill_null(pc.cast(scol, pa.float64()), np.nan)).astype(np.float64)
        s_ok = np.isfinite(s) & (s == np.round(s)) & (s >= 0)
        cols = {}
        for name, key in wanted.items():
            col = table.column(key)
            if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_null(col.type)):
                table = None
                break
            present = _np(pc.is_valid(col)).astype(bool)
            cols[name] = (present, _np(pc.fill_null(pc.cast(col, pa.float64()), np.nan)).astype(np.float64))
    if table is not None:
        nums = idx + 1
        any_val = np.zeros(len(idx), bool)
        for present, _v in cols.values():
            any_val |= present
        bad_rows = any_val & ~s_ok
        steps = np.where(s_ok, s, 0).astype(np.int64)
        series = [_Series(n, steps[p & s_ok], v[p & s_ok], nums[p & s_ok]) for n, (p, v) in cols.items()]
        n_ignored += int((~any_val).sum())
        return _Parsed(series, nums[bad_rows], '{"step": <int>, "loss": <float>}', n_ignored, len(lines), lines)
    # slow path: one json.loads per object line
    rows = []
    texts = lines.take(pa.array(idx)).to_pylist()
    keys: dict = {}
    for i, t in zip(idx, texts):
        try:
            obj = json.loads(t)
        except ValueError:
            bad.append(i + 1)
            continue
        if not isinstance(obj, dict):
            bad.append(i + 1)
            continue
        rows.append((i + 1, obj))
        if len(keys) < 4096:
            for k in obj:
                keys.setdefault(k, None)
    if not rows:
        return _Parsed([], np.array(bad, np.int64), '{"step": <int>, "loss": <float>}', n_ignored, len(lines), lines)
    step, wanted = _kv_metrics(list(keys), step_key, value_key, metric, path)
    acc = {n: ([], [], []) for n in wanted}
    for ln, obj in rows:
        s = obj.get(step)
        vals = {n: obj.get(k) for n, k in wanted.items()}
        if all(v is None for v in vals.values()):
            n_ignored += 1
            continue
        try:
            if isinstance(s, bool) or s is None:
                raise ValueError
            fs = float(s)
            if not fs.is_integer() or fs < 0:
                raise ValueError
            parsed = {n: float(v) for n, v in vals.items() if v is not None and not isinstance(v, bool)}
            if len(parsed) != sum(v is not None for v in vals.values()):
                raise ValueError
        except (TypeError, ValueError):
            bad.append(ln)
            continue
        for n, v in parsed.items():
            acc[n][0].append(int(fs))
            acc[n][1].append(v)
            acc[n][2].append(ln)
    series = [_Series(n, np.array(a, np.int64), np.array(b, np.float64), np.array(c, np.int64))
              for n, (a, b, c) in acc.items()]
    return _Parsed(series, np.array(sorted(bad), np.int64), '{"step": <int>, "loss": <float>}',
                   n_ignored, len(lines), lines)


def _parse_csv(raw: bytes, path, step_key=None, value_key=None, metric=None, **_):
    import pyarrow.csv as pcsv

    bad = []

    def on_invalid(row):
        bad.append(row.number if row.number is not None else -1)
        return "skip"

    text_lines = _split_lines(raw)
    try:
        first = pcsv.read_csv(io.BytesIO(raw.split(b"\n", 1)[0] + b"\n")).column_names
        table = pcsv.read_csv(
            io.BytesIO(raw),
            parse_options=pcsv.ParseOptions(invalid_row_handler=on_invalid),
            read_options=pcsv.ReadOptions(use_threads=False),  # so invalid rows know their line number
            convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in first},
                                                strings_can_be_null=True, null_values=[""]),
        )
    except pa.ArrowInvalid as err:
        raise UserError(f"{path}: not a readable CSV file: {str(err).splitlines()[0]}") from None
    step, wanted = _kv_metrics(table.column_names, step_key, value_key, metric, path)
    # each row's source line, assuming one physical line per row (no quoted newlines)
    nonblank = np.flatnonzero(_np(pc.utf8_length(pc.utf8_trim_whitespace(text_lines))) > 0) + 1
    nums = np.setdiff1d(nonblank[1:], np.array(bad, np.int64))
    if len(nums) != table.num_rows:
        nums = np.arange(table.num_rows, dtype=np.int64) + 2
    col = pc.utf8_trim_whitespace(table.column(step).combine_chunks())
    s, s_ok = _floats(pc.fill_null(col, ""))
    s_present = _np(pc.is_valid(col)).astype(bool)
    s_ok &= np.isfinite(s) & (np.round(s) == s) & (s >= 0)
    series = []
    any_val = np.zeros(table.num_rows, bool)
    malformed = np.zeros(table.num_rows, bool)
    for name, key in wanted.items():
        c = pc.utf8_trim_whitespace(table.column(key).combine_chunks())
        present = _np(pc.is_valid(c)).astype(bool)
        v, ok = _floats(pc.fill_null(c, ""))
        any_val |= present
        malformed |= present & ~ok
        sel = present & ok & s_ok
        series.append(_Series(name, np.where(s_ok, s, 0).astype(np.int64)[sel], v[sel], nums[sel]))
    malformed |= any_val & ~s_ok
    malformed &= s_present | any_val
    n_ignored = int((~any_val).sum())
    allbad = np.sort(np.concatenate([np.array(bad, np.int64), nums[malformed]]))
    return _Parsed(series, allbad, "'<step>,<value>,...' with an integer step and a number value",
                   n_ignored, len(text_lines), text_lines)


def _as_float(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


_GOLDEN_NAMES = {"lm loss": "train_loss", "grad norm": "grad_norm", "grad-norm": "grad_norm",
                 "consumed samples": "consumed_samples"}


def _parse_golden(raw: bytes, path, **_):
    try:
        doc = json.loads(raw)
    except ValueError as err:
        raise UserError(f"{path}: expected a golden-values JSON document, got invalid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object of metrics, got {type(doc).__name__}")
    series, bad, n = [], [], 0
    for name, spec in doc.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("values"), dict):
            bad.append(n)
            continue
        steps, vals = [], []
        for k, v in spec["values"].items():
            n += 1
            fv = _as_float(v)
            try:
                sk = int(k)
            except ValueError:
                fv = None
            if fv is None:
                bad.append(n)
                continue
            steps.append(sk)
            vals.append(fv)
        series.append(_Series(_GOLDEN_NAMES.get(name, name), np.array(steps, np.int64), np.array(vals, np.float64)))
    return _Parsed(series, np.array(bad, np.int64), '{"<metric>": {"values": {"<step>": <float>}}}', 0,
                   raw.count(b"\n") + 1)


_HF_NAMES = {"loss": "train_loss", "grad_norm": "grad_norm", "eval_loss": "val_loss", "learning_rate": "lr"}


def _parse_hf(raw: bytes, path, **_):
    try:
        doc = json.loads(raw)
        hist = doc["log_history"]
        if not isinstance(hist, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: expected a trainer_state.json with a 'log_history' list") from None
    acc = {m: ([], []) for m in _HF_NAMES.values()}
    bad, ignored = [], 0
    for i, row in enumerate(hist):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            bad.append(i + 1)
            continue
        used = False
        for key, m in _HF_NAMES.items():
            if key in row:
                fv = _as_float(row[key])
                if fv is None:
                    bad.append(i + 1)
                    continue
                acc[m][0].append(row["step"])
                acc[m][1].append(fv)
                used = True
        ignored += not used
    series = [_Series(m, np.array(s, np.int64), np.array(v, np.float64)) for m, (s, v) in acc.items() if s]
    return _Parsed(series, np.array(sorted(set(bad)), np.int64), "log_history entries with an int 'step'",
                   ignored, raw.count(b"\n") + 1)
