"""Running a built pipeline with the given Beam options."""

from __future__ import annotations

import apache_beam as beam


def run_pipeline(build, options) -> None:
    """Build a pipeline with ``build(p)``, run it and wait for it; then close any client the runner
    opened (Beam's DaskRunner leaves its ``distributed.Client`` connected, which keeps trying to
    reconnect once the cluster is gone)."""
    p = beam.Pipeline(options=options)
    build(p)
    result = p.run()
    try:
        result.wait_until_finish()
    finally:
        client = getattr(result, "client", None)
        if client is not None:
            client.close()
