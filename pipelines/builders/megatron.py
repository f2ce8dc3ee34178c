"""Megatron-LM ``GPTDataset`` index caches + ``.bin/.idx`` -> STEP_MANIFEST.

What Megatron does (``megatron/core/datasets/gpt_dataset.py``), and this builder replays from the
cached arrays without rebuilding them:

- ``document_index`` (``{hash}-GPTDataset-{split}-document_index.npy``): sequence ids of the
  ``.idx`` in epoch-shuffled order.
- ``sample_index`` (``...-sample_index.npy``, shape ``(num_samples + 1, 2)``): sample ``j`` starts at
  (position ``sample_index[j, 0]`` in ``document_index``, token offset ``sample_index[j, 1]``) and
  ends at row ``j + 1``. A sample holds ``seq_len + 1`` tokens (``add_extra_token_to_sequence``,
  the default), may cross documents, and shares its last token with the next sample.
- ``shuffle_index`` (``...-shuffle_index.npy``): dataset item ``k`` is sample ``shuffle_index[k]``.
- ``_query_document_sample_shuffle_indices(k)``: for document positions ``i`` from the begin to the
  end position, reads sequence ``document_index[i]`` from offset ``beg_offset`` (first piece, else
  0) to ``end_offset + add_extra_token`` (last piece, else the sequence end).
- Iteration ``i`` (1-based, as logged) consumes dataset items
  ``[consumed + (i - first_step) * gbs, consumed + (i - first_step + 1) * gbs)`` (no batch-size
  ramp-up). With ``micro_batch_size`` and ``data_parallel_size`` the
  ``MegatronPretrainingSampler`` split is recorded: position ``p`` of the global batch is
  micro-batch ``p // (mbs * dp)`` on rank ``(p % (mbs * dp)) // mbs``. Every slice records ``p`` as its
  ``batch_pos`` and its document order within the sample as ``seq_piece``.

Each document piece becomes one ``unit='token'`` slice into the ``.bin``:
``[pointer / itemsize + start, pointer / itemsize + end)``; empty pieces are dropped.
Older caches named ``*_doc_idx.npy``, ``*_sample_idx.npy``, ``*_shuffle_idx.npy`` are found too.
Blended datasets (``BlendedDataset``) are not handled: build one manifest per member dataset.
"""

from __future__ import annotations

import glob
import logging
import os

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.builders.step_range import batch_range
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import manifest_from_arrays
from spike_audit.pipelines.shards.paths import resolve
from spike_audit.pipelines.shards.tokens import megatron_paths, read_megatron_index

log = logging.getLogger(__name__)

_SUFFIXES = (
    ("-document_index.npy", "-sample_index.npy", "-shuffle_index.npy"),
    ("_doc_idx.npy", "_sample_idx.npy", "_shuffle_idx.npy"),
)


def find_cache(prefix: str) -> tuple[str, str, str]:
    """Paths of the three cache arrays from their common prefix (``DIR/{hash}-GPTDataset-train``),
    or from a directory holding exactly one such set."""
    prefix = str(prefix)
    if os.path.isdir(prefix):
        found = []
        for doc_suf, sample_suf, shuffle_suf in _SUFFIXES:
            for doc in sorted(glob.glob(os.path.join(prefix, "*" + doc_suf))):
                found.append(doc[: -len(doc_suf)])
        if len(found) != 1:
            raise UserError(f"{prefix}: expected one Megatron index cache (*-document_index.npy), found "
                            f"{len(found)}{': ' + ', '.join(map(os.path.basename, found)) if found else ''}; "
                            f"pass the cache prefix")
        prefix = found[0]
    for suffixes in _SUFFIXES:
        paths = tuple(prefix + s for s in suffixes)
        if all(os.path.exists(p) for p in paths):
            return paths  # type: ignore[return-value]
    raise UserError(f"{prefix}: Megatron index cache not found (expected {prefix}-document_index.npy, "
                    f"-sample_index.npy and -shuffle_index.npy)")


def load_cache(prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    doc_p, sample_p, shuffle_p = find_cache(prefix)
    doc = np.load(doc_p, mmap_mode="r", allow_pickle=False)
    sample = np.load(sample_p, mmap_mode="r", allow_pickle=False)
    shuffle = np.load(shuffle_p, mmap_mode="r", allow_pickle=False)
    if sample.ndim != 2 or sample.shape[1] != 2:
        raise UserError(f"{sample_p}: expected shape (num_samples + 1, 2), got {sample.shape}")
    return doc, sample, shuffle


def build_megatron_manifest(data: str, document_index, sample_index, shuffle_index, *, global_batch_size: int,
                            shard_root: str | None = None, first_step: int = 1, consumed_samples: int = 0,
                            steps: tuple[int, int] | None = None, add_extra_token: bool = True,
                            micro_batch_size: int | None = None,
                            data_parallel_size: int | None = None) -> pa.Table:
    """STEP_MANIFEST of a Megatron-LM GPTDataset run.

    ``data``: the ``.bin`` (or ``.idx``) as it should appear in the manifest, relative to
    ``shard_root``; the manifest names the ``.bin``. ``steps``: optional inclusive ``(first, last)``
    range (default: every full global batch the cache holds).
    """
    if global_batch_size <= 0:
        raise UserError(f"global batch size must be positive, got {global_batch_size}")
    bin_name = megatron_paths(data)[0]
    index = read_megatron_index(megatron_paths(resolve(shard_root, data))[1])
    doc_index = np.asarray(document_index, dtype=np.int64)
    sample_index = np.asarray(sample_index, dtype=np.int64)
    shuffle_index = np.asarray(shuffle_index, dtype=np.int64)
    n_items = len(shuffle_index)
    n_batches = max(0, (n_items - consumed_samples) // global_batch_size)
    b0, b1 = batch_range(n_batches, steps, first_step, "Megatron index cache")
    pos = np.arange(b0 * global_batch_size, b1 * global_batch_size, dtype=np.int64)
    sid = shuffle_index[consumed_samples + pos]
    if len(sid) and (sid.min() < 0 or sid.max() + 1 >= len(sample_index)):
        raise UserError(f"shuffle index points past the sample index ({len(sample_index) - 1} samples): "
                        f"cache files do not belong together")
    beg_doc, beg_off = sample_index[sid, 0], sample_index[sid, 1]
    end_doc, end_off = sample_index[sid + 1, 0], sample_index[sid + 1, 1]
    n_pieces = end_doc - beg_doc + 1
    owner = np.repeat(np.arange(len(sid)), n_pieces)
    first_piece = np.concatenate([[0], np.cumsum(n_pieces)[:-1]])
    doc_pos = beg_doc[owner] + (np.arange(len(owner)) - first_piece[owner])
    seq = doc_index[doc_pos]
    if len(seq) and (seq.min() < 0 or seq.max() >= len(index.sequence_lengths)):
        raise UserError(f"{bin_name}: document index names sequence {seq.max()} but the .idx has "
                        f"{len(index.sequence_lengths)} sequences: cache and data do not belong together")
    seq_len = np.asarray(index.sequence_lengths, np.int64)[seq]
    start = np.where(doc_pos == beg_doc[owner], beg_off[owner], 0)
    end = np.where(doc_pos == end_doc[owner], end_off[owner] + int(add_extra_token), seq_len)
    end = np.minimum(end, seq_len)
    base = np.asarray(index.sequence_pointers, np.int64)[seq] // index.dtype.itemsize
    keep = end > start
    p = pos[owner][keep]
    in_batch = p % global_batch_size
    rank = micro = None
    if micro_batch_size and data_parallel_size:
        per_micro = micro_batch_size * data_parallel_size
        if global_batch_size % per_micro:
            raise UserError(f"global batch size {global_batch_size} is not divisible by micro batch size x data "
                            f"parallel size ({micro_batch_size} x {data_parallel_size})")
        micro = in_batch // per_micro
        rank = (in_batch % per_micro) // micro_batch_size
    piece = (np.arange(len(owner)) - first_piece[owner])[keep]  # document order within the sample
    return manifest_from_arrays(first_step + p // global_batch_size, bin_name, (base + start)[keep],
                                (base + end)[keep], "token", rank, micro, batch_pos=in_batch, seq_piece=piece)
