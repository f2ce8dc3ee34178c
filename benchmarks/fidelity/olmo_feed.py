"""What OLMo-core's own data loader feeds at each step (run inside a venv with ai2-olmo-core).

Run by ``benchmarks/fidelity_olmo.py``; never imported by spike-audit. It writes small flat token
files (``np.memmap``, no header, as OLMo-core's tokenisation pipeline writes them), builds an
``NumpyFSLDatasetConfig`` + ``NumpyDataLoaderConfig`` exactly as a training script does, and then
lets OLMo-core's own ``Trainer`` drive the epochs (``Trainer.fit`` with a train module that trains
nothing and records each batch it is handed, split into micro-batches with OLMo-core's own
``split_batch``). For more than one data-parallel rank the trainer runs once per rank with
``dp_rank``/``dp_world_size`` set on the data loader (what ``build(mesh=...)`` gives each process).

Output (``--out DIR``):

- ``feed.npz``: one row per instance fed: ``step`` (the trainer's ``global_step``), ``batch``
  (0-based global batch index), ``epoch``, ``rank``, ``micro`` (micro-batch within the rank's batch),
  ``pos`` (position within the micro-batch), ``tokens`` (int64, ``(n, seq_len)``), ``index`` (the
  dataset instance index OLMo-core reports in ``batch["index"]``).
- ``feed.json``: the settings, the data files in config order, the per-epoch global indices files
  OLMo-core wrote, vocabulary size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np


def make_data(root: Path, n_files: int, tokens_per_file: list[int], dtype: str, vocab: int, seed: int) -> list[str]:
    """Flat token files of distinct random ids (every instance distinguishable)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        n = tokens_per_file[i % len(tokens_per_file)]
        p = root / f"part-{i:02d}.npy"
        lo = 70000 if np.dtype(dtype) == np.uint32 else 1  # uint32: ids that do not fit uint16
        arr = rng.integers(lo, vocab, size=n, dtype=np.int64).astype(dtype)
        mm = np.memmap(p, dtype=dtype, mode="w+", shape=(n,))
        mm[:] = arr
        mm.flush()
        del mm
        paths.append(str(p))
    return paths


def run_case(args) -> None:
    import torch  # noqa: F401  (OLMo-core needs it; imported here so --help works without it)
    from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
    from olmo_core.data.utils import split_batch
    from olmo_core.train import Duration, TrainerConfig
    from olmo_core.train.train_module import TrainModule
    from olmo_core.train.train_module.train_module import EvalBatchSpec

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = 100_278 if args.dtype == "uint32" else 50_280
    sizes = [int(s) for s in args.tokens_per_file.split(",")]
    paths = make_data(out / "data", args.n_files, sizes, args.dtype, vocab, args.data_seed)
    tok = TokenizerConfig(vocab_size=vocab, eos_token_id=0, pad_token_id=1)
    ds_cfg = NumpyFSLDatasetConfig(
        tokenizer=tok, paths=paths, sequence_length=args.seq_len, dtype=args.dtype,
        max_target_sequence_length=args.max_target_sequence_length,
        source_permutation_seed=args.source_permutation_seed, work_dir=str(out / "work"),
    )
    seq_len = args.seq_len
    gbs_tokens = args.global_batch_instances * seq_len
    micro_instances = args.micro_batch_instances

    records: list[dict] = []

    class Recorder(TrainModule):
        """Trains nothing; records what the trainer hands it, split as OLMo-core's train module splits."""

        def __init__(self, rank):
            super().__init__()
            self.rank = rank

        @property
        def eval_batch_spec(self):
            return EvalBatchSpec(rank_batch_size=seq_len)

        def state_dict(self, *, optim=None):
            return {}

        def load_state_dict(self, state_dict):
            pass

        def train_batch(self, batch, dry_run=False):
            if dry_run:
                return
            tr = self.trainer
            micro = split_batch(batch, micro_instances) if micro_instances else [batch]
            for m, mb in enumerate(micro):
                ids = mb["input_ids"].numpy().astype(np.int64)
                idx = np.asarray(mb["index"], np.int64).reshape(-1)
                for p in range(ids.shape[0]):
                    records.append({"step": tr.global_step, "epoch": tr.epoch, "rank": self.rank, "micro": m,
                                    "pos": p, "tokens": ids[p], "index": int(idx[p]),
                                    "batch_in_epoch": tr.data_loader.batches_processed - 1})

        def eval_batch(self, batch, labels=None):
            raise NotImplementedError

        def optim_step(self):
            pass

        def zero_grads(self):
            pass

        def num_flops_per_token(self, seq_len):
            return None

        def global_num_flops_in_batch(self, batch):
            return None

    batches_per_epoch = None
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1:  # started by torch.distributed.run: one process per data-parallel rank (gloo, CPU)
        import torch.distributed as dist

        dist.init_process_group("gloo")
        my_ranks = [dist.get_rank()]
        args.world_size = env_world
    else:
        my_ranks = list(range(args.world_size))
    for rank in my_ranks:
        dataset = ds_cfg.build()
        dl_cfg = NumpyDataLoaderConfig(global_batch_size=gbs_tokens, seed=args.seed, num_workers=args.num_workers,
                                       work_dir=str(out / "work"))
        dataset.work_dir = Path(out / "work")
        dataset.prepare()
        from olmo_core.data import NumpyDataLoaderBase
        from olmo_core.data.collator import DataCollator

        loader = NumpyDataLoaderBase.wrap_numpy_dataset(
            dataset, global_batch_size=gbs_tokens, collator=DataCollator(pad_token_id=1, vocab_size=vocab),
            work_dir=str(out / "work"), seed=args.seed, dp_world_size=args.world_size, dp_rank=rank,
            fs_local_rank=rank if env_world > 1 else 0, num_workers=args.num_workers, target_device_type="cpu")
        del dl_cfg
        batches_per_epoch = loader.total_batches
        trainer = TrainerConfig(save_folder=str(out / f"save-rank{rank}"), work_dir=str(out / "work"),
                                max_duration=Duration.epochs(args.epochs), no_checkpoints=True, no_evals=True,
                                device="cpu", save_overwrite=True, metrics_collect_interval=1000,
                                cancel_check_interval=1000).build(Recorder(rank), loader)
        trainer.fit()

    if env_world > 1:
        part = out / f"records-rank{my_ranks[0]}.npz"
        np.savez(part, step=np.array([r["step"] for r in records], np.int64),
                 epoch=np.array([r["epoch"] for r in records], np.int64),
                 rank=np.array([r["rank"] for r in records], np.int64),
                 micro=np.array([r["micro"] for r in records], np.int64),
                 pos=np.array([r["pos"] for r in records], np.int64),
                 index=np.array([r["index"] for r in records], np.int64),
                 tokens=np.stack([r["tokens"] for r in records]))
        dist.barrier()
        if my_ranks[0] != 0:
            dist.destroy_process_group()
            return
        records = []
        for r in range(env_world):
            q = dict(np.load(out / f"records-rank{r}.npz"))
            for i in range(len(q["step"])):
                records.append({k: (q[k][i] if k == "tokens" else int(q[k][i])) for k in q})
        dist.destroy_process_group()
    work = out / "work"
    indices_files = sorted(str(p) for p in work.glob("global_indices*.npy"))
    n = len(records)
    np.savez(out / "feed.npz",
             step=np.array([r["step"] for r in records], np.int64),
             epoch=np.array([r["epoch"] for r in records], np.int64),
             rank=np.array([r["rank"] for r in records], np.int64),
             micro=np.array([r["micro"] for r in records], np.int64),
             pos=np.array([r["pos"] for r in records], np.int64),
             index=np.array([r["index"] for r in records], np.int64),
             tokens=np.stack([r["tokens"] for r in records]) if n else np.zeros((0, seq_len), np.int64))
    steps = np.array([r["step"] for r in records], np.int64)
    meta = {
        "framework": "ai2-olmo-core", "version": __import__("importlib.metadata").metadata.version("ai2-olmo-core"),
        "seq_len": seq_len, "global_batch_tokens": gbs_tokens, "global_batch_instances": args.global_batch_instances,
        "micro_batch_instances": micro_instances, "world_size": args.world_size, "dtype": args.dtype,
        "epochs": args.epochs, "seed": args.seed, "max_target_sequence_length": args.max_target_sequence_length,
        "source_permutation_seed": args.source_permutation_seed, "num_workers": args.num_workers,
        "data_files": paths, "dataset_paths_in_order": [str(p) for p in dataset.paths],
        "indices_files": indices_files, "batches_per_epoch": batches_per_epoch,
        "first_step": int(steps.min()) if n else None, "last_step": int(steps.max()) if n else None,
        "vocab_size": vocab, "eos_token_id": 0, "pad_token_id": 1,
    }
    (out / "feed.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({k: meta[k] for k in ("first_step", "last_step", "batches_per_epoch", "indices_files")}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--global-batch-instances", type=int, default=8)
    p.add_argument("--micro-batch-instances", type=int, default=0, help="rank micro-batch in instances (0: none)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--dtype", default="uint16", choices=("uint16", "uint32"))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=34521)
    p.add_argument("--n-files", type=int, default=3)
    p.add_argument("--tokens-per-file", default="1000,1517,777")
    p.add_argument("--max-target-sequence-length", type=int, default=None)
    p.add_argument("--source-permutation-seed", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=7)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OLMO_NO_SSL", "1")
    run_case(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
