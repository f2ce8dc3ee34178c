"""Megatron builder vs a literal numpy re-implementation of GPTDataset's index building and sampling."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from spike_audit.pipelines.builders.megatron import build_megatron_manifest, find_cache, load_cache
from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import read_manifest
from spike_audit.pipelines.shards.read import read_slices

SEQ = 16


# ---- literal port of Megatron-LM's index building (gpt_dataset.py + helpers.build_sample_idx) ----

def _build_document_index(documents, num_epochs, numpy_random_state, separate_final_epoch):
    if not separate_final_epoch or num_epochs == 1:
        document_index = np.mgrid[0:num_epochs, 0:len(documents)][1]
        document_index[:] = documents
        document_index = document_index.reshape(-1)
        document_index = document_index.astype(np.int32)
        numpy_random_state.shuffle(document_index)
        return document_index
    doc_idx_first = _build_document_index(documents, num_epochs - 1, numpy_random_state, False)
    doc_idx_last = _build_document_index(documents, 1, numpy_random_state, False)
    return np.concatenate((doc_idx_first, doc_idx_last))


def build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, add_extra_token=1):
    num_samples = (num_epochs * tokens_per_epoch - add_extra_token) // seq_length
    sample_idx = np.zeros((num_samples + 1, 2), dtype=np.int32)
    sample_index = 0
    doc_idx_index = 0
    doc_offset = 0
    sample_idx[sample_index] = (doc_idx_index, doc_offset)
    sample_index += 1
    while sample_index <= num_samples:
        remaining_seq_length = seq_length + add_extra_token
        while remaining_seq_length != 0:
            doc_id = doc_idx[doc_idx_index]
            doc_length = sizes[doc_id] - doc_offset
            remaining_seq_length -= doc_length
            if remaining_seq_length <= 0:
                doc_offset += remaining_seq_length + doc_length - add_extra_token
                remaining_seq_length = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[sample_index] = (doc_idx_index, doc_offset)
        sample_index += 1
    return sample_idx


def _build_shuffle_index(num_samples, total_size, numpy_random_state):
    dtype_ = np.uint32
    shuffle_idx_first = np.arange(start=0, stop=num_samples, step=1, dtype=dtype_)
    numpy_random_state.shuffle(shuffle_idx_first)
    if num_samples == total_size:
        return shuffle_idx_first
    shuffle_idx_last = np.arange(start=num_samples, stop=total_size, step=1, dtype=dtype_)
    numpy_random_state.shuffle(shuffle_idx_last)
    return np.concatenate((shuffle_idx_first, shuffle_idx_last))


class IndexedDataset:
    def __init__(self, prefix):
        with open(prefix + ".idx", "rb") as stream:
            assert stream.read(9) == b"MMIDIDX\x00\x00"
            assert struct.unpack("<Q", stream.read(8))[0] == 1
            self.dtype = {8: np.uint16, 4: np.int32}[struct.unpack("<B", stream.read(1))[0]]
            self.sequence_count = struct.unpack("<Q", stream.read(8))[0]
            struct.unpack("<Q", stream.read(8))
            offset = stream.tell()
        buf = np.memmap(prefix + ".idx", mode="r", order="C")
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=self.sequence_count, offset=offset)
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=self.sequence_count,
                                               offset=offset + self.sequence_lengths.nbytes)
        self.bin_buffer = np.memmap(prefix + ".bin", mode="r", order="C")

    def get(self, idx, offset=0, length=None):
        sequence_pointer, sequence_length = self.sequence_pointers[idx], self.sequence_lengths[idx]
        if length is None:
            length = sequence_length - offset
        sequence_pointer += offset * np.dtype(self.dtype).itemsize
        return np.frombuffer(self.bin_buffer, dtype=self.dtype, count=length, offset=sequence_pointer)


class GPTDataset:
    def __init__(self, dataset, document_index, sample_index, shuffle_index, add_extra_token=1):
        self.dataset = dataset
        self.document_index, self.sample_index, self.shuffle_index = document_index, sample_index, shuffle_index
        self.add_extra_token = add_extra_token

    def _query_document_sample_shuffle_indices(self, idx):
        idx = self.shuffle_index[idx]
        doc_index_beg, doc_index_beg_offset = self.sample_index[idx]
        doc_index_end, doc_index_end_offset = self.sample_index[idx + 1]
        sample_parts = []
        if doc_index_beg == doc_index_end:
            sample_parts.append(self.dataset.get(
                self.document_index[doc_index_beg], offset=doc_index_beg_offset,
                length=doc_index_end_offset - doc_index_beg_offset + self.add_extra_token))
        else:
            for i in range(doc_index_beg, doc_index_end + 1):
                offset = 0 if i > doc_index_beg else doc_index_beg_offset
                length = None if i < doc_index_end else doc_index_end_offset + self.add_extra_token
                sample_parts.append(self.dataset.get(self.document_index[i], offset=offset, length=length))
        return np.concatenate(sample_parts).astype(np.int64)


class MegatronPretrainingSampler:
    def __init__(self, total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size):
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.data_parallel_rank = micro_batch_size, data_parallel_rank
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size

    def get_start_end_idx(self):
        start_idx = self.data_parallel_rank * self.micro_batch_size
        return start_idx, start_idx + self.micro_batch_size

    def __iter__(self):
        batch = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == self.micro_batch_times_data_parallel_size:
                start_idx, end_idx = self.get_start_end_idx()
                yield batch[start_idx:end_idx]
                batch = []


def _write_indexed(prefix, docs):
    lengths = np.array([len(d) for d in docs], np.int32)
    pointers = (np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 2).astype(np.int64)
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, np.uint16).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))
        f.write(struct.pack("<Q", len(docs)) + struct.pack("<Q", len(docs) + 1))
        f.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1, dtype=np.int64).tobytes())


@pytest.fixture
def run(tmp_path):
    rng = np.random.default_rng(11)
    docs = [rng.integers(0, 60000, int(n)) for n in rng.integers(1, 40, 60)]  # many shorter than SEQ
    (tmp_path / "data").mkdir()
    prefix = str(tmp_path / "data" / "corpus_text_document")
    _write_indexed(prefix, docs)
    sizes = np.array([len(d) for d in docs], np.int32)
    split_docs = np.arange(5, 55, dtype=np.int32)  # a split: documents 5..54
    tokens_per_epoch = int(sizes[split_docs].sum())
    num_epochs = 3
    state = np.random.RandomState(1234)
    document_index = _build_document_index(split_docs, num_epochs, state, separate_final_epoch=False)
    sample_index = build_sample_idx(sizes, document_index, SEQ, num_epochs, tokens_per_epoch)
    shuffle_index = _build_shuffle_index(sample_index.shape[0] - 1, sample_index.shape[0] - 1, state)
    cache = tmp_path / "cache"
    cache.mkdir()
    base = str(cache / "0123abcd-GPTDataset-train")
    np.save(base + "-document_index.npy", document_index, allow_pickle=True)
    np.save(base + "-sample_index.npy", sample_index, allow_pickle=True)
    np.save(base + "-shuffle_index.npy", shuffle_index, allow_pickle=True)
    gpt = GPTDataset(IndexedDataset(prefix), document_index, sample_index, shuffle_index)
    return tmp_path, base, gpt


def megatron_train(gpt, *, gbs, mbs, dp, iterations, consumed=0):
    """Per (iteration, rank, micro): concatenated tokens of the samples, iteration numbered as logged."""
    fed = {}
    n_micro = gbs // (mbs * dp)
    for rank in range(dp):
        it = iter(MegatronPretrainingSampler(len(gpt.shuffle_index), consumed, mbs, rank, dp))
        iteration = 0
        while iteration < iterations:
            for m in range(n_micro):
                idxs = next(it)
                fed[(iteration + 1, rank, m)] = np.concatenate(
                    [gpt._query_document_sample_shuffle_indices(i) for i in idxs])
            iteration += 1
    return fed


def test_manifest_points_at_exactly_the_tokens_megatron_fed(run):
    root, base, gpt = run
    gbs, mbs, dp = 8, 2, 2
    doc, sample, shuffle = load_cache(base)
    table = build_megatron_manifest("data/corpus_text_document.bin", doc, sample, shuffle, global_batch_size=gbs,
                                    shard_root=str(root), micro_batch_size=mbs, data_parallel_size=dp)
    iterations = len(shuffle) // gbs
    fed = megatron_train(gpt, gbs=gbs, mbs=mbs, dp=dp, iterations=iterations)
    got: dict = {}
    batch = read_slices(str(root), "data/corpus_text_document.bin",
                        np.stack([table.column("row_start").to_numpy(), table.column("row_end").to_numpy()], 1),
                        unit="token")
    for i in range(table.num_rows):
        key = tuple(table.column(c)[i].as_py() for c in ("step", "rank", "micro_batch"))
        got.setdefault(key, []).extend(batch.column("tokens")[i].as_py())
    assert sorted(got) == sorted(fed)
    for key in fed:
        assert got[key] == fed[key].tolist(), key
    # some samples cross documents, so the test exercises multi-piece samples
    assert table.num_rows > len(shuffle) // gbs * gbs


def test_consumed_samples_and_step_range(run):
    root, base, gpt = run
    doc, sample, shuffle = load_cache(base)
    t = build_megatron_manifest("data/corpus_text_document.bin", doc, sample, shuffle, global_batch_size=4,
                                shard_root=str(root), consumed_samples=8, first_step=3, steps=(4, 4))
    fed = megatron_train(gpt, gbs=4, mbs=4, dp=1, iterations=2, consumed=8)  # iterations 1, 2 -> steps 3, 4
    got = read_slices(str(root), "data/corpus_text_document.bin",
                      np.stack([t.column("row_start").to_numpy(), t.column("row_end").to_numpy()], 1), unit="token")
    assert set(t.column("step").to_pylist()) == {4}
    assert [x for s in got.column("tokens").to_pylist() for x in s] == fed[(2, 0, 0)].tolist()


def test_cli_and_cache_discovery(run, tmp_path):
    root, base, _ = run
    assert find_cache(str(root / "cache"))[0] == base + "-document_index.npy"
    out = tmp_path / "m.parquet"
    assert main(["manifest", "megatron", "--data", "data/corpus_text_document.bin", "--cache", str(root / "cache"),
                 "--shards", str(root), "--global-batch-size", "8", "--out", str(out), "--check"]) == 0
    # Megatron shuffles samples across all 3 epochs, so some step reads a document twice: the strict
    # check reports it, and it is accepted when asked for.
    with pytest.raises(UserError, match="overlaps another slice of the same shard in step"):
        read_manifest(out, str(root))
    t = read_manifest(out, str(root), check_shards=True, allow_overlap=True)
    assert t.num_rows > 0 and set(t.column("unit").to_pylist()) == {"token"}
    with pytest.raises(UserError, match="Megatron index cache not found"):
        find_cache(str(root / "cache" / "nope"))


def test_batch_positions_join_the_pieces_of_each_sample(run):
    """The slices at (step, batch_pos), in seq_piece order, are exactly the sample Megatron feeds at that
    position of the global batch."""
    root, base, gpt = run
    gbs = 8
    doc, sample, shuffle = load_cache(base)
    t = build_megatron_manifest("data/corpus_text_document.bin", doc, sample, shuffle, global_batch_size=gbs,
                                shard_root=str(root), consumed_samples=3, micro_batch_size=2, data_parallel_size=2)
    toks = read_slices(str(root), "data/corpus_text_document.bin",
                       np.stack([t.column("row_start").to_numpy(), t.column("row_end").to_numpy()], 1),
                       unit="token").column("tokens").to_pylist()
    step, pos, piece = (t.column(c).to_numpy() for c in ("step", "batch_pos", "seq_piece"))
    seqs: dict = {}
    for i in np.lexsort((piece, pos, step)):
        seqs.setdefault((int(step[i]), int(pos[i])), []).extend(toks[i])
    assert len(seqs) == (len(shuffle) - 3) // gbs * gbs
    for (s, p), got in list(seqs.items())[::7]:
        assert got == gpt._query_document_sample_shuffle_indices(3 + (s - 1) * gbs + p).tolist(), (s, p)
    np.testing.assert_array_equal(t.column("micro_batch").to_numpy(), pos // 4)
    assert (piece > 0).any()  # samples that cross documents
