"""`spike-audit shards` on a corpus whose shards all share rows evenly: the worst case of the copied-block join.

    python benchmarks/shared_rows.py [--shards 256] [--rows 512] [--len 128] [--copies 16] \
        --tool /path/a/spike-audit --tool /path/b/spike-audit [--repeat 2]

Half of every shard's rows are drawn from a pool of shared rows, each copied into ``--copies`` random shards (the
most a row may be held by and still count in a block); the other half are unique. Token ids uniform in 2..29999.
Every shard shares about ``rows / 2 * (copies - 1) / (shards - 1)`` rows with each of its partners, so each has a
largest block by chance and none is a copy of another: a correct audit quarantines none of them. Each tool is run
``--repeat`` times, interleaved; printed per run: CPU s (user + sys of the process and its children, ``wait4``),
wall s, peak RSS of the largest process, and the number of shards quarantined.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build(root: Path, n_shards: int, rows: int, length: int, copies: int, seed: int = 1) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    shared = rng.integers(2, 30000, (n_shards * rows // 2 // copies, length)).astype(np.uint16)
    slots: list[list[int]] = [[] for _ in range(n_shards)]
    for i in range(len(shared)):
        for s in rng.choice(n_shards, copies, replace=False):
            slots[s].append(i)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        mine = shared[slots[s][:rows]]
        own = rng.integers(2, 30000, (rows - len(mine), length)).astype(np.uint16)
        block = np.concatenate([mine, own])
        rng.shuffle(block)
        pq.write_table(pa.table({"tokens": pa.array(list(block), type=pa.list_(pa.uint16()))}),
                       root / f"s{s:04d}.parquet")
    return n_shards * rows * length


def measure(tool: str, shards: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with open(str(out) + ".log", "w") as log:
        p = subprocess.Popen([tool, "shards", str(shards), "--out", str(out)], stdout=log, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{tool} shards failed (see {out}.log)")
    q = json.loads((out / "quarantine.json").read_text())
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": time.perf_counter() - t0,
            "peak_rss_gb": ru.ru_maxrss / 2**20, "quarantined": len(q["shards"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=256)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--len", type=int, default=128, dest="length")
    ap.add_argument("--copies", type=int, default=16)
    ap.add_argument("--tool", action="append", required=True, help="a spike-audit executable (repeatable)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default="/tmp/spike_audit_shared_rows")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shards = work / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    tokens = build(shards, args.shards, args.rows, args.length, args.copies)
    print(f"{args.shards} shards x {args.rows} rows x {args.length} tokens ({tokens / 1e6:.1f}M tokens), "
          f"half of each shard's rows shared with {args.copies - 1} other shards; load {os.getloadavg()[0]:.1f}")
    print("| tool | run | CPU s | wall s | peak RSS GB | shards quarantined |")
    print("|---|---|---|---|---|---|")
    for r in range(args.repeat):
        for i, tool in enumerate(args.tool):
            m = measure(tool, shards, work / f"out{i}")
            print(f"| {tool} | {r + 1} | {m['cpu_s']:.1f} | {m['wall_s']:.1f} | {m['peak_rss_gb']:.2f} | "
                  f"{m['quarantined']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
