"""`spike-audit replay` against torch itself: a tiny causal LM built and saved here, its per-row losses
recomputed one sequence at a time with ``model(input_ids, labels=input_ids).loss``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch", reason="replay needs the optional `replay` extra (torch); not installed")
transformers = pytest.importorskip("transformers", reason="replay needs the optional `replay` extra (transformers)")

from spike_audit.pipelines.cli.main import main  # noqa: E402
from spike_audit.pipelines.manifest import manifest_from_arrays, write_manifest  # noqa: E402

VOCAB = 97


def _tiny_model(root, kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    else:
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    path = root / f"{kind}-ckpt"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two shards (a Parquet of token rows of varied length, a flat token .npy) and a manifest of 3
    steps mixing them, one row too short to predict anything."""
    root = tmp_path_factory.mktemp("replay")
    rng = np.random.default_rng(0)
    shards = root / "shards"
    shards.mkdir()
    lengths = [12, 1, 30, 7, 64, 2, 19, 40, 5, 33]
    rows = [rng.integers(0, VOCAB, n).tolist() for n in lengths]
    pq.write_table(pa.table({"tokens": pa.array(rows, pa.list_(pa.uint16()))}), shards / "a.parquet",
                   row_group_size=4)
    flat = rng.integers(0, VOCAB, 400).astype(np.uint16)
    np.save(shards / "b.npy", flat)
    man = manifest_from_arrays(
        step=[1, 1, 2, 2, 3, 3],
        shard=["a.parquet", "b.npy", "a.parquet", "b.npy", "a.parquet", "b.npy"],
        row_start=[0, 0, 4, 17, 8, 100], row_end=[4, 17, 8, 50, 10, 164],
        unit=["row", "token", "row", "token", "row", "token"])
    write_manifest(man, root / "manifest.parquet")
    seqs = {1: rows[0:4] + [flat[0:17].tolist()], 2: rows[4:8] + [flat[17:50].tolist()],
            3: rows[8:10] + [flat[100:164].tolist()]}
    return root, seqs


def _direct(model_dir, seq):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    out = []
    with torch.no_grad():
        for s in seq:
            if len(s) < 2:
                out.append(float("nan"))
                continue
            ids = torch.tensor([s], dtype=torch.long)
            out.append(float(model(input_ids=ids, labels=ids).loss))
    return np.array(out)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_replay_reproduces_torch_losses(run, kind, tmp_path):
    root, seqs = run
    ckpt = _tiny_model(tmp_path, kind)
    out = tmp_path / "losses.parquet"
    rc = main(["replay", "--model", str(ckpt), "--manifest", str(root / "manifest.parquet"),
               "--shards", str(root / "shards"), "--steps", "1:3", "--out", str(out), "--batch-size", "3"])
    assert rc == 0
    got = pq.read_table(out).to_pylist()
    for step, seq in seqs.items():
        want = _direct(ckpt, seq)
        mine = [r for r in got if r["step"] == step]
        assert len(mine) == len(seq)
        # rows come back keyed by shard + row (the manifest records no positions) in batch order
        assert [r["shard"] for r in mine] == ["a.parquet"] * (len(seq) - 1) + ["b.npy"]
        loss = np.array([r["loss"] for r in mine], dtype=float)
        assert np.array_equal(np.isnan(loss), np.isnan(want))
        np.testing.assert_allclose(loss[~np.isnan(want)], want[~np.isnan(want)], rtol=0, atol=1e-5)
        assert [r["n_tokens"] for r in mine] == [max(0, len(s) - 1) for s in seq]


def test_replay_errors_are_one_line(run, tmp_path, capsys):
    root, _ = run
    ckpt = _tiny_model(tmp_path, "gpt2")
    capsys.readouterr()
    args = ["replay", "--manifest", str(root / "manifest.parquet"), "--shards", str(root / "shards"),
            "--out", str(tmp_path / "x.parquet")]
    assert main(args + ["--model", str(tmp_path / "nope"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a local checkpoint directory" in err and "\n" not in err
    assert main(args + ["--model", str(ckpt), "--steps", "1,9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no rows for step 9" in err and "\n" not in err
    assert not (tmp_path / "x.parquet").exists()
