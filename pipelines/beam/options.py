"""Beam options as given on the command line: validated (an option that neither spike-audit nor Beam knows is
an error, never dropped), with short runner names Beam itself does not know (``--runner=DaskRunner``), the
DaskRunner compatibility shim installed when it is the runner, and the runner always named.

Why the runner is always named: Beam 2.77's default ``DirectRunner`` first tries its Prism runner, which
downloads a binary from the internet and executes it, and falls back to the in-process FnApiRunner when that
fails. Without ``--runner`` (and with ``--runner=DirectRunner``) this package names the in-process
``FnApiRunner`` itself, which is what the DirectRunner runs a batch pipeline on: nothing is downloaded or
executed. ``--runner=PrismRunner`` still asks for Prism explicitly.
"""

from __future__ import annotations

from spike_audit.pipelines.errors import UserError

RUNNER_ALIASES = {
    "DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner",
    # Beam's DirectRunner would try (download) Prism first; its batch engine is the FnApiRunner.
    "DirectRunner": "FnApiRunner",
    "SwitchingDirectRunner": "FnApiRunner",
}
DEFAULT_RUNNER = "FnApiRunner"

# Modules defining the options of runners that are not imported by apache_beam.options itself.
_RUNNER_OPTION_MODULES = {"apache_beam.runners.dask.dask_runner.DaskRunner": "apache_beam.runners.dask.dask_runner"}


def _normalise(args: list[str]) -> tuple[list[str], str | None]:
    """``--runner X`` -> ``--runner=X`` with aliases resolved; returns (args, runner or None)."""
    out: list[str] = []
    runner = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--runner":
            if i + 1 >= len(args):
                raise UserError("--runner: expected a runner name (e.g. --runner=DaskRunner)")
            a = "--runner=" + args[i + 1]
            i += 1
        if a.startswith("--runner="):
            name = a.split("=", 1)[1]
            runner = RUNNER_ALIASES.get(name, name)
            a = f"--runner={runner}"
        out.append(a)
        i += 1
    return out, runner


def _unknown(args: list[str]) -> list[str]:
    """The arguments no Beam pipeline option accepts (the check Beam's ``get_all_options`` makes before it
    drops them with a warning)."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    class _OneLine(_BeamArgumentParser):  # a bad value (--direct_num_workers abc): one line, not Beam's usage
        def error(self, message):
            raise UserError(f"Beam option: {' '.join(str(message).split())}")

    parser = _OneLine(allow_abbrev=False)
    seen = {}
    stack = list(PipelineOptions.__subclasses__())
    while stack:  # every subclass, also the subclasses of subclasses Beam's own check reaches
        cls = stack.pop()
        if str(cls) in seen:
            continue
        seen[str(cls)] = cls
        stack.extend(cls.__subclasses__())
    for cls in seen.values():
        try:
            cls._add_argparse_args(parser)
        except Exception:  # an option registered twice by two classes: Beam's own parser tolerates it too
            continue
    _, unknown = parser.parse_known_args(args)
    return unknown


def beam_options(args: list[str] | None) -> list[str]:
    """Validated Beam flags: short runner names resolved, the runner named (never Beam's Prism download
    unless asked for), and a :class:`UserError` for any option that is not a Beam pipeline option."""
    import importlib

    from spike_audit.pipelines.beam.dask_compat import install, needs_shim

    out, runner = _normalise(list(args or []))
    if runner is None:
        out.append(f"--runner={DEFAULT_RUNNER}")
        runner = DEFAULT_RUNNER
    if runner in _RUNNER_OPTION_MODULES:
        try:
            importlib.import_module(_RUNNER_OPTION_MODULES[runner])  # registers the runner's own options
        except ImportError as err:
            raise UserError(f"--runner={runner}: cannot import the runner ({err}); is its extra installed?") \
                from None
    _check_runner(runner)
    unknown = _unknown(out)
    if unknown:
        raise UserError(f"unrecognized arguments: {' '.join(unknown)} (neither an option of this command nor a "
                        "Beam pipeline option; see --help)")
    if needs_shim(out):
        install()
    return out


def _check_runner(name: str) -> None:
    from apache_beam.options.pipeline_options import StandardOptions

    if name in StandardOptions.KNOWN_RUNNER_NAMES or name.lower().removesuffix("runner") in {
            n.lower().removesuffix("runner") for n in StandardOptions.KNOWN_RUNNER_NAMES}:
        return
    if "." in name:
        import importlib

        module, _, cls = name.rpartition(".")
        try:
            if hasattr(importlib.import_module(module), cls):
                return
        except ImportError:
            pass
    raise UserError(f"--runner={name}: unknown runner (expected one of "
                    f"{', '.join(StandardOptions.KNOWN_RUNNER_NAMES)}, DaskRunner, or a module.Class path)")
