"""``spike-audit shards``: audit shards without a loss log: which shards are anomalous, and why.

Modules: ``audit`` (``run_shard_audit``, the driver), ``discover`` (inputs -> checked shards), ``graph``
(the Beam graph), ``clusters`` (cross-shard duplicate clusters), ``spill`` (the near-duplicate join's key files),
``state`` (incremental mode), ``outputs``
(quarantine, excerpts), ``config``.

May import: :mod:`spike_audit.pipelines.report`, :mod:`spike_audit.pipelines.beam`, the readers
(``shards``), ``io``, ``errors``, auditors and schemas; never :mod:`spike_audit.pipelines.run` or the command line.

Driver (small work only): expand the inputs to shards, fingerprint them (path, size, modification
time), open each new or changed shard once to check it is readable and has a ``tokens`` or ``text``
column (bad shards are listed; ``--skip-bad`` continues without them, reported), and load the state
index of earlier runs.

Beam pipeline (one pass over new or changed shards, in row chunks of ``batch_rows``, a shard's chunks in one work
element of up to ``graph.GROUP_CHUNKS``):

* per shard, the auditor suite's accumulator (``CombinePerKey``), its per-row state (exact hashes, MinHash
  sketches) finished into signals where the shard's last chunk is scored (``graph.compact_acc``); accumulators of
  unchanged shards come from the state directory, read inside the pipeline;
* the global baseline histogram: every shard's histogram merged (``CombineGlobally``), a side input
  of the per-shard finish, so JS divergence and rare-token share are against the whole corpus;
* robust z of every signal across shards (median/MAD) and the ranking;
* cross-shard exact duplicates: row hashes partitioned into ``buckets`` by hash, grouped
  (``GroupByKey``), groups found with numpy per bucket;
* cross-shard near duplicates: LSH band keys and 8-bit MinHash sketches written by each work element to a key
  file (``spill``), read back per band bucket; rows sharing a band key have their sketches read and compared, then connected components over all verified pairs (min-label
  propagation with pointer jumping, at most ``cc_iterations`` rounds; a warning says if that bound
  stopped it). Hot keys: a bucket group larger than ``max_group`` rows is linked as a star (each
  member to the group's smallest), so no group costs more than linear work.

Incremental (``--state DIR``): the accumulators and row keys of every audited shard are kept in the
state directory as part files (written by the pipeline itself, never through the driver) with an
index of fingerprints. A rerun reads only new or changed shards, takes the others' accumulators and
keys from the state, and so produces exactly the tables a full run would.
"""
