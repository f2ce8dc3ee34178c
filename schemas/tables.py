"""Every table spike-audit reads or writes. Bump a table's version when its columns change."""

from __future__ import annotations

import pyarrow as pa

from spike_audit.schemas.core import FieldSpec as F
from spike_audit.schemas.core import TableSpec

SIGNAL_STRUCT = pa.struct(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("z", pa.float64()),
    ]
)

EVIDENCE_STRUCT = pa.struct(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("rows", pa.int64()),
        pa.field("cut", pa.float64()),
        pa.field("natural_rate", pa.float64()),
        pa.field("evidence", pa.float64()),
    ]
)

PEAK_STRUCT = pa.struct(
    [
        pa.field("metric", pa.string(), nullable=False),
        pa.field("step", pa.int64()),
        pa.field("value", pa.float64()),
    ]
)

_FAMILIES_DOC = ("Row-level evidence per signal family (oriented signal; `name:low` is the low tail), largest "
                 "first: `rows` at the most significant cut, the `cut` in the signal's units (rows >= it, or <= it "
                 "for a low tail), the `natural_rate` of such rows among the reference rows (leave-one-out) and "
                 "the `evidence` -log10 P(Binomial(rows in the group, natural rate) >= rows), capped at 300.")

LOSS_SERIES = TableSpec(
    name="loss_series",
    version=1,
    doc="One scalar per (run, metric, step), as read from a training log after restarts are resolved "
    "(a step logged again after a resume replaces the earlier value).",
    fields=(
        F("run", pa.string(), "Run name (the log file's stem unless given)."),
        F("metric", pa.string(), "Metric name: `train_loss`, `val_loss`, `grad_norm`, or the log's own tag."),
        F("step", pa.int64(), "Optimizer step (iteration) the value belongs to, as the trainer numbers it."),
        F("value", pa.float64(), "The logged value; NaN and inf are kept as they were logged."),
        F("source_line", pa.int64(), "1-based line in the source file the value came from (null for binary "
          "formats such as TensorBoard event files).", nullable=True),
    ),
    sort_keys=("run", "metric", "step"),
)

SPIKES = TableSpec(
    name="spikes",
    version=1,
    doc="Loss (or grad-norm) spike events found by a detector. Consecutive flagged steps form one event.",
    fields=(
        F("spike_id", pa.string(), "Stable id: `{run}/{metric}/{peak_step}`."),
        F("run", pa.string(), "Run the spike belongs to."),
        F("metric", pa.string(), "Metric the spike was detected on."),
        F("kind", pa.string(), "`spike` (rise then recovery), `nan` (NaN/inf value), `divergence` "
          "(never returns to baseline before the log ends)."),
        F("detector", pa.string(), "Detector rule that fired: `robust`, `olmo`, or `metaseq`."),
        F("start_step", pa.int64(), "First flagged step of the event."),
        F("peak_step", pa.int64(), "Step with the largest value (or first NaN) in the event."),
        F("end_step", pa.int64(), "Last flagged step of the event."),
        F("peak_value", pa.float64(), "Metric value at `peak_step`."),
        F("baseline_value", pa.float64(), "Robust baseline just before the event: the smaller of the trailing window's median and its recent "
          "quarter's median."),
        F("severity", pa.float64(), "Rise over the baseline in units of the trailing robust sigma "
          "(MAD * 1.4826); inf for NaN events."),
        F("recovery_steps", pa.int64(), "Steps from peak until the value is back within the threshold; "
          "null if it never recovers in the log.", nullable=True),
    ),
    sort_keys=("run", "metric", "peak_step"),
)

ALIGNED_SPIKES = TableSpec(
    name="aligned_spikes",
    version=1,
    doc="Steps at which several runs that share a data order spike together (within a tolerance).",
    fields=(
        F("step", pa.int64(), "Representative step (the most common peak step in the group)."),
        F("n_runs", pa.int64(), "Number of distinct runs spiking at this step."),
        F("runs", pa.list_(pa.string()), "Names of those runs, sorted."),
        F("peak_steps", pa.list_(pa.int64()), "Each run's own peak step, in the order of `runs`."),
    ),
    sort_keys=("step",),
)

STEP_MANIFEST = TableSpec(
    name="step_manifest",
    version=3,
    doc="What each optimizer step consumed: one row per contiguous slice of one shard. With `unit` = "
    "`row` the slice counts rows of a row-oriented shard (Parquet, JSONL, HF dataset, 2-D .npy, a "
    "Megatron document); with `unit` = `token` it counts token offsets into a flat token file "
    "(raw .bin / 1-D .npy memmap, Megatron .bin). Each slice becomes one sequence when read. "
    "`step` is the 0-based index of the global batch (the one step convention, `spike_audit.schemas.steps`). "
    "The Parquet schema metadata key `spike_audit.manifest` holds a JSON object describing the run: "
    "`step_convention` (`batch_index`), `trainer` (whose data order it is, e.g. `megatron`; null by hand), "
    "`token_dtype` (dtype of the flat token files, used to read them when no dtype is given), `seq_len` "
    "(the trainer's sequence length), `extra_token` (sequences hold `seq_len + 1` tokens), "
    "`samples_per_step` / `tokens_per_step` (global batch size), `first_step` and "
    "`samples_before_first_step` / `tokens_before_first_step` (consumed before it, for resumed runs): "
    "the consumed samples after step s are `samples_before_first_step + (s - first_step + 1) * samples_per_step`; "
    "`flat_rows`: the row definition of flat token files its `unit` = `row` slices address; "
    "`fed_pad_id`: a token id the trainer feeds as 0 with its loss masked (megatron-core's GPTDataset does "
    "this for its tokenizer's pad id), so `batch` shows 0 there and `run` counts those positions as padding. "
    "Unknown values are null; a manifest without the key (written by hand or by another tool) has no "
    "known step convention. Version 2 added where each sequence sat in its step's global batch "
    "(`batch_pos`, `seq_piece`), so a per-position quantity (a per-row loss) joins to the data; version 3 "
    "the `epoch` of each slice and the run description; older files read with them null.",
    fields=(
        F("step", pa.int64(), "0-based index of the global batch that consumed the slice (a trainer's logged "
          "step maps to it: Megatron iteration N is step N - 1)."),
        F("shard", pa.string(), "Shard path relative to the shard root (or absolute / URL)."),
        F("row_start", pa.int64(), "First row (or token offset) of the slice, inclusive."),
        F("row_end", pa.int64(), "End of the slice, exclusive; must be > row_start."),
        F("unit", pa.string(), "`row` (default when null) or `token`.", nullable=True),
        F("rank", pa.int32(), "Data-parallel rank that read the slice, if known.", nullable=True),
        F("micro_batch", pa.int32(), "Micro-batch (gradient accumulation) index, if known.", nullable=True),
        F("batch_pos", pa.int64(), "0-based position of the slice's (first) sequence in the step's global batch, "
          "where the trainer's order is known: the index a per-row loss of the whole global batch has, "
          "micro-batch-major then rank (Megatron's sampler order; OLMo's global batch order). A `row` slice of "
          "k rows holds positions batch_pos .. batch_pos + k - 1; a `token` slice is one sequence, or one piece "
          "of one (the slices of a sequence share its batch_pos, see `seq_piece`). Builders that know the "
          "order fill it for every slice (all or none); null when unknown.", nullable=True),
        F("seq_piece", pa.int32(), "0-based order of the slice within its sequence when a sequence is made of "
          "several `token` slices (a Megatron sample that crosses documents); null or 0 otherwise.",
          nullable=True),
        F("epoch", pa.int32(), "Pass over the data the slice belongs to (0-based: the k-th time the run's data "
          "order reads it). Slices of one shard that overlap within a step are accepted when their epochs "
          "differ (a multi-epoch shuffle can put a document twice into one batch); null when unknown.",
          nullable=True),
    ),
    sort_keys=("step", "rank", "micro_batch", "shard", "row_start"),
)

BATCH_SCORES = TableSpec(
    name="batch_scores",
    version=2,
    doc="Row-level evidence of what one step consumed: the steps in each spike event's window and the control "
    "steps (controls judged leave-one-out: their own rows out of the reference).",
    fields=(
        F("step", pa.int64(), "Optimizer step."),
        F("role", pa.string(), "`window` (in a spike event's window) or `control` (a normal step)."),
        F("spike_id", pa.string(), "Event whose window holds the step (null for controls).", nullable=True),
        F("n_rows", pa.int64(), "Sequences (manifest slices) read for the step."),
        F("n_tokens", pa.int64(), "Tokens read for the step."),
        F("evidence", pa.float64(), "The step statistic T: the largest family evidence (capped at 300)."),
        F("p_value", pa.float64(), "Calibrated p-value of the step: (1 + controls with T >= this T) / (n + 1); "
          "for a control, among the other controls.", nullable=True),
        F("top_signal", pa.string(), "Family with the largest evidence.", nullable=True),
        F("top_rows", pa.int64(), "Rows of the step at that family's cut.", nullable=True),
        F("as_window", pa.string(), "Controls only: the verdict the step gets when judged as a one-step spike window "
          "against the other controls (the test's calibration: at most about alpha of them are `data`).",
          nullable=True),
        F("families", pa.list_(EVIDENCE_STRUCT), _FAMILIES_DOC),
        F("signals", pa.list_(SIGNAL_STRUCT), "The step's suite signals (values; `z` is null)."),
    ),
    sort_keys=("step", "role", "spike_id"),
)

SHARD_SCORES = TableSpec(
    name="shard_scores",
    version=2,
    doc="Shards ranked by row-level evidence (1 = most anomalous): how many of their rows are anomalous on a "
    "signal family against the natural rate of such rows in the reference (spike-audit shards: every other "
    "shard's rows; spike-audit run: the control rows), as a binomial tail.",
    fields=(
        F("shard", pa.string(), "Shard path (relative to the shard root where one is given)."),
        F("rank", pa.int64(), "1-based rank by anomaly score, ties broken by shard name."),
        F("anomaly_score", pa.float64(), "The shard's evidence: the largest family evidence over its rows "
          "(-log10 of a binomial tail, capped at 300)."),
        F("top_signal", pa.string(), "Family with the largest evidence (empty when none)."),
        F("top_rows", pa.int64(), "Rows of the shard at that family's cut."),
        F("natural_rate", pa.float64(), "Natural rate of such rows in the reference.", nullable=True),
        F("reason", pa.string(), "Human-readable reason: rows, family, natural rate, evidence of the top families."),
        F("n_rows", pa.int64(), "Rows (sequences) in the shard or the audited slices of it."),
        F("n_tokens", pa.int64(), "Tokens audited."),
        F("fingerprint", pa.string(), "Shard fingerprint (path, size, mtime or etag) used for incremental "
          "runs.", nullable=True),
        F("families", pa.list_(EVIDENCE_STRUCT), _FAMILIES_DOC),
        F("signals", pa.list_(SIGNAL_STRUCT), "The shard's suite signals: value and robust z across shards "
          "(spike-audit shards; empty in spike-audit run)."),
    ),
    sort_keys=("rank", "shard"),
)

ROW_FLAGS = TableSpec(
    name="row_flags",
    version=2,
    doc="Rows (sequences) that carry a spike event's anomaly: at every window step, the rows at the cut of each "
    "family anomalous there (evidence beyond every control step, at least min_rows rows, more than any control "
    "step has at the cut). In a shard audit (`step` and `spike_id` null): the strongest rows of the most "
    "anomalous shards at their anomalous families' cuts (families with a per-row value).",
    fields=(
        F("shard", pa.string(), "Shard the row lives in."),
        F("row", pa.int64(), "Row index (or token offset for `unit` = `token`)."),
        F("row_end", pa.int64(), "End of the slice (exclusive), same unit as `row`."),
        F("unit", pa.string(), "`row` or `token`."),
        F("step", pa.int64(), "Step that consumed the row (null in shard audits).", nullable=True),
        F("spike_id", pa.string(), "Event whose window holds the step (null otherwise).", nullable=True),
        F("signals", pa.list_(pa.string()), "Families that flag the row."),
        F("score", pa.float64(), "The largest evidence of those families at the step (capped at 300)."),
        F("natural_rate", pa.float64(), "The largest natural rate among those families' cuts (the rate at which a "
          "normal row would be flagged so)."),
        F("excerpt", pa.string(), "Start of the row's text, decoded where text or a tokenizer exists.",
          nullable=True),
    ),
    sort_keys=("spike_id", "step", "shard", "row"),
)

VERDICT_MODEL_FIELDS = (
    F("model_verdict", pa.string(), "Model-based verdict from per-row losses (`run --row-losses`): `data` (a few "
      "rows carry the batch's excess loss), `not_data` (the loss rose on all rows alike, or did not rise: the "
      "optimizer or the model's state), `inconclusive`; null without per-row losses.", nullable=True),
    F("model_reason", pa.string(), "One-sentence explanation of the model-based verdict.", nullable=True),
    F("model_step", pa.int64(), "Window step the model-based verdict judges: the first whose per-row losses rose "
      "(else the one with the largest excess).", nullable=True),
    F("model_baseline", pa.string(), "What the window's per-row losses were compared with: `preceding:N` (the N "
      "steps before the window) or `controls:N` (the control steps).", nullable=True),
    F("excess_loss", pa.float64(), "Mean row loss at `model_step` minus the baseline batch loss (median of the "
      "baseline steps' mean row losses).", nullable=True),
    F("excess_z", pa.float64(), "`excess_loss` in robust sigmas of the baseline steps' batch losses.", nullable=True),
    F("flagged_share", pa.float64(), "Share of the excess loss the signal-flagged rows carry: sum of their loss "
      "over the baseline / the batch's.", nullable=True),
    F("flagged_share_lo", pa.float64(), "Lower end of the 95% bootstrap interval of `flagged_share`.", nullable=True),
    F("flagged_share_hi", pa.float64(), "Upper end of the 95% bootstrap interval of `flagged_share`.", nullable=True),
    F("breadth", pa.float64(), "Rise of the typical row (interquartile mean) / rise of the mean row: about 1 when "
      "the loss rose on all rows alike, about 0 when a few rows carry it.", nullable=True),
    F("breadth_lo", pa.float64(), "Lower end of the 95% bootstrap interval of `breadth`.", nullable=True),
    F("breadth_hi", pa.float64(), "Upper end of the 95% bootstrap interval of `breadth`.", nullable=True),
    F("outlier_share", pa.float64(), "Share of the excess loss the loss-outlier rows carry.", nullable=True),
    F("outlier_share_lo", pa.float64(), "Lower end of the 95% bootstrap interval of `outlier_share`.", nullable=True),
    F("outlier_share_hi", pa.float64(), "Upper end of the 95% bootstrap interval of `outlier_share`.", nullable=True),
    F("n_loss_outliers", pa.int64(), "Rows at `model_step` whose loss is an outlier against the baseline rows.",
      nullable=True),
    F("flag_precision", pa.float64(), "Signal-flagged rows that are loss outliers / flagged rows.", nullable=True),
    F("flag_recall", pa.float64(), "Loss outliers that are signal-flagged / loss outliers.", nullable=True),
)

VERDICTS = TableSpec(
    name="verdicts",
    version=3,
    doc="The falsifiable answer per spike event (loss and grad-norm spikes within a few steps are one event): is "
    "the data its window consumed unusual compared with normal steps, and which rows? Version 2 added the "
    "model-based verdict from per-row losses (`model_*` and the attribution columns; null without "
    "`--row-losses`); version 3 the row-level evidence (rows, control maximum, natural rate, evidence), events "
    "(member spikes and each metric's peak) and the window's range.",
    fields=(
        F("spike_id", pa.string(), "Event id: the id of its first spike on the audited metric (see `spikes`)."),
        F("run", pa.string(), "Run."),
        F("peak_step", pa.int64(), "Peak step of that spike."),
        F("verdict", pa.string(), "`data` (the window's data is anomalous), `not_data` (it looks like "
          "normal batches: look at the optimizer or hardware), or `inconclusive` (too few controls or "
          "missing data)."),
        F("p_value", pa.float64(), "Calibrated p-value: the most significant window step's rank among the control "
          "steps' statistics (max over families of row-level evidence, controls leave-one-out), Sidak-corrected "
          "for the number of window steps (null when inconclusive).", nullable=True),
        F("evidence", pa.float64(), "Evidence of the top family at the top step: -log10 of the binomial tail of "
          "its anomalous rows at the natural rate (capped at 300).", nullable=True),
        F("effect_size", pa.float64(), "Anomalous rows over the largest count of such rows in one control step "
          "(at least 1): the fold over the control maximum, at most the batch size (capped at 1000).",
          nullable=True),
        F("margin", pa.float64(), "The top step's statistic over the largest control step's (capped at 1000).",
          nullable=True),
        F("anomalous_rows", pa.int64(), "Rows of the top step at the top family's cut.", nullable=True),
        F("n_rows", pa.int64(), "Rows of the top step.", nullable=True),
        F("control_max_rows", pa.int64(), "Largest number of control rows at that cut in one control step.",
          nullable=True),
        F("natural_rate", pa.float64(), "Share of control rows at that cut.", nullable=True),
        F("top_signal", pa.string(), "Top family (signal, `:low` for the low tail).", nullable=True),
        F("top_step", pa.int64(), "The most anomalous window step.", nullable=True),
        F("top_shards", pa.list_(pa.string()), "Shards holding the flagged rows, most flagged first."),
        F("n_controls", pa.int64(), "Number of control steps compared against."),
        F("n_window_steps", pa.int64(), "Steps in the event window that had data."),
        F("window_start", pa.int64(), "First window step with data.", nullable=True),
        F("window_end", pa.int64(), "Last window step with data.", nullable=True),
        F("spikes", pa.list_(pa.string()), "Ids of the spikes (every metric) that form the event."),
        F("peaks", pa.list_(PEAK_STRUCT), "Each member spike's metric, peak step and peak value."),
        F("reason", pa.string(), "One-sentence explanation of the verdict."),
    ) + VERDICT_MODEL_FIELDS,
    sort_keys=("run", "peak_step", "spike_id"),
)

DUPLICATES = TableSpec(
    name="duplicates",
    version=1,
    doc="Clusters of exact or near-duplicate rows spanning shards (one row per member).",
    fields=(
        F("cluster_id", pa.string(), "Stable cluster id (smallest member hash, hex)."),
        F("kind", pa.string(), "`exact` (same 64-bit row hash) or `near` (MinHash LSH, connected components)."),
        F("shard", pa.string(), "Member's shard."),
        F("row", pa.int64(), "Member's row index."),
        F("n_members", pa.int64(), "Rows in the cluster."),
        F("n_shards", pa.int64(), "Distinct shards in the cluster."),
    ),
    sort_keys=("kind", "cluster_id", "shard", "row"),
)

ROW_LOSSES = TableSpec(
    name="row_losses",
    version=1,
    doc="Per-row (per-sequence) training losses of some steps: what `spike-audit run --row-losses` reads and "
    "`spike-audit replay` writes. Each row names its sequence by batch position (`step`, `position`; needs a "
    "manifest with `batch_pos`) or by data identity (`step`, `shard`, `row`).",
    fields=(
        F("step", pa.int64(), "Optimizer step whose batch held the sequence, numbered as in the loss log."),
        F("position", pa.int64(), "0-based position of the sequence in the step's global batch (the manifest's "
          "`batch_pos`); null when the row is keyed by `shard` and `row`.", nullable=True),
        F("shard", pa.string(), "Shard of the sequence (its first slice), as the manifest names it.", nullable=True),
        F("row", pa.int64(), "Row index (`unit` = `row`) or token offset where the sequence starts (`unit` = "
          "`token`), as in the manifest.", nullable=True),
        F("loss", pa.float64(), "Mean next-token loss over the sequence (nats); NaN (or null) when not available."),
        F("n_tokens", pa.int64(), "Tokens the loss averages over (predicted tokens), if known.", nullable=True),
    ),
    sort_keys=("step", "position", "shard", "row"),
)

LOSS_ROWS = TableSpec(
    name="loss_rows",
    version=1,
    doc="Per-row losses behind each model-based verdict: the rows of every spike's window steps and of the "
    "baseline steps they were compared with, with their standing against the baseline.",
    fields=(
        F("spike_id", pa.string(), "Spike (see `spikes`)."),
        F("step", pa.int64(), "Step."),
        F("role", pa.string(), "`window` (a step of the spike window) or `baseline` (a step the window is "
          "compared with: a step just before the window, or a control step)."),
        F("position", pa.int64(), "Position in the step's batch (the manifest's `batch_pos`, or the order the "
          "manifest lists the step's sequences when it records none)."),
        F("shard", pa.string(), "Shard of the sequence (its first slice)."),
        F("row", pa.int64(), "Row index or token offset of the sequence (its first slice)."),
        F("loss", pa.float64(), "The sequence's loss (NaN where none was given)."),
        F("z", pa.float64(), "Loss in robust sigmas above the baseline's typical row (NaN without a loss)."),
        F("flagged", pa.bool_(), "The data signals flag the row (`row_flags`)."),
        F("outlier", pa.bool_(), "A loss outlier: z above the outlier threshold."),
    ),
    sort_keys=("spike_id", "step", "position"),
)

BASELINE_REFERENCE = TableSpec(
    name="baseline_reference",
    version=1,
    doc="A saved baseline's reference rows (`spike-audit shards --save-baseline`): how many of the trusted "
    "corpus's rows fall in each bin of each oriented signal family (the row-level evidence's natural rates). "
    "Bins as in `auditors.evidence` (0: zero or NaN; 1..768: 16 per octave); only non-zero counts are stored.",
    fields=(
        F("family", pa.string(), "Signal family (`name` or `name:low`)."),
        F("bin", pa.int32(), "Bin of the oriented value (0..768)."),
        F("count", pa.int64(), "Rows of the trusted corpus in that bin."),
    ),
    sort_keys=("family", "bin"),
)

BASELINE_UNIGRAM = TableSpec(
    name="baseline_unigram",
    version=1,
    doc="A saved baseline's token unigram histogram: the reference distribution of the baseline-relative signals "
    "(JS divergence, rare-token share, cross-entropy); only tokens that occur are stored.",
    fields=(
        F("token", pa.int64(), "Token id (a byte value for text-only shards audited as UTF-8)."),
        F("count", pa.int64(), "Occurrences in the trusted corpus."),
    ),
    sort_keys=("token",),
)

BASELINE_SHARD_SIGNALS = TableSpec(
    name="baseline_shard_signals",
    version=1,
    doc="A saved baseline's per-shard suite signals (the values `shard_scores.signals` shows): judging against the "
    "baseline, a new shard's signals get their robust z against these shards.",
    fields=(
        F("shard", pa.string(), "Shard of the trusted corpus."),
        F("signal", pa.string(), "Suite signal name."),
        F("value", pa.float64(), "The shard's value (null when not defined).", nullable=True),
    ),
    sort_keys=("shard", "signal"),
)

TABLES = (LOSS_SERIES, SPIKES, ALIGNED_SPIKES, STEP_MANIFEST, BATCH_SCORES, SHARD_SCORES, ROW_FLAGS, VERDICTS,
          DUPLICATES, ROW_LOSSES, LOSS_ROWS, BASELINE_REFERENCE, BASELINE_UNIGRAM,
          BASELINE_SHARD_SIGNALS)
