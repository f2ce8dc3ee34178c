"""The fixed duplicate reference of ``spike-audit run``: is an audited row's content also at another position of
the data the manifest consumed?

"Seen elsewhere" must not depend on which steps happen to be audited (two controls sharing a natural duplicate
would inflate each other), so it is measured against a fixed set: every distinct slice the manifest names at
a step outside every spike window, that is every row (or token range) the run consumed away from the spikes.
Leaving the windows out is what keeps a replay from hiding: rows copied into a spike's batch from a normal
step are seen elsewhere (at that step), while that normal step, should it be drawn as a control, does not
see its rows elsewhere merely because the spike copied them (the relation would otherwise be symmetric and
the control would be exactly as extreme as the window). The set depends only on the log's spikes, not on
which control steps are drawn. The pass reads only the token column of those shards, hashes each row with
the suite's 64-bit row hash, and keeps only the rows whose hash is one of the audited rows' hashes (a small
side input): ``(hash, position)`` pairs, ``position`` a 64-bit key of (shard, start, end). An audited row is
seen elsewhere when its hash occurs at a position other than its own. Cost: one read of the consumed token
columns (text columns are not read), hashed at tens of millions of tokens per second; nothing manifest-sized
reaches the driver (the manifest is read by row groups inside the pipeline, slices grouped per shard as
arrays).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.auditors.sampling import hash64

#: Rows read per call when hashing a shard (bounds memory per worker).
READ_ROWS = 1 << 15


def shard_key(name: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little"))


def position_keys(shards: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """64-bit key of each row's position (shard, start, end), vectorised over rows (one hash per distinct
    shard name)."""
    shards = np.asarray(shards, dtype=object)
    uniq, inv = np.unique(shards.astype(str), return_inverse=True)
    sk = np.array([shard_key(s) for s in uniq.tolist()], dtype=np.uint64)[inv] if len(uniq) else np.zeros(0, np.uint64)
    with np.errstate(over="ignore"):
        return hash64(sk ^ hash64(np.asarray(start, np.int64).astype(np.uint64) * np.uint64(0x100000001B3)
                                  ^ hash64(np.asarray(end, np.int64), 7), 3), 5)


def pair_keys(h: np.ndarray, pos: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return hash64(np.asarray(h, np.uint64) ^ hash64(np.asarray(pos, np.uint64), 11), 13)


def manifest_row_groups(path: str) -> list[int]:
    import pyarrow.parquet as pq

    return list(range(pq.ParquetFile(path).metadata.num_row_groups))


def row_group_slices(rg: int, path: str, exclude_steps: frozenset = frozenset()):
    """One manifest row group -> ``(shard, (starts, ends, is_token, steps))`` per shard in it (numpy arrays),
    without the slices consumed at ``exclude_steps`` (the spike windows)."""
    import pyarrow.parquet as pq

    from spike_audit.pipelines.errors import UserError, reason

    try:
        pf = pq.ParquetFile(path)
        # ``unit`` is optional (a manifest of rows only may leave it out: null means ``row``)
        cols = [c for c in ("step", "shard", "row_start", "row_end", "unit") if c in pf.schema_arrow.names]
        t = pf.read_row_group(rg, columns=cols)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(f"{path}: row group {rg}: not a readable Parquet manifest ({reason(err)})") from None
    if "unit" not in t.column_names:
        t = t.append_column("unit", pa.nulls(t.num_rows, pa.string()))
    if exclude_steps and t.num_rows:
        t = t.filter(pc.invert(pc.is_in(t.column("step"), value_set=pa.array(sorted(exclude_steps), pa.int64()))))
    if not t.num_rows:
        return
    unit = pc.fill_null(t.column("unit"), "row")
    enc = pc.dictionary_encode(t.column("shard")).combine_chunks()
    names = enc.dictionary.to_pylist()
    idx = enc.indices.to_numpy(zero_copy_only=False)
    starts = np.asarray(t.column("row_start"), dtype=np.int64)
    ends = np.asarray(t.column("row_end"), dtype=np.int64)
    is_tok = np.asarray(pc.equal(unit, "token").to_numpy(zero_copy_only=False), dtype=bool)
    steps = np.asarray(t.column("step"), dtype=np.int64)
    order = np.argsort(idx, kind="stable")
    cuts = np.flatnonzero(np.diff(idx[order])) + 1
    for part in np.split(order, cuts):
        if len(part):
            yield names[int(idx[part[0]])], (starts[part], ends[part], is_tok[part], steps[part])


def _read(root, shard, slices, unit, cfg):
    from spike_audit.pipelines.errors import UserError
    from spike_audit.pipelines.shards.read import read_slices

    try:  # the token column only; text-only shards are hashed on their text's bytes
        return read_slices(root, shard, slices, unit=unit, tokens_col=cfg["tokens_col"], text_col="\0",
                           dtype=cfg.get("dtype"), rows=cfg.get("flat_rows"))
    except UserError:
        return read_slices(root, shard, slices, unit=unit, tokens_col=cfg["tokens_col"], text_col=cfg["text_col"],
                           dtype=cfg.get("dtype"), rows=cfg.get("flat_rows"))


def _slice_steps(start, end, unit, sl, st):
    """The step that consumed each read row: for rows, the latest-starting slice of ``sl`` (sorted by start)
    that contains it; for token ranges, the slice equal to it (-1 when none)."""
    if unit == "row":
        i = np.searchsorted(sl[:, 0], start, side="right") - 1
        ok = (i >= 0) & (sl[np.maximum(i, 0), 1] > start)
        return np.where(ok, st[np.maximum(i, 0)], -1)
    look = {(int(a), int(b)): int(c) for (a, b), c in zip(sl.tolist(), st.tolist())}
    return np.asarray([look.get((int(a), int(b)), -1) for a, b in zip(start.tolist(), end.tolist())], dtype=np.int64)


def hash_shard(kv, audited, root, cfg):
    """(shard, parts of its slices) -> ``(hashes, positions, steps)`` of its rows whose hash is audited (the
    step: one step that consumed the row there)."""
    from spike_audit.auditors.dedup import row_hashes
    from spike_audit.pipelines.beam.scoring import to_token_batch
    from spike_audit.pipelines.shards.slices import coalesce

    shard, parts = kv
    parts = list(parts)
    if not parts or audited is None or not len(audited):
        return
    starts = np.concatenate([p[0] for p in parts])
    ends = np.concatenate([p[1] for p in parts])
    tok = np.concatenate([p[2] for p in parts])
    stp = np.concatenate([p[3] if len(p) > 3 else np.full(len(p[0]), -1, np.int64) for p in parts])
    hs, ps, ss = [], [], []
    for unit, sel in (("row", ~tok), ("token", tok)):
        if not sel.any():
            continue
        sl = np.stack([starts[sel], ends[sel]], axis=1)
        o = np.lexsort((sl[:, 1], sl[:, 0]))
        sl_sorted, st_sorted = sl[o], stp[sel][o]
        if unit == "row":  # every consumed row once
            # cut the coalesced ranges into pieces of at most READ_ROWS rows, grouped up to READ_ROWS per read
            pieces = [(x, min(b, x + READ_ROWS)) for a, b in coalesce(sl).tolist() for x in range(a, b, READ_ROWS)]
            sl = np.asarray(pieces, dtype=np.int64).reshape(-1, 2)
            groups, acc, cur = [], [], 0
            for r in sl:
                acc.append(r)
                cur += int(r[1] - r[0])
                if cur >= READ_ROWS:
                    groups.append(np.asarray(acc)); acc, cur = [], 0
            if acc:
                groups.append(np.asarray(acc))
        else:  # every distinct consumed token range once
            sl = np.unique(sl, axis=0)
            groups = [sl[i:i + READ_ROWS] for i in range(0, len(sl), READ_ROWS)]
        for g in groups:
            rb = _read(root, shard, g, unit, cfg)
            if not rb.num_rows:
                continue
            tb = to_token_batch(rb, cfg["tokens_col"], cfg["text_col"])
            h = row_hashes(tb, cfg["seed"])
            hit = _in_sorted(h, audited)  # audited: sorted distinct hashes (union_hashes)
            if not hit.any():
                continue
            start = np.asarray(rb.column("row"), dtype=np.int64)[hit]
            end = np.asarray(rb.column("row_end"), dtype=np.int64)[hit]
            hs.append(h[hit])
            ps.append(position_keys(np.full(len(start), shard, dtype=object), start, end))
            ss.append(_slice_steps(start, end, unit, sl_sorted, st_sorted))
    if hs:
        yield np.concatenate(hs), np.concatenate(ps), np.concatenate(ss)


class DupReference:
    """``(hash, position, step)`` triples of the reference rows whose hash is audited, as a mergeable
    accumulator; ``result``: the triples sorted by hash then step, and the sorted pair keys of the distinct
    ``(hash, position)`` pairs."""

    name = "dup_reference"

    def create(self):
        return (np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64))

    def add(self, acc, item):
        return self.merge([acc, item])

    def merge(self, accs):
        accs = [a if len(a) == 3 else (a[0], a[1], np.full(len(a[0]), -1, np.int64)) for a in accs]
        h = np.concatenate([a[0] for a in accs]) if accs else np.zeros(0, np.uint64)
        if not len(h):
            return self.create()
        p = np.concatenate([a[1] for a in accs])
        st = np.concatenate([a[2] for a in accs]).astype(np.int64)
        order = np.lexsort((st, p, h))
        h, p, st = h[order], p[order], st[order]
        keep = np.r_[True, (h[1:] != h[:-1]) | (p[1:] != p[:-1]) | (st[1:] != st[:-1])]
        return h[keep], p[keep], st[keep]

    def result(self, acc):
        h, p, st = acc
        order = np.lexsort((st, h))
        pk = pair_keys(h, p)
        u_pk, first = np.unique(pk, return_index=True)
        return {"hash": h[order], "pos": p[order], "step": st[order], "pair_keys": u_pk,
                "pair_hash": np.sort(h[first])}


def _in_sorted(x: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """``np.isin(x, sorted_keys)`` for sorted ``sorted_keys``: a binary search per element of ``x`` (isin sorts
    both arrays on every call: the reference's size per audited step)."""
    if not len(sorted_keys):
        return np.zeros(len(x), dtype=bool)
    i = np.minimum(np.searchsorted(sorted_keys, x), len(sorted_keys) - 1)
    return sorted_keys[i] == x


def seen_elsewhere(ref: dict | None, h: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """1.0 where a row's hash ``h`` occurs in the reference at a position other than ``pos``, else 0.0; NaN
    for every row without a reference."""
    h = np.asarray(h, dtype=np.uint64)
    if ref is None:
        return np.full(len(h), np.nan)
    if "pair_hash" in ref:  # distinct (hash, position) pairs, precomputed by the accumulator
        srt, pks = ref["pair_hash"], ref["pair_keys"]
    else:
        code = np.unique(np.stack([np.asarray(ref["hash"], np.uint64), np.asarray(ref["pos"], np.uint64)], axis=1),
                         axis=0) if len(ref["hash"]) else np.zeros((0, 2), np.uint64)
        srt, pks = np.sort(code[:, 0]), np.sort(pair_keys(code[:, 0], code[:, 1]))
    n_at = np.searchsorted(srt, h, side="right") - np.searchsorted(srt, h, side="left")
    own = _in_sorted(pair_keys(h, pos), pks)
    return ((n_at - own.astype(np.int64)) >= 1).astype(np.float64)


#: At most this many reference copies of one row are looked at for :func:`replay_rows` (the first by step): a
#: row with more copies is common boilerplate, and the expansion stays bounded whatever the corpus.
MAX_COPIES = 1024


def replay_rows(ref: dict | None, h: np.ndarray, pos: np.ndarray, with_partner: bool = False):
    """Per row: how many distinct rows of this batch have copies consumed together at one other step of the
    reference, counted once per block like a group of copies within a batch: for every other step where
    copies of the batch's rows were consumed, the block is its rows (the first of identical rows of the batch
    only) and its count ``c`` their distinct hashes; every row of a block but its first (in batch order) gets
    ``c``, its first 1. A row's value is the largest over its blocks; 1 for a row seen elsewhere in no block
    where it is later; 0 for a row not seen elsewhere; NaN without a reference. A natural duplicate shares its
    other step with no other row of the batch (1); two natural duplicates that happen to be consumed together
    at another step are one block (one row at 2, like a pair of copies: one odd row); a replay of ``k`` rows of
    one earlier batch gives ``k`` to ``k - 1`` of them. With ``with_partner``, also each row's block's first
    row (-1 for none), which the skip list names with it."""
    h = np.asarray(h, dtype=np.uint64)
    n = len(h)
    if ref is None or "step" not in ref:
        out = np.full(n, np.nan)
        return (out, np.full(n, -1, dtype=np.int64)) if with_partner else out
    out = np.zeros(n)
    partner = np.full(n, -1, dtype=np.int64)
    rh, rp, rs = ref["hash"], ref["pos"], ref["step"]
    if not n or not len(rh):
        return (out, partner) if with_partner else out
    lo = np.searchsorted(rh, h, side="left")
    hi = np.minimum(np.searchsorted(rh, h, side="right"), lo + MAX_COPIES)
    cnt = np.maximum(hi - lo, 0)
    if not cnt.sum():
        return (out, partner) if with_partner else out
    row = np.repeat(np.arange(n), cnt)
    idx = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(lo, cnt)
    other = (rp[idx] != np.asarray(pos, np.uint64)[row]) & (rs[idx] >= 0)
    row, st = row[other], rs[idx][other]
    if not len(row):
        return (out, partner) if with_partner else out
    out[np.unique(row)] = 1.0  # seen elsewhere
    # identical rows of the batch are one row of a block (the first of them stands for the group)
    _, first_idx, inv = np.unique(h, return_index=True, return_inverse=True)
    is_first = first_idx[np.asarray(inv).reshape(-1)] == np.arange(n)
    keep = is_first[row]
    row, st = row[keep], st[keep]
    pairs = np.unique(np.stack([st, row], axis=1), axis=0)  # sorted by step, then row
    steps, start, c = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    g = np.repeat(np.arange(len(steps)), c)
    head = pairs[start[g], 1]  # the block's first row
    later = pairs[:, 1] != head
    val = c[g].astype(np.float64)
    r_l, v_l, h_l = pairs[later, 1], val[later], head[later]
    np.maximum.at(out, r_l, v_l)
    if with_partner and len(r_l):
        order = np.lexsort((h_l, -v_l, r_l))  # per row: its largest block, then the earliest head
        first = order[np.r_[True, r_l[order][1:] != r_l[order][:-1]]]
        partner[r_l[first]] = h_l[first]
    return (out, partner) if with_partner else out
