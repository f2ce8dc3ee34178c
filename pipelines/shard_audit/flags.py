"""The anomalous rows of the most anomalous shards (``row_flags`` of a shard audit): once the shards are ranked, the
top shards' rows are read again (on workers, chunk by chunk), scored with the same row signals, and the rows at
each of the shard's anomalous families' cuts (the rows the row-level evidence counted) are kept, the strongest
few per shard, with the start of their text. The report shows them instead of a shard's first rows.

Families set per shard rather than per row (``seen_elsewhere``, ``dup_in_batch``, ``near_dup_jaccard``,
``replay_rows``, ``near_dup_in_shard``: the duplicate joins and the shard's MinHash accumulator) have no per-row bins in a chunk: their rows are the duplicate
clusters' members (``duplicates``)."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

#: Shards whose anomalous rows are looked up (the report's table of the most anomalous shards).
TOP_SHARDS = 15
#: Rows kept per shard (the strongest), anomalous families used per shard, characters of each excerpt.
ROWS_PER_SHARD = 5
FAMILIES_PER_SHARD = 3
EXCERPT_CHARS = 300
SHARD_LEVEL = frozenset({"seen_elsewhere", "dup_in_batch", "near_dup_jaccard", "replay_rows", "near_dup_in_shard"})


def cut_bin(family, cut: float) -> int:
    """The bin whose floor is the reported ``cut`` (the inverse of ``cut_value``, exact: the neighbours are tried)."""
    from spike_audit.auditors.evidence import NBINS, cut_value, orient, to_bins

    b0 = int(to_bins(orient(np.array([cut]), 0, family))[0])
    for b in (b0, b0 - 1, b0 + 1, b0 - 2, b0 + 2):
        if 0 <= b < NBINS and cut_value(family, b) == cut:
            return b
    return b0


def flag_targets(records: list, paths: dict[str, str], top: int = TOP_SHARDS) -> dict:
    """The ranked ``shard_scores`` records -> {shard: (path, n_rows, [(family index, cut bin, evidence, rate)])}
    for the top shards with an anomalous family that has per-row bins."""
    from spike_audit.auditors.rows import FAMILIES

    index = {f.name: i for i, f in enumerate(FAMILIES)}
    recs = sorted((r for _, r in records), key=lambda r: (r["rank"], r["shard"]))[:top]
    out = {}
    for r in recs:
        fams = [(index[f["name"]], cut_bin(FAMILIES[index[f["name"]]], f["cut"]), f["evidence"], f["natural_rate"])
                for f in r["families"] if f["name"] in index and f["name"] not in SHARD_LEVEL and f["evidence"] > 0]
        if fams and r["shard"] in paths and r["n_rows"]:
            out[r["shard"]] = (paths[r["shard"]], int(r["n_rows"]), fams[:FAMILIES_PER_SHARD])
    return out


def flag_chunks(targets: dict, batch_rows: int, scored: frozenset = frozenset()):
    """The row chunks of the target shards (name, path, start, end), but those in ``scored`` (flagged from the
    candidates of their scoring pass, :func:`flag_scored`)."""
    for name in sorted(set(targets) - scored):
        path, n, _ = targets[name]
        for a in range(0, n, batch_rows):
            yield name, path, a, min(a + batch_rows, n)


class ReadFlagChunk:
    """(name, path, start, end) -> (name, RecordBatch) or nothing when the chunk cannot be read as rows (an
    EOS-delimited flat file is cut by documents, not rows): excerpts are best effort, the scores are not."""

    def __init__(self, tokens_col: str, text_col: str, dtype: str | None, rows=None):
        self.tokens_col, self.text_col, self.dtype, self.rows = tokens_col, text_col, dtype, rows

    def __call__(self, item):
        import pyarrow as pa

        from spike_audit.pipelines.errors import UserError
        from spike_audit.pipelines.shards.read import read_slices

        name, path, a, b = item
        try:
            rb = read_slices(None, path, np.array([[a, b]], dtype=np.int64), unit="row", tokens_col=self.tokens_col,
                             text_col=self.text_col, dtype=self.dtype, rows=self.rows)
        except (UserError, OSError, ValueError, RuntimeError) as err:  # the audit already read it: excerpts only
            log.debug("no anomalous-row excerpts from %s rows %d..%d: %s", name, a, b, err)
            return
        yield name, rb.set_column(rb.schema.get_field_index("shard"), "shard", pa.array([name] * rb.num_rows,
                                                                                         pa.string()))


def flag_rows(name_rb, targets: dict, cfg_dict: dict):
    """(shard, RecordBatch) -> (shard, [candidate rows]): the chunk's rows at any of the shard's anomalous cuts,
    the strongest :data:`ROWS_PER_SHARD` (evidence of the strongest family flagging the row, then the row's
    standing above that cut, then row index). Used for shards not scored in this run (kept by ``--state``);
    the scored ones give the same rows from their candidates (:func:`flag_scored`) without a second pass."""
    from spike_audit.auditors.evidence import bin_matrix
    from spike_audit.auditors.rows import FAMILIES, SIGNAL_ORDER
    from spike_audit.pipelines.beam.scoring import score_batch, to_token_batch

    name, rb = name_rb
    _, _, fams = targets[name]
    tb = to_token_batch(rb, cfg_dict["tokens_col"], cfg_dict["text_col"])
    rows, _ = score_batch(tb, dict(cfg_dict, row_near_dup=False), None)
    bins = bin_matrix(rows.matrix(), SIGNAL_ORDER, FAMILIES)
    out = _flag_records(name, bins, np.asarray(rb.column("row"), dtype=np.int64), fams,
                        lambda i: _excerpt(rb, i))
    if out:
        yield name, out


def _excerpt(rb, i: int):
    """The start of row ``i``'s text (its first token ids when it has no text)."""
    t = rb.column("text")[i].as_py()
    if t is None:
        toks = rb.column("tokens")[i].as_py() or []
        t = " ".join(map(str, toks[:60])) if toks else None
    return t[:EXCERPT_CHARS] if t is not None else None


def _flag_records(name, bins: np.ndarray, row_ids: np.ndarray, fams, excerpt) -> list:
    """Rows (``bins``: their bin on every family, in row order) at any of ``fams``' cuts, the strongest
    :data:`ROWS_PER_SHARD`, as row-flag records with their sort key (``_key``); ``excerpt(i)`` gives row i's."""
    from spike_audit.auditors.rows import FAMILIES

    hit = np.zeros((len(bins), len(fams)), dtype=bool)
    for j, (f, b, _, _) in enumerate(fams):
        hit[:, j] = bins[:, f] >= b
    idx = np.flatnonzero(hit.any(axis=1))
    if not len(idx):
        return []
    first = hit[idx].argmax(axis=1)  # families are strongest first: the row's strongest flagging family
    over = np.array([int(bins[i, fams[j][0]]) - fams[j][1] for i, j in zip(idx.tolist(), first.tolist())])
    order = np.lexsort((idx, -over, first))[:ROWS_PER_SHARD]
    out = []
    for k in order.tolist():
        i = int(idx[k])
        flagged = [fams[j] for j in np.flatnonzero(hit[i]).tolist()]
        out.append({"shard": name, "row": int(row_ids[i]), "row_end": int(row_ids[i]) + 1, "unit": "row",
                    "step": None, "spike_id": None, "signals": [FAMILIES[f].name for f, _, _, _ in flagged],
                    "score": float(min(max(e for _, _, e, _ in flagged), 300.0)),
                    "natural_rate": float(max(r for _, _, _, r in flagged)),
                    "excerpt": excerpt(i),
                    "_key": (int(first[k]), -int(over[k]), int(row_ids[i]))})
    return out


# Row-flag candidates: the rows a shard's flags can come from, kept from the one scoring pass so the top shards
# are not read and scored again. The flags of a shard are, family by family in the order of its anomalous
# families, the rows at that family's cut not taken by an earlier family, ordered by (bin descending, row), the
# first ROWS_PER_SHARD in all. Rows taken before family j number fewer than ROWS_PER_SHARD, so the first
# ROWS_PER_SHARD rows of family j's (bin descending, row) order hold every row j can add: those rows of every
# family (with the row's bins on every family and its excerpt) give exactly the flags :func:`flag_rows` gives,
# whatever the cuts, and stay that when two sets of candidates are merged (the same selection of their union).


def flag_candidates(rb, bins: np.ndarray) -> dict | None:
    """A scored chunk (``bins``: rows x families) -> its candidates (:func:`select_candidates`), with excerpts."""
    if not len(bins):
        return None
    c = select_candidates(np.asarray(rb.column("row"), dtype=np.int64), np.asarray(bins))
    pos = c.pop("pos")
    c["excerpt"] = [_excerpt(rb, int(i)) for i in pos.tolist()]
    return c


def select_candidates(row_ids: np.ndarray, bins: np.ndarray) -> dict:
    """Of rows ``row_ids`` (unique) with ``bins`` (rows x families): per family the first :data:`ROWS_PER_SHARD`
    by (bin descending, row id); their union in row order (``pos``: positions in the input)."""
    o = np.argsort(row_ids, kind="stable")
    n = len(o)
    if n > ROWS_PER_SHARD:  # per family the ROWS_PER_SHARD smallest of (bin descending, row): unique keys
        b = bins[o].astype(np.int64)
        key = (b.max(initial=0) - b) * n + np.arange(n, dtype=np.int64)[:, None]
        top = np.argpartition(key, ROWS_PER_SHARD - 1, axis=0)[:ROWS_PER_SHARD]
        pos = o[np.unique(top)]
    else:
        pos = o
    return {"row": row_ids[pos], "bins": bins[pos], "pos": pos}


def merge_candidates(cands: list) -> dict | None:
    """Candidates of disjoint row sets (a shard's work elements) -> the candidates of their union."""
    cands = [c for c in cands if c is not None]
    if len(cands) <= 1:
        return cands[0] if cands else None
    rows = np.concatenate([c["row"] for c in cands])
    bins = np.concatenate([c["bins"] for c in cands])
    excerpts = [e for c in cands for e in c["excerpt"]]
    c = select_candidates(rows, bins)
    c["excerpt"] = [excerpts[i] for i in c.pop("pos").tolist()]
    return c


class FlagCandidates:
    """A shard's row-flag candidates as a mergeable accumulator (create/add/merge/result, for
    :class:`~spike_audit.pipelines.beam.combine.AuditorCombineFn`): its work elements' candidates merged."""

    name = "flag_candidates"

    def create(self):
        return None

    def add(self, acc, x):
        return merge_candidates([acc, x])

    def merge(self, accs):
        return merge_candidates(list(accs))

    def result(self, acc):
        return acc


def flag_scored(kv, targets: dict):
    """(shard, merged candidates) -> (shard, [candidate rows]) for a target shard scored in this run: the rows
    :func:`flag_rows` gives from reading and scoring it again."""
    name, c = kv
    if c is None or name not in targets:
        return
    out = _flag_records(name, c["bins"], c["row"], targets[name][2], lambda i: c["excerpt"][i])
    if out:
        yield name, out


def strongest_rows(kv):
    """(shard, [candidate lists of its chunks]) -> ("row_flags", row) for its strongest rows."""
    _, parts = kv
    rows = sorted((r for part in parts for r in part), key=lambda r: r["_key"])[:ROWS_PER_SHARD]
    for r in rows:
        yield "row_flags", {k: v for k, v in r.items() if k != "_key"}
