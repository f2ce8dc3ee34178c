"""Property tests of the log parsers (pipelines/logs/) on random input: any text or bytes, in any format, is either
read into a loss table or refused with a one-line UserError, never another exception; and a log of known records
with arbitrary junk lines between them reads back exactly those records (nothing dropped, shifted or invented)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.logs.lines import FORMATS
from spike_audit.pipelines.logs.read import read_log

_SET = settings(max_examples=int(__import__("os").environ.get("FUZZ_N", 80)), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_FORMATS = [None] + [f for f in FORMATS if f != "pattern"]


def _read(path, fmt, strict=False):
    try:
        return read_log(path, format=fmt, strict=strict,
                        pattern=r"(?P<step>\d+)\D+(?P<value>[\d.]+)" if fmt == "pattern" else None)
    except UserError as err:
        msg = str(err)
        assert msg.strip() and "\n" not in msg and "\r" not in msg, msg
        return None


_junk_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=400)
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                            lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                                       max_size=3), max_leaves=6)


@st.composite
def _random_input(draw):
    kind = draw(st.sampled_from(["bytes", "text", "jsonl", "csv", "json"]))
    if kind == "bytes":
        data = draw(st.binary(max_size=600))
    elif kind == "text":
        data = draw(_junk_text).encode("utf-8")
    elif kind == "jsonl":
        keys = st.sampled_from(["step", "_step", "iteration", "loss", "train/loss", "grad_norm", "consumed_samples",
                                "x"])
        rows = draw(st.lists(st.dictionaries(keys, _json_values, max_size=4), max_size=12))
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    elif kind == "csv":
        cell = st.one_of(st.integers(-5, 10 ** 20).map(str), st.floats().map(str), st.text("0123456789.-e,\"", max_size=6))
        rows = draw(st.lists(st.lists(cell, min_size=1, max_size=3), max_size=10))
        data = ("Step,train/loss,grad_norm\n" + "".join(",".join(r) + "\n" for r in rows)).encode()
    else:
        data = json.dumps(draw(st.one_of(
            st.fixed_dictionaries({"log_history": st.lists(st.dictionaries(st.sampled_from(["step", "loss"]),
                                                                           _json_values, max_size=2), max_size=6)}),
            st.dictionaries(st.sampled_from(["lm loss", "grad norm"]),
                            st.fixed_dictionaries({"values": st.dictionaries(st.text("0123456789x-", max_size=4),
                                                                             _json_values, max_size=6)}),
                            max_size=2),
            _json_values))).encode()
    if draw(st.booleans()):
        data = draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe"])) + data
    gz = draw(st.sampled_from([None, None, "whole", "cut"]))
    if gz:
        data = gzip.compress(data)
        if gz == "cut":
            data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return data, gz is not None, draw(st.sampled_from(_FORMATS)), draw(st.booleans())


@_SET
@given(case=_random_input())
@example(case=(b'{"step": [null, null]}\n', False, None, False))  # found by CI: Arrow's invalid list<null> array
@example(case=(b'{"_step": 1, "loss": 2.0, "x": [null, null]}\n{"_step": 2, "loss": 2.5, "x": [null]}\n', False,
               None, False))
def test_any_input_is_a_table_or_a_one_line_user_error(tmp_path, case):
    data, gz, fmt, strict = case
    path = tmp_path / ("log.gz" if gz else "log")
    path.write_bytes(data)
    got = _read(path, fmt, strict)
    if got is None:
        return
    table, report = got
    steps = table.column("step").to_numpy()
    assert (steps >= 0).all()
    assert report.n_values == table.num_rows
    assert set(table.column("metric").to_pylist()) <= set(report.metrics) | {"train_loss"}


# --------------------------------------------------------------- known records, junk between them: read exactly

_RENDER = {
    "megatron": lambda s, v: f" iteration {s:8d}/  100000 | consumed samples: {s * 8:10d} | lm loss: {v:E} |",
    "modded-nanogpt": lambda s, v: f"step:{s}/100000 train_loss:{v:.6f} train_time:{s}ms step_avg:1.00ms",
    "llmc": lambda s, v: f"s:{s} trl:{v:.6f} lr:0.000100 norm:1.0000",
    "nanogpt": lambda s, v: f"iter {s}: loss {v:.6f}, time 10.00ms, mfu 1.00%",
    "torchtitan": lambda s, v: f"[rank0]:[titan] 2025-01-01 00:00:00,000 - root - INFO - step: {s:4d}  loss: {v:8.6f}",
    "jsonl": lambda s, v: json.dumps({"step": s, "loss": v}),
}

# junk without digits cannot be a record of any format (every record has a step number); it may carry a format's
# marker ("iteration", "step:") and then is a malformed line, which is counted, never read as a value
_junk_line = st.text(st.characters(blacklist_categories=("Cs", "Nd", "Zl", "Zp", "Cc")), max_size=60).filter(
    lambda t: not any(c in t for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85") and not t.lstrip().startswith(("{", "[")))


@pytest.mark.parametrize("fmt", sorted(_RENDER))
@_SET
@given(n=st.integers(1, 40), seed=st.integers(0, 2 ** 16), junk=st.lists(_junk_line, max_size=12),
       eol=st.sampled_from(["\n", "\r\n"]))
def test_records_between_junk_lines_are_read_exactly(tmp_path, fmt, n, seed, junk, eol):
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(10 ** 6, n, replace=False)).tolist()
    values = np.round(rng.uniform(0.5, 12, n), 6).tolist()
    lines = [_RENDER[fmt](s, v) for s, v in zip(steps, values)]
    for j, text in enumerate(junk):
        at = int(rng.integers(0, len(lines) + 1))
        lines.insert(at, text)
    path = tmp_path / ("run.jsonl" if fmt == "jsonl" else "run.log")
    path.write_bytes((eol.join(lines) + eol).encode("utf-8"))
    got = _read(path, fmt)
    assert got is not None, "a log of valid records was refused"
    table, report = got
    loss = table.filter(pc.equal(table.column("metric"), "train_loss"))
    assert loss.column("step").to_pylist() == steps
    assert loss.column("value").to_pylist() == pytest.approx(values, rel=1e-6)
    assert report.n_replaced == 0


def test_a_list_of_nulls_in_a_jsonl_log_is_read_or_one_line_at_the_command_line(tmp_path, capsys):
    """``[null, null]`` makes pyarrow's JSON reader build an invalid array (an ArrowIndexError traceback before)."""
    from spike_audit.pipelines.cli.main import main

    only = tmp_path / "only.jsonl"
    only.write_text('{"step": [null, null]}\n')
    assert main(["spikes", str(only)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no loss key found" in err[0] and "Traceback" not in err[0], err
    beside = tmp_path / "beside.jsonl"
    beside.write_text("".join(json.dumps({"_step": i, "loss": 2.0 + i / 100, "x": [None, None]}) + "\n"
                              for i in range(1, 40)))
    assert main(["spikes", str(beside), "--json"]) == 0  # the list beside the loss is not a metric: ignored
    capsys.readouterr()
