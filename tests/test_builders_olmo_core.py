"""OLMo-core settings: batch size in tokens, per-epoch indices files with the first step derived,
max_target_sequence_length, source_permutation_seed, and the refusals (exactness against the real
OLMo-core is benchmarks/fidelity_olmo.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from spike_audit.pipelines.builders.olmo import build_olmo_core_manifest, permute_sources
from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError

SEQ = 4


def _files(tmp_path, sizes=(40, 57, 23), dtype="uint16"):
    paths = []
    for k, n in enumerate(sizes):
        p = tmp_path / f"f{k}.npy"
        np.memmap(p, dtype=dtype, mode="w+", shape=(n,))[:] = np.arange(n) + 1000 * k
        paths.append(p.name)
    return paths


def _indices(tmp_path, n, epoch, chunk=None, seed=0):
    rng = np.random.default_rng(seed + epoch)
    idx = np.arange(n, dtype=np.uint32)
    rng.shuffle(idx)
    name = "global_indices_" + (f"chunk{chunk}_" if chunk else "") + f"dataset_size{n}_epoch{epoch}_seed0_v1.npy"
    idx.tofile(tmp_path / name)
    return str(tmp_path / name)


def test_tokens_and_instances_agree_and_epochs_continue(tmp_path):
    paths = _files(tmp_path)
    n = sum(s // SEQ for s in (40, 57, 23))  # 10 + 14 + 5 = 29 instances
    e1, e2 = _indices(tmp_path, n, 1), _indices(tmp_path, n, 2)
    a = build_olmo_core_manifest([e2, e1], paths, seq_len=SEQ, global_batch_tokens=3 * SEQ, shard_root=str(tmp_path))
    b = build_olmo_core_manifest([e1, e2], paths, seq_len=SEQ, global_batch_size=3, shard_root=str(tmp_path))
    assert a.sort_by("step").equals(b.sort_by("step"))
    steps = np.unique(a.column("step").to_numpy())
    # 9 batches an epoch: batch indices 0..17, epoch 2 from batch 9 (OLMo-core's global_step 10)
    assert steps.tolist() == list(range(0, 2 * (n // 3)))
    # epoch 2 alone starts at batch 9, derived from its name
    c = build_olmo_core_manifest([e2], paths, seq_len=SEQ, global_batch_tokens=3 * SEQ, shard_root=str(tmp_path))
    assert c.column("step").to_numpy().min() == n // 3


def test_max_target_sequence_length_changes_instances(tmp_path):
    paths = _files(tmp_path)
    mtsl = 4 * SEQ  # 16 tokens: files hold 2, 3, 1 blocks -> 8, 12, 4 instances
    n = 24
    gi = _indices(tmp_path, n, 1, chunk=4)
    t = build_olmo_core_manifest([gi], paths, seq_len=SEQ, global_batch_size=4, max_target_sequence_length=mtsl,
                                 shard_root=str(tmp_path))
    assert t.num_rows == 24
    with pytest.raises(UserError, match="dataset of 24 instances, but these settings give 29"):
        build_olmo_core_manifest([gi], paths, seq_len=SEQ, global_batch_size=4, shard_root=str(tmp_path))


def test_chunk_field_must_match(tmp_path):
    paths = _files(tmp_path)
    gi = _indices(tmp_path, 24, 1, chunk=2)
    with pytest.raises(UserError, match="chunk 2"):
        build_olmo_core_manifest([gi], paths, seq_len=SEQ, global_batch_size=4, max_target_sequence_length=16,
                                 shard_root=str(tmp_path))


def test_source_permutation_is_pythons_random_shuffle(tmp_path):
    paths = [f"p{i}" for i in range(7)]
    order = list(range(7))
    random.Random(5).shuffle(order)
    assert permute_sources(paths, 5) == [paths[i] for i in order]
    files = _files(tmp_path, sizes=(8, 12, 4, 16))
    gi = _indices(tmp_path, 10, 1)
    t = build_olmo_core_manifest([gi], files, seq_len=SEQ, global_batch_size=2, source_permutation_seed=3,
                                 shard_root=str(tmp_path))
    perm = permute_sources(files, 3)
    counts = [{"f0.npy": 2, "f1.npy": 3, "f2.npy": 1, "f3.npy": 4}[p] for p in perm]
    cum = np.cumsum([0] + counts)
    idx = np.fromfile(gi, np.uint32)
    first = int(idx[0])
    f = int(np.searchsorted(cum, first, side="right") - 1)
    rows = t.filter(np.asarray(t.column("step").to_numpy() == 0)).to_pylist()
    assert any(r["shard"] == perm[f] and r["row_start"] == (first - cum[f]) * SEQ for r in rows)


def test_refusals(tmp_path, capsys):
    paths = _files(tmp_path)
    gi = _indices(tmp_path, 29, 1)
    with pytest.raises(UserError, match="larger than the 29 instances.*in tokens"):
        build_olmo_core_manifest([gi], paths, seq_len=SEQ, global_batch_size=8 * SEQ, shard_root=str(tmp_path))
    with pytest.raises(UserError, match="not a positive multiple of seq_len"):
        build_olmo_core_manifest([gi], paths, seq_len=SEQ, global_batch_tokens=10, shard_root=str(tmp_path))
    with pytest.raises(UserError, match="max_target_sequence_length 6 is not a multiple"):
        build_olmo_core_manifest([gi], paths, seq_len=SEQ, global_batch_size=2, max_target_sequence_length=6,
                                 shard_root=str(tmp_path))
    with pytest.raises(UserError, match="same epoch"):
        build_olmo_core_manifest([gi, gi], paths, seq_len=SEQ, global_batch_size=2, shard_root=str(tmp_path))
    (tmp_path / "even").mkdir()
    even = _files(tmp_path / "even", sizes=(40, 56, 24))
    gi30 = _indices(tmp_path / "even", 30, 1)
    with pytest.raises(UserError, match="no chunk field"):
        build_olmo_core_manifest([gi30], even, seq_len=SEQ, global_batch_size=2, max_target_sequence_length=8,
                                 shard_root=str(tmp_path / "even"))
    rc = main(["manifest", "olmo", "--global-indices", gi, "--data-files", *paths, "--shards", str(tmp_path),
               "--seq-len", str(SEQ), "--global-batch-size", "64", "--out", str(tmp_path / "m.parquet")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "larger than the 29 instances" in err[0]
    assert not (tmp_path / "m.parquet").exists()


@pytest.mark.parametrize("cls, said", [
    ("NumpyPaddedFSLDataset", "pads each document"), ("NumpyPackedFSLDatasetConfig", "packs documents"),
    ("NumpyInterleavedFSLDataset", "interleaves"), ("NumpyFSLDatasetMixture", "source mixture"),
    ("NumpyVSLDataset", "variable sequence lengths"), ("MyDataset", "not an OLMo-core dataset class")])
def test_dataset_classes_it_does_not_replay_are_refused_by_name_before_any_read(tmp_path, capsys, cls, said):
    rc = main(["manifest", "olmo", "--global-indices", str(tmp_path / "missing.npy"), "--data-files", "f0.npy",
               "--shards", str(tmp_path), "--seq-len", str(SEQ), "--global-batch-size", "2", "--dataset", cls,
               "--out", str(tmp_path / "m.parquet")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"--dataset {cls}" in err and said in err, err
    assert not (tmp_path / "m.parquet").exists()
