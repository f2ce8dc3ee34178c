"""`spike-audit run` at training batch sizes, spikes fixed, corpus growing: does the audit cost what it reads?

    python benchmarks/run_scale.py                         # 128-token rows x 512 per step; 2,048 x 32
    python benchmarks/run_scale.py --sizes 8,32 --rows 2048 --md out.md

The demo run of ``benchmarks/pipelines.py`` has 16 rows of ~130 tokens per step, so Beam's fixed cost is
most of its CPU time. A real run's step is 0.1-4M tokens. This builds runs over the corpora of
``benchmarks/pipelines.py`` (built there, under ``--cache``; real text, 2^20-token Parquet shards, rows of 128
or 2,048 tokens): a step manifest that consumes the first ``size`` shards in order, ``--batch-tokens`` tokens
per step (65,536 by default: 512 rows of 128 tokens, 32 rows of 2,048), and a JSONL loss log that is flat
noise with the same 4 loss spikes at fixed steps in every size. The audit then reads the 4 windows and its
controls (200 by default): the audited tokens stay about fixed while the corpus grows, except for the
duplicate reference, which hashes every slice the manifest consumed (the whole corpus here).

Each measurement is a child process waited with ``os.wait4`` (CPU s = user + sys, peak RSS of the largest
process), next to the plain pyarrow read of the same shards and columns. CPU seconds are the figure of merit:
the machine may be shared (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPIKES = (60, 85, 100, 115)  # loss spikes: the same steps at every size (the smallest run has 128 steps)


def _measure(cmd, env=None):
    sys.path.insert(0, str(HERE))
    from pipelines import measure  # benchmarks/pipelines.py

    return measure(cmd, env)


def build_run(corpus: Path, n_shards: int, batch_tokens: int, dest: Path, with_text: bool) -> dict:
    """Shard links, manifest and loss log of a run over the first ``n_shards`` shards of ``corpus``."""
    import pyarrow.parquet as pq

    from spike_audit.pipelines.manifest import manifest_from_arrays, write_manifest

    src = corpus / ("text" if with_text else "tokens")
    files = sorted(src.glob("part-*.parquet"))[:n_shards]
    if len(files) < n_shards:
        raise SystemExit(f"{src} has {len(files)} shards, fewer than {n_shards}: build bigger corpora with "
                         "benchmarks/pipelines.py --sizes")
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "shards").mkdir(parents=True)
    rows = []
    for f in files:
        (dest / "shards" / f.name).symlink_to(f)
        rows.append(pq.read_metadata(f).num_rows)
    seq = pq.read_table(files[0], columns=["tokens"]).column("tokens").combine_chunks()
    row_tokens = int(np.median(np.diff(seq.offsets.to_numpy())))
    per_step = max(1, batch_tokens // row_tokens)
    step, shard, start, end = [], [], [], []
    s = 0
    for f, n in zip(files, rows):  # a step's rows never span two shards: shards hold whole batches here
        for a in range(0, n - per_step + 1, per_step):
            step.append(s)
            shard.append(f.name)
            start.append(a)
            end.append(a + per_step)
            s += 1
    n_steps = s
    write_manifest(manifest_from_arrays(step, shard, start, end, batch_pos=np.zeros(n_steps, np.int64)), dest / "manifest.parquet")
    rng = np.random.default_rng(0)
    loss = 3.0 + 0.02 * rng.standard_normal(n_steps)
    for k in SPIKES:
        loss[k] += 1.5
    # the log numbers steps as iterations (1-based): iteration i consumed batch i - 1
    with open(dest / "metrics.jsonl", "w") as fh:
        for i in range(n_steps):
            fh.write(json.dumps({"step": i + 1, "train/loss": round(float(loss[i]), 5)}) + "\n")
    return {"steps": n_steps, "rows_per_step": per_step, "row_tokens": row_tokens,
            "corpus_tokens": int(sum(rows)) * row_tokens}


def _audited(out: Path) -> int:
    import pyarrow.parquet as pq

    bs = pq.read_table(out / "batch_scores.parquet", columns=["step", "n_tokens"])
    return int(sum(dict(zip(bs.column("step").to_pylist(), bs.column("n_tokens").to_pylist())).values()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/spike_audit_bench_corpora"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/spike_audit_run_scale"))
    ap.add_argument("--sizes", default="8,32,128", help="shards of 2^20 tokens (default 8,32,128)")
    ap.add_argument("--rows", default="128,2048")
    ap.add_argument("--batch-tokens", type=int, default=65536)
    ap.add_argument("--columns", default="tokens,text", help="tokens (token-only shards), text, or both")
    ap.add_argument("--spike-audit", default=shutil.which("spike-audit") or "spike-audit")
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    py = sys.executable
    env = dict(os.environ)
    lines = []

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    emit(f"`python benchmarks/run_scale.py --sizes {args.sizes} --rows {args.rows} --batch-tokens "
         f"{args.batch_tokens} --columns {args.columns}`")
    emit()
    emit("| rows | columns | shards | corpus tokens | steps | audited steps | audited tokens | job | CPU s | wall s | "
         "audited tokens/CPU-s | peak RSS GB |")
    emit("|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    loads = []
    for rl in [int(x) for x in args.rows.split(",")]:
        corpus = args.cache / f"rows{rl}"
        for cols in args.columns.split(","):
            with_text = cols == "text"
            for size in [int(x) for x in args.sizes.split(",")]:
                dest = args.work / f"r{rl}-{cols}-{size}"
                info = build_run(corpus, size, args.batch_tokens, dest, with_text)
                read = _measure([py, "-c", "import sys, glob, pyarrow.parquet as pq\n"
                                 "for f in sorted(glob.glob(sys.argv[1] + '/*.parquet')):\n"
                                 "    pq.read_table(f, columns=sys.argv[2].split(','), use_threads=False)",
                                 str(dest / "shards"), "tokens,text" if with_text else "tokens"], env)
                out = dest / "audit"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [args.spike_audit, "run", "--log", str(dest / "metrics.jsonl"), "--metric", "train_loss",
                       "--manifest", str(dest / "manifest.parquet"), "--shards", str(dest / "shards"),
                       "--step-offset", "-1", "--allow-outside-root", "--out", str(out), "-q"]
                r = _measure(cmd, env)
                loads.append(os.getloadavg()[0])
                if r["rc"] != 0:
                    emit(f"| {rl:,} | {cols} | {size} | | | | | `run` FAILED: {' / '.join(r.get('error', []))} |")
                    continue
                audited = _audited(out)
                n_aud = len(set(__import__("pyarrow.parquet", fromlist=["x"]).read_table(
                    out / "batch_scores.parquet", columns=["step"]).column("step").to_pylist()))
                tok = info["corpus_tokens"]
                emit(f"| {rl:,} | {cols} | {size} | {tok / 1e6:.1f}M | {info['steps']:,} | | | plain pyarrow read "
                     f"of all shards | {read['cpu']:.1f} | {read['wall']:.1f} | | {read['rss_gb']:.2f} |")
                emit(f"| {rl:,} | {cols} | {size} | {tok / 1e6:.1f}M | {info['steps']:,} | {n_aud} | "
                     f"{audited / 1e6:.1f}M | `run` | {r['cpu']:.1f} | {r['wall']:.1f} | "
                     f"{audited / r['cpu'] / 1e6:.2f}M | {r['rss_gb']:.2f} |")
    emit()
    emit(f"{os.cpu_count()} cores, load average {min(loads):.1f}-{max(loads):.1f}; "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
