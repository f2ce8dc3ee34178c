"""A command's settings as one frozen dataclass, shared by the command line and the Python API: built from the
dataclass defaults, then a config file (TOML or JSON), then explicit overrides (flags or keyword arguments), in
that order; and the run metadata every output saves beside its tables (the effective settings, the tool
version, the inputs' fingerprints).

Config files: keys are the dataclass field names or the long option names (``--tokens-column`` ->
``tokens_column``, ``--controls`` -> ``controls``); a file may hold the keys at the top level or in a table named
after the command (``[run]``, ``[shards]``), and Beam options in ``beam = ["--runner=DaskRunner"]``. An unknown
key, a wrong type or an unreadable file is a one-line :class:`UserError` naming the file and the key.

May import: :mod:`spike_audit.pipelines.errors` (the io/errors layer).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path

from spike_audit.pipelines.errors import UserError

#: Long option names (without ``--``, dashes as underscores) that differ from the dataclass field they set.
KEY_ALIASES = {
    "tokens_column": "tokens_col",
    "text_column": "text_col",
    "tokens_col": "tokens_col",
    "text_col": "text_col",
    "controls": "n_controls",
    "format": "log_format",
}

METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.toml"
DONE_MARKER = "_SUCCESS"


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("spike-audit")
    except Exception:  # running from a checkout that is not installed
        return "unknown"


def _load_toml(text: str, path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not a valid TOML config file ({err})") from None


def read_config_file(path: str, section: str) -> tuple[dict, list[str]]:
    """(settings, beam options) from a TOML (or ``.json``) config file: the keys at the top level, then those
    of the ``[section]`` table over them; other commands' tables are ignored."""
    from spike_audit.pipelines import fs

    try:
        text = fs.read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: config file is not UTF-8 text") from None
    text = text.removeprefix("\ufeff")  # a UTF-8 BOM (editors on Windows write one): not part of the TOML or JSON
    if str(path).lower().endswith(".json"):
        try:
            doc = json.loads(text)
        except ValueError as err:
            raise UserError(f"{path}: not a valid JSON config file ({err})") from None
        if not isinstance(doc, dict):
            raise UserError(f"{path}: expected a JSON object of settings")
    else:
        doc = _load_toml(text, path)
    out = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    sec = doc.get(section)
    if sec is not None:
        if not isinstance(sec, dict):
            raise UserError(f"{path}: [{section}] must be a table of settings")
        out.update(sec)
    beam = out.pop("beam", [])
    if isinstance(beam, str):
        beam = beam.split()
    if not isinstance(beam, list) or not all(isinstance(b, str) for b in beam):
        raise UserError(f"{path}: 'beam' must be a list of Beam options, e.g. beam = [\"--runner=DaskRunner\"]")
    return out, beam


def _field_types(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value, hint, key: str, source: str):
    """``value`` as the field's type (int/float/str/bool, optional, tuple of str); UserError otherwise."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else hint
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{source}: {key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, os.PathLike)):
            raise UserError(f"{source}: {key}: expected a string, got {value!r}")
        return str(value)
    return value


def normalise_keys(cls, values: dict, source: str) -> dict:
    """Config-file keys (field names or long option names) -> field names; UserError for an unknown key."""
    fields = _field_types(cls)
    out = {}
    for key, value in values.items():
        k = str(key).replace("-", "_")
        name = k if k in fields else KEY_ALIASES.get(k)
        if name not in fields:
            raise UserError(f"{source}: unknown setting {key!r} (expected one of {', '.join(sorted(fields))})")
        out[name] = _coerce(value, fields[name], str(key), source)
    return out


def make_config(cls, *, file: str | None = None, section: str, overrides: dict | None = None,
                required: tuple[str, ...] = ()):
    """``cls`` from its defaults, then ``file`` (a config file), then ``overrides`` (field name -> value; ``None``
    values in ``overrides`` are left out only for fields whose default is not None... they are kept: pass only
    what was given). Returns (config, beam options from the file)."""
    values: dict = {}
    beam: list[str] = []
    if file:
        raw, beam = read_config_file(file, section)
        values.update(normalise_keys(cls, raw, file))
    values.update(overrides or {})
    missing = [f for f in required if values.get(f) in (None, "", ())]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise UserError(f"missing {flags} (give the option, or set it in a --config file)")
    try:
        cfg = cls(**values)
    except TypeError as err:
        raise UserError(f"{cls.__name__}: {err}") from None
    check_values(cfg, file, set(values) - set(overrides or {}) if file else set())
    return cfg, beam


#: Numeric settings and the values they accept: (low, high, low inclusive, high inclusive); None is unbounded.
RANGES = {
    "alpha": (0.0, 1.0, False, False),
    "n_controls": (0, None, True, None),
    "p_resolution": (1, None, True, None),
    "min_controls": (1, None, True, None),
    "lookback": (0, None, True, None),
    "guard": (0, None, True, None),
    "merge_gap": (0, None, True, None),
    "max_window": (1, None, True, None),
    "min_rows": (1, None, True, None),
    "max_row_flags": (0, None, True, None),
    "threshold": (0.0, 1.0, False, True),
    "batch_rows": (1, None, True, None),
    "buckets": (1, None, True, None),
    "max_group": (2, None, True, None),
    "cc_iterations": (1, None, True, None),
    "seq_len": (1, None, True, None),
    "vocab_size": (1, None, True, None),
    "seed": (0, 2 ** 64 - 1, True, True),  # numpy's seed must be non-negative (--seed -1 was a traceback)
    "eos_id": (0, 2 ** 24 - 1, True, True),  # a token id (pipelines.shards.slices.MAX_TOKEN_ID)
    "pad_id": (0, 2 ** 24 - 1, True, True),
    "step_offset": (-(2 ** 62), 2 ** 62, True, True),  # a huge one overflowed int64 (a traceback)
    "row_losses_first_step": (0, None, True, None),
}


#: Settings that take one of a few names (the command line's ``choices``; a config file is checked against the same).
CHOICES = {
    "method": ("robust", "olmo", "metaseq"),
    "dup_reference": ("manifest", "none"),
    "loss_baseline": ("auto", "preceding", "controls"),
}


def check_values(cfg, source: str | None = None, from_source: set | frozenset = frozenset()) -> None:
    """A one-line :class:`UserError` for a numeric setting outside the values it accepts (``--alpha 0``,
    ``--max-window 0``, ``--controls -3``), naming the option (and ``source``, the config file, for the fields
    in ``from_source``)."""
    for name, (lo, hi, lo_in, hi_in) in RANGES.items():
        v = getattr(cfg, name, None)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        bad = v != v or (lo is not None and (v < lo if lo_in else v <= lo)) or (
            hi is not None and (v > hi if hi_in else v >= hi))
        if bad:
            want = " and ".join(w for w in (
                None if lo is None else (f">= {lo}" if lo_in else f"> {lo}"),
                None if hi is None else (f"<= {hi}" if hi_in else f"< {hi}")) if w)
            flag = "--" + {"n_controls": "controls", "tokens_col": "tokens-column"}.get(name, name).replace("_", "-")
            where = f"{source}: " if source and name in from_source else ""
            raise UserError(f"{where}{flag} must be {want}, got {v!r}")
    for name, allowed in CHOICES.items():
        v = getattr(cfg, name, None)
        if v is not None and v not in allowed:  # (a config file's method = "x" was a ValueError traceback)
            where = f"{source}: " if source and name in from_source else ""
            raise UserError(f"{where}--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {v!r}")
    dt = getattr(cfg, "dtype", None)
    if isinstance(dt, str):  # a token dtype: --dtype float32 or garbage was taken silently
        if not is_integer_dtype(dt):
            where = f"{source}: " if source and "dtype" in from_source else ""
            raise UserError(f"{where}--dtype must be an integer token dtype (uint16, uint32, int32, ...), got {dt!r}")


def config_dict(cfg) -> dict:
    """The effective settings as plain JSON/TOML values (tuples become lists)."""
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    # a JSON string is a TOML basic string, but for DEL (TOML forbids it raw) and the C1 controls, escaped here too
    return json.dumps(str(v), ensure_ascii=False).translate(_TOML_RAW)


_TOML_RAW = {c: f"\\u{c:04x}" for c in (0x7F, *range(0x80, 0xA0))}


def to_toml(section: str, settings: dict, beam: list[str] | None = None, comment: str = "") -> str:
    """A config file ``--config`` reads back: ``[section]`` with every set value (None left out)."""
    lines = [f"# {comment}"] if comment else []
    if beam:
        lines.append(f"beam = {_toml_value(beam)}")
    lines.append(f"[{section}]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in sorted(settings.items()) if v is not None]
    return "\n".join(lines) + "\n"


def fingerprint(path: str, what: str) -> dict:
    """An input's identity: path, size and modification time (a directory: its files summed, newest mtime)."""
    from spike_audit.pipelines import fs

    rec = {"what": what, "path": str(path)}
    try:
        size, mtime = fs.stat_tree(str(path))
    except (OSError, UserError):
        return dict(rec, size=None, mtime=None)
    return dict(rec, size=int(size), mtime=float(mtime))


#: Fields a command derives from the others (resolved, not given): not saved as settings.
DERIVED = ("flat_rows", "tokenizer_special")

#: Settings that are paths: saved absolute (a saved config must name the same inputs from any directory).
PATH_FIELDS = ("log", "manifest", "shards", "state", "tokenizer", "baseline", "save_baseline", "inputs", "root",
               "row_losses")


def _abs(key: str, value):
    if key not in PATH_FIELDS or value in (None, ""):
        return value
    if isinstance(value, list):
        return [_abs(key, v) for v in value]
    v = str(value)
    return v if "://" in v else os.path.abspath(v)


def run_metadata(command: str, cfg, inputs: list[tuple[str, str]], beam: list[str] | None = None,
                 drop: tuple[str, ...] = ("out", "state")) -> dict:
    """What a ``metadata.json`` holds: the tool and version, the command, its effective settings (without
    ``drop``: where the output and the state are written does not change what is computed; a run from state
    writes the same files as a full run) and the inputs' fingerprints. Nothing in it depends on
    the time, so reruns over the same inputs write identical files (the time is in the completion marker)."""
    settings = {k: _abs(k, v) for k, v in config_dict(cfg).items() if k not in drop and k not in DERIVED}
    return {"tool": "spike-audit", "version": tool_version(), "command": command, "settings": settings,
            "beam_options": [b for b in (beam or []) if not b.startswith("--dask_client_address")],
            "inputs": [fingerprint(_abs("log", p), w) for w, p in inputs if p]}


def write_run_metadata(stage: Path, command: str, cfg, inputs: list[tuple[str, str]],
                       beam: list[str] | None = None, drop: tuple[str, ...] = ("out", "state")) -> None:
    """``metadata.json`` and ``config.toml`` (the effective settings, reusable with ``--config``) into ``stage``."""
    from spike_audit.pipelines.io import write_json, write_text

    meta = run_metadata(command, cfg, inputs, beam, drop)
    write_json(meta, Path(stage) / METADATA_FILE)
    write_text(to_toml(command, meta["settings"], comment=f"spike-audit {meta['version']} {command}: effective "
                       "settings of this output (spike-audit " + command + " --config this-file)"),
               Path(stage) / CONFIG_FILE)


def write_done_marker(stage: Path, seconds: float | None = None) -> None:
    """The completion marker, written last: the names and sizes of every file of the output, and when."""
    import datetime

    from spike_audit.pipelines.io import write_json

    stage = Path(stage)
    files = {p.relative_to(stage).as_posix(): p.stat().st_size for p in sorted(stage.rglob("*"))
             if p.is_file() and p.name != DONE_MARKER}
    write_json({"completed": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(seconds, 3) if seconds is not None else None, "files": files},
               stage / DONE_MARKER)


def is_integer_dtype(dt) -> bool:
    """Whether ``dt`` (a user's ``--dtype`` or a manifest's ``token_dtype``) names a NumPy integer dtype; a name NumPy
    cannot parse (``abc``, ``1e-320``, ``u2,``) is False, never an exception."""
    import numpy as np

    if not isinstance(dt, str):
        return False
    try:
        return np.dtype(dt).kind in "iu"
    except (TypeError, ValueError, SyntaxError):
        return False
