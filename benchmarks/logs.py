"""Benchmark: parse and spike-detect 1M-line training logs.

    python benchmarks/logs.py [--lines 1000000] [--repeat 3]

Writes a modded-nanogpt-style log and a Megatron-LM log (rank prefixes, interleaved unrelated lines)
into a temporary directory, then times ``read_log`` and ``detect_table`` (best of ``--repeat``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spike_audit.auditors.spikes import DetectorConfig, detect_table  # noqa: E402
from spike_audit.pipelines.logs.read import read_log  # noqa: E402


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
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for name, writer in (("modded-nanogpt", write_modded), ("megatron", write_megatron)):
            path = Path(tmp) / f"{name}.log"
            writer(path, args.lines)
            size = path.stat().st_size
            t_parse, (table, report) = best_of(lambda: read_log(path), args.repeat)
            t_det, spikes = best_of(lambda: detect_table(table, DetectorConfig()), args.repeat)
            print(f"{name:15s} {report.n_lines:>9,d} lines ({size / 1e6:6.1f} MB), {table.num_rows:>9,d} values: "
                  f"parse {t_parse:6.3f}s ({report.n_lines / t_parse / 1e6:5.2f} M lines/s, "
                  f"{size / t_parse / 1e6:6.1f} MB/s); detect (robust, {', '.join(report.metrics)}) "
                  f"{t_det:6.3f}s ({table.num_rows / t_det / 1e6:5.2f} M values/s), {spikes.num_rows} events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
