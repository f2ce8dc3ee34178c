"""Log readers: round trips through every format, damaged input, restarts, and the real public logs."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.logs.lines import FORMATS
from spike_audit.pipelines.logs.read import read_log
from spike_audit.pipelines.logs.sniff import detect_format
from spike_audit.schemas import LOSS_SERIES, validate

FIX = Path(__file__).parent / "fixtures" / "logs"
NANOGPT = FIX / "modded-nanogpt"
MEGATRON = FIX / "megatron"
HSET = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------
# renderers: a (steps, values) series -> the text of a log in each format, one line per step


def _num(v: float) -> str:
    return repr(float(v))


def r_modded(s, v):
    return [f"step:{a}/100000 train_loss:{_num(b)} train_time:{a * 3}ms step_avg:3.00ms" for a, b in zip(s, v)]


def r_llmc(s, v):
    return [f"s:{a} trl:{_num(b)} lr:0.000600 norm:{_num(abs(b) / 2 if math.isfinite(b) else b)}"
            for a, b in zip(s, v)]


def r_nanogpt(s, v):
    return [f"iter {a}: loss {_num(b)}, time 35.12ms, mfu 12.00%" for a, b in zip(s, v)]


def r_torchtitan(s, v):
    return [f"[rank0]:[titan] 2025-01-01 10:00:00,000 - root - INFO - \x1b[31mstep: {a:2d}  \x1b[32mloss: "
            f"{_num(b)}  \x1b[38;2;180;60;0mgrad_norm:  1.2500  \x1b[33mmemory: 40.12GiB(50.75%)\x1b[39m"
            for a, b in zip(s, v)]


def r_megatron(s, v):
    return [f"[default7]: iteration {a:8d}/  500000 | consumed samples: {a * 2048:12d} | elapsed time per "
            f"iteration (ms): 1000.0 | learning rate: 1.000E-04 | global batch size:  2048 | lm loss: {b:E} | "
            f"loss scale: 1.0 | grad norm: 0.250 | number of skipped iterations:   0 | number of nan iterations:"
            f"   0 |" for a, b in zip(s, v)]


def r_olmo(s, v):
    out = []
    for a, b in zip(s, v):
        out.append(f"2025-01-01 10:00:00.000 host:0 olmo_core.train:123 INFO [step={a}/100000,epoch=1]")
        out.append(f"    train/CE loss={_num(b)}")
        out.append("    train/PPL=12.5")
    return out


def r_jsonl(s, v):
    return [json.dumps({"_step": int(a), "train/loss": float(b), "lr": 1e-4}) for a, b in zip(s, v)]


def r_csv(s, v):
    return ["Step,my-run - train/loss,my-run - train/loss__MIN"] + [f"{a},{_num(b)},{_num(b)}" for a, b in zip(s, v)]


def r_pattern(s, v):
    return [f"custom trainer | it={a} | objective={_num(b)}" for a, b in zip(s, v)]


LINE_FORMATS = {  # format -> (renderer, lines per value, line offset of the value line, value parser)
    "modded-nanogpt": (r_modded, 1, 0, float),
    "llmc": (r_llmc, 1, 0, float),
    "nanogpt": (r_nanogpt, 1, 0, float),
    "torchtitan": (r_torchtitan, 1, 0, float),
    "megatron": (r_megatron, 1, 0, lambda b: float(f"{b:E}")),
    "olmo": (r_olmo, 3, 1, float),
    "jsonl": (r_jsonl, 1, 0, float),
    "pattern": (r_pattern, 1, 0, float),
}
PATTERN = r"it=(?P<step>\d+) \| objective=(?P<value>\S+)"


def _read(path, fmt, **kw):
    if fmt == "pattern":
        kw.setdefault("pattern", PATTERN)
    return read_log(path, **kw)


def _train(table: pa.Table, metric="train_loss"):
    t = table.filter(pa.compute.equal(table.column("metric"), metric))
    return t.column("step").to_numpy(), t.column("value").to_numpy(), t.column("source_line").to_pylist()


finite_or_not = st.one_of(
    st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False),
    st.sampled_from([float("nan"), float("inf")]),
)


@st.composite
def series(draw, min_size=1, max_size=40):
    steps = sorted(draw(st.sets(st.integers(0, 10**7), min_size=min_size, max_size=max_size)))
    values = draw(st.lists(finite_or_not, min_size=len(steps), max_size=len(steps)))
    return np.array(steps, np.int64), np.array(values, np.float64)


# ---------------------------------------------------------------------------------------------
# round trips and damage, every line format


@pytest.mark.parametrize("fmt", sorted(LINE_FORMATS))
@HSET
@given(data=series())
def test_round_trip_line_formats(tmp_path, fmt, data):
    steps, values = data
    render, per, off, conv = LINE_FORMATS[fmt]
    path = tmp_path / f"run.{'jsonl' if fmt == 'jsonl' else 'log'}"
    path.write_text("\n".join(render(steps, values)) + "\n")
    if fmt != "pattern":
        assert detect_format(path) == fmt
    table, report = _read(path, fmt if fmt == "pattern" else None)
    validate(table, LOSS_SERIES)
    s, v, lines = _train(table)
    np.testing.assert_array_equal(s, steps)
    np.testing.assert_array_equal(v, np.array([conv(x) for x in values]))
    assert lines == [i * per + off + 1 for i in range(len(steps))]
    assert report.format == fmt and report.run == "run"
    assert report.n_malformed == 0 and report.n_replaced == 0


@pytest.mark.parametrize("fmt", sorted(LINE_FORMATS))
@HSET
@given(data=series(min_size=2), garbage=st.lists(st.text("abcdefgh ijk.,-", min_size=1, max_size=30).filter(
    lambda t: t.strip()), min_size=1, max_size=10), seed=st.integers(0, 2**32 - 1))
def test_garbage_lines_are_ignored_and_counted(tmp_path, fmt, data, garbage, seed):
    steps, values = data
    render, _per, _off, conv = LINE_FORMATS[fmt]
    lines = render(steps, values)
    rng = np.random.default_rng(seed)
    for g in garbage:
        lines.insert(int(rng.integers(0, len(lines) + 1)), g)
    path = tmp_path / "run.log"
    path.write_text("\n".join(lines) + "\n")
    table, report = _read(path, fmt, format=fmt)
    s, v, _ = _train(table)
    np.testing.assert_array_equal(s, steps)
    np.testing.assert_array_equal(v, np.array([conv(x) for x in values]))
    extra = {"olmo": 1}.get(fmt, 0) * len(steps)  # the train/PPL lines OLMo prints are unrelated too
    assert report.n_ignored == len(garbage) + extra
    assert report.n_malformed == 0


TRUNCATE_AT = {  # a prefix of the value line that still carries the format's marker
    "modded-nanogpt": "step:12/100000 train_lo",
    "llmc": "s:12 tr",
    "nanogpt": "iter 12: loss ",
    "torchtitan": "step: 12  loss: ",
    "megatron": "[default7]: iteration       12/  500000 | consumed samples:",
    "olmo": "    train/CE loss=",
    "jsonl": '{"_step": 12, "train/lo',
    "pattern": "custom trainer | it=12 | objective=x1",
}


@pytest.mark.parametrize("fmt", sorted(LINE_FORMATS))
@HSET
@given(data=series(min_size=3), where=st.integers(0, 10**6))
def test_truncated_line_is_malformed_and_strict_names_file_and_line(tmp_path, fmt, data, where):
    steps, values = data
    render, per, off, _conv = LINE_FORMATS[fmt]
    lines = render(steps, values)
    k = where % len(steps)
    lineno = k * per + off + 1
    lines[lineno - 1] = TRUNCATE_AT[fmt]
    path = tmp_path / "run.log"
    path.write_text("\n".join(lines) + "\n")
    table, report = _read(path, fmt, format=fmt)
    s, _v, _ = _train(table)
    np.testing.assert_array_equal(s, np.delete(steps, k))
    assert report.n_malformed == 1 and report.malformed_lines == [lineno]
    with pytest.raises(UserError, match=rf"^{path}:{lineno}: expected .+, got "):
        _read(path, fmt, format=fmt, strict=True)


@pytest.mark.parametrize("fmt", sorted(LINE_FORMATS))
@HSET
@given(data=series(min_size=4, max_size=30), cut=st.integers(0, 10**6), resume=st.integers(0, 10**6))
def test_restart_later_values_win(tmp_path, fmt, data, cut, resume):
    """Log to step[cut], crash, resume from step[resume] <= step[cut]: the earlier values from the resume
    point on are replaced by the re-logged ones."""
    steps, values = data
    render, _per, _off, conv = LINE_FORMATS[fmt]
    cut = 1 + cut % (len(steps) - 1)  # first run logged steps[:cut]
    resume = resume % cut  # resumed from steps[resume]
    rerun = values[resume:] * 1.5 + 0.25
    lines = render(steps[:cut], values[:cut]) + render(steps[resume:], rerun)
    path = tmp_path / "run.log"
    path.write_text("\n".join(lines) + "\n")
    table, report = _read(path, fmt, format=fmt)
    s, v, _ = _train(table)
    np.testing.assert_array_equal(s, steps)
    np.testing.assert_array_equal(v, np.array([conv(x) for x in np.concatenate([values[:resume], rerun])]))
    assert report.n_replaced >= cut - resume  # llm.c / megatron also replace their grad norms etc.


def test_restart_counts_exactly(tmp_path):
    path = tmp_path / "r.log"
    path.write_text("\n".join(r_modded([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) + r_modded([3, 4], [9, 9])
                              + r_modded([4, 5, 6], [7, 7, 7])) + "\n")
    table, report = read_log(path)
    s, v, lines = _train(table)
    assert s.tolist() == [1, 2, 3, 4, 5, 6]
    assert v.tolist() == [5, 4, 9, 7, 7, 7]
    assert lines == [1, 2, 6, 8, 9, 10]
    assert report.n_replaced == 4  # old 3, 4, 5 and the first re-logged 4


def test_nan_and_inf_are_kept(tmp_path):
    path = tmp_path / "n.log"
    path.write_text("step:1/9 train_loss:3.5 x\nstep:2/9 train_loss:nan x\nstep:3/9 train_loss:-nan x\n"
                    "step:4/9 train_loss:inf x\n")
    table, _ = read_log(path)
    v = _train(table)[1]
    assert v[0] == 3.5 and np.isnan(v[1]) and np.isnan(v[2]) and v[3] == np.inf


# ---------------------------------------------------------------------------------------------
# key/value and document formats


@HSET
@given(data=series(), nan_rows=st.booleans())
def test_jsonl_keys_and_both_paths(tmp_path, data, nan_rows):
    steps, values = data
    if not nan_rows:
        values = np.where(np.isfinite(values), values, 1.0)  # all-JSON-standard: Arrow's fast reader
    rows = [{"iteration": int(a), "lm loss": float(b), "grad_norm": 0.5, "note": "x"} for a, b in zip(steps, values)]
    rows.insert(0, {"iteration": 0, "eval": 1})  # a row without a loss: ignored, not malformed
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table, report = read_log(path)
    s, v, lines = _train(table)
    np.testing.assert_array_equal(s, steps)
    np.testing.assert_array_equal(v, values)
    assert lines == list(range(2, len(steps) + 2))
    assert set(report.metrics) == {"train_loss", "grad_norm"}
    assert report.n_ignored == 1 and report.n_malformed == 0


def test_jsonl_explicit_keys_and_bad_rows(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"t": 1, "obj": 2.5}\n{"t": 2, "obj": "oops"}\n{"t": 3, "obj": 2.0\nnot json\n{"t": 4, "obj": 1.5}\n')
    with pytest.raises(UserError, match="no step key found"):
        read_log(path)
    table, report = read_log(path, step_key="t", value_key="obj", metric="objective")
    s, v, _ = _train(table, "objective")
    assert s.tolist() == [1, 4] and v.tolist() == [2.5, 1.5]
    assert report.malformed_lines == [2, 3] and report.n_ignored == 1
    with pytest.raises(UserError, match=r"h.jsonl:2: expected"):
        read_log(path, step_key="t", value_key="obj", strict=True)


@HSET
@given(data=series(), holes=st.lists(st.integers(0, 10**6), max_size=5))
def test_csv_wandb_export_round_trip_with_empty_cells(tmp_path, data, holes):
    steps, values = data
    lines = r_csv(steps, values)
    empty = sorted({h % len(steps) for h in holes})[: len(steps) - 1]  # keep at least one value
    for k in empty:
        lines[k + 1] = f"{steps[k]},,"
    path = tmp_path / "export.csv"
    path.write_text("\n".join(lines) + "\n")
    assert detect_format(path) == "csv"
    table, report = read_log(path)
    s, v, src = _train(table)
    keep = np.setdiff1d(np.arange(len(steps)), empty)
    np.testing.assert_array_equal(s, steps[keep])
    np.testing.assert_array_equal(v, values[keep])
    assert src == [int(k) + 2 for k in keep]
    assert report.n_malformed == 0 and report.n_ignored == len(empty)


def test_csv_bad_cells_and_short_rows(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("Step,train/loss\n1,3.0\n2,abc\n3\n4,2.0\n")
    table, report = read_log(path)
    assert _train(table)[0].tolist() == [1, 4]
    assert report.malformed_lines == [3, 4]
    with pytest.raises(UserError, match=r"e.csv:3: expected"):
        read_log(path, strict=True)


@HSET
@given(data=series(), interval=st.integers(1, 10))
def test_megatron_golden_values_round_trip(tmp_path, data, interval):
    steps, values = data
    doc = {"lm loss": {"start_step": int(steps[0]), "end_step": int(steps[-1]), "step_interval": interval,
                       "values": {str(a): (float(b) if math.isfinite(b) else "nan") for a, b in zip(steps, values)}},
           "num-zeros": {"start_step": 0, "end_step": 0, "step_interval": 1, "values": {"0": 5}}}
    path = tmp_path / "golden_values_dev.json"
    path.write_text(json.dumps(doc, indent=4))
    assert detect_format(path) == "megatron-golden"
    table, report = read_log(path)
    s, v, lines = _train(table)
    np.testing.assert_array_equal(s, steps)
    np.testing.assert_array_equal(v, np.where(np.isfinite(values), values, np.nan))
    assert lines == [None] * len(steps) and "num-zeros" in report.metrics


def test_hf_trainer_state(tmp_path):
    hist = [{"step": 10, "loss": 2.5, "grad_norm": 1.5, "learning_rate": 1e-4, "epoch": 0.1},
            {"step": 20, "loss": 2.25, "grad_norm": 1.25, "learning_rate": 1e-4},
            {"step": 20, "eval_loss": 2.4, "eval_runtime": 3.0},
            {"step": 30, "loss": "bad"}, {"train_runtime": 100.0}]
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"global_step": 30, "log_history": hist}))
    assert detect_format(path) == "hf-trainer-state"
    table, report = read_log(path)
    assert _train(table)[0].tolist() == [10, 20]
    assert _train(table, "val_loss")[1].tolist() == [2.4]
    assert _train(table, "grad_norm")[1].tolist() == [1.5, 1.25]
    assert report.n_malformed == 2 and report.run == "trainer_state"


# ---------------------------------------------------------------------------------------------
# TensorBoard, checked against an independent writer


tbx = pytest.importorskip("tensorboardX")


@HSET
@given(data=series(max_size=30))
def test_tensorboard_round_trip(tmp_path, data):
    steps, values = data
    logdir = tmp_path / f"tb{abs(hash(steps.tobytes())) % 10**9}"
    with tbx.SummaryWriter(str(logdir)) as w:
        for a, b in zip(steps, values):
            w.add_scalar("train/loss", float(b), int(a))
            w.add_scalar("throughput/tps", 1000.0, int(a))
            w.add_scalar("optim/grad_norm", 0.5, int(a))
    files = sorted(logdir.glob("*tfevents*"))
    assert detect_format(files[0]) == "tensorboard" and detect_format(logdir) == "tensorboard"
    table, report = read_log(logdir)
    s, v, lines = _train(table)
    np.testing.assert_array_equal(s, steps)
    np.testing.assert_array_equal(v, values.astype(np.float32).astype(np.float64))
    assert lines == [None] * len(steps)
    assert report.metrics == ["grad_norm", "train_loss"]
    table2, _ = read_log(files[0], tag="throughput/tps", metric="tps")
    assert _train(table2, "tps")[1].tolist() == [1000.0] * len(steps)


def test_tensorboard_truncated_file_counts_the_broken_record(tmp_path):
    with tbx.SummaryWriter(str(tmp_path)) as w:
        for i in range(5):
            w.add_scalar("loss", 1.0 + i, i)
    f = next(tmp_path.glob("*tfevents*"))
    f.write_bytes(f.read_bytes()[:-7])
    table, report = read_log(f)
    assert _train(table)[0].tolist() == [0, 1, 2, 3]
    assert report.n_malformed == 1
    with pytest.raises(UserError, match="record"):
        read_log(f, strict=True)
    with pytest.raises(UserError, match="no scalar tag 'nope'"):
        read_log(f, tag="nope")


# ---------------------------------------------------------------------------------------------
# errors


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_log(tmp_path / "missing.log")
    p = tmp_path / "x.log"
    p.write_text("hello\nworld\n")
    with pytest.raises(UserError, match="unknown log format"):
        read_log(p)
    with pytest.raises(UserError, match="unknown log format 'foo'"):
        read_log(p, format="foo")
    with pytest.raises(UserError, match="no usable steps"):
        read_log(p, format="modded-nanogpt")
    with pytest.raises(UserError, match="named groups"):
        read_log(p, pattern=r"(?P<step>\d+)")
    assert "pattern" in FORMATS and len(set(FORMATS)) == len(FORMATS)


def test_python_only_pattern_falls_back(tmp_path):
    p = tmp_path / "x.log"
    p.write_text("a 1 2.5\nb 2 3.5\na 3 4.5\n")
    table, _ = read_log(p, pattern=r"(?<=a )(?P<step>\d+) (?P<value>\S+)")  # look-behind: not RE2
    assert _train(table)[0].tolist() == [1, 3]


def test_gzip_and_run_name(tmp_path):
    p = tmp_path / "myrun.log.gz"
    p.write_bytes(gzip.compress("\n".join(r_modded([1, 2], [3.0, 2.0])).encode()))
    table, report = read_log(p)
    assert report.run == "myrun" and set(table.column("run").to_pylist()) == {"myrun"}
    table, report = read_log(p, run="other")
    assert set(table.column("run").to_pylist()) == {"other"}


# ---------------------------------------------------------------------------------------------
# the real public logs (trimmed copies in tests/fixtures/logs)


def test_real_modded_nanogpt_log():
    path = next(NANOGPT.glob("2024-10-09_SOAP__*.log.gz"))
    table, report = read_log(path)
    assert report.format == "modded-nanogpt" and report.n_malformed == 0 and report.n_ignored == 0
    s, v, _ = _train(table)
    assert v[s.tolist().index(919)] == pytest.approx(5.0667)
    assert len(_train(table, "val_loss")[0]) > 5


def test_real_llmc_log_has_train_val_and_grad_norm():
    table, report = read_log(NANOGPT / "2024-10-13_llmc__main.log.gz")
    assert report.format == "llmc" and report.n_malformed == 0
    assert {"train_loss", "val_loss", "grad_norm", "lr"} <= set(report.metrics)
    s, v, _ = _train(table)
    assert s[0] == 0 and v[0] == pytest.approx(11.0091)
    assert _train(table, "grad_norm")[1][0] == pytest.approx(15.37)
    assert _train(table, "val_loss")[1][0] == pytest.approx(11.0092)


def test_real_bigscience_excerpts():
    path = MEGATRON / "bigscience-chronicles-iterations.log"
    table, report = read_log(path)
    assert report.format == "megatron"
    # three runs quoted in one file (planned totals 311541, 159576, 115311), rank-prefixed lines included
    assert report.runs == [f"bigscience-chronicles-iterations@{n}" for n in (115311, 159576, 311541)]
    assert report.malformed_lines == [42, 43, 44, 45, 46]  # quoted truncated in the chronicles
    tr1 = table.filter(pa.compute.equal(table.column("run"), "bigscience-chronicles-iterations@311541"))
    s, v, _ = _train(tr1)
    assert v[s.tolist().index(29050)] == pytest.approx(7.343709)
    tr11 = table.filter(pa.compute.equal(table.column("run"), "bigscience-chronicles-iterations@115311"))
    assert 12695 in _train(tr11)[0].tolist()  # a "[default7]:" line
    assert 31214 in _train(tr11, "consumed_samples")[0].tolist()
    # tr8-104B restarts from 6900 after logging 7000-7220: those are replaced
    tr8 = table.filter(pa.compute.equal(table.column("run"), "bigscience-chronicles-iterations@159576"))
    assert 7000 not in _train(tr8)[0].tolist() and 6900 in _train(tr8)[0].tolist()
    assert report.n_replaced > 0


def test_real_megatron_golden_values():
    table, report = read_log(MEGATRON / "gpt3_15b_8t_release__golden_values_dev_dgx_h100.json.gz")
    assert report.format == "megatron-golden" and report.metrics == ["train_loss"]
    s, v, _ = _train(table)
    assert len(s) == 10201 and s[0] == 1 and s[-1] == 51000
    assert np.isnan(v[-1])  # the file's own "nan" tail is kept
