"""What mosaicml-streaming's ``StreamingDataset`` + a torch ``DataLoader`` feed (run inside a venv with
mosaicml-streaming + torch). Run by ``benchmarks/fidelity_streaming.py`` / ``tests/test_builders_streaming.py``;
never imported by spike-audit.

Writes small MDS datasets with streaming's own ``MDSWriter`` (columns ``tokens`` ``ndarray:int32``, first token
= the sample's global id, and ``uid`` ``int``; many small shards of uneven size), then iterates the real
``StreamingDataset`` with the given settings through a ``torch.utils.data.DataLoader`` for the given epochs and
records every batch each rank gets: (epoch, batch on the rank, rank, tokens). With ``--world-size N`` the script
is started N times by ``torch.distributed.run`` (gloo, CPU, loopback); ``--ranks-per-node K`` < N makes the
ranks act as N/K nodes of K (``LOCAL_WORLD_SIZE``/``LOCAL_RANK`` set before streaming reads them, and each
"node" reads its own copy of the data, as separate machines would). Rank 0 merges the parts.

Output (``--out DIR``): ``data/stream{i}/`` (the datasets, i.e. index.json + shards; ``data/node{j}/`` copies),
``feed.npz`` (``batch`` = 0-based global batch index, counted on across epochs; ``epoch``, ``rank``,
``tokens`` as ``tokens_flat`` + ``tokens_offsets``), ``feed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np


def write_streams(root: Path, samples: list[int], shard_rows: int, seed: int) -> list[str]:
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    names, uid = [], 0
    for i, n in enumerate(samples):
        d = root / f"stream{i}"
        names.append(d.name)
        # uneven shards: size_limit in bytes; samples of varying length
        with MDSWriter(out=str(d), columns={"tokens": "ndarray:int32", "uid": "int"}, size_limit=shard_rows * 48) as w:
            for _ in range(n):
                k = int(rng.integers(2, 16))
                toks = rng.integers(1, 30_000, size=k).astype(np.int32)
                toks[0] = uid
                w.write({"tokens": toks, "uid": uid})
                uid += 1
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, nargs="+", default=[403], help="samples per stream")
    p.add_argument("--shard-rows", type=int, default=23, help="about this many samples per shard")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--drop-last", action="store_true")
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--shuffle-algo", default="py1e")
    p.add_argument("--shuffle-seed", type=int, default=9176)
    p.add_argument("--shuffle-block-size", type=int, default=None)
    p.add_argument("--num-canonical-nodes", type=int, default=None)
    p.add_argument("--partition-algo", default="relaxed")
    p.add_argument("--epoch-size", type=int, default=None)
    p.add_argument("--sampling-method", default="balanced")
    p.add_argument("--sampling-granularity", type=int, default=1)
    p.add_argument("--sample-in-epoch", type=int, default=0, help="resume epoch 0 from this sample (load_state_dict)")
    p.add_argument("--initial-physical-nodes", type=int, default=None,
                   help="resumed from a run on this many nodes (the checkpoint's initial_physical_nodes)")
    p.add_argument("--ranks-per-node", type=int, default=None)
    p.add_argument("--world-size", type=int, default=1, help="informational; the launcher sets the ranks")
    for w in ("proportion", "repeat", "choose"):  # per-stream weights, '-' for a stream without one
        p.add_argument(f"--{w}", nargs="+", default=None)
    args = p.parse_args(argv)

    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rpn = args.ranks_per_node or world
    node = rank // rpn
    os.environ["LOCAL_WORLD_SIZE"] = str(rpn)
    os.environ["LOCAL_RANK"] = str(rank % rpn)
    data = out / "data"
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    if rank == 0:
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        names = write_streams(data, args.samples, args.shard_rows, 1234)
        for j in range(world // rpn):  # one copy of the data per node
            for nm in names:
                shutil.copytree(data / nm, data / f"node{j}" / nm)
    if world > 1:
        dist.barrier()
    names = [f"stream{i}" for i in range(len(args.samples))]

    import torch
    from streaming import Stream, StreamingDataset
    from torch.utils.data import DataLoader

    if world // rpn > 1:
        # Several "nodes" on one machine share /dev/shm, where streaming's local leaders register a prefix for
        # their node's shared memory: both would take the same free prefix. Offset it per node (names only;
        # nothing of the sample order depends on it), as separate machines would not collide.
        from streaming.base.shared import prefix as shm_prefix

        find = shm_prefix._check_and_find_retrying
        shm_prefix._check_and_find_retrying = lambda *a, **k: find(*a, **k) + 100 * node
    def weight(w, i):
        vals = getattr(args, w)
        if vals is None or vals[i] == "-":
            return None
        return int(vals[i]) if w == "choose" else float(vals[i])

    streams = [Stream(local=str(data / f"node{node}" / nm), proportion=weight("proportion", i),
                      repeat=weight("repeat", i), choose=weight("choose", i)) for i, nm in enumerate(names)]
    ds = StreamingDataset(streams=streams, batch_size=args.batch_size, shuffle=args.shuffle,
                          shuffle_algo=args.shuffle_algo, shuffle_seed=args.shuffle_seed,
                          shuffle_block_size=args.shuffle_block_size, num_canonical_nodes=args.num_canonical_nodes,
                          partition_algo=args.partition_algo, epoch_size=args.epoch_size,
                          sampling_method=args.sampling_method, sampling_granularity=args.sampling_granularity)
    default_ncn = (64 if args.shuffle_algo in ("py1s", "py2s") else 1) * (world // rpn)
    ncn_used = args.num_canonical_nodes or default_ncn  # what the dataset picks (and a checkpoint records)
    if args.sample_in_epoch or args.initial_physical_nodes:  # a resumed run: the checkpoint's state
        state = {"epoch": 0, "sample_in_epoch": args.sample_in_epoch, "num_canonical_nodes": ncn_used,
                 "shuffle_seed": args.shuffle_seed}
        if args.initial_physical_nodes:
            state["initial_physical_nodes"] = args.initial_physical_nodes
        ds.load_state_dict(state)

    def collate(items):
        return [np.asarray(it["tokens"], np.int64) for it in items]

    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers, drop_last=args.drop_last,
                        collate_fn=collate, persistent_workers=False)
    recs = []
    for e in range(args.epochs):
        for k, batch in enumerate(loader):
            for t in batch:
                recs.append((e, k, rank, t))
    part = out / f"feed-rank{rank}.npz"
    lens = np.array([len(r[3]) for r in recs], np.int64)
    np.savez(part, epoch=np.array([r[0] for r in recs], np.int64), local=np.array([r[1] for r in recs], np.int64),
             rank=np.full(len(recs), rank, np.int64),
             tokens_flat=np.concatenate([r[3] for r in recs]) if recs else np.zeros(0, np.int64),
             tokens_offsets=np.concatenate([[0], np.cumsum(lens)]))
    if world > 1:
        dist.barrier()
    if rank == 0:
        parts = [dict(np.load(out / f"feed-rank{r}.npz")) for r in range(world)]
        # global batch: the k-th batch of epoch e on every rank; epochs follow each other
        per_epoch = [max(int(q["local"][q["epoch"] == e].max()) + 1 if (q["epoch"] == e).any() else 0 for q in parts)
                     for e in range(args.epochs)]
        base = np.concatenate([[0], np.cumsum(per_epoch)])
        flat, offs, feed = [], [0], {"batch": [], "epoch": [], "rank": []}
        for q in parts:
            feed["batch"].append(base[q["epoch"]] + q["local"])
            feed["epoch"].append(q["epoch"])
            feed["rank"].append(q["rank"])
            o = q["tokens_offsets"]
            for i in range(len(o) - 1):
                flat.append(q["tokens_flat"][o[i]:o[i + 1]])
                offs.append(offs[-1] + o[i + 1] - o[i])
        feed = {k: np.concatenate(v) for k, v in feed.items()}
        feed["tokens_flat"] = np.concatenate(flat) if flat else np.zeros(0, np.int64)
        feed["tokens_offsets"] = np.asarray(offs, np.int64)
        np.savez(out / "feed.npz", **feed)
        import streaming

        meta = {"framework": "mosaicml-streaming", "version": streaming.__version__, "torch": torch.__version__,
                **{k: v for k, v in vars(args).items() if k != "out"}, "world_size": world, "ranks_per_node": rpn,
                "streams": [str(Path("data") / nm) for nm in names],
                "num_canonical_nodes_used": ncn_used, "shuffle_block_size_used": ds.shuffle_block_size,
                "batches_per_epoch": per_epoch, "fed": int(len(feed["batch"]))}
        (out / "feed.json").write_text(json.dumps(meta, indent=1))
        print(json.dumps({k: meta[k] for k in ("batches_per_epoch", "fed", "num_canonical_nodes_used")}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
