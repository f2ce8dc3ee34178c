"""``spike-audit run``: the end-to-end spike audit.

log -> spikes -> spike windows -> manifest join -> exact rows -> auditors -> controls -> verdicts.

The driver does the small things: it reads the loss log, detects spikes, picks the steps to audit
(each spike's window and a seeded sample of control steps) and reads the manifest rows of just those
steps (Parquet predicate push-down). Everything that touches data runs in one Beam pipeline:

1. ``ReadSlices`` reads exactly the manifest's rows of the selected steps, grouped by shard.
2. Pass 1: the baseline unigram histogram of the control steps (``CombineGlobally``).
3. Pass 2: the auditor suite per step (``CombinePerKey``), finished against the baseline histogram
   (side input) -> per-step signals; per shard likewise.
4. Row attribution: per-row signals of window steps, z-scored against a deterministic bottom-k
   sample of control rows (side input).
5. Per spike (``CoGroupByKey`` on the spike id): the verdict of :mod:`auditors.verdict` against the
   control steps' signals (side input), with the shards of the flagged rows.
6. One sink (:class:`pipelines.beam_util.WriteTables`); the driver assembles and publishes the
   tables atomically, then writes skip_list.json, quarantine.json and report.html from them.

Defaults (documented in the README): the window of a spike is ``[start_step - lookback, peak_step]``
with ``lookback = 2`` (the loss at step s is measured on batch s, so a data-caused spike shows at the
batch itself; the lookback covers a delayed reaction); controls are ``n_controls = 100`` steps drawn
with ``seed`` from the logged steps at least ``guard = 20`` steps away from every spike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from spike_audit.auditors.base import TokenBatch
from spike_audit.auditors.scales import to_scoring_scale
from spike_audit.auditors.verdict import BottomK, VerdictConfig, hash64, judge, robust_center_scale
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.scoring import (entity_scores, finish, hash_buckets, make_suite, matrix, opt_float,
                               seen_elsewhere_counts, signal_names, to_token_batch, unique_by_key,
                               with_cross_dup)
from spike_audit.schemas import BATCH_SCORES, ROW_FLAGS, SHARD_SCORES, SPIKES, STEP_MANIFEST, VERDICTS, validate

log = logging.getLogger(__name__)

OUTPUT_SPECS = (BATCH_SCORES, SHARD_SCORES, ROW_FLAGS, VERDICTS)


@dataclass(frozen=True)
class RunConfig:
    log: str
    manifest: str
    shards: str
    out: str
    log_format: str | None = None
    metric: str = "train_loss"
    method: str = "robust"
    lookback: int = 2
    n_controls: int = 100
    guard: int = 20
    seed: int = 0
    alpha: float = 0.05
    min_effect: float = 5.0
    min_margin: float = 2.0
    min_controls: int = 20
    row_z: float = 6.0
    max_row_flags: int = 64
    tokens_col: str = "tokens"
    text_col: str = "text"
    tokenizer: str | None = None
    eos_id: int | None = None
    vocab_size: int | None = None
    state: str | None = None
    allow_missing_steps: bool = False
    allow_overlap: bool = False


@dataclass
class Plan:
    """What to audit: small, built on the driver."""

    spikes: pa.Table
    windows: dict[str, list[int]]  # spike_id -> window steps with data
    controls: list[int]
    spikes_of: dict[int, list[str]]  # window step -> spike ids
    slices: list[tuple[int, tuple[str, int, int, str]]]
    missing: dict[str, list[int]] = field(default_factory=dict)  # spike_id -> window steps without data


# ----------------------------------------------------------------------------------------- driver


def read_loss_and_spikes(cfg: RunConfig):
    from spike_audit.auditors.spikes import DetectorConfig, detect_table
    from spike_audit.pipelines.logs.read import read_log

    loss, report = read_log(cfg.log, format=cfg.log_format)
    log.info("log %s: %s format, %d values, %d malformed, %d replaced by a resume", cfg.log, report.format,
             report.n_values, report.n_malformed, report.n_replaced)
    metrics = set(loss.column("metric").to_pylist())
    if cfg.metric not in metrics:
        raise UserError(f"{cfg.log}: no {cfg.metric!r} values (metrics found: {', '.join(sorted(metrics)) or 'none'})")
    spikes = detect_table(loss, DetectorConfig(method=cfg.method),
                          metrics=tuple(m for m in (cfg.metric, "grad_norm") if m in metrics))
    return loss, report, spikes


def _manifest_steps_range(path: str) -> tuple[int, int]:
    md = pq.ParquetFile(path).metadata
    lo, hi = None, None
    idx = md.schema.to_arrow_schema().get_field_index("step")
    for rg in range(md.num_row_groups):
        st = md.row_group(rg).column(idx).statistics
        if st is None or not st.has_min_max:
            t = pq.read_table(path, columns=["step"]).column("step")
            return int(pc.min(t).as_py()), int(pc.max(t).as_py())
        lo = st.min if lo is None else min(lo, st.min)
        hi = st.max if hi is None else max(hi, st.max)
    if lo is None:
        raise UserError(f"{path}: the manifest has no rows")
    return int(lo), int(hi)


def read_manifest_steps(path: str, steps: list[int]) -> pa.Table:
    """The manifest rows of ``steps`` only (predicate push-down on row-group statistics), in file
    order; nothing manifest-sized is read on the driver."""
    if not Path(path).exists() and "://" not in path:
        raise UserError(f"{path}: manifest not found")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet manifest ({err})") from None
    validate(schema, STEP_MANIFEST, path)
    wanted = pa.array(sorted(set(steps)), pa.int64())
    table = pads.dataset(path, format="parquet").to_table(filter=pads.field("step").isin(wanted), use_threads=False)
    table = STEP_MANIFEST.conform(table, path)
    unit = pc.fill_null(table.column("unit"), "row")
    return table.set_column(table.schema.get_field_index("unit"), STEP_MANIFEST.schema.field("unit"), unit)


def manifest_row_numbers(path: str, steps: list[int]) -> np.ndarray:
    """0-based row numbers in the manifest file of the rows :func:`read_manifest_steps` returns
    (reads the step column: done only to name the row in an error message)."""
    wanted = pa.array(sorted(set(steps)), pa.int64())
    all_steps = pq.read_table(path, columns=["step"]).column("step")
    return np.flatnonzero(np.asarray(pc.is_in(all_steps, value_set=wanted).to_numpy(zero_copy_only=False)))


def plan_audit(cfg: RunConfig, loss: pa.Table, spikes: pa.Table, skip_spikes: frozenset = frozenset(),
               fixed_controls: list[int] | None = None) -> Plan:
    """Choose window and control steps and join them to the manifest."""
    sel = loss.filter(pc.equal(loss.column("metric"), cfg.metric))
    steps = np.asarray(sel.column("step"), dtype=np.int64)
    values = np.asarray(sel.column("value"), dtype=np.float64)
    lo, hi = _manifest_steps_range(cfg.manifest)

    windows: dict[str, list[int]] = {}
    spikes_of: dict[int, list[str]] = {}
    busy = np.zeros(0, dtype=np.int64)
    for sid, start, peak, end in zip(spikes.column("spike_id").to_pylist(), spikes.column("start_step").to_pylist(),
                                     spikes.column("peak_step").to_pylist(), spikes.column("end_step").to_pylist()):
        busy = np.concatenate([busy, np.arange(start - cfg.guard, (end if end is not None else peak) + cfg.guard + 1)])
        if sid in skip_spikes:
            continue
        if not (lo <= peak <= hi) and not cfg.allow_missing_steps:
            raise UserError(f"{cfg.manifest} covers steps {lo}..{hi} but {cfg.log} has a spike at step {peak} "
                            f"({sid}): is this the manifest of that run? (--allow-missing-steps to judge such "
                            f"spikes inconclusive)")
        w = list(range(max(start - cfg.lookback, int(steps.min()) if len(steps) else start), peak + 1))
        windows[sid] = w
        for s in w:
            spikes_of.setdefault(s, []).append(sid)

    if fixed_controls is not None:
        controls = [c for c in fixed_controls if c not in set(busy.tolist())]
    else:
        ok = np.isfinite(values) & ~np.isin(steps, busy) & (steps >= lo) & (steps <= hi)
        candidates = np.unique(steps[ok])
        rng = np.random.default_rng(cfg.seed)
        take = min(len(candidates), cfg.n_controls)
        controls = sorted(rng.choice(candidates, size=take, replace=False).tolist()) if take else []

    wanted = sorted(set(spikes_of) | set(controls))
    man = read_manifest_steps(cfg.manifest, wanted)
    have = set(np.unique(np.asarray(man.column("step"))).tolist()) if man.num_rows else set()
    missing = {sid: [s for s in w if s not in have] for sid, w in windows.items()}
    windows = {sid: [s for s in w if s in have] for sid, w in windows.items()}
    spikes_of = {s: ids for s, ids in spikes_of.items() if s in have}
    n_ctrl_missing = sum(1 for c in controls if c not in have)
    if n_ctrl_missing:
        log.warning("%d of %d control steps have no manifest rows and are not used", n_ctrl_missing, len(controls))
    controls = [c for c in controls if c in have]
    units = man.column("unit").to_pylist()
    slices = [
        (int(s), (sh, int(a), int(b), u or "row"))
        for s, sh, a, b, u in zip(man.column("step").to_pylist(), man.column("shard").to_pylist(),
                                  man.column("row_start").to_pylist(), man.column("row_end").to_pylist(), units)
    ]
    _check_slices(cfg, man, wanted)
    log.info("audit plan: %d spikes, %d window steps, %d control steps, %d manifest slices", len(windows),
             len(spikes_of), len(controls), len(slices))
    return Plan(spikes, windows, controls, spikes_of, slices, missing)


def _check_slices(cfg: RunConfig, man: pa.Table, steps: list[int]) -> None:
    """Fail before any work if a selected slice is malformed, overlaps another in its step, points at
    a missing shard or past a shard's end (one line naming the manifest row and the shard)."""
    from spike_audit.pipelines.manifest import check_ranges, check_shard_bounds

    def check(row_ids):
        check_ranges(man, cfg.manifest, row_ids, allow_overlap=cfg.allow_overlap)
        check_shard_bounds(man, cfg.manifest, cfg.shards, row_ids, tokens_col=cfg.tokens_col,
                           text_col=cfg.text_col)

    try:
        check(None)
    except UserError:
        check(manifest_row_numbers(cfg.manifest, steps))  # the same error, naming the row in the file
        raise


# ------------------------------------------------------------------------------ pipeline helpers


def batch_score_records(item, controls_sigs, spikes_of, control_set):
    step, n_rows, n_tokens, sig = item
    # sorted and de-duplicated: a side input's order (and on Dask, its multiplicity) depends on the
    # runner, and float sums on the order
    ctrl = [c[3] for c in unique_by_key(controls_sigs) if c[0] != step]  # the other controls
    names = signal_names(ctrl + [sig])
    x = matrix([sig], names)[0]
    if ctrl:
        med, sigma = robust_center_scale(to_scoring_scale(names, matrix(ctrl, names)), axis=0)
        z = (to_scoring_scale(names, x[None, :])[0] - med) / sigma
    else:
        z = np.full(len(names), np.nan)
    finite = np.abs(z[np.isfinite(z)])
    score = float(finite.max()) if len(finite) else float("nan")
    signals = [{"name": n, "value": opt_float(v), "z": opt_float(zz)} for n, v, zz in zip(names, x, z)]
    base = {"step": step, "n_rows": n_rows, "n_tokens": n_tokens, "anomaly_score": score, "signals": signals}
    if step in control_set:
        yield "batch_scores", dict(base, role="control", spike_id=None)
    for sid in spikes_of.get(step, []):
        yield "batch_scores", dict(base, role="window", spike_id=sid)


def rowmatrix(tb: TokenBatch, suite) -> tuple[list[str], np.ndarray]:
    rs = suite.row_signals(tb)
    names = sorted(rs)
    if not names:
        return names, np.zeros((tb.n_rows, 0))
    return names, np.column_stack([np.asarray(rs[n], dtype=np.float64) for n in names])


def _row_keys(tb: TokenBatch) -> np.ndarray:
    """Seeded 64-bit key per row from (shard, row): the bottom-k sample is keyed on row identity."""
    rows = tb.row if tb.row is not None else np.arange(tb.n_rows)
    if tb.shard is None:
        return hash64(rows)
    uniq, inv = np.unique(np.asarray(tb.shard, dtype=str), return_inverse=True)
    h = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in uniq],
                 dtype=np.uint64)
    return hash64(rows.astype(np.uint64) ^ h[inv])


class RowSampleFn:
    """Bottom-k sample of control rows' per-row signals, as a mergeable auditor."""

    def __init__(self, cfg_dict: dict, k: int = 20000):
        self.cfg_dict, self.k = cfg_dict, k

    def create(self):
        return {}

    def add(self, acc, batch: TokenBatch):
        names, m = rowmatrix(batch, make_suite(self.cfg_dict))
        keys = _row_keys(batch)
        out = dict(acc)
        for j, n in enumerate(names):
            bk = BottomK(self.k, 1, seed=self.cfg_dict.get("seed", 0))
            out[n] = bk.merge([out.get(n, bk.create()), bk.add(bk.create(), keys, m[:, j])])
        return out

    def merge(self, accs):
        out: dict = {}
        bk = BottomK(self.k, 1, seed=self.cfg_dict.get("seed", 0))
        for a in accs:
            for n, v in a.items():
                out[n] = bk.merge([out[n], v]) if n in out else v
        return out

    def result(self, acc):
        return {n: (v[1][:, 0]) for n, v in acc.items()}


class FlagRows(beam.DoFn):
    """Per-row z of a window step's rows against the control-row sample; yields ROW_FLAGS records."""

    def __init__(self, cfg_dict: dict, spikes_of: dict, row_z: float, max_rows: int, tokenizer: str | None,
                 tokens_col: str, text_col: str):
        super().__init__()
        self.cfg_dict, self.spikes_of, self.row_z, self.max_rows = cfg_dict, spikes_of, row_z, max_rows
        self.tokenizer_path, self.tokens_col, self.text_col = tokenizer, tokens_col, text_col
        self._tok = None

    def _tokenizer(self):
        if self.tokenizer_path and self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(self.tokenizer_path)
        return self._tok

    def process(self, kv, base):
        step, rb = kv
        tb = to_token_batch(rb, self.tokens_col, self.text_col)
        if tb.n_rows == 0:
            return
        names, m = rowmatrix(tb, make_suite(self.cfg_dict))
        if not names:
            return
        ref = np.column_stack([base.get(n, np.full(1, np.nan)) if len(base.get(n, [])) else np.full(1, np.nan)
                               for n in names]) if base else None
        if ref is None:
            return
        med, sigma = robust_center_scale(to_scoring_scale(names, ref), axis=0)
        z = np.abs((to_scoring_scale(names, m) - med) / sigma)
        z = np.where(np.isfinite(z), z, 0.0)
        score = z.max(axis=1)
        hit = np.flatnonzero(score >= self.row_z)
        if not len(hit):
            return
        hit = hit[np.lexsort((hit, -score[hit]))][: self.max_rows]
        units = rb.column("unit").to_pylist() if "unit" in rb.schema.names else ["row"] * tb.n_rows
        ends = np.asarray(rb.column("row_end"), dtype=np.int64) if "row_end" in rb.schema.names else tb.row + 1
        tok = self._tokenizer()
        for i in hit.tolist():  # bounded by max_rows: excerpts only for flagged rows
            text = _as_str(tb.text[i]) if tb.text is not None else None
            if text is not None:
                excerpt = text[:300]
            elif tok is not None:
                excerpt = tok.decode(tb.values[tb.offsets[i]:tb.offsets[i + 1]][:200].tolist())[:300]
            else:
                excerpt = None
            rec = {"shard": str(tb.shard[i]), "row": int(tb.row[i]), "row_end": int(ends[i]), "unit": units[i],
                   "step": int(step), "signals": [n for n, zz in zip(names, z[i]) if zz >= self.row_z],
                   "score": float(score[i]), "excerpt": excerpt}
            for sid in self.spikes_of.get(step, []):
                yield "row_flags", dict(rec, spike_id=sid)


def _as_str(v):
    """A text item as ``str`` (or None), whether it came from an Arrow array or a Python list."""
    return v.as_py() if isinstance(v, pa.Scalar) else v


def split_by_shard(kv):
    """(step, RecordBatch) -> (shard, RecordBatch) per shard present."""
    _, rb = kv
    if rb.num_rows == 0:
        return
    shards = rb.column("shard")
    uniq = pc.unique(shards).to_pylist()
    for s in uniq:
        yield s, rb.filter(pc.equal(shards, s))


def shard_score_records(items):
    for rec in entity_scores(items, "shard"):
        yield "shard_scores", dict(rec, fingerprint=None)


def attributed(flags: list[dict], top_step, top_signal) -> list[dict]:
    """The rows that carry a spike's anomaly: flagged rows at the verdict's top step whose flagging
    signals include the top signal; if none has a per-row value of that signal, every flagged row at
    the top step. Sorted by score (highest first), then shard and row."""
    at_step = [f for f in flags if f["step"] == top_step]
    on_signal = [f for f in at_step if top_signal in f["signals"]]
    rows = on_signal or at_step
    return sorted(rows, key=lambda f: (-f["score"], f["shard"], f["row"]))


def verdict_record(kv, controls_sigs, spike_info, vcfg_dict, missing):
    sid, grouped = kv
    window = sorted(grouped["window"], key=lambda t: t[0])
    flags = sorted(grouped["flags"], key=lambda f: (f["step"], f["shard"], f["row"]))
    ctrl = [c[3] for c in unique_by_key(controls_sigs)]  # runner-independent order and multiplicity
    names = signal_names(ctrl + [w[1] for w in window])
    v = judge(names, matrix([w[1] for w in window], names), [w[0] for w in window], matrix(ctrl, names),
              VerdictConfig(**vcfg_dict))
    counts: dict[str, int] = {}
    for f in attributed(flags, v.top_step, v.top_signal):
        counts[f["shard"]] = counts.get(f["shard"], 0) + 1
    top_shards = [s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:5]
    run, peak = spike_info[sid]
    reason = v.reason
    if missing.get(sid):
        reason += f" ({len(missing[sid])} window steps had no manifest rows)"
    yield "verdicts", {"spike_id": sid, "run": run, "peak_step": peak, "verdict": v.verdict, "p_value": v.p_value,
                       "effect_size": v.effect_size, "margin": v.margin, "top_signal": v.top_signal,
                       "top_step": v.top_step,
                       "top_shards": top_shards if v.verdict == "data" else [], "n_controls": v.n_controls,
                       "n_window_steps": v.n_window_steps, "reason": reason}


def build_pipeline(p, cfg: RunConfig, plan: Plan, staging: str):
    import apache_beam as beam
    from apache_beam.pvalue import AsSingleton

    from spike_audit.auditors.tokens import Histogram
    from spike_audit.pipelines.beam_read import ReadSlices
    from spike_audit.pipelines.beam_util import AuditorCombineFn, WriteTables

    cfg_dict = {"vocab_size": cfg.vocab_size, "eos_id": cfg.eos_id, "seed": cfg.seed}
    control_set = frozenset(plan.controls)
    spikes_of = {int(k): list(v) for k, v in plan.spikes_of.items()}
    tokens_col, text_col = cfg.tokens_col, cfg.text_col
    spike_info = {sid: (run, int(peak)) for sid, run, peak in zip(
        plan.spikes.column("spike_id").to_pylist(), plan.spikes.column("run").to_pylist(),
        plan.spikes.column("peak_step").to_pylist()) if sid in plan.windows}

    def tb_of(rb):
        return to_token_batch(rb, tokens_col, text_col)

    batches = (p | "Slices" >> beam.Create(plan.slices)
               | "Read" >> ReadSlices(cfg.shards, tokens_col=tokens_col, text_col=text_col))
    controls = batches | "IsControl" >> beam.Filter(lambda kv, cs: kv[0] in cs, control_set)
    windows = batches | "IsWindow" >> beam.Filter(lambda kv, so: kv[0] in so, spikes_of)

    hist = (controls | "CtrlTokens" >> beam.Map(lambda kv: tb_of(kv[1]))
            | "BaselineHist" >> beam.CombineGlobally(AuditorCombineFn(Histogram(), output="accumulator")))

    suite = make_suite(cfg_dict)
    step_accs = (batches | "StepTokens" >> beam.MapTuple(lambda k, rb: (k, tb_of(rb)))
                 | "AuditSteps" >> beam.CombinePerKey(AuditorCombineFn(suite, output="accumulator")))
    # rows seen at another audited step (epoch or resume repeats): a join on row hashes, by bucket
    seen = (batches | "RowHashes" >> beam.FlatMap(hash_buckets, tokens_col, text_col, 16, cfg.seed)
            | "GroupHashes" >> beam.GroupByKey()
            | "SeenElsewhere" >> beam.FlatMap(seen_elsewhere_counts)
            | "SumSeen" >> beam.CombinePerKey(sum))
    finished = (step_accs | "FinishSteps" >> beam.Map(finish, AsSingleton(hist), cfg_dict, control_set)
                | "KeyFinished" >> beam.Map(lambda it: (it[0], it)))
    step_sigs = ({"scores": finished, "seen": seen} | "JoinSeen" >> beam.CoGroupByKey()
                 | "CrossDup" >> beam.FlatMap(with_cross_dup))
    # Side inputs are always AsSingleton of a global combine: on Beam 2.77's DaskRunner an AsList of a
    # multi-element PCollection arrives with elements repeated, while a combined singleton is exact.
    ctrl_sigs = (step_sigs | "CtrlSigs" >> beam.Filter(lambda it, cs: it[0] in cs, control_set)
                 | "CtrlList" >> beam.combiners.ToList())

    batch_scores = step_sigs | "BatchScores" >> beam.FlatMap(batch_score_records, AsSingleton(ctrl_sigs), spikes_of,
                                                            control_set)

    row_base = (controls | "CtrlRows" >> beam.Map(lambda kv: tb_of(kv[1]))
                | "RowBaseline" >> beam.CombineGlobally(AuditorCombineFn(RowSampleFn(cfg_dict))))
    flags = windows | "FlagRows" >> beam.ParDo(
        FlagRows(cfg_dict, spikes_of, cfg.row_z, cfg.max_row_flags, cfg.tokenizer, tokens_col, text_col),
        AsSingleton(row_base))

    shard_scores = (batches | "ByShard" >> beam.FlatMap(split_by_shard)
                    | "ShardTokens" >> beam.MapTuple(lambda k, rb: (k, tb_of(rb)))
                    | "AuditShards" >> beam.CombinePerKey(AuditorCombineFn(suite, output="accumulator"))
                    | "FinishShards" >> beam.Map(finish, AsSingleton(hist), cfg_dict)
                    | "AllShards" >> beam.combiners.ToList()
                    | "ShardScores" >> beam.FlatMap(shard_score_records))

    seeds = p | "Spikes" >> beam.Create(sorted(plan.windows))
    win_sigs = step_sigs | "WindowSigs" >> beam.FlatMap(
        lambda it, so: [(sid, (it[0], it[3])) for sid in so.get(it[0], [])], spikes_of)
    flag_keys = flags | "FlagKeys" >> beam.Map(lambda kv: (kv[1]["spike_id"], {
        k: kv[1][k] for k in ("shard", "row", "row_end", "unit", "step", "score", "signals")}))
    vcfg = {"alpha": cfg.alpha, "min_effect": cfg.min_effect, "min_margin": cfg.min_margin,
            "min_controls": cfg.min_controls}
    verdicts = ({"seed": seeds | "SeedKeys" >> beam.Map(lambda s: (s, None)), "window": win_sigs, "flags": flag_keys}
                | "BySpike" >> beam.CoGroupByKey()
                | "Verdicts" >> beam.FlatMap(verdict_record, AsSingleton(ctrl_sigs), spike_info, vcfg, plan.missing))

    ((batch_scores, flags, shard_scores, verdicts) | "AllOutputs" >> beam.Flatten()
     | "Write" >> WriteTables(staging, parts={"row_flags": 4, "batch_scores": 4}))


# ------------------------------------------------------------------------------------ outputs


def skip_list(verdicts: pa.Table, row_flags: pa.Table) -> dict:
    """Per spike: the steps and data ranges to skip on restart, and trainer-specific renderings."""
    flags_by = {}
    for rec in row_flags.to_pylist():
        flags_by.setdefault(rec["spike_id"], []).append(rec)
    entries = []
    for v in verdicts.to_pylist():
        sid = v["spike_id"]
        if v["verdict"] == "data":
            fl = attributed(flags_by.get(sid, []), v["top_step"], v["top_signal"])
            steps = [v["top_step"]]
            ranges = sorted({(r["shard"], r["row"], r["row_end"], r["unit"]) for r in fl})
            entries.append({"spike_id": sid, "peak_step": v["peak_step"], "verdict": "data", "skip_steps": steps,
                            "skip_data": [{"shard": s, "row_start": a, "row_end": b, "unit": u}
                                          for s, a, b, u in ranges],
                            "note": f"skip step {v['top_step']}'s batch (or drop these rows) when restarting "
                                    f"before it: {v['top_signal']} is anomalous there"})
        else:
            entries.append({"spike_id": sid, "peak_step": v["peak_step"], "verdict": v["verdict"], "skip_steps": [],
                            "skip_data": [],
                            "note": "the data looks normal: skipping batches is not expected to help"
                            if v["verdict"] == "not_data" else "inconclusive: see the verdict's reason"})
    steps = sorted({s for e in entries for s in e["skip_steps"]})
    return {
        "spikes": entries,
        "steps_to_skip": steps,
        "render": {
            "olmo_core": {"steps_to_skip": steps},
            "megatron": {"iterations_to_skip": steps,
                         "cli": ("--iterations-to-skip " + " ".join(map(str, steps))) if steps else ""},
            "metaseq": {"skip_batches": ",".join(map(str, steps))},
        },
    }


def quarantine(verdicts: pa.Table, row_flags: pa.Table) -> dict:
    """Shards holding the rows that carry a ``data`` verdict's anomaly (see :func:`attributed`)."""
    flags_by: dict[str, list] = {}
    for rec in row_flags.to_pylist():
        flags_by.setdefault(rec["spike_id"], []).append(rec)
    shards: dict[str, dict] = {}
    for v in verdicts.to_pylist():
        if v["verdict"] != "data":
            continue
        for r in attributed(flags_by.get(v["spike_id"], []), v["top_step"], v["top_signal"]):
            e = shards.setdefault(r["shard"], {"flagged_rows": set(), "spikes": set(), "signals": set()})
            e["flagged_rows"].add((r["row"], r["row_end"], r["unit"]))
            e["spikes"].add(v["spike_id"])
            e["signals"].add(v["top_signal"])
    return {"shards": [{"shard": s, "n_flagged_rows": len(e["flagged_rows"]), "spikes": sorted(e["spikes"]),
                        "signals": sorted(e["signals"]),
                        "rows": [{"row_start": a, "row_end": b, "unit": u} for a, b, u in sorted(e["flagged_rows"])]}
                       for s, e in sorted(shards.items())]}


def control_false_alarms(batch_scores: pa.Table, cfg: RunConfig) -> dict:
    """Leave-one-out calibration: judge every control step as if it were a spike window against the
    other controls. A sound audit calls (almost) none of them ``data``; the count is reported."""
    ctrl = batch_scores.filter(pc.equal(batch_scores.column("role"), "control")).to_pylist()
    sigs = [{s["name"]: (s["value"] if s["value"] is not None else np.nan) for s in r["signals"]} for r in ctrl]
    names = signal_names(sigs)
    m = matrix(sigs, names)
    vcfg = VerdictConfig(alpha=cfg.alpha, min_effect=cfg.min_effect, min_margin=cfg.min_margin,
                         min_controls=cfg.min_controls)
    alarms = []
    for i, r in enumerate(ctrl):  # n_controls verdicts of n_controls x K matrices: small
        v = judge(names, m[i : i + 1], [r["step"]], np.delete(m, i, axis=0), vcfg)
        if v.verdict == "data":
            alarms.append({"step": r["step"], "signal": v.top_signal, "p_value": v.p_value})
    return {"n_controls": len(ctrl), "false_alarms": len(alarms), "alarms": alarms}


# --------------------------------------------------------------------------------------- state


def _inputs_fingerprint(cfg: RunConfig) -> str:
    d = asdict(cfg)
    for k in ("log", "out", "state"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_state(state_dir: str | None, cfg: RunConfig) -> dict | None:
    if not state_dir:
        return None
    p = Path(state_dir) / "state.json"
    if not p.exists():
        return None
    st = json.loads(p.read_text())
    if st.get("fingerprint") != _inputs_fingerprint(cfg):
        log.warning("state in %s was made with other settings or inputs; auditing everything again", state_dir)
        return None
    tables = {}
    for spec in OUTPUT_SPECS:
        f = Path(state_dir) / f"{spec.name}.parquet"
        tables[spec.name] = pq.read_table(f) if f.exists() else spec.empty()
    st["tables"] = tables
    return st


# ------------------------------------------------------------------------------------ run


@dataclass
class RunResult:
    out: Path
    tables: dict[str, pa.Table]
    n_spikes: int
    n_new_spikes: int
    n_tokens: int
    seconds: float


def run_audit(cfg: RunConfig, beam_args: list[str] | None = None) -> RunResult:
    from apache_beam.options.pipeline_options import PipelineOptions

    from spike_audit.pipelines.io import AtomicDir, write_json, write_table, write_text
    from spike_audit.pipelines.report import render_run_report

    t0 = time.time()
    for path, what in ((cfg.log, "log"), (cfg.manifest, "manifest"), (cfg.shards, "shard root")):
        if "://" not in path and not Path(path).exists():
            raise UserError(f"{path}: {what} not found")
    loss, report, spikes = read_loss_and_spikes(cfg)
    state = load_state(cfg.state, cfg)
    done = frozenset()
    if state is not None:
        done = frozenset(state["spikes_done"]) & frozenset(spikes.column("spike_id").to_pylist())
    plan = plan_audit(cfg, loss, spikes, skip_spikes=done,
                      fixed_controls=state["controls"] if state is not None else None)
    new_ids = sorted(plan.windows)
    log.info("%d spikes in the log, %d already audited, %d to audit", spikes.num_rows, len(done), len(new_ids))

    staging_root = Path(tempfile.mkdtemp(prefix=".spike-audit-staging-", dir=Path(cfg.out).resolve().parent
                                         if Path(cfg.out).resolve().parent.exists() else None))
    try:
        if new_ids:
            opts = PipelineOptions(beam_options(beam_args))
            log.info("running the audit pipeline (%s)", opts.get_all_options().get("runner") or "DirectRunner")
            from spike_audit.pipelines.beam_util import collect_tables, run_pipeline

            run_pipeline(lambda p: build_pipeline(p, cfg, plan, str(staging_root)), opts)

            new_tables = collect_tables(str(staging_root), OUTPUT_SPECS)
        else:
            new_tables = {spec.name: spec.empty() for spec in OUTPUT_SPECS}
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)

    tables = merge_with_state(state, new_tables, done)
    bs = new_tables["batch_scores"]  # a step has a row per spike window holding it: count each step once
    n_tokens = int(sum(dict(zip(bs.column("step").to_pylist(), bs.column("n_tokens").to_pylist())).values()))

    with AtomicDir(cfg.out) as stage:
        write_table(spikes, stage / "spikes.parquet", SPIKES)
        write_table(loss, stage / "loss_series.parquet")
        for spec in OUTPUT_SPECS:
            write_table(tables[spec.name], stage / f"{spec.name}.parquet", spec)
        write_json(skip_list(tables["verdicts"], tables["row_flags"]), stage / "skip_list.json")
        write_json(quarantine(tables["verdicts"], tables["row_flags"]), stage / "quarantine.json")
        write_text(render_run_report(loss, spikes, tables, cfg), stage / "report.html")
        summary = {"log": report.__dict__ if hasattr(report, "__dict__") else str(report),
                   "spikes": spikes.num_rows, "audited_now": len(new_ids), "from_state": len(done),
                   "controls": len(plan.controls) if not done or new_ids else len(state["controls"]),
                   "verdicts": {v: int(c) for v, c in zip(*np.unique(
                       np.asarray(tables["verdicts"].column("verdict").to_pylist(), dtype=str), return_counts=True))},
                   "control_calibration": control_false_alarms(tables["batch_scores"], cfg)}
        write_json(summary, stage / "summary.json")
    if cfg.state:
        save_state(cfg, tables, plan, state)
    dt = time.time() - t0
    return RunResult(Path(cfg.out), tables, spikes.num_rows, len(new_ids), n_tokens, dt)


RUNNER_ALIASES = {"DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}


def beam_options(args: list[str] | None) -> list[str]:
    """Pass Beam options through unchanged, but accept short runner names Beam itself does not know
    (``--runner=DaskRunner``), and on the DaskRunner install :mod:`pipelines.dask_compat`."""
    from spike_audit.pipelines.dask_compat import install, needs_shim

    out = []
    args = list(args or [])
    for i, a in enumerate(args):
        if a == "--runner" and i + 1 < len(args):  # "--runner X" -> "--runner=X"
            args[i + 1] = "--runner=" + args[i + 1]
            continue
        if a.startswith("--runner="):
            name = a.split("=", 1)[1]
            a = f"--runner={RUNNER_ALIASES.get(name, name)}"
        out.append(a)
    if needs_shim(out):
        install()
    return out


def merge_with_state(state, new_tables, done):
    if state is None:
        return new_tables
    out = {}
    for spec in OUTPUT_SPECS:
        old = state["tables"][spec.name]
        if "spike_id" in old.column_names and spec is not SHARD_SCORES:
            keep = pc.is_in(old.column("spike_id"), value_set=pa.array(sorted(done), pa.string()))
            if spec is BATCH_SCORES:
                keep = pc.or_(keep, pc.equal(old.column("role"), "control"))
                new = new_tables[spec.name].filter(pc.equal(new_tables[spec.name].column("role"), "window"))
            else:
                new = new_tables[spec.name]
            old = old.filter(pc.fill_null(keep, False))
        else:
            new = new_tables[spec.name]
            if spec is SHARD_SCORES and new.num_rows == 0:
                new = old
            old = old.slice(0, 0)
        out[spec.name] = spec.sorted(pa.concat_tables([spec.conform(old), spec.conform(new)]))
    return out


def save_state(cfg: RunConfig, tables, plan: Plan, state) -> None:
    from spike_audit.pipelines.io import AtomicDir, write_json, write_table

    controls = state["controls"] if state is not None else plan.controls
    with AtomicDir(cfg.state) as stage:
        for spec in OUTPUT_SPECS:
            write_table(tables[spec.name], stage / f"{spec.name}.parquet", spec)
        write_json({"fingerprint": _inputs_fingerprint(cfg), "controls": sorted(controls),
                    "spikes_done": sorted(tables["verdicts"].column("spike_id").to_pylist())}, stage / "state.json")
