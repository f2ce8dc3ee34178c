"""Compare what a framework's own data loader fed (a ``feed.npz`` from one of the ``*_feed.py``
scripts) with what a spike-audit step manifest says each step consumed, read through spike-audit's
own shard readers (the code ``spike-audit batch`` and ``run`` use). Runs in spike-audit's venv.

A feed has one row per sequence: ``step`` (the manifest's step number for it), optional ``rank`` and
``micro``, and ``tokens`` (``(n, L)`` int64, or ``tokens_flat`` + ``tokens_offsets`` for ragged
rows). Per step, the multiset of sequences must be equal; where both sides know ranks and
micro-batches, each (rank, micro-batch) group must be equal too. Order inside a micro-batch is
not compared (the manifest is a set of slices; the auditors treat a step as a set).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def _feed_sequences(feed) -> list[np.ndarray]:
    if "tokens" in feed:
        t = np.asarray(feed["tokens"], np.int64)
        return [t[i] for i in range(t.shape[0])]
    flat, off = np.asarray(feed["tokens_flat"], np.int64), np.asarray(feed["tokens_offsets"], np.int64)
    return [flat[off[i]:off[i + 1]] for i in range(len(off) - 1)]


def _imports():
    try:
        from spike_audit.pipelines.manifest import load_manifest_table
        from spike_audit.pipelines.shards.read import read_slices
    except ImportError:  # before the namespace refactor
        from pipelines.manifest import load_manifest_table
        from pipelines.shards import read_slices
    return load_manifest_table, read_slices


def read_manifest_sequences(manifest: str, shard_root: str | None, *, dtype=None, steps=None,
                            tokens_col="tokens", text_col="text"):
    load_manifest_table, read_slices = _imports()
    table = load_manifest_table(manifest)
    step = table.column("step").to_numpy()
    keep = np.ones(len(step), bool) if steps is None else np.isin(step, np.asarray(list(steps)))
    table = table.filter(keep)
    step = table.column("step").to_numpy()
    rank = np.asarray(table.column("rank").fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    micro = np.asarray(table.column("micro_batch").fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    shard = np.asarray(table.column("shard").to_pylist(), dtype=object)
    unit = np.asarray(table.column("unit").to_pylist(), dtype=object)
    start = table.column("row_start").to_numpy()
    end = table.column("row_end").to_numpy()
    out = []
    for s_name, u in sorted({(a, b) for a, b in zip(shard, unit)}):
        sel = np.flatnonzero((shard == s_name) & (unit == u))
        batch = read_slices(shard_root, s_name, np.stack([start[sel], end[sel]], axis=1), unit=u, dtype=dtype,
                            tokens_col=tokens_col, text_col=text_col)
        per = (end[sel] - start[sel]) if u == "row" else np.ones(len(sel), np.int64)
        owner = np.repeat(sel, per)
        toks = batch.column("tokens")
        values = toks.values.to_numpy()
        offs = toks.offsets.to_numpy()
        for j in range(len(owner)):
            i = owner[j]
            out.append((int(step[i]), int(rank[i]), int(micro[i]), values[offs[j]:offs[j + 1]]))
    return out


def compare(feed_path: str, manifest: str, shard_root: str | None, *, dtype=None, step_key="step",
            step_base: int = 0, tokens_col="tokens", text_col="text") -> dict:
    """``{'steps_checked', 'steps_equal', 'groups_checked', 'groups_equal', 'first_mismatch'}``.

    ``step_key``: the feed's field that numbers steps (``step`` for the trainer's own step number,
    ``batch`` for a 0-based global batch index); ``step_base``: the trainer's numbering of batch 0 (the
    manifest's steps are 0-based batch indices: feed step s is manifest step ``s - step_base``)."""
    feed = dict(np.load(feed_path))
    fstep = np.asarray(feed[step_key], np.int64) - step_base
    frank = np.asarray(feed.get("rank", np.full(len(fstep), -1)), np.int64)
    fmicro = np.asarray(feed.get("micro", np.full(len(fstep), -1)), np.int64)
    fseqs = _feed_sequences(feed)
    wanted = set(np.unique(fstep).tolist())
    mseqs = read_manifest_sequences(manifest, shard_root, dtype=dtype, steps=wanted, tokens_col=tokens_col,
                                    text_col=text_col)
    by_step_f, by_step_m = defaultdict(list), defaultdict(list)
    grp_f, grp_m = defaultdict(list), defaultdict(list)
    for s, r, m, t in zip(fstep.tolist(), frank.tolist(), fmicro.tolist(), fseqs):
        b = np.asarray(t, np.int64).tobytes()
        by_step_f[s].append(b)
        grp_f[(s, r, m)].append(b)
    m_has_rank = any(r >= 0 for _, r, _, _ in mseqs)
    m_has_micro = any(m >= 0 for _, _, m, _ in mseqs)
    for s, r, m, t in mseqs:
        b = np.asarray(t, np.int64).tobytes()
        by_step_m[s].append(b)
        grp_m[(s, r, m)].append(b)
    steps_equal = 0
    first = None
    for s in sorted(wanted):
        if sorted(by_step_f[s]) == sorted(by_step_m.get(s, [])):
            steps_equal += 1
        elif first is None:
            first = {"step": s, "feed_sequences": len(by_step_f[s]), "manifest_sequences": len(by_step_m.get(s, []))}
    groups_checked = groups_equal = 0
    if m_has_rank or m_has_micro:
        def level(k):
            s, r, m = k
            return (s, r if m_has_rank else -1, m if m_has_micro else -1)
        gf, gm = defaultdict(list), defaultdict(list)
        for k, v in grp_f.items():
            gf[level(k)] += v
        for k, v in grp_m.items():
            gm[level(k)] += v
        for k, fb in gf.items():
            groups_checked += 1
            groups_equal += sorted(fb) == sorted(gm.get(k, []))
    extra = sorted(set(by_step_m) - wanted)
    return {"steps_checked": len(wanted), "steps_equal": steps_equal, "groups_checked": groups_checked,
            "groups_equal": int(groups_equal), "manifest_steps_not_fed": len(extra), "first_mismatch": first}
