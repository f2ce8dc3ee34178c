"""The one step convention: how spike-audit numbers training steps, and how each trainer's own
numbering maps to it.

Everything that joins a loss log to data works on the **batch index**: the 0-based index of the global
batch the step consumed, counted from the start of training (a resumed run keeps counting). Builders
write manifests on it (``step`` of ``STEP_MANIFEST``); log readers map their trainer's numbering to it;
``spike-audit run`` joins on it and checks that the log and the manifest agree.

A trainer's logged step ``s`` is batch index ``s - base``. The bases, from each trainer's own source:

* ``megatron`` (Megatron-LM / megatron-core, also its TensorBoard / W&B scalars): base 1.
  ``megatron/training/training.py`` increments ``iteration`` after ``train_step`` and then calls
  ``training_log(iteration)``; ``consumed samples`` printed with it counts the samples of iterations
  ``1..N``. ``--iterations-to-skip N`` skips the N-th batch.
* ``olmo`` (OLMo-core ``Trainer``, OLMo console logs): base 1. ``Trainer.global_step`` is documented as
  1-based: it is incremented before the batch is trained, so step ``s`` used batch ``s - 1``.
* ``torchtitan``: base 1. ``Trainer.train`` does ``self.step += 1`` and then ``train_step`` draws the
  batch; ``step: s`` is the s-th batch.
* ``modded-nanogpt``: base 1. The loop index ``step`` is 0-based and the line printed after the
  optimizer step is ``step:{step+1}/N train_loss``.
* ``hf`` (Hugging Face ``Trainer``, ``trainer_state.json``): base 1. ``state.global_step`` is
  incremented after each optimizer step and logged with the loss; a logged loss is the mean over the
  optimizer steps since the previous log, the last of which is batch ``global_step - 1``.
* ``llm.c``: base 0. ``logger_log_train(&logger, step, ...)`` writes ``s:{step}`` with the 0-based loop
  index of the batch just trained (its stdout line shows ``step + 1``).
* ``nanogpt`` (nanoGPT ``train.py``): base 0. ``iter {iter_num}: loss`` is printed before ``iter_num``
  is incremented, for the batch of that iteration.

A log whose format does not say which trainer wrote it (JSONL, CSV, TensorBoard, ``--pattern``) has no
known base; ``spike-audit run`` then needs ``--log-trainer`` (or ``--step-offset``).
"""

from __future__ import annotations

#: The only convention spike-audit writes: ``step`` is the 0-based global batch index.
STEP_CONVENTION = "batch_index"

#: trainer -> base: the trainer's logged step ``s`` is batch index ``s - base``.
TRAINER_STEP_BASE: dict[str, int] = {
    "megatron": 1,
    "olmo": 1,
    "torchtitan": 1,
    "modded-nanogpt": 1,
    "hf": 1,
    "llm.c": 0,
    "nanogpt": 0,
    "batch-index": 0,  # a log that already numbers steps by 0-based batch index
}

#: what the trainer calls its step in its log, where that is not "step"
STEP_WORD: dict[str, str] = {"megatron": "iteration", "nanogpt": "iter", "hf": "global_step"}

#: log format -> the trainer whose numbering it uses (None: the format does not say).
FORMAT_TRAINER: dict[str, str | None] = {
    "megatron": "megatron",
    "megatron-golden": "megatron",
    "modded-nanogpt": "modded-nanogpt",
    "llmc": "llm.c",
    "nanogpt": "nanogpt",
    "torchtitan": "torchtitan",
    "olmo": "olmo",
    "hf-trainer-state": "hf",
    "jsonl": None,
    "csv": None,
    "tensorboard": None,
    "pattern": None,
}


def as_logged(trainer: str | None, batch_index: int) -> str | None:
    """How ``trainer``'s log names batch ``batch_index`` (``megatron iteration 920``); None when unknown."""
    base = step_base(trainer)
    if base is None:
        return None
    return f"{trainer} {STEP_WORD.get(trainer, 'step')} {batch_index + base}"


def step_base(trainer: str | None) -> int | None:
    """The base of ``trainer``'s numbering (logged step = batch index + base); None when unknown."""
    return None if trainer is None else TRAINER_STEP_BASE.get(trainer)
