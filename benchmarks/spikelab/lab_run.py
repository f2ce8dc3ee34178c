"""One audited training run for the spike lab: shards, step manifest, loss log and ground truth.

A run draws its rows from the token pool (:mod:`lab_corpus`) in its own order:

* ``docs`` layout: each document is cut into rows of at most ``seq_len`` tokens (a document's last
  row ends with EOS when it fits), the rows shuffled;
* ``packed`` layout: documents joined with EOS and cut into rows of exactly ``seq_len`` tokens, shuffled.

Step ``s`` consumes ``rows_per_step`` rows. A loader with ``workers`` readers gives each reader its own
sequence of shards (reader ``w`` reads shards ``w, w + W, ...`` front to back) and takes
``rows_per_step / W`` rows from each per step, so a step's rows come from ``W`` shards (two where a
shard ends). Shards hold ``rows_per_shard`` rows (Parquet, ``tokens`` list<uint16|uint32>, ``text`` the
decoded tokens). Anomalies replace rows at the planted steps; the rest of each batch is untouched.

The loss log (Megatron stdout or JSONL) follows a power-law curve with autocorrelated noise; every
planted event makes the loss spike at its steps (heights and shapes vary), normal ``optimizer`` events
spike loss and grad norm with the data untouched, and one crash is resumed from the last checkpoint
(the replayed steps are logged twice, the first pass sometimes ending in NaN).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lab_corpus import EOS_ID, Pool
from lab_plant import KINDS, PlantContext, plant_rows

log = logging.getLogger("spikelab.run")

DOSES = (16, 8, 4, 2)  # rows of 16
DURATIONS = (1, 2, 3, 4, 6)
# (rows per step, sequence length) of full runs; runs hold at most about MAX_RUN_TOKENS tokens
SIZES = ((16, 256), (16, 384), (24, 256), (32, 128), (24, 128), (32, 192), (16, 512))
MAX_RUN_TOKENS = 10_000_000


@dataclass(frozen=True)
class EventDesign:
    """One planted event, identical under every seed (the data and positions change)."""

    design_id: str
    kind: str  # a key of KINDS, or "optimizer"
    dose: int  # rows of 16 (0 for optimizer)
    n_steps: int


@dataclass
class RunSpec:
    seed: int
    run: int
    steps: int
    rows_per_step: int
    seq_len: int
    layout: str
    rows_per_shard: int
    workers: int
    log_format: str
    events: list = field(default_factory=list)  # EventDesign

    @property
    def name(self) -> str:
        return f"seed{self.seed:02d}-run{self.run}"


def design(quick: bool, seed: int = 0) -> list[list[EventDesign]]:
    """The event designs of each run of a seed: every kind at every dose over the runs, every kind
    in every run, a few normal (optimizer) spikes per run. Durations (1-6 steps) rotate with the
    seed, so every (kind, dose) meets every duration over five seeds and dose is not confounded
    with duration; the design id is (kind, dose), the same under every seed."""
    kinds = list(KINDS)
    nd = len(DURATIONS)
    if quick:  # one run: every kind at one dose (alternating 16 and 4 / 8 and 2 over the kinds)
        evs = [EventDesign(f"q-{kind}", kind, (16, 8, 4, 2)[i % 4], DURATIONS[(i + seed) % nd])
               for i, kind in enumerate(kinds)]
        evs += [EventDesign(f"q-optimizer{j}", "optimizer", 0, 1) for j in range(2)]
        return [evs]
    runs: list[list[EventDesign]] = [[], []]
    for i, kind in enumerate(kinds):
        for j, dose in enumerate(DOSES):
            r = (j in (0, 3)) == (i % 2 == 0)  # doses {16, 2} in one run, {8, 4} in the other
            runs[int(not r)].append(EventDesign(f"{kind}-{dose}", kind, dose, DURATIONS[(i * 4 + j + seed) % nd]))
    for r in range(2):
        runs[r] += [EventDesign(f"r{r}-optimizer{j}", "optimizer", 0, 1 + (j + seed) % 3) for j in range(4)]
    return runs


def make_spec(seed: int, run: int, events: list, quick: bool) -> RunSpec:
    """Run settings drawn per (seed, run): sizes, layout, loader, log format."""
    rng = np.random.default_rng([seed, run, 7])
    if quick:
        return RunSpec(seed, run, steps=int(rng.integers(900, 1001)), rows_per_step=16,
                       seq_len=int(rng.choice([128, 192, 256])), layout=("docs", "packed")[seed % 2],
                       rows_per_shard=int(rng.choice([256, 320])), workers=int(rng.choice([1, 2])),
                       log_format=("megatron", "jsonl")[(seed + run) % 2], events=events)
    rows_per_step, seq_len = SIZES[int(rng.integers(len(SIZES)))]
    layout = "docs" if seq_len == 512 else ("docs", "packed")[(seed + run) % 2]
    cap = int(MAX_RUN_TOKENS // (rows_per_step * seq_len))
    return RunSpec(seed, run, steps=int(rng.integers(1500, max(1501, min(2000, cap) + 1))), rows_per_step=rows_per_step,
                   seq_len=seq_len, layout=layout,
                   rows_per_shard=int(rng.choice([256, 320, 384, 512])), workers=int(rng.choice([1, 2, 4])),
                   log_format=("megatron", "jsonl")[(seed // 2 + run) % 2], events=events)


# ---------------------------------------------------------------------------------- natural rows


def natural_rows(pool: Pool, layout: str, seq_len: int, rng: np.random.Generator) -> list[np.ndarray]:
    """All of the pool's rows in this run's layout and a random order."""
    order = rng.permutation(pool.n_docs)
    rows: list[np.ndarray] = []
    if layout == "docs":
        for i in order:
            d = pool.doc(int(i)).astype(np.int64)
            for a in range(0, len(d), seq_len):
                piece = d[a:a + seq_len]
                if a + seq_len >= len(d) and len(piece) < seq_len:
                    piece = np.concatenate([piece, [EOS_ID]])
                if len(piece) >= 16:
                    rows.append(piece)
    else:
        stream = np.concatenate([np.concatenate([pool.doc(int(i)).astype(np.int64), [EOS_ID]]) for i in order])
        n = len(stream) // seq_len
        rows = list(stream[: n * seq_len].reshape(n, seq_len))
    perm = rng.permutation(len(rows))
    return [rows[int(i)] for i in perm]


# ------------------------------------------------------------------------------------- placement


def place_events(spec: RunSpec, rng: np.random.Generator) -> list[tuple[EventDesign, int]]:
    """(design, first step) for every event: spread over the run in a random order, with jitter,
    at least 45 steps between one event's end and the next one's start."""
    evs = list(spec.events)
    order = rng.permutation(len(evs))
    lo, hi = 120, spec.steps - 40
    slot = (hi - lo) / len(evs)
    if slot < 45 + 6:
        raise ValueError(f"{spec.name}: {len(evs)} events do not fit in {spec.steps} steps")
    out = []
    for k, i in enumerate(order):
        ev = evs[int(i)]
        start = lo + int(k * slot + rng.integers(0, max(1, int(slot) - 45 - ev.n_steps)))
        out.append((ev, start))
    return sorted(out, key=lambda t: t[1])


def loader_map(spec: RunSpec) -> tuple[np.ndarray, np.ndarray]:
    """For every global row g = (step - 1) * rows_per_step + position: its shard index and row."""
    B, W, R = spec.rows_per_step, spec.workers, spec.rows_per_shard
    per = B // W
    g = np.arange(spec.steps * B)
    s0, pos = g // B, g % B
    w, j = pos // per, pos % per
    t = s0 * per + j  # position in reader w's stream
    return w + W * (t // R), t % R


def row_hash(tokens: np.ndarray) -> str:
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=8).hexdigest()


# ------------------------------------------------------------------------------------------ loss


def loss_values(spec: RunSpec, placed: list, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list]:
    """Loss and grad norm per step (index s - 1), and each event's loss range (steps the bump covers)."""
    n = spec.steps
    s = np.arange(1, n + 1, dtype=np.float64)
    a, b, c = rng.uniform(1.8, 2.6), rng.uniform(6, 9), rng.uniform(0.4, 0.65)
    noise = np.zeros(n)
    e = rng.normal(0, rng.uniform(0.008, 0.016), n)
    for i in range(1, n):  # AR(1): neighbouring steps' noise is correlated as in real curves
        noise[i] = 0.5 * noise[i - 1] + e[i]
    loss = a + b * (s / 5.0 + 1.0) ** -c + noise
    gnorm = 0.8 + 3.0 * (s / 10.0 + 1.0) ** -0.7 + np.abs(rng.normal(0, 0.03, n))
    ranges = []
    for ev, start in placed:
        base = a + b * (start / 5.0 + 1.0) ** -c
        if ev.kind == "optimizer":
            h = base * rng.uniform(0.15, 0.9)
            shape = int(rng.integers(3))
            if shape == 0:  # sharp
                tau, rise = rng.uniform(1.0, 4.0), 0
            elif shape == 1:  # rise over a few steps, slow recovery
                tau, rise = rng.uniform(4.0, 10.0), int(rng.integers(1, 3))
            else:  # a plateau of the event's length, then recovery
                tau, rise = rng.uniform(2.0, 6.0), 0
            steps = np.arange(n) + 1
            bump = np.zeros(n)
            peak = start + rise + (ev.n_steps - 1 if shape == 2 else 0)
            for k in range(rise + 1):
                bump[start + k - 1] = h * (k + 1) / (rise + 1)
            if shape == 2:
                bump[start - 1:peak] = h
            after = steps > peak
            bump[after] = h * np.exp(-(steps[after] - peak) / tau)
            bump[bump < 1e-4] = 0
            loss += bump
            lead = int(rng.integers(0, 2))  # grad norm often leads the loss by a step
            gstart = start - lead
            gn = np.zeros(n)
            gn[gstart - 1] = rng.uniform(2.0, 8.0)
            ga = steps > gstart
            gn[ga] = gn[gstart - 1] * np.exp(-(steps[ga] - gstart) / rng.uniform(1.0, 3.0))
            gnorm += gn * (gn > 1e-3)
            end = int(steps[bump > 0.02 * h].max()) if (bump > 0.02 * h).any() else peak
            ranges.append((min(start, gstart), end))
        else:
            frac = ev.dose / 16
            h = base * rng.uniform(0.25, 0.9) * (0.6 + 0.4 * frac)
            k = ev.n_steps
            levels = h * rng.uniform(0.55, 1.0, k)
            levels[int(rng.integers(k))] = h  # the peak at a random planted step
            last = start + k - 1
            loss[start - 1:last] += levels
            tau = rng.uniform(0.4, 2.0)
            tail = np.arange(last + 1, min(n, last + 15) + 1)
            loss[tail - 1] += levels[-1] * np.exp(-(tail - last) / tau)
            if rng.random() < 0.7:  # grad norm reacts too, sometimes a step late
                lag = int(rng.integers(0, 2))
                g = rng.uniform(1.0, 4.0) * levels / h
                gs = np.arange(start, last + 1) + lag
                ok = gs <= n
                gnorm[gs[ok] - 1] += g[ok]
            ranges.append((start, last + int(np.ceil(2 * tau))))
    return loss, gnorm, ranges


def _megatron_line(step: int, total: int, batch: int, loss: float, gnorm: float) -> str:
    lv = "nan" if not np.isfinite(loss) else f"{loss:.6E}"
    return (f"[default0]: iteration {step:8d}/{total:8d} | consumed samples: {step * batch:12d} | "
            f"elapsed time per iteration (ms): {640.0 + (step * 37) % 90:.1f} | learning rate: 3.000E-04 | "
            f"global batch size: {batch:5d} | lm loss: {lv} | loss scale: 1.0 | grad norm: {gnorm:.3f} | "
            f"number of skipped iterations:   0 | number of nan iterations:   {int(not np.isfinite(loss))} |")


def write_log(spec: RunSpec, loss, gnorm, placed, ranges, rng, dest: Path) -> dict:
    """The log with one crash and resume; returns its description."""
    n = spec.steps
    busy = [(lo, hi) for (ev, _), (lo, hi) in zip(placed, ranges) if ev.kind == "optimizer"]
    ckpt = 100
    for _ in range(1000):
        crash = int(rng.integers(300, n - 50))
        resume = (crash - 1) // ckpt * ckpt
        if crash - resume >= 10 and not any(lo <= crash + 3 and hi >= resume - 3 for lo, hi in busy):
            break
    nan_end = bool(rng.random() < 0.5)
    first = loss.copy()
    first[resume:crash] += rng.normal(0, 0.006, crash - resume)  # the first pass: other noise, same data
    if nan_end:
        first[crash - 1] = np.nan
    lines = []
    if spec.log_format == "megatron":
        lines += ["[default0]: > building train, validation, and test datasets ...",
                  "[default0]: > finished creating GPT datasets ..."]
        for st in range(1, crash + 1):
            lines.append(_megatron_line(st, n, spec.rows_per_step, first[st - 1], gnorm[st - 1]))
            if st % ckpt == 0:
                lines.append(f"[default0]: saving checkpoint at iteration {st:8d} to checkpoints")
        lines += ["[default5]: RuntimeError: NCCL communicator was aborted on rank 5.",
                  f"[default0]:  loading checkpoint from checkpoints at iteration {resume}"]
        for st in range(resume + 1, n + 1):
            lines.append(_megatron_line(st, n, spec.rows_per_step, loss[st - 1], gnorm[st - 1]))
            if st % ckpt == 0:
                lines.append(f"[default0]: saving checkpoint at iteration {st:8d} to checkpoints")
        name = "train.log"
    else:
        def rec(st, x, g):
            return json.dumps({"step": st, "train/loss": None if not np.isfinite(x) else round(float(x), 6),
                               "train/grad_norm": round(float(g), 4), "lr": 3e-4,
                               "tokens_seen": st * spec.rows_per_step * spec.seq_len})

        lines += [rec(st, first[st - 1], gnorm[st - 1]) for st in range(1, crash + 1)]
        lines += [rec(st, loss[st - 1], gnorm[st - 1]) for st in range(resume + 1, n + 1)]
        name = "metrics.jsonl"
    (dest / name).write_text("\n".join(lines) + "\n")
    return {"log": name, "crashed_at": crash, "resumed_from": resume, "nan_before_crash": nan_end}


# ------------------------------------------------------------------------------------------ build


def build_run(pool: Pool, spec: RunSpec, dest: Path) -> dict:
    """Write the run into ``dest`` (shards/, manifest.parquet, the log, tokenizer.json, truth.json)."""
    rng = np.random.default_rng([spec.seed, spec.run, 1])
    dest = Path(dest)
    (dest / "shards").mkdir(parents=True, exist_ok=True)
    tok = pool.tokenizer()
    rows = natural_rows(pool, spec.layout, spec.seq_len, rng)
    B = spec.rows_per_step
    need = spec.steps * B
    reserve_n = max(2000, len(rows) // 20)
    if len(rows) < need + reserve_n:
        steps = (len(rows) - reserve_n) // B
        log.warning("%s: the pool gives %d rows; %d steps instead of %d", spec.name, len(rows), steps, spec.steps)
        spec.steps = steps
        need = steps * B
    run_rows, reserve = rows[:need], rows[need:need + reserve_n]
    lengths = np.array([len(r) for r in run_rows])
    counts = np.bincount(np.concatenate(run_rows[: min(len(run_rows), 4000)]), minlength=pool.vocab_size)
    counts[:2] = 0  # substitutions never insert EOS or padding
    ctx = PlantContext(rng=rng, tok=tok, vocab_size=pool.vocab_size, layout=spec.layout, seq_len=spec.seq_len,
                       natural_lengths=lengths, unigram=counts / counts.sum(), reserve=reserve)

    placed = place_events(spec, rng)
    planted_at: dict[int, tuple[int, str]] = {}  # global row -> (event index, kind)
    copy_source: set[int] = set()  # global rows whose tokens a dup_copied event copied (the originals)
    events = []
    for e_idx, (ev, start) in enumerate(placed):
        steps = list(range(start, start + ev.n_steps))
        rec = {"event": e_idx, "design_id": ev.design_id, "kind": ev.kind, "dose": ev.dose, "n_steps": ev.n_steps,
               "steps": steps, "rows": []}
        if ev.kind != "optimizer":
            k = max(1, int(round(ev.dose / 16 * B)))
            state: dict = {}
            if ev.kind == "dup_copied":  # a replay of the rows of steps 100-600 steps away, away from events
                taken = [(st - 25, st + e2.n_steps + 25) for e2, st in placed]
                cands = [f for d in range(100, 601) for f in (start - d, start + d)
                         if 1 <= f and f + ev.n_steps - 1 <= spec.steps
                         and not any(lo <= f + ev.n_steps - 1 and f <= hi for lo, hi in taken)]
                src_first = int(rng.choice(cands))
                rec["copied_from_steps"] = list(range(src_first, src_first + ev.n_steps))
            for i, step in enumerate(steps):
                pos = np.sort(rng.choice(B, size=k, replace=False))
                g = (step - 1) * B + pos
                sources = None
                if ev.kind == "dup_copied":
                    sg = (rec["copied_from_steps"][i] - 1) * B + pos
                    sources = [run_rows[int(x)] for x in sg]
                    copy_source.update(int(x) for x in sg)
                new = plant_rows(ev.kind, k, ctx, copy_sources=sources, event_state=state)
                for gi, r in zip(g.tolist(), new):
                    run_rows[gi] = np.asarray(r, dtype=np.int64)
                    planted_at[gi] = (e_idx, ev.kind)
                rec["rows"].append({"step": step, "global_rows": g.tolist()})
        events.append(rec)

    # shards and manifest
    shard_idx, shard_row = loader_map(spec)
    n_shards = int(shard_idx.max()) + 1
    names = [f"train-{i:05d}.parquet" for i in range(n_shards)]
    dtype = pa.uint16() if spec.layout == "docs" else pa.uint32()
    order = np.lexsort((shard_row, shard_idx))
    bounds = np.searchsorted(shard_idx[order], np.arange(n_shards + 1))
    texts = tok.decode_batch([r.tolist() for r in run_rows], skip_special_tokens=False)
    for i in range(n_shards):
        gs = order[bounds[i]:bounds[i + 1]]
        assert np.array_equal(shard_row[gs], np.arange(len(gs))), "shard rows must be dense"
        toks = [run_rows[int(g)] for g in gs]
        table = pa.table({"tokens": pa.array(toks, type=pa.list_(dtype)),
                          "text": pa.array([texts[int(g)] for g in gs], type=pa.string())})
        pq.write_table(table, dest / "shards" / names[i], row_group_size=128)
    man = {"step": [], "shard": [], "row_start": [], "row_end": [], "unit": [], "rank": [], "micro_batch": []}
    per = B // spec.workers
    for s in range(1, spec.steps + 1):
        g0 = (s - 1) * B
        for w in range(spec.workers):
            gs = np.arange(g0 + w * per, g0 + (w + 1) * per)
            sh, rw = shard_idx[gs], shard_row[gs]
            cut = np.flatnonzero((np.diff(sh) != 0) | (np.diff(rw) != 1)) + 1
            for a, b in zip(np.concatenate([[0], cut]), np.concatenate([cut, [len(gs)]])):
                man["step"].append(s); man["shard"].append(names[int(sh[a])])
                man["row_start"].append(int(rw[a])); man["row_end"].append(int(rw[b - 1]) + 1)
                man["unit"].append("row"); man["rank"].append(w if spec.workers > 1 else None)
                man["micro_batch"].append(None)
    schema = pa.schema([("step", pa.int64(), False), ("shard", pa.string(), False), ("row_start", pa.int64(), False),
                        ("row_end", pa.int64(), False), ("unit", pa.string()), ("rank", pa.int32()),
                        ("micro_batch", pa.int32())])
    mt = pa.table(man, schema=schema).sort_by([("step", "ascending"), ("rank", "ascending"),
                                               ("shard", "ascending"), ("row_start", "ascending")])
    pq.write_table(mt, dest / "manifest.parquet")
    tok.save(str(dest / "tokenizer.json"))

    # truth: planted rows by (shard, row) with the hash of their tokens
    for rec in events:
        for r in rec["rows"]:
            g = np.asarray(r.pop("global_rows"))
            r["shard_rows"] = [[names[int(shard_idx[x])], int(shard_row[x]), row_hash(run_rows[int(x)])]
                               for x in g]
    shard_n = np.bincount(shard_idx, minlength=n_shards)
    shard_planted = np.zeros(n_shards, dtype=np.int64)
    shard_kinds: dict[str, dict[str, int]] = {}
    shard_sources = np.bincount(shard_idx[sorted(copy_source - set(planted_at))], minlength=n_shards) \
        if copy_source - set(planted_at) else np.zeros(n_shards, dtype=np.int64)
    for gi, (_, kind) in planted_at.items():
        si = int(shard_idx[gi])
        shard_planted[si] += 1
        d = shard_kinds.setdefault(names[si], {})
        d[kind] = d.get(kind, 0) + 1

    loss, gnorm, ranges = loss_values(spec, placed, rng)
    for rec, (lo, hi) in zip(events, ranges):
        rec["loss_range"] = [int(lo), int(hi)]
    log_info = write_log(spec, loss, gnorm, placed, ranges, rng, dest)
    truth = {
        "spec": {k: v for k, v in asdict(spec).items() if k != "events"},
        "name": spec.name, "eos_id": EOS_ID, "vocab_size": pool.vocab_size,
        "tokens": int(sum(len(r) for r in run_rows)), "rows": need, "n_shards": n_shards,
        "events": events,
        # copy_sources: rows of the shard (not planted themselves) that a dup_copied event copied elsewhere
        "shards": {names[i]: {"rows": int(shard_n[i]), "planted": int(shard_planted[i]),
                              "kinds": shard_kinds.get(names[i], {}), "copy_sources": int(shard_sources[i])}
                   for i in range(n_shards)},
        **log_info,
    }
    (dest / "truth.json").write_text(json.dumps(truth, indent=1))
    log.info("%s: %d steps x %d rows (%s, seq %d, %d readers, %d shards of %d), %d events, log %s", spec.name,
             spec.steps, B, spec.layout, spec.seq_len, spec.workers, n_shards, spec.rows_per_shard, len(events),
             log_info["log"])
    return truth
