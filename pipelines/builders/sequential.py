"""Sequential token-file loaders -> STEP_MANIFEST.

Two variants, both reading ``B * T + 1`` tokens per rank per micro-step from sorted shard files
(flat token files: modded-nanogpt / llm.c ``.bin`` with the 256 x int32 header, magic 20240520,
or header-less nanoGPT-style ``.bin`` memmaps, uint16 by default) and cycling through the shards:

``modded-nanogpt``: ``DistributedDataLoader`` as in the modded-nanogpt records of 2024-10 (and
build-nanogpt). Each rank starts at ``rank * B * T``; after each batch its position advances by
``B * T * world``; it moves to the next shard as soon as ``position + B * T * world + 1 > ntok``
(tested on the rank's own position, so ranks can leave a shard at different batches, as the
original does).

``llm.c``: ``dataloader.h`` without shuffling. A shard holds
``(ntok - 1) // (B * T * world)`` batches for every rank; batch ``j`` of rank ``r`` starts at token
``j * B * T * world + r * B * T``; after the last one the loader moves to the next shard (after the
last shard it starts over).

Steps: both training loops fetch ``grad_accum`` batches per optimizer step, so batch ``g`` (0-based,
per rank) belongs to step ``first_step + g // grad_accum`` (``first_step = 0``: steps are 0-based batch
indices; modded-nanogpt logs that step as ``step:{step+1}``, llm.c's log file as ``s:{step}``),
micro-batch ``g % grad_accum``. When the loader wraps around to the first shard again, the slices'
``epoch`` counts the passes. Each rank's window is split the way the model
sees it, into ``B`` sequences of ``T + 1`` tokens (``x = buf[:-1].view(B, T)``, ``y = buf[1:]``):
sequence ``b`` is ``[start + b * T, start + (b + 1) * T + 1)``. Its ``batch_pos`` in the step's global batch is
``(micro_batch * world_size + rank) * B + b`` (micro-step major, then rank, as Megatron's sampler orders a batch).

nanoGPT's own ``get_batch`` samples random offsets with ``torch.randint`` and llm.c's shuffling
uses its own mt19937 stream: neither is reproduced here.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import manifest_from_arrays, with_meta
from spike_audit.pipelines.shards.paths import user_path
from spike_audit.pipelines.shards.tokens import open_token_file

log = logging.getLogger(__name__)

VARIANTS = ("modded-nanogpt", "llm.c")


def shard_token_counts(shard_root: str | None, paths: list[str], dtype=None, *, with_dtypes: bool = False):
    out, dtypes = [], set()
    for p in paths:
        full = user_path(shard_root, p)
        try:
            tf = open_token_file(full, dtype)
        except FileNotFoundError:
            raise UserError(f"shard '{p}' not found ({full})") from None
        out.append(tf.n_tokens)
        dtypes.add(np.dtype(tf.dtype).name)
    counts = np.asarray(out, np.int64)
    return (counts, dtypes) if with_dtypes else counts


def batches_per_shard(ntok: np.ndarray, B: int, T: int, world_size: int, variant: str) -> np.ndarray:
    """``(n_shards, world_size)`` batches each rank reads from each shard before moving on."""
    bt, btw = B * T, B * T * world_size
    ranks = np.arange(world_size, dtype=np.int64)
    if variant == "llm.c":
        k = (ntok[:, None] - 1) // btw
        return np.broadcast_to(k, (len(ntok), world_size)).copy()
    if variant == "modded-nanogpt":
        # Batch 0 is always read; batch j >= 1 is read while j*btw + r*bt + btw + 1 <= ntok.
        k = (ntok[:, None] - 1 - ranks[None, :] * bt) // btw
        return np.maximum(k, 1)
    raise UserError(f"unknown sequential loader variant {variant!r} (expected one of {', '.join(VARIANTS)})")


MAX_SLICES = 1 << 31  # manifest rows built in memory (--num-steps 10**12 was a MemoryError traceback)


def build_sequential_manifest(paths: list[str], *, batch_size: int, seq_len: int, world_size: int = 1,
                              num_steps: int, grad_accum: int = 1, variant: str = "modded-nanogpt",
                              shard_root: str | None = None, first_step: int = 0, dtype=None,
                              token_counts: list[int] | None = None) -> pa.Table:
    """STEP_MANIFEST of a sequential loader run over ``paths`` (sorted, as the loaders glob them).

    ``batch_size`` (B) and ``seq_len`` (T) are per rank per micro-step; ``num_steps`` optimizer
    steps of ``grad_accum`` micro-steps each are emitted.
    """
    if variant not in VARIANTS:
        raise UserError(f"unknown sequential loader variant {variant!r} (expected one of {', '.join(VARIANTS)})")
    if min(batch_size, seq_len, world_size, grad_accum) <= 0 or num_steps <= 0:
        raise UserError("batch size, sequence length, world size, grad accumulation and steps must be positive")
    if not paths:
        raise UserError("no shard files given")
    paths = sorted(paths)
    if token_counts is not None:
        ntok, dtypes = np.asarray(token_counts, np.int64), ({np.dtype(dtype).name} if dtype is not None else set())
    else:
        ntok, dtypes = shard_token_counts(shard_root, paths, dtype, with_dtypes=True)
    bt, btw = batch_size * seq_len, batch_size * seq_len * world_size
    small = np.flatnonzero(ntok < btw + 1)
    if len(small):
        raise UserError(f"shard '{paths[small[0]]}' has {ntok[small[0]]} tokens, fewer than B*T*world+1 = {btw + 1} "
                        f"(the loaders refuse such shards)")
    per = batches_per_shard(ntok, batch_size, seq_len, world_size, variant)  # (shards, ranks)
    n_batches = num_steps * grad_accum
    if n_batches * world_size > MAX_SLICES:
        raise UserError(f"{num_steps:,} steps x {grad_accum} micro-batches x {world_size} ranks are more than the "
                        f"{MAX_SLICES:,} slices a manifest is built with here; check --num-steps")
    g = np.arange(n_batches, dtype=np.int64)
    cols = {k: [] for k in ("step", "shard", "start", "rank", "micro", "epoch")}
    for r in range(world_size):  # one vectorised pass per rank
        cum = np.concatenate([[0], np.cumsum(per[:, r])])
        epoch, within = np.divmod(g, cum[-1])
        shard = np.searchsorted(cum, within, side="right") - 1
        j = within - cum[shard]
        start = j * btw + r * bt
        cols["step"].append(first_step + g // grad_accum)
        cols["shard"].append(shard)
        cols["start"].append(start)
        cols["rank"].append(np.full(n_batches, r, np.int64))
        cols["micro"].append(g % grad_accum)
        cols["epoch"].append(epoch)
    step, shard, start, rank, micro, epoch = (np.concatenate(cols[k])
                                              for k in ("step", "shard", "start", "rank", "micro", "epoch"))
    # B sequences of T + 1 tokens per window.
    b = np.tile(np.arange(batch_size, dtype=np.int64), len(step))
    rep = lambda a: np.repeat(a, batch_size)  # noqa: E731
    seq_start = rep(start) + b * seq_len
    names = pa.array(np.asarray(paths, dtype=object)[rep(shard)], pa.string())
    # position in the global batch: micro-step major, then rank, then the sequence in the rank's batch
    pos = (rep(micro) * world_size + rep(rank)) * batch_size + b
    table = manifest_from_arrays(rep(step), names, seq_start, seq_start + seq_len + 1, "token", rep(rank), rep(micro),
                                 batch_pos=pos, epoch=rep(epoch))
    per_step = batch_size * world_size * grad_accum
    return with_meta(table, trainer=variant, token_dtype=dtypes.pop() if len(dtypes) == 1 else None, seq_len=seq_len,
                     extra_token=True, samples_per_step=per_step, tokens_per_step=per_step * seq_len,
                     first_step=int(first_step), samples_before_first_step=0, tokens_before_first_step=0)
