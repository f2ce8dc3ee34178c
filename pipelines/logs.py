"""Readers for training-loss logs: one ``LOSS_SERIES`` table per log, plus a parse report.

Supported formats (``FORMATS``; auto-detected from the content unless ``format=`` is given):

========================  ======================================================================
``jsonl``                 one JSON object per line (``{"step": .., "loss": ..}``, W&B history rows)
``csv``                   W&B export (``Step,train/loss,...``); empty cells are missing, not errors
``megatron``              Megatron-LM / Megatron-DeepSpeed stdout ``iteration N/ M | ... lm loss: X |``
``megatron-golden``       Megatron functional-test golden values JSON (``{"lm loss": {"values": ..}}``)
``modded-nanogpt``        ``step:k/N train_loss:x ...`` (and ``val_loss`` lines)
``llmc``                  llm.c ``s:k trl:x lr:y norm:z`` / ``s:k tel:x``
``nanogpt``               nanoGPT ``iter k: loss x, time ...`` (and ``step k: train loss x, val loss y``)
``torchtitan``            ``step: k  loss: x  grad_norm: g ...`` (ANSI colours stripped)
``olmo``                  OLMo console ``[step=N/M,...]`` then ``train/CE loss=x`` lines
``hf-trainer-state``      Hugging Face ``trainer_state.json`` (``log_history``)
``tensorboard``           TensorBoard event files (a file, or a directory of ``*tfevents*`` files)
``pattern``               any text log, with ``pattern=`` a regex with named groups ``step``, ``value``
========================  ======================================================================

Metric names: ``train_loss``, ``val_loss``, ``grad_norm``, ``lr``, ``consumed_samples`` (Megatron; used
to join steps to data), or the log's own key for other scalars (golden values).

Rules every reader shares:

* Text is read whole (``.gz`` and ``.zst`` are decompressed transparently) and parsed with a few
  vectorised Arrow regex passes over all lines (``pyarrow.compute.extract_regex``), not a Python loop
  per line (JSONL falls back to ``json.loads`` per line only when Arrow's JSON reader rejects the file).
* A line that carries the format's *marker* (e.g. ``step:`` at the start for modded-nanogpt) but does
  not parse is *malformed*: counted, its line number reported, and with ``strict=True`` the first one
  raises ``UserError("path:LINE: expected ..., got ...")``. Lines without the marker are *ignored*
  (counted, not errors). NaN / inf values are kept as logged.
* Restarts: within one (run, metric), a value survives only if no later line logs a step ``<=`` its
  step. So a repeated step is replaced by the later value, and a step going back (a resume from an
  earlier checkpoint) replaces every earlier value at steps ``>=`` the resume point. The number of
  replaced values is reported.
* Several runs in one file: for formats that print the planned total (``k/N``), a file in which
  ``N`` changes holds several runs (concatenated logs, excerpts). Each ``N`` then becomes its own run
  ``{run}@{N}`` (so a resume that also changed ``--train-iters`` shows up as two runs).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.errors import UserError
from schemas import LOSS_SERIES

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = (
    "jsonl",
    "csv",
    "megatron",
    "megatron-golden",
    "modded-nanogpt",
    "llmc",
    "nanogpt",
    "torchtitan",
    "olmo",
    "hf-trainer-state",
    "tensorboard",
    "pattern",
)

STEP_KEYS = ("step", "_step", "iteration", "global_step", "iter", "trainer/global_step", "train/step")
LOSS_KEYS = ("loss", "train/loss", "train_loss", "lm loss", "lm_loss", "loss/train", "train/lm_loss",
             "train/ce loss", "train/crossentropyloss", "train/loss_step")
GRAD_KEYS = ("grad_norm", "train/grad_norm", "grad norm", "optim/total grad norm", "optim/total_grad_norm",
             "gradient_norm", "train/gradient_norm")
VAL_KEYS = ("val_loss", "eval_loss", "val/loss", "eval/loss", "validation/loss", "loss/val", "valid/loss")

MAX_MALFORMED_REPORTED = 10

# A number as trainers print it, including nan / -nan / inf / infinity (case-insensitive).
_NUMBER = r"(?i)^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?|nan|inf(?:inity)?)$"
_ANSI = r"\x1b\[[0-9;]*[A-Za-z]"


@dataclass
class LogReport:
    path: str
    format: str
    run: str
    n_lines: int
    n_values: int
    n_malformed: int
    malformed_lines: list[int]
    n_ignored: int
    n_replaced: int
    metrics: list[str]
    runs: list[str] = field(default_factory=list)  # several when one file holds several runs (see module doc)

    def summary(self) -> str:
        bad = ""
        if self.n_malformed:
            first = ", ".join(map(str, self.malformed_lines[:5]))
            bad = f", {self.n_malformed} malformed (lines {first}{', ...' if self.n_malformed > 5 else ''})"
        return (f"{self.path} [{self.format}]: {self.n_lines} lines, {self.n_values} values "
                f"({', '.join(self.metrics)}){bad}, {self.n_ignored} unrelated lines ignored, "
                f"{self.n_replaced} replaced by resume")

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class _Series:
    metric: str
    steps: np.ndarray  # int64, file order
    values: np.ndarray  # float64
    lines: np.ndarray | None = None  # int64 1-based source lines, or None (binary / JSON documents)
    totals: np.ndarray | None = None  # int64 planned total per value (-1 unknown), or None


@dataclass
class _Parsed:
    series: list[_Series]
    malformed: np.ndarray  # 1-based line numbers (or record numbers)
    expected: str
    n_ignored: int = 0
    n_lines: int = 0
    text_lines: pa.Array | None = None  # for error messages


# ----------------------------------------------------------------------------------------------
# small vectorised helpers


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _split_lines(data: bytes | str) -> pa.Array:
    """All lines of a text as one Arrow string array, without a Python object per line."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            data = data.decode("utf-8", errors="replace").encode("utf-8")
    if data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        return pa.array([], pa.large_string())
    whole = pa.LargeStringArray.from_buffers(
        1, pa.py_buffer(np.array([0, len(data)], dtype=np.int64)), pa.py_buffer(data))
    lines = pc.split_pattern(whole, "\n").flatten()
    if b"\r" in data:
        lines = pc.utf8_rtrim(lines, "\r")
    return lines


def _np(arr) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.to_numpy(zero_copy_only=False)


def _match(lines: pa.Array, regex: str) -> np.ndarray:
    return _np(pc.match_substring_regex(lines, regex)).astype(bool, copy=False)


def _floats(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Parse number strings; returns (values with NaN where invalid, ok mask). Nulls are not ok."""
    ok = _np(pc.fill_null(pc.match_substring_regex(strings, _NUMBER), False)).astype(bool, copy=False)
    clean = pc.if_else(pa.array(ok), strings, pa.scalar(None, strings.type))
    vals = _np(pc.cast(clean, pa.float64())).astype(np.float64)
    return vals, ok


def _ints(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    ok = _np(pc.fill_null(pc.match_substring_regex(strings, r"^\d{1,18}$"), False)).astype(bool, copy=False)
    clean = pc.if_else(pa.array(ok), strings, pa.scalar("0", strings.type))
    return _np(pc.cast(clean, pa.int64())).astype(np.int64), ok


def _subset(lines: pa.Array, marker: str) -> tuple[pa.Array, np.ndarray, int]:
    """Lines carrying ``marker``, their 1-based numbers, and how many non-blank lines lack it."""
    has = _match(lines, marker)
    idx = np.flatnonzero(has)
    n_ignored = int((~has & ~_blank(lines)).sum())
    return lines.take(pa.array(idx)), idx + 1, n_ignored


def _blank(lines: pa.Array) -> np.ndarray:
    return _match(lines, r"^\s*$")


def _group(struct_arr: pa.Array, name: str) -> pa.Array:
    return pc.struct_field(struct_arr, name)


# ----------------------------------------------------------------------------------------------
# text formats


def _parse_kind_lines(lines, marker, pattern, kinds, expected, extra=None):
    """Generic line parser: ``pattern`` has groups ``step``, optional ``total``, ``kind`` (mapped to
    a metric by ``kinds``) and ``value``; ``extra`` maps metric -> regex with group ``v`` for optional
    further values on the same line (a present but unparsable one makes the line malformed)."""
    sub, nums, n_ignored = _subset(lines, marker)
    m = pc.extract_regex(sub, pattern)
    matched = _np(pc.is_valid(m)).astype(bool)
    steps, ok_s = _ints(pc.fill_null(_group(m, "step"), ""))
    vals, ok_v = _floats(pc.fill_null(_group(m, "value"), ""))
    good = matched & ok_s & ok_v
    totals = None
    if "(?P<total>" in pattern:
        totals, ok_t = _ints(pc.fill_null(_group(m, "total"), ""))
        totals = np.where(ok_t, totals, -1)
    kind = pc.fill_null(_group(m, "kind"), "") if "(?P<kind>" in pattern else None
    series = []
    extras = {}
    for metric, regex in (extra or {}).items():
        e = pc.extract_regex(sub, regex)
        present = _np(pc.is_valid(e)).astype(bool)
        ev, eok = _floats(pc.fill_null(_group(e, "v"), ""))
        good &= ~present | eok
        extras[metric] = (present, ev)
    for k, metric in kinds.items():
        sel = good & _np(pc.equal(kind, k)).astype(bool) if kind is not None else good
        series.append(_mk(metric, steps, vals, nums, totals, sel))
    for metric, (present, ev) in extras.items():
        series.append(_mk(metric, steps, ev, nums, totals, good & present))
    return _Parsed(series, nums[~good], expected, n_ignored, len(lines), lines)


def _mk(metric, steps, vals, nums, totals, sel) -> _Series:
    return _Series(metric, steps[sel], vals[sel], nums[sel], None if totals is None else totals[sel])


def _parse_modded(lines, **_):
    return _parse_kind_lines(
        lines, r"^step:\d",
        r"^step:(?P<step>\d+)/(?P<total>\d+) (?P<kind>train_loss|val_loss):(?P<value>[^\s]+)",
        {"train_loss": "train_loss", "val_loss": "val_loss"},
        "'step:<int>/<int> train_loss:<float>' (or val_loss)")


def _parse_llmc(lines, **_):
    return _parse_kind_lines(
        lines, r"^s:\d",
        r"^s:(?P<step>\d+) (?P<kind>trl|tel):(?P<value>[^\s]+)",
        {"trl": "train_loss", "tel": "val_loss"},
        "'s:<int> trl:<float> lr:<float> norm:<float>' or 's:<int> tel:<float>'",
        extra={"grad_norm": r" norm:(?P<v>[^\s]*)", "lr": r" lr:(?P<v>[^\s]*)"})


def _parse_nanogpt(lines, **_):
    a = _parse_kind_lines(lines, r"^iter \d", r"^iter (?P<step>\d+): loss (?P<value>[^,\s]+)",
                          {"": "train_loss"}, "'iter <int>: loss <float>, time ...'")
    b = _parse_kind_lines(lines, r"^step \d+: train loss",
                          r"^step (?P<step>\d+): train loss [^,\s]+, val loss (?P<value>[^,\s]+)",
                          {"": "val_loss"}, "'step <int>: train loss <float>, val loss <float>'")
    both = _match(lines, r"^iter \d|^step \d+: train loss")
    blank = _blank(lines)
    n_ignored = int((~both & ~blank).sum())
    return _Parsed(a.series + b.series, np.sort(np.concatenate([a.malformed, b.malformed])), a.expected,
                   n_ignored, len(lines), lines)


def _parse_torchtitan(lines, **_):
    if _match(lines, "\x1b").any():
        lines = pc.replace_substring_regex(lines, _ANSI, "")
    return _parse_kind_lines(
        lines, r"\bstep:\s*\d+\s+loss",
        r"\bstep:\s*(?P<step>\d+)\s+loss:\s*(?P<value>[^\s]+)",
        {"": "train_loss"}, "'step: <int>  loss: <float> ...'",
        extra={"grad_norm": r"\bgrad_norm:\s*(?P<v>[^\s]*)"})


def _parse_megatron(lines, **_):
    marker = r"\biteration\s+\d+\s*/\s*\d+"
    sub, nums, n_ignored = _subset(lines, marker)
    head = pc.extract_regex(sub, r"\biteration\s+(?P<step>\d+)\s*/\s*(?P<total>\d+)\s*\|")
    good = _np(pc.is_valid(head)).astype(bool)
    good &= _np(pc.ends_with(pc.utf8_rtrim_whitespace(sub), "|")).astype(bool)  # else truncated
    steps, ok_s = _ints(pc.fill_null(_group(head, "step"), ""))
    totals, ok_t = _ints(pc.fill_null(_group(head, "total"), ""))
    good &= ok_s & ok_t
    fields = {"train_loss": r"\|\s*lm loss:\s*(?P<v>[^\s|]*)",
              "grad_norm": r"\|\s*grad norm:\s*(?P<v>[^\s|]*)",
              "consumed_samples": r"\|\s*consumed samples:\s*(?P<v>[^\s|]*)"}
    got = {}
    for metric, regex in fields.items():
        e = pc.extract_regex(sub, regex)
        present = _np(pc.is_valid(e)).astype(bool)
        v, ok = _floats(pc.fill_null(_group(e, "v"), ""))
        good &= ~present | ok
        got[metric] = (present, v)
    series = [_mk(m, steps, v, nums, totals, good & present) for m, (present, v) in got.items()]
    return _Parsed(series, nums[~good], "'iteration <int>/ <int> | ... | lm loss: <float> | ... |'",
                   n_ignored, len(lines), lines)


def _parse_olmo(lines, **_):
    header_re = r"\[step=(?P<step>\d+)/(?P<total>[^,\]]+)"
    metric_res = {"train_loss": r"train/(?:CE loss|CrossEntropyLoss)=(?P<v>[^\s,]*)",
                  "grad_norm": r"optim/total grad norm=(?P<v>[^\s,]*)"}
    is_head = _match(lines, r"\[step=\d")
    is_metric = _match(lines, "|".join(r.split("=")[0] + "=" for r in metric_res.values()))
    blank = _blank(lines)
    n_ignored = int((~is_head & ~is_metric & ~blank).sum())
    hidx = np.flatnonzero(is_head)
    h = pc.extract_regex(lines.take(pa.array(hidx)), header_re)
    hsteps, hok = _ints(pc.fill_null(_group(h, "step"), ""))
    htot, tok = _ints(pc.fill_null(_group(h, "total"), ""))
    bad = [hidx[~hok] + 1]
    hidx, hsteps, htot = hidx[hok], hsteps[hok], np.where(tok, htot, -1)[hok]
    midx = np.flatnonzero(is_metric)
    owner = np.searchsorted(hidx, midx, side="right") - 1  # the header at or before each metric line
    orphan = owner < 0
    bad.append(midx[orphan] + 1)
    sub = lines.take(pa.array(midx))
    series = []
    for metric, regex in metric_res.items():
        e = pc.extract_regex(sub, regex)
        present = _np(pc.is_valid(e)).astype(bool)
        v, ok = _floats(pc.fill_null(_group(e, "v"), ""))
        bad.append(midx[present & ~ok & ~orphan] + 1)
        sel = present & ok & ~orphan
        o = owner[sel]
        series.append(_Series(metric, hsteps[o], v[sel], midx[sel] + 1, htot[o]))
    return _Parsed(series, np.unique(np.concatenate(bad)),
                   "'[step=<int>/<int>,...]' followed by 'train/CE loss=<float>'", n_ignored, len(lines), lines)


def _parse_pattern(lines, pattern=None, metric=None, **_):
    if not pattern:
        raise UserError("--format pattern needs --pattern REGEX with named groups (?P<step>...) and (?P<value>...)")
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise UserError(f"--pattern: not a valid regular expression: {err}") from None
    if not {"step", "value"} <= set(rx.groupindex):
        raise UserError(f"--pattern: expected named groups 'step' and 'value', got {sorted(rx.groupindex)}")
    try:
        m = pc.extract_regex(lines, pattern)
    except pa.ArrowInvalid:  # a Python-only construct (look-around, ...): one compiled regex per line
        py = [rx.search(s) for s in lines.to_pylist()]
        m = pa.array([None if x is None else {"step": x.group("step"), "value": x.group("value")} for x in py],
                     pa.struct([("step", pa.string()), ("value", pa.string())]))
    matched = _np(pc.is_valid(m)).astype(bool)
    idx = np.flatnonzero(matched)
    m = m.take(pa.array(idx))
    steps, ok_s = _ints(pc.utf8_trim_whitespace(pc.fill_null(_group(m, "step"), "")))
    vals, ok_v = _floats(pc.utf8_trim_whitespace(pc.fill_null(_group(m, "value"), "")))
    good = ok_s & ok_v
    blank = _blank(lines)
    nums = idx + 1
    return _Parsed([_Series(metric or "train_loss", steps[good], vals[good], nums[good])], nums[~good],
                   f"a match of {pattern!r} with an integer step and a number value",
                   int((~matched & ~blank).sum()), len(lines), lines)


# ----------------------------------------------------------------------------------------------
# key/value formats (JSONL, CSV)


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


# ----------------------------------------------------------------------------------------------
# JSON documents


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


# ----------------------------------------------------------------------------------------------
# TensorBoard event files: TFRecord framing + the few protobuf fields we need


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field_number, wire_type, value) of a protobuf message (value: int or bytes)."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        fno, wt = key >> 3, key & 7
        if wt == 0:
            v, pos = _varint(buf, pos)
        elif wt == 1:
            v, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            ln, pos = _varint(buf, pos)
            v, pos = buf[pos:pos + ln], pos + ln
        elif wt == 5:
            v, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if pos > n:
            raise ValueError("truncated message")
        yield fno, wt, v


# TensorProto dtype -> struct format of tensor_content
_TF_DTYPES = {1: "<f", 2: "<d", 19: "<e", 3: "<i", 9: "<q"}


def _tensor_scalar(buf: bytes) -> float | None:
    dtype, content, vals = 1, None, []
    for fno, wt, v in _fields(buf):
        if fno == 1:
            dtype = v
        elif fno == 4:
            content = v
        elif fno == 5:  # float_val
            vals += list(struct.unpack(f"<{len(v) // 4}f", v)) if wt == 2 else [struct.unpack("<f", v)[0]]
        elif fno == 6:  # double_val
            vals += list(struct.unpack(f"<{len(v) // 8}d", v)) if wt == 2 else [struct.unpack("<d", v)[0]]
        elif fno == 13 and wt == 0:  # half_val (single)
            vals.append(struct.unpack("<e", struct.pack("<H", v & 0xFFFF))[0])
    if content is not None:
        if dtype == 14:  # bfloat16
            if len(content) == 2:
                return struct.unpack("<f", b"\x00\x00" + content)[0]
            return None
        fmt = _TF_DTYPES.get(dtype)
        if fmt is None or len(content) != struct.calcsize(fmt):
            return None
        return float(struct.unpack(fmt, content)[0])
    return float(vals[0]) if len(vals) == 1 else None


def _tb_records(data: bytes):
    """Yield (record_number, event_bytes); a truncated tail yields (n, None)."""
    pos, n, i = 0, len(data), 0
    while pos < n:
        i += 1
        if pos + 12 > n:
            yield i, None
            return
        (length,) = struct.unpack_from("<Q", data, pos)
        start = pos + 12
        if start + length + 4 > n:
            yield i, None
            return
        yield i, data[start:start + length]
        pos = start + length + 4


def _tb_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and "tfevents" in p.name)
        if not files:
            raise UserError(f"{path}: no TensorBoard event files (*tfevents*) in this directory")
        return files
    return [path]


def _parse_tensorboard(path: Path, tag=None, metric=None, **_):
    scalars: dict[str, tuple[list, list]] = {}
    bad, n_records, ignored = [], 0, 0
    for f in _tb_files(path):
        data = _read_bytes(f)
        for i, rec in _tb_records(data):
            n_records += 1
            if rec is None:
                bad.append(n_records)
                continue
            try:
                step, summary = 0, None
                for fno, _wt, v in _fields(rec):
                    if fno == 2:
                        step = v
                    elif fno == 5:
                        summary = v
                if summary is None:
                    ignored += 1
                    continue
                for fno, _wt, v in _fields(summary):
                    if fno != 1:
                        continue
                    t, val = None, None
                    for vf, vwt, vv in _fields(v):
                        if vf == 1:
                            t = vv.decode("utf-8", "replace")
                        elif vf == 2 and vwt == 5:
                            val = struct.unpack("<f", vv)[0]
                        elif vf == 8:
                            val = _tensor_scalar(vv)
                    if t is not None and val is not None:
                        s, vals = scalars.setdefault(t, ([], []))
                        s.append(step if step < 1 << 63 else step - (1 << 64))
                        vals.append(val)
            except (ValueError, IndexError, struct.error):
                bad.append(n_records)
    tags = sorted(scalars)
    chosen = {}
    if tag:
        if tag not in scalars:
            raise UserError(f"{path}: no scalar tag {tag!r} (tags: {', '.join(tags[:30]) or 'none'})")
        chosen[metric or "train_loss"] = tag
    else:
        main = _pick(tags, None, LOSS_KEYS, "tag", path)
        if main is None:
            lossy = [t for t in tags if "loss" in t.lower() and not re.search(r"val|eval|test", t.lower())]
            main = lossy[0] if lossy else None
        if main is not None:
            chosen[metric or "train_loss"] = main
        for name, cands in (("grad_norm", GRAD_KEYS), ("val_loss", VAL_KEYS)):
            c = _pick(tags, None, cands, name, path)
            if c is not None and c not in chosen.values():
                chosen[name] = c
        if not chosen:
            raise UserError(f"{path}: no scalar tag containing 'loss' (tags: {', '.join(tags[:30]) or 'none'}); "
                            f"use --tag")
    series = [_Series(m, np.array(scalars[t][0], np.int64), np.array(scalars[t][1], np.float64))
              for m, t in chosen.items()]
    return _Parsed(series, np.array(bad, np.int64), "a complete TFRecord event", ignored, n_records)


# ----------------------------------------------------------------------------------------------
# detection


_SNIFF = (  # (format, regex over a line) in priority order for ties
    ("modded-nanogpt", re.compile(r"^step:\d+/\d+ (?:train|val)_loss:")),
    ("llmc", re.compile(r"^s:\d+ (?:trl|tel):")),
    ("megatron", re.compile(r"\biteration\s+\d+\s*/\s*\d+\s*\|")),
    ("nanogpt", re.compile(r"^iter \d+: loss ")),
    ("olmo", re.compile(r"\[step=\d+/")),
    ("torchtitan", re.compile(r"\bstep:\s*\d+\s+loss:")),
)


def _strip_compression(name: str) -> str:
    for suf in (".gz", ".zst"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def detect_format(path) -> str:
    """Guess a log's format from its name and first lines; ``UserError`` if nothing fits."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        if any("tfevents" in p.name for p in path.rglob("*")):
            return "tensorboard"
        raise UserError(f"{path}: is a directory without TensorBoard event files")
    name = _strip_compression(path.name).lower()
    if "tfevents" in name:
        return "tensorboard"
    with open(path, "rb") as fh:
        head = fh.read(1 << 22)
    if head[:2] == b"\x1f\x8b" or head[:4] == b"\x28\xb5\x2f\xfd":
        head = _read_bytes(path)[: 1 << 22]
    if len(head) >= 12 and b"\x00" in head[:64]:
        return "tensorboard"  # binary: TFRecord framing starts with a little-endian uint64 length
    text = head.decode("utf-8", errors="replace")
    if "\x1b" in text:
        text = re.sub(_ANSI, "", text)
    stripped = text.lstrip()
    if stripped.startswith("{") and not name.endswith(".jsonl"):
        probe = stripped[:4096]
        if '"log_history"' in text:
            return "hf-trainer-state"
        if re.search(r'"values"\s*:\s*\{', probe) or re.search(r'"step_interval"', probe):
            return "megatron-golden"
        if "\n" in stripped.rstrip() and re.match(r"\{[^\n]*\}\s*\n\s*\{", stripped):
            return "jsonl"
        if name.endswith(".json"):
            return "megatron-golden"
    lines = [ln for ln in text.splitlines()[:20000] if ln.strip()]  # a long preamble is fine
    if name.endswith(".jsonl") or (lines and sum(ln.lstrip().startswith("{") for ln in lines[:50]) >= 0.8 * min(50, len(lines))):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    counts = {fmt: 0 for fmt, _ in _SNIFF}
    for i, ln in enumerate(lines):
        if i >= 2000 and any(counts.values()):
            break
        for fmt, rx in _SNIFF:
            if rx.search(ln):
                counts[fmt] += 1
                break
    best = max(counts, key=lambda k: counts[k])
    if counts[best]:
        return best
    if lines and "," in lines[0] and re.search(r"(?i)step|iter", lines[0]):
        return "csv"
    raise UserError(f"{path}: unknown log format (first line: {lines[0][:80]!r}); pass --format "
                    f"({', '.join(FORMATS)}) or --pattern" if lines else f"{path}: empty log")


# ----------------------------------------------------------------------------------------------
# entry point


_TEXT = {"modded-nanogpt": _parse_modded, "llmc": _parse_llmc, "nanogpt": _parse_nanogpt,
         "torchtitan": _parse_torchtitan, "megatron": _parse_megatron, "olmo": _parse_olmo,
         "pattern": _parse_pattern, "jsonl": _parse_jsonl}
_RAW = {"csv": _parse_csv, "megatron-golden": _parse_golden, "hf-trainer-state": _parse_hf}


def _const(value: str, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), pa.array([value], pa.string())).cast(pa.string())


def _resolve_restarts(steps: np.ndarray) -> np.ndarray:
    """Keep mask: a value survives iff every later value (same run and metric) has a larger step."""
    n = len(steps)
    keep = np.ones(n, bool)
    if n > 1:
        later_min = np.minimum.accumulate(steps[::-1])[::-1]
        keep[:-1] = steps[:-1] < later_min[1:]
    return keep


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
