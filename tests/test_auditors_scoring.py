"""Robust z-scores, anomaly score and row attribution."""

import math

import numpy as np
import pytest

from spike_audit.auditors.scoring import (anomaly_score, attribute, baseline_stats, robust_stats, robust_z, top_k_mean,
                              top_signal, zscores)


def test_robust_stats_median_mad():
    med, sigma = robust_stats([1, 2, 3, 4, 100, np.nan])
    assert med == 3
    assert sigma == pytest.approx(1.4826 * 1)
    assert robust_z(7, med, sigma) == pytest.approx(4 / 1.4826)


def test_sigma_floor_and_meanad_fallback():
    med, sigma = robust_stats([0, 0, 0, 0])
    assert (med, sigma) == (0.0, 1e-6)
    med, sigma = robust_stats([5, 5, 5, 5, 9])  # MAD = 0 -> mean absolute deviation
    assert sigma == pytest.approx(1.2533 * 4 / 5)
    med, sigma = robust_stats([1000.0] * 9)
    assert sigma == pytest.approx(10.0)  # 1% of the median
    assert math.isnan(robust_stats([])[0])


def test_combined_score():
    base = {"a": [1, 2, 3, 2, 1], "b": [10, 11, 9, 10, 10], "c": [np.nan]}
    z = zscores({"a": 2.0, "b": 40.0, "c": 1.0, "d": 3.0}, base)
    assert set(z) == {"a", "b", "c"} and math.isnan(z["c"])
    assert anomaly_score(z) == pytest.approx(abs(z["b"]))
    assert top_signal(z) == "b"
    assert top_k_mean(z, 2) == pytest.approx((abs(z["a"]) + abs(z["b"])) / 2)
    assert math.isnan(anomaly_score({"x": float("nan")}))
    st = baseline_stats(base)
    assert zscores({"b": 40.0}, st)["b"] == pytest.approx(z["b"])


def test_attribute_ranks_planted_rows():
    rng = np.random.default_rng(0)
    base = {"rep": rng.normal(0, 1, 500), "ent": rng.normal(8, 0.5, 500)}
    rows = {"rep": rng.normal(0, 1, 50), "ent": rng.normal(8, 0.5, 50)}
    rows["rep"][7] = 30.0
    rows["ent"][3] = 1.0
    rows["ent"][7] = 2.0
    idx, score, names = attribute(rows, base, top=3)
    assert idx[:2].tolist() == [7, 3]
    assert names[0] == ["rep", "ent"] and names[1] == ["ent"]
    assert score[0] > score[1] > score[2]
    idx_all, _, _ = attribute(rows, baseline_stats(base), top=None)
    assert sorted(idx_all.tolist()) == list(range(50))
