"""Logs that hold several runs side by side, split into one log per run before parsing, so each comes out as its
own run (never merged, never taken for a resume):

* a TensorBoard logdir whose event files sit in several directories (``logdir/run-a/events...``,
  ``logdir/run-b/events...``): one run per directory, named by its path relative to the logdir (files directly in
  the logdir are the run named after the logdir), as TensorBoard itself names runs;
* a W&B CSV export of several runs (``Step,run-a - train/loss,run-a - train/loss__MIN,...,run-b - train/loss``):
  one run per column prefix, its columns with the prefix removed.

Each part is written to a temporary directory (event files linked, CSV columns selected with Arrow) and read by
the ordinary reader; :func:`split_runs` yields ``(run name, path)`` pairs, or nothing for a single-run log.

May import: :mod:`spike_audit.pipelines.errors`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

from spike_audit.pipelines.errors import UserError


def _tb_groups(path: Path) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and "tfevents" in p.name):
        rel = f.parent.relative_to(path).as_posix()
        groups.setdefault(rel, []).append(f)
    return groups


def _csv_prefixes(header: list[str]) -> list[str]:
    return sorted({c.split(" - ", 1)[0] for c in header if " - " in c})


@contextlib.contextmanager
def split_runs(path: Path, fmt: str, run: str):
    """``[(run name, local path of that run's log)]`` when ``path`` holds several runs, else ``[]``."""
    tmp = None
    try:
        parts: list[tuple[str, str]] = []
        if fmt == "tensorboard" and path.is_dir():
            groups = _tb_groups(path)
            if len(groups) > 1:
                tmp = tempfile.mkdtemp(prefix=".spike-audit-runs-")
                for k, (rel, files) in enumerate(sorted(groups.items())):
                    d = Path(tmp) / f"run{k}"
                    d.mkdir()
                    for f in files:
                        os.symlink(f.resolve(), d / f.name)
                    parts.append((run if rel == "." else rel, str(d)))
        elif fmt == "csv" and path.is_file():
            parts, tmp = _split_csv(path)
        yield parts
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _split_csv(path: Path):
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from spike_audit.pipelines.files import open_decompressed
    from spike_audit.pipelines.logs.lines import decode_text, read_head

    head = decode_text(read_head(path, 1 << 20))
    try:
        header = pcsv.read_csv(io.BytesIO(head.split(b"\n", 1)[0] + b"\n")).column_names
    except pa.ArrowInvalid:
        return [], None
    prefixes = _csv_prefixes(header)
    if len(prefixes) < 2:
        return [], None
    with open_decompressed(path, "log") as f:  # a multi-run export is split whole (exports are small)
        raw = decode_text(f.read())
    try:
        table = pcsv.read_csv(io.BytesIO(raw), convert_options=pcsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=True, null_values=[""]))
    except pa.ArrowInvalid as err:
        raise UserError(f"{path}: not a readable CSV file: {str(err).splitlines()[0]}") from None
    shared = [c for c in header if " - " not in c]
    tmp = tempfile.mkdtemp(prefix=".spike-audit-runs-")
    parts = []
    for k, prefix in enumerate(prefixes):
        own = [c for c in header if c.startswith(prefix + " - ")]
        sub = table.select(shared + own).rename_columns(shared + [c[len(prefix) + 3:] for c in own])
        # every row is kept (a row where this run logged nothing is ignored by the reader), so line numbers
        # stay those of the export
        dest = Path(tmp) / f"run{k}.csv"
        pcsv.write_csv(sub, dest, pcsv.WriteOptions(quoting_style="needed"))
        parts.append((prefix, str(dest)))
    return parts, tmp
