"""Options every command spells the same way, and the settings of a command built from its config dataclass.

* ``--tokens-column`` / ``--text-column`` everywhere (``--tokens-col`` / ``--text-col`` stay as hidden aliases);
  the log reader's options (``--format``, ``--step-key``, ``--value-key``, ``--tag``, ``--pattern``,
  ``--strict``) are the same in ``spikes`` and ``run``; ``--json`` prints the machine-readable result on stdout;
  ``--config FILE`` reads settings from a TOML (or JSON) file, flags override it.
* Options that set a config field default to ``argparse.SUPPRESS``: only what the user gave reaches
  :func:`settings_from_args`, which builds the dataclass from its own defaults, then the config file, then the
  flags (:func:`spike_audit.pipelines.settings.make_config`); so the command line and the Python API share one
  set of defaults, shown in ``--help`` from the dataclass itself.
"""

from __future__ import annotations

import argparse
import dataclasses

S = argparse.SUPPRESS


def default_of(cls, name: str):
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def opt(p, *flags, cls, dest: str, help: str, **kw):  # noqa: A002
    """An option that sets ``cls.dest``; its help shows the dataclass default."""
    d = default_of(cls, dest)
    shown = "" if d is None or kw.get("action") == "store_true" or d is dataclasses.MISSING else f" (default {d})"
    return p.add_argument(*flags, dest=dest, default=S, help=help + shown, **kw)


def add_config(p) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help="settings from a TOML (or JSON) file: keys are the long option names or the fields, at the "
                        "top level or under [COMMAND]; Beam options as beam = [...]; flags override the file")


def add_json(p, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout (instead of the table)")


def add_columns(p, cls) -> None:
    opt(p, "--tokens-column", cls=cls, dest="tokens_col", help="token-id column of Parquet/JSONL/HF shards")
    p.add_argument("--tokens-col", dest="tokens_col", default=S, help=S)
    opt(p, "--text-column", cls=cls, dest="text_col", help="text column of Parquet/JSONL/HF shards")
    p.add_argument("--text-col", dest="text_col", default=S, help=S)


def add_log_reading(p, cls, *, format_dest: str = "log_format", metric_help: str | None = None) -> None:
    from spike_audit.pipelines.logs.lines import FORMATS

    opt(p, "--format", cls=cls, dest=format_dest, choices=FORMATS, help="log format (default: detected)")
    opt(p, "--step-key", cls=cls, dest="step_key", help="JSONL/CSV key holding the step")
    opt(p, "--value-key", cls=cls, dest="value_key", help="JSONL/CSV key holding the loss")
    opt(p, "--tag", cls=cls, dest="tag", help="TensorBoard scalar tag (default: a tag containing 'loss')")
    opt(p, "--pattern", cls=cls, dest="pattern",
        help="regex with named groups (?P<step>..) and (?P<value>..) for any text log")
    opt(p, "--strict", cls=cls, dest="strict", action="store_true", help="fail on the first malformed log line")


def settings_from_args(args, cls, section: str, *, required: tuple[str, ...] = (), extra: dict | None = None):
    """(config, Beam options): ``cls`` from its defaults, ``--config`` and the flags given (in that order)."""
    from spike_audit.pipelines.settings import make_config

    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    given.update(extra or {})
    cfg, beam = make_config(cls, file=getattr(args, "config", None), section=section, overrides=given,
                            required=required)
    return cfg, list(beam) + list(getattr(args, "extra", []) or [])
