"""Gopher repetition over whole groups of documents: duplicate lines and paragraphs, the most frequent word
n-grams (``top{n}``) and the repeated-n-gram scan (``dup{n}``), exactly as :mod:`.text` defines them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.auditors.hashing import maybe_repeated as _candidates
from spike_audit.auditors.text_arrays import _BIG, _C, _D, _R, _byte_view, _first_mask, _flat, _mix, _views


TOP_NS = (2, 3, 4)


DUP_NS = (5, 6, 7, 8, 9, 10)


_KEY_LIMIT = 2**62  # int64 keys (document, word, word) are used below this product, dense codes above


def _dup_lines_paras(arr: pa.LargeStringArray) -> dict[str, np.ndarray]:
    """Per document: duplicate line and paragraph counts and characters (Gopher, datatrove).

    Lines are ``re.split(r"\\n+", T)``, paragraphs ``re.split(r"\\n{2,}", T.strip())``: both are the
    byte ranges between runs of newlines (of any length, resp. of 2+ inside the stripped text), read
    in place as ``binary_view`` arrays; equal ids (Arrow's hash table: exact) with the previous
    equal element in the same document mark the duplicates."""
    n = len(arr)
    data, off = _byte_view(arr)
    size = len(data)
    nl = np.flatnonzero(data == 10)
    nl_doc = np.searchsorted(off, nl, side="right") - 1
    brk = np.flatnonzero((nl[1:] != nl[:-1] + 1) | (nl_doc[1:] != nl_doc[:-1]))
    r_first = np.r_[0, brk + 1] if len(nl) else brk  # runs of newlines: [run_start, run_end), per document
    r_last = np.r_[brk, len(nl) - 1] if len(nl) else brk
    run_start, run_end, run_doc = nl[r_first], nl[r_last] + 1, nl_doc[r_first]
    docs = np.arange(n)
    # lines: from the document start or a run end, to the next run start or the document end
    l_start = np.insert(run_end, np.searchsorted(run_doc, docs, side="left"), off[:-1])
    l_end = np.insert(run_start, np.searchsorted(run_doc, docs, side="right"), off[1:])
    l_doc = np.insert(run_doc, np.searchsorted(run_doc, docs, side="right"), docs)
    # paragraphs: the same inside T.strip() (Python's whitespace: Arrow's trim kernels), runs of 2+
    t_start = off[1:] - pc.binary_length(pc.utf8_ltrim_whitespace(arr)).to_numpy()
    t_end = np.maximum(off[:-1] + pc.binary_length(pc.utf8_rtrim_whitespace(arr)).to_numpy(), t_start)
    sep = np.flatnonzero((run_end - run_start >= 2) & (run_start >= t_start[run_doc]) & (run_end <= t_end[run_doc]))
    p_start = np.insert(run_end[sep], np.searchsorted(run_doc[sep], docs, side="left"), t_start)
    p_end = np.insert(run_start[sep], np.searchsorted(run_doc[sep], docs, side="right"), t_end)
    p_doc = np.insert(run_doc[sep], np.searchsorted(run_doc[sep], docs, side="right"), docs)
    # lines and paragraphs together: "documents" 0..n-1 are lines, n..2n-1 paragraphs
    start, end, doc = np.r_[l_start, p_start], np.r_[l_end, p_end], np.r_[l_doc, p_doc + n]
    padded = np.zeros(size + 12, dtype=np.uint8)
    padded[:size] = data
    sid = pc.dictionary_encode(_views(pa.py_buffer(padded), padded, start, end - start)).indices.to_numpy()
    order = np.argsort(sid, kind="stable")  # equal pieces together, in document order
    a, b = order[:-1], order[1:]
    dup = b[(sid[a] == sid[b]) & (doc[a] == doc[b])]  # the previous equal piece is in the same document
    cont = np.flatnonzero((data & 0xC0) == 0x80)  # UTF-8 continuation bytes: characters = bytes - these
    chars = end[dup] - start[dup] - (np.searchsorted(cont, end[dup]) - np.searchsorted(cont, start[dup]))
    n_el = np.bincount(doc, minlength=2 * n)
    n_dup = np.bincount(doc[dup], minlength=2 * n)
    c_dup = np.bincount(doc[dup], weights=chars, minlength=2 * n)  # integers < 2^53: exact
    return {"gopher_dup_line_frac": n_dup[:n] / n_el[:n], "gopher_dup_para_frac": n_dup[n:] / n_el[n:],
            "line_chars": c_dup[:n], "para_chars": c_dup[n:]}


def _chain(pos: np.ndarray, doc: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Mask of the greedy chain through sorted positions, per document: the first position of each
    document, then repeatedly the first position at least ``n`` (per position) further in the same
    document."""
    m = len(pos)
    if not m:
        return np.zeros(0, dtype=bool)
    succ = np.searchsorted(pos, pos + n)
    sx = np.minimum(succ, m - 1)
    jump = np.append(np.where((succ < m) & (doc[sx] == doc), succ, m), m)  # m: the end (maps to itself)
    posx = np.append(pos, _BIG)
    tables = [jump]  # tables[l][i]: 2^l chain steps from i
    while (tables[-1][:m] != m).any():
        tables.append(tables[-1][tables[-1]])
    # binary lifting from the head of each document to the last chain position <= each position
    heads = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
    c = np.repeat(heads, np.diff(np.r_[heads, m]))
    for t in reversed(tables):
        nxt = t[c]
        c = np.where(posx[nxt] <= pos, nxt, c)
    return c == np.arange(m)


def _scan_window(q: np.ndarray, gid: np.ndarray, n_ids: int, scan: np.ndarray, n: np.ndarray,
                 allowed: np.ndarray, before: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scan's events (sorted indices) and visited mask over a window of positions.

    ``q``: positions sorted by (scan, position); ``gid``: n-gram ids in ``[0, n_ids)``; ``scan``:
    one scan per (n, document); ``n`` per position; ``allowed``: not skipped by an event of an
    earlier window; ``before``: the n-gram was seen at a visited position of an earlier window.

    Fixed point of (visited positions -> first visited position of every n-gram -> duplicates ->
    chain of jumps -> visited), iterated from "every allowed position visited". A position depends
    only on earlier ones, so every round is right on a longer prefix of each scan. A scan whose
    first visited positions did not change is final (same duplicates, so same jumps); only the
    scans still changing take part in the next round."""
    done = []
    active = np.arange(len(q))  # positions of the scans still changing
    visited = allowed.copy()
    first_seen = np.full(n_ids, _BIG)  # per n-gram: first visited position in the window
    np.minimum.at(first_seen, gid[visited], q[visited])
    group_scan = np.zeros(n_ids, dtype=np.int64)
    group_scan[gid] = scan
    for _ in range(len(q) + 2):  # each round fixes at least one more position of every changing scan
        if not len(active):
            break
        qa, sa, ga = q[active], scan[active], gid[active]
        # duplicates: a visited position before with the same n-gram; then the chain of jumps
        dup = np.flatnonzero(allowed[active] & (before[active] | (qa > first_seen[ga])))
        events = active[dup[_chain(qa[dup], sa[dup], n[active][dup])]]
        # visited: allowed, and not strictly inside the n words after an event of the same scan
        e_pos, e_scan, e_end = q[events], scan[events], q[events] + n[events]
        j = np.searchsorted(e_pos, qa) - 1
        jc = np.maximum(j, 0)
        vis = allowed[active].copy()
        if len(events):
            vis &= ~((j >= 0) & (e_scan[jc] == sa) & (qa < e_end[jc]))
        visited[active] = vis
        new_first = np.full(n_ids, _BIG)
        np.minimum.at(new_first, ga[vis], qa[vis])
        changed = np.unique(group_scan[ga[new_first[ga] != first_seen[ga]]])
        final = ~np.isin(scan[events], changed)
        done.append(events[final])
        active = active[np.isin(sa, changed)]
        first_seen = new_first
    else:
        raise AssertionError("duplicate n-gram scan did not converge")  # unreachable: causal fixed point
    events = np.sort(np.concatenate(done)) if done else np.zeros(0, dtype=np.int64)
    return events, visited


#: Positions per scan handled together by the duplicate n-gram scan (see ``_scan_events``).
SCAN_WINDOW = 4096


def _scan_events(q: np.ndarray, gid: np.ndarray, qdoc: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Indices into ``q`` where datatrove's duplicate n-gram scan finds a duplicate (and jumps n words).

    ``q``: sorted word positions whose n-gram occurs at least twice in its document (the scan can
    only find duplicates there, and other n-grams never matter), ``gid``: dense n-gram ids,
    ``qdoc``: documents (one scan per document), ``n``: the n of each position's document.

    Every scan is cut into windows of ``SCAN_WINDOW`` positions; window w of all scans is solved
    at once (``_scan_window``) given the state after window w - 1: which n-grams were seen at a
    visited position, and up to where the last jump skips. The rounds of the fixed point grow with
    the number of jumps that interact, so windows keep them few on long repetitive documents."""
    m = len(q)
    if not m:
        return np.zeros(0, dtype=np.int64)
    n_ids = int(gid.max()) + 1
    first = np.flatnonzero(np.r_[True, qdoc[1:] != qdoc[:-1]])
    sizes = np.diff(np.r_[first, m])
    scan = np.repeat(np.arange(len(first)), sizes)
    if sizes.max() <= SCAN_WINDOW:  # one window (the usual case)
        return _scan_window(q, gid, n_ids, scan, n, np.ones(m, dtype=bool), np.zeros(m, dtype=bool))[0]
    seen = np.full(n_ids, _BIG)  # per n-gram: first visited position so far
    skip_end = np.zeros(len(first), dtype=np.int64)  # per scan: positions before this are skipped or done
    out = []
    for lo in range(0, int(sizes.max()), SCAN_WINDOW):
        big = sizes > lo
        lens = np.minimum(sizes[big] - lo, SCAN_WINDOW)
        w = np.repeat(first[big] + lo - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        qw, gw, sw = q[w], gid[w], scan[w]
        ids, local = np.unique(gw, return_inverse=True)
        ev, vis = _scan_window(qw, local.reshape(-1), len(ids), sw, n[w], qw >= skip_end[sw], seen[gw] < qw)
        out.append(w[ev])
        np.minimum.at(seen, gw[vis], qw[vis])
        np.maximum.at(skip_end, sw[ev], qw[ev] + n[w][ev])
    return np.sort(np.concatenate(out))


def _word_poly(words: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per string: the polynomial hash sum_t (byte_t + 1) R^t over its UTF-8 bytes (mod 2^64), and
    R^(byte length), so that the hash of a concatenation composes: h(ab) = h(a) + R^|a| h(b)."""
    data, off = _byte_view(words)
    blen = np.diff(off)
    rpow = np.full(int(blen.max(initial=0)) + 1, _R, dtype=np.uint64)
    rpow[0] = 1
    np.multiply.accumulate(rpow, out=rpow)
    t = np.arange(len(data), dtype=np.int64) - np.repeat(off[:-1], blen)  # byte index inside its word
    term = (data.astype(np.uint64) + np.uint64(1)) * rpow[t]
    cs = np.zeros(len(data) + 1, dtype=np.uint64)
    np.cumsum(term, out=cs[1:])
    return cs[off[1:]] - cs[off[:-1]], rpow[blen]


def _word_signals(arr: pa.LargeStringArray, out: dict[str, np.ndarray]) -> None:
    """Top n-gram and duplicate n-gram character counts (not yet divided by |T|) into ``out``.

    Word tuples (top n-grams, joined by spaces: equal strings = equal tuples) get exact ids level by
    level from int64 keys (id of the (n-1)-gram, id of the last word). Concatenated n-grams (dup
    n-grams: equal strings may split differently into words) that may repeat in their document
    are found with 64-bit hashes (a filter: equal strings have equal hashes); their identity is then
    decided exactly by Arrow's hash table on their bytes (``binary_view`` arrays pointing into the
    word bytes, no copy)."""
    n_docs = len(arr)
    flat, parent = _flat(pc.utf8_split_whitespace(arr))
    enc = pc.dictionary_encode(flat)
    wid = enc.indices.to_numpy().astype(np.int64)
    dwords = enc.dictionary
    dbytes = pc.binary_length(dwords).to_numpy()
    keep = dbytes[wid] > 0  # Arrow yields empty strings at leading/trailing whitespace; str.split() does not
    wid, wdoc = wid[keep], parent[keep]
    w = len(wid)
    wlen = pc.utf8_length(dwords).to_numpy().astype(np.int64)[wid]
    n_words = np.bincount(wdoc, minlength=n_docs)
    first_word = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(n_words, out=first_word[1:])
    cs = np.zeros(w + 1, dtype=np.int64)  # characters of words i..i+n-1: cs[i + n] - cs[i]
    np.cumsum(wlen, out=cs[1:])
    # word bytes, contiguous in Arrow's string layout: the n-gram at i is bytes [start[i], start[i + n])
    fdata, foff = _byte_view(flat)
    start = np.append(foff[:-1][keep], foff[-1])
    wdata = np.zeros(len(fdata) + 12, dtype=np.uint8)
    wdata[: len(fdata)] = fdata
    wbuf = pa.py_buffer(wdata)
    # exact identity of word tuples: int64 keys (the (n-1)-gram's id, the last word's id)
    n_words_d = len(dwords)
    base = wdoc * n_words_d + wid  # (document, word)
    if n_docs * n_words_d * n_words_d >= _KEY_LIMIT:  # keep base * n_words_d + word within int64
        base = pc.dictionary_encode(pa.array(base)).indices.to_numpy().astype(np.int64)
    doc_mix = _mix(wdoc.astype(np.uint64) * _R)  # per word: its document, mixed
    t1 = _mix(wid.astype(np.uint64) + _D)  # per word: a random-looking 64-bit value
    h_d, p_d = _word_poly(dwords)
    h1, p1 = h_d[wid], p_d[wid]  # per word: byte polynomial hash, R^bytes
    poly, pw = h1, p1  # n-gram at each position: concatenation hash, R^bytes
    ids = rep = None  # (n-1)-word tuple at each position: exact id (-1: not repeated), repeated?
    dup_cand = []  # per n of DUP_NS: positions whose n-gram string may repeat in its document
    for n in range(2, max(DUP_NS) + 1):
        m = max(w - n + 1, 0)
        inside = wdoc[:m] == wdoc[n - 1:]  # n-grams within one document
        if n in TOP_NS:
            if rep is None:  # 2-grams: a tuple hash filters the candidates
                cand = _candidates((t1[:m] * _C + t1[1:]) ^ doc_mix[:m])
                cand = cand[inside[cand]]
                key = base[cand] * n_words_d + wid[cand + 1]
            else:  # a word tuple repeats only where both of its (n-1)-word tuples repeat
                cand = np.flatnonzero(rep[:m] & rep[1:m + 1] & inside)
                key = ids[cand] * n_words_d + wid[cand + n - 1]
            sid = pc.dictionary_encode(pa.array(key, type=pa.int64())).indices.to_numpy().astype(np.int64)
            cnt = np.bincount(sid)
            ids = np.full(m, -1, dtype=np.int64)
            ids[cand] = sid
            rep = np.zeros(m, dtype=bool)
            rep[cand[cnt[sid] >= 2]] = True
            # most frequent n-gram per document, ties to the first seen; none repeated: the first one
            val = np.where(n_words >= n, cs[np.minimum(first_word[:-1] + n, w)] - cs[first_word[:-1]] + n - 1, 0)
            first = _first_mask(sid)  # ids are numbered in order of first appearance
            fpos, c = cand[first], cnt[sid[first]]
            fpos, c = fpos[c >= 2], c[c >= 2]
            if len(fpos):
                d = wdoc[fpos]
                o = np.lexsort((fpos, -c, d))
                b = o[np.r_[True, d[o][1:] != d[o][:-1]]]
                val[d[b]] = (cs[fpos[b] + n] - cs[fpos[b]] + n - 1) * c[b]
            out[f"gopher_top{n}_char_frac"] = val
        poly = poly[:m] + h1[n - 1:] * pw[:m]
        pw = pw[:m] * p1[n - 1:]
        if n in DUP_NS:
            cand = _candidates(poly ^ doc_mix[:m])
            dup_cand.append(cand[inside[cand]])
    # duplicate n-grams, all n at once: exact ids of the candidates' bytes, grouped by (n, document)
    ns = np.repeat(np.array(DUP_NS, dtype=np.int64), [len(c) for c in dup_cand])
    cand = np.concatenate(dup_cand)
    s = start[cand]
    sid = pc.dictionary_encode(_views(wbuf, wdata, s, start[cand + ns] - s)).indices.to_numpy().astype(np.int64)
    sdoc = (ns - DUP_NS[0]) * n_docs + wdoc[cand]  # one scan per (n, document)
    gid = pc.dictionary_encode(pa.array(sdoc * (int(sid.max(initial=0)) + 1) + sid)).indices.to_numpy()
    gid = gid.astype(np.int64)
    rep = np.flatnonzero(np.bincount(gid)[gid] >= 2)
    q = cand[rep] + (ns[rep] - DUP_NS[0]) * (w + 1)  # positions of different n kept apart and sorted
    e = rep[_scan_events(q, gid[rep], sdoc[rep], ns[rep])]
    e_n, e_pos = ns[e], cand[e]
    chars = np.bincount(sdoc[e], weights=cs[e_pos + e_n] - cs[e_pos], minlength=len(DUP_NS) * n_docs)
    for i, n in enumerate(DUP_NS):
        out[f"gopher_dup{n}_char_frac"] = chars[i * n_docs: (i + 1) * n_docs]
