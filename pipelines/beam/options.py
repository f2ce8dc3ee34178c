"""Beam options as given on the command line, with short runner names Beam itself does not know
(``--runner=DaskRunner``) and the DaskRunner compatibility shim installed when it is the runner."""

from __future__ import annotations


RUNNER_ALIASES = {"DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}


def beam_options(args: list[str] | None) -> list[str]:
    """Pass Beam options through unchanged, but accept short runner names Beam itself does not know
    (``--runner=DaskRunner``), and on the DaskRunner install :mod:`pipelines.dask_compat`."""
    from spike_audit.pipelines.beam.dask_compat import install, needs_shim

    out = []
    args = list(args or [])
    for i, a in enumerate(args):
        if a == "--runner" and i + 1 < len(args):  # "--runner X" -> "--runner=X"
            args[i + 1] = "--runner=" + args[i + 1]
            continue
        if a.startswith("--runner="):
            name = a.split("=", 1)[1]
            a = f"--runner={RUNNER_ALIASES.get(name, name)}"
        out.append(a)
    if needs_shim(out):
        install()
    return out
