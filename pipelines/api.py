"""The Python API, for notebooks and orchestrators (Airflow, Dagster, ...): the same work and the same defaults
as the command line, which is built on the same config dataclasses (:class:`RunConfig` for ``run``,
:class:`ShardAuditConfig` for ``shards``).

    from spike_audit.pipelines import api

    loss, report = api.read_log("train.log")                 # LOSS_SERIES table + parse report
    spikes = api.detect_spikes(loss)                         # SPIKES table
    res = api.audit_run(log="train.log", manifest="manifest.parquet", shards="shards/", out="audit/")
    res.tables["verdicts"]                                   # pyarrow Tables, as written
    res = api.audit_shards(["shards/"], out="shard-audit/")
    api.audit_shards("trusted/", out="a/", save_baseline="baseline/")  # a saved baseline (TFDV-style) ...
    res = api.audit_shards("new/", out="b/", baseline="baseline/")      # ... new shards judged against it
    res = api.audit_run(log="train.log", manifest="manifest.parquet", shards="shards/", out="audit/",
                        state="state/")                       # scheduled: the state keeps the controls' scores
    res.summary["read"]                                       # what this run read (slices, rows, controls_from_state)
    tables = api.load_results("audit/")                      # every table of an output, + its JSON files
    cfg = api.load_config("audit/config.toml", "run")        # the settings an output was made with

Every function takes keyword settings named as the dataclass fields (or a ``config=`` dataclass, or
``config_file=`` a TOML file, overridden by the keywords), raises :class:`UserError` (one line, no traceback
needed) for a user's mistake, logs through :mod:`logging` (progress lines on ``spike_audit.progress``) and
prints nothing. Beam options go in ``beam_args`` (default: the in-process runner).

May import: the pipelines (``run``, ``shard_audit``), readers, auditors and schemas; never the command line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.run.plan import RunConfig
from spike_audit.pipelines.shard_audit.config import ShardAuditConfig

__all__ = ["RunConfig", "ShardAuditConfig", "UserError", "read_log", "detect_spikes", "align_spikes",
           "audit_run", "plan_run", "audit_shards", "plan_shards", "load_results", "load_config"]


def read_log(path, **options) -> tuple[pa.Table, object]:
    """One training log (file, TensorBoard logdir or URL) -> (``LOSS_SERIES`` table, parse report). Options as
    ``spike-audit spikes``: ``format``, ``metric``, ``step_key``, ``value_key``, ``tag``, ``pattern``, ``strict``."""
    from spike_audit.pipelines.logs.read import read_log as _read_log

    return _read_log(path, **options)


def detect_spikes(loss, *, method: str = "robust", metrics: tuple[str, ...] | None = None, **detector) -> pa.Table:
    """``SPIKES`` of a ``LOSS_SERIES`` table (or of a log path, read with :func:`read_log`'s defaults), per run
    and metric (default: ``train_loss`` and ``grad_norm``). ``detector``: ``k``, ``window``, ... of
    :class:`spike_audit.auditors.spikes.DetectorConfig`."""
    from spike_audit.auditors.spikes import DetectorConfig, detect_table

    if not isinstance(loss, pa.Table):
        loss, _ = read_log(loss)
    try:
        cfg = DetectorConfig(method=method, **detector)
    except (TypeError, ValueError) as err:
        raise UserError(f"detect_spikes: {err}") from None
    return detect_table(loss, cfg, metrics=tuple(metrics or ("train_loss", "grad_norm")))


def align_spikes(spikes: pa.Table, tolerance: int = 0, min_runs: int = 2, metric: str = "train_loss") -> pa.Table:
    """``ALIGNED_SPIKES``: the steps where at least ``min_runs`` runs spike together."""
    from spike_audit.auditors.spikes import align

    return align(spikes, tolerance=tolerance, min_runs=min_runs, metric=metric)


def _config(cls, section: str, config, config_file, settings: dict, required: tuple[str, ...]):
    from spike_audit.pipelines.settings import make_config, normalise_keys

    if config is not None:
        if not isinstance(config, cls):
            raise UserError(f"config: expected a {cls.__name__}, got {type(config).__name__}")
        base = {k: v for k, v in dataclasses.asdict(config).items()}
        cfg, beam = make_config(cls, file=config_file, section=section, overrides={**base, **normalise_keys(
            cls, settings, "keyword arguments")}, required=required)
        return cfg, beam
    return make_config(cls, file=config_file, section=section,
                       overrides=normalise_keys(cls, settings, "keyword arguments"), required=required)


def audit_run(config: RunConfig | None = None, *, config_file: str | None = None,
              beam_args: list[str] | None = None, **settings):
    """``spike-audit run``: audit a run's spikes; returns a ``RunResult`` (``.tables``: verdicts, batch_scores,
    shard_scores, row_flags; ``.summary``; ``.out``). Required: ``log``, ``manifest``, ``shards``, ``out``."""
    from spike_audit.pipelines.run.audit import run_audit

    cfg, beam = _config(RunConfig, "run", config, config_file, settings, ("log", "manifest", "shards", "out"))
    return run_audit(cfg, beam_args=list(beam) + list(beam_args or []))


def plan_run(config: RunConfig | None = None, *, config_file: str | None = None, **settings) -> dict:
    """``spike-audit run --dry-run``: the plan (spikes, windows, controls, what would be read), no shard data."""
    from spike_audit.pipelines.run.audit import plan_run as _plan

    cfg, _ = _config(RunConfig, "run", config, config_file, {"out": "-", **settings},
                     ("log", "manifest", "shards"))
    return _plan(cfg)


def audit_shards(inputs=None, config: ShardAuditConfig | None = None, *, config_file: str | None = None,
                 beam_args: list[str] | None = None, **settings):
    """``spike-audit shards``: rank shards, find cross-shard duplicates; returns a ``ShardAuditResult``
    (``.tables``: shard_scores, duplicates). ``inputs``: a path or a list of files, directories, globs or URLs."""
    from spike_audit.pipelines.shard_audit.audit import run_shard_audit

    if inputs is not None:
        settings["inputs"] = (inputs,) if isinstance(inputs, (str, Path)) else tuple(map(str, inputs))
    cfg, beam = _config(ShardAuditConfig, "shards", config, config_file, settings, ("inputs", "out"))
    return run_shard_audit(cfg, beam_args=list(beam) + list(beam_args or []))


def plan_shards(inputs=None, *, config_file: str | None = None, **settings) -> dict:
    """``spike-audit shards --dry-run``: the shards found and what would be read, without opening any."""
    from spike_audit.pipelines.shard_audit.audit import plan_shard_audit

    if inputs is not None:
        settings["inputs"] = (inputs,) if isinstance(inputs, (str, Path)) else tuple(map(str, inputs))
    cfg, _ = _config(ShardAuditConfig, "shards", None, config_file, {"out": "-", **settings}, ("inputs",))
    return plan_shard_audit(cfg)


def load_results(out) -> dict:
    """Every table of an output directory (``run``, ``shards`` or ``spikes --out``; local or URL) as pyarrow
    Tables keyed by name (``verdicts``, ``shard_scores``, ...), and its JSON files (``summary``, ``skip_list``,
    ``quarantine``, ``metadata``) as dicts. Refuses an output without its completion marker (incomplete or
    still being written) when the output has metadata, i.e. was written by a version that writes the marker."""
    import pyarrow.parquet as pq

    from spike_audit.pipelines import fs
    from spike_audit.pipelines.settings import DONE_MARKER, METADATA_FILE

    out = str(out)
    if not fs.isdir(out):
        raise UserError(f"{out}: no such output directory")
    names = fs.list_dir(out)  # top level only: a local output's files are links to its current version
    if METADATA_FILE in names and DONE_MARKER not in names:
        raise UserError(f"{out}: incomplete output (no {DONE_MARKER} marker: the run failed or is still writing)")
    res: dict = {}
    for name, path in sorted(names.items()):
        if name.startswith("."):
            continue
        if name.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                res[name[: -len(".parquet")]] = pq.read_table(f)
        elif name.endswith(".json") or name == DONE_MARKER:
            try:
                res[name[: -len(".json")] if name.endswith(".json") else "completion"] = json.loads(fs.read_bytes(path))
            except ValueError as err:
                raise UserError(f"{path}: not valid JSON ({err})") from None
    if not any(isinstance(v, pa.Table) for v in res.values()):
        raise UserError(f"{out}: holds no spike-audit tables")
    return res


def load_config(path, command: str):
    """The settings in a config file (e.g. an output's ``config.toml``) as the command's dataclass; with the
    required fields missing from the file, the fields' placeholders are empty strings."""
    from spike_audit.pipelines.settings import make_config

    cls = {"run": RunConfig, "shards": ShardAuditConfig}.get(command)
    if cls is None:
        raise UserError(f"load_config: command must be 'run' or 'shards', got {command!r}")
    fill = {"run": {"log": "", "manifest": "", "shards": "", "out": ""}, "shards": {"inputs": (), "out": ""}}[command]
    from spike_audit.pipelines.settings import read_config_file, normalise_keys

    raw, _ = read_config_file(str(path), command)
    given = normalise_keys(cls, raw, str(path))
    cfg, _ = make_config(cls, section=command, overrides={**fill, **given})
    return cfg

