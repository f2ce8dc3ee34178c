"""Readers for training-loss logs: one ``LOSS_SERIES`` table per log, plus a parse report.

Modules: ``read`` (``read_log``, the entry point), ``sniff`` (format detection), ``structured`` (JSONL, CSV,
golden values, HF trainer state), ``stdout`` (trainers' console output), ``tensorboard`` (event files),
``restarts`` (the restart rule), ``lines`` (what they share).

May import: :mod:`spike_audit.pipelines.errors`, :mod:`spike_audit.schemas`; never Beam, auditors or another
pipelines package.

Supported formats (``FORMATS``; auto-detected from the content unless ``format=`` is given):

========================  ======================================================================
``jsonl``                 one JSON object per line (``{"step": .., "loss": ..}``, W&B history rows)
``csv``                   W&B export (``Step,train/loss,...``); empty cells are missing, not errors
``megatron``              Megatron-LM / Megatron-DeepSpeed stdout ``iteration N/ M | ... lm loss: X |``
``megatron-golden``       Megatron functional-test golden values JSON (``{"lm loss": {"values": ..}}``)
``modded-nanogpt``        ``step:k/N train_loss:x ...`` (and ``val_loss`` lines)
``llmc``                  llm.c ``s:k trl:x lr:y norm:z`` / ``s:k tel:x``
``nanogpt``               nanoGPT ``iter k: loss x, time ...`` (and ``step k: train loss x, val loss y``)
``torchtitan``            ``step: k  loss: x  grad_norm: g ...`` (ANSI colours stripped)
``olmo``                  OLMo console ``[step=N/M,...]`` then ``train/CE loss=x`` lines
``hf-trainer-state``      Hugging Face ``trainer_state.json`` (``log_history``)
``tensorboard``           TensorBoard event files (a file, or a directory of ``*tfevents*`` files)
``pattern``               any text log, with ``pattern=`` a regex with named groups ``step``, ``value``
========================  ======================================================================

Metric names: ``train_loss``, ``val_loss``, ``grad_norm``, ``lr``, ``consumed_samples`` (Megatron; used
to join steps to data), or the log's own key for other scalars (golden values).

Rules every reader shares:

* Text is read whole (``.gz`` and ``.zst`` are decompressed transparently) and parsed with a few
  vectorised Arrow regex passes over all lines (``pyarrow.compute.extract_regex``), not a Python loop
  per line (JSONL falls back to ``json.loads`` per line only when Arrow's JSON reader rejects the file).
* A line that carries the format's *marker* (e.g. ``step:`` at the start for modded-nanogpt) but does
  not parse is *malformed*: counted, its line number reported, and with ``strict=True`` the first one
  raises ``UserError("path:LINE: expected ..., got ...")``. Lines without the marker are *ignored*
  (counted, not errors). NaN / inf values are kept as logged.
* Restarts: within one (run, metric), a value survives only if no later line logs a step ``<=`` its
  step. So a repeated step is replaced by the later value, and a step going back (a resume from an
  earlier checkpoint) replaces every earlier value at steps ``>=`` the resume point. The number of
  replaced values is reported.
* Several runs in one file: for formats that print the planned total (``k/N``), a file in which
  ``N`` changes holds several runs (concatenated logs, excerpts). Each ``N`` then becomes its own run
  ``{run}@{N}`` (so a resume that also changed ``--train-iters`` shows up as two runs).
"""
