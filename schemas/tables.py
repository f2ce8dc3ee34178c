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
        F("baseline_value", pa.float64(), "Robust baseline (trailing median) just before the event."),
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
    "`flat_rows`: the row definition of flat token files its `unit` = `row` slices address. "
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
    version=1,
    doc="Audit signals of what one step consumed: the steps in each spike's window and the control steps.",
    fields=(
        F("step", pa.int64(), "Optimizer step."),
        F("role", pa.string(), "`window` (at or just before a spike) or `control` (a normal step)."),
        F("spike_id", pa.string(), "Spike whose window holds the step (null for controls).", nullable=True),
        F("n_rows", pa.int64(), "Sequences (manifest slices) read for the step."),
        F("n_tokens", pa.int64(), "Tokens read for the step."),
        F("anomaly_score", pa.float64(), "Combined anomaly score: the largest |robust z| over signals."),
        F("signals", pa.list_(SIGNAL_STRUCT), "Every signal: its value and robust z against the controls."),
    ),
    sort_keys=("step", "role", "spike_id"),
)

SHARD_SCORES = TableSpec(
    name="shard_scores",
    version=1,
    doc="Audit signals per shard, ranked by anomaly score (1 = most anomalous).",
    fields=(
        F("shard", pa.string(), "Shard path (relative to the shard root where one is given)."),
        F("rank", pa.int64(), "1-based rank by anomaly score, ties broken by shard name."),
        F("anomaly_score", pa.float64(), "Combined anomaly score: the largest |robust z| over signals."),
        F("top_signal", pa.string(), "Signal with the largest |z|."),
        F("reason", pa.string(), "Human-readable reason, e.g. `repeat_run_frac z=+41.2`."),
        F("n_rows", pa.int64(), "Rows (sequences) in the shard or the audited slices of it."),
        F("n_tokens", pa.int64(), "Tokens audited."),
        F("fingerprint", pa.string(), "Shard fingerprint (path, size, mtime or etag) used for incremental "
          "runs.", nullable=True),
        F("signals", pa.list_(SIGNAL_STRUCT), "Every signal: its value and robust z against the baseline."),
    ),
    sort_keys=("rank", "shard"),
)

ROW_FLAGS = TableSpec(
    name="row_flags",
    version=1,
    doc="Individual rows (sequences) that carry an anomaly, with the signals that flag them.",
    fields=(
        F("shard", pa.string(), "Shard the row lives in."),
        F("row", pa.int64(), "Row index (or token offset for `unit` = `token`)."),
        F("row_end", pa.int64(), "End of the slice (exclusive), same unit as `row`."),
        F("unit", pa.string(), "`row` or `token`."),
        F("step", pa.int64(), "Step that consumed the row (null in shard audits).", nullable=True),
        F("spike_id", pa.string(), "Spike whose window holds the step (null otherwise).", nullable=True),
        F("signals", pa.list_(pa.string()), "Names of the signals that flag the row."),
        F("score", pa.float64(), "The row's largest per-signal score."),
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
    version=2,
    doc="The falsifiable answer per spike: is the data it consumed unusual compared with normal steps? "
    "Version 2 adds the model-based verdict from per-row losses (`model_*` and the attribution columns; null "
    "without `--row-losses`).",
    fields=(
        F("spike_id", pa.string(), "Spike id (see `spikes`)."),
        F("run", pa.string(), "Run."),
        F("peak_step", pa.int64(), "Peak step of the spike."),
        F("verdict", pa.string(), "`data` (the window's data is anomalous), `not_data` (it looks like "
          "normal batches: look at the optimizer or hardware), or `inconclusive` (too few controls or "
          "missing data)."),
        F("p_value", pa.float64(), "Empirical p-value of the window against the control steps: rank of its "
          "max-T over all signals (Westfall-Young max-T: corrected for the number of signals), Sidak-corrected "
          "for the number of window steps (null when inconclusive).", nullable=True),
        F("effect_size", pa.float64(), "Robust effect size of the top signal: (window - control median) / "
          "control robust sigma.", nullable=True),
        F("margin", pa.float64(), "The window's max-T divided by the largest control step's max-T: how far "
          "beyond every normal step the window lies (a `data` verdict needs >= 2 by default).", nullable=True),
        F("top_signal", pa.string(), "Signal with the largest |z| at the most anomalous window step.",
          nullable=True),
        F("top_step", pa.int64(), "The most anomalous window step (where the skip list points).", nullable=True),
        F("top_shards", pa.list_(pa.string()), "Shards holding the flagged rows, most flagged first."),
        F("n_controls", pa.int64(), "Number of control steps compared against."),
        F("n_window_steps", pa.int64(), "Steps in the spike window that had data."),
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

TABLES = (LOSS_SERIES, SPIKES, ALIGNED_SPIKES, STEP_MANIFEST, BATCH_SCORES, SHARD_SCORES, ROW_FLAGS, VERDICTS,
          DUPLICATES, ROW_LOSSES, LOSS_ROWS)
