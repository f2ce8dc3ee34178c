"""HF Trainer order: invariants here; exactness against torch (when installed) and against the real
Trainer (fidelity tests, in the framework's own virtualenv)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from spike_audit.pipelines.builders.hf import hf_trainer_order, torch_randperm
from spike_audit.pipelines.errors import UserError

# opt-in: tests never reach outside the checkout unless pointed at a framework virtualenv
HFSTREAM_PY = os.environ.get("HFSTREAM_PY", "")
FEED = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity" / "hf_feed.py"


@given(st.integers(0, 300), st.integers(0, 2**40))
@settings(max_examples=50, deadline=None)
def test_randperm_is_a_permutation(n, seed):
    p = torch_randperm(n, seed)
    assert sorted(p.tolist()) == list(range(n))
    assert (torch_randperm(n, seed) == p).all()


def test_randperm_equals_torch_when_installed():
    torch = pytest.importorskip("torch")
    for n, seed in [(1, 0), (2, 5), (101, 42), (5000, 2**33 + 17)]:
        g = torch.Generator()
        g.manual_seed(seed)
        assert (torch.randperm(n, generator=g).numpy() == torch_randperm(n, seed)).all()


@given(n=st.integers(1, 120), bs=st.integers(1, 9), w=st.integers(1, 4), ga=st.integers(1, 4),
       epochs=st.sampled_from([1.0, 2.0, 1.5]), drop=st.booleans())
@settings(max_examples=80, deadline=None)
def test_trainer_order_invariants(n, bs, w, ga, epochs, drop):
    if drop and n < bs * w:
        return
    o = hf_trainer_order(n, seed=3, per_device_batch_size=bs, world_size=w, gradient_accumulation_steps=ga,
                         num_train_epochs=epochs, drop_last=drop)
    batch, rank, micro, row = o["batch"], o["rank"], o["micro"], o["row"]
    assert ((row >= 0) & (row < n)).all() and (micro < ga).all() and (rank < w).all()
    # every rank takes part in every step with the same number of micro-batches (even_batches)
    for s in np.unique(batch):
        per_rank = [len(np.unique(micro[(batch == s) & (rank == r)])) for r in range(w)]
        assert len(set(per_rank)) == 1
    if w == 1 and not drop and epochs == 1.0:
        assert sorted(row.tolist()) == list(range(n))  # one epoch = each row once
    steps = len(np.unique(batch))
    len_dl = (n // bs if drop else -(-n // bs))
    len_dl = len_dl // w if drop else -(-len_dl // w) if w > 1 else len_dl
    assert steps == int(np.ceil(epochs * -(-len_dl // ga)))


def test_data_seed_overrides_seed_and_epochs_differ():
    a = hf_trainer_order(50, seed=1, data_seed=9, per_device_batch_size=5, num_train_epochs=2)
    b = hf_trainer_order(50, seed=9, per_device_batch_size=5, num_train_epochs=2)
    assert (a["row"] == b["row"]).all()
    assert not (a["row"][:50] == a["row"][50:]).all()


def test_refusals():
    with pytest.raises(UserError, match="sampler 'length'"):
        hf_trainer_order(10, sampler="length")
    with pytest.raises(UserError, match="no batch"):
        hf_trainer_order(3, per_device_batch_size=4, drop_last=True)
    for bad in (float("nan"), float("inf")):  # were a ValueError / OverflowError traceback
        with pytest.raises(UserError, match=r"--num-train-epochs (nan|inf): expected a finite number of epochs"):
            hf_trainer_order(10, per_device_batch_size=2, num_train_epochs=bad)


def _run_feed(tmp_path, world, *args):
    out = tmp_path / "feed"
    if world == 1:
        cmd = [HFSTREAM_PY, str(FEED), "--out", str(out), *args]
    else:
        cmd = [HFSTREAM_PY, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
               "127.0.0.1", "--master_port", str(29600 + world), str(FEED), "--out", str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(np.load(out / "feed.npz")), json.loads((out / "feed.json").read_text())


@pytest.mark.fidelity
@pytest.mark.skipif(not HFSTREAM_PY or not Path(HFSTREAM_PY).exists(), reason=f"no transformers virtualenv at {HFSTREAM_PY} "
                    "(set HFSTREAM_PY to a python with transformers, accelerate, datasets and torch)")
@pytest.mark.parametrize("world,args", [(1, ["--grad-accum", "3"]), (2, ["--rows", "37", "--batch-size", "5",
                                                                         "--epochs", "3", "--data-seed", "99"])])
def test_order_equals_the_real_trainer(tmp_path, world, args):
    feed, meta = _run_feed(tmp_path, world, *args)
    o = hf_trainer_order(meta["rows"], seed=meta["seed"], data_seed=meta["data_seed"],
                         per_device_batch_size=meta["batch_size"], gradient_accumulation_steps=meta["grad_accum"],
                         num_train_epochs=meta["epochs"], world_size=meta["world_size"], drop_last=meta["drop_last"])
    key = lambda d: sorted(zip(d["batch"].tolist(), d["rank"].tolist(), d["micro"].tolist(), d["row"].tolist()))
    assert key(o) == key(feed)
    assert meta["logged_steps"][0] == 1  # trainer_state.json numbers optimizer steps from 1


def test_cli_manifest_hf_over_a_datasets_directory(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from spike_audit.pipelines.cli.main import main
    from spike_audit.pipelines.manifest import read_manifest

    ds = datasets.Dataset.from_dict({"tokens": [[i, i + 1] for i in range(23)]})
    ds.save_to_disk(str(tmp_path / "train"))
    out = tmp_path / "m.parquet"
    rc = main(["manifest", "hf", "--data", "train", "--shards", str(tmp_path), "--per-device-train-batch-size", "4",
               "--gradient-accumulation-steps", "2", "--num-train-epochs", "2", "--seed", "5", "--out", str(out),
               "--check"])
    assert rc == 0
    t = read_manifest(str(out), str(tmp_path), allow_overlap=True)
    o = hf_trainer_order(23, seed=5, per_device_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=2)
    # steps are 0-based batch indices (trainer_state.json's global_step N is batch N - 1)
    assert sorted(zip(t.column("step").to_pylist(), t.column("row_start").to_pylist())) == sorted(
        zip(o["batch"].tolist(), o["row"].tolist()))
    rc = main(["manifest", "hf", "--data", "train", "--shards", str(tmp_path), "--per-device-train-batch-size", "4",
               "--group-by-length", "--out", str(tmp_path / "x.parquet")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].count("\n") == 0 and "--group-by-length" in err[-1]


@pytest.mark.parametrize("flags,named", [
    (["--use-seedable-sampler", "false"], "use_seedable_sampler=False"),
    (["--split-batches"], "split_batches=True"),
    (["--dispatch-batches"], "dispatch_batches=True"),
    (["--even-batches", "false"], "even_batches=False"),
    (["--iterable-dataset"], "an iterable training dataset"),
])
def test_cli_refuses_unsupported_accelerate_settings(tmp_path, capsys, flags, named):
    """Each setting whose order is not reproduced: exit 2, one line naming it, no manifest written
    (checked before the data is even opened: the --data here does not exist)."""
    from spike_audit.pipelines.cli.main import main

    out = tmp_path / "m.parquet"
    rc = main(["manifest", "hf", "--data", "missing", "--shards", str(tmp_path), "--per-device-train-batch-size",
               "4", *flags, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and named in err[0] and "not supported" in err[0]
    assert not out.exists()


def test_order_refuses_unsupported_settings_by_name():
    with pytest.raises(UserError, match="split_batches=True is not supported"):
        hf_trainer_order(10, split_batches=True)
    with pytest.raises(UserError, match="use_seedable_sampler=False"):
        hf_trainer_order(10, use_seedable_sampler=False)
    # the defaults are the supported values
    assert len(hf_trainer_order(10, per_device_batch_size=2, use_seedable_sampler=True, even_batches=True)["row"])
