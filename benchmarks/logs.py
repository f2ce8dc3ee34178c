"""Benchmark: parse and spike-detect 1M-line training logs: speed and peak memory, beside a plain read.

    python benchmarks/logs.py [--lines 1000000] [--repeat 3] [--formats modded-nanogpt,megatron,jsonl,modded-zst]
                              [--compare-with DIR]

Writes a modded-nanogpt-style log, a Megatron-LM log (rank prefixes, interleaved unrelated lines), a W&B-style JSONL
history and a zstd-compressed modded-nanogpt log into a temporary directory. Each measurement runs in a fresh child
process so its peak memory is its own: ``plain`` reads the file line by line and counts the lines (Python's
``for line in open(f, 'rb')``, and ``zstandard``'s stream reader for ``.zst``), ``read_log`` parses it into the
``LOSS_SERIES`` table. Reported: best-of-``repeat`` time, lines/s, MB/s, and the peak resident memory the call
added over the process after its imports (``VmHWM`` minus the RSS before the call), also as a multiple of the
file size. Then ``detect_table`` on the parsed table (best of ``repeat``).

``--compare-with DIR`` also times ``read_log`` from another build of spike-audit on the same files in the same run
(``DIR`` is put first on ``PYTHONPATH``, e.g. ``pip install --no-deps --target DIR <old checkout>``): before/after
numbers side by side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _loss(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.arange(n)
    v = 3.0 + 8.0 * np.exp(-x / 2000) + 0.03 * rng.standard_normal(n)
    v[rng.integers(1000, n, max(1, n // 5000))] *= 1.4  # a spike every ~5000 steps
    return v


def write_modded(path: Path, n: int) -> None:
    v = _loss(n, 0)
    with open(path, "w") as fh:
        for start in range(0, n, 100_000):
            fh.write("".join(f"step:{i}/{n} train_loss:{v[i]:.4f} train_time:{i * 95}ms step_avg:95.00ms\n"
                             for i in range(start, min(n, start + 100_000))))


def write_megatron(path: Path, n: int) -> None:
    v = _loss(n, 1)
    rng = np.random.default_rng(2)
    g = (0.3 + 1.0 * np.exp(-np.arange(n) / 5000)) * np.exp(0.1 * rng.standard_normal(n))  # log-normal noise
    g[rng.integers(1000, n, max(1, n // 2000))] *= 5
    with open(path, "w") as fh:
        for start in range(0, n, 100_000):
            parts = []
            for i in range(start, min(n, start + 100_000)):
                if i % 50 == 0:
                    parts.append(f"[default0]: [2024-01-01 00:00:00] saving checkpoint at iteration {i:8d}\n")
                    continue
                parts.append(
                    f"[default7]: iteration {i:8d}/ {n:8d} | consumed samples: {i * 2048:12d} | elapsed time per "
                    f"iteration (ms): 1234.5 | learning rate: 3.000E-04 | global batch size:  2048 | lm loss: "
                    f"{v[i]:.6E} | loss scale: 1.0 | grad norm: {g[i]:.3f} | number of skipped iterations:   0 | "
                    f"number of nan iterations:   0 |\n")
            fh.write("".join(parts))


def write_jsonl(path: Path, n: int) -> None:
    v = _loss(n, 3)
    with open(path, "w") as fh:
        for start in range(0, n, 100_000):
            fh.write("".join(
                f'{{"_step": {i}, "train/loss": {v[i]:.5f}, "train/grad_norm": {0.5 + v[i] / 10:.4f}, '
                f'"lr": 0.0003, "_runtime": {i * 0.1:.1f}, "_timestamp": {1.7e9 + i:.1f}}}\n'
                for i in range(start, min(n, start + 100_000))))


def write_modded_zst(path: Path, n: int) -> None:
    import zstandard

    tmp = path.with_suffix(".plain")
    write_modded(tmp, n)
    with open(tmp, "rb") as src, open(path, "wb") as dst:
        zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
    tmp.unlink()


WRITERS = {"modded-nanogpt": (write_modded, ".log"), "megatron": (write_megatron, ".log"),
           "jsonl": (write_jsonl, ".jsonl"), "modded-zst": (write_modded_zst, ".log.zst")}


_CHILD = textwrap.dedent("""
    import json, re, resource, sys, time
    path, mode, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "read_log":
        from spike_audit.pipelines.logs.read import read_log
    else:
        import zstandard
    def rss_kb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() // 1024
    base = rss_kb()
    best, out = float("inf"), {}
    for _ in range(repeat):
        t = time.perf_counter()
        if mode == "read_log":
            table, rep = read_log(path)
            out = {"lines": rep.n_lines, "values": table.num_rows, "metrics": rep.metrics}
        else:
            n = 0
            if path.endswith(".zst"):
                with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as r:
                    import io
                    for _line in io.BufferedReader(r):
                        n += 1
            else:
                with open(path, "rb") as fh:
                    for _line in fh:
                        n += 1
            out = {"lines": n}
        best = min(best, time.perf_counter() - t)
        table = rep = None
    with open("/proc/self/status") as f:  # VmHWM: this process image's peak (ru_maxrss survives exec)
        peak = int(re.search(r"VmHWM:\s*(\d+)", f.read()).group(1))
    out.update(seconds=best, peak_mb=max(0, peak - base) / 1024)
    print(json.dumps(out))
""")


def measure(path: Path, mode: str, repeat: int, pythonpath: str | None = None) -> dict:
    import os

    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    res = subprocess.run([sys.executable, "-c", _CHILD, str(path), mode, str(repeat)], capture_output=True,
                         text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--formats", default=",".join(WRITERS))
    ap.add_argument("--compare-with", metavar="DIR", help="also time read_log from the spike-audit installed in DIR")
    args = ap.parse_args(argv)
    from spike_audit.auditors.spikes import DetectorConfig, detect_table
    from spike_audit.pipelines.logs.read import read_log

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.formats.split(","):
            writer, suffix = WRITERS[name]
            path = Path(tmp) / f"{name}{suffix}"
            writer(path, args.lines)
            size = path.stat().st_size / 1e6
            runs = [("plain", "plain", None), ("read_log", "read_log", None)]
            if args.compare_with:
                runs.insert(1, ("read_log", "read_log@" + Path(args.compare_with).name, args.compare_with))
            for mode, label, pp in runs:
                m = measure(path, mode, args.repeat, pp)
                extra = f", {m['values']:>9,d} values" if "values" in m else ""
                print(f"{name:15s} {label:9s} {m['lines']:>9,d} lines ({size:6.1f} MB){extra}: "
                      f"{m['seconds']:6.3f}s ({m['lines'] / m['seconds'] / 1e6:5.2f} M lines/s, "
                      f"{size / m['seconds']:6.1f} MB/s), peak +{m['peak_mb']:7.1f} MB "
                      f"({m['peak_mb'] / size:4.1f}x the file)", flush=True)
            table, report = read_log(path)
            t_det, spikes = best_of(lambda: detect_table(table, DetectorConfig()), args.repeat)
            print(f"{name:15s} detect    (robust, {', '.join(report.metrics)}) {t_det:6.3f}s "
                  f"({table.num_rows / t_det / 1e6:5.2f} M values/s), {spikes.num_rows} events", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
