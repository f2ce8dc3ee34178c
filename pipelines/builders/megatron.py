"""Megatron-LM ``GPTDataset`` / ``BlendedDataset`` index caches + ``.bin/.idx`` -> STEP_MANIFEST.

What megatron-core does (``megatron/core/datasets/gpt_dataset.py``, ``blended_dataset.py``,
``megatron/training/datasets/data_samplers.py``), and this builder replays from the cached arrays
without rebuilding them:

- ``document_index`` (``{hash}-GPTDataset-{split}-document_index.npy``): sequence ids of the
  ``.idx``, every epoch's documents, shuffled (all epochs together, or the last one separately
  when it is under 80% of an epoch).
- ``sample_index`` (``...-sample_index.npy``, shape ``(num_samples + 1, 2)``): sample ``j`` starts at
  (position ``sample_index[j, 0]`` in ``document_index``, token offset ``sample_index[j, 1]``) and
  ends at row ``j + 1``. A sample holds ``seq_len + 1`` tokens (``add_extra_token_to_sequence``,
  the default), may cross documents, and shares its last token with the next sample.
- ``shuffle_index`` (``...-shuffle_index.npy``): dataset item ``k`` is sample ``shuffle_index[k]``.
- ``_query_document_sample_shuffle_indices(k)``: for document positions ``i`` from the begin to the
  end position, reads sequence ``document_index[i]`` from offset ``beg_offset`` (first piece, else
  0) to ``end_offset + add_extra_token`` (last piece, else the sequence end).
- A blend (``--data-path W1 P1 W2 P2 ...``, and also several prefixes without weights: megatron-core
  builds a ``BlendedDataset`` for every multi-prefix run) has its own caches,
  ``{hash}-BlendedDataset-{split}-dataset_index.npy`` / ``-dataset_sample_index.npy``: blend item
  ``k`` is item ``dataset_sample_index[k]`` of member ``dataset_index[k]``; the members are listed,
  in order, in the blend's ``-description.txt`` and each has its own GPTDataset cache.
- ``MegatronPretrainingSampler``: the global batch of 0-based index ``b`` is blend (or dataset) items
  ``[consumed + (b - b0) * gbs, consumed + (b - b0 + 1) * gbs)`` where ``consumed`` is the samples
  consumed before batch ``b0`` (``b0 = consumed / gbs``: no batch-size ramp-up). Position ``p`` of
  the global batch is micro-batch ``p // (mbs * dp)`` on rank ``(p % (mbs * dp)) // mbs``. Every slice
  records ``p`` as its ``batch_pos`` and its document order within the sample as ``seq_piece``.

Steps follow spike-audit's one convention: the manifest's ``step`` is the 0-based index of the
global batch, so Megatron's ``iteration N`` (the N-th batch, as ``training_log`` prints it) is step
``N - 1``.


Each document piece becomes one ``unit='token'`` slice into the ``.bin``:
``[pointer / itemsize + start, pointer / itemsize + end)``; empty pieces are dropped. Its ``epoch``
is the pass over the data it belongs to: the k-th time that document occurs in ``document_index``
(0-based), so a document that a multi-epoch shuffle puts twice into one batch is two passes, not an
overlap. Where the run's tokenizer has a pad id (not colliding with its EOD), ``GPTDataset.__getitem__`` feeds
``tokens[tokens == pad] = 0`` and masks the loss there: the builder records that id as ``fed_pad_id``. Older
caches named ``*_doc_idx.npy``, ``*_sample_idx.npy``, ``*_shuffle_idx.npy`` are found too.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.builders.step_range import batch_range
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import manifest_from_arrays, with_meta
from spike_audit.pipelines.shards.paths import user_path
from spike_audit.pipelines.shards.tokens import megatron_paths, read_megatron_index

log = logging.getLogger(__name__)

_GPT_SUFFIXES = (
    ("-document_index.npy", "-sample_index.npy", "-shuffle_index.npy"),
    ("_doc_idx.npy", "_sample_idx.npy", "_shuffle_idx.npy"),
)
_BLEND_SUFFIXES = ("-dataset_index.npy", "-dataset_sample_index.npy")
# rows of document_index scanned at a time when counting passes (bounded memory on huge caches)
_CHUNK = 1 << 23


@dataclass
class GPTCache:
    """One GPTDataset's three cache arrays (memory-mapped) and its description, if written."""

    prefix: str
    document_index: np.ndarray
    sample_index: np.ndarray
    shuffle_index: np.ndarray
    description: dict | None = None

    @property
    def dataset_path(self) -> str | None:
        return (self.description or {}).get("dataset_path")


@dataclass
class MegatronCache:
    """What ``--cache`` names: one GPTDataset, or a BlendedDataset and its members in blend order."""

    members: list[GPTCache]
    dataset_index: np.ndarray | None = None  # blends only
    dataset_sample_index: np.ndarray | None = None
    blend_prefix: str | None = None
    description: dict = field(default_factory=dict)

    @property
    def is_blend(self) -> bool:
        return self.dataset_index is not None

    @property
    def n_items(self) -> int:
        return len(self.dataset_index) if self.is_blend else len(self.members[0].shuffle_index)


def _load(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable .npy cache array ({err})") from None


def _description(prefix: str) -> dict | None:
    path = prefix + "-description.txt"
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a megatron-core description (JSON expected: {err})") from None
    if not isinstance(out, dict):
        raise UserError(f"{path}: not a megatron-core description (a JSON object expected)")
    return out


def _gpt_cache(prefix: str) -> GPTCache | None:
    for suffixes in _GPT_SUFFIXES:
        paths = [prefix + s for s in suffixes]
        if all(os.path.exists(p) for p in paths):
            doc, sample, shuffle = (_load(p) for p in paths)
            if sample.ndim != 2 or sample.shape[1] != 2:
                raise UserError(f"{paths[1]}: expected shape (num_samples + 1, 2), got {sample.shape}")
            for path, arr, what in ((paths[0], doc, "document"), (paths[1], sample, "sample"),
                                    (paths[2], shuffle, "shuffle")):
                if arr.dtype.kind not in "iu":  # a float index was truncated to other positions
                    raise UserError(f"{path}: the {what} index holds {arr.dtype}, expected integers")
            for path, arr, what in ((paths[0], doc, "document"), (paths[2], shuffle, "shuffle")):
                if arr.ndim != 1:
                    raise UserError(f"{path}: expected a 1-D {what} index, got shape {arr.shape}")
            if len(sample) > 1:  # samples run forward through the documents: (doc, offset) never goes back
                d = np.asarray(sample[:, 0], np.int64)
                o = np.asarray(sample[:, 1], np.int64)
                back = np.flatnonzero((d[1:] < d[:-1]) | ((d[1:] == d[:-1]) & (o[1:] < o[:-1])) | (o[1:] < 0))
                if len(back):
                    i = int(back[0]) + 1
                    raise UserError(f"{paths[1]}: sample {i} starts at (document {int(d[i])}, token {int(o[i])}), "
                                    f"before sample {i - 1}'s (document {int(d[i - 1])}, token {int(o[i - 1])}): "
                                    f"not a megatron-core sample index")
            return GPTCache(prefix, doc, sample, shuffle, _description(prefix))
    return None


def _strip(path: str, suffixes) -> str:
    for s in suffixes:
        if path.endswith(s):
            return path[: -len(s)]
    return path


def _find_prefix(directory: str, split: str) -> str:
    """The one cache prefix in ``directory`` for ``split``: the BlendedDataset's if there is one."""
    blends = sorted(glob.glob(os.path.join(directory, f"*-BlendedDataset-{split}{_BLEND_SUFFIXES[0]}")))
    if len(blends) > 1:
        raise UserError(f"{directory}: {len(blends)} BlendedDataset caches for split {split!r} "
                        f"({', '.join(os.path.basename(b) for b in blends)}); pass the cache prefix")
    if blends:
        return blends[0][: -len(_BLEND_SUFFIXES[0])]
    found = sorted(glob.glob(os.path.join(directory, f"*-GPTDataset-{split}{_GPT_SUFFIXES[0][0]}")))
    legacy = sorted(glob.glob(os.path.join(directory, f"*{split}*{_GPT_SUFFIXES[1][0]}")))
    found = [f[: -len(_GPT_SUFFIXES[0][0])] for f in found] + [f[: -len(_GPT_SUFFIXES[1][0])] for f in legacy]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"{directory}: no Megatron index cache for split {split!r} (expected "
                        f"*-GPTDataset-{split}-document_index.npy or *-BlendedDataset-{split}-dataset_index.npy)")
    raise UserError(f"{directory}: {len(found)} GPTDataset caches for split {split!r} and no BlendedDataset "
                    f"cache naming them ({', '.join(os.path.basename(f) for f in found[:4])}"
                    f"{', ...' if len(found) > 4 else ''}); pass the cache prefix of the one the run read")


def _member_hash(member: dict) -> str:
    # megatron-core names a dataset's cache by the md5 of its description as json.dumps(indent=4) writes it
    return hashlib.md5(json.dumps(member, indent=4).encode("utf-8"), usedforsecurity=False).hexdigest()


def load_cache(path: str, split: str = "train") -> MegatronCache:
    """Load the caches ``path`` names: a cache prefix (``DIR/{hash}-GPTDataset-train``,
    ``DIR/{hash}-BlendedDataset-train``) or a cache directory (its ``split`` cache; the blend's when the
    run read a blend)."""
    path = str(path)
    prefix = _find_prefix(path, split) if os.path.isdir(path) else _strip(path, ("-description.txt",
                                                                                *_BLEND_SUFFIXES,
                                                                                *_GPT_SUFFIXES[0], *_GPT_SUFFIXES[1]))
    if all(os.path.exists(prefix + s) for s in _BLEND_SUFFIXES):
        return _load_blend(prefix, split)
    gpt = _gpt_cache(prefix)
    if gpt is None:
        raise UserError(f"{prefix}: Megatron index cache not found (expected {prefix}-document_index.npy, "
                        f"-sample_index.npy and -shuffle_index.npy, or a BlendedDataset's -dataset_index.npy)")
    return MegatronCache([gpt], description=gpt.description or {})


def _load_blend(prefix: str, split: str) -> MegatronCache:
    desc = _description(prefix)
    src = prefix + "-description.txt"
    if desc is None:
        raise UserError(f"{src}: not found; megatron-core writes it beside the blend's cache and it lists the "
                        f"member datasets in blend order")
    datasets = desc.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise UserError(f"{src}: no member datasets listed (expected a 'datasets' list)")
    directory = os.path.dirname(prefix) or "."
    described = None
    members = []
    for i, member in enumerate(datasets):
        cls = member.get("class", "GPTDataset")
        if cls != "GPTDataset":
            raise UserError(f"{src}: member {i} is a {cls}; only GPTDataset members are supported")
        msplit = member.get("index_split", split)
        gpt = _gpt_cache(os.path.join(directory, f"{_member_hash(member)}-GPTDataset-{msplit}"))
        if gpt is None:  # the hash did not reproduce: match the members' own descriptions
            if described is None:
                described = {}
                for d in glob.glob(os.path.join(directory, "*-GPTDataset-*-description.txt")):
                    p = d[: -len("-description.txt")]
                    described[json.dumps(_description(p), sort_keys=True)] = p
            p = described.get(json.dumps(member, sort_keys=True))
            gpt = _gpt_cache(p) if p else None
        if gpt is None:
            raise UserError(f"{src}: the cache of member {i} ({member.get('dataset_path')}) is not in {directory}")
        members.append(gpt)
    cache = MegatronCache(members, _load(prefix + _BLEND_SUFFIXES[0]), _load(prefix + _BLEND_SUFFIXES[1]),
                          prefix, desc)
    if len(cache.dataset_index) != len(cache.dataset_sample_index):
        raise UserError(f"{prefix}: dataset_index has {len(cache.dataset_index)} items but dataset_sample_index "
                        f"{len(cache.dataset_sample_index)}: cache files do not belong together")
    return cache


def _stem(path: str) -> str:
    base = os.path.basename(str(path))
    for s in (".bin", ".idx"):
        if base.endswith(s):
            return base[: -len(s)]
    return base


def match_data(cache: MegatronCache, data: list[str]) -> list[str]:
    """The ``--data`` file of each member, in member order. Matched by file name to the dataset paths the
    cache descriptions record; where names repeat (the same prefix twice, or two directories), by order
    (the run's ``--data-path`` order), and the names must agree."""
    data = [str(d) for d in data]
    n = len(cache.members)
    paths = [m.dataset_path for m in cache.members]
    if len(data) != n:
        names = ", ".join(os.path.basename(p or "?") for p in paths)
        what = f"a blend of {n} datasets ({names})" if cache.is_blend else "one dataset"
        raise UserError(f"--data: {len(data)} file(s) given but the cache is {what}: give every data prefix "
                        f"of the run's --data-path, each as its .bin, in that order")
    if any(p is None for p in paths):
        return data
    want = [os.path.basename(p) for p in paths]
    stems = [_stem(d) for d in data]
    if len(set(want)) == n and len(set(stems)) == n:
        by_stem = dict(zip(stems, data))
        missing = [w for w in want if w not in by_stem]
        if missing:
            i = want.index(missing[0])
            raise UserError(f"--data: no file named {missing[0]}.bin, which the cache reads ({paths[i]}); "
                            f"given: {', '.join(data)}")
        return [by_stem[w] for w in want]
    for i, (w, st) in enumerate(zip(want, stems)):
        if w != st:
            raise UserError(f"--data: file {i + 1} is {data[i]} but dataset {i + 1} of the cache reads {paths[i]} "
                            f"(give the files in the run's --data-path order)")
    return data


def passes(document_index: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """For each position of ``document_index`` in ``positions``: how many times its document occurred
    before it (0 for the first pass over that document). One scan up to the last position asked for,
    ``_CHUNK`` rows at a time; memory is one counter per document."""
    positions = np.asarray(positions, np.int64)
    out = np.zeros(len(positions), np.int64)
    if not len(positions):
        return out
    order = np.argsort(positions, kind="stable")
    sorted_pos = positions[order]
    end = int(sorted_pos[-1]) + 1
    n_docs = int(np.max(document_index[:end])) + 1 if end else 0
    counts = np.zeros(n_docs, np.int64)
    lo = 0
    for a in range(0, end, _CHUNK):
        b = min(end, a + _CHUNK)
        chunk = np.asarray(document_index[a:b], np.int64)
        hi = int(np.searchsorted(sorted_pos, b, side="left"))
        if hi > lo:
            # rank of each row among the rows of the chunk with the same document (stable)
            ordc = np.argsort(chunk, kind="stable")
            vals = chunk[ordc]
            first = np.flatnonzero(np.r_[True, vals[1:] != vals[:-1]])
            run_start = np.repeat(first, np.diff(np.r_[first, len(vals)]))
            rank = np.empty(len(chunk), np.int64)
            rank[ordc] = np.arange(len(chunk)) - run_start
            p = sorted_pos[lo:hi] - a
            out[order[lo:hi]] = counts[chunk[p]] + rank[p]
            lo = hi
        counts += np.bincount(chunk, minlength=n_docs)
    return out


def _pieces(gpt: GPTCache, items: np.ndarray, index, bin_name: str, add_extra_token: bool):
    """Document pieces of GPTDataset items ``items``: (item row, start token, end token, pass, order of the
    piece within its sample)."""
    doc_index, sample_index, shuffle_index = gpt.document_index, gpt.sample_index, gpt.shuffle_index
    if len(items) and (items.min() < 0 or items.max() >= len(shuffle_index)):
        raise UserError(f"{gpt.prefix}: item {int(items.max())} asked for but the shuffle index has "
                        f"{len(shuffle_index)}: cache files do not belong together")
    sid = np.asarray(shuffle_index[items], np.int64) if len(items) else np.zeros(0, np.int64)
    if len(sid) and (sid.min() < 0 or sid.max() + 1 >= len(sample_index)):
        raise UserError(f"{gpt.prefix}: shuffle index points past the sample index ({len(sample_index) - 1} "
                        f"samples): cache files do not belong together")
    beg = np.asarray(sample_index[sid], np.int64).reshape(-1, 2)
    fin = np.asarray(sample_index[sid + 1], np.int64).reshape(-1, 2)
    beg_doc, beg_off, end_doc, end_off = beg[:, 0], beg[:, 1], fin[:, 0], fin[:, 1]
    n_pieces = end_doc - beg_doc + 1
    owner = np.repeat(np.arange(len(sid)), n_pieces)
    first_piece = np.concatenate([[0], np.cumsum(n_pieces)[:-1]]).astype(np.int64)
    doc_pos = beg_doc[owner] + (np.arange(len(owner)) - first_piece[owner])
    if len(doc_pos) and doc_pos.max() >= len(doc_index):
        raise UserError(f"{gpt.prefix}: sample index points past the document index: cache files do not belong "
                        f"together")
    seq = np.asarray(doc_index[doc_pos], np.int64) if len(doc_pos) else np.zeros(0, np.int64)
    if len(seq) and (seq.min() < 0 or seq.max() >= len(index.sequence_lengths)):
        raise UserError(f"{bin_name}: document index names sequence {seq.max()} but the .idx has "
                        f"{len(index.sequence_lengths)} sequences: cache and data do not belong together")
    seq_len = np.asarray(index.sequence_lengths, np.int64)[seq]
    start = np.where(doc_pos == beg_doc[owner], beg_off[owner], 0)
    end = np.where(doc_pos == end_doc[owner], end_off[owner] + int(add_extra_token), seq_len)
    end = np.minimum(end, seq_len)
    base = np.asarray(index.sequence_pointers, np.int64)[seq] // index.dtype.itemsize
    keep = end > start
    epoch = passes(doc_index, doc_pos[keep])
    piece = (np.arange(len(owner)) - first_piece[owner])[keep]  # document order within the sample
    return owner[keep], (base + start)[keep], (base + end)[keep], epoch, piece


def build_megatron_manifest(data, cache: MegatronCache, *, global_batch_size: int,
                            shard_root: str | None = None, first_step: int | None = None,
                            consumed_samples: int = 0, steps: tuple[int, int] | None = None,
                            add_extra_token: bool = True, micro_batch_size: int | None = None,
                            data_parallel_size: int | None = None, pad_id: int | None = None) -> pa.Table:
    """STEP_MANIFEST of a Megatron-LM run, with its run description attached (token dtype from the
    ``.idx``, sequence length from the cache description, batch size and consumed samples).

    ``data``: the ``.bin`` of each data prefix (or one), as the manifest should name them, relative to
    ``shard_root``. ``first_step``: the 0-based index of the batch after ``consumed_samples`` (default
    ``consumed_samples / global_batch_size``). ``steps``: optional inclusive ``(first, last)`` range of
    batch indices (default: every full global batch the cache holds). ``pad_id``: the pad id of the run's
    Megatron tokenizer when it has one that collides with no other special token: megatron-core feeds 0 where it
    occurs in the data (and masks the loss), recorded as ``fed_pad_id`` so readers show what was fed.
    """
    if global_batch_size <= 0:
        raise UserError(f"--global-batch-size must be positive, got {global_batch_size}")
    if consumed_samples < 0:
        raise UserError(f"--consumed-samples must be >= 0, got {consumed_samples}")
    if first_step is None:
        if consumed_samples % global_batch_size:
            raise UserError(f"--consumed-samples {consumed_samples} is not a multiple of --global-batch-size "
                            f"{global_batch_size} (batch-size ramp-up or a changed batch size): give --first-step, "
                            f"the checkpoint's iteration")
        first_step = consumed_samples // global_batch_size
    if first_step < 0:
        raise UserError(f"--first-step must be >= 0 (a 0-based batch index), got {first_step}")
    per_micro = None
    if micro_batch_size or data_parallel_size:
        if not (micro_batch_size and data_parallel_size):
            raise UserError("give both --micro-batch-size and --data-parallel-size (or neither)")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise UserError("--micro-batch-size and --data-parallel-size must be positive")
        per_micro = micro_batch_size * data_parallel_size
        if global_batch_size % per_micro:
            raise UserError(f"global batch size {global_batch_size} is not divisible by micro batch size x data "
                            f"parallel size ({micro_batch_size} x {data_parallel_size})")
    files = match_data(cache, list(data) if not isinstance(data, str) else [data])
    bins = [megatron_paths(d)[0] for d in files]
    indexes = [read_megatron_index(megatron_paths(user_path(shard_root, d))[1]) for d in files]
    n_items = cache.n_items
    if consumed_samples > n_items:
        raise UserError(f"--consumed-samples {consumed_samples} is past the {n_items} samples the cache holds")
    n_batches = (n_items - consumed_samples) // global_batch_size
    if n_batches <= 0:
        raise UserError(f"the Megatron index cache holds {n_items} samples{f' ({consumed_samples} consumed)' if consumed_samples else ''}: "
                        f"no global batch of {global_batch_size} (no training steps; is it the right cache?)")
    b0, b1 = batch_range(n_batches, steps, first_step, "Megatron index cache")
    pos = np.arange(b0 * global_batch_size, b1 * global_batch_size, dtype=np.int64)  # within the run after consumed
    items = consumed_samples + pos
    if cache.is_blend:
        member = np.asarray(cache.dataset_index[items], np.int64)
        member_item = np.asarray(cache.dataset_sample_index[items], np.int64)
        if len(member) and (member.min() < 0 or member.max() >= len(cache.members)):
            raise UserError(f"{cache.blend_prefix}: dataset_index names dataset {int(member.max())} but the blend has "
                            f"{len(cache.members)}: cache files do not belong together")
    else:
        member = np.zeros(len(items), np.int64)
        member_item = items
    parts = []
    for m, gpt in enumerate(cache.members):
        sel = np.flatnonzero(member == m)
        if not len(sel):
            continue
        owner, start, end, epoch, piece = _pieces(gpt, member_item[sel], indexes[m], bins[m], add_extra_token)
        parts.append((sel[owner], np.full(len(owner), m), start, end, epoch, piece))
    cat = [np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.int64) for k in range(6)]
    row, mem, start, end, epoch, piece = cat
    p = pos[row]
    in_batch = p % global_batch_size
    rank = micro = None
    if per_micro:
        micro = in_batch // per_micro
        rank = (in_batch % per_micro) // micro_batch_size
    shard = np.asarray(bins, dtype=object)[mem] if len(mem) else np.zeros(0, dtype=object)
    table = manifest_from_arrays(first_step + p // global_batch_size, shard, start, end, "token", rank, micro,
                                 batch_pos=in_batch, seq_piece=piece, epoch=epoch)
    dtypes = sorted({np.dtype(ix.dtype).name for ix in indexes})
    seq_lens = {m.description.get("sequence_length") for m in cache.members if m.description}
    seq_len = seq_lens.pop() if len(seq_lens) == 1 else None
    if pad_id is not None and pad_id < 0:
        pad_id = None  # megatron-core's "no pad" (-1): nothing in the data is changed
    return with_meta(table, trainer="megatron", token_dtype=dtypes[0] if len(dtypes) == 1 else None,
                     fed_pad_id=int(pad_id) if pad_id is not None else None,
                     seq_len=int(seq_len) if seq_len is not None else None, extra_token=bool(add_extra_token),
                     samples_per_step=int(global_batch_size), first_step=int(first_step),
                     samples_before_first_step=int(consumed_samples),
                     tokens_per_step=int(global_batch_size) * int(seq_len) if seq_len is not None else None,
                     tokens_before_first_step=int(consumed_samples) * int(seq_len) if seq_len is not None else None)
