"""Beam glue shared by both pipelines: ``read`` (the transform that reads exactly the requested row slices,
grouped by shard), ``combine`` (any auditor as a ``CombineFn``), ``sink`` (the single runner-agnostic sink and
the driver's assembly of its parts), ``runner`` and ``options`` (running a pipeline with the user's Beam options),
``dask_compat`` (the DaskRunner compatibility shim), and ``scoring`` (the per-element functions both pipelines
use: Arrow batch -> ``TokenBatch``, finishing suite accumulators, robust scores, hash buckets).

May import: the readers (``shards``), ``io``, ``errors``, auditors and schemas; never a pipeline (``run``,
``shard_audit``), the report, ``logs``, ``manifest``, ``builders`` or the command line.
"""
