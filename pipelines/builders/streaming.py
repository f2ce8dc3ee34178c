"""mosaicml-streaming ``StreamingDataset`` + torch ``DataLoader``: the sample order reproduced in numpy from the
dataset's own settings (never importing ``streaming``) -> STEP_MANIFEST.

What streaming 0.13 does each epoch (``StreamingDataset.__iter__`` -> ``_get_work`` -> ``generate_work`` with the
default ``batching_method='random'``), re-derived here from its source:

1. **resampling** (``resample_streams``): per stream, how many samples to draw (``choose``: all of them unless
   per-stream weights or ``epoch_size`` ask for another total, split over streams by their proportions, else
   their sizes, with a seeded ``rng.choice`` for the remainder, ``Stream.apply_weights``); per shard
   ``choose // samples`` full repeats
   and a partial repeat of a seeded choice of samples drawn in picks of ``sampling_granularity``
   (``sampling.get_sampling``; seed ``shuffle_seed + epoch`` under ``sampling_method='balanced'`` with
   shuffling, else ``shuffle_seed``). This gives "big" sample ids, their "shuffle units" (shard parts) and
   the underlying sample id of each.
2. **partition** (``partition.orig``): the epoch's big ids laid out as (canonical nodes, samples per
   canonical node) with short rows padded by repeating their last id, interleaved over the physical nodes,
   the first ``sample_in_epoch`` samples dropped (resumption), then each node's samples dealt to its ranks
   one by one (padding by repeating the last samples), each rank's run padded with ``-1`` to a multiple of
   ``workers * batch_size`` and cut into chunks of ``batch_size`` dealt to the DataLoader workers in turn.
   ``partition_algo='relaxed'`` is the same unless resuming on another number of nodes
   (``initial_physical_nodes``), where the initial layout is re-cut for the new one.
3. **shuffle** (``shuffle_algo``; ``py1e`` default, ``py1s``, ``py1br``, ``py2s``, ``naive``) maps every big id
   to a shuffled one: shard parts split at canonical-node boundaries (after a run-wide shuffle of the shard
   order seeded by ``shuffle_seed``), re-ordered and shuffled within each node by ``shuffle_seed + epoch``
   (``py1e``: samples displaced by uniform noise within ``shuffle_block_size``; ``py1br``: shuffled in
   staggered blocks of about ``shuffle_block_size``; ``py2s``: shards shuffled twice, with a fixed and an
   epoch generator; ``naive``: one global permutation).
4. **loading**: a rank's DataLoader with ``W`` workers takes one ``batch_size`` batch from each worker in
   turn (worker ``w`` iterates its own chunks, ``-1`` skipped); a worker out of samples is skipped. So the
   rank's ``k``-th batch is its ``k``-th non-empty chunk in worker round-robin order; ``drop_last`` drops
   each worker's short last batch.

Defaults as in streaming: ``num_canonical_nodes`` = 64 x nodes for ``py1s``/``py2s``, else the number of
nodes; ``shuffle_block_size`` = ``max(4_000_000 // num_canonical_nodes, 2**18)``.

Steps: global batch ``g`` is every rank's ``g``-th DataLoader batch (ranks get equal numbers); epochs follow
each other (``--epochs``, each a new ``__iter__``). Checked against the real StreamingDataset and DataLoader in
``benchmarks/fidelity/streaming_feed.py``.

Resumption: ``sample_in_epoch`` (the first epoch starts there) with the checkpoint's ``num_canonical_nodes``;
``initial_physical_nodes`` (resumed on another number of nodes, ``relaxed``) without DataLoader workers.

Per-stream weights as ``Stream(proportion=...)``, ``Stream(repeat=...)``, ``Stream(choose=...)``
(``Stream.validate_weights`` / ``apply_weights``): relative proportions split the epoch (``epoch_size``, default
every sample) by share; absolute weights draw ``repeat x samples`` or ``choose`` samples from their stream, every
sample from an unweighted one.

Refused by name (one-line error): ``batching_method`` other than ``random``, ``replication``,
``initial_physical_nodes`` with DataLoader workers.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import manifest_from_arrays, with_meta

SHUFFLE_ALGOS = ("py1e", "py1s", "py1br", "py2s", "naive")
PARTITION_ALGOS = ("orig", "relaxed")


# ----------------------------------------------------------------------------- resampling


def stream_weights(n_streams: int, *, proportion=None, repeat=None, choose=None, epoch_size: int | None = None):
    """Check per-stream weights as ``Stream`` and ``Stream.validate_weights`` do and return them normalised:
    ``("relative", proportions)`` or ``("absolute", [(kind, value) per stream])`` (kind ``repeat``, ``choose``
    or ``None``), or ``None`` when no stream is weighted. One-line :class:`UserError` for what streaming refuses."""
    if proportion is None and repeat is None and choose is None:
        return None
    for name, vals in (("--proportion", proportion), ("--repeat", repeat), ("--choose", choose)):
        if vals is not None and len(vals) != n_streams:
            raise UserError(f"{name}: {len(vals)} values for {n_streams} streams (expected one per --data stream, "
                            f"'-' for a stream without one)")
        for i, v in enumerate(vals or ()):
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise UserError(f"{name}: {v} for stream {i}: expected a non-negative number (streaming refuses it)")
    if proportion is not None:
        if repeat is not None or choose is not None or any(v is None for v in proportion):
            raise UserError("--proportion (relative weights) must be given for every stream and cannot be mixed with "
                            "--repeat or --choose (absolute weights): streaming refuses the mix")
        if not sum(proportion) > 0:
            raise UserError("--proportion: the proportions sum to 0")
        return ("relative", [float(v) for v in proportion])
    out = []
    for i in range(n_streams):
        r = repeat[i] if repeat is not None else None
        c = choose[i] if choose is not None else None
        if r is not None and c is not None:
            raise UserError(f"stream {i} has both --repeat and --choose: streaming takes at most one weight per stream")
        if c is not None and c != int(c):
            raise UserError(f"--choose: {c} for stream {i}: expected a whole number of samples")
        out.append(("repeat", float(r)) if r is not None else ("choose", int(c)) if c is not None else (None, None))
    if epoch_size:
        raise UserError("--epoch-size with --repeat/--choose weights: streaming takes an epoch size only with "
                        "--proportion (relative) weights or unweighted streams")
    return ("absolute", out)


def _stream_choose(samples_per_stream: np.ndarray, epoch_size: int | None, seed: int, weights=None) -> np.ndarray:
    """Samples drawn from each stream per epoch (``Stream.apply_weights``): relative weights (``proportion``) or
    unweighted streams with an epoch size split ``epoch_size`` (default: all samples) by share, the floor's
    shortfall given one each to streams picked by a seeded ``rng.choice``; absolute weights take ``repeat x
    samples`` (truncated), ``choose``, or every sample."""
    if weights is not None and weights[0] == "absolute":
        return np.array([int(v * int(n)) if k == "repeat" else int(v) if k == "choose" else int(n)
                         for (k, v), n in zip(weights[1], samples_per_stream.tolist())], np.int64)
    if weights is None and not epoch_size:
        return samples_per_stream.copy()
    total = epoch_size or int(samples_per_stream.sum())
    share = (np.asarray(weights[1], np.float64) if weights is not None
             else samples_per_stream.astype(np.float64))
    share = share / share.sum()
    choose = (total * share).astype(np.int64)
    short = int(total - choose.sum())
    rng = np.random.default_rng(seed)
    choose[rng.choice(len(samples_per_stream), short, False)] += 1
    return choose


def _shard_choose(sizes: np.ndarray, choose: int, granularity: int, seed: int) -> np.ndarray:
    """Samples drawn from each shard of one stream (``choose`` in all): whole repeats, then seeded picks of
    ``granularity`` samples for the fractional rest."""
    total = int(sizes.sum())
    whole, rest = divmod(int(choose), total)
    out = sizes * whole
    if not rest:
        return out
    picks = -(-sizes // granularity)
    pick_shard = np.repeat(np.arange(len(sizes)), picks)
    pick_size = np.full(int(picks.sum()), granularity, np.int64)
    last = np.cumsum(picks) - 1
    pick_size[last] = sizes - (picks - 1) * granularity
    order = np.random.default_rng(seed).permutation(len(pick_shard))
    # take picks in that order until `rest` samples are chosen (the last pick may be cut)
    taken = np.minimum(pick_size[order], np.maximum(rest - (np.cumsum(pick_size[order]) - pick_size[order]), 0))
    np.add.at(out, pick_shard[order], taken)
    return out


def resample(stream_sizes: list[np.ndarray], *, epoch: int, seed: int, epoch_size: int | None, shuffle: bool,
             sampling_method: str = "balanced", granularity: int = 1, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """(shuffle units, underlying sample id of each big id) for one epoch (``weights``: :func:`stream_weights`)."""
    samples_per_stream = np.array([int(s.sum()) for s in stream_sizes], np.int64)
    choose = _stream_choose(samples_per_stream, epoch_size, seed, weights)
    balanced = sampling_method == "balanced"
    rng = np.random.default_rng(seed + epoch if balanced else seed)
    sampling_seed = seed + epoch if (shuffle and balanced) else seed
    units, ids = [], []
    offset = 0
    for sizes, c in zip(stream_sizes, choose):
        sizes = np.asarray(sizes, np.int64)
        per_shard = _shard_choose(sizes, int(c), granularity, sampling_seed)
        starts = offset + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        for n, k, s0 in zip(sizes.tolist(), per_shard.tolist(), starts.tolist()):  # per shard, not per sample
            reps, part = divmod(k, n)
            units += [n] * reps + ([part] if part else [])
            ids += [np.arange(s0, s0 + n, dtype=np.int64)] * reps
            if part:
                ids.append(np.sort(s0 + rng.choice(n, part, False)))
        offset += int(sizes.sum())
    return np.asarray(units, np.int64), (np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64))


# ----------------------------------------------------------------------------- partition


def partition(num_samples: int, canonical: int, nodes: int, ranks_per_node: int, workers: int, batch_size: int,
              drop_first: int = 0) -> np.ndarray:
    """(nodes, ranks per node, workers, batches per worker, batch size) of big sample ids, -1 = padding."""
    if canonical < nodes and nodes % canonical or nodes < canonical and canonical % nodes:
        raise UserError(f"num_canonical_nodes {canonical} and {nodes} physical nodes: one must divide the other "
                        f"(streaming refuses this too)")
    drop_first -= drop_first % nodes
    per_cn = -(-num_samples // canonical)
    ratio = nodes // canonical if canonical < nodes else 0
    pad = (ratio - per_cn % ratio) % ratio if ratio else 0
    width = per_cn + pad
    if num_samples > canonical or (num_samples == canonical and canonical >= nodes):
        starts = np.arange(canonical, dtype=np.int64) * num_samples // canonical
        stops = np.arange(1, canonical + 1, dtype=np.int64) * num_samples // canonical
        ids = starts[:, None] + np.arange(width, dtype=np.int64)[None, :]
        ids[:, per_cn - 1] -= (stops - starts < per_cn).astype(np.int64)  # short rows repeat their last id
        if pad:
            ids[:, width - pad:] = ids[:, width - 2 * pad - ratio + 1:width - pad - ratio + 1]
    else:
        need = canonical * width
        ids = np.resize(np.arange(num_samples, dtype=np.int64), need).reshape(canonical, width)
    ids = ids.T.reshape(-1)[drop_first:].reshape(-1, nodes).T  # (nodes, samples per node)
    over = ids.shape[1] % ranks_per_node
    if over:
        under = ranks_per_node - over
        if ranks_per_node + under - 1 <= ids.shape[1]:
            tail = ids[:, ids.shape[1] - ranks_per_node - under + 1:ids.shape[1] - ranks_per_node + 1]
        else:
            n = ids.shape[1]
            tail = np.concatenate([np.tile(ids, under // n), ids[:, :under % n]], 1)
        ids = np.concatenate([ids, tail], 1)
    ids = ids.reshape(nodes, -1, ranks_per_node)
    per_rank = ids.shape[1]
    rounded = -(-per_rank // (workers * batch_size)) * workers * batch_size
    if rounded > per_rank:
        ids = np.concatenate([ids, np.full((nodes, rounded - per_rank, ranks_per_node), -1, np.int64)], 1)
    ids = ids.transpose(0, 2, 1).reshape(nodes, ranks_per_node, -1, workers, batch_size)
    return ids.transpose(0, 1, 3, 2, 4)


def partition_relaxed(num_samples, canonical, nodes, ranks_per_node, workers, batch_size, drop_first=0,
                      initial_nodes: int | None = None) -> np.ndarray:
    if initial_nodes is None or (nodes <= canonical and canonical % nodes == 0) or (
            nodes > canonical and nodes % canonical == 0):
        return partition(num_samples, canonical, nodes, ranks_per_node, workers, batch_size, drop_first)
    global_batch = nodes * ranks_per_node * batch_size
    if global_batch % (initial_nodes * ranks_per_node):
        raise UserError(f"global batch {global_batch} is not divisible by the initial {initial_nodes * ranks_per_node} "
                        f"devices (streaming refuses this too)")
    first = partition(num_samples, canonical, initial_nodes, ranks_per_node, workers,
                      global_batch // (initial_nodes * ranks_per_node), drop_first)
    flat = first.transpose(3, 2, 0, 1, 4).reshape(-1)
    return flat.reshape(-1, workers, nodes, ranks_per_node, batch_size).transpose(2, 3, 1, 0, 4)


# ----------------------------------------------------------------------------- shuffles


def _split_at_nodes(spans: np.ndarray, total: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Shard spans ``(k, 2)`` (in order) cut where the canonical nodes' equal shares end: (spans, per node
    ``[first span, end span)``)."""
    out, node_bounds = [], []
    i, filled = 0, 0
    spans = [list(s) for s in spans.tolist()]
    begin = 0
    for part in range(parts):
        end = total * (part + 1) // parts
        while i < len(spans):
            a, b = spans[i]
            if filled + (b - a) > end:
                if filled < end:
                    cut = end - filled
                    out.append((a, a + cut))
                    spans[i] = [a + cut, b]
                    filled += cut
                break
            out.append((a, b))
            i += 1
            filled += b - a
        node_bounds.append((begin, len(out)))
        begin = len(out)
    return np.asarray(out, np.int64).reshape(-1, 2), np.asarray(node_bounds, np.int64).reshape(-1, 2)


def _node_spans(units: np.ndarray, canonical: int, seed: int, epoch: int):
    ends = np.cumsum(units)
    spans = np.stack([ends - units, ends], axis=1)
    np.random.default_rng(seed).shuffle(spans)  # the run-wide shard order
    spans, nodes = _split_at_nodes(spans, int(units.sum()), canonical)
    rng = np.random.default_rng(seed + epoch)
    for a, b in nodes.tolist():
        part = spans[a:b].copy()
        rng.shuffle(part)
        spans[a:b] = part
    return spans, nodes, rng


def shuffle_py1s(units, canonical, seed, epoch, block_size):
    spans, _, rng = _node_spans(units, canonical, seed, epoch)
    out = np.empty(int(units.sum()), np.int64)
    pos = 0
    for a, b in spans.tolist():
        seg = np.arange(a, b, dtype=np.int64)
        rng.shuffle(seg)
        out[pos:pos + b - a] = seg
        pos += b - a
    return out


def shuffle_py1e(units, canonical, seed, epoch, block_size):
    spans, nodes, rng = _node_spans(units, canonical, seed, epoch)
    out = np.empty(int(units.sum()), np.int64)
    pos = 0
    for a, b in nodes.tolist():
        sizes = spans[a:b, 1] - spans[a:b, 0]
        n = int(sizes.sum())
        if n == 0:
            raise UserError(f"a canonical node got no samples: fewer samples than num_canonical_nodes ({canonical}); "
                            f"streaming fails here too")
        samples = np.empty(n, np.float64)
        k = 0
        for s0, s1 in spans[a:b].tolist():
            seg = np.arange(s0, s1)
            rng.shuffle(seg)
            samples[k:k + s1 - s0] = seg
            k += s1 - s0
        where = np.arange(n).astype(np.float64)
        k = 0
        for size in sizes.tolist():
            block = rng.integers(int(0.75 * block_size), int(1.25 * block_size))
            reach = max((block - size) / 2, 0)
            lo, hi = max(-reach, -k), min(reach, n - k - size)
            where[k:k + size] += rng.uniform(low=lo, high=hi, size=size)
            k += size
        out[pos:pos + n] = samples[np.argsort(where)]
        pos += n
    return out


def shuffle_py1br(units, canonical, seed, epoch, block_size):
    spans, nodes, rng = _node_spans(units, canonical, seed, epoch)
    out = np.empty(int(units.sum()), np.int64)
    stagger = rng.integers(0, int(0.75 * block_size), (canonical,))
    pos = 0
    for node, (a, b) in enumerate(nodes.tolist()):
        start = pos
        for s0, s1 in spans[a:b].tolist():
            out[pos:pos + s1 - s0] = np.arange(s0, s1)
            pos += s1 - s0
        blocks, edge = [], start
        while edge < pos:
            size = rng.integers(int(0.75 * block_size), int(1.25 * block_size))
            lo = max(edge - stagger[node], start)
            hi = min(edge + size - stagger[node], pos)
            blocks.append((lo, hi))
            edge += hi - lo
        for lo, hi in blocks:
            rng.shuffle(out[lo:hi])
    return out


def shuffle_py2s(units, canonical, seed, epoch, block_size):
    ends = np.cumsum(units)
    shards = [np.arange(e - u, e, dtype=np.int64) for u, e in zip(units.tolist(), ends.tolist())]
    fixed = np.random.default_rng(seed)
    order = np.arange(len(shards))
    fixed.shuffle(order)
    shards = [shards[i] for i in order]
    for s in shards:
        fixed.shuffle(s)
    total = int(units.sum())
    parts, i, filled = [], 0, 0
    for part in range(canonical):
        end = total * (part + 1) // canonical
        group = []
        while i < len(shards):
            s = shards[i]
            if filled + len(s) > end:
                if filled < end:
                    cut = end - filled
                    group.append(s[:cut])
                    shards[i] = s[cut:]
                    filled += cut
                break
            group.append(s)
            i += 1
            filled += len(s)
        parts.append(group)
    rng = np.random.default_rng(seed + epoch)
    out = []
    for group in parts:
        idx = np.arange(len(group))
        rng.shuffle(idx)
        group = [group[j] for j in idx]
        for s in group:
            rng.shuffle(s)
        out += group
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def shuffle_naive(units, canonical, seed, epoch, block_size):
    return np.random.default_rng(seed + epoch).permutation(int(units.sum()))


SHUFFLES = {"py1e": shuffle_py1e, "py1s": shuffle_py1s, "py1br": shuffle_py1br, "py2s": shuffle_py2s,
            "naive": shuffle_naive}


# ----------------------------------------------------------------------------- the order


def streaming_order(stream_sizes: list[np.ndarray], *, batch_size: int, shuffle: bool = False,
                    shuffle_algo: str = "py1e", shuffle_seed: int = 9176, shuffle_block_size: int | None = None,
                    num_canonical_nodes: int | None = None, world_size: int = 1, ranks_per_node: int | None = None,
                    num_workers: int = 0, epochs: int = 1, drop_last: bool = False, partition_algo: str = "relaxed",
                    epoch_size: int | None = None, sampling_method: str = "balanced", sampling_granularity: int = 1,
                    sample_in_epoch: int = 0, initial_physical_nodes: int | None = None,
                    batching_method: str = "random", replication: int | None = None, proportion=None, repeat=None,
                    choose=None) -> dict:
    """Per fed sample: ``batch`` (0-based global batch), ``rank``, ``epoch``, ``sample`` (global sample id over
    the streams in order), ``pos`` (position in the global batch: rank x batch_size + position on the rank).
    ``proportion`` / ``repeat`` / ``choose``: per-stream weights, one value per stream (``None`` for a stream
    without one), as ``Stream(proportion=...)`` etc."""
    check_settings(batch_size=batch_size, shuffle_algo=shuffle_algo, world_size=world_size,
                   ranks_per_node=ranks_per_node, num_workers=num_workers, epochs=epochs, partition_algo=partition_algo,
                   sampling_method=sampling_method, sampling_granularity=sampling_granularity,
                   initial_physical_nodes=initial_physical_nodes, batching_method=batching_method,
                   replication=replication)
    rpn = ranks_per_node or world_size
    nodes = world_size // rpn
    workers = max(num_workers, 1)
    canonical = num_canonical_nodes or (64 * nodes if shuffle_algo in ("py1s", "py2s") else nodes)
    block = shuffle_block_size or max(4_000_000 // canonical, 1 << 18)
    weights = stream_weights(len(stream_sizes), proportion=proportion, repeat=repeat, choose=choose,
                             epoch_size=epoch_size)
    if any(np.asarray(s).size == 0 or int(np.asarray(s).sum()) == 0 for s in stream_sizes):
        raise UserError("a stream has no samples")
    return _order(stream_sizes, batch_size, shuffle, shuffle_algo, shuffle_seed, block, canonical, world_size, rpn,
                  nodes, workers, epochs, drop_last, partition_algo, epoch_size, sampling_method, sampling_granularity,
                  sample_in_epoch, initial_physical_nodes, weights)


def check_settings(*, batch_size: int, shuffle_algo: str = "py1e", world_size: int = 1,
                   ranks_per_node: int | None = None, num_workers: int = 0, epochs: int = 1,
                   partition_algo: str = "relaxed", sampling_method: str = "balanced", sampling_granularity: int = 1,
                   initial_physical_nodes: int | None = None, batching_method: str = "random",
                   replication: int | None = None, **_) -> None:
    """One-line :class:`UserError` for a setting whose order is not reproduced (before any data is read)."""
    if batching_method != "random":
        raise UserError(f"batching_method={batching_method!r} is not supported (only 'random', the default)")
    if initial_physical_nodes is not None and num_workers > 0:
        raise UserError("initial_physical_nodes with DataLoader workers is not supported (streaming keeps it only in "
                        "the process that iterates, so later epochs depend on worker lifetimes)")
    if replication not in (None, 1):
        raise UserError(f"replication={replication} is not supported")
    if shuffle_algo not in SHUFFLE_ALGOS:
        raise UserError(f"shuffle_algo={shuffle_algo!r} is not known (expected one of {', '.join(SHUFFLE_ALGOS)})")
    if partition_algo not in PARTITION_ALGOS:
        raise UserError(f"partition_algo={partition_algo!r} is not known (expected orig or relaxed)")
    if sampling_method not in ("balanced", "fixed"):
        raise UserError(f"sampling_method={sampling_method!r} is not known (expected balanced or fixed)")
    if batch_size <= 0 or world_size <= 0 or num_workers < 0 or epochs <= 0 or sampling_granularity <= 0:
        raise UserError("batch size, world size, epochs and sampling granularity must be positive")
    rpn = ranks_per_node or world_size
    if rpn <= 0 or world_size % rpn:
        raise UserError(f"world size {world_size} is not a multiple of {rpn} ranks per node")


def _order(stream_sizes, batch_size, shuffle, shuffle_algo, shuffle_seed, block, canonical, world_size, rpn, nodes,
           workers, epochs, drop_last, partition_algo, epoch_size, sampling_method, sampling_granularity,
           sample_in_epoch, initial_physical_nodes, weights=None) -> dict:
    cols: dict[str, list[np.ndarray]] = {"batch": [], "rank": [], "epoch": [], "sample": [], "pos": []}
    batch0 = 0
    for e in range(epochs):
        units, small = resample(stream_sizes, epoch=e, seed=shuffle_seed, epoch_size=epoch_size, shuffle=shuffle,
                                sampling_method=sampling_method, granularity=sampling_granularity, weights=weights)
        if not len(small):
            raise UserError(f"the stream weights choose no samples for epoch {e}")
        first = sample_in_epoch if e == 0 else 0
        if first < 0:  # a Python index from the end: one slice of the epoch's last sample, no error
            raise UserError(f"sample_in_epoch {first}: expected a non-negative count of samples already seen")
        if len(small) + world_size - len(small) % world_size < first:
            raise UserError(f"sample_in_epoch {first} is past the epoch's {len(small)} samples")
        # a resumed run keeps the checkpoint's initial_physical_nodes on the dataset for the following epochs too
        big = partition_relaxed(len(small), canonical, nodes, rpn, workers, batch_size, first,
                                initial_physical_nodes if partition_algo == "relaxed" else None)
        if shuffle:
            perm = SHUFFLES[shuffle_algo](units, canonical, shuffle_seed, e, block)
            big = np.where(big != -1, perm[np.maximum(big, 0)], -1)
        ids = np.where(big != -1, small[np.maximum(big, 0)], -1)
        n_batches = 0
        for node in range(nodes):
            for r in range(rpn):
                b, s, pos = _rank_batches(ids[node, r], batch_size, drop_last)
                n_batches = max(n_batches, int(b.max()) + 1 if len(b) else 0)
                cols["pos"].append(pos + (node * rpn + r) * batch_size)
                cols["batch"].append(b + batch0)
                cols["rank"].append(np.full(len(b), node * rpn + r, np.int64))
                cols["epoch"].append(np.full(len(b), e, np.int64))
                cols["sample"].append(s)
        batch0 += n_batches
    return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}


def _rank_batches(per_worker: np.ndarray, batch_size: int, drop_last: bool):
    """(batch index on the rank, sample, position in the batch) of one rank: (workers, chunks, batch) ids -> the DataLoader's batches,
    one per worker in turn, a worker out of batches skipped (vectorised over samples)."""
    workers, chunks, bs = per_worker.shape
    valid = per_worker != -1
    counts = valid.reshape(workers, -1).sum(1)  # samples per worker; a worker's -1 are only at its end
    full, part = counts // bs, counts % bs
    n_b = full + ((part > 0) & (not drop_last))
    # the k-th batch of worker w, in the loader's order: round k, workers in order, empty ones skipped
    w_idx, k_idx = np.nonzero(np.arange(chunks)[None, :] < n_b[:, None])
    order = np.lexsort((w_idx, k_idx))
    w_idx, k_idx = w_idx[order], k_idx[order]
    flat = [per_worker[w][valid[w]] for w in range(workers)]  # per worker, not per sample
    batch_of, sample = [], []
    for j, (w, k) in enumerate(zip(w_idx.tolist(), k_idx.tolist())):  # one entry per batch
        seg = flat[w][k * bs:(k + 1) * bs]
        sample.append(seg)
        batch_of.append(np.full(len(seg), j, np.int64))
    if not sample:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos = np.concatenate([np.arange(len(x), dtype=np.int64) for x in sample])
    return np.concatenate(batch_of), np.concatenate(sample), pos


def stream_sizes(shard_root: str | None, streams: list[str]) -> list[np.ndarray]:
    """Samples per shard of each stream, from its ``index.json`` (the MDS reader's index parsing)."""
    from spike_audit.pipelines.shards.mds import read_mds_index
    from spike_audit.pipelines.shards.paths import resolve

    return [np.array([s.samples for s in read_mds_index(resolve(shard_root, d), d)], np.int64) for d in streams]


def build_streaming_manifest(streams: list[str], stream_sizes: list[np.ndarray], *, first_step: int = 0,
                             steps: tuple[int, int] | None = None, **order_kw) -> pa.Table:
    """STEP_MANIFEST: one ``unit='row'`` slice per fed sample (the row = the sample id within its stream's
    dataset, as the MDS reader numbers them), with the rank and epoch; step = ``first_step`` + the 0-based
    global batch index (counted on across epochs)."""
    o = streaming_order(stream_sizes, **order_kw)
    step = o["batch"] + first_step
    keep = np.ones(len(step), bool)
    if steps is not None:
        keep = (step >= steps[0]) & (step <= steps[1])
        if not keep.any():
            have = f"{step.min()}..{step.max()}" if len(step) else "none"
            raise UserError(f"steps {steps[0]}..{steps[1]} are outside the run's steps ({have})")
    offsets = np.concatenate([[0], np.cumsum([int(np.sum(s)) for s in stream_sizes])])
    sample = o["sample"][keep]
    which = np.searchsorted(offsets, sample, side="right") - 1
    row = sample - offsets[which]
    names = np.asarray(streams, dtype=object)[which]
    rank = o["rank"][keep] if order_kw.get("world_size", 1) > 1 else None
    table = manifest_from_arrays(step[keep], pa.array(names, pa.string()), row, row + 1, "row", rank,
                                 batch_pos=o["pos"][keep], epoch=o["epoch"][keep])
    per_step = order_kw.get("batch_size", 0) * order_kw.get("world_size", 1)
    return with_meta(table, trainer="streaming", first_step=int(first_step), samples_per_step=int(per_step))
