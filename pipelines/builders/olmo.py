"""OLMo / OLMo-core: ``global_indices`` over concatenated token memmaps -> STEP_MANIFEST.

The trainers' data order, as this builder reproduces it:

- The data files (``data.paths``, in config order) are flat token memmaps (uint16 or uint32, no
  header). File ``f`` holds ``size_f // (itemsize * seq_len)`` instances (leftover tokens dropped);
  instance ``i`` of the concatenation is (file ``f``, local ``i - cum[f]``) with ``cum`` the
  cumulative counts, i.e. tokens ``[local * seq_len, (local + 1) * seq_len)`` of file ``f``.
- ``global_indices`` (``global_indices.npy`` in the run's save/work dir) is a raw uint32 memmap
  without a header (a real ``.npy`` is accepted too). Batch ``b`` (0-based) is
  ``global_indices[b * gbs:(b + 1) * gbs]`` with ``gbs`` the global batch size in instances.
- Both trainers increment the step before training on a batch, so batch ``b`` is step
  ``first_step + b`` with ``first_step = 1``.
- Ranks (optional, ``world_size``): OLMo's ``IterableDataset`` takes ``indices[rank::world_size]``
  and OLMo-core's data loader ``batch[:, dp_rank::dp_world_size]``: either way position ``p`` of a
  global batch goes to rank ``p % world_size``, which then splits its ``gbs / world_size``
  instances into micro-batches of ``micro_batch_size`` in order.

Slices are ``unit='token'`` ranges of exactly ``seq_len`` tokens (OLMo shifts inputs/labels
inside the instance, so no extra token is read).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.builders.step_range import batch_range
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import manifest_from_arrays
from spike_audit.pipelines.shards.paths import _open, _size, resolve

log = logging.getLogger(__name__)


def load_global_indices(path: str) -> np.ndarray:
    """OLMo's ``global_indices`` file as a read-only array (raw uint32 memmap or a real ``.npy``)."""
    p = str(path)
    try:
        with _open(p) as f:
            magic = f.read(6)
    except FileNotFoundError:
        raise UserError(f"{p}: global indices file not found") from None
    if magic == b"\x93NUMPY":
        arr = np.load(p, mmap_mode="r")
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise UserError(f"{p}: expected a 1-D integer array of instance indices, got {arr.dtype} {arr.shape}")
        return arr
    size = _size(p)
    if size % 4:
        raise UserError(f"{p}: {size} bytes is not a whole number of uint32 indices (raw memmap expected)")
    return np.memmap(p, dtype=np.uint32, mode="r") if size else np.zeros(0, np.uint32)


def instance_counts(shard_root: str | None, paths: list[str], seq_len: int, dtype="uint16",
                    file_sizes: list[int] | None = None) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if file_sizes is None:
        file_sizes = []
        for p in paths:
            full = resolve(shard_root, p)
            try:
                file_sizes.append(_size(full))
            except FileNotFoundError:
                raise UserError(f"data file '{p}' not found ({full})") from None
    return np.asarray(file_sizes, np.int64) // (itemsize * seq_len)


def build_olmo_manifest(global_indices, paths: list[str], *, seq_len: int, global_batch_size: int,
                        dtype="uint16", shard_root: str | None = None, first_step: int = 1,
                        steps: tuple[int, int] | None = None, world_size: int | None = None,
                        micro_batch_size: int | None = None, file_sizes: list[int] | None = None) -> pa.Table:
    """STEP_MANIFEST of an OLMo / OLMo-core run.

    ``global_indices``: path or array. ``paths``: the data files in config order, as they should
    appear in the manifest (relative to ``shard_root``). ``steps``: optional inclusive
    ``(first, last)`` step range to emit (default: every full global batch).
    """
    if seq_len <= 0 or global_batch_size <= 0:
        raise UserError(f"seq_len and global batch size must be positive, got {seq_len} and {global_batch_size}")
    if not paths:
        raise UserError("no data files given")
    src = str(global_indices) if not isinstance(global_indices, np.ndarray) else "<global_indices>"
    indices = global_indices if isinstance(global_indices, np.ndarray) else load_global_indices(global_indices)
    counts = instance_counts(shard_root, paths, seq_len, dtype, file_sizes)
    cum = np.concatenate([[0], np.cumsum(counts)])
    n_batches = len(indices) // global_batch_size
    if len(indices) % global_batch_size:
        log.info("%s: %d trailing indices do not fill a global batch of %d; not emitted", src,
                 len(indices) % global_batch_size, global_batch_size)
    b0, b1 = batch_range(n_batches, steps, first_step, src)
    pos = np.arange(b0 * global_batch_size, b1 * global_batch_size, dtype=np.int64)
    inst = np.asarray(indices[b0 * global_batch_size:b1 * global_batch_size], dtype=np.int64)
    bad = np.flatnonzero((inst < 0) | (inst >= cum[-1]))
    if len(bad):
        raise UserError(f"{src}: position {pos[bad[0]]}: instance {inst[bad[0]]} is past the {cum[-1]} instances "
                        f"of the {len(paths)} data files (seq_len {seq_len}, dtype {np.dtype(dtype).name})")
    f = np.searchsorted(cum, inst, side="right") - 1
    local = inst - cum[f]
    in_batch = pos % global_batch_size
    rank = micro = None
    if world_size:
        if global_batch_size % world_size:
            raise UserError(f"global batch size {global_batch_size} is not divisible by world size {world_size}")
        rank = in_batch % world_size
        if micro_batch_size:
            micro = (in_batch // world_size) // micro_batch_size
    shard = pa.array(np.asarray(paths, dtype=object)[f], pa.string())
    return manifest_from_arrays(first_step + pos // global_batch_size, shard, local * seq_len, (local + 1) * seq_len,
                                "token", rank, micro)
