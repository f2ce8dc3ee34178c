"""A longer fuzz campaign of the command line than the test suite's bounded one (tests/test_fuzz_inputs.py): every
case must end in success or in a one-line error (exit 2), never in a traceback or a multi-line error.

    python benchmarks/fuzz_cli.py logs [--cases 1500] [--seed 7] [--logs DIR]
    python benchmarks/fuzz_cli.py shards [--cases 80] [--seed 11]

``logs``: mutated bytes of real training logs (tests/fixtures/logs and --logs: truncated, bytes flipped, binary
inserted, lines shuffled or repeated, numbers replaced by nan/inf/overflowing or non-ASCII digits, CRLF with a BOM,
UTF-16, a multi-megabyte line; or JSONL/CSV of odd types) through ``spike-audit spikes --json``, with the format
detected or forced to a random one. ``shards``: directories of hostile shards (token ids as strings, floats,
negative or past 2^32, null rows and elements, nested lists, corrupt or truncated Parquet, mixed schemas, empty
files, broken JSONL lines, a cut gzip, non-string text, a 1.2M-token row, large lists with dictionary text) through
``spike-audit shards``. Runs in process (one import of Beam); prints every distinct failure and a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spike_audit.pipelines.cli.main import main

HERE = Path(__file__).resolve().parent
FORMATS = [None, None, None, None, "jsonl", "csv", "megatron", "megatron-golden", "modded-nanogpt", "llmc", "nanogpt",
           "torchtitan", "olmo", "hf-trainer-state", "tensorboard"]

NUMS = ["nan", "NaN", "inf", "-inf", "1e400", "-0", "99999999999999999999999", "0x10", "1_000", "", " ", "1e-400",
        "١٢٣", "3.5.6", "--1", "+5", "null", "true"]

def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation of a log's bytes."""
    op = rng.randrange(12)
    if op == 0 and data:
        return data[: rng.randrange(len(data))]
    if op == 1:
        b = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            if b: b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if op == 2:
        i = rng.randrange(len(data) + 1)
        return data[:i] + os.urandom(rng.randint(1, 300)) + data[i:]
    lines = data.split(b"\n")
    if op == 3:
        rng.shuffle(lines); return b"\n".join(lines)
    if op == 4:
        out = []
        for ln in lines:
            if rng.random() < 0.05:
                ln = re.sub(rb"\d+(\.\d+)?", lambda m: rng.choice(NUMS).encode(), ln, count=rng.randint(1, 3))
            out.append(ln)
        return b"\n".join(out)
    if op == 5:
        return b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n")
    if op == 6:
        try: return data.decode("utf-8", "replace").encode("utf-16")
        except Exception: return data
    if op == 7:
        return rng.choice([b"", b"\n", b"   \n\n", b"\x00" * 100, b"{}", b"[]", b"step,loss\n", b"{\"step\": 1}\n"])
    if op == 8:  # repeat lines (duplicate steps)
        k = rng.randrange(max(1, len(lines)))
        return b"\n".join(lines[:k] + lines[k:k + 50] * 3 + lines[k:])
    if op == 9:  # jsonl with odd types
        rows = []
        for s in range(rng.randint(0, 300)):
            v = rng.choice([rng.random() * 5, None, "x", [1], {"a": 1}, True, 1e308, float("nan"), -1, 2**70])
            st = rng.choice([s, s, s, str(s), None, -s, 2**70, s + 0.5])
            d = {"step": st, "train_loss": v}
            if rng.random() < 0.3: d["grad_norm"] = rng.choice([v, 1.0])
            rows.append(json.dumps(d, allow_nan=True))
        return "\n".join(rows).encode()
    if op == 10:  # csv odd
        rows = [rng.choice(["step,loss", "step,train_loss,grad_norm", "loss,step", "a,b", "step;loss", ""])]
        for s in range(rng.randint(0, 200)):
            q = '"1,2"'
            rows.append(f"{rng.choice([s, s, '', 'x', s * 1.5])},{rng.choice([rng.random(), '', 'nan', q, 'inf'])}")
        return "\n".join(rows).encode()
    # 11: long line
    i = rng.randrange(len(lines) or 1)
    lines.insert(i, b"x" * rng.randint(10_000, 3_000_000))
    return b"\n".join(lines)

def good_tokens(rng, n=50, L=64):
    return [list(map(int, np.random.default_rng(rng.randrange(1 << 30)).integers(0, 50000, rng.randint(0, L)))) for _ in range(n)]

def make_case(d: Path, rng: random.Random) -> int:
    """A directory of hostile shards; the kind drawn."""
    d.mkdir(parents=True)
    op = rng.randrange(16)
    toks = good_tokens(rng)
    if op == 0:  # tokens as strings
        pq.write_table(pa.table({"tokens": [[str(t) for t in r] for r in toks]}), d / "a.parquet")
    elif op == 1:  # floats
        pq.write_table(pa.table({"tokens": [[t + 0.5 for t in r] for r in toks]}), d / "a.parquet")
    elif op == 2:  # negative ids / huge ids
        pq.write_table(pa.table({"tokens": pa.array([[-1, 5, 2**40] for _ in range(30)], pa.list_(pa.int64()))}), d / "a.parquet")
    elif op == 3:  # null rows and null elements
        pq.write_table(pa.table({"tokens": [None, [1, None, 3], [], [4, 5]] * 10}), d / "a.parquet")
    elif op == 4:  # corrupt parquet bytes
        pq.write_table(pa.table({"tokens": toks}), d / "a.parquet")
        b = bytearray((d / "a.parquet").read_bytes())
        for _ in range(20): b[rng.randrange(len(b))] = rng.randrange(256)
        (d / "a.parquet").write_bytes(bytes(b))
    elif op == 5:  # truncated parquet
        pq.write_table(pa.table({"tokens": toks}), d / "a.parquet")
        b = (d / "a.parquet").read_bytes(); (d / "a.parquet").write_bytes(b[: rng.randrange(len(b))])
    elif op == 6:  # mixed schemas across shards
        pq.write_table(pa.table({"tokens": toks}), d / "a.parquet")
        pq.write_table(pa.table({"text": ["hello world"] * 10}), d / "b.parquet")
        pq.write_table(pa.table({"tokens": pa.array([[1, 2]] * 5, pa.list_(pa.uint16()))}), d / "c.parquet")
    elif op == 7:  # zero rows / no columns
        pq.write_table(pa.table({"tokens": pa.array([], pa.list_(pa.int32()))}), d / "a.parquet")
        pq.write_table(pa.table({}), d / "b.parquet")
    elif op == 8:  # jsonl broken lines
        lines = [json.dumps({"tokens": r}) for r in toks]
        lines.insert(rng.randrange(len(lines)), rng.choice(["{", "not json", '{"tokens": "abc"}', '{"tokens": [1, "a"]}', '[]', '{"tokens": null}', '{"tokens": [1.5]}', '{"tokens": [[1]]}']))
        (d / "a.jsonl").write_text("\n".join(lines))
    elif op == 9:  # text with odd unicode
        texts = ["\x00\ud800x".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "", "\\" * 5000, "é" * 3, "\u202e" * 10, "a\r\nb"] * 10
        pq.write_table(pa.table({"text": texts}), d / "a.parquet")
    elif op == 10:  # gz jsonl corrupted
        data = gzip.compress("\n".join(json.dumps({"text": "some text " * 5}) for _ in range(50)).encode())
        (d / "a.jsonl.gz").write_bytes(data[: len(data) // 2])
    elif op == 11:  # text column not string
        pq.write_table(pa.table({"text": [1, 2, 3] * 10}), d / "a.parquet")
    elif op == 12:  # nested list tokens
        pq.write_table(pa.table({"tokens": [[[1, 2], [3]]] * 10}), d / "a.parquet")
    elif op == 13:  # a file that is not parquet with parquet suffix, and junk files
        (d / "a.parquet").write_bytes(os.urandom(1000))
        (d / "README").write_text("hi")
    elif op == 14:  # huge single row
        pq.write_table(pa.table({"tokens": pa.array([list(range(0, 60000)) * 20], pa.list_(pa.int32()))}), d / "a.parquet")
    else:  # dictionary-encoded / large_list / fixed size list
        t = pa.table({"tokens": pa.array(toks, pa.large_list(pa.int64())), "text": pa.array(["x y z"] * len(toks)).dictionary_encode()})
        pq.write_table(t, d / "a.parquet")
    return op

def run_case(args: list[str]):
    """(exit code or a failure kind, traceback, stderr) of one in-process command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            return "traceback", traceback.format_exc(), err.getvalue()
    e = err.getvalue()
    if "Traceback" in e:
        return "traceback on stderr", e, e
    if rc == 2 and e.strip().count("\n") > 0:
        return "multi-line error", e, e
    return rc, "", e


def campaign(kind: str, cases: int, seed: int, log_dirs: list[Path]) -> int:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f"spike-audit-fuzz-{kind}-"))
    logging.disable(logging.CRITICAL)
    sources = sorted(p for d in log_dirs for p in d.rglob("*") if p.is_file() and p.suffix in (".log", ".json", ".txt"))
    if kind == "logs" and not sources:
        sys.exit("no logs to mutate")
    failures: dict[str, tuple] = {}
    codes: dict[str, int] = {}
    for i in range(cases):
        if kind == "logs":
            src = rng.choice(sources)
            data = src.read_bytes()[:2_000_000]
            for _ in range(rng.randint(1, 2)):
                data = mutate(data, rng)
            path = tmp / f"case{i}{rng.choice([src.suffix, '.jsonl', '.csv', '.txt', '.log', ''])}"
            path.write_bytes(data)
            args = ["-q", "spikes", str(path), "--json"]
            fmt = rng.choice(FORMATS)
            if fmt:
                args += ["--format", fmt]
            if rng.random() < 0.3:
                args += ["--out", str(tmp / f"out{i}")]
        else:
            path = tmp / f"case{i}"
            make_case(path, rng)
            args = ["-q", "shards", str(path), "--out", str(tmp / f"out{i}")]
            if rng.random() < 0.3:
                args += ["--tokens-column", rng.choice(["tokens", "input_ids", "text"])]
        rc, tb, _ = run_case(args)
        codes[str(rc)] = codes.get(str(rc), 0) + 1
        if isinstance(rc, str):
            key = tb.strip().splitlines()[-1][:150] if tb.strip() else rc
            if key not in failures:
                failures[key] = (str(path), args)
                print(f"== {rc}: {' '.join(args)}\n{tb[-2000:]}", flush=True)
                continue
        for p in (path, tmp / f"out{i}"):  # only the first input of each distinct failure is kept
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    print(f"{kind}: {cases} cases (seed {seed}); exit codes and failures {codes}; {len(failures)} distinct failures; "
          f"the first input of each kept in {tmp}")
    return 1 if failures else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["logs", "shards"])
    ap.add_argument("--cases", type=int, default=None)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--logs", nargs="*", default=[], help="more directories of real logs to mutate")
    a = ap.parse_args()
    n = a.cases or (1500 if a.kind == "logs" else 80)
    sys.exit(campaign(a.kind, n, a.seed, [HERE.parent / "tests" / "fixtures" / "logs", *map(Path, a.logs)]))
