"""The audit graph's global combines run without Beam's default-injection sub-graph (``global_combine``): an
empty input must still give every reader the value Beam would have injected, so a run with no control steps
judges its events (inconclusive) instead of failing or hanging."""

from __future__ import annotations

import pickle

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest

from spike_audit.auditors.tokens import Histogram
from spike_audit.pipelines.beam.combine import AuditorCombineFn, global_combine
from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.run.dupref import DupReference
from spike_audit.pipelines.run.graph import FAMILY_LIST, NullCombineFn, _Reference, union_hashes


def _write(v, path):
    with open(path, "ab") as f:
        f.write(pickle.dumps(v) + b"\n--\n")


def _run(elements, transform, path):
    """The values ``transform`` gives for ``elements`` (pickled, as the pipeline wrote them to ``path``)."""
    with beam.Pipeline() as p:
        p | beam.Create(elements) | transform | beam.Map(_write, str(path))
    return path.read_bytes().split(b"\n--\n")[:-1] if path.exists() else []


@pytest.mark.parametrize("make", [lambda: AuditorCombineFn(Histogram(), output="accumulator"),
                                  lambda: union_hashes, lambda: AuditorCombineFn(DupReference()),
                                  lambda: NullCombineFn(_Reference(len(FAMILY_LIST)), 0.05)],
                         ids=["histogram", "union_hashes", "dupref", "null"])
def test_the_default_is_what_beam_would_inject_for_an_empty_input(make, tmp_path):
    combine, default = global_combine(make())
    injected = _run([], beam.CombineGlobally(make()), tmp_path / "beam")
    assert len(injected) == 1 and pickle.dumps(default) == injected[0]
    assert _run([], combine, tmp_path / "ours") == []  # no element: readers take the default


def test_a_global_combine_of_some_elements_is_the_combine(tmp_path):
    combine, _ = global_combine(union_hashes)
    got = _run([np.array([3, 1], np.uint64), np.array([1, 2], np.uint64)], combine, tmp_path / "out")
    assert [pickle.loads(g).tolist() for g in got] == [[1, 2, 3]]


@pytest.mark.slow
def test_a_run_with_no_control_steps_judges_every_event_inconclusive(demo, tmp_path, capsys):
    root, _ = demo
    run = root / "run"
    args = ["run", "--log", str(run / "train.log"), "--manifest", str(run / "manifest.parquet"), "--shards",
            str(run / "shards"), "--tokenizer", str(run / "tokenizer.json"), "--guard", "100000", "-q"]
    assert main([*args, "--out", str(tmp_path / "a"), "--state", str(tmp_path / "st")]) == 0
    v = pq.read_table(tmp_path / "a" / "verdicts.parquet").to_pylist()
    assert len(v) >= 4 and {r["verdict"] for r in v} == {"inconclusive"}
    # the scheduled run again on the same state: nothing new to audit, the outputs kept
    assert main([*args, "--out", str(tmp_path / "a"), "--state", str(tmp_path / "st")]) == 0
    assert pq.read_table(tmp_path / "a" / "verdicts.parquet").to_pylist() == v
    capsys.readouterr()
