"""Readers for training-loss logs: one ``LOSS_SERIES`` table per log, plus a parse report.

Modules: ``read`` (``read_log``, the entry point), ``sniff`` (format detection), ``structured`` (JSONL, CSV,
golden values, HF trainer state), ``stdout`` (trainers' console output), ``tensorboard`` (event files),
``restarts`` (the restart rule), ``lines`` (what they share).

May import: :mod:`spike_audit.pipelines.errors`, :mod:`spike_audit.pipelines.files`, :mod:`spike_audit.schemas`;
never Beam, auditors or another pipelines package.

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

* Text is streamed in chunks of whole lines (``lines.CHUNK_BYTES``, 4 MiB) and each chunk is parsed with a few
  vectorised Arrow regex passes (``pyarrow.compute.extract_regex``), not a Python loop per line; values accumulate
  as numpy arrays (memory grows with the number of values, not with the file). JSONL chunks go through Arrow's JSON
  reader (``json.loads`` per line only in a chunk Arrow rejects); only the candidate step/loss/grad-norm keys are
  kept, and the keys are chosen at the end from every key seen.
* Input bytes (:mod:`spike_audit.pipelines.files`): regular files only (a FIFO, a device or a socket is refused at
  once); ``.gz`` / ``.zst`` content is decompressed as a stream that reads every member / frame, and a truncated or
  corrupt stream is an error, never a silent prefix. A UTF-8 BOM is dropped (UTF-16/32 logs with a BOM are
  transcoded); line ends are universal (``\\n``, ``\\r\\n``, a lone ``\\r``; line numbers count those); bytes that
  are not UTF-8 become U+FFFD; a line longer than 64 MiB or a JSON document larger than 512 MiB is refused.
* A line that carries the format's *marker* (e.g. ``step:`` at the start for modded-nanogpt) but does not parse
  is *malformed*: counted, its line number reported, and with ``strict=True`` the first one raises
  ``UserError("path:LINE: expected ..., got ...")``. Markers admit any step text, so ``step:-3`` or ``step:abc``
  is malformed, not ignored. Lines without the marker are *ignored* (counted, not errors). NaN / inf values are
  kept as logged (a number beyond float64, like ``1e999``, is inf).
* Steps are non-negative integers that fit int64 (up to 18 digits in text; in JSON an integral float is exact only
  up to 2^53, so a larger float step is malformed): never wrapped, never able to discard earlier values.
* A last line without a newline that ends in a digit (or ``.``, ``e``, ``+``, ``-``) may have been cut mid-number
  by a killed writer: its values are malformed, not accepted.
* Restarts: within one (run, metric), a value survives only if no later line logs a step ``<=`` its
  step. So a repeated step is replaced by the later value, and a step going back (a resume from an
  earlier checkpoint) replaces every earlier value at steps ``>=`` the resume point. The number of
  replaced values is reported.
* Several runs in one file: for formats that print the planned total (``k/N``), a file in which
  ``N`` changes holds several runs (concatenated logs, excerpts). Each ``N`` then becomes its own run
  ``{run}@{N}`` (so a resume that also changed ``--train-iters`` shows up as two runs).
"""
