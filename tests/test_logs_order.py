"""Loss logs whose lines are out of order without a resume (session 13's campaign): a late or stray line, two lines
swapped, a JSON document whose order means nothing. A resume still replaces the old branch (tests/test_logs.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.logs.read import read_log

HSET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _line(step: int, loss: float) -> str:
    return f"step:{step}/5000 train_loss:{loss:.4f} train_time:{step * 10}ms step_avg:10.00ms"


def _train(table):
    t = table.filter(pc.equal(table.column("metric"), "train_loss"))
    return t.column("step").to_pylist(), t.column("value").to_pylist()


@HSET
@given(n=st.integers(20, 200), at=st.integers(0, 10 ** 6), back=st.integers(1, 10 ** 6), every=st.integers(1, 5))
def test_one_stray_line_loses_no_other_value(tmp_path, n, at, back, every):
    """A copy of an earlier step's line, written late (after ``at`` lines, naming a step ``back`` lines earlier):
    every step is still read, the stray's step with the stray's value (the later line wins), nothing else changed.
    Read as a resume it deleted every step in between."""
    steps = [every * (i + 1) for i in range(n)]
    values = [3.0 + 0.001 * i for i in range(n)]
    at = 2 + at % (n - 3)  # the stray goes after line `at` (there is a line after it)
    back = 1 + back % at  # naming the step `back` lines before it
    stray_step = steps[at - back]
    lines = [_line(s, v) for s, v in zip(steps, values)]
    lines.insert(at + 1, _line(stray_step, 9.5))
    p = tmp_path / f"stray-{n}-{at}-{back}-{every}.log"
    p.write_text("\n".join(lines) + "\n")
    table, rep = read_log(p)
    got_steps, got_values = _train(table)
    assert got_steps == steps
    want = [9.5 if s == stray_step else v for s, v in zip(steps, values)]
    assert got_values == pytest.approx(want)
    assert rep.n_replaced == 1 and rep.n_out_of_order == 1


@HSET
@given(n=st.integers(5, 100), i=st.integers(0, 10 ** 6))
def test_two_swapped_lines_keep_every_value(tmp_path, n, i):
    steps = list(range(1, n + 1))
    values = [3.0 + 0.01 * k for k in range(n)]
    i = 1 + i % (n - 3)
    order = list(range(n))
    order[i], order[i + 1] = order[i + 1], order[i]
    p = tmp_path / f"swap-{n}-{i}.log"
    p.write_text("\n".join(_line(steps[k], values[k]) for k in order) + "\n")
    table, rep = read_log(p)
    assert _train(table) == (steps, pytest.approx(values))
    assert rep.n_replaced == 0 and rep.n_out_of_order == 1


def test_a_resume_still_replaces_the_old_branch():
    from spike_audit.pipelines.logs.restarts import resolve_restarts

    keep, ooo = resolve_restarts(np.array([1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7]))
    assert keep.tolist() == [True, True] + [False] * 4 + [True] * 5 and not ooo.any()
    # a resume that crashed again, then a resume from further back
    keep, ooo = resolve_restarts(np.array([1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert np.array([1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 2, 3, 4, 5, 6, 7, 8, 9])[keep].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert not ooo.any()
    # a resume seen in an excerpt (lines left out: the log passes the old maximum far beyond it)
    keep, ooo = resolve_restarts(np.array([7000, 7010, 7220, 6900, 6910, 6940, 11446, 11447]))
    assert keep.tolist() == [False, False, False, True, True, True, True, True] and not ooo.any()


def test_a_stray_line_under_strict_is_an_error(tmp_path, capsys):
    lines = [_line(s, 3.0) for s in range(1, 60)]
    lines.insert(40, _line(12, 3.1))
    p = tmp_path / "stray.log"
    p.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["spikes", str(p), "--strict", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert re.search(r"stray\.log: line 41: step 12 of train_loss is logged after step 40 .*out of order", err), err
    with pytest.raises(UserError, match="out of order"):
        read_log(p, strict=True)
    assert read_log(p)[1].n_out_of_order == 1  # without --strict: a warning, every value read


def _golden(values: dict[int, float], order) -> bytes:
    return json.dumps({"lm loss": {"start_step": 1, "end_step": max(values), "step_interval": 1,
                                   "values": {str(k): values[k] for k in order}}}).encode()


def test_golden_values_in_any_key_order_are_the_same_log(tmp_path):
    values = {k: 3.0 + 0.001 * k for k in range(1, 400)}
    values[250] = 7.0
    tables = []
    for name, order in (("sorted", sorted(values)), ("lexicographic", sorted(values, key=str)),
                        ("reversed", sorted(values, reverse=True))):
        p = tmp_path / f"{name}_golden_values.json"
        p.write_bytes(_golden(values, order))
        table, rep = read_log(p, format="megatron-golden")
        assert rep.n_replaced == 0
        tables.append(_train(table))
    assert tables[0] == tables[1] == tables[2]
    assert tables[0][0] == sorted(values)


def test_trainer_state_log_history_in_any_order(tmp_path):
    hist = [{"step": s, "loss": 3.0 + 0.01 * s, "grad_norm": 1.0, "learning_rate": 1e-4} for s in range(1, 120)]
    out = []
    for name, h in (("fwd", hist), ("rev", hist[::-1])):
        p = tmp_path / name / "trainer_state.json"
        p.parent.mkdir()
        p.write_text(json.dumps({"log_history": h}))
        table, rep = read_log(p)
        assert rep.n_replaced == 0
        out.append(_train(table))
    assert out[0] == out[1] and out[0][0] == list(range(1, 120))
