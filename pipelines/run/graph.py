"""The audit's Beam graph (see the package docstring for its passes) and the per-element functions it is made of:
one scoring pass per step, the fixed duplicate reference, binning, the control reference, per-event verdicts with
their window steps' scores and flagged rows, and shard scores over the audited rows."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa

from spike_audit.auditors.evidence import NBINS, bin_hist, bin_matrix, candidates_from_hists, cut_value, scan
from spike_audit.auditors.rows import FAMILIES, PAIRED_SIGNALS, SIGNAL_ORDER
from spike_audit.auditors.verdict import (ReferenceBuilder, VerdictConfig, judge, null_model,
                                          step_flags, window_evidence)
from spike_audit.pipelines.beam.scoring import opt_float, score_batch, to_token_batch
from spike_audit.pipelines.run.dupref import position_keys, replay_rows, seen_elsewhere
from spike_audit.pipelines.run.plan import Plan, RunConfig

FAMILY_LIST = list(FAMILIES)
SCORE_BUNDLE_TOKENS = 1 << 18  # steps are scored in bundles of about this many tokens (text signals per bundle)
#: Families of later copies (their rows bring their earlier partner into the skip list).
PAIRED = tuple(i for i, f in enumerate(FAMILIES) if f.signal in PAIRED_SIGNALS)


# ------------------------------------------------------------------------------------------ scoring


def step_batch(kv):
    """(step, the step's batches, one per shard) -> (step, one RecordBatch), in shard then row order."""
    step, parts = kv
    parts = sorted((rb for rb in parts if rb.num_rows), key=lambda rb: (rb.column("shard")[0].as_py(),
                                                                         rb.column("row")[0].as_py()))
    if not parts:
        return
    t = pa.Table.from_batches(parts).combine_chunks()
    yield int(step), t.to_batches()[0] if t.num_rows else parts[0]


def step_tokens(kv) -> int:
    """Tokens (or, for text-only rows, rows) of a (step, RecordBatch): its weight in a scoring bundle."""
    col = kv[1].column("tokens")
    if col.null_count == len(col):
        return kv[1].num_rows
    return int(col.offsets[-1].as_py() - col.offsets[0].as_py()) + kv[1].num_rows


def score_steps(bundle, hist, cfg: dict, control_set: frozenset, window_set: frozenset):
    """A bundle of steps (:class:`~spike_audit.pipelines.beam.bundle.BundleByTokens`) -> :func:`score_step` of
    each, the text signals of all their rows computed in one call (a document's text signals do not depend on the
    batch it is scored in, so each step gets the values it would get alone; the call's fixed cost is paid once
    per bundle instead of once per step)."""
    from spike_audit.auditors import text as text_mod
    from spike_audit.auditors.batch_cache import BatchCache

    tbs = [to_token_batch(rb, cfg["tokens_col"], cfg["text_col"]) for _, rb in bundle]
    caches = [BatchCache(tb) for tb in tbs]
    texts = [tb.text for tb in tbs]
    if len(tbs) > 1 and all(isinstance(t, pa.Array) and len(t) for t in texts):
        types = {t.type for t in texts}
        parts = texts if len(types) == 1 else [t.cast(pa.large_string()) for t in texts]
        sig = text_mod.text_row_signals(pa.chunked_array(parts))
        a = 0
        for tb, cache in zip(tbs, caches):
            b = a + tb.n_rows
            cache.memo(("text",), lambda a=a, b=b: {k: v[a:b] for k, v in sig.items()})
            a = b
    for (step, rb), tb, cache in zip(bundle, tbs, caches):
        yield score_step((step, rb), hist, cfg, control_set, window_set, tb, cache)


def score_step(kv, hist, cfg: dict, control_set: frozenset, window_set: frozenset, tb=None,
               cache=None) -> tuple[int, dict]:
    """The one scoring pass over a step's rows: every row signal, the step's suite signals from the same
    cache, row identities and hashes. A control step's own tokens are taken out of the baseline."""
    from spike_audit.auditors.suite import COUNTS
    from spike_audit.pipelines.beam.scoring import make_suite, sum_histograms

    step, rb = kv
    tb = tb if tb is not None else to_token_batch(rb, cfg["tokens_col"], cfg["text_col"])
    base = None
    if hist is not None and int(np.sum(hist)) > 0:
        base = sum_histograms([hist])
        if step in control_set and tb.n_tokens:
            own = np.bincount(np.asarray(tb.values[: tb.offsets[-1]], dtype=np.int64), minlength=len(base))
            base[: len(own)] -= own[: len(base)]
        if int(base.sum()) <= 0:
            base = None
    rows, acc = score_batch(tb, cfg, base, suite_acc=True, cache=cache)
    sig = {k: float(v) for k, v in make_suite(cfg, baseline_hist=base).result(acc).items() if k not in COUNTS}
    n = tb.n_rows
    units = rb.column("unit").to_numpy(zero_copy_only=False).astype(object)
    out = {"n_rows": n, "n_tokens": tb.n_tokens, "signals": sig, "values": rows.matrix(), "hash": rows.hash,
           "partner": rows.partner,
           "shard": np.asarray(tb.shard, dtype=object), "row": np.asarray(rb.column("row"), dtype=np.int64),
           "row_end": np.asarray(rb.column("row_end"), dtype=np.int64), "unit": units,
           "row_tokens": np.asarray(tb.lengths, dtype=np.int64),
           "rb": rb if step in window_set else None}
    return int(step), out


def audited_hashes(item) -> np.ndarray:
    return item[1]["hash"]


def union_hashes(arrays) -> np.ndarray:
    arrays = [np.asarray(a, dtype=np.uint64) for a in arrays]
    return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.uint64)


_SEEN = SIGNAL_ORDER.index("seen_elsewhere")
_REPLAY = SIGNAL_ORDER.index("replay_rows")


def bin_step(item, dupref) -> tuple[int, dict]:
    """Fill ``seen_elsewhere`` and ``replay_rows`` from the fixed duplicate reference and bin every row on every
    family."""
    step, d = item
    values = d["values"].copy()
    pos = position_keys(d["shard"], d["row"], d["row_end"])
    seen = seen_elsewhere(dupref, d["hash"], pos)
    values[:, _SEEN] = seen
    values[:, _REPLAY], rpart = replay_rows(dupref, d["hash"], pos, with_partner=True)
    sig = dict(d["signals"])
    sig["cross_dup_frac"] = float(seen.mean()) if len(seen) and np.isfinite(seen).all() else float("nan")
    out = {k: v for k, v in d.items() if k not in ("values", "signals")}
    out["signals"] = sig
    out["bins"] = bin_matrix(values, SIGNAL_ORDER, FAMILIES)
    if (rpart >= 0).any():  # a replayed row's block's first row is named with it in the skip list
        part = np.asarray(d["partner"], dtype=np.int64).copy() if d.get("partner") is not None else np.full(len(rpart), -1)
        out["partner"] = np.where(part >= 0, part, rpart)
    return step, out


# -------------------------------------------------------------------------------------- the null


class _Reference(ReferenceBuilder):
    """The control steps' reference; a step twice (a run state's control scores holding one step in two part files)
    is a one-line error naming the state, not a traceback."""

    def result(self, acc):
        try:
            return super().result(acc)
        except ValueError as err:
            from spike_audit.pipelines.errors import UserError

            steps = [int(s) for s, _ in acc]
            dup = sorted({s for s in steps if steps.count(s) > 1})[:3]
            raise UserError(f"the control steps' scores hold step(s) {dup} twice ({err}): the run state's control "
                            f"cache is corrupt; delete the --state directory to audit everything again") from None


def null_of(ref, alpha: float):
    """The reference (control rows) and every control's leave-one-out evidence, anomalous controls left out
    (:func:`spike_audit.auditors.verdict.null_model`): one side input."""
    return null_model(ref, alpha)


class NullCombineFn(beam.CombineFn):
    """The control steps' (step, bins) combined into the reference (``_Reference``), then :func:`null_of` it."""

    def __init__(self, builder, alpha: float):
        self.builder, self.alpha = builder, alpha

    def create_accumulator(self):
        return self.builder.create()

    def add_input(self, acc, item):
        return self.builder.add(acc, item)

    def merge_accumulators(self, accs):
        return self.builder.merge(list(accs))

    def extract_output(self, acc):
        return null_of(self.builder.result(acc), self.alpha)


def control_tokens(kv, control_set: frozenset, tokens_col: str, text_col: str):
    """A control step's (step, RecordBatch) -> its TokenBatch (for the baseline histogram); nothing otherwise."""
    if kv[0] in control_set:
        yield to_token_batch(kv[1], tokens_col, text_col)


def _families_list(ev, g: int, k_top: int | None = None) -> list[dict]:
    e = ev.e[g]
    order = [int(f) for f in np.lexsort((np.arange(len(e)), -e)) if e[f] > 0]
    if k_top is not None:
        order = order[:k_top]
    return [{"name": FAMILY_LIST[f].name, "rows": int(ev.k[g, f]), "cut": float(cut_value(FAMILY_LIST[f], int(ev.cut[g, f]))),
             "natural_rate": float(ev.rate[g, f]), "evidence": float(min(e[f], 300.0))} for f in order]


def _signals_list(sig: dict) -> list[dict]:
    return [{"name": k, "value": opt_float(v), "z": None} for k, v in sorted(sig.items())]


def control_score_record(item, null, vcfg: dict, control_set: frozenset = None):
    """A control step's batch_scores row: its leave-one-out evidence, its p among the other controls and the
    verdict it gets judged as a one-step window against the others (the calibration); ``excluded`` for a
    control left out as anomalous itself. Nothing for a step not in ``control_set`` (when given)."""
    step, d = item
    if control_set is not None and step not in control_set:
        return
    excluded = step in null.excluded
    ref, ctrl = (null.all_ref, null.all_ctrl) if excluded else (null.ref, null.ctrl)
    i = ref.index_of(step)
    if i is None:
        return
    T = ctrl.T
    n = len(T)
    p = (1.0 + float(np.count_nonzero(np.delete(T, i) >= T[i]))) / n if n > 1 else None
    f = int(np.argmax(ctrl.e[i])) if ctrl.e.shape[1] else 0
    if excluded:
        as_window = "excluded"
    else:
        as_window = judge(FAMILY_LIST, [step], ctrl.take([i]), ref, ctrl, VerdictConfig(**vcfg), skip=i).verdict
    yield "batch_scores", {"step": step, "role": "control", "spike_id": None, "n_rows": d["n_rows"],
                           "n_tokens": d["n_tokens"], "evidence": float(min(T[i], 300.0)), "p_value": p,
                           "top_signal": FAMILY_LIST[f].name if T[i] > 0 else None,
                           "top_rows": int(ctrl.k[i, f]) if T[i] > 0 else None, "as_window": as_window,
                           "families": _families_list(ctrl, i), "signals": _signals_list(d["signals"])}


# ---------------------------------------------------------------------------------------- events


class EventOutputs(beam.DoFn):
    """Per event (CoGroupByKey of its window steps): the verdict, its window steps' batch_scores rows and the
    rows flagged at each window step (with excerpts)."""

    def __init__(self, events: dict, vcfg: dict, missing: dict, tokenizer: str | None, max_rows: int):
        super().__init__()
        self.events, self.vcfg, self.missing = events, vcfg, missing
        self.tokenizer_path, self.max_rows = tokenizer, max_rows
        self._tok = None

    def _tokenizer(self):
        if self.tokenizer_path and self._tok is None:
            from spike_audit.pipelines.tokenizer import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer_path)
        return self._tok

    def process(self, kv, null):
        eid, grouped = kv
        ref, ctrl = null.ref, null.ctrl
        win = sorted(grouped["window"], key=lambda t: t[0])
        steps = [s for s, _ in win]
        cfg = VerdictConfig(**self.vcfg)
        ev = window_evidence([d["bins"] for _, d in win], ref)
        v = judge(FAMILY_LIST, steps, ev, ref, ctrl, cfg)
        info = self.events[eid]
        flags = []
        for g, (step, d) in enumerate(win):
            found = v.step_findings.get(step, [])
            T = float(ev.T[g])
            top = int(np.argmax(ev.e[g])) if ev.e.shape[1] else 0
            yield "batch_scores", {"step": step, "role": "window", "spike_id": eid, "n_rows": d["n_rows"],
                                   "n_tokens": d["n_tokens"], "evidence": min(T, 300.0),
                                   "p_value": v.step_p.get(step), "top_signal": FAMILY_LIST[top].name if T > 0 else None,
                                   "top_rows": int(ev.k[g, top]) if T > 0 else None,
                                   "families": _families_list(ev, g), "signals": _signals_list(d["signals"])}
            rows, fams = step_flags(d["bins"], found, d.get("partner"), PAIRED)
            by_f = {x.family: x for x in found}
            for r, fs in zip(rows.tolist(), fams):
                flags.append((step, d, r, fs, max(by_f[f].e for f in fs), max(by_f[f].rate for f in fs)))
        flags.sort(key=lambda t: (-t[4], t[0], str(t[1]["shard"][t[2]]), int(t[1]["row"][t[2]])))
        flags = flags[: self.max_rows]
        counts: dict[str, int] = {}
        for step, d, r, fs, score, rate in flags:
            counts[str(d["shard"][r])] = counts.get(str(d["shard"][r]), 0) + 1
            yield "row_flags", {"shard": str(d["shard"][r]), "row": int(d["row"][r]), "row_end": int(d["row_end"][r]),
                                "unit": str(d["unit"][r]), "step": int(step), "spike_id": eid,
                                "signals": [FAMILY_LIST[f].name for f in fs], "score": float(min(score, 300.0)),
                                "natural_rate": float(rate), "excerpt": self._excerpt(d, r)}
        top_shards = [s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:5]
        reason = v.reason
        if self.missing.get(eid):
            reason += f" ({len(self.missing[eid])} window steps had no manifest rows)"
        yield "verdicts", {"spike_id": eid, "run": info["run"], "peak_step": info["peak_step"], "verdict": v.verdict,
                           "p_value": v.p_value, "evidence": v.evidence, "effect_size": v.effect_size,
                           "margin": v.margin, "anomalous_rows": v.anomalous_rows, "n_rows": v.n_rows,
                           "control_max_rows": v.control_max_rows, "natural_rate": v.natural_rate,
                           "top_signal": v.top_signal, "top_step": v.top_step,
                           "top_shards": top_shards if v.verdict == "data" else [], "n_controls": v.n_controls,
                           "n_window_steps": v.n_window_steps, "window_start": steps[0] if steps else None,
                           "window_end": steps[-1] if steps else None, "spikes": info["members"],
                           "peaks": info["peaks"], "reason": reason}

    def _excerpt(self, d, r):
        rb = d.get("rb")
        if rb is None:
            return None
        text = rb.column("text")[r].as_py() if "text" in rb.schema.names else None
        if text is not None:
            return text[:300]
        tok = self._tokenizer()
        if tok is None:
            return None
        ids = rb.column("tokens")[r].values.to_numpy(zero_copy_only=False)[:200]
        return tok.decode(ids.tolist())[:300]


# ---------------------------------------------------------------------------------------- shards


def shard_parts(item, control_set: frozenset):
    """A step's binned rows -> (shard, partial accumulator) per shard present."""
    step, d = item
    shard = np.asarray(d["shard"]).astype(str)
    ctrl = step in control_set
    toks = np.zeros(len(shard), dtype=np.int64)
    if d.get("row_tokens") is not None:
        toks = d["row_tokens"]
    for s in np.unique(shard).tolist():
        sel = shard == s
        h = bin_hist(d["bins"][sel])
        yield s, {"hist": h, "ctrl_hist": h if ctrl else np.zeros_like(h), "n_rows": int(sel.sum()),
                  "n_ctrl": int(sel.sum()) if ctrl else 0, "n_tokens": int(toks[sel].sum())}


class ShardAcc:
    """Sum of per-shard partial accumulators (a mergeable auditor-style accumulator)."""

    name = "shard_hist"

    def create(self):
        return None

    def add(self, acc, x):
        return self.merge([acc, x])

    def merge(self, accs):
        accs = [a for a in accs if a is not None]
        if not accs:
            return None
        out = {k: accs[0][k] for k in accs[0]}
        for a in accs[1:]:
            out = {k: out[k] + a[k] for k in out}
        return out

    def result(self, acc):
        return acc


def shard_evidence(kv, null) -> dict:
    """A shard's audited rows against the control rows (its own control rows out of the reference)."""
    shard, acc = kv
    ref = null.all_ref  # every control (the shard's own control rows are in it)
    h = acc["hist"][None, :, :]
    own = acc["ctrl_hist"]
    tails_own = np.zeros((ref.n_families, NBINS + 1), dtype=np.int64)
    tails_own[:, :NBINS] = np.cumsum(own[:, ::-1], axis=1)[:, ::-1]
    g, f, b, k, a = candidates_from_hists(h, ref.tail - tails_own, np.zeros(1, bool))
    ev = scan([(g, f, b, k, a)], np.array([acc["n_rows"]]), np.array([ref.rows - acc["n_ctrl"]]), ref.n_families)
    T = float(ev.T[0])
    top = int(np.argmax(ev.e[0])) if ev.e.shape[1] else 0
    fams = _families_list(ev, 0, 8)
    reason = "; ".join(f"{x['rows']} of {acc['n_rows']} rows on {x['name']} (natural rate {100 * x['natural_rate']:.2g}%"
                       f", e={x['evidence']:.1f})" for x in fams[:3])
    return {"shard": shard, "n_rows": acc["n_rows"], "n_tokens": acc["n_tokens"], "anomaly_score": min(T, 300.0),
            "top_signal": FAMILY_LIST[top].name if T > 0 else "", "top_rows": int(ev.k[0, top]) if T > 0 else 0,
            "natural_rate": float(ev.rate[0, top]) if T > 0 else None, "reason": reason, "families": fams,
            "signals": [], "fingerprint": None}


def rank_shards(records):
    recs = sorted(records, key=lambda r: (-r["anomaly_score"], r["shard"]))
    for i, r in enumerate(recs, 1):
        yield "shard_scores", dict(r, rank=i)


# ----------------------------------------------------------------------------------------- graph


def build_pipeline(p, cfg: RunConfig, plan: Plan, staging: str, dtype=None, baseline=None, kept_controls=None,
                   roots: dict | None = None):
    """The audit (see the package docstring). ``baseline`` (a loaded saved baseline): its unigram histogram is
    the reference of the baseline-relative signals instead of the control steps' tokens (no step's own tokens
    are in it, so nothing is taken out); the control rows still give the natural rates and calibrate p.
    ``kept_controls`` (the run state's control cache, :mod:`.control_cache`): the control steps' scores and
    unigram histogram come from its part files (``plan.slices`` then holds no control step); else, with
    ``roots`` naming where, the control steps' scores are written out for the next run."""
    from spike_audit.pipelines.run import control_cache as cc

    import apache_beam as beam
    from apache_beam.pvalue import AsSingleton

    from spike_audit.auditors.tokens import Histogram
    from spike_audit.pipelines.beam.bundle import BundleByTokens
    from spike_audit.pipelines.beam.combine import AuditorCombineFn, global_combine
    from spike_audit.pipelines.beam.read import DecodeText, ReadSlices
    from spike_audit.pipelines.beam.sink import WriteTables
    from spike_audit.pipelines.run.dupref import DupReference, hash_shard, manifest_row_groups, row_group_slices

    cfg_dict = {"vocab_size": cfg.vocab_size, "eos_id": cfg.eos_id, "pad_id": cfg.pad_id, "seed": cfg.seed,
                "tokens_col": cfg.tokens_col, "text_col": cfg.text_col, "flat_rows": cfg.flat_rows}
    control_set = frozenset(plan.controls)
    spikes_of = {int(k): list(v) for k, v in plan.spikes_of.items()}
    window_set = frozenset(spikes_of)
    tokens_col, text_col = cfg.tokens_col, cfg.text_col

    batches = (p | "Slices" >> beam.Create(plan.slices)
               | "Read" >> ReadSlices(cfg.shards, tokens_col=tokens_col, text_col=text_col, rows=cfg.flat_rows,
                                      dtype=dtype))
    if cfg.tokenizer:  # text signals for token-only shards: decode with the run's tokenizer
        batches = batches | "Decode" >> beam.ParDo(DecodeText(cfg.tokenizer))
    batches = batches | "ByStep" >> beam.GroupByKey() | "StepBatch" >> beam.FlatMap(step_batch)
    if baseline is not None:
        hist, hist_default = p | "SavedUnigram" >> beam.Create([baseline.unigram], reshuffle=False), None
        own_out = frozenset()  # no audited step's tokens are in a saved baseline
    elif kept_controls is not None:
        hist = (p | "KeptHistParts" >> beam.Create(kept_controls["parts"][cc.HIST_KIND])
                | "KeptHist" >> beam.FlatMap(cc.load_hist))
        combine, hist_default = global_combine(cc.sum_hist)
        hist = hist | "SumKeptHist" >> combine
        own_out = control_set
    else:
        combine, hist_default = global_combine(AuditorCombineFn(Histogram(), output="accumulator"))
        hist = (batches | "CtrlTokens" >> beam.FlatMap(control_tokens, control_set, tokens_col, text_col)
                | "BaselineHist" >> combine)
        own_out = control_set

    # the one scoring pass per row (Beam's side-input default cannot be an array: no controls give None, which
    # score_step reads as an empty histogram)
    scored = (batches | "Bundle" >> beam.ParDo(BundleByTokens(step_tokens, SCORE_BUNDLE_TOKENS))
              | "ScoreSteps" >> beam.FlatMap(score_steps, AsSingleton(hist, default_value=None), cfg_dict, own_out,
                                             window_set))
    state_out = []
    if kept_controls is not None:
        kept = (p | "KeptControlParts" >> beam.Create(kept_controls["parts"][cc.KIND])
                | "KeptControls" >> beam.FlatMap(cc.load_controls, control_set))
        scored = (scored, kept) | "WithKeptControls" >> beam.Flatten()
    elif roots and cc.KIND in roots:
        state_out.append(scored | "ControlRecords" >> beam.FlatMap(
            lambda kv, cs: [cc.to_record(kv)] if kv[0] in cs else [], control_set))
        if baseline is None:
            state_out.append(p | "HistOnce" >> beam.Create([None], reshuffle=False)  # written with no controls too
                             | "HistRecord" >> beam.Map(lambda _, h, d: cc.hist_record(d if h is None else h),
                                                        AsSingleton(hist, default_value=None), hist_default))

    # the fixed duplicate reference: every slice the manifest consumed, hashed, matched to the audited hashes
    if cfg.dup_reference == "manifest":
        union, _ = global_combine(union_hashes)  # none audited: hash_shard takes None as no hashes
        audited = (scored | "AuditedHashes" >> beam.Map(audited_hashes) | "AllAudited" >> union)
        combine, dupref_default = global_combine(AuditorCombineFn(DupReference()))
        dupref = (p | "ManifestGroups" >> beam.Create(manifest_row_groups(cfg.manifest))
                  | "GroupSlices" >> beam.FlatMap(row_group_slices, cfg.manifest,
                                                 frozenset(s + plan.offset for s in plan.exclude_steps))
                  | "ByShardAll" >> beam.GroupByKey()
                  | "HashShards" >> beam.FlatMap(hash_shard, AsSingleton(audited, default_value=None),
                                               cfg.shards, cfg_dict)
                  | "DupRef" >> combine)
        binned = scored | "Bin" >> beam.Map(bin_step, AsSingleton(dupref, default_value=dupref_default))
    else:
        binned = scored | "Bin" >> beam.Map(bin_step, None)

    combine, null_default = global_combine(NullCombineFn(_Reference(len(FAMILY_LIST)), cfg.alpha))
    null = (binned | "CtrlBins" >> beam.FlatMap(lambda kv, cs: [(kv[0], kv[1]["bins"])] if kv[0] in cs else [],
                                                 control_set)
            | "Null" >> combine)
    null = AsSingleton(null, default_value=null_default)  # the null of no controls if there are none

    vcfg = {"alpha": cfg.alpha, "min_rows": cfg.min_rows, "min_controls": cfg.min_controls}
    ctrl_scores = binned | "CtrlScores" >> beam.FlatMap(control_score_record, null, vcfg, control_set)

    seeds = p | "Events" >> beam.Create([(e, None) for e in sorted(plan.windows)], reshuffle=False)  # one per event
    win = binned | "WindowSteps" >> beam.FlatMap(lambda kv, so: [(e, kv) for e in so.get(kv[0], [])], spikes_of)
    events = {e: plan.events[e] for e in plan.windows}
    event_out = ({"seed": seeds, "window": win}
                 | "ByEvent" >> beam.CoGroupByKey()
                 | "Judge" >> beam.ParDo(EventOutputs(events, vcfg, plan.missing, cfg.tokenizer, cfg.max_row_flags),
                                           null))

    shard_scores = (binned | "ShardParts" >> beam.FlatMap(shard_parts, control_set)
                    | "ShardHists" >> beam.CombinePerKey(AuditorCombineFn(ShardAcc()))
                    | "ShardEvidence" >> beam.Map(shard_evidence, null)
                    | "AllShards" >> beam.CombineGlobally(beam.combiners.ToListCombineFn()).without_defaults()
                    | "RankShards" >> beam.FlatMap(rank_shards))

    ((ctrl_scores, event_out, shard_scores, *state_out) | "AllOutputs" >> beam.Flatten()
     | "Write" >> WriteTables(staging, parts={"row_flags": 4, "batch_scores": 4, cc.KIND: 4}, roots=roots))
