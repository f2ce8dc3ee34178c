"""Sequential builder vs literal ports of modded-nanogpt's DistributedDataLoader (2024-10 records) and
llm.c's dataloader.h (no shuffle), driven by their training loops."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from spike_audit.pipelines.builders.sequential import build_sequential_manifest
from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import read_manifest
from spike_audit.pipelines.shards.read import read_slices

HEADER_SIZE = 256


# ---- modded-nanogpt (records/2024-10), numpy in place of torch ----------------------------------

def _peek_data_shard(filename):
    with open(filename, "rb") as f:
        header = np.frombuffer(f.read(256 * 4), dtype=np.int32)
    assert header[0] == 20240520, "magic number mismatch in the data .bin file"
    assert header[1] == 1, "unsupported version"
    return header[2]


def _load_data_shard(filename):
    with open(filename, "rb") as f:
        header = np.frombuffer(f.read(256 * 4), dtype=np.int32)
        assert header[0] == 20240520
        ntok = header[2]
        tokens = np.frombuffer(f.read(), dtype=np.uint16)
    assert len(tokens) == ntok
    return tokens


class DistributedDataLoader:
    def __init__(self, filename_pattern, B, T, process_rank, num_processes):
        self.process_rank = process_rank
        self.num_processes = num_processes
        self.B = B
        self.T = T
        self.files = sorted(glob.glob(filename_pattern))
        for fname in self.files:
            shard_ntok = _peek_data_shard(fname)
            assert shard_ntok >= num_processes * B * T + 1
        self.reset()

    def reset(self):
        self.current_shard = 0
        self.current_position = self.process_rank * self.B * self.T
        self.tokens = _load_data_shard(self.files[self.current_shard])

    def advance(self):
        self.current_shard = (self.current_shard + 1) % len(self.files)
        self.current_position = self.process_rank * self.B * self.T
        self.tokens = _load_data_shard(self.files[self.current_shard])

    def next_batch(self):
        B = self.B
        T = self.T
        buf = self.tokens[self.current_position: self.current_position + B * T + 1]
        buf = buf.astype(np.int64)
        x = (buf[:-1]).reshape(B, T)
        y = (buf[1:]).reshape(B, T)
        self.current_position += B * T * self.num_processes
        if self.current_position + (B * T * self.num_processes + 1) > len(self.tokens):
            self.advance()
        return x, y


# ---- llm.c dataloader.h (should_shuffle = 0), ported line by line -------------------------------

class LlmcDataLoader:
    def __init__(self, filename_pattern, B, T, process_rank, num_processes):
        self.process_rank, self.num_processes, self.B, self.T = process_rank, num_processes, B, T
        self.glob_result = sorted(glob.glob(filename_pattern))
        self.header_bytes = HEADER_SIZE * 4
        self.total_batch_size_bytes = num_processes * B * T * 2
        self.local_batch_offset_bytes = process_rank * B * T * 2
        self.tokens_file = None
        self.reset()

    def load_shard_(self, shard_index):
        self.tokens_file = self.glob_result[shard_index]
        with open(self.tokens_file, "rb") as f:
            header = np.frombuffer(f.read(HEADER_SIZE * 4), dtype=np.int32)
        ntok = int(header[2])
        assert os.path.getsize(self.tokens_file) == HEADER_SIZE * 4 + ntok * 2
        self.shard_num_samples = (ntok * 2 - 2) // self.total_batch_size_bytes
        return ntok

    def reset(self):
        self.current_shard_idx = 0
        self.current_sample_idx = 0
        self.load_shard_(self.current_shard_idx)

    def advance_(self):
        if self.current_shard_idx == len(self.glob_result) - 1:
            self.reset()
            return
        self.current_shard_idx = (self.current_shard_idx + 1) % len(self.glob_result)
        self.current_sample_idx = 0
        self.load_shard_(self.current_shard_idx)

    def load_batch(self):
        idx = self.current_sample_idx
        global_batch_offset_bytes = idx * self.total_batch_size_bytes
        current_offset = self.header_bytes + global_batch_offset_bytes + self.local_batch_offset_bytes
        with open(self.tokens_file, "rb") as f:
            f.seek(current_offset)
            buffer = np.frombuffer(f.read((self.B * self.T + 1) * 2), dtype=np.uint16).astype(np.int64)
        return buffer[:-1].reshape(self.B, self.T), buffer[1:].reshape(self.B, self.T)

    def next_batch(self):
        if self.current_sample_idx >= self.shard_num_samples:
            self.advance_()
        xy = self.load_batch()
        self.current_sample_idx += 1
        return xy


def train(loader_cls, pattern, *, B, T, world, accum, num_iterations):
    """The records' loop: x, y fetched before the loop; each micro-step trains then prefetches.
    Returns {(step, rank, micro): (x, y)} with ``step`` the 0-based loop index, the batch index
    (modded-nanogpt logs it as ``step:{step+1}``, llm.c's log file as ``s:{step}``)."""
    fed = {}
    for rank in range(world):
        loader = loader_cls(pattern, B, T, rank, world)
        x, y = loader.next_batch()
        for step in range(num_iterations):
            for i in range(1, accum + 1):
                fed[(step, rank, i - 1)] = (x, y)
                x, y = loader.next_batch()
    return fed


def _write_shard(path, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(5)
    d = tmp_path / "fineweb10B"
    d.mkdir()
    # uneven sizes, chosen so the modded loader's per-rank advance test fires at different batches
    for i, n in enumerate([2 * 3 * 4 * 3 * 5 + 30, 2 * 3 * 4 * 3 + 1, 2 * 3 * 4 * 3 * 4 + 17]):
        _write_shard(d / f"fineweb_train_{i + 1:06d}.bin", rng.integers(0, 50257, n))
    return tmp_path


@pytest.mark.parametrize("variant,loader", [("modded-nanogpt", DistributedDataLoader), ("llm.c", LlmcDataLoader)])
@pytest.mark.parametrize("world,accum", [(1, 1), (3, 2)])
def test_manifest_points_at_exactly_the_tokens_fed(shards, variant, loader, world, accum):
    B, T, steps = 2, 4, 25  # several passes over all shards
    files = sorted(os.path.relpath(p, shards) for p in glob.glob(str(shards / "fineweb10B" / "*.bin")))
    table = build_sequential_manifest(files, batch_size=B, seq_len=T, world_size=world, num_steps=steps,
                                      grad_accum=accum, variant=variant, shard_root=str(shards))
    fed = train(loader, str(shards / "fineweb10B" / "fineweb_train_*.bin"), B=B, T=T, world=world, accum=accum,
                num_iterations=steps)
    got: dict = {}
    for shard in set(table.column("shard").to_pylist()):
        sel = np.flatnonzero(np.asarray(table.column("shard").to_pylist()) == shard)
        sub = table.take(sel)
        batch = read_slices(str(shards), shard, np.stack([sub.column("row_start").to_numpy(),
                                                          sub.column("row_end").to_numpy()], 1), unit="token")
        for i in range(sub.num_rows):
            key = tuple(sub.column(c)[i].as_py() for c in ("step", "rank", "micro_batch"))
            got.setdefault(key, []).append((sub.column("row_start")[i].as_py(), batch.column("tokens")[i].as_py()))
    assert sorted(got) == sorted(fed)
    for key, (x, y) in fed.items():
        seqs = np.array([s for _, s in sorted(got[key])])  # B sequences of T + 1 tokens, in window order
        assert seqs.shape == (B, T + 1)
        np.testing.assert_array_equal(seqs[:, :-1], x)
        np.testing.assert_array_equal(seqs[:, 1:], y)


def test_ranks_leave_a_shard_at_different_batches_in_modded(shards):
    files = sorted(os.path.relpath(p, shards) for p in glob.glob(str(shards / "fineweb10B" / "*.bin")))
    t = build_sequential_manifest(files, batch_size=2, seq_len=4, world_size=3, num_steps=20, shard_root=str(shards))
    shard_of = {}
    for i in range(t.num_rows):
        shard_of[(t.column("step")[i].as_py(), t.column("rank")[i].as_py())] = t.column("shard")[i].as_py()
    assert any(shard_of[(s, 0)] != shard_of[(s, 2)] for s in range(0, 20))


def test_small_shard_and_cli(shards, tmp_path):
    _write_shard(tmp_path / "tiny.bin", np.arange(10))
    with pytest.raises(UserError, match=r"shard 'tiny.bin' has 10 tokens, fewer than B\*T\*world\+1 = 17"):
        build_sequential_manifest(["tiny.bin"], batch_size=2, seq_len=8, num_steps=1, shard_root=str(tmp_path))
    out = tmp_path / "m.parquet"
    assert main(["manifest", "sequential", "--data-files", "fineweb10B/fineweb_train_*.bin", "--shards", str(shards),
                 "-B", "2", "-T", "4", "--world-size", "2", "--num-steps", "5", "--variant", "llm.c",
                 "--out", str(out), "--check"]) == 0
    t = read_manifest(out, str(shards))
    assert t.num_rows == 5 * 2 * 2 and t.column("shard")[0].as_py() == "fineweb10B/fineweb_train_000001.bin"


def test_verbosity_flags_after_a_trainer_subcommand(shards, tmp_path, capsys):
    """-q / -v are taken after ``manifest TRAINER ...`` as after any other command (they were refused there:
    "unrecognized arguments: -q")."""
    args = ["manifest", "sequential", "--data-files", "fineweb10B/fineweb_train_*.bin", "--shards", str(shards),
            "-B", "2", "-T", "4", "--num-steps", "3"]
    assert main(args + ["--out", str(tmp_path / "q.parquet"), "-q"]) == 0
    assert main(args + ["--out", str(tmp_path / "v.parquet"), "-v"]) == 0
    assert main(["manifest", "-q"] + args[1:] + ["--out", str(tmp_path / "q2.parquet")]) == 0
    assert (tmp_path / "q.parquet").read_bytes() == (tmp_path / "q2.parquet").read_bytes()
    assert "unrecognized" not in capsys.readouterr().err


def test_every_command_and_subcommand_takes_the_verbosity_flags():
    import argparse

    from spike_audit.pipelines.cli.main import _command_parsers, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parsers = list(_command_parsers(sub))
    assert len(parsers) >= 12  # 7 commands and manifest's 5 trainers
    for p in parsers:
        flags = {o for a in p._actions for o in a.option_strings}
        assert {"-q", "--quiet", "-v", "--verbose"} <= flags, p.prog


def test_variants_differ_where_the_loaders_differ(shards):
    files = sorted(os.path.relpath(p, shards) for p in glob.glob(str(shards / "fineweb10B" / "*.bin")))
    kw = dict(batch_size=2, seq_len=4, world_size=3, num_steps=20, shard_root=str(shards))
    a = build_sequential_manifest(files, variant="modded-nanogpt", **kw)
    b = build_sequential_manifest(files, variant="llm.c", **kw)
    assert a.column("step").to_pylist() == b.column("step").to_pylist()
    assert a.column("row_start").to_pylist() != b.column("row_start").to_pylist()


def test_batch_positions_are_micro_step_major_then_rank(shards):
    B, T, world, accum = 2, 4, 3, 2
    files = sorted(os.path.relpath(p, shards) for p in glob.glob(str(shards / "fineweb10B" / "*.bin")))
    t = build_sequential_manifest(files, batch_size=B, seq_len=T, world_size=world, num_steps=7, grad_accum=accum,
                                  shard_root=str(shards))
    step, pos = t.column("step").to_numpy(), t.column("batch_pos").to_numpy()
    rank, micro = t.column("rank").to_numpy(), t.column("micro_batch").to_numpy()
    for s in range(0, 7):
        assert sorted(pos[step == s].tolist()) == list(range(B * world * accum))
    np.testing.assert_array_equal(pos // B % world, rank)
    np.testing.assert_array_equal(pos // (B * world), micro)
    # within one rank's micro-batch, positions follow the window order (sequence b starts at start + b * T)
    for s, r, m in {(int(a), int(b), int(c)) for a, b, c in zip(step, rank, micro)}:
        sel = (step == s) & (rank == r) & (micro == m)
        starts = t.column("row_start").to_numpy()[sel]
        assert np.argsort(pos[sel]).tolist() == np.argsort(starts).tolist()


@pytest.mark.parametrize("itemsize", [2, 4])
def test_a_header_with_an_unknown_magic_is_refused_not_read_as_tokens(tmp_path, itemsize):
    """A shard laid out with the 256 x int32 header (its token count matching the file size) but another magic: the
    loaders assert the magic; read header-less, every sequence would start 512 tokens early."""
    n = 5000
    header = np.zeros(256, np.int32)
    header[:3] = [1234, 1, n]
    path = tmp_path / "bad_000000.bin"
    path.write_bytes(header.tobytes() + (np.arange(n) % 50000).astype(np.uint16 if itemsize == 2 else np.uint32).tobytes())
    with pytest.raises(UserError, match=r"bad_000000\.bin: starts with a 1,024-byte token header .* magic 1234"):
        build_sequential_manifest([str(path)], batch_size=4, seq_len=64, world_size=1, num_steps=2)


def test_a_header_less_token_file_is_still_read_whole(tmp_path):
    """nanoGPT-style header-less memmaps are read from byte 0 (their first values are tokens, not a header)."""
    tokens = (np.arange(20000) * 7919 % 50257).astype(np.uint16)
    path = tmp_path / "plain_000000.bin"
    path.write_bytes(tokens.tobytes())
    t = build_sequential_manifest([str(path)], batch_size=4, seq_len=64, world_size=1, num_steps=2, shard_root=None)
    assert t.column("row_start")[0].as_py() == 0 and t.column("row_end")[0].as_py() == 64 + 1  # from byte 0
