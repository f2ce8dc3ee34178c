"""Trainers' console output, parsed by vectorised regex passes over all lines: Megatron-LM, nanoGPT,
modded-nanogpt, llm.c, torchtitan, OLMo, and any text log with a user's ``pattern=`` regex."""

from __future__ import annotations

import re
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.logs.lines import (_ANSI, _Parsed, _Series, _blank, _bools, _floats, _group, _ints, _match, _mk,
                                              _no_nul, _np, _parse_kind_lines, _single_record, _subset)


def _parse_modded(lines, **_):
    return _parse_kind_lines(
        lines, r"^step:",
        r"^step:(?P<step>\d+)/(?P<total>\d+) (?P<kind>train_loss|val_loss):(?P<value>[^\s]+)",
        {"train_loss": "train_loss", "val_loss": "val_loss"},
        "'step:<int>/<int> train_loss:<float>' (or val_loss)", record=r"step:[^\s/]+/\d+ (?:train|val)_loss:")


def _parse_llmc(lines, **_):
    return _parse_kind_lines(
        lines, r"^s:\S",
        r"^s:(?P<step>\d+) (?P<kind>trl|tel):(?P<value>[^\s]+)",
        {"trl": "train_loss", "tel": "val_loss"},
        "'s:<int> trl:<float> lr:<float> norm:<float>' or 's:<int> tel:<float>'",
        extra={"grad_norm": r" norm:(?P<v>[^\s]*)", "lr": r" lr:(?P<v>[^\s]*)"}, record=r"s:[^\s:]+ t[re]l:")


def _parse_nanogpt(lines, **_):
    a = _parse_kind_lines(lines, r"^iter (?:[-+]?\d|\S+: loss)", r"^iter (?P<step>\d+): loss (?P<value>[^,\s]+)",
                          {"": "train_loss"}, "'iter <int>: loss <float>, time ...'", record=r"\biter \S+: loss")
    b = _parse_kind_lines(lines, r"^step \S+: train loss",
                          r"^step (?P<step>\d+): train loss [^,\s]+, val loss (?P<value>[^,\s]+)",
                          {"": "val_loss"}, "'step <int>: train loss <float>, val loss <float>'",
                          record=r"\bstep \S+: train loss")
    both = _match(lines, r"^iter (?:[-+]?\d|\S+: loss)|^step \S+: train loss")
    blank = _blank(lines)
    n_ignored = int((~both & ~blank).sum())
    return _Parsed(a.series + b.series, np.sort(np.concatenate([a.malformed, b.malformed])), a.expected,
                   n_ignored, len(lines), lines)


def _parse_torchtitan(lines, **_):
    if _match(lines, "\x1b").any():
        lines = pc.replace_substring_regex(lines, _ANSI, "")
    return _parse_kind_lines(
        lines, r"\bstep:\s*\S+\s+loss",
        r"\bstep:\s*(?P<step>\d+)\s+loss:\s*(?P<value>[^\s]+)",
        {"": "train_loss"}, "'step: <int>  loss: <float> ...'",
        extra={"grad_norm": r"\bgrad_norm:\s*(?P<v>[^\s]*)"}, record=r"\bstep:\s*\S+\s+loss")


def _parse_megatron(lines, **_):
    marker = r"\biteration\s+[-+]?[\w.]+\s*/\s*[-+]?\d+"
    sub, nums, n_ignored = _subset(lines, marker)
    head = pc.extract_regex(sub, r"\biteration\s+(?P<step>\d+)\s*/\s*(?P<total>\d+)\s*\|")
    good = _bools(pc.is_valid(head))
    good &= _bools(pc.ends_with(pc.utf8_rtrim_whitespace(sub), "|"))  # else truncated
    good &= _single_record(sub, marker)  # two ranks' records on one line: never one step with another's values
    good &= _no_nul(sub)  # a crash's zeros joining two records
    steps, ok_s = _ints(pc.fill_null(_group(head, "step"), ""))
    totals, ok_t = _ints(pc.fill_null(_group(head, "total"), ""))
    good &= ok_s & ok_t
    fields = {"train_loss": r"\|\s*lm loss:\s*(?P<v>[^\s|]*)",
              "grad_norm": r"\|\s*grad norm:\s*(?P<v>[^\s|]*)",
              "consumed_samples": r"\|\s*consumed samples:\s*(?P<v>[^\s|]*)"}
    got = {}
    for metric, regex in fields.items():
        e = pc.extract_regex(sub, regex)
        present = _bools(pc.is_valid(e))
        v, ok = _floats(pc.fill_null(_group(e, "v"), ""))
        good &= ~present | ok
        got[metric] = (present, v)
    series = [_mk(m, steps, v, nums, totals, good & present) for m, (present, v) in got.items()]
    return _Parsed(series, nums[~good], "'iteration <int>/ <int> | ... | lm loss: <float> | ... |'",
                   n_ignored, len(lines), lines)


def _parse_olmo(lines, state=None, **_):
    """Metric lines belong to the ``[step=N/M]`` header at or before them; ``state['olmo_header']`` carries the
    last header (step, total) into the next chunk."""
    state = {} if state is None else state
    header_re = r"\[step=(?P<step>\d+)/(?P<total>[^,\]]+)"
    metric_res = {"train_loss": r"train/(?:CE loss|CrossEntropyLoss)=(?P<v>[^\s,]*)",
                  "grad_norm": r"optim/total grad norm=(?P<v>[^\s,]*)"}
    is_head = _match(lines, r"\[step=")
    is_metric = _match(lines, "|".join(r.split("=")[0] + "=" for r in metric_res.values()))
    blank = _blank(lines)
    n_ignored = int((~is_head & ~is_metric & ~blank).sum())
    hidx = np.flatnonzero(is_head)
    h = pc.extract_regex(lines.take(pa.array(hidx)), header_re)
    hsteps, hok = _ints(pc.fill_null(_group(h, "step"), ""))
    htot, tok = _ints(pc.fill_null(_group(h, "total"), ""))
    hok &= _no_nul(lines.take(pa.array(hidx)))
    bad = [hidx[~hok] + 1]
    hidx, hsteps, htot = hidx[hok], hsteps[hok], np.where(tok, htot, -1)[hok]
    carried = state.get("olmo_header")
    # a virtual header at position -1: the last one of the previous chunk (if any)
    hidx = np.concatenate([[-1], hidx])
    hsteps = np.concatenate([[carried[0] if carried else 0], hsteps]).astype(np.int64)
    htot = np.concatenate([[carried[1] if carried else -1], htot]).astype(np.int64)
    if len(hidx) > 1:
        state["olmo_header"] = (int(hsteps[-1]), int(htot[-1]))
    midx = np.flatnonzero(is_metric)
    owner = np.searchsorted(hidx, midx, side="right") - 1  # the header at or before each metric line
    orphan = (owner == 0) if carried is None else np.zeros(len(midx), bool)
    bad.append(midx[orphan] + 1)
    sub = lines.take(pa.array(midx))
    # a metric line holds one name=value: two are a line cut off by the next one (its value may be cut too)
    merged = (~_single_record(sub, "=") | ~_no_nul(sub)) & ~is_head[midx]
    bad.append(midx[merged] + 1)
    orphan = orphan | merged
    series = []
    for metric, regex in metric_res.items():
        e = pc.extract_regex(sub, regex)
        present = _bools(pc.is_valid(e))
        v, ok = _floats(pc.fill_null(_group(e, "v"), ""))
        bad.append(midx[present & ~ok & ~orphan] + 1)
        sel = present & ok & ~orphan
        # a header owns one value per metric: a second one is a later step's line whose header was cut off
        # (merged into the line before it), never read as this step's value
        seen = np.zeros(len(sel), bool)
        first = np.unique(owner[sel], return_index=True)[1]
        seen[np.flatnonzero(sel)[first]] = True
        bad.append(midx[sel & ~seen] + 1)
        sel &= seen
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
    matched = _bools(pc.is_valid(m))
    idx = np.flatnonzero(matched)
    m = m.take(pa.array(idx))
    steps, ok_s = _ints(pc.utf8_trim_whitespace(pc.fill_null(_group(m, "step"), "")))
    vals, ok_v = _floats(pc.utf8_trim_whitespace(pc.fill_null(_group(m, "value"), "")))
    good = ok_s & ok_v & _no_nul(lines.take(pa.array(idx)))
    blank = _blank(lines)
    nums = idx + 1
    return _Parsed([_Series(metric or "train_loss", steps[good], vals[good], nums[good])], nums[~good],
                   f"a match of {pattern!r} with an integer step and a number value",
                   int((~matched & ~blank).sum()), len(lines), lines)
