"""Cross-shard duplicate clusters: exact groups by row hash and near-duplicate pairs verified with MinHash
sketches per bucket (the candidates and their sketches come from the key files of :mod:`.spill`), then connected
components, as ``duplicates`` records."""

from __future__ import annotations

import logging
import numpy as np

from spike_audit.pipelines.beam.scoring import concat_parts, split_by_bucket
from spike_audit.pipelines.shard_audit.config import NODE_SHIFT


log = logging.getLogger(__name__)


def exact_groups(kv):
    """One hash bucket -> (hash, sorted member nodes) for every hash held by >= 2 rows of >= 2 shards."""
    cols = concat_parts(kv[1])
    if cols is None:
        return
    h, nodes = cols
    order = np.lexsort((nodes, h))
    h, nodes = h[order], nodes[order]
    start = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    size = np.diff(np.r_[start, len(h)])
    for s, n in zip(start[size >= 2].tolist(), size[size >= 2].tolist()):  # loop over duplicate groups only
        members = nodes[s : s + n]
        if len(np.unique(members >> NODE_SHIFT)) >= 2:
            yield f"{int(h[s]):016x}", members


def exact_records(kv, names, max_group: int):
    """One hash bucket -> the ``duplicates`` records of its exact groups (:func:`exact_groups`)."""
    for g in exact_groups(kv):
        yield from duplicate_records("exact", g, names, max_group)


def near_pairs(kv, threshold: float):
    """One band bucket -> verified near-duplicate node pairs (lo, hi) as two int64 arrays."""
    from spike_audit.auditors.minhash import near_duplicates

    cols = concat_parts(kv[1])
    if cols is None or len(cols[0]) < 2:
        return
    keys, nodes, sk = cols
    order = np.lexsort((nodes, keys))
    keys, nodes, sk = keys[order], nodes[order], sk[order]
    lo, hi, _ = near_duplicates(keys[:, None], sk, threshold)
    a, b = nodes[lo], nodes[hi]
    ok = a != b
    if ok.any():
        yield "pairs", (np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok]))


def cluster_pairs(nodes_pairs, max_iter: int):
    """All verified pairs -> (node ids, cluster label per node), by bounded connected components."""
    from spike_audit.auditors.components import components

    cols = concat_parts(nodes_pairs[1])
    if cols is None:
        return
    lo, hi = cols
    uniq, inv = np.unique(np.r_[lo, hi], return_inverse=True)
    lab, converged = components(len(uniq), inv[: len(lo)], inv[len(lo):], max_iter)
    if not converged:
        log.warning("near-duplicate components did not converge in %d rounds: some clusters may be split", max_iter)
    yield uniq, lab


def duplicate_records(kind: str, label_of_members, names: list[str], max_group: int = 1000):
    """(cluster key, member nodes) -> DUPLICATES records for clusters spanning >= 2 shards.

    A hot cluster (more than ``max_group`` members) lists its ``max_group`` smallest members;
    ``n_members`` and ``n_shards`` always count all of them."""
    key, members = label_of_members
    members = np.unique(members)
    all_shards = members >> NODE_SHIFT
    n_shards = len(np.unique(all_shards))
    if n_shards < 2:
        return
    cid = f"{kind}-{int(members[0]):016x}"
    n_members = len(members)
    members = members[:max_group]
    shard_idx = members >> NODE_SHIFT
    rows = members & ((np.int64(1) << NODE_SHIFT) - 1)
    for si, r in zip(shard_idx.tolist(), rows.tolist()):  # members of cross-shard clusters only
        yield "duplicates", {"cluster_id": cid, "kind": kind, "shard": names[si], "row": r,
                             "n_members": n_members, "n_shards": n_shards}


def near_member_counts(item):
    """(node ids, cluster label per node) of the near-duplicate components -> ``(shard index, rows)`` for each
    shard: its rows with a verified near duplicate anywhere in the audited corpus (every node of a component is
    in at least one verified pair; pairs within one shard and across shards alike)."""
    uniq, _ = item
    if not len(uniq):
        return
    shard, count = np.unique(np.asarray(uniq, dtype=np.int64) >> NODE_SHIFT, return_counts=True)
    for s, c in zip(shard.tolist(), count.tolist()):
        yield int(s), int(c)


def near_clusters(item, names, max_group: int = 1000):
    uniq, lab = item
    order = np.argsort(lab, kind="stable")
    lab_s, nodes_s = lab[order], uniq[order]
    cuts = np.flatnonzero(np.diff(lab_s)) + 1
    for members in np.split(nodes_s, cuts):
        yield from duplicate_records("near", (None, members), names, max_group)
