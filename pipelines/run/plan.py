"""The driver's plan: the run's configuration, then log -> spikes -> the steps to read (each spike's window and a
seeded sample of control steps) and their manifest rows (Parquet predicate push-down), checked against the shards.

Defaults (documented in the README): spikes of any metric (loss, grad norm) whose flagged ranges lie within
``merge_gap = 3`` steps of each other form one *event*, each metric's peak recorded; the window of an event is
``[start - lookback, end]`` with ``lookback = 2`` (the loss at step s is measured on batch s, so a data-caused
spike shows at the batch itself; the lookback covers a delayed reaction; the window does not stop at the
peak), at most ``max_window`` steps. Controls are ``n_controls = 200`` steps drawn with ``seed`` from the
logged steps at least ``guard = 20`` steps away from every spike, raised when needed so that ``p <= alpha``
stays reachable for the longest window (Sidak over its steps)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shards.rows import RowDef
from spike_audit.schemas import STEP_MANIFEST, validate


log = logging.getLogger(__name__)


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
    n_controls: int = 200
    p_resolution: int = 1
    guard: int = 20
    seed: int = 0
    alpha: float = 0.05
    min_rows: int = 2
    min_controls: int = 20
    merge_gap: int = 3
    max_window: int = 12
    dup_reference: str = "manifest"
    max_row_flags: int = 4096
    tokens_col: str = "tokens"
    text_col: str = "text"
    tokenizer: str | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    rows: str | None = None  # row definition of flat token files: windows / documents / idx (shards.rows)
    seq_len: int | None = None
    flat_rows: RowDef | None = None  # resolved by resolve_tokens (flags, the tokenizer's EOS, the manifest)
    tokenizer_special: tuple | None = None  # what the tokenizer says: (key, value) pairs, for the outputs
    vocab_size: int | None = None
    state: str | None = None
    allow_missing_steps: bool = False
    allow_overlap: bool = False
    row_losses: str | None = None  # per-row losses: the model-based verdict (run.model_verdict)
    row_losses_first_step: int = 1  # step of row 0 of a [steps, batch] .npy
    loss_baseline: str = "auto"  # auto | preceding | controls
    replay_pack: str | None = None  # write the window and control rows here (run.replay_pack)
    log_trainer: str | None = None  # whose step numbering the log uses, when its format does not say
    step_offset: int | None = None  # manifest step = log step + step_offset (overrides the convention)
    dtype: str | None = None  # token dtype of raw token files (default: the manifest's)
    # how the log is read (passed to the log reader, as in `spike-audit spikes`)
    step_key: str | None = None
    value_key: str | None = None
    tag: str | None = None
    pattern: str | None = None
    strict: bool = False
    run: str | None = None  # the run to audit when the log holds several (TensorBoard subfolders, W&B export)
    baseline: str | None = None  # a saved baseline (shards --save-baseline): its unigram histogram is the reference


@dataclass
class Plan:
    """What to audit: small, built on the driver. Keys of ``windows`` are event ids (an event's id is the id
    of its first spike on the audited metric, else of its first spike)."""

    spikes: pa.Table
    windows: dict[str, list[int]]  # event id -> window steps with data
    controls: list[int]
    spikes_of: dict[int, list[str]]  # window step -> event ids
    slices: list[tuple[int, tuple[str, int, int, str]]]
    missing: dict[str, list[int]] = field(default_factory=dict)  # event id -> window steps without data
    offset: int = 0  # manifest step = log step + offset (the step join, run.steps)
    events: dict[str, dict] = field(default_factory=dict)  # event id -> members, range, peaks per metric
    exclude_steps: list[int] = field(default_factory=list)  # every spike window (audited now or before)
    shard_lengths: dict = field(default_factory=dict)  # (shard, unit) -> rows or tokens in the shard


#: More controls than any run has steps (a cap for the arithmetic of a tiny --alpha: never a draw of this size, the
#: draw takes at most every eligible step)
MAX_CONTROLS = 2 ** 62


def needed_controls(m: int, alpha: float) -> int:
    """Smallest number of controls with which ``p <= alpha`` is reachable over ``m`` window steps
    (``1 - (1 - 1/(n+1))**m <= alpha``)."""
    if m <= 0:
        return 0
    step_level = -np.expm1(np.log1p(-alpha) / m)  # 1 - (1 - alpha) ** (1 / m), exact for a tiny alpha too
    if not step_level > 0:  # alpha below what a double resolves over m steps: no number of controls reaches it
        return MAX_CONTROLS
    with np.errstate(over="ignore"):
        return int(min(MAX_CONTROLS, np.ceil(1.0 / step_level - 1.0 - 1e-9)))


def group_events(spikes: pa.Table, metric: str, gap: int) -> list[dict]:
    """Spikes of every metric whose flagged ranges ``[start_step, end_step]`` lie within ``gap`` steps of
    each other (per run) form one event: ``{id, run, members, start, end, peak_step, peaks}``; ``peaks``
    lists each member's metric, peak step and value. The event's ``peak_step`` is that of its first spike
    on ``metric`` (else of its first spike)."""
    rows = sorted(spikes.to_pylist(), key=lambda r: (r["run"], r["start_step"], r["peak_step"], r["metric"]))
    events: list[dict] = []
    for r in rows:
        end = r["end_step"] if r["end_step"] is not None else r["peak_step"]
        cur = events[-1] if events else None
        if cur is not None and cur["run"] == r["run"] and r["start_step"] <= cur["end"] + gap:
            cur["members"].append(r)
            cur["end"] = max(cur["end"], end)
            continue
        events.append({"run": r["run"], "start": r["start_step"], "end": end, "members": [r]})
    out = []
    for ev in events:
        mem = ev["members"]
        main = [m for m in mem if m["metric"] == metric]
        first = sorted(main or mem, key=lambda m: (m["peak_step"], m["spike_id"]))[0]
        out.append({"id": first["spike_id"], "run": ev["run"], "start": int(ev["start"]), "end": int(ev["end"]),
                    "peak_step": int(first["peak_step"]),
                    "members": sorted(m["spike_id"] for m in mem),
                    "peaks": sorted(({"metric": m["metric"], "step": int(m["peak_step"]),
                                      "value": float(m["peak_value"])} for m in mem),
                                    key=lambda d: (d["step"], d["metric"]))})
    return out


def resolve_tokens(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the EOS / pad ids taken from the tokenizer where not given and the row definition of
    flat token files resolved (the flags' and the manifest's must agree)."""
    from dataclasses import replace

    from spike_audit.pipelines.manifest import manifest_rows
    from spike_audit.pipelines.settings import check_values
    from spike_audit.pipelines.shards.rows import row_def
    from spike_audit.pipelines.tokenizer import resolve_special

    check_values(cfg)  # a RunConfig built by hand (the Python API) is checked too
    pad_id = cfg.pad_id
    if pad_id is None:  # a pad id the trainer fed as 0 with its loss masked: padding, whatever the tokenizer says
        from spike_audit.pipelines.manifest import read_meta

        pad_id = read_meta(cfg.manifest).get("fed_pad_id")
    eos, pad, special = resolve_special(cfg.tokenizer, cfg.eos_id, pad_id)
    rows = manifest_rows(cfg.manifest, cfg.flat_rows or row_def(cfg.rows, cfg.seq_len, eos))
    return replace(cfg, eos_id=eos, pad_id=pad, flat_rows=rows,
                   tokenizer_special=tuple(sorted(special.items())) if special else None)


def token_summary(cfg: RunConfig) -> dict:
    """How token ids were read and interpreted (``summary.json``): row definition, EOS / pad, tokenizer."""
    return {"flat_rows": cfg.flat_rows.to_meta() if cfg.flat_rows is not None else None, "eos_id": cfg.eos_id,
            "pad_id": cfg.pad_id, "tokenizer": cfg.tokenizer,
            "tokenizer_special_tokens": dict(cfg.tokenizer_special) if cfg.tokenizer_special else None,
            "text_decoded_from_tokens": bool(cfg.tokenizer)}


def read_loss_and_spikes(cfg: RunConfig):
    from spike_audit.auditors.spikes import DetectorConfig, detect_table
    from spike_audit.pipelines.logs.read import read_log

    loss, report = read_log(cfg.log, format=cfg.log_format, step_key=cfg.step_key, value_key=cfg.value_key,
                            tag=cfg.tag, pattern=cfg.pattern, strict=cfg.strict,
                            metric=cfg.metric if (cfg.value_key or cfg.tag or cfg.pattern) else None)
    loss = select_run(loss, cfg)
    log.info("log %s: %s format, %d values, %d malformed, %d replaced by a resume", cfg.log, report.format,
             report.n_values, report.n_malformed, report.n_replaced)
    metrics = set(loss.column("metric").to_pylist())
    if cfg.metric not in metrics:
        raise UserError(f"{cfg.log}: no {cfg.metric!r} values (metrics found: {', '.join(sorted(metrics)) or 'none'})")
    spikes = detect_table(loss, DetectorConfig(method=cfg.method),
                          metrics=tuple(m for m in (cfg.metric, "grad_norm") if m in metrics))
    return loss, report, spikes


def join_steps(cfg: RunConfig, loss, report):
    """The log->manifest step join (checked) and the token dtype to read raw token files with."""
    from spike_audit.pipelines.manifest import read_meta, token_dtype
    from spike_audit.pipelines.run.steps import align

    meta = read_meta(cfg.manifest)  # the run description from the footer (a URL through the filesystem layer)
    join = align(loss, log_path=cfg.log, log_format=report.format, report_trainer=getattr(report, "trainer", None),
                 meta=meta, manifest_range=_manifest_steps_range(cfg.manifest), metric=cfg.metric,
                 log_trainer=cfg.log_trainer, step_offset=cfg.step_offset,
                 allow_missing_steps=cfg.allow_missing_steps)
    log.info("step join: %s (manifest step = log step %+d)", join.how, join.offset)
    return join, token_dtype(meta, cfg.dtype, cfg.manifest)


def select_run(loss: pa.Table, cfg: RunConfig) -> pa.Table:
    """The one run to audit: a manifest is one run's data order, so a log holding several runs (TensorBoard
    run subfolders, a W&B export of several runs) needs ``--run``; several runs that are pieces of one file
    (``NAME@N``, a resume that changed the planned total) are audited together as before."""
    runs = sorted(set(loss.column("run").to_pylist()))
    if cfg.run is not None:
        if cfg.run not in runs:
            raise UserError(f"{cfg.log}: no run {cfg.run!r} in the log (runs: {', '.join(runs)})")
        return loss.filter(pc.equal(loss.column("run"), cfg.run))
    bases = {r.split("@", 1)[0] for r in runs}
    if len(bases) > 1:
        raise UserError(f"{cfg.log}: holds {len(runs)} runs ({', '.join(runs[:10])}{', ...' if len(runs) > 10 else ''}); "
                        f"a manifest is one run's data order: choose one with --run")
    return loss


def _parquet_file(path: str) -> pq.ParquetFile:
    from spike_audit.pipelines import fs

    try:
        pf = pq.ParquetFile(fs.open(path, "rb") if fs.is_url(path) else path)
        pf.schema_arrow.names  # a corrupt footer can hold names that are not UTF-8
        return pf
    except (pa.ArrowException, OSError, ValueError) as err:
        msg = str(err).strip()
        raise UserError(f"{path}: not a readable Parquet manifest ({msg.splitlines()[0] if msg else type(err).__name__})") from None


def _manifest_steps_range(path: str) -> tuple[int, int]:
    from spike_audit.pipelines.manifest import check_steps

    pf = _parquet_file(path)
    validate(pf.schema_arrow, STEP_MANIFEST, path)  # a string or float step column is refused, never compared
    md = pf.metadata
    lo, hi = None, None
    idx = md.schema.to_arrow_schema().get_field_index("step")
    for rg in range(md.num_row_groups):
        st = md.row_group(rg).column(idx).statistics
        if st is None or not st.has_min_max:
            lo = None
            break
        lo = st.min if lo is None else min(lo, st.min)
        hi = st.max if hi is None else max(hi, st.max)
    if lo is None or lo < 0 or hi > 2 ** 63 - 1:  # no statistics, or a bad step: read the column to name its row
        t = pf.read(columns=["step"]).column("step")
        check_steps(t, path)
        if len(t) == 0:
            raise UserError(f"{path}: the manifest has no rows")
        lo, hi = pc.min(t).as_py(), pc.max(t).as_py()
    return int(lo), int(hi)


def read_manifest_steps(path: str, steps: list[int], offset: int = 0) -> pa.Table:
    """The manifest rows of ``steps`` only (predicate push-down on row-group statistics), in file
    order; nothing manifest-sized is read on the driver. ``steps`` are the log's: the manifest's step of
    log step ``s`` is ``s + offset`` (the step join), and the rows come back numbered as the log."""
    from spike_audit.pipelines import fs

    if not fs.exists(path):
        raise UserError(f"{path}: manifest not found")
    if not fs.is_url(path):
        from spike_audit.pipelines.files import check_regular

        check_regular(path, "Parquet manifest")  # a FIFO or a device is refused, never read
    schema = _parquet_file(path).schema_arrow
    validate(schema, STEP_MANIFEST, path)
    wanted = pa.array(sorted({int(s) + offset for s in steps}), pa.int64())
    afs, apath = fs.arrow_fs(path)
    import pyarrow.dataset as pads  # imports pandas: only where a manifest is read

    try:
        table = pads.dataset(apath, format="parquet", filesystem=afs).to_table(filter=pads.field("step").isin(wanted),
                                                                               use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as err:  # a corrupt page or column chunk past the footer
        from spike_audit.pipelines.errors import reason

        raise UserError(f"{path}: not a readable Parquet manifest ({reason(err)})") from None
    table = STEP_MANIFEST.conform(table, path)
    if offset:  # back to the log's step numbers
        table = table.set_column(table.schema.get_field_index("step"), STEP_MANIFEST.schema.field("step"),
                                 pc.subtract(table.column("step"), pa.scalar(offset, pa.int64())))
    unit = pc.fill_null(table.column("unit"), "row")
    return table.set_column(table.schema.get_field_index("unit"), STEP_MANIFEST.schema.field("unit"), unit)


def manifest_row_numbers(path: str, steps: list[int]) -> np.ndarray:
    """0-based row numbers in the manifest file of the rows :func:`read_manifest_steps` returns
    (reads the step column: done only to name the row in an error message)."""
    wanted = pa.array(sorted(set(steps)), pa.int64())
    all_steps = _parquet_file(path).read(columns=["step"]).column("step")
    return np.flatnonzero(np.asarray(pc.is_in(all_steps, value_set=wanted).to_numpy(zero_copy_only=False)))


def plan_audit(cfg: RunConfig, loss: pa.Table, spikes: pa.Table, skip_spikes: frozenset = frozenset(),
               fixed_controls: list[int] | None = None, offset: int = 0, dtype=None) -> Plan:
    """Choose window and control steps and join them to the manifest. Steps here are the log's own; the
    manifest's step of log step ``s`` is ``s + offset`` (:mod:`spike_audit.pipelines.run.steps`)."""
    sel = loss.filter(pc.equal(loss.column("metric"), cfg.metric))
    steps = np.asarray(sel.column("step"), dtype=np.int64)
    values = np.asarray(sel.column("value"), dtype=np.float64)
    lo, hi = (x - offset for x in _manifest_steps_range(cfg.manifest))

    windows: dict[str, list[int]] = {}
    spikes_of: dict[int, list[str]] = {}
    events = {}
    # steps within `guard` of a spike are never controls: intervals, not every step listed (a large --guard
    # listed billions of steps)
    lim = 2 ** 63 - 1
    near = sorted((max(-lim, start - cfg.guard), min(lim, (end if end is not None else peak) + cfg.guard))
                  for start, peak, end in zip(spikes.column("start_step").to_pylist(),
                                              spikes.column("peak_step").to_pylist(),
                                              spikes.column("end_step").to_pylist()))
    near_lo = np.asarray([a for a, _ in near], dtype=np.int64)
    near_hi = np.maximum.accumulate(np.asarray([b for _, b in near], dtype=np.int64)) if near else near_lo

    def busy(x) -> np.ndarray:
        x = np.asarray(x, dtype=np.int64)
        i = np.searchsorted(near_lo, x, side="right") - 1
        return (i >= 0) & (x <= near_hi[np.maximum(i, 0)]) if len(near_lo) else np.zeros(x.shape, bool)
    first_logged = int(steps.min()) if len(steps) else None
    exclude: set[int] = set()
    for ev in group_events(spikes, cfg.metric, cfg.merge_gap):
        eid = ev["id"]
        e0 = max(ev["start"] - cfg.lookback, first_logged if first_logged is not None else ev["start"])
        exclude.update(range(e0, min(ev["end"], e0 + cfg.max_window - 1) + 1))
        if eid in skip_spikes or any(m in skip_spikes for m in ev["members"]):
            continue
        peak = ev["peak_step"]
        if not (lo <= peak <= hi) and not cfg.allow_missing_steps:
            raise UserError(f"{cfg.manifest} covers the log's steps {lo}..{hi} but {cfg.log} has a spike at step {peak} "
                            f"({eid}): is this the manifest of that run? (--allow-missing-steps to judge such "
                            f"spikes inconclusive)")
        w0 = max(ev["start"] - cfg.lookback, first_logged if first_logged is not None else ev["start"])
        w1 = min(ev["end"], w0 + cfg.max_window - 1)
        if w1 < ev["end"]:
            log.info("event %s spans steps %d..%d: its window is cut to %d steps (--max-window)", eid, ev["start"],
                     ev["end"], cfg.max_window)
        w = list(range(w0, w1 + 1))
        windows[eid] = w
        events[eid] = ev
        for s in w:
            spikes_of.setdefault(s, []).append(eid)

    if fixed_controls is not None:
        fixed = np.asarray(fixed_controls, dtype=np.int64)
        controls = fixed[~busy(fixed)].tolist()
    else:
        ok = np.isfinite(values) & ~busy(steps) & (steps >= lo) & (steps <= hi)
        candidates = np.unique(steps[ok])
        rng = np.random.default_rng(cfg.seed)
        longest = max((len(w) for w in windows.values()), default=0)
        # with room for up to 5% of them to be left out as anomalous themselves (verdict.null_model)
        floor = cfg.alpha / max(1, cfg.p_resolution)
        want = max(cfg.n_controls, int(np.ceil(needed_controls(longest, floor) / 0.95)))
        if want > cfg.n_controls:
            log.info("%d controls (not %d) so that p <= %g is reachable over the longest window (%d steps)", want,
                     cfg.n_controls, floor, longest)
        take = min(len(candidates), want)
        controls = sorted(rng.choice(candidates, size=take, replace=False).tolist()) if take else []

    wanted = sorted(set(spikes_of) | set(controls))
    man = read_manifest_steps(cfg.manifest, wanted, offset)
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
    lengths = _check_slices(cfg, man, [w + offset for w in wanted], dtype)
    _check_step_sizes(cfg, man)
    log.info("audit plan: %d spikes, %d window steps, %d control steps, %d manifest slices", len(windows),
             len(spikes_of), len(controls), len(slices))
    return Plan(spikes, windows, controls, spikes_of, slices, missing, offset, events, sorted(exclude), lengths or {})


def _check_step_sizes(cfg: RunConfig, man: pa.Table) -> None:
    """Warn when audited steps of a manifest of rows hold another number of rows than the run description's
    ``samples_per_step`` (a step column off by one somewhere, two steps' rows under one number): the audit then
    judges what the manifest says, which is not what the trainer consumed."""
    from spike_audit.pipelines.manifest import read_meta

    per = read_meta(cfg.manifest).get("samples_per_step")
    if not per or not man.num_rows:
        return
    unit = pc.fill_null(man.column("unit"), "row")
    rows = man.filter(pc.equal(unit, "row"))
    if not rows.num_rows:
        return
    steps = np.asarray(rows.column("step"), dtype=np.int64)
    n = np.asarray(rows.column("row_end"), dtype=np.int64) - np.asarray(rows.column("row_start"), dtype=np.int64)
    u, inv = np.unique(steps, return_inverse=True)
    count = np.bincount(inv, weights=n).astype(np.int64)
    off = np.flatnonzero(count != int(per))
    if len(off):
        i = int(off[0])
        log.warning("%s: %d of %d audited steps hold another number of rows than the run description's "
                    "samples_per_step %d (log step %d has %d): is the manifest's step column right?", cfg.manifest,
                    len(off), len(u), int(per), int(u[i]), int(count[i]))


def _check_slices(cfg: RunConfig, man: pa.Table, steps: list[int], dtype=None) -> dict:
    """Fail before any work if a selected slice is malformed, overlaps another in its step, points at
    a missing shard or past a shard's end (one line naming the manifest row and the shard)."""
    from spike_audit.pipelines.manifest import check_ranges, check_shard_bounds

    def check(row_ids):
        check_ranges(man, cfg.manifest, row_ids, allow_overlap=cfg.allow_overlap)
        return check_shard_bounds(man, cfg.manifest, cfg.shards, row_ids, tokens_col=cfg.tokens_col,
                           text_col=cfg.text_col, rows=cfg.flat_rows, dtype=dtype)

    try:
        return check(None)
    except UserError:
        check(manifest_row_numbers(cfg.manifest, steps))  # the same error, naming the row in the file
        raise
