"""Megatron builder vs a literal numpy re-implementation of GPTDataset's index building and sampling."""

from __future__ import annotations

import struct

import shutil
from pathlib import Path

import numpy as np
import pytest

import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

from spike_audit.pipelines.builders.megatron import build_megatron_manifest, load_cache
from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import load_manifest_table, meta_of, read_manifest, write_manifest
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
    """Per (batch index, rank, micro): concatenated tokens of the samples. The batch index is 0-based:
    Megatron logs the batch of index b as iteration b + 1."""
    fed = {}
    n_micro = gbs // (mbs * dp)
    first = consumed // gbs
    for rank in range(dp):
        it = iter(MegatronPretrainingSampler(len(gpt.shuffle_index), consumed, mbs, rank, dp))
        for b in range(first, first + iterations):
            for m in range(n_micro):
                idxs = next(it)
                fed[(b, rank, m)] = np.concatenate([gpt._query_document_sample_shuffle_indices(i) for i in idxs])
    return fed


def _tokens_by_key(root, table, shard="data/corpus_text_document.bin", cols=("step", "rank", "micro_batch")):
    sel = np.flatnonzero(np.asarray(table.column("shard").to_pylist(), dtype=object) == shard)
    sub = table.take(sel)
    batch = read_slices(str(root), shard, np.stack([sub.column("row_start").to_numpy(),
                                                    sub.column("row_end").to_numpy()], 1), unit="token")
    got: dict = {}
    for i in range(sub.num_rows):
        key = tuple(sub.column(c)[i].as_py() for c in cols)
        got.setdefault(key, []).extend(batch.column("tokens")[i].as_py())
    return got


def test_manifest_points_at_exactly_the_tokens_megatron_fed(run):
    root, base, gpt = run
    gbs, mbs, dp = 8, 2, 2
    cache = load_cache(base)
    table = build_megatron_manifest("data/corpus_text_document.bin", cache, global_batch_size=gbs,
                                    shard_root=str(root), micro_batch_size=mbs, data_parallel_size=dp)
    iterations = len(cache.members[0].shuffle_index) // gbs
    fed = megatron_train(gpt, gbs=gbs, mbs=mbs, dp=dp, iterations=iterations)
    got = _tokens_by_key(root, table)
    assert sorted(got) == sorted(fed)
    for key in fed:
        assert got[key] == fed[key].tolist(), key
    # some samples cross documents, so the test exercises multi-piece samples
    assert table.num_rows > iterations * gbs
    meta = meta_of(table)
    assert meta["trainer"] == "megatron" and meta["token_dtype"] == "uint16" and meta["samples_per_step"] == gbs


def test_consumed_samples_and_step_range(run):
    root, base, gpt = run
    cache = load_cache(base)
    # resumed after 2 iterations of 4 samples: the first batch is index 2 (iteration 3)
    t = build_megatron_manifest("data/corpus_text_document.bin", cache, global_batch_size=4,
                                shard_root=str(root), consumed_samples=8, steps=(3, 3))
    fed = megatron_train(gpt, gbs=4, mbs=4, dp=1, iterations=2, consumed=8)  # batches 2, 3
    assert set(t.column("step").to_pylist()) == {3}
    assert _tokens_by_key(root, t, cols=("step",))[(3,)] == fed[(3, 0, 0)].tolist()
    assert meta_of(t)["first_step"] == 2 and meta_of(t)["samples_before_first_step"] == 8
    with pytest.raises(UserError, match="not a multiple of --global-batch-size 4"):
        build_megatron_manifest("data/corpus_text_document.bin", cache, global_batch_size=4, shard_root=str(root),
                                consumed_samples=6)
    t = build_megatron_manifest("data/corpus_text_document.bin", cache, global_batch_size=4, shard_root=str(root),
                                consumed_samples=6, first_step=1, steps=(1, 1))
    it = iter(MegatronPretrainingSampler(len(gpt.shuffle_index), 6, 4, 0, 1))
    assert _tokens_by_key(root, t, cols=("step",))[(1,)] == np.concatenate(
        [gpt._query_document_sample_shuffle_indices(i) for i in next(it)]).tolist()


def test_epoch_repeats_are_not_overlaps(run, tmp_path):
    root, base, _ = run
    out = tmp_path / "m.parquet"
    assert main(["manifest", "megatron", "--data", "data/corpus_text_document.bin", "--cache", str(root / "cache"),
                 "--shards", str(root), "--global-batch-size", "8", "--out", str(out), "--check"]) == 0
    # Megatron shuffles samples across all 3 epochs, so some step reads a document twice, in two passes:
    # accepted without allow_overlap because the slices carry their epochs...
    t = read_manifest(out, str(root))
    epoch = np.asarray(t.column("epoch").to_pylist())
    assert set(epoch.tolist()) == {0, 1, 2}
    # ...and the same slices without epochs (a hand-made manifest) are a real overlap
    bare = tmp_path / "bare.parquet"
    write_manifest(t.drop_columns(["epoch"]), bare)
    with pytest.raises(UserError, match="overlaps another slice of the same shard in step"):
        read_manifest(bare, str(root))
    # each (document, epoch) is read once in the whole run, apart from the shared boundary token
    t = t.filter(pc.greater(pc.subtract(t.column("row_end"), t.column("row_start")), 1))
    key = list(zip(t.column("row_start").to_pylist(), t.column("epoch").to_pylist()))
    assert len(key) == len(set(key))


def test_passes_counts_earlier_occurrences(monkeypatch):
    from spike_audit.pipelines.builders import megatron as mb

    rng = np.random.default_rng(3)
    doc = rng.integers(0, 7, 200).astype(np.int32)
    naive = np.array([np.sum(doc[:i] == doc[i]) for i in range(len(doc))])
    monkeypatch.setattr(mb, "_CHUNK", 16)  # many chunks
    pos = rng.permutation(200)[:70]
    np.testing.assert_array_equal(mb.passes(doc, pos), naive[pos])
    np.testing.assert_array_equal(mb.passes(doc, np.zeros(0, np.int64)), [])


def test_cache_discovery_and_refusals(run, tmp_path, capsys):
    root, base, _ = run
    cache = load_cache(str(root / "cache"))
    assert cache.members[0].prefix == base and not cache.is_blend
    with pytest.raises(UserError, match="Megatron index cache not found"):
        load_cache(str(root / "cache" / "nope"))
    with pytest.raises(UserError, match="no Megatron index cache for split 'valid'"):
        load_cache(str(root / "cache"), split="valid")
    out = str(tmp_path / "m.parquet")
    common = ["manifest", "megatron", "--data", "data/corpus_text_document.bin", "--cache", str(root / "cache"),
              "--shards", str(root), "--global-batch-size", "8", "--out", out]
    for extra, msg in ((["--dataloader-type", "cyclic"], "--dataloader-type cyclic is not supported"),
                       (["--rampup-batch-size", "4", "4", "100"], "--rampup-batch-size is not supported"),
                       (["--consumed-samples", "5"], "not a multiple of --global-batch-size 8"),
                       (["--data", "a.bin", "b.bin"], "2 file(s) given but the cache is one dataset")):
        capsys.readouterr()
        assert main(common + extra) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_batch_positions_join_the_pieces_of_each_sample(run):
    """The slices at (step, batch_pos), in seq_piece order, are exactly the sample Megatron feeds at that
    position of the global batch."""
    root, base, gpt = run
    gbs = 8
    cache = load_cache(base)
    # 3 samples consumed before batch 0 (a changed batch size): the first batch's index is given
    t = build_megatron_manifest("data/corpus_text_document.bin", cache, global_batch_size=gbs, first_step=0,
                                shard_root=str(root), consumed_samples=3, micro_batch_size=2, data_parallel_size=2)
    toks = read_slices(str(root), "data/corpus_text_document.bin",
                       np.stack([t.column("row_start").to_numpy(), t.column("row_end").to_numpy()], 1),
                       unit="token").column("tokens").to_pylist()
    step, pos, piece = (t.column(c).to_numpy() for c in ("step", "batch_pos", "seq_piece"))
    seqs: dict = {}
    for i in np.lexsort((piece, pos, step)):
        seqs.setdefault((int(step[i]), int(pos[i])), []).extend(toks[i])
    n_items = len(cache.members[0].shuffle_index)
    assert len(seqs) == (n_items - 3) // gbs * gbs
    for (s, p), got in list(seqs.items())[::7]:
        assert got == gpt._query_document_sample_shuffle_indices(3 + s * gbs + p).tolist(), (s, p)
    np.testing.assert_array_equal(t.column("micro_batch").to_numpy(), pos // 4)
    assert (piece > 0).any()  # samples that cross documents


# ---- blends: BlendedDataset item k is item dataset_sample_index[k] of member dataset_index[k] ----


def _gpt_member(tmp_path, name, rng, cache_dir, n_docs=30, num_epochs=2, split="train"):
    docs = [rng.integers(0, 60000, int(n)) for n in rng.integers(1, 30, n_docs)]
    prefix = str(tmp_path / "data" / name)
    _write_indexed(prefix, docs)
    sizes = np.array([len(d) for d in docs], np.int32)
    split_docs = np.arange(n_docs, dtype=np.int32)
    state = np.random.RandomState(7)
    document_index = _build_document_index(split_docs, num_epochs, state, separate_final_epoch=False)
    sample_index = build_sample_idx(sizes, document_index, SEQ, num_epochs, int(sizes.sum()))
    shuffle_index = _build_shuffle_index(sample_index.shape[0] - 1, sample_index.shape[0] - 1, state)
    description = {"class": "GPTDataset", "dataset_path": f"/training/run/data/{name}", "num_samples": 50,
                   "index_split": split, "random_seed": 1234, "sequence_length": SEQ}
    h = hashlib.md5(json.dumps(description, indent=4).encode(), usedforsecurity=False).hexdigest()
    cbase = str(cache_dir / f"{h}-GPTDataset-{split}")
    np.save(cbase + "-document_index.npy", document_index)
    np.save(cbase + "-sample_index.npy", sample_index)
    np.save(cbase + "-shuffle_index.npy", shuffle_index)
    with open(cbase + "-description.txt", "w") as f:
        f.write(json.dumps(description, indent=4))
    return description, GPTDataset(IndexedDataset(prefix), document_index, sample_index, shuffle_index)


@pytest.fixture
def blend(tmp_path):
    rng = np.random.default_rng(21)
    (tmp_path / "data").mkdir()
    cache = tmp_path / "cache"
    cache.mkdir()
    members = [_gpt_member(tmp_path, n, rng, cache) for n in ("web", "code", "books")]
    n = 96
    dataset_index = rng.choice(3, size=n, p=[0.5, 0.3, 0.2]).astype(np.int16)
    dataset_sample_index = np.zeros(n, np.int64)
    for d in range(3):  # each member's samples in order, as build_blending_indices draws them
        sel = dataset_index == d
        dataset_sample_index[sel] = np.arange(sel.sum())
    desc = {"class": "BlendedDataset", "datasets": [m[0] for m in members], "split": "train",
            "weights": [0.5, 0.3, 0.2], "size": n}
    bbase = str(cache / "feedbeef-BlendedDataset-train")
    np.save(bbase + "-dataset_index.npy", dataset_index)
    np.save(bbase + "-dataset_sample_index.npy", dataset_sample_index)
    with open(bbase + "-description.txt", "w") as f:
        f.write(json.dumps(desc, indent=4))
    gpts = [m[1] for m in members]

    def getitem(k):  # BlendedDataset.__getitem__ then GPTDataset's
        return int(dataset_index[k]), gpts[dataset_index[k]]._query_document_sample_shuffle_indices(
            int(dataset_sample_index[k]))

    return tmp_path, getitem, n


def test_blend_follows_its_own_dataset_index(blend):
    root, getitem, n = blend
    gbs = 8
    files = ["data/books.bin", "data/web.bin", "data/code.bin"]  # any order: matched by name
    t = build_megatron_manifest(files, load_cache(str(root / "cache")), global_batch_size=gbs, shard_root=str(root))
    names = {0: "data/web.bin", 1: "data/code.bin", 2: "data/books.bin"}
    shard = np.asarray(t.column("shard").to_pylist(), dtype=object)
    for b in range(n // gbs):
        want: dict = {}
        for k in range(b * gbs, (b + 1) * gbs):
            d, toks = getitem(k)
            want.setdefault(names[d], []).append(toks.tolist())
        for name, seqs in want.items():
            sel = np.flatnonzero((np.asarray(t.column("step").to_pylist()) == b) & (shard == name))
            got = read_slices(str(root), name, np.stack([t.column("row_start").to_numpy()[sel],
                                                         t.column("row_end").to_numpy()[sel]], 1), unit="token")
            flat = [x for s in got.column("tokens").to_pylist() for x in s]
            assert sorted(flat) == sorted(x for s in seqs for x in s), (b, name)
            assert sum(len(s) for s in seqs) == len(flat)
    assert set(shard.tolist()) == set(names.values())


def test_blend_cli_and_member_matching(blend, tmp_path, capsys):
    root, _, _ = blend
    out = tmp_path / "m.parquet"
    args = ["manifest", "megatron", "--cache", str(root / "cache"), "--shards", str(root), "--global-batch-size", "8",
            "--out", str(out), "--check", "--data"]
    assert main(args + ["data/web.bin", "data/code.bin", "data/books.bin"]) == 0
    assert read_manifest(out, str(root)).num_rows > 0
    capsys.readouterr()
    # following the old advice (one member at a time) is refused, naming the blend's members
    assert main(args + ["data/web.bin"]) == 2
    err = capsys.readouterr().err
    assert "a blend of 3 datasets (web, code, books)" in err and len(err.strip().splitlines()) == 1
    assert main(args + ["data/web.bin", "data/code.bin", "data/novels.bin"]) == 2
    assert "no file named books.bin" in capsys.readouterr().err


def test_pad_id_is_shown_as_the_zero_megatron_feeds_and_is_padding_for_run(run, tmp_path, capsys):
    """megatron-core's GPTDataset feeds ``tokens[tokens == pad] = 0`` (loss masked) for its tokenizer's pad id:
    the manifest records the id, `batch` shows the 0 that was fed, `run` counts those positions as padding."""
    import json

    from spike_audit.pipelines.cli.batch import step_report
    from spike_audit.pipelines.manifest import fed_tokens, read_meta
    from spike_audit.pipelines.run.plan import RunConfig, resolve_tokens

    root, base, gpt = run
    gbs = 8
    fed = megatron_train(gpt, gbs=gbs, mbs=gbs, dp=1, iterations=3)
    pad = int(fed[(1, 0, 0)][3])  # an id that occurs in batch 1
    out = str(tmp_path / "m.parquet")
    common = ["-q", "manifest", "megatron", "--data", "data/corpus_text_document.bin", "--cache", str(root / "cache"),
              "--shards", str(root), "--global-batch-size", str(gbs), "--out", out]
    assert main(common + ["--pad-id", str(pad)]) == 0
    assert read_meta(out)["fed_pad_id"] == pad
    for b in range(3):
        want = np.where(fed[(b, 0, 0)] == pad, 0, fed[(b, 0, 0)])  # what megatron-core feeds
        rep = step_report(out, str(root), b, limit=0)
        assert rep["fed_pad_id"] == pad
        table = load_manifest_table(out)
        one = table.filter(np.asarray(table.column("step").to_numpy() == b)).sort_by(
            [("batch_pos", "ascending"), ("seq_piece", "ascending")])  # the global batch's order
        got = _tokens_by_key(root, one, cols=("step",))[(b,)]
        stored = pa.array([got], pa.list_(pa.int64()))
        shown, n = fed_tokens(stored, read_meta(out))
        assert shown.to_pylist()[0] == want.tolist() and n == int((fed[(b, 0, 0)] == pad).sum())
        if b == 1:
            assert rep["n_pad_fed_as_0"] >= 1
    capsys.readouterr()
    assert main(["batch", "--manifest", out, "--shards", str(root), "--step", "1"]) == 0
    assert f"of pad id {pad} shown as 0, as the trainer fed them" in capsys.readouterr().out
    cfg = RunConfig(log="x.log", manifest=out, shards=str(root), out=str(tmp_path / "o"))
    assert resolve_tokens(cfg).pad_id == pad  # the positions fed as 0 with the loss masked are padding
    assert resolve_tokens(RunConfig(log="x.log", manifest=out, shards=str(root), out="o", pad_id=7)).pad_id == 7
    assert main(common + ["--pad-id", "-1"]) == 0  # megatron-core's "no pad"
    assert read_meta(out)["fed_pad_id"] is None
    rep = step_report(out, str(root), 1, limit=0)
    assert rep["n_pad_fed_as_0"] == 0 and json.dumps(rep)


@given(rows=st.lists(st.one_of(st.none(), st.lists(st.integers(0, 9), max_size=6)), max_size=8),
       pad=st.one_of(st.none(), st.integers(0, 9)), cut=st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_fed_tokens_maps_only_the_pad_id_and_keeps_rows_and_nulls(rows, pad, cut):
    from spike_audit.pipelines.manifest import fed_tokens

    arr = pa.array(rows, pa.list_(pa.int64())).slice(min(cut, len(rows)))
    got, n = fed_tokens(arr, {"fed_pad_id": pad})
    want = [None if r is None else [0 if (pad is not None and t == pad) else t for t in r] for r in arr.to_pylist()]
    assert got.to_pylist() == want
    assert n == sum(1 for r in arr.to_pylist() if r for t in r if pad is not None and t == pad)


@pytest.mark.parametrize("damage, msg", [
    ("sample_back", "not a megatron-core sample index"),
    ("shuffle_2d", "expected a 1-D shuffle index"),
    ("shuffle_float", "the shuffle index holds float64, expected integers"),
    ("shuffle_empty", "no global batch of 8 (no training steps"),
])
def test_a_damaged_index_cache_is_a_one_line_error(run, tmp_path, capsys, damage, msg):
    """A sample index running backwards was a numpy ValueError traceback, a 2-D shuffle index a broadcast error, a
    float one was truncated to other samples silently and an empty one wrote a manifest of no steps."""
    root, base, _ = run
    cache = tmp_path / "cache2"
    shutil.copytree(root / "cache", cache)
    b = str(cache / Path(base).name)
    si, sh = np.load(b + "-sample_index.npy"), np.load(b + "-shuffle_index.npy")
    if damage == "sample_back":
        si[10] = si[3]
        np.save(b + "-sample_index.npy", si)
    elif damage == "shuffle_2d":
        np.save(b + "-shuffle_index.npy", np.stack([sh, sh], axis=1))
    elif damage == "shuffle_float":
        np.save(b + "-shuffle_index.npy", sh.astype(np.float64))
    else:
        np.save(b + "-shuffle_index.npy", sh[:0])
    rc = main(["manifest", "megatron", "--data", "data/corpus_text_document.bin", "--cache", str(cache),
               "--shards", str(root), "--global-batch-size", "8", "--out", str(tmp_path / "m.parquet")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and msg in err and "Traceback" not in err, err
