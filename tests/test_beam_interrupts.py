"""SIGINT / SIGTERM while a pipeline step runs: Beam re-raises the step's exception wrapped in its own
RuntimeError; the pipeline runner raises it again as KeyboardInterrupt / Terminated so the command exits 130 / 143
with one line (and the output directory's staging is removed on the way out)."""

from __future__ import annotations

import pytest

from spike_audit.pipelines.beam.options import beam_options
from spike_audit.pipelines.beam.runner import run_pipeline
from spike_audit.pipelines.outdir import Terminated


def _raise(exc):
    def fn(x):
        if x == 3:
            raise exc
        return x
    return fn


@pytest.mark.parametrize("exc, expected", [(KeyboardInterrupt(), KeyboardInterrupt), (Terminated(), Terminated)])
def test_an_interrupt_inside_a_step_is_raised_as_itself(exc, expected):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    def build(p):
        _ = p | beam.Create(list(range(6))) | "Step" >> beam.Map(_raise(exc))

    with pytest.raises(expected):
        run_pipeline(build, PipelineOptions(beam_options([])))


def test_an_ordinary_step_error_is_not_taken_for_an_interrupt():
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    def build(p):
        _ = p | beam.Create(list(range(6))) | "Step" >> beam.Map(_raise(ValueError("Terminated early? no")))

    with pytest.raises(Exception) as info:
        run_pipeline(build, PipelineOptions(beam_options([])))
    assert not isinstance(info.value, (KeyboardInterrupt, Terminated))
