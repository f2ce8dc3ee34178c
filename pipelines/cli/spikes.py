"""``spike-audit spikes LOG...``: read training logs, find loss / grad-norm spikes, align them across runs.

Prints the parse report and a table of spike events per run (and, with several runs, the steps at
which several runs spike together), or a JSON document with ``--json``. ``--out DIR`` also writes
``spikes.parquet``, ``loss_series.parquet`` and, with several runs, ``aligned_spikes.parquet``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from spike_audit.pipelines.cli.terminal import one_line_text

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from spike_audit.pipelines.logs.lines import FORMATS
    from spike_audit.pipelines.settings import CHOICES

    p = subparsers.add_parser(
        "spikes",
        help="find loss spikes in training logs (and the steps where several runs spike together)",
        description="Read one or more training logs, detect loss (and grad-norm) spikes, and align "
        "spikes across runs that share a data order.",
    )
    p.add_argument("logs", nargs="+", metavar="LOG", help="training log(s): text, JSONL, CSV, JSON, TensorBoard")
    p.add_argument("--format", choices=FORMATS, help="log format (default: detected from the content)")
    p.add_argument("--metric", help="metric to analyse (default: train_loss and grad_norm); also the name "
                   "given to values read with --pattern/--value-key/--tag")
    p.add_argument("--pattern", help="regex with named groups (?P<step>..) and (?P<value>..) for any text log")
    p.add_argument("--step-key", help="JSONL/CSV key holding the step")
    p.add_argument("--value-key", help="JSONL/CSV key holding the loss")
    p.add_argument("--tag", help="TensorBoard scalar tag (default: a tag containing 'loss')")
    p.add_argument("--method", choices=CHOICES["method"], default="robust",
                   help="spike rule (default: robust trailing median/MAD)")
    p.add_argument("--k", type=float, default=None, help="robust: threshold in MAD-sigmas (default 6)")
    p.add_argument("--window", type=int, default=None, help="robust: trailing window in logged values (default 64, at least 8)")
    p.add_argument("--strict", action="store_true", help="fail on the first malformed line")
    p.add_argument("--align-tolerance", type=int, default=0, metavar="N",
                   help="peaks within N steps count as the same step across runs (default 0)")
    p.add_argument("--out", metavar="DIR", help="write spikes.parquet (and loss_series, aligned) here")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of tables")
    p.set_defaults(func=run)


def _clean(obj):
    """JSON-safe: non-finite floats become the strings 'nan' / 'inf' / '-inf'."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if obj != obj else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _fmt(v, nd=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{nd}g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.{nd}f}".rstrip("0").rstrip(".")
    return str(v)


def _table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    cells = [[h for _, h in cols]] + [[one_line_text(_fmt(r.get(k))) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


SPIKE_COLS = [("metric", "metric"), ("kind", "kind"), ("start_step", "start"), ("peak_step", "peak"),
              ("end_step", "end"), ("peak_value", "peak_value"), ("baseline_value", "baseline"),
              ("severity", "severity"), ("recovery_steps", "recovery")]


def run(args) -> int:
    import pyarrow as pa

    from spike_audit.auditors.spikes import DetectorConfig, align, detect_table
    from spike_audit.pipelines.io import write_table
    from spike_audit.pipelines.logs.read import read_log
    from spike_audit.schemas import ALIGNED_SPIKES, LOSS_SERIES, SPIKES

    if args.align_tolerance < 0:
        from spike_audit.pipelines.errors import UserError

        raise UserError(f"--align-tolerance must be >= 0, got {args.align_tolerance}")
    cfg_kw = {"method": args.method}
    if args.k is not None:
        cfg_kw["k"] = args.k
    if args.window is not None:
        if args.window < 8:  # a median and MAD of 1-7 values are ~0: ordinary noise is flagged (73 events for 4)
            from spike_audit.pipelines.errors import UserError

            raise UserError(f"--window {args.window}: expected at least 8 logged values (the robust level and scale "
                            f"of fewer flag ordinary noise as spikes)")
        cfg_kw["window"] = args.window
        cfg_kw["min_window"] = min(16, args.window)
    try:
        config = DetectorConfig(**cfg_kw)
    except ValueError as err:
        from spike_audit.pipelines.errors import UserError

        raise UserError(f"--method/--k/--window: {err}") from None

    tables, reports = [], []
    seen_runs: dict[str, str] = {}
    for i, path in enumerate(args.logs):
        table, report = read_log(path, format=args.format, metric=args.metric, step_key=args.step_key,
                                 value_key=args.value_key, pattern=args.pattern, tag=args.tag, strict=args.strict)
        if report.run in seen_runs:  # two logs with the same file stem: keep them apart
            new = f"{report.run}#{i}"
            renamed = pa.array([r.replace(report.run, new, 1) for r in table.column("run").to_pylist()], pa.string())
            table = LOSS_SERIES.conform(table.set_column(0, "run", renamed))
            report.runs = [r.replace(report.run, new, 1) for r in report.runs]
            report.run = new
        seen_runs[report.run] = path
        tables.append(table)
        reports.append(report)
    loss = pa.concat_tables(tables)
    metrics = (args.metric,) if args.metric else ("train_loss", "grad_norm")
    found = sorted(set(loss.column("metric").to_pylist()))
    if not set(metrics) & set(found):  # nothing to detect on: an error, not "0 spike events"
        from spike_audit.pipelines.errors import UserError

        what = repr(args.metric) if args.metric else "train_loss or grad_norm"
        raise UserError(f"{args.logs[0] if len(args.logs) == 1 else 'the logs'}: no {what} values (metrics found: "
                        f"{', '.join(found) or 'none'}); name one with --metric")
    spikes = detect_table(loss, config, metrics=metrics)
    runs = sorted(set(loss.column("run").to_pylist()))
    aligned = None
    if len(runs) > 1:
        aligned = align(spikes, tolerance=args.align_tolerance, min_runs=2, metric=metrics[0])

    if args.out:
        from spike_audit.pipelines.outdir import OutDir, os_error

        with OutDir(args.out, "spikes", [("log", p) for p in args.logs]) as out:
            files = out.stage() / "files"
            try:
                files.mkdir()
                write_table(loss, files / "loss_series.parquet", LOSS_SERIES)
                write_table(spikes, files / "spikes.parquet", SPIKES)
                if aligned is not None:
                    write_table(aligned, files / "aligned_spikes.parquet", ALIGNED_SPIKES)
            except OSError as err:
                raise os_error(args.out, err, "cannot write the new output (the previous output is intact)") \
                    from None
            out.publish(files)

    spike_rows = spikes.to_pylist()
    if args.json:
        doc = {"config": config.to_dict(), "logs": [r.to_dict() for r in reports], "spikes": spike_rows,
               "aligned_spikes": aligned.to_pylist() if aligned is not None else None}
        json.dump(_clean(doc), sys.stdout, indent=2, sort_keys=True, allow_nan=False)
        sys.stdout.write("\n")
        return 0

    out = []
    for rep in reports:
        out.append(one_line_text(rep.summary()))
    for r in runs:
        rows = [s for s in spike_rows if s["run"] == r]
        out.append("")
        out.append(f"run {one_line_text(r)}: {len(rows)} spike event(s) [{config.method}]")
        if rows:
            out.append(_table(rows, SPIKE_COLS))
    if aligned is not None:
        arows = aligned.to_pylist()
        out.append("")
        out.append(f"aligned spikes on {metrics[0]} (>= 2 of {len(runs)} runs, tolerance {args.align_tolerance}): "
                   f"{len(arows)}")
        for a in arows:
            out.append(f"  step {a['step']}: {a['n_runs']} runs: " +
                       ", ".join(f"{one_line_text(r)}@{p}" if p != a["step"] else one_line_text(r)
                                 for r, p in zip(a["runs"], a["peak_steps"])))
    if args.out:
        out.append("")
        out.append(f"wrote {one_line_text(args.out)}/")
    print("\n".join(out))
    return 0
