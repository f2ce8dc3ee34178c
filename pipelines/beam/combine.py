"""Any auditor (create/add/merge/result) wrapped unchanged as a Beam ``CombineFn``."""

from __future__ import annotations

from typing import Any
import apache_beam as beam


class AuditorCombineFn(beam.CombineFn):
    """Wraps any auditor (create/add/merge/result) unchanged as a Beam CombineFn.

    Inputs are :class:`auditors.TokenBatch`. With ``output="accumulator"`` the combined accumulator
    itself is emitted, so a later step can finish it against a baseline given as a side input."""

    def __init__(self, auditor: Any, output: str = "result"):
        self.auditor = auditor
        self.output = output

    def create_accumulator(self):
        return self.auditor.create()

    def add_input(self, acc, batch):
        return self.auditor.add(acc, batch)

    def merge_accumulators(self, accs):
        return self.auditor.merge(list(accs))

    def extract_output(self, acc):
        return acc if self.output == "accumulator" else self.auditor.result(acc)


def global_combine(fn) -> tuple[beam.PTransform, Any]:
    """``(transform, default)``: ``CombineGlobally(fn)`` without Beam's default-injection sub-graph (an Impulse
    stage, a Create and a side-input Map per combine: 5 of its 9 transforms and one stage), and the value Beam
    would inject for an empty input (the combine of no elements, computed here once). Read the result as
    ``AsSingleton(result, default_value=default)``: the same value whether the input is empty or not."""
    cfn = beam.CombineFn.maybe_from_callable(fn)
    cfn.setup()
    try:
        default = cfn.apply([])
    finally:
        cfn.teardown()
    return beam.CombineGlobally(cfn).without_defaults(), default
