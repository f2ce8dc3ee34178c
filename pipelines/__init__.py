"""The plumbing of spike-audit, in layers that import one way (top to bottom; tests/test_layering.py):

- ``cli/``: one thin module per command; ``docs``: regenerates the generated documentation;
- ``demo``: the demo run and shard corpus (real text, planted anomalies);
- ``run/`` (the spike audit) and ``shard_audit/`` (shards without a loss log): plan, Beam graph, outputs, state;
- ``report/``: the two HTML pages, fed tables;
- ``beam/``: read transform, CombineFn wrapper, the single sink, runner options, the DaskRunner shim, scoring glue;
- ``builders/``: step manifests from trainers' own data-order files; ``manifest``: the join contract;
- ``logs/`` (loss logs), ``shards/`` (shard readers), ``tokenizer``: the readers;
- ``outdir`` (output and state directories: marker, lock, versions, one atomic swap) and ``records`` (records
  as data on disk, never pickles);
- ``io`` (atomic writers) and ``errors`` (the one-line user error).

May import: :mod:`spike_audit.auditors` and :mod:`spike_audit.schemas` (never the reverse); each module only
its own package and the layers below it.
"""
