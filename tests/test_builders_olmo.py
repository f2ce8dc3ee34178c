"""OLMo builder vs a literal re-implementation of OLMo's MemMapDataset + IterableDataset + train loop."""

from __future__ import annotations

import numpy as np
import pytest

from spike_audit.pipelines.builders.olmo import build_olmo_manifest
from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError
from spike_audit.schemas.steps import TRAINER_STEP_BASE
from spike_audit.pipelines.manifest import read_manifest
from spike_audit.pipelines.shards.read import read_slices

SEQ = 8


# ---- literal port, in OLMo's own style ---------------------------------------------------------

class MemMapDataset:
    def __init__(self, *paths, chunk_size, memmap_dtype):
        self._memmap_paths = paths
        self._chunk_size = chunk_size
        self.dtype = memmap_dtype
        self._mmap_offsets = None

    @property
    def offsets(self):
        if self._mmap_offsets is None:
            self._mmap_offsets = []
            start_offset, end_offset = 0, 0
            for path in self._memmap_paths:
                length = self._get_file_length(path)
                start_offset = end_offset
                end_offset = start_offset + length
                self._mmap_offsets.append((start_offset, end_offset))
        return self._mmap_offsets

    def _get_file_length(self, path):
        item_size = self.dtype(0).itemsize
        import os

        return os.path.getsize(path) // (item_size * self._chunk_size)

    def _read_chunk_from_memmap(self, path, index):
        item_size = self.dtype(0).itemsize
        bytes_start = index * item_size * self._chunk_size
        num_bytes = item_size * self._chunk_size
        with open(path, "rb") as f:
            f.seek(bytes_start)
            buffer = f.read(num_bytes)
        return np.frombuffer(buffer, dtype=self.dtype).astype(np.int64)

    def __len__(self):
        return self.offsets[-1][1]

    def __getitem__(self, index):
        index = int(index)
        for i, (offset_start, offset_end) in enumerate(self.offsets):
            if offset_start <= index < offset_end:
                return self._read_chunk_from_memmap(self._memmap_paths[i], index - offset_start)
        raise IndexError(index)


class IterableDataset:
    def __init__(self, dataset, global_indices_file, *, rank, world_size, start_index=0):
        self.dataset = dataset
        self.global_indices_file = global_indices_file
        self.rank, self.world_size, self.start_index = rank, world_size, start_index
        self.total_size = len(np.memmap(global_indices_file, mode="r", dtype=np.uint32))

    def __iter__(self):
        indices = np.memmap(self.global_indices_file, mode="r", dtype=np.uint32)
        if self.start_index > 0:
            indices = indices[self.start_index:]
        indices = indices[self.rank: self.total_size: self.world_size]
        return (self.dataset[int(idx)] for idx in indices)


def olmo_fit(dataset, gi_file, *, world_size, device_batch, micro_batch, max_steps):
    """Per (step, rank, micro_batch): the instances fed. global_step is incremented before training."""
    fed = {}
    for rank in range(world_size):
        it = iter(IterableDataset(dataset, gi_file, rank=rank, world_size=world_size))
        global_step = 0
        while global_step < max_steps:
            batch = [next(it) for _ in range(device_batch)]
            global_step += 1
            for m in range(0, device_batch, micro_batch):
                fed[(global_step, rank, m // micro_batch)] = batch[m:m + micro_batch]
    return fed


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture
def run(tmp_path):
    rng = np.random.default_rng(3)
    names = ["part-0.npy", "sub/part-1.npy", "part-2.npy"]
    sizes = [SEQ * 10 + 5, SEQ * 7, SEQ * 13 + 3]  # leftovers dropped
    (tmp_path / "sub").mkdir()
    for n, s in zip(names, sizes):
        mm = np.memmap(tmp_path / n, dtype=np.uint16, mode="w+", shape=(s,))
        mm[:] = rng.integers(0, 50000, s)
        mm.flush()
    total = sum(s // SEQ for s in sizes)
    gi = np.memmap(tmp_path / "global_indices.npy", dtype=np.uint32, mode="w+", shape=(total,))
    gi[:] = rng.permutation(total)
    gi.flush()
    return tmp_path, names


def _read(root, table, i):
    row = {k: table.column(k)[i].as_py() for k in table.column_names}
    b = read_slices(str(root), row["shard"], [[row["row_start"], row["row_end"]]], unit=row["unit"])
    return np.asarray(b.column("tokens")[0].as_py())


def test_manifest_points_at_exactly_the_tokens_olmo_fed(run):
    root, names = run
    world, dbs, mbs = 2, 3, 2
    table = build_olmo_manifest(root / "global_indices.npy", names, seq_len=SEQ, global_batch_size=world * dbs,
                                shard_root=str(root), world_size=world, micro_batch_size=mbs)
    ds = MemMapDataset(*[str(root / n) for n in names], chunk_size=SEQ, memmap_dtype=np.uint16)
    n_steps = len(ds) // (world * dbs)
    fed = olmo_fit(ds, root / "global_indices.npy", world_size=world, device_batch=dbs, micro_batch=mbs,
                   max_steps=n_steps)
    got: dict = {}
    for i in range(table.num_rows):
        # the manifest's step is the 0-based batch index; OLMo's global_step is 1-based
        key = (table.column("step")[i].as_py() + TRAINER_STEP_BASE["olmo"], table.column("rank")[i].as_py(),
               table.column("micro_batch")[i].as_py())
        got.setdefault(key, []).append(_read(root, table, i))
    assert sorted(got) == sorted(fed)
    for key, seqs in fed.items():
        assert [s.tolist() for s in got[key]] == [s.tolist() for s in seqs], key
    assert set(table.column("unit").to_pylist()) == {"token"}


def test_step_base_range_and_uint32(tmp_path):
    tok = np.arange(SEQ * 6, dtype=np.uint32) + 70000
    tok.tofile(tmp_path / "d.npy")  # raw memmap despite the name
    np.save(tmp_path / "gi.npy", np.array([5, 4, 3, 2, 1, 0], np.uint32))  # a real .npy is accepted too
    t = build_olmo_manifest(tmp_path / "gi.npy", ["d.npy"], seq_len=SEQ, global_batch_size=2, dtype="uint32",
                            shard_root=str(tmp_path), steps=(1, 2))
    assert t.column("step").to_pylist() == [1, 1, 2, 2]
    assert t.column("row_start").to_pylist() == [3 * SEQ, 2 * SEQ, SEQ, 0]
    b = read_slices(str(tmp_path), "d.npy", [[3 * SEQ, 4 * SEQ]], unit="token", dtype="uint32")
    assert b.column("tokens")[0].as_py() == tok[3 * SEQ:4 * SEQ].tolist()
    t = build_olmo_manifest(tmp_path / "gi.npy", ["d.npy"], seq_len=SEQ, global_batch_size=2, dtype="uint32",
                            shard_root=str(tmp_path), first_step=1)
    assert t.column("step").to_pylist()[:2] == [1, 1]


def test_index_past_the_data_is_an_error(tmp_path):
    np.zeros(SEQ * 2, np.uint16).tofile(tmp_path / "d.bin")
    np.array([0, 1, 2, 0], np.uint32).tofile(tmp_path / "gi.npy")
    with pytest.raises(UserError, match=r"gi.npy: position 2: instance 2 is past the 2 instances"):
        build_olmo_manifest(tmp_path / "gi.npy", ["d.bin"], seq_len=SEQ, global_batch_size=2, shard_root=str(tmp_path))


def test_cli(run, tmp_path, capsys):
    root, names = run
    out = tmp_path / "m.parquet"
    rc = main(["manifest", "olmo", "--global-indices", str(root / "global_indices.npy"), "--data-files", *names,
               "--shards", str(root), "--seq-len", str(SEQ), "--global-batch-size", "4", "--out", str(out), "--check"])
    assert rc == 0
    t = read_manifest(out, str(root))
    assert t.num_rows == (sum((SEQ * 10 + 5, SEQ * 7, SEQ * 13 + 3)) // SEQ // 4) * 4


def test_batch_positions_are_the_global_batch_order(run):
    """batch_pos p of step (batch index) s is instance global_indices[s * gbs + p]; rank p % world."""
    root, names = run
    world, gbs = 2, 6
    table = build_olmo_manifest(root / "global_indices.npy", names, seq_len=SEQ, global_batch_size=gbs,
                                shard_root=str(root), world_size=world, micro_batch_size=1)
    ds = MemMapDataset(*[str(root / n) for n in names], chunk_size=SEQ, memmap_dtype=np.uint16)
    gi = np.memmap(root / "global_indices.npy", dtype=np.uint32, mode="r")
    step, pos = table.column("step").to_numpy(), table.column("batch_pos").to_numpy()
    assert sorted(zip(step.tolist(), pos.tolist())) == [(s, p) for s in range(len(gi) // gbs) for p in range(gbs)]
    np.testing.assert_array_equal(table.column("rank").to_numpy(), pos % world)
    for i in range(0, table.num_rows, 5):
        want = ds[int(gi[step[i] * gbs + pos[i]])]
        assert _read(root, table, i).tolist() == want.tolist()


def test_indices_shorter_than_an_epoch_of_the_settings_is_one_line(run, tmp_path, capsys):
    """A wrong --seq-len (half the run's) makes an epoch twice as many instances as the indices file holds: one
    line naming the file, both counts and what to check, exit 2; no manifest written."""
    root, names = run
    out = tmp_path / "m.parquet"
    rc = main(["manifest", "olmo", "--global-indices", str(root / "global_indices.npy"), "--data-files", *names,
               "--shards", str(root), "--seq-len", str(SEQ // 2), "--global-batch-size", "4", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert len(err) == 1 and "global_indices.npy" in err[0] and "check seq_len" in err[0], err
    import re

    m = re.search(r": (\d+) indices, but an epoch of these settings is (\d+) batches of 4 instances = (\d+) ", err[0])
    assert m, err
    have, batches, need = map(int, m.groups())
    assert have == sum(s // SEQ for s in (SEQ * 10 + 5, SEQ * 7, SEQ * 13 + 3))  # one epoch at the run's seq_len
    assert need == batches * 4 and need > have, err


def test_a_bad_index_file_is_named_by_the_cli(tmp_path, capsys):
    """The command line read the index file itself and the error said ``<global_indices>``; a negative index was
    reported as past the data."""
    np.zeros(SEQ * 4, np.uint16).tofile(tmp_path / "d.bin")
    np.save(tmp_path / "global_indices.npy", np.array([0, 1, -3, 2], np.int64))
    rc = main(["manifest", "olmo", "--global-indices", str(tmp_path / "global_indices.npy"), "--data-files", "d.bin",
               "--shards", str(tmp_path), "--seq-len", str(SEQ), "--global-batch-size", "2",
               "--out", str(tmp_path / "m.parquet")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "global_indices.npy: position 2: instance -3 is negative (expected 0..3" in err[0], err
