"""What the Hugging Face ``transformers`` Trainer feeds at each step (run inside a venv with
transformers + accelerate + torch). Run by ``benchmarks/fidelity_olmo.py``; never imported by spike-audit.

A ``datasets`` directory of fixed-length token rows (column ``input_ids``, every row distinct) is
written with ``save_to_disk``; the real ``Trainer`` trains a one-parameter model on it for the
given epochs / max steps with the given seed, batch size, gradient accumulation and drop_last.
``training_step`` is overridden to record the micro-batch it is handed (then does a real backward
on a zero loss), so the Trainer's own data loader (accelerate's ``SeedableRandomSampler`` +
``BatchSamplerShard``), its epoch loop and its ``global_step`` bookkeeping decide what is recorded.
With ``--world-size N`` the script is started N times by ``torch.distributed.run`` (gloo, CPU,
loopback) and each rank writes its own part; rank 0 merges them.

Output (``--out DIR``): ``data/`` (the dataset), ``feed.npz`` (``step`` = the Trainer's
``global_step`` of the optimizer step the micro-batch belongs to, 1-based as in
``trainer_state.json``; ``batch`` = 0-based; ``epoch``, ``rank``, ``micro``, ``tokens``, ``row``),
``feed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def make_dataset(path: Path, n_rows: int, seq_len: int, seed: int):
    import datasets

    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 50_000, size=(n_rows, seq_len), dtype=np.int64)
    ids[:, 0] = np.arange(n_rows)  # distinct rows
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    ds.save_to_disk(str(path))
    return datasets.load_from_disk(str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=101)
    p.add_argument("--seq-len", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--data-seed", type=int, default=None)
    p.add_argument("--drop-last", action="store_true")
    p.add_argument("--world-size", type=int, default=1, help="informational; the launcher sets the ranks")
    args = p.parse_args(argv)

    import torch
    import torch.nn as nn
    from transformers import Trainer, TrainingArguments, default_data_collator

    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    if rank == 0 and not data_dir.exists():
        make_dataset(data_dir, args.rows, args.seq_len, 1234)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        dist.barrier()
    import datasets

    ds = datasets.load_from_disk(str(data_dir))

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, input_ids=None, labels=None):
            return {"loss": (self.w * 0).sum()}

    records = []

    class Recording(Trainer):
        _micro = 0
        _last_step = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            step = self.state.global_step + 1
            if step != self._last_step:
                self._micro, self._last_step = 0, step
            ids = inputs["input_ids"].cpu().numpy().astype(np.int64)
            for r in range(ids.shape[0]):
                records.append((step, int(self.state.epoch or 0), rank, self._micro, ids[r]))
            self._micro += 1
            loss = model(input_ids=inputs["input_ids"])["loss"]
            self.accelerator.backward(loss)
            return loss.detach()

    targs = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, max_steps=args.max_steps,
        seed=args.seed, data_seed=args.data_seed, dataloader_drop_last=args.drop_last, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, ddp_backend="gloo" if world > 1 else None,
        disable_tqdm=True, learning_rate=1e-3,
    )
    trainer = Recording(model=Tiny(), args=targs, train_dataset=ds, data_collator=default_data_collator)
    trainer.train()
    # The Trainer's own log of steps (what a user's trainer_state.json / loss log holds).
    logged_steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    part = out / f"feed-rank{rank}.npz"
    np.savez(part, step=np.array([r[0] for r in records], np.int64), rank=np.array([r[2] for r in records]),
             micro=np.array([r[3] for r in records], np.int64),
             tokens=np.stack([r[4] for r in records]) if records else np.zeros((0, args.seq_len), np.int64))
    if world > 1:
        dist.barrier()
    if rank == 0:
        parts = [dict(np.load(out / f"feed-rank{r}.npz")) for r in range(world)]
        feed = {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}
        feed["batch"] = feed["step"] - 1
        feed["row"] = feed["tokens"][:, 0]
        np.savez(out / "feed.npz", **feed)
        import transformers, accelerate

        meta = {"framework": "transformers", "version": transformers.__version__,
                "accelerate": accelerate.__version__, "torch": torch.__version__, "rows": args.rows,
                "seq_len": args.seq_len, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                "epochs": args.epochs, "max_steps": args.max_steps, "seed": args.seed, "data_seed": args.data_seed,
                "drop_last": args.drop_last, "world_size": world, "data": str(data_dir),
                "global_step": trainer.state.global_step, "logged_steps": logged_steps[:3] + logged_steps[-3:],
                "first_step": int(feed["step"].min()), "last_step": int(feed["step"].max())}
        (out / "feed.json").write_text(json.dumps(meta, indent=1))
        print(json.dumps({k: meta[k] for k in ("first_step", "last_step", "global_step")}))
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
