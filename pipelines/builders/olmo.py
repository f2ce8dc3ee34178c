"""OLMo / OLMo-core: ``global_indices`` over concatenated token memmaps -> STEP_MANIFEST.

The trainers' data order, as this builder reproduces it:

- The data files (``data.paths``, in config order) are flat token memmaps (uint16 or uint32, no
  header). File ``f`` holds ``size_f // (itemsize * seq_len)`` instances (leftover tokens dropped);
  instance ``i`` of the concatenation is (file ``f``, local ``i - cum[f]``) with ``cum`` the
  cumulative counts, i.e. tokens ``[local * seq_len, (local + 1) * seq_len)`` of file ``f``.
- ``global_indices`` (``global_indices.npy`` in the run's save/work dir) is a raw uint32 memmap
  without a header (a real ``.npy`` is accepted too). Batch ``b`` (0-based) is
  ``global_indices[b * gbs:(b + 1) * gbs]`` with ``gbs`` the global batch size in instances.
- Both trainers increment the step before training on a batch (OLMo-core's ``global_step`` is
  1-based), so their step ``s`` trained batch ``s - 1``; the manifest's steps are 0-based batch
  indices (the one step convention): batch ``b`` is step ``first_step + b`` with ``first_step = 0``.
- Ranks (optional, ``world_size``): OLMo's ``IterableDataset`` takes ``indices[rank::world_size]``
  and OLMo-core's data loader ``batch[:, dp_rank::dp_world_size]``: either way position ``p`` of a
  global batch goes to rank ``p % world_size``, which then splits its ``gbs / world_size``
  instances into micro-batches of ``micro_batch_size`` in order. Position ``p`` is the slice's
  ``batch_pos``.

Slices are ``unit='token'`` ranges of exactly ``seq_len`` tokens (OLMo shifts inputs/labels
inside the instance, so no extra token is read).
"""

from __future__ import annotations

import logging
import os
import random
import re

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.builders.step_range import batch_range
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import manifest_from_arrays, with_meta
from spike_audit.pipelines.shards.paths import _open, _size, user_path

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
            full = user_path(shard_root, p)
            try:
                file_sizes.append(_size(full))
            except FileNotFoundError:
                raise UserError(f"data file '{p}' not found ({full})") from None
    return np.asarray(file_sizes, np.int64) // (itemsize * seq_len)


def build_olmo_manifest(global_indices, paths: list[str], *, seq_len: int, global_batch_size: int,
                        dtype="uint16", shard_root: str | None = None, first_step: int = 0,
                        steps: tuple[int, int] | None = None, world_size: int | None = None,
                        micro_batch_size: int | None = None, file_sizes: list[int] | None = None,
                        source: str | None = None) -> pa.Table:
    """STEP_MANIFEST of an OLMo / OLMo-core run.

    ``global_indices``: path or array. ``paths``: the data files in config order, as they should
    appear in the manifest (relative to ``shard_root``). ``steps``: optional inclusive
    ``(first, last)`` step range to emit (default: every full global batch).
    """
    if seq_len <= 0 or global_batch_size <= 0:
        raise UserError(f"seq_len and global batch size must be positive, got {seq_len} and {global_batch_size}")
    if not paths:
        raise UserError("no data files given")
    src = source or (str(global_indices) if not isinstance(global_indices, np.ndarray) else "<global_indices>")
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
        i = int(bad[0])
        what = "is negative" if inst[i] < 0 else f"is past the {cum[-1]} instances of the {len(paths)} data files"
        raise UserError(f"{src}: position {pos[i]}: instance {inst[i]} {what} (expected 0..{cum[-1] - 1}; seq_len "
                        f"{seq_len}, dtype {np.dtype(dtype).name})")
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
    table = manifest_from_arrays(first_step + pos // global_batch_size, shard, local * seq_len,
                                 (local + 1) * seq_len, "token", rank, micro, batch_pos=in_batch)
    return with_meta(table, trainer="olmo", token_dtype=np.dtype(dtype).name, seq_len=int(seq_len), extra_token=False,
                     samples_per_step=int(global_batch_size), tokens_per_step=int(global_batch_size) * int(seq_len),
                     first_step=int(first_step), samples_before_first_step=0, tokens_before_first_step=0)


#: OLMo-core 3.0 dataset classes whose instances are not fixed windows of the token files in global-indices
#: order (what this builder replays), with why
UNSUPPORTED_DATASETS = {
    "numpypaddedfsldataset": "pads each document to its own instance (instances are not fixed windows of the files)",
    "numpypackedfsldataset": "packs documents into instances (best-fit decreasing, not fixed windows)",
    "numpyinterleavedfsldataset": "interleaves chunks of several documents into each instance",
    "numpyfsldatasetmixture": "keeps a per-source share of instances chosen by its source mixture (path_offset_index)",
    "numpyvsldataset": "variable sequence lengths (instances bucketed by document length)",
}


def check_dataset_class(name: str) -> None:
    """Refuse, by name, an OLMo-core dataset class whose data order this builder does not replay."""
    key = str(name).strip().lower().removesuffix("config")
    if key in ("numpyfsldataset", "fsl"):
        return
    why = UNSUPPORTED_DATASETS.get(key)
    if why is None:
        raise UserError(f"--dataset {name}: not an OLMo-core dataset class this builder knows (expected "
                        f"NumpyFSLDataset)")
    raise UserError(f"--dataset {name} is not supported: it {why}; only NumpyFSLDataset is")


_EPOCH_RE = re.compile(r"(?:^|_)epoch(\d+)(?:_|\.|$)")
_SIZE_RE = re.compile(r"(?:^|_)dataset_size(\d+)(?:_|\.|$)")
_CHUNK_RE = re.compile(r"(?:^|_)chunk(\d+)(?:_|\.|$)")


def permute_sources(paths: list[str], seed: int) -> list[str]:
    """OLMo-core's ``source_permutation_seed``: ``random.Random(seed).shuffle`` of the path order."""
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    return [paths[i] for i in order]


def build_olmo_core_manifest(indices_files: list, paths: list[str], *, seq_len: int,
                             global_batch_size: int | None = None, global_batch_tokens: int | None = None,
                             dtype="uint16", max_target_sequence_length: int | None = None,
                             source_permutation_seed: int | None = None, epoch: int | None = None,
                             shard_root: str | None = None, first_step: int = 0,
                             steps: tuple[int, int] | None = None, world_size: int | None = None,
                             micro_batch_size: int | None = None, micro_batch_tokens: int | None = None,
                             file_sizes: list[int] | None = None) -> pa.Table:
    """STEP_MANIFEST of an OLMo-core (``NumpyFSLDataset`` + ``NumpyFSLDataLoader``) run over one or
    more epochs, each with its own global indices file (``global_indices_..._epochN_..._v1.npy``).

    OLMo-core's batch size is in tokens (``global_batch_tokens``; ``global_batch_size`` is instances,
    give one). ``paths`` are the data files in config order (after glob expansion); with
    ``source_permutation_seed`` they are permuted as OLMo-core does. ``max_target_sequence_length``
    changes how many instances each file holds (``size // (itemsize * mtsl) * (mtsl // seq_len)``).
    Epoch ``e`` starts at batch index ``(e - 1) * batches_per_epoch`` (FSL epochs all have
    ``instances // instances_per_batch`` batches); ``first_step`` is the batch index of epoch 1's first
    batch (0; steps are 0-based batch indices: OLMo-core's 1-based ``global_step`` s is batch s - 1).
    The epoch of a file comes from its name (OLMo-core's ``epochN`` field) or ``epoch`` (one file).
    The name's ``dataset_size`` and ``chunk`` fields are checked against the settings.
    """
    if (global_batch_size is None) == (global_batch_tokens is None):
        raise UserError("give the global batch size once: in tokens (OLMo-core's global_batch_size) or in instances")
    if seq_len <= 0:
        raise UserError(f"seq_len must be positive, got {seq_len}")
    if global_batch_tokens is not None:
        if global_batch_tokens <= 0 or global_batch_tokens % seq_len:
            raise UserError(f"global batch of {global_batch_tokens} tokens is not a positive multiple of "
                            f"seq_len {seq_len}")
        global_batch_size = global_batch_tokens // seq_len
    if micro_batch_tokens is not None:
        if micro_batch_size is not None:
            raise UserError("give the micro-batch size once: in tokens or in instances")
        if micro_batch_tokens <= 0 or micro_batch_tokens % seq_len:
            raise UserError(f"micro-batch of {micro_batch_tokens} tokens is not a positive multiple of seq_len {seq_len}")
        micro_batch_size = micro_batch_tokens // seq_len
    mtsl = max_target_sequence_length
    if mtsl is not None and (mtsl < seq_len or mtsl % seq_len):
        raise UserError(f"max_target_sequence_length {mtsl} is not a multiple of seq_len {seq_len}")
    if not paths:
        raise UserError("no data files given")
    if source_permutation_seed is not None:
        paths = permute_sources(list(paths), source_permutation_seed)
        if file_sizes is not None:
            file_sizes = permute_sources(list(file_sizes), source_permutation_seed)
    if mtsl is not None and mtsl != seq_len:
        blocks = instance_counts(shard_root, paths, mtsl, dtype, file_sizes)
        sizes = list(blocks * (mtsl * np.dtype(dtype).itemsize))  # same instance counts, whole blocks only
    else:
        sizes = list(file_sizes) if file_sizes is not None else None
    counts = instance_counts(shard_root, paths, seq_len, dtype, sizes)
    n_inst = int(counts.sum())
    per_epoch = n_inst // global_batch_size
    if per_epoch == 0:
        hint = (" (is that the size in tokens? pass it as the batch size in tokens)"
                if global_batch_tokens is None and global_batch_size % seq_len == 0 else "")
        raise UserError(f"a global batch of {global_batch_size} instances is larger than the {n_inst} instances of "
                        f"the data files (seq_len {seq_len}, dtype {np.dtype(dtype).name}){hint}")
    files = [indices_files] if isinstance(indices_files, (str, np.ndarray)) else list(indices_files)
    if not files:
        raise UserError("no global indices file given")
    epochs = []
    for k, gi in enumerate(files):
        name = os.path.basename(str(gi)) if not isinstance(gi, np.ndarray) else ""
        m = _EPOCH_RE.search(name)
        if m:
            e = int(m.group(1))
            if epoch is not None and len(files) == 1 and e != epoch:
                raise UserError(f"{name}: the file name says epoch {e}, --epoch says {epoch}")
        elif epoch is not None and len(files) == 1:
            e = epoch
        elif len(files) == 1:
            e = 1
        else:
            raise UserError(f"{gi}: cannot tell which epoch this indices file is for (OLMo-core names them "
                            f"..._epochN_...); pass one file with its epoch")
        if e < 1:
            raise UserError(f"{gi}: epoch {e}: OLMo-core numbers epochs from 1")
        m = _SIZE_RE.search(name)
        if m and int(m.group(1)) != n_inst:
            raise UserError(f"{name}: written for a dataset of {int(m.group(1))} instances, but these settings give "
                            f"{n_inst} (check the data files, seq_len, dtype and max_target_sequence_length)")
        m = _CHUNK_RE.search(name)
        chunk = (mtsl // seq_len) if mtsl else 1
        if m and int(m.group(1)) != chunk:
            raise UserError(f"{name}: written with chunk {int(m.group(1))} (max_target_sequence_length / seq_len); "
                            f"these settings give {chunk}: pass the run's max_target_sequence_length")
        if not m and chunk > 1 and name.startswith("global_indices"):
            raise UserError(f"{name}: has no chunk field, so the run had no max_target_sequence_length above seq_len")
        epochs.append((e, gi))
    seen = [e for e, _ in epochs]
    if len(set(seen)) != len(seen):
        raise UserError(f"two global indices files are for the same epoch ({sorted(seen)})")
    tables = []
    for e, gi in sorted(epochs, key=lambda t: t[0]):
        step0 = first_step + (e - 1) * per_epoch
        if steps is not None and (steps[1] < step0 or steps[0] > step0 + per_epoch - 1):
            continue
        indices = gi if isinstance(gi, np.ndarray) else load_global_indices(gi)
        if len(indices) < per_epoch * global_batch_size:
            raise UserError(f"{gi}: {len(indices)} indices, but an epoch of these settings is {per_epoch} batches of "
                            f"{global_batch_size} instances = {per_epoch * global_batch_size} (check seq_len, the "
                            "data files and dtype)")
        tables.append(build_olmo_manifest(np.asarray(indices[:per_epoch * global_batch_size]), paths,
                                          seq_len=seq_len, global_batch_size=global_batch_size, dtype=dtype,
                                          shard_root=shard_root, first_step=step0, steps=steps,
                                          world_size=world_size, micro_batch_size=micro_batch_size,
                                          file_sizes=sizes, source=None if isinstance(gi, np.ndarray) else str(gi)))
    if not tables:
        raise UserError(f"steps {steps[0]}..{steps[1]} are outside the epochs given "
                        f"({per_epoch} steps an epoch from step {first_step})")
    # the run description of the whole run: batches are contiguous over epochs from epoch 1's first batch
    return with_meta(pa.concat_tables(tables), first_step=int(first_step), samples_before_first_step=0,
                     tokens_before_first_step=0)
