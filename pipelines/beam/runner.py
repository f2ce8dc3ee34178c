"""Running a built pipeline with the given Beam options."""

from __future__ import annotations

import errno
import os
import re

import apache_beam as beam

from spike_audit.pipelines.errors import UserError

_WRAPPED_OS_ERROR = re.compile(r"(?:OSError|PermissionError|FileNotFoundError): \[Errno (\d+)\] ([^\[]*)")


def run_pipeline(build, options, where: str = "pipeline") -> None:
    """Build a pipeline with ``build(p)``, run it and wait for it; then close any client the runner
    opened (Beam's DaskRunner leaves its ``distributed.Client`` connected, which keeps trying to
    reconnect once the cluster is gone). A full disk or a denied permission inside a step (which runners
    re-raise wrapped in their own error) becomes a one-line :class:`UserError` naming ``where``."""
    p = beam.Pipeline(runner=_fn_api_runner(options), options=options)
    build(p)
    try:
        result = p.run()
        try:
            result.wait_until_finish()
        finally:
            client = getattr(result, "client", None)
            if client is not None:
                client.close()
    except UserError:
        raise
    except Exception as err:
        _reraise_interrupt(err)
        found = _os_error_in(err)
        if found is None:
            raise
        code, text = found
        what = "no space left on device" if code == errno.ENOSPC else text.strip().rstrip(":")
        raise UserError(f"{where}: a pipeline step failed: {what} (the previous output is intact)") from None


def _fn_api_runner(options):
    """For the FnApiRunner (the default, see :mod:`pipelines.beam.options`): the runner built as Beam's
    DirectRunner builds it, with the pipeline options in its provision info, so worker processes
    (``--direct_running_mode=multi_processing``) see them; named by name, Beam builds it without, and each worker
    then logs its harness's INFO lines (about 18 per worker) whatever our log level. Unless the options set
    ``--default_sdk_harness_log_level``, the workers log at the level our ``apache_beam`` logger has (ERROR by
    default, WARNING at ``-v``, everything at ``-vv``). ``None`` (Beam picks the runner) for any other runner."""
    import logging

    from apache_beam.options.pipeline_options import StandardOptions, WorkerOptions

    if options.view_as(StandardOptions).runner not in ("FnApiRunner", None):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    harness = options.view_as(WorkerOptions)
    if harness.default_sdk_harness_log_level is None:
        level = logging.getLogger("apache_beam").getEffectiveLevel()
        harness.default_sdk_harness_log_level = logging.getLevelName(max(level, logging.DEBUG))
    info = beam_provision_api_pb2.ProvisionInfo(
        pipeline_options=JobServiceHandle.encode_pipeline_options(options.get_all_options()),
        retrieval_token="unused-retrieval-token")
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(info))


_INTERRUPT = re.compile(r"^\s*(?:[\w.]*\.)?(KeyboardInterrupt|Terminated)\s*(?:\[while running|$)")


def _reraise_interrupt(err: BaseException) -> None:
    """SIGINT (KeyboardInterrupt) or SIGTERM (:class:`~spike_audit.pipelines.outdir.Terminated`) raised while a
    step ran: Beam re-raises them wrapped in its own ``RuntimeError("KeyboardInterrupt [while running ...]")``;
    raised again as themselves, so the command exits 130 / 143 with its one line."""
    from spike_audit.pipelines.outdir import Terminated

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (KeyboardInterrupt, Terminated)):
            raise err
        m = _INTERRUPT.match(str(err)) if isinstance(err, RuntimeError) else None
        if m:
            raise (KeyboardInterrupt() if m.group(1) == "KeyboardInterrupt" else Terminated()) from None
        err = err.__cause__ or err.__context__


def _os_error_in(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            text = err.strerror or os.strerror(err.errno)
            return err.errno, f"{text}: {err.filename}" if err.filename else text
        m = _WRAPPED_OS_ERROR.search(str(err))
        if m:
            return int(m.group(1)), m.group(2)
        err = err.__cause__ or err.__context__
    return None
