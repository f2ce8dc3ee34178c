"""Pipelines end to end at growing corpus sizes, next to the plain read and to peer tools, in one run.

    python benchmarks/pipelines.py --quick          # a few minutes: 2M and 8M tokens, peers on 1M tokens
    python benchmarks/pipelines.py                  # 10M, 50M, 200M tokens (builds the corpora once)
    python benchmarks/pipelines.py --sizes 10,50 --rows 128 --md out.md

Corpus (built once under ``--cache``, default /tmp/spike_audit_bench_corpora): the Python standard library's
sources (as ``benchmarks/auditors.py``), tokenized with a byte-level BPE (vocab 32,000, trained on them, saved
as ``tokenizer.json``), documents joined with EOS (id 0). The first copy of the token stream is the real text;
every further copy (the stdlib is 8M tokens) is the stream rotated by a random offset with 25% of its
non-EOS tokens replaced by tokens drawn from random positions of the stream, so copies are neither exact nor
near duplicates of each other (5-gram Jaccard about 0.1) while the unigram mix, document lengths and EOS
structure stay real. Rows of 128 or 2,048 tokens, ``text`` the decoded row; shards of 2^20 tokens
(``tokens: list<uint16>`` + ``text``, and a token-only twin without ``text``). A size is the first
``size / 2^20`` shards of the largest corpus, so every size holds the same kind of data.

Each measurement is a child process waited with ``os.wait4``: CPU s = user + sys of the child and every
process it waited for (Beam's worker processes included), peak RSS = the largest resident set of any single
one of those processes (not their sum). Measured, per size, row length and column set:

* plain pyarrow read of the same files and columns (the floor);
* ``spike-audit shards`` in-process, and with ``--direct_running_mode=multi_processing --direct_num_workers=2``;
* datatrove 1 task: ParquetReader -> GopherRepetitionFilter -> GopherQualityFilter -> MinhashDedupSignature,
  words split on whitespace (its English word tokenizer needs spaCy), filters dropping documents before the
  signatures as datatrove does (with-text corpora only; on the smallest size, capped at ``--peer-tokens`` tokens: it runs at ~0.1M tokens/s);
* dolma's repetition tagger if the ``dolma`` package imports (it is not installed by ``[bench]``).

Then ``spike-audit run`` on demo runs of growing length with the same 8 planted spikes (``DemoConfig(steps=N)``),
audited tokens per CPU-second, and the CPU-seconds of ``python -c pass`` (interpreter start) for reference.
The machine may be shared: the load average is printed with the table; CPU seconds are the figure of merit.
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

HERE = Path(__file__).resolve().parent
SHARD_TOKENS = 1 << 20
EOS = 0
VOCAB = 32000
MUTATE = 0.25


# --------------------------------------------------------------------------------------------- corpus

def _base_stream(cache: Path):
    """(flat uint16 token stream with EOS, tokenizers.Tokenizer), trained and cached once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sys.path.insert(0, str(HERE))
    from auditors import stdlib_docs  # the same text as benchmarks/auditors.py

    tok_path, ids_path = cache / "tokenizer.json", cache / "stream.npy"
    if tok_path.exists() and ids_path.exists():
        return np.load(ids_path), Tokenizer.from_file(str(tok_path))
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    docs = stdlib_docs()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    flat = np.concatenate([np.append(np.asarray(e.ids, dtype=np.uint16), np.uint16(EOS))
                           for e in tok.encode_batch(docs)])
    tok.save(str(tok_path))
    np.save(ids_path, flat)
    print(f"tokenized the stdlib: {len(flat):,} tokens in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return flat, tok


def _copy(flat: np.ndarray, k: int) -> np.ndarray:
    if k == 0:
        return flat
    rng = np.random.default_rng(1000 + k)
    out = np.roll(flat, int(rng.integers(len(flat))))
    pos = np.flatnonzero((rng.random(len(out)) < MUTATE) & (out != EOS))
    src = rng.integers(len(flat), size=len(pos))
    repl = flat[src]
    keep = repl != EOS
    out[pos[keep]] = repl[keep]
    return out


def build_corpus(cache: Path, row_len: int, max_tokens: int) -> tuple[Path, Path]:
    """Shards of SHARD_TOKENS tokens in rows of ``row_len``: (dir with text, dir token-only); grown on demand."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text_dir, tok_dir = cache / f"rows{row_len}" / "text", cache / f"rows{row_len}" / "tokens"
    text_dir.mkdir(parents=True, exist_ok=True)
    tok_dir.mkdir(parents=True, exist_ok=True)
    n_shards = -(-max_tokens // SHARD_TOKENS)
    have = len(list(tok_dir.glob("*.parquet")))
    if have >= n_shards and len(list(text_dir.glob("*.parquet"))) >= n_shards:
        return text_dir, tok_dir
    flat, tok = _base_stream(cache)
    rows_per_shard = SHARD_TOKENS // row_len
    rows_per_copy = len(flat) // row_len
    t0 = time.perf_counter()
    stream, copy_k, pos = None, -1, 0
    shard = 0
    pending = []
    # walk the copies' rows in order, one shard at a time
    while shard < n_shards:
        while sum(len(p) for p in pending) < rows_per_shard:
            if stream is None or pos >= rows_per_copy:
                copy_k += 1
                stream = _copy(flat, copy_k)[: rows_per_copy * row_len].reshape(rows_per_copy, row_len)
                pos = 0
            take = min(rows_per_shard - sum(len(p) for p in pending), rows_per_copy - pos)
            pending.append(stream[pos : pos + take])
            pos += take
        rows = np.concatenate(pending)
        pending = []
        name = f"part-{shard:05d}.parquet"
        if not (tok_dir / name).exists() or not (text_dir / name).exists():
            offsets = pa.array(np.arange(0, rows.size + 1, row_len, dtype=np.int32))
            tokens = pa.ListArray.from_arrays(offsets, pa.array(rows.ravel(), type=pa.uint16()))
            text = tok.decode_batch([r.tolist() for r in rows], skip_special_tokens=False)
            pq.write_table(pa.table({"tokens": tokens}), tok_dir / (name + ".tmp"))
            pq.write_table(pa.table({"tokens": tokens, "text": pa.array(text, pa.string())}), text_dir / (name + ".tmp"))
            os.replace(tok_dir / (name + ".tmp"), tok_dir / name)
            os.replace(text_dir / (name + ".tmp"), text_dir / name)
        shard += 1
        if shard % 16 == 0:
            print(f"  rows{row_len}: {shard}/{n_shards} shards ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return text_dir, tok_dir


def _build_corpora(cache: Path, row_lens, max_tokens: int) -> None:
    for row_len in row_lens:
        build_corpus(cache, row_len, max_tokens)


def subset(src: Path, n_shards: int, dest: Path) -> Path:
    """A directory of symlinks to the first n shards (the size's corpus)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in dest.glob("*.parquet"):
        f.unlink()
    for f in sorted(src.glob("*.parquet"))[:n_shards]:
        (dest / f.name).symlink_to(f)
    return dest


# --------------------------------------------------------------------------------------------- measuring

def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; CPU s (user+sys, waited descendants included), wall s, peak RSS of the largest process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out_b, err_b = [], []
    # drain pipes without deadlock: communicate() would reap the child before wait4 could read its rusage
    import threading
    ts = [threading.Thread(target=lambda s, b: b.append(s.read()), args=(proc.stdout, out_b)),
          threading.Thread(target=lambda s, b: b.append(s.read()), args=(proc.stderr, err_b))]
    for t in ts:
        t.start()
    _, status, ru = os.wait4(proc.pid, 0)
    for t in ts:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    res = {"cpu": ru.ru_utime + ru.ru_stime, "wall": wall, "rss_gb": ru.ru_maxrss / 2**20, "rc": proc.returncode,
           "stdout": out_b[0].decode(errors="replace")}
    if proc.returncode != 0:
        res["error"] = err_b[0].decode(errors="replace").strip().splitlines()[-3:]
        print(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n  " + "\n  ".join(res["error"]), file=sys.stderr)
    return res


READ_SNIPPET = """
import sys, pyarrow.parquet as pq, glob
n = 0
cols = sys.argv[2].split(',')
for f in sorted(glob.glob(sys.argv[1] + '/*.parquet')):
    t = pq.read_table(f, columns=cols, use_threads=False)
    n += len(t.column('tokens').combine_chunks().values)
    if 'text' in cols:
        t.column('text').combine_chunks()
print(n)
"""

#: Beam's own floor on this runner: the import and a pipeline of 26 fused stages (as many bundles as `run` and
#: `shards` execute on the demo and on a corpus) moving 100 small elements, doing nothing else.
BEAM_FLOOR_SNIPPET = """
import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
with beam.Pipeline(options=PipelineOptions(["--runner=DirectRunner"])) as p:
    x = p | beam.Create(list(range(100)))
    for i in range(24):  # 24 GroupByKeys: 26 bundles with the Create's
        x = x | f"m{i}" >> beam.Map(lambda v: (v % 7, v)) | f"g{i}" >> beam.GroupByKey() | f"f{i}" >> beam.FlatMap(lambda kv: kv[1])
"""

DATATROVE_SNIPPET = """
import sys, logging
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.filters import GopherRepetitionFilter, GopherQualityFilter
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer
class Whitespace(WordTokenizer):  # datatrove's English tokenizer needs spaCy; ours splits on whitespace too
    def word_tokenize(self, text, **kw): return text.split()
    def sent_tokenize(self, text, **kw): return [text]
    def span_tokenize(self, text, **kw): return [(0, len(text))]
src, out, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
ws = Whitespace()
pipe = [ParquetReader(src, glob_pattern='*.parquet', text_key='text', limit=limit),
        GopherRepetitionFilter(language=ws), GopherQualityFilter(language=ws),
        MinhashDedupSignature(output_folder=out + '/sigs', config=MinhashConfig(hash_config=HashConfig(hash_fc="sha1")), language=ws)]  # its xxhash path fails on str here
LocalPipelineExecutor(pipeline=pipe, tasks=1, workers=1, logging_dir=out + '/logs').run()
"""

DOLMA_SNIPPET = """
import sys, glob, pyarrow.parquet as pq
from dolma.core.data_types import Document
from dolma.core.registry import TaggerRegistry
tagger = TaggerRegistry.get('repetitions_v1')()
limit, n = int(sys.argv[2]), 0
for f in sorted(glob.glob(sys.argv[1] + '/*.parquet')):
    for i, t in enumerate(pq.read_table(f, columns=['text']).column('text').to_pylist()):
        tagger.predict(Document(source='bench', version='v0', id=f'{f}:{i}', text=t))
        n += 1
        if n >= limit: break
    if n >= limit: break
print(n)
"""


def spike_audit_cmd(py: str) -> list[str]:
    exe = Path(py).parent / "spike-audit"
    return [str(exe)] if exe.exists() else [py, "-m", "spike_audit.pipelines.cli"]


def dolma_available(py: str) -> bool:
    return subprocess.run([py, "-c", "import dolma.core.registry"], capture_output=True).returncode == 0


# --------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2M and 8M tokens, peers on 1M tokens (a few minutes)")
    ap.add_argument("--sizes", help="corpus sizes in millions of tokens, comma-separated (default 10,50,200)")
    ap.add_argument("--rows", default="128,2048", help="row lengths (default 128,2048)")
    ap.add_argument("--cols", default="tokens,text", help="'tokens' (token-only), 'text' (with text) or both")
    ap.add_argument("--runs", help="demo run lengths in steps for `run` (default 400,1600,3200; quick 400,800)")
    ap.add_argument("--peer-tokens", type=float, default=None, help="tokens fed to datatrove/dolma (default 10M; quick 1M)")
    ap.add_argument("--no-2workers", action="store_true")
    ap.add_argument("--cache", default="/tmp/spike_audit_bench_corpora")
    ap.add_argument("--work", default="/tmp/spike_audit_bench_work")
    ap.add_argument("--python", default=sys.executable, help="the Python with spike-audit installed")
    ap.add_argument("--md", help="also write the tables (markdown) to this file")
    ap.add_argument("--json", help="also write every measurement to this JSON file")
    args = ap.parse_args()

    sizes = [float(s) for s in (args.sizes or ("2,8" if args.quick else "10,50,200")).split(",")]
    row_lens = [int(r) for r in args.rows.split(",")]
    colsets = args.cols.split(",")
    runs = [int(s) for s in (args.runs or ("400,800" if args.quick else "400,1600,3200")).split(",")]
    peer_tokens = int((args.peer_tokens or (1.0 if args.quick else 10.0)) * 1e6)
    cache, work = Path(args.cache), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    py, sa = args.python, spike_audit_cmd(args.python)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    loads = [os.getloadavg()[0]]
    results = []
    lines = []

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    # The corpora are built in a fresh (spawned) process: a child's peak RSS as wait4 reports it starts at its
    # parent's resident set, so building them in this process would inflate every measurement after it.
    import multiprocessing

    builder = multiprocessing.get_context("spawn").Process(
        target=_build_corpora, args=(cache, row_lens, int(max(sizes) * 1e6)))
    builder.start()
    builder.join()
    if builder.exitcode:
        sys.exit(f"building the corpora under {cache} failed (exit {builder.exitcode})")
    base = measure([py, "-c", "pass"], env)
    beam_import = measure([py, "-c", "import apache_beam, pyarrow, numpy"], env)
    beam_floor = measure([py, "-c", BEAM_FLOOR_SNIPPET], env)
    has_dolma = dolma_available(py)

    emit(f"| rows | columns | tokens | job | CPU s | wall s | tokens/CPU-s | peak RSS GB | CPU vs read |")
    emit("|---:|---|---:|---|---:|---:|---:|---:|---:|")
    for row_len in row_lens:
        text_dir, tok_dir = build_corpus(cache, row_len, int(max(sizes) * 1e6))
        for cols in colsets:
            src = text_dir if cols == "text" else tok_dir
            for size in sizes:
                n_shards = max(1, int(round(size * 1e6 / SHARD_TOKENS)))
                corpus = subset(src, n_shards, work / f"corpus-{row_len}-{cols}")
                n_tok = n_shards * SHARD_TOKENS
                read_cols = "tokens,text" if cols == "text" else "tokens"
                jobs = [("plain pyarrow read", [py, "-c", READ_SNIPPET, str(corpus), read_cols])]
                out = work / "out"
                # the size's corpus is a directory of symlinks to the built shards
                shards_cmd = sa + ["shards", str(corpus), "--out", str(out), "--allow-outside-root"]
                jobs.append(("`shards`, 1 worker", shards_cmd))
                if not args.no_2workers:
                    jobs.append(("`shards`, 2 workers", shards_cmd + [
                                                              "--direct_running_mode=multi_processing",
                                                              "--direct_num_workers=2"]))
                if cols == "text" and size == sizes[0]:
                    dt = work / "datatrove"
                    limit = max(1, peer_tokens // row_len)
                    jobs.append((f"datatrove Gopher rep+quality+MinHash sig, 1 task",
                                 [py, "-c", DATATROVE_SNIPPET, str(corpus), str(dt), str(limit)]))
                    if has_dolma:
                        jobs.append(("dolma repetitions_v1 tagger", [py, "-c", DOLMA_SNIPPET, str(corpus), str(limit)]))
                read_cpu = None
                for label, cmd in jobs:
                    shutil.rmtree(work / "out", ignore_errors=True)
                    shutil.rmtree(work / "datatrove", ignore_errors=True)
                    r = measure(cmd, env)
                    loads.append(os.getloadavg()[0])
                    n = n_tok
                    if label.startswith(("datatrove", "dolma")):
                        n = min(n_tok, (peer_tokens // row_len) * row_len)
                    r.update(rows=row_len, cols=cols, tokens=n, job=label)
                    r.pop("stdout")
                    results.append(r)
                    if label == "plain pyarrow read":
                        read_cpu = r["cpu"] / n
                    ratio = r["cpu"] / (read_cpu * n) if read_cpu else float("nan")
                    bad = " (failed)" if r["rc"] else ""
                    emit(f"| {row_len:,} | {'tokens + text' if cols == 'text' else 'tokens only'} | {n / 1e6:.1f}M | "
                         f"{label}{bad} | {r['cpu']:.1f} | {r['wall']:.1f} | {n / r['cpu'] / 1e6:.2f}M | "
                         f"{r['rss_gb']:.2f} | {ratio:.1f}x |")

    # `run` on demo runs of growing length, spikes fixed
    emit()
    emit("| `run`: demo steps | corpus tokens | audited tokens | CPU s | CPU s beyond interpreter | wall s | "
         "audited tokens/CPU-s | peak RSS GB |")
    emit("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for steps in runs:
        demo = cache / f"demo-{steps}"
        if not (demo / "truth.json").exists():
            shutil.rmtree(demo, ignore_errors=True)
            subprocess.run([py, "-c", "import sys; from spike_audit.pipelines.demo import DemoConfig, make_demo; "
                            "make_demo(sys.argv[1], DemoConfig(steps=int(sys.argv[2])))", str(demo), str(steps)],
                           check=True, env=env)
        truth = json.loads((demo / "truth.json").read_text())
        out = work / "run-out"
        shutil.rmtree(out, ignore_errors=True)
        r = measure(sa + ["run", "--log", str(demo / "train.log"), "--manifest", str(demo / "manifest.parquet"),
                          "--shards", str(demo / "shards"), "--tokenizer", str(demo / "tokenizer.json"),
                          "--out", str(out)], env)
        loads.append(os.getloadavg()[0])
        audited = _audited_tokens(out)
        r.pop("stdout")
        r.update(job="run", steps=steps, tokens=truth["tokens"], audited=audited)
        results.append(r)
        emit(f"| {steps:,} | {truth['tokens'] / 1e6:.2f}M | {audited:,} | {r['cpu']:.1f} | "
             f"{r['cpu'] - base['cpu']:.1f} | {r['wall']:.1f} | {audited / r['cpu'] / 1e6:.3f}M | {r['rss_gb']:.2f} |")

    emit()
    emit(f"interpreter start (`python -c pass`): {base['cpu']:.2f} CPU s; `import apache_beam, pyarrow, numpy`: "
         f"{beam_import['cpu']:.2f} CPU s; Beam's floor (that import and a do-nothing pipeline of 26 stages, as "
         f"many as `run` and `shards` execute): {beam_floor['cpu']:.2f} CPU s; dolma: {'imported' if has_dolma else 'not installed (not measured)'}; "
         f"{os.cpu_count()} cores, load average {min(loads):.1f}-{max(loads):.1f} during the run; "
         f"CPU s include child processes; peak RSS is the largest single process")
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _audited_tokens(out: Path) -> int:
    """Tokens of the steps the run audit scored (each step once), from its batch_scores table."""
    import pyarrow.parquet as pq

    bs = pq.read_table(out / "batch_scores.parquet", columns=["step", "n_tokens"])
    return int(sum(dict(zip(bs.column("step").to_pylist(), bs.column("n_tokens").to_pylist())).values()))


if __name__ == "__main__":
    main()
