"""mosaicml-streaming order (``manifest streaming``): invariants and refusals here; exactness against the real
StreamingDataset + DataLoader in ``benchmarks/fidelity_streaming.py`` (fidelity tests below, in the framework's
own virtualenv)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from spike_audit.pipelines.builders.streaming import (SHUFFLES, partition, resample, stream_weights,
                                                      streaming_order)
from spike_audit.pipelines.errors import UserError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mds"
HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity_streaming.py"
# opt-in: tests never reach outside the checkout unless pointed at a framework virtualenv
HFSTREAM_PY = os.environ.get("HFSTREAM_PY", "")


@given(st.lists(st.integers(1, 30), min_size=1, max_size=12), st.sampled_from(sorted(SHUFFLES)),
       st.integers(1, 4), st.integers(0, 3), st.integers(0, 2**31))
@settings(max_examples=120, deadline=None)
def test_every_shuffle_is_a_permutation_of_the_sample_space(units, algo, canonical, epoch, seed):
    units = np.asarray(units, np.int64)
    if units.sum() < canonical:
        return
    perm = SHUFFLES[algo](units, canonical, seed, epoch, 5)
    assert sorted(perm.tolist()) == list(range(int(units.sum())))
    assert (SHUFFLES[algo](units, canonical, seed, epoch, 5) == perm).all()  # deterministic


@given(st.integers(1, 300), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 7))
@settings(max_examples=120, deadline=None)
def test_partition_covers_every_sample_and_pads_only_at_the_end(n, canonical, ranks, workers, bs):
    p = partition(n, canonical, 1, ranks, workers, bs)
    ids = p[0]  # (ranks, workers, batches, batch)
    assert set(ids[ids >= 0].tolist()) == set(range(n))  # every sample, repeats only as padding
    for r in range(ranks):
        seq = ids[r].transpose(1, 0, 2).reshape(-1)  # the rank's run: chunks dealt to workers in turn
        pad = np.flatnonzero(seq == -1)
        assert not len(pad) or (pad == np.arange(len(seq) - len(pad), len(seq))).all()


def test_no_shuffle_one_rank_is_the_plain_order():
    o = streaming_order([np.array([5, 7, 3])], batch_size=4, epochs=2)
    assert o["sample"].tolist() == list(range(15)) * 2
    assert o["batch"].tolist() == [i // 4 for i in range(15)] + [4 + i // 4 for i in range(15)]
    assert o["epoch"].tolist() == [0] * 15 + [1] * 15


def test_workers_take_turns_and_drop_last_drops_each_workers_short_batch():
    o = streaming_order([np.array([10])], batch_size=2, num_workers=2)
    # worker 0 gets chunks 0, 2, 4; worker 1 chunks 1, 3 (the rank's run cut in batches, dealt in turn)
    assert o["sample"].tolist() == list(range(10)) and o["batch"].max() == 4
    o = streaming_order([np.array([9])], batch_size=2, num_workers=2, drop_last=True)
    assert o["sample"].tolist() == list(range(8))


def test_epoch_size_resamples_with_whole_and_partial_repeats():
    units, small = resample([np.array([4, 6])], epoch=0, seed=3, epoch_size=25, shuffle=True)
    # per shard: its whole repeats, then the partial one (shard 0: 4, 4, k; shard 1: 6, 6, 5 - k)
    u = units.tolist()
    assert u[:2] == [4, 4] and 6 in u and units.sum() == 25 and len(u) in (5, 6)
    counts = np.bincount(small, minlength=10)
    assert counts.sum() == 25 and set(counts.tolist()) <= {2, 3}


@pytest.mark.parametrize("kw,named", [
    ({"batching_method": "per_stream"}, "batching_method='per_stream' is not supported"),
    ({"replication": 2}, "replication=2 is not supported"),
    ({"shuffle_algo": "py3x"}, "shuffle_algo='py3x' is not known"),
    ({"partition_algo": "fast"}, "partition_algo='fast' is not known"),
    ({"initial_physical_nodes": 1, "num_workers": 2}, "initial_physical_nodes with DataLoader workers"),
    ({"world_size": 3, "ranks_per_node": 2}, "not a multiple of 2 ranks per node"),
    ({"world_size": 4, "ranks_per_node": 2, "num_canonical_nodes": 3}, "one must divide the other"),
    # a negative resumption point was a Python index from the end: one slice of the last sample, no error
    ({"sample_in_epoch": -1}, "sample_in_epoch -1: expected a non-negative count"),
])
def test_unsupported_settings_are_refused_by_name(kw, named):
    with pytest.raises(UserError, match=named.replace("(", r"\(").replace("[", r"\[")):
        streaming_order([np.array([50])], batch_size=2, shuffle=True, **kw)


@pytest.mark.parametrize("flags,named", [
    (["--batching-method", "stratified"], "batching_method='stratified'"),
    (["--replication", "2"], "replication=2"),
    (["--initial-physical-nodes", "1", "--num-workers", "1"], "initial_physical_nodes with DataLoader workers"),
])
def test_cli_refusals_are_one_line_before_the_data_is_read(tmp_path, capsys, flags, named):
    from spike_audit.pipelines.cli.main import main

    rc = main(["manifest", "streaming", "--data", "missing", "--shards", str(tmp_path), "--batch-size", "4",
               "--out", str(tmp_path / "m.parquet"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and named in err[0] and "not supported" in err[0]
    assert not (tmp_path / "m.parquet").exists()


def test_cli_builds_a_checked_manifest_over_an_mds_dataset(tmp_path, capsys):
    from spike_audit.pipelines.builders.streaming import stream_sizes
    from spike_audit.pipelines.cli.main import main
    from spike_audit.pipelines.manifest import load_manifest_table, read_meta

    out = tmp_path / "m.parquet"
    rc = main(["manifest", "streaming", "--data", "mixed_zstd", "--shards", str(FIXTURES), "--batch-size", "2",
               "--shuffle", "--epochs", "2", "--out", str(out), "--check"])
    assert rc == 0, capsys.readouterr().err
    t = load_manifest_table(out)
    o = streaming_order(stream_sizes(str(FIXTURES), ["mixed_zstd"]), batch_size=2, shuffle=True, epochs=2)
    assert sorted(zip(t.column("step").to_pylist(), t.column("row_start").to_pylist())) == sorted(
        zip(o["batch"].tolist(), o["sample"].tolist()))
    assert set(t.column("epoch").to_pylist()) == {0, 1}
    meta = read_meta(out)
    assert meta["trainer"] == "streaming" and meta["step_convention"] == "batch_index"


@given(st.lists(st.integers(1, 400), min_size=1, max_size=5), st.data(), st.integers(0, 2**31))
@settings(max_examples=120, deadline=None)
def test_relative_weights_split_the_epoch_by_share_within_one_sample(sizes, data, seed):
    """Stream.apply_weights, relative: every stream gets floor(total x share) or one more, and the epoch has
    exactly epoch_size (default: every sample) samples."""
    props = data.draw(st.lists(st.floats(0.01, 10), min_size=len(sizes), max_size=len(sizes)))
    epoch_size = data.draw(st.one_of(st.none(), st.integers(1, 3000)))
    streams = [np.array([n]) for n in sizes]
    _, small = resample(streams, epoch=0, seed=seed, epoch_size=epoch_size, shuffle=True,
                        weights=stream_weights(len(sizes), proportion=props, epoch_size=epoch_size))
    total = epoch_size or sum(sizes)
    offsets = np.cumsum([0] + sizes)
    got = np.bincount(np.searchsorted(offsets, small, side="right") - 1, minlength=len(sizes))
    want = np.floor(total * np.array(props) / sum(props))
    assert got.sum() == total and np.all((got >= want) & (got <= want + 1))


def test_absolute_weights_take_repeat_times_samples_or_choose_or_every_sample():
    o = streaming_order([np.array([20, 20]), np.array([30]), np.array([7])], batch_size=4, shuffle=True,
                        repeat=[2.5, None, None], choose=[None, 11, None])
    per_stream = np.bincount(np.searchsorted([0, 40, 70, 77], o["sample"], side="right") - 1, minlength=3)
    assert per_stream.tolist() == [100, 11, 7]
    # 2.5 x 40: every sample twice, then half of them once more (no sample three times more than another)
    assert set(np.bincount(o["sample"][o["sample"] < 40]).tolist()) <= {2, 3}


@pytest.mark.parametrize("flags,named", [
    (["--proportion", "0.5", "0.5"], "--proportion: 2 values for 1 streams"),
    (["--proportion", "0.5", "--repeat", "2"], "cannot be mixed with --repeat"),
    (["--repeat", "2", "--choose", "5"], "stream 0 has both --repeat and --choose"),
    (["--repeat", "-1"], "--repeat: -1.0 for stream 0: expected a non-negative number"),
    (["--choose", "2.5"], "--choose: 2.5 for stream 0: expected a whole number"),
    (["--choose", "ten"], "--choose: 'ten' for stream 0 is not a number"),
    (["--proportion", "0"], "the proportions sum to 0"),
    (["--repeat", "2", "--epoch-size", "10"], "--epoch-size with --repeat/--choose weights"),
])
def test_bad_stream_weights_are_one_line_errors_before_the_data_is_read(tmp_path, capsys, flags, named):
    from spike_audit.pipelines.cli.main import main

    rc = main(["manifest", "streaming", "--data", "missing", "--shards", str(tmp_path), "--batch-size", "4",
               "--out", str(tmp_path / "m.parquet"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and named in err[0], err
    assert not (tmp_path / "m.parquet").exists()


def test_cli_weighted_streams_build_a_checked_manifest(tmp_path, capsys):
    from spike_audit.pipelines.builders.streaming import stream_sizes
    from spike_audit.pipelines.cli.main import main
    from spike_audit.pipelines.manifest import load_manifest_table

    out = tmp_path / "m.parquet"
    rc = main(["manifest", "streaming", "--data", "mixed_zstd", "--shards", str(FIXTURES), "--batch-size", "2",
               "--shuffle", "--repeat", "1.5", "--out", str(out), "--check"])
    assert rc == 0, capsys.readouterr().err
    n = int(stream_sizes(str(FIXTURES), ["mixed_zstd"])[0].sum())
    rows = load_manifest_table(out).column("row_start").to_numpy()
    assert len(rows) == int(1.5 * n) and set(np.bincount(rows, minlength=n).tolist()) == {1, 2}


def _harness():
    spec = importlib.util.spec_from_file_location("spike_audit_fidelity_streaming", HARNESS)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


FIDELITY_CASES = ["py1e (default), 1 rank, 2 epochs", "2 ranks, 2 workers",
                  "2 nodes x 2 ranks, 8 canonical nodes, py1s, 2 workers", "resumed at sample_in_epoch 37",
                  "3 streams, repeat 2.5 / choose 40 / unweighted, py1br",
                  "2 ranks, 2 streams, proportion 0.7 0.3, 2 workers"]


@pytest.mark.fidelity
@pytest.mark.slow
@pytest.mark.skipif(not HFSTREAM_PY or not Path(HFSTREAM_PY).exists(), reason=f"no mosaicml-streaming virtualenv at {HFSTREAM_PY} "
                    "(set HFSTREAM_PY to a python with mosaicml-streaming and torch)")
@pytest.mark.parametrize("name", FIDELITY_CASES)
def test_manifest_equals_what_the_real_streaming_dataset_fed(tmp_path, name):
    h = _harness()
    k, (_, world, settings_) = next((i, c) for i, c in enumerate(h.CASES) if c[0] == name)
    r = h.run_case(name, world, settings_, tmp_path, 29800 + k)
    assert "error" not in r, r
    assert r["steps_checked"] > 0 and r["steps_equal"] == r["steps_checked"], r
    assert r["groups_equal"] == r["groups_checked"], r
