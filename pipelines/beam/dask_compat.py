"""A shim for a bug in Beam's DaskRunner (apache-beam 2.77, ``runners/dask/transform_evaluator.py``).

The runner builds one output receiver per ParDo at graph-construction time and ships it with every
partition; ``apply_dofn_to_bundle`` appends each bundle's outputs to that receiver and returns *all*
values it holds. Where one worker process runs several partitions of a ParDo with the same
deserialised receiver, every later bundle returns the earlier bundles' outputs again: elements are
duplicated (measured here: ``AsList`` of a 20-key ``CombinePerKey`` delivered 44 elements, and a
baseline histogram computed through a fan-out came out 4x too large).

:func:`install` replaces the function the runner maps over partitions with one that runs each
bundle on private copies of the receivers and invoker arguments (side inputs are shared, not
copied), so each bundle returns exactly its own outputs. It is applied only when a pipeline runs on
the DaskRunner; the function lives in this module so that workers import the fixed version by name.
"""

from __future__ import annotations

import copy


def apply_dofn_to_bundle(items, do_fn_invoker_args, do_fn_invoker_kwargs, tagged_receivers):
    """Run one bundle (a Dask partition) through the DoFn and return exactly its outputs."""
    from apache_beam.runners.common import DoFnInvoker

    side = do_fn_invoker_kwargs.get("side_inputs")
    memo = {id(side): side} if side is not None else {}
    args, kwargs, receivers = copy.deepcopy((do_fn_invoker_args, do_fn_invoker_kwargs, tagged_receivers), memo)
    receivers.values.clear()
    invoker = DoFnInvoker.create_invoker(*args, **kwargs)
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(item)
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    return [v.value for v in receivers.values]


def install() -> None:
    """Route the DaskRunner's ParDo bundles through :func:`apply_dofn_to_bundle` (idempotent)."""
    from apache_beam.runners.dask import transform_evaluator as te

    te.apply_dofn_to_bundle = apply_dofn_to_bundle


def needs_shim(beam_args: list[str]) -> bool:
    return any(a.startswith("--runner=") and a.split("=", 1)[1].endswith("DaskRunner") for a in beam_args)
