"""What Megatron-LM really feeds, step by step (runs INSIDE a megatron-core virtualenv, Python >= 3.12).

Given a JSON spec of one setting, this script lets megatron-core do everything itself:

1. writes each data prefix as a Megatron indexed dataset (``.bin``/``.idx``) with megatron-core's own
   ``IndexedDatasetBuilder`` (random token documents ending in the EOD id, optionally several
   sequences per document as ``preprocess_data.py --split-sentences`` writes them);
2. builds the training split with ``BlendedMegatronDatasetBuilder(GPTDataset, ...)`` exactly as
   ``pretrain_gpt.py`` does (sizes from ``train_iters * global_batch_size``; a weighted or an
   unweighted multi-prefix blend gives a ``BlendedDataset``), so megatron-core writes its own cache
   files (``document_index``, ``sample_index``, ``shuffle_index``; for blends ``dataset_index`` and
   ``dataset_sample_index``) into ``path_to_cache``;
3. builds megatron's own data loader per simulated data-parallel rank
   (``megatron.training.datasets.data_samplers.build_pretraining_data_loader``: the
   ``MegatronPretrainingSampler`` and a torch ``DataLoader``, with ``consumed_samples`` for a resume)
   and runs the training loop's consumption pattern: every iteration, every rank draws
   ``global_batch_size / (micro_batch_size * dp)`` micro-batches;
4. dumps exactly the tokens fed at each step: ``tokens`` plus the last label (the ``seq_len + 1``
   window) with ``add_extra_token_to_sequence``, else ``tokens``, with the 0-based batch index,
   Megatron's ``iteration`` (= index + 1, as ``training_log`` prints it) and the consumed samples
   after the step; plus a Megatron-style stdout log of those iterations.

It imports nothing from spike-audit. Usage::

    python megatron_feed.py --spec setting.json --out DIR [--spec setting2.json --out DIR2 ...]

(several settings in one process: megatron-core and torch are imported once).

Outputs in DIR: ``data/*.bin|.idx``, ``cache/`` (megatron-core's own), ``feed.npz`` and
``feed.json`` (the spec, the dataset class, the cache files, the number of epochs).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import warnings
from types import SimpleNamespace

import numpy as np


def _write_prefix(prefix: str, spec: dict, vocab_size: int, eod: int) -> dict:
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    rng = np.random.default_rng(spec.get("seed", 0))
    dtype = DType.optimal_dtype(vocab_size) if spec.get("dtype") is None else getattr(np, spec["dtype"])
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    n_docs = int(spec["n_docs"])
    lo, hi = int(spec.get("min_len", 2)), int(spec.get("max_len", 40))
    per_doc = int(spec.get("sentences", 1))
    n_tokens = 0
    low = int(spec.get("token_low", 0))
    for _ in range(n_docs):
        lengths = [int(rng.integers(lo, hi + 1)) for _ in range(per_doc)]
        toks = rng.integers(low, eod, size=sum(lengths), dtype=np.int64)
        # preprocess_data.py --append-eod: the document's last sequence ends with the EOD id
        toks[-1] = eod
        builder.add_document(torch.from_numpy(toks), lengths)
        n_tokens += len(toks)
    builder.finalize(prefix + ".idx")
    return {"prefix": prefix, "dtype": np.dtype(dtype).name, "n_docs": n_docs, "n_tokens": n_tokens}


def _tokenizer(vocab_size: int, eod: int, pad: int):
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=vocab_size,
                                             eod_id=eod, pad_id=pad)


def _loaders(dataset, consumed: int, gbs: int, mbs: int, dp: int, num_workers: int):
    """Megatron's own ``build_pretraining_data_loader``, once per simulated data-parallel rank."""
    import megatron.training.global_vars as gv
    from megatron.training.datasets import data_samplers

    args = SimpleNamespace(dataloader_type="single", micro_batch_size=mbs, global_batch_size=gbs,
                           hybrid_context_parallel=False, num_workers=num_workers, exit_signal_handler=False,
                           full_validation=False, data_sharding=True)
    gv._GLOBAL_ARGS = args
    loaders = []
    for rank in range(dp):
        data_samplers.mpu = SimpleNamespace(get_data_parallel_rank=lambda r=rank: r,
                                            get_data_parallel_world_size=lambda: dp)
        loaders.append(data_samplers.build_pretraining_data_loader(dataset, consumed))
    return loaders


def _member_info(d, add_extra: bool) -> dict:
    """For labelling the setting only: the epochs megatron-core built and whether it shuffled the last
    one separately (its rule in GPTDataset._build_document_sample_shuffle_indices)."""
    tpe = int(d._get_num_tokens_per_epoch())
    epochs = int(d._get_num_epochs(tpe))
    separate = False
    if epochs > 1 and d.num_samples is not None:
        seq_len = d.config.sequence_length
        sans = ((epochs - 1) * tpe - add_extra) // seq_len
        separate = (d.num_samples - sans) < int(0.80 * ((tpe - add_extra) // seq_len))
    return {"dataset_path": d.dataset_path, "hash": d.unique_description_hash, "len": len(d),
            "num_epochs": epochs, "separate_final_epoch": separate}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True, action="append")
    ap.add_argument("--out", required=True, action="append")
    a = ap.parse_args(argv)
    if len(a.spec) != len(a.out):
        ap.error("give one --out per --spec")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    failed = 0
    for spec_path, out in zip(a.spec, a.out):
        with open(spec_path) as f:
            spec = json.load(f)
        try:
            feed(spec, out)
        except Exception as err:  # one setting failing must not hide the others
            failed += 1
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "error.txt"), "w") as f:
                f.write(f"{type(err).__name__}: {err}\n")
            print(f"{out}: {type(err).__name__}: {err}", file=sys.stderr)
    return 1 if failed else 0


def feed(spec: dict, out: str) -> None:
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    out = os.path.abspath(out)
    data_dir, cache_dir = os.path.join(out, "data"), os.path.join(out, "cache")
    os.makedirs(data_dir, exist_ok=True)
    vocab = int(spec.get("vocab_size", 50257))
    eod = int(spec.get("eod_id", vocab - 1))
    pad = int(spec.get("pad_id", -1))
    written = [_write_prefix(os.path.join(data_dir, p["name"]), p, vocab, eod) for p in spec["prefixes"]]
    prefixes = [w["prefix"] for w in written]
    # --data-path as the user gives it: "W1 P1 W2 P2 ..." or "P1 P2 ..."
    weights = spec.get("weights")
    data_path = [x for w, p in zip(weights, prefixes) for x in (str(w), p)] if weights else list(prefixes)
    blend = get_blend_from_list(data_path)

    seq_len, gbs = int(spec["seq_len"]), int(spec["global_batch_size"])
    mbs, dp = int(spec.get("micro_batch_size", gbs)), int(spec.get("data_parallel_size", 1))
    train_iters = int(spec["train_iters"])
    start_iter = int(spec.get("resume_iteration", 0))  # iterations done before this run (checkpoint)
    consumed = start_iter * gbs  # args.consumed_train_samples restored from the checkpoint
    n_steps = int(spec.get("steps", train_iters - start_iter))
    add_extra = bool(spec.get("add_extra_token_to_sequence", True))

    config = GPTDatasetConfig(
        random_seed=int(spec.get("seed", 1234)), sequence_length=seq_len, blend=blend,
        split=spec.get("split", "100,0,0"), path_to_cache=cache_dir, tokenizer=_tokenizer(vocab, eod, pad),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        add_extra_token_to_sequence=add_extra,
        mid_level_dataset_surplus=float(spec.get("mid_level_dataset_surplus", 0.005)),
    )
    eval_iters = int(spec.get("eval_iters", 0))
    eval_interval = int(spec.get("eval_interval", 1000))
    sizes = [train_iters * gbs, (train_iters // eval_interval + 1) * eval_iters * gbs, eval_iters * gbs]
    train_ds, _valid, _test = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()

    loaders = _loaders(train_ds, consumed, gbs, mbs, dp, int(spec.get("num_workers", 0)))
    its = [iter(dl) for dl in loaders]
    n_micro = gbs // (mbs * dp)
    L = seq_len + 1 if add_extra else seq_len
    fed = np.zeros((n_steps, gbs, L), np.int64)
    rank_of = np.zeros(gbs, np.int32)
    micro_of = np.zeros(gbs, np.int32)
    log_lines = []
    for k in range(n_steps):
        pos = 0
        for m in range(n_micro):
            for r in range(dp):
                batch = next(its[r])
                toks, labels = batch["tokens"].numpy(), batch["labels"].numpy()
                seqs = np.concatenate([toks, labels[:, -1:]], axis=1) if add_extra else toks
                fed[k, pos:pos + len(seqs)] = seqs
                rank_of[pos:pos + len(seqs)] = r
                micro_of[pos:pos + len(seqs)] = m
                pos += len(seqs)
        assert pos == gbs, (pos, gbs)
        iteration = start_iter + k + 1
        consumed_after = consumed + (k + 1) * gbs
        # the shape of megatron.training.training.training_log's stdout line
        log_lines.append(f" [2025-01-01 00:00:00.000000] iteration {iteration:8d}/{train_iters:8d} | "
                         f"consumed samples: {consumed_after:12d} | elapsed time per iteration (ms): 100.0 | "
                         f"learning rate: 1.000000E-04 | global batch size: {gbs:5d} | "
                         f"lm loss: {2.5 + 0.01 * np.sin(iteration):.6E} | loss scale: 1.0 | "
                         f"grad norm: 1.000 | number of skipped iterations:   0 | number of nan iterations:   0 |")
    batch_index = start_iter + np.arange(n_steps, dtype=np.int64)
    np.savez_compressed(os.path.join(out, "feed.npz"), tokens=fed, batch_index=batch_index,
                        iteration=batch_index + 1, consumed_after=consumed + (np.arange(n_steps) + 1) * gbs,
                        rank=rank_of, micro_batch=micro_of)
    with open(os.path.join(out, "train.log"), "w") as f:
        f.write("\n".join(log_lines) + "\n")

    members = train_ds.datasets if isinstance(train_ds, BlendedDataset) else [train_ds]
    info = {
        "spec": spec, "dataset_class": type(train_ds).__name__, "prefixes": written, "data_path": data_path,
        "cache_dir": cache_dir, "cache_files": sorted(os.path.basename(p) for p in glob.glob(cache_dir + "/*")),
        "len_dataset": len(train_ds), "consumed_samples_start": consumed, "first_iteration": start_iter + 1,
        "n_steps": n_steps, "sample_len": L, "add_extra_token_to_sequence": add_extra,
        "members": [_member_info(d, add_extra) for d in members],
        "megatron_core": __import__("megatron.core", fromlist=["__version__"]).__version__,
    }
    with open(os.path.join(out, "feed.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps({"out": out, "dataset_class": info["dataset_class"], "n_steps": n_steps,
                      "len": len(train_ds), "members": info["members"]}))


if __name__ == "__main__":
    sys.exit(main())
