"""``spike-audit run``: the end-to-end spike audit.

Modules: ``audit`` (``run_audit``, the driver), ``plan`` (log -> spikes -> what to read), ``graph`` (the Beam
graph), ``outputs`` (skip list, quarantine, calibration), ``state`` (scheduled mode), ``control_cache`` (the control
steps' scores kept in the state); the model-based verdict from
per-row losses: ``row_losses`` (read them, join them to the manifest's batch positions), ``model_verdict`` (loss
attribution per spike, :mod:`spike_audit.auditors.loss_attribution`), ``replay`` (recompute them with a local
checkpoint: torch and transformers, the optional ``replay`` extra) and ``replay_pack`` (the audited batches
written out for any trainer to replay).

May import: :mod:`spike_audit.pipelines.report`, :mod:`spike_audit.pipelines.beam`, the readers (``logs``,
``shards``), ``manifest``, ``io``, ``errors``, auditors and schemas; never
:mod:`spike_audit.pipelines.shard_audit` or the command line.

log -> spikes -> spike windows -> manifest join -> exact rows -> auditors -> controls -> verdicts.

The driver does the small things: it reads the loss log, detects spikes, picks the steps to audit
(each spike's window and a seeded sample of control steps) and reads the manifest rows of just those
steps (Parquet predicate push-down). Everything that touches data runs in one Beam pipeline:

1. ``ReadSlices`` reads exactly the manifest's rows of the selected steps, grouped by shard.
2. Pass 1: the baseline unigram histogram of the control steps (``CombineGlobally``).
3. Pass 2: the auditor suite per step (``CombinePerKey``), finished against the baseline histogram
   (side input) -> per-step signals; per shard likewise.
4. Row attribution: per-row signals of window steps, z-scored against a deterministic bottom-k
   sample of control rows (side input).
5. Per spike (``CoGroupByKey`` on the spike id): the verdict of :mod:`spike_audit.auditors.verdict` against the
   control steps' signals (side input), with the shards of the flagged rows.
6. One sink (:class:`spike_audit.pipelines.beam.sink.WriteTables`); the driver assembles and publishes the
   tables atomically, then writes skip_list.json, quarantine.json and report.html from them.

Defaults (documented in the README, set in :mod:`.plan`): the window of a spike event is
``[start - lookback, end]`` with ``lookback = 2`` (the loss at step s is measured on batch s, so a data-caused
spike shows at the batch itself; the lookback covers a delayed reaction), at most ``max_window = 12`` steps;
controls are ``n_controls = 200`` steps (more when the longest window needs them) drawn with ``seed`` from the
logged steps at least ``guard = 20`` steps away from every spike.
"""
