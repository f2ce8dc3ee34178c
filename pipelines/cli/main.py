"""``spike-audit``: the parser, logging set-up and error handling shared by every command.

Each subcommand lives in its own module ``pipelines/cli/<name>.py`` exposing
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args and
returning an exit code). Heavy imports (Beam) happen inside ``func`` so ``--help`` stays fast.
A :class:`~pipelines.errors.UserError` or :class:`~schemas.SchemaError` is printed as one line on
stderr with exit code 2, never as a traceback (also when a reader raises it inside a Beam pipeline). When the
reader of stdout goes away (``spike-audit batch ... | head``) the command stops quietly with exit code 141.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

from spike_audit.pipelines.cli.terminal import printable
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.outdir import Terminated
from spike_audit.pipelines.settings import tool_version
from spike_audit.schemas import SchemaError

COMMANDS = ("spikes", "batch", "run", "shards", "demo", "manifest", "replay")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``prog: error: ...``, exit 2) like every other user error, not
    the whole usage block first; the subcommands' parsers inherit it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {printable(' '.join(message.split()))} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="spike-audit",
        description="Tell whether a training run's loss spikes came from the data, and from which data.",
    )
    parser.add_argument("--version", action="version", version=f"spike-audit {tool_version()}")
    add_verbosity(parser, default=0)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"spike_audit.pipelines.cli.{name}")
        except ModuleNotFoundError as err:  # a subcommand not built yet must not break the others
            if err.name == f"spike_audit.pipelines.cli.{name}":
                continue
            raise
        module.register(sub)
    for p in _command_parsers(sub):  # -v / -q also after the command (spike-audit run ... -v), and after a
        add_verbosity(p, default=argparse.SUPPRESS)  # command's own subcommand (spike-audit manifest olmo ... -q)
    return parser


def _command_parsers(sub):
    """Every parser under a subparsers action, nested subcommands included (``manifest olmo``)."""
    for p in sub.choices.values():
        yield p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from _command_parsers(action)


def add_verbosity(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="-v: our debug lines and Beam's warnings; -vv: Beam's own logs too")
    p.add_argument("-q", "--quiet", action="store_true", default=False if default == 0 else argparse.SUPPRESS,
                   help="only warnings and errors (no progress)")


class _ThirdPartyFilter(logging.Filter):
    """Drops Beam's records below ``level`` (Beam logs some on the root logger at import, e.g. "apitools not
    found"), whichever logger they come from."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        return not (record.name.startswith("apache_beam") or f"{os.sep}apache_beam{os.sep}" in record.pathname)


class _PrintableFormatter(logging.Formatter):
    """Log lines with control characters escaped (a shard or log name holding a newline or an escape sequence, text
    from the data): one record is one line on the terminal, as the error lines are."""

    def formatMessage(self, record):  # noqa: N802 - logging's name
        record.message = printable(record.message).replace("\n", "\\n")
        return super().formatMessage(record)


def setup_logging(verbose: int, quiet: bool) -> None:
    """-q: warnings and errors only; default: our INFO lines and the progress (a live line on a terminal);
    -v: our DEBUG lines and Beam's warnings; -vv: everything, Beam's INFO/DEBUG included. Beam's warnings
    are hidden at -q and by default."""
    from spike_audit.pipelines.progress import LiveLineHandler

    level = logging.WARNING if quiet else (logging.INFO if verbose < 2 else logging.DEBUG)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, LiveLineHandler):
            root.removeHandler(h)
    if not root.handlers:  # as logging.basicConfig: a host that configured logging (pytest, a notebook) keeps it
        handler = LiveLineHandler()
        handler.setFormatter(_PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_ThirdPartyFilter(logging.DEBUG if verbose >= 2 else
                                            logging.WARNING if verbose == 1 else logging.ERROR))
        root.addHandler(handler)
        root.setLevel(level)
    ours = logging.getLogger("spike_audit")
    ours.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose >= 1 else logging.INFO)
    logging.getLogger("spike_audit.progress.events").setLevel(logging.INFO)  # only a Progress collects them
    if verbose < 2:
        # Beam is chatty at INFO; keep our own progress lines readable.
        logging.getLogger("apache_beam").setLevel(logging.WARNING if verbose == 1 else logging.ERROR)
    for h in root.handlers:  # Beam's import-time note about BigQuery clients this tool never uses
        h.addFilter(lambda r: not str(r.msg).startswith("apitools not found"))
    # A user's mistake found inside a pipeline step is re-raised to us and printed as one line; Beam would
    # also log it with its traceback first.
    if verbose < 2:
        logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)


# Beam appends where in the pipeline an exception was raised: not part of the user's error.
_BEAM_SUFFIX = re.compile(r"(?:\s*\[while running '[^']*'\])+$")


def one_line(err: BaseException) -> str:
    """A user error as one line: Beam's ``[while running ...]`` suffix dropped, newlines folded."""
    text = _BEAM_SUFFIX.sub("", str(err).strip())
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): stop quietly, like a command killed by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
    except (OSError, ValueError):
        pass
    return 141


def _check_utf8_args(args) -> None:
    """A path or name given on the command line whose bytes are not UTF-8 (Python holds them as lone surrogates):
    one line naming the option, not a UnicodeEncodeError traceback from the first writer of an output or an index."""
    for key, v in sorted(vars(args).items()):
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, str):
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    shown = x.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                    raise UserError(f"{shown}: a path or name that is not UTF-8 text (--{key.replace('_', '-')} or an "
                                    f"argument); rename it") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    setup_logging(args.verbose, args.quiet)
    try:
        _check_utf8_args(args)
        rc = int(args.func(args) or 0)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        return _stdout_closed()
    except (UserError, SchemaError) as err:
        from spike_audit.pipelines.progress import LiveLineHandler

        LiveLineHandler.clear_all()
        print(f"spike-audit {args.command}: error: {printable(one_line(err))}", file=sys.stderr)
        return 2
    except MemoryError as err:  # settings or inputs that ask for more than the machine has: one line, no traceback
        from spike_audit.pipelines.progress import LiveLineHandler

        LiveLineHandler.clear_all()
        detail = printable(one_line(err))[:300]
        print(f"spike-audit {args.command}: error: out of memory{f' ({detail})' if detail else ''}; check the "
              f"settings (steps, batch sizes, --controls) and the inputs' sizes", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spike-audit {args.command}: interrupted (the previous output is intact)", file=sys.stderr)
        return 130
    except Terminated:
        print(f"spike-audit {args.command}: terminated (SIGTERM; the previous output is intact)", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
