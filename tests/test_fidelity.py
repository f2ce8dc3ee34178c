"""Fidelity against the real frameworks (``benchmarks/fidelity.py``): what spike-audit says a step
consumed equals what the framework's own data loader fed at that step.

The framework tests are marked ``fidelity`` and skipped when the framework's virtualenv is missing
(``python benchmarks/fidelity.py --setup`` creates it). The comparison itself is unit-tested here
without any framework, so a comparator that cannot fail is caught.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"


def _load():
    spec = importlib.util.spec_from_file_location("spike_audit_fidelity", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fidelity = _load()
A = np.arange


def test_partition_equal_accepts_pieces_that_concatenate_into_the_samples():
    samples = [A(0, 9), A(20, 29)]
    pieces = [A(25, 29), A(0, 4), A(20, 25), A(4, 9)]  # any order, as a manifest sorts them
    assert fidelity.partition_equal(samples, pieces)


def test_partition_equal_refuses_other_data():
    samples = [A(0, 9), A(20, 29)]
    assert not fidelity.partition_equal(samples, [A(0, 9), A(21, 30)])  # the next window: off by one
    assert not fidelity.partition_equal(samples, [A(0, 9), A(0, 9)])  # a sample read twice
    assert not fidelity.partition_equal(samples, [A(4, 9), A(0, 4), A(20, 29)][:2])  # a slice missing
    # pieces in the wrong order inside a sample are not the same tokens
    assert not fidelity.partition_equal([np.array([1, 2, 3, 4])], [np.array([3, 4, 1, 2])[:2], np.array([1, 2])[::-1]])


def test_partition_equal_uses_every_piece_once():
    s = np.array([5, 5, 5, 5])
    assert fidelity.partition_equal([s], [np.array([5, 5]), np.array([5, 5])])
    assert not fidelity.partition_equal([s], [np.array([5, 5]), np.array([5, 5]), np.array([5])])


def test_a_missing_framework_is_skipped_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKE_AUDIT_FIDELITY_VENVS", str(tmp_path))
    results, skipped = fidelity.run_all(["megatron"], None, tmp_path)
    assert results == []
    assert "megatron" in skipped and str(tmp_path / "mcore") in skipped["megatron"]


def _skip_reason(name: str) -> str | None:
    # opt-in: the framework virtualenvs live outside the checkout, so only a run that names them uses them
    import os

    if not os.environ.get("SPIKE_AUDIT_FIDELITY_VENVS"):
        return "set SPIKE_AUDIT_FIDELITY_VENVS to the folder of the framework virtualenvs (benchmarks/fidelity.py --setup)"
    return fidelity.FRAMEWORKS[name].skip_reason()


@pytest.fixture(scope="module")
def megatron_results(tmp_path_factory):
    reason = _skip_reason("megatron")
    if reason:
        pytest.skip(f"megatron-core: {reason}")
    results, _ = fidelity.run_all(["megatron"], None, tmp_path_factory.mktemp("fidelity"))
    return {r.setting: r for r in results}


@pytest.mark.fidelity
@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(fidelity.MEGATRON_SETTINGS))
def test_megatron_feeds_what_the_manifest_says(megatron_results, setting):
    r = megatron_results[setting]
    assert r.steps_checked > 0, r.note
    assert r.steps_equal == r.steps_checked, f"{r.note}; first failures: {r.failures[:3]}"
    assert r.log_check.startswith("ok"), r.log_check
