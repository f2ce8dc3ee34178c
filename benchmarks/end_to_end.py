"""End-to-end throughput of the two Beam pipelines against the plain read time of the same files.

    python benchmarks/end_to_end.py [--rows-per-shard 480] [--workers 2]

Builds (once, under /tmp/spike_audit_bench_pipelines) the generated shard corpus (50 clean Parquet
shards of real text + 4 planted) and the demo run, then times, in this process:

* plain read: every shard's ``tokens`` and ``text`` columns with pyarrow (the floor);
* ``spike-audit shards`` on the DirectRunner in-process, and with ``--direct_num_workers N
  --direct_running_mode multi_processing`` (the 2 cores);
* ``spike-audit run`` on the demo run (tokens scored / wall time).

Prints tokens/s for each. Wall-clock times of whole pipeline runs (Beam start-up included).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pyarrow.parquet as pq

BASE = Path("/tmp/spike_audit_bench_pipelines")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-per-shard", type=int, default=480)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from spike_audit.pipelines.demo import DemoConfig, make_demo, make_shard_corpus
    from spike_audit.pipelines.run.audit import run_audit
    from spike_audit.pipelines.run.plan import RunConfig
    from spike_audit.pipelines.shard_audit.audit import run_shard_audit
    from spike_audit.pipelines.shard_audit.config import ShardAuditConfig

    corpus = BASE / f"corpus-{args.rows_per_shard}"
    if not corpus.exists():
        make_shard_corpus(corpus, n_clean=50, rows_per_shard=args.rows_per_shard)
    demo = BASE / "demo"
    if not demo.exists():
        make_demo(demo, DemoConfig())

    files = sorted(corpus.glob("*.parquet"))
    t0 = time.perf_counter()
    n_tokens = 0
    for f in files:
        t = pq.read_table(f, columns=["tokens", "text"])
        n_tokens += len(t.column("tokens").combine_chunks().values)
    read_s = time.perf_counter() - t0
    rows = [("plain read (pyarrow, tokens + text)", n_tokens, read_s)]

    for label, beam_args in [
        ("shards, DirectRunner in-process", []),
        (f"shards, DirectRunner {args.workers} processes",
         [f"--direct_num_workers={args.workers}", "--direct_running_mode=multi_processing"]),
    ]:
        out = BASE / "out"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        res = run_shard_audit(ShardAuditConfig(inputs=(str(corpus),), out=str(out)), beam_args=beam_args)
        rows.append((label, res.n_tokens_scanned, time.perf_counter() - t0))

    out = BASE / "run-out"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = run_audit(RunConfig(log=str(demo / "train.log"), manifest=str(demo / "manifest.parquet"),
                              shards=str(demo / "shards"), out=str(out), tokenizer=str(demo / "tokenizer.json")))
    rows.append(("run (demo: 8 spikes, 100 controls)", res.n_tokens, time.perf_counter() - t0))

    print(f"{len(files)} shards, {n_tokens:,} tokens; {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}")
    print(f"| {'what':<40} | {'tokens':>12} | {'seconds':>8} | {'tokens/s':>10} | {'x read time':>11} |")
    print(f"|{'-' * 42}|{'-' * 14}:|{'-' * 9}:|{'-' * 11}:|{'-' * 12}:|")
    for label, n, s in rows:
        ratio = (s / (read_s * n / n_tokens)) if n else float("nan")
        print(f"| {label:<40} | {n:>12,} | {s:>8.2f} | {n / s / 1e6:>9.2f}M | {ratio:>10.1f}x |")


if __name__ == "__main__":
    main()
