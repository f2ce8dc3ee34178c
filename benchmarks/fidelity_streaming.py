"""Fidelity against the real mosaicml-streaming: does ``spike-audit manifest streaming`` give exactly the samples a
``StreamingDataset`` iterated by a torch ``DataLoader`` fed at each step, on each rank?

For every setting: ``benchmarks/fidelity/streaming_feed.py`` runs in the framework's virtualenv (mosaicml-streaming
+ torch; ``HFSTREAM_PY``, default ``/work/venvs/hfstream/bin/python``), writes small MDS datasets with streaming's
own ``MDSWriter``, iterates the real dataset and loader (ranks under ``torch.distributed.run``, gloo on CPU) and
records every batch; spike-audit builds the manifest with its CLI from the dataset directories and the same
settings, as a user would, and the manifest's slices, read back by spike-audit's own MDS reader, are compared
with the feed per step and per (step, rank) (``benchmarks/fidelity/compare.py``). Settings spike-audit refuses
must exit 2 with a one-line error naming them.

    python benchmarks/fidelity_streaming.py [--only NAME...] [--work DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FEEDS = HERE / "fidelity"
sys.path.insert(0, str(FEEDS))

from compare import compare  # noqa: E402

PY = os.environ.get("HFSTREAM_PY", "/work/venvs/hfstream/bin/python")

#: (name, world size, feed / manifest settings). Keys are the flags both sides share.
CASES = [
    ("no shuffle, 1 rank, 2 epochs", 1, {}),
    ("py1e (default), 1 rank, 2 epochs", 1, {"shuffle": True}),
    ("py1e, shuffle_block_size 40", 1, {"shuffle": True, "shuffle-block-size": 40}),
    ("py1s", 1, {"shuffle": True, "shuffle-algo": "py1s"}),
    ("py1br, shuffle_block_size 50", 1, {"shuffle": True, "shuffle-algo": "py1br", "shuffle-block-size": 50}),
    ("py2s", 1, {"shuffle": True, "shuffle-algo": "py2s"}),
    ("naive", 1, {"shuffle": True, "shuffle-algo": "naive"}),
    ("3 loader workers", 1, {"shuffle": True, "num-workers": 3}),
    ("2 workers, drop_last, batch 5", 1, {"shuffle": True, "num-workers": 2, "drop-last": True, "batch-size": 5}),
    ("epoch_size 250 (down-sampled), 3 epochs", 1, {"shuffle": True, "epoch-size": 250, "epochs": 3}),
    ("2 streams, epoch_size 1000, granularity 4", 1, {"shuffle": True, "epoch-size": 1000,
                                                      "sampling-granularity": 4, "samples": "200 150"}),
    ("sampling_method fixed, epoch_size 500", 1, {"shuffle": True, "epoch-size": 500, "sampling-method": "fixed"}),
    ("3 streams, proportion 0.5 0.3 0.2", 1, {"shuffle": True, "samples": "200 150 53",
                                               "proportion": "0.5 0.3 0.2"}),
    ("2 streams, proportion 1 3, epoch_size 300, granularity 3", 1, {
        "shuffle": True, "samples": "250 153", "proportion": "1 3", "epoch-size": 300, "sampling-granularity": 3}),
    ("3 streams, repeat 2.5 / choose 40 / unweighted, py1br", 1, {
        "shuffle": True, "shuffle-algo": "py1br", "shuffle-block-size": 50, "samples": "120 200 83",
        "repeat": "2.5 - -", "choose": "- 40 -"}),
    ("2 ranks, 2 streams, proportion 0.7 0.3, 2 workers", 2, {
        "shuffle": True, "num-workers": 2, "samples": "203 200", "proportion": "0.7 0.3"}),
    ("resumed at sample_in_epoch 37", 1, {"shuffle": True, "sample-in-epoch": 37}),
    ("orig partition, 4 canonical nodes, py1br", 1, {"shuffle": True, "partition-algo": "orig",
                                                     "num-canonical-nodes": 4, "shuffle-algo": "py1br",
                                                     "shuffle-block-size": 60}),
    ("2 ranks, 2 workers", 2, {"shuffle": True, "num-workers": 2}),
    ("3 ranks, no shuffle, batch 3", 3, {"batch-size": 3}),
    ("2 nodes x 2 ranks", 4, {"shuffle": True, "ranks-per-node": 2}),
    ("2 nodes x 2 ranks, 8 canonical nodes, py1s, 2 workers", 4, {"shuffle": True, "ranks-per-node": 2,
                                                                  "num-canonical-nodes": 8, "shuffle-algo": "py1s",
                                                                  "num-workers": 2}),
    ("2 ranks resumed at 50, py2s, 64 canonical nodes", 2, {"shuffle": True, "sample-in-epoch": 50,
                                                            "shuffle-algo": "py2s", "num-canonical-nodes": 64}),
    ("resumed on 2 nodes from 1 (relaxed), 3 canonical nodes", 4, {
        "shuffle": True, "ranks-per-node": 2, "num-canonical-nodes": 3, "initial-physical-nodes": 1,
        "sample-in-epoch": 20}),
]

#: settings spike-audit refuses (exit 2, one line naming them); no feed is run
REFUSED = [
    ("batching_method stratified", ["--batching-method", "stratified"], "batching_method='stratified'"),
    ("replication 2", ["--replication", "2"], "replication=2"),
    ("proportion mixed with repeat", ["--proportion", "0.5", "--repeat", "2"], "--proportion"),
    ("initial_physical_nodes with workers", ["--initial-physical-nodes", "1", "--num-workers", "2"],
     "initial_physical_nodes with DataLoader workers"),
]

#: flags the manifest builder does not take (feed-only)
FEED_ONLY = {"samples", "shard-rows"}


def _spike_audit() -> list[str]:
    exe = Path(sys.executable).parent / "spike-audit"
    return [str(exe)] if exe.exists() else ["spike-audit"]


def _flags(settings: dict, feed: bool) -> list[str]:
    out = []
    for k, v in settings.items():
        if not feed and k in FEED_ONLY:
            continue
        if v is True:
            out.append(f"--{k}")
        else:
            out += [f"--{k}", *str(v).split()]
    return out


def run_case(name: str, world: int, settings: dict, work: Path, port: int) -> dict:
    d = work / "".join(c if c.isalnum() else "_" for c in name)
    settings = {"epochs": 2, **settings}
    launch = [PY] if world == 1 else [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                                      "--master_addr", "127.0.0.1", "--master_port", str(port)]
    t0 = time.time()
    r = subprocess.run([*launch, str(FEEDS / "streaming_feed.py"), "--out", str(d), *_flags(settings, True)],
                       capture_output=True, text=True, timeout=1200)
    if r.returncode:
        err = [ln for ln in r.stderr.splitlines() if "Error" in ln] or r.stderr.strip().splitlines()[-1:]
        return {"error": "feed failed: " + (err[-1] if err else "?")}
    meta = json.loads((d / "feed.json").read_text())
    man = str(d / "manifest.parquet")
    mset = dict(settings)
    if meta["num_canonical_nodes_used"] and "sample-in-epoch" in mset:
        mset["num-canonical-nodes"] = meta["num_canonical_nodes_used"]  # a resumed run: the checkpoint's
    cmd = _spike_audit() + ["manifest", "streaming", "--data", *meta["streams"], "--shards", str(d),
                            "--batch-size", str(meta["batch_size"]), "--world-size", str(meta["world_size"]),
                            "--out", man, "--check", *_flags({k: v for k, v in mset.items() if k != "batch-size"},
                                                             False)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    res = {"command": " ".join(shlex.quote(c) for c in cmd), "feed_seconds": round(time.time() - t0, 1),
           "samples_fed": meta["fed"]}
    if r.returncode:
        res["error"] = f"manifest exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}"
        return res
    res.update(compare(str(d / "feed.npz"), man, str(d), step_key="batch"))
    return res


def run_refused(name: str, flags: list[str], named: str, work: Path) -> dict:
    cmd = _spike_audit() + ["manifest", "streaming", "--data", "missing", "--shards", str(work), "--batch-size", "4",
                            "--out", str(work / "refused.parquet"), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    ok = r.returncode == 2 and len(lines) == 1 and named in lines[0]
    return {"command": " ".join(shlex.quote(c) for c in cmd), "refused": ok, "message": lines[-1] if lines else ""}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fidelity against mosaicml-streaming's StreamingDataset + DataLoader")
    p.add_argument("--work", default="/tmp/spike-audit-fidelity-streaming")
    p.add_argument("--only", nargs="*", default=None, help="substrings of setting names to run")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if not Path(PY).exists():
        print(f"skipped: no mosaicml-streaming virtualenv at {PY} (set HFSTREAM_PY)")
        return 0
    print("| framework | setting | steps checked | steps equal | (step, rank) groups equal |")
    print("|---|---|---:|---:|---:|")
    for k, (name, world, settings) in enumerate(CASES):
        if args.only and not any(s in name for s in args.only):
            continue
        r = {"framework": "mosaicml-streaming", "setting": name, "world_size": world,
             **run_case(name, world, settings, work, 29700 + k)}
        rows.append(r)
        if "error" in r:
            print(f"| mosaicml-streaming | {name} | error: {r['error']} | | |", flush=True)
        else:
            print(f"| mosaicml-streaming | {name} | {r['steps_checked']} | {r['steps_equal']} | "
                  f"{r['groups_equal']}/{r['groups_checked']} |", flush=True)
    for name, flags, named in REFUSED:
        if args.only and not any(s in name for s in args.only):
            continue
        r = {"framework": "mosaicml-streaming", "setting": name, **run_refused(name, flags, named, work)}
        rows.append(r)
        print(f"| mosaicml-streaming | {name} | refused: {'yes' if r['refused'] else 'NO'} ({r['message'][:90]}) | | |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if "error" in r or ("steps_checked" in r and (
        r["steps_equal"] != r["steps_checked"] or r["groups_equal"] != r["groups_checked"] or not r["steps_checked"]))
        or r.get("refused") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
