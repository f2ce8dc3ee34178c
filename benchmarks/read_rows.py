"""Benchmark: exact row reads from a ~1 GB Parquet shard set vs reading the whole set.

Builds (once, cached under --dir, default /tmp/spike_audit_bench_rows; never in the repo) a set of
Parquet shards with a ``tokens`` list<uint32> column (variable-length rows, row groups of
--row-group rows, uncompressed so the on-disk size is the token volume), then reads

- N random single rows (default 1,000) with :func:`pipelines.shards.read_slices`, one call per
  shard (as the Beam ``ReadSlices`` transform does),
- the same as contiguous runs (what a step manifest usually holds),
- the whole set with ``pyarrow.parquet.read_table``,

and reports wall time and bytes read. Bytes read are the process's ``rchar`` from
``/proc/self/io`` (every byte passed through read/pread syscalls, page cache or not; pyarrow reads
local files with pread), next to the bytes of the row groups the rows live in (from the Parquet
footers): reads should cost those row groups plus footers, nothing more. Parquet's unit of I/O is
the row-group column chunk, so N random single rows cost about min(N, groups) row groups: with
2,048-row groups, 1,000 random rows touch nearly every group; shards meant for random access
want smaller row groups.

    python benchmarks/read_rows.py [--gb 1.0] [--rows 1000] [--dir /tmp/spike_audit_bench_rows]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spike_audit.pipelines.shards.read import read_slices  # noqa: E402


def rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar")


def build(d: Path, gb: float, n_shards: int, row_group: int, seed: int) -> dict:
    meta_path = d / "bench.json"
    params = {"gb": gb, "shards": n_shards, "row_group": row_group, "seed": seed, "version": 2}
    if meta_path.exists() and json.loads(meta_path.read_text()).get("params") == params:
        return json.loads(meta_path.read_text())
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_shard = int(gb * 1e9 / n_shards)
    names, rows = [], []
    t0 = time.perf_counter()
    for s in range(n_shards):
        name = f"shard-{s:03d}.parquet"
        writer = None
        written = 0
        n_rows = 0
        while written < per_shard:
            lengths = rng.integers(64, 1025, row_group)
            values = rng.integers(0, 50257, int(lengths.sum()), dtype=np.uint32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            table = pa.table({"tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})
            if writer is None:
                writer = pq.ParquetWriter(d / name, table.schema, compression="none", use_dictionary=False)
            writer.write_table(table, row_group_size=row_group)
            written += values.nbytes
            n_rows += row_group
        writer.close()
        names.append(name)
        rows.append(n_rows)
        print(f"  wrote {name}: {n_rows} rows, {os.path.getsize(d / name) / 1e6:.0f} MB", flush=True)
    meta = {"params": params, "shards": names, "rows": rows, "build_s": time.perf_counter() - t0}
    meta_path.write_text(json.dumps(meta))
    return meta


def needed_bytes(d: Path, shard: str, rows: np.ndarray) -> tuple[int, int, int]:
    """(bytes of the row groups holding ``rows``, groups touched, groups in the file)."""
    md = pq.ParquetFile(d / shard).metadata
    counts = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)])
    starts = np.concatenate([[0], np.cumsum(counts)])
    groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
    size = sum(md.row_group(int(g)).total_byte_size for g in groups)
    return size, len(groups), md.num_row_groups


def measure(d: Path, meta: dict, picks: dict[str, np.ndarray]) -> dict:
    total_needed = groups = n_groups = 0
    for shard, sl in picks.items():
        rows = np.concatenate([np.arange(a, b) for a, b in sl]) if len(sl) else np.zeros(0, np.int64)
        nb, g, ng = needed_bytes(d, shard, rows)
        total_needed, groups = total_needed + nb, groups + g
    n_groups = sum(pq.ParquetFile(d / s).metadata.num_row_groups for s in meta["shards"])
    r0, t0 = rchar(), time.perf_counter()
    n_tok = 0
    n_rows = 0
    for shard, sl in picks.items():
        b = read_slices(str(d), shard, sl)
        n_tok += len(b.column("tokens").values)
        n_rows += b.num_rows
    return {"seconds": time.perf_counter() - t0, "bytes_read": rchar() - r0, "row_group_bytes": total_needed,
            "groups_touched": groups, "groups_total": n_groups, "rows": n_rows, "tokens": n_tok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/spike_audit_bench_rows")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--row-group", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    d = Path(args.dir)
    print(f"shard set: {d} ({args.gb} GB, {args.shards} shards, row groups of {args.row_group} rows)")
    meta = build(d, args.gb, args.shards, args.row_group, args.seed)
    total_bytes = sum(os.path.getsize(d / s) for s in meta["shards"])
    total_rows = sum(meta["rows"])
    print(f"  {total_rows:,} rows, {total_bytes / 1e9:.3f} GB on disk")
    rng = np.random.default_rng(args.seed + 1)
    cum = np.concatenate([[0], np.cumsum(meta["rows"])])

    def random_single(n):
        g = np.sort(rng.choice(total_rows, n, replace=False))
        s = np.searchsorted(cum, g, side="right") - 1
        return {meta["shards"][k]: np.stack([g[s == k] - cum[k], g[s == k] - cum[k] + 1], 1) for k in np.unique(s)}

    def runs(n, length):
        g = np.sort(rng.choice(total_rows // length, n // length, replace=False)) * length
        s = np.searchsorted(cum, g, side="right") - 1
        out = {}
        for k in np.unique(s):
            a = g[s == k] - cum[k]
            out[meta["shards"][k]] = np.stack([a, np.minimum(a + length, meta["rows"][k])], 1)
        return out

    # Warm-up: the first call imports modules (their .py reads count in rchar); not data I/O.
    read_slices(str(d), meta["shards"][0], [[0, 1]])
    results = {}
    for label, picks in [(f"{args.rows} random single rows", random_single(args.rows)),
                         ("100 random single rows", random_single(100)),
                         ("10 random single rows", random_single(10)),
                         (f"{args.rows} rows in runs of 100", runs(args.rows, 100))]:
        results[label] = r = measure(d, meta, picks)
        print(f"{label:>32}: {r['seconds']:7.3f} s, read {r['bytes_read'] / 1e6:9.1f} MB "
              f"({100 * r['bytes_read'] / total_bytes:5.1f}% of the set); row groups touched "
              f"{r['groups_touched']}/{r['groups_total']} = {r['row_group_bytes'] / 1e6:.1f} MB; "
              f"{r['rows']} rows, {r['tokens']:,} tokens")
    r0, t0 = rchar(), time.perf_counter()
    n = 0
    for s in meta["shards"]:
        n += pq.read_table(d / s).num_rows
    full = {"seconds": time.perf_counter() - t0, "bytes_read": rchar() - r0}
    print(f"{'whole set (pq.read_table)':>32}: {full['seconds']:7.3f} s, read {full['bytes_read'] / 1e6:9.1f} MB "
          f"({n:,} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
