"""Spike detection: the exact rule against a plain reference, synthetic curves, and the real public logs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.auditors.spikes import DetectorConfig, align, detect, detect_table, spike_mask
from spike_audit.pipelines.logs.read import read_log
from spike_audit.schemas import ALIGNED_SPIKES, SPIKES, validate

FIX = Path(__file__).parent / "fixtures" / "logs"
NANOGPT = FIX / "modded-nanogpt"
MEGATRON = FIX / "megatron"


def reference_robust(values: np.ndarray, cfg: DetectorConfig) -> np.ndarray:
    """The documented rule, one step at a time (slow, obviously right)."""
    finite = np.isfinite(values)
    m = max(1, min(cfg.min_window, cfg.window, max(3, int(finite.sum()) // 4)))
    base: list[float] = []
    flags = np.zeros(len(values), bool)
    for i, v in enumerate(values):
        if not math.isfinite(v):
            continue
        win = np.array(base[-cfg.window:])
        if len(win) >= m:
            w = len(win)
            med = np.median(win)
            q = max(3, w // 4) if w >= 8 else w
            if q < w:  # the recent quarter's median, when smaller
                med = min(med, np.median(win[-q:]))
            resid = win
            if w >= 4:  # residuals from the robust line: slope from the medians of the two halves
                h = w // 2
                slope = (np.median(win[w - h:]) - np.median(win[:h])) / (w - h)
                resid = win - slope * (np.arange(w) - (w - 1) / 2.0)
            mad = np.median(np.abs(resid - np.median(resid)))
            sig = max(1.4826 * mad, cfg.sigma_floor * abs(med), np.finfo(float).tiny)
            if v > med + cfg.k * sig and v > med + cfg.min_rel_rise * abs(med):
                flags[i] = True
                continue
        base.append(v)
    return flags


def curve(n, seed=0, noise=0.02, start=4.0):
    rng = np.random.default_rng(seed)
    x = np.arange(n)
    return start * (0.7 + 0.3 * np.exp(-x / (n / 3))) + noise * rng.standard_normal(n)


@st.composite
def messy_series(draw):
    n = draw(st.integers(1, 400))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    v = curve(n, seed, noise=draw(st.sampled_from([0.0, 0.001, 0.05])))
    for _ in range(draw(st.integers(0, 6))):  # spikes, plateaus (divergence-like), NaNs
        i = int(rng.integers(0, n))
        kind = draw(st.sampled_from(["spike", "plateau", "nan", "dip"]))
        if kind == "spike":
            v[i] *= 1.5
        elif kind == "plateau":
            v[i:i + int(rng.integers(1, 200))] *= 1.3
        elif kind == "nan":
            v[i] = np.nan
        else:
            v[i] *= 0.5
    return v


@settings(max_examples=150, deadline=None)
@given(values=messy_series(), window=st.sampled_from([4, 16, 64]), k=st.sampled_from([3.0, 6.0]))
def test_vectorised_robust_rule_equals_sequential_reference(values, window, k):
    cfg = DetectorConfig(window=window, min_window=min(16, window), k=k)
    np.testing.assert_array_equal(spike_mask(values, cfg), reference_robust(values, cfg))


def test_injected_spikes_found_at_the_right_steps():
    v = curve(3000, seed=1)
    steps = np.arange(3000) + 100
    for i, factor in ((500, 1.3), (1200, 1.5), (2500, 1.2)):
        v[i] *= factor
    v[1800:1803] *= 1.4  # a three-step spike: one event
    ev = detect(steps, v)
    assert [(e["kind"], e["start_step"], e["end_step"]) for e in ev] == [
        ("spike", 600, 600), ("spike", 1300, 1300), ("spike", 1900, 1902), ("spike", 2600, 2600)]
    e = ev[2]
    assert e["peak_step"] in (1900, 1901, 1902) and e["recovery_steps"] == 1903 - e["peak_step"]
    assert all(x["severity"] > 6 for x in ev)
    win = v[1800 - 64:1800]
    assert e["baseline_value"] == pytest.approx(min(np.median(win), np.median(win[-16:])))


def test_a_spike_early_in_training_is_found_on_the_falling_curve():
    # power-law descent: the loss 30 steps back is well above today's; a 25% jump must still be flagged
    s = np.arange(1, 400, dtype=np.float64)
    rng = np.random.default_rng(0)
    v = 2.2 + 8.0 * (s / 5 + 1) ** -0.5 + 0.01 * rng.standard_normal(len(s))
    v[122] += 0.9
    ev = detect(s.astype(np.int64), v)
    assert [e["peak_step"] for e in ev if e["kind"] == "spike"] == [123]


def test_smooth_or_flat_curves_give_no_spike():
    assert detect(np.arange(5000), curve(5000, noise=0.0)) == []
    assert detect(np.arange(5000), curve(5000, seed=3, noise=0.02)) == []
    assert detect(np.arange(1000), np.full(1000, 2.5)) == []  # zero MAD: no blow-up
    assert detect(np.arange(3), np.array([3.0, 9.0, 3.0])) == []  # too short for any baseline


def test_nan_gives_a_nan_event_and_stays_out_of_the_baseline():
    v = curve(400, seed=2)
    v[200] = np.nan
    v[201] = np.inf
    v[300] = np.nan
    ev = detect(np.arange(400), v)
    assert [(e["kind"], e["start_step"], e["end_step"]) for e in ev] == [("nan", 200, 201), ("nan", 300, 300)]
    assert ev[0]["severity"] == math.inf and ev[0]["recovery_steps"] == 2
    assert math.isfinite(ev[0]["baseline_value"])


def test_divergence_and_short_unrecovered_rise():
    v = curve(600, seed=4)
    v[450:] += 2.0  # jumps and never comes back: 150 steps
    ev = detect(np.arange(600), v)
    assert [(e["kind"], e["start_step"], e["end_step"], e["recovery_steps"]) for e in ev] == [
        ("divergence", 450, 599, None)]
    v = curve(600, seed=4)
    v[580:] += 2.0  # only 20 steps before the log ends: an unrecovered spike
    ev = detect(np.arange(600), v)
    assert [(e["kind"], e["start_step"], e["recovery_steps"]) for e in ev] == [("spike", 580, None)]


def test_merge_gap():
    v = curve(500, seed=5)
    v[[300, 303]] *= 1.5  # two unflagged values between: merged (gap 2)
    v[[400, 404]] *= 1.5  # three between: separate
    ev = detect(np.arange(500), v)
    assert [(e["start_step"], e["end_step"]) for e in ev] == [(300, 303), (400, 400), (404, 404)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), stride=st.integers(1, 50), offset=st.integers(0, 10**6))
def test_invariant_to_gaps_in_step_numbering(seed, stride, offset):
    rng = np.random.default_rng(seed)
    v = curve(800, seed)
    v[rng.integers(100, 800, 4)] *= 1.6
    dense = detect(np.arange(800), v, DetectorConfig(divergence_min_steps=10**9))
    steps = offset + np.cumsum(rng.integers(1, stride + 1, 800))
    sparse = detect(steps, v, DetectorConfig(divergence_min_steps=10**9))
    assert len(dense) == len(sparse) >= 1
    for d, s in zip(dense, sparse):
        assert steps[d["peak_step"]] == s["peak_step"] and steps[d["start_step"]] == s["start_step"]
        assert d["severity"] == pytest.approx(s["severity"])
        assert d["peak_value"] == s["peak_value"]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), at=st.integers(20, 1999), size=st.floats(15, 100))
def test_property_large_spike_is_detected(seed, at, size):
    noise = 0.01
    v = curve(2000, seed, noise=noise)
    v[at] += size * noise + 0.06 * v[at]  # >> noise and above the 5% relative floor
    ev = detect(np.arange(2000), v)
    assert any(e["start_step"] <= at <= e["end_step"] and e["peak_step"] == at for e in ev)


def test_short_series_uses_a_quarter_of_its_length_as_history():
    v = np.array([2.78, 2.77, 2.77, 7.3, 8.7, 7.6, 7.2, 6.8, 2.72, 2.64])
    ev = detect(np.arange(10) * 10, v)
    assert [(e["start_step"], e["peak_step"], e["end_step"]) for e in ev] == [(30, 40, 70)]
    assert detect(np.arange(3), np.array([2.0, 2.0, 9.0])) == []  # fewer than 3 values of history


def test_olmo_rule():
    rng = np.random.default_rng(0)
    v = 3 + 0.01 * rng.standard_normal(400)
    v[100] += 1.0  # inside the first 128 values: OLMo-core waits for a full window
    v[300] += 1.0
    ev = detect(np.arange(400), v, DetectorConfig(method="olmo"))
    assert [(e["peak_step"], e["detector"]) for e in ev] == [(300, "olmo")]


def test_metaseq_rule():
    v = np.array([4.0, 3.9, 3.8, 3.7, 4.7, 3.7, 3.6, 4.3, 3.6])  # 4.7/ewm > 1.2; 4.3/ewm < 1.2
    ev = detect(np.arange(9), v, DetectorConfig(method="metaseq"))
    assert [e["peak_step"] for e in ev] == [4]
    with pytest.raises(ValueError, match="unknown spike detector"):
        DetectorConfig(method="nope")


def test_detect_table_and_align_synthetic():
    rows = []
    for r, spikes_at in (("a", [300, 700]), ("b", [300, 701]), ("c", [500])):
        v = curve(1000, seed=ord(r))
        v[spikes_at] *= 1.5
        g = 0.5 + 0.01 * np.random.default_rng(ord(r)).standard_normal(1000)
        g[spikes_at] *= 4
        for m, vals in (("train_loss", v), ("grad_norm", g), ("val_loss", v)):
            rows += [{"run": r, "metric": m, "step": i, "value": float(x)} for i, x in enumerate(vals)]
    loss = pa.Table.from_pylist(rows)
    sp = detect_table(loss)
    validate(sp, SPIKES)
    assert set(sp.column("metric").to_pylist()) == {"train_loss", "grad_norm"}
    assert "a/train_loss/300" in sp.column("spike_id").to_pylist()
    al = align(sp)
    validate(al, ALIGNED_SPIKES)
    assert al.to_pylist() == [{"step": 300, "n_runs": 2, "runs": ["a", "b"], "peak_steps": [300, 300]}]
    al1 = align(sp, tolerance=1)
    assert [(r["step"], r["peak_steps"]) for r in al1.to_pylist()] == [(300, [300, 300]), (700, [700, 701])]
    assert align(sp, min_runs=3).num_rows == 0
    assert align(sp, metric="grad_norm").column("step").to_pylist() == [300]
    assert align(SPIKES.empty()).num_rows == 0


# ---------------------------------------------------------------------------------------------
# the real public logs


def _spikes(path, **cfg):
    table, _ = read_log(path)
    return detect_table(table, DetectorConfig(**cfg), metrics=("train_loss",))


def test_soap_run_spikes_at_the_known_steps():
    sp = _spikes(next(NANOGPT.glob("2024-10-09_SOAP__*.log.gz")))
    peaks = set(sp.column("peak_step").to_pylist())
    assert {919, 947, 1760, 3092, 3194} <= peaks
    assert set(sp.column("kind").to_pylist()) == {"spike"}


def test_runs_sharing_the_data_order_spike_together():
    tables = [_spikes(p) for p in sorted(NANOGPT.glob("2024-10-*.log.gz")) if "llmc" not in p.name]
    assert len(tables) == 5
    al = {r["step"]: r for r in align(pa.concat_tables(tables)).to_pylist()}
    for step in (919, 947):
        assert al[step]["n_runs"] == 4
        assert not any("ScaleUp1B" in r for r in al[step]["runs"])  # different model/batch: different order


def test_megatron_golden_values_negative_control():
    table, _ = read_log(MEGATRON / "gpt3_15b_8t_release__golden_values_dev_dgx_h100.json.gz")
    sp = detect_table(table).to_pylist()
    assert not [s for s in sp if s["kind"] in ("spike", "divergence")]
    assert [(s["kind"], s["start_step"]) for s in sp] == [("nan", 50865)]  # the file's "nan" tail


def test_bigscience_29050_spike():
    table, _ = read_log(MEGATRON / "bigscience-chronicles-iterations.log")
    sp = [s for s in detect_table(table).to_pylist()
          if s["run"].endswith("@311541") and s["metric"] == "train_loss"]
    assert [(s["kind"], s["start_step"], s["peak_step"]) for s in sp] == [("spike", 29050, 29060)]
    assert sp[0]["baseline_value"] == pytest.approx(2.772822)
