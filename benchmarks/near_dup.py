"""Near duplicates within a batch: how similar planted near-copies are, and how often clean real text is as similar.

    python benchmarks/near_dup.py [--cache DIR] [--batches 300] [--pairs 300]

On the spike lab's token pool (real text of this machine, ``spikelab/lab_corpus.py``), in the lab's two layouts:

* planted: one document copied twice with 6% of its tokens substituted in each copy (the lab's ``near_dup``
  kind: copies of a document that is not itself in the batch), the estimated Jaccard similarity (128-value
  MinHash of 5-gram shingles, the row signal ``near_dup_jaccard``) of copy and copy, and of copy and original;
* clean: batches of 16 random natural rows; per row the largest similarity with another row of its batch
  (what ``near_dup_jaccard`` measures), and the share of clean rows at or above each similarity: the rate at
  which a cut there would name a clean row (its natural rate in the verdict).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "spikelab"))

import lab_corpus  # noqa: E402
import lab_run  # noqa: E402

from spike_audit.auditors.base import TokenBatch  # noqa: E402
from spike_audit.auditors.minhash import signatures  # noqa: E402
from spike_audit.auditors.rows import NEAR_DUP_FLOOR, max_jaccard_all  # noqa: E402

CUTS = (0.1, 0.2, 0.3, 0.4, 0.5)


def measure(rows, rng, n_batches: int, n_pairs: int) -> dict:
    uni = np.bincount(np.concatenate(rows[:4000]), minlength=8192).astype(float)
    uni[:2] = 0
    uni /= uni.sum()
    idx = rng.choice(len(rows), 16 * n_batches, replace=False)
    best = []
    for b in range(n_batches):
        tb = TokenBatch.from_lists([rows[i] for i in idx[16 * b:16 * (b + 1)]])
        best.append(max_jaccard_all(signatures(tb)))
    best = np.concatenate(best)
    cc, co = [], []
    for _ in range(n_pairs):
        d = rows[int(rng.integers(len(rows)))].copy()
        copies = []
        for _ in range(2):
            x = d.copy()
            m = max(1, round(0.06 * len(x)))
            x[rng.choice(len(x), m, replace=False)] = rng.choice(len(uni), m, p=uni)
            copies.append(x)
        s = signatures(TokenBatch.from_lists(copies + [d]))
        cc.append((s[0] == s[1]).mean())
        co.append((s[0] == s[2]).mean())
    cc, co = np.array(cc), np.array(co)
    return {"clean_rows": len(best), "clean_share_at_or_above": {c: float((best >= c).mean()) for c in CUTS},
            "clean_quantiles": np.quantile(best, [0.5, 0.9, 0.99, 0.999]).round(3).tolist(),
            "copy_copy_quantiles": np.quantile(cc, [0.01, 0.05, 0.5]).round(3).tolist(),
            "copy_copy_recall_at_floor": float((cc >= NEAR_DUP_FLOOR).mean()),
            "copy_orig_quantiles": np.quantile(co, [0.01, 0.05, 0.5]).round(3).tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="/tmp/spikelab-cache", help="the spike lab's token pool cache")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="the lab's small pool")
    args = ap.parse_args(argv)
    pool = lab_corpus.build_pool(Path(args.cache), lab_corpus.QUICK_POOL if args.quick else lab_corpus.PoolConfig())
    rng = np.random.default_rng(0)
    print(f"floor of near_dup_jaccard: {NEAR_DUP_FLOOR}")
    print("| layout | seq | clean rows | clean share >= " + " / ".join(map(str, CUTS)) + " | clean max-J quantiles "
          "50/90/99/99.9% | copy-copy J 1/5/50% | copies kept at the floor | copy-original J 1/5/50% |")
    print("|---|---|---|---|---|---|---|---|")
    for layout, seq in (("docs", 256), ("packed", 128), ("packed", 512)):
        r = measure(lab_run.natural_rows(pool, layout, seq, rng), rng, args.batches, args.pairs)
        share = " / ".join(f"{100 * r['clean_share_at_or_above'][c]:.2f}%" for c in CUTS)
        print(f"| {layout} | {seq} | {r['clean_rows']} | {share} | {r['clean_quantiles']} | {r['copy_copy_quantiles']} | "
              f"{100 * r['copy_copy_recall_at_floor']:.1f}% | {r['copy_orig_quantiles']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
