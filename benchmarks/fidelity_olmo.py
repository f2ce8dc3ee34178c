"""Fidelity against the real frameworks: OLMo-core, HF transformers Trainer, mosaicml-streaming.

For every case: the framework, installed from the package registry in its own virtualenv, runs
its own data loader on small data (``benchmarks/fidelity/*_feed.py``) and dumps exactly what it fed
at each step; spike-audit then builds a manifest from the framework's own files with its CLI (as
a user would) and the manifest's slices, read by spike-audit's shard readers, are compared with
the feed step by step (``benchmarks/fidelity/compare.py``). A setting spike-audit refuses must be
refused with exit 2 and a one-line error naming it.

    python benchmarks/fidelity_olmo.py [--only NAME...] [--work DIR] [--json OUT]

Virtualenvs (override with environment variables): ``OLMOCORE_PY`` (ai2-olmo-core 3.0.0, torch
CPU), ``HFSTREAM_PY`` (transformers + accelerate + mosaicml-streaming, torch CPU). spike-audit
itself is the ``spike-audit`` on PATH of the interpreter running this script.
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

VENVS = {
    "olmocore": os.environ.get("OLMOCORE_PY", "/work/venvs/olmocore/bin/python"),
    "hfstream": os.environ.get("HFSTREAM_PY", "/work/venvs/hfstream/bin/python"),
}


def _spike_audit() -> list[str]:
    exe = Path(sys.executable).parent / "spike-audit"
    return [str(exe)] if exe.exists() else ["spike-audit"]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ----------------------------------------------------------------------------- OLMo-core


def olmo_case(name, feed_args: dict, manifest_args, expect_refusal: str | None = None):
    return {"framework": "olmo-core", "venv": "olmocore", "feed": "olmo_feed.py", "name": name,
            "feed_args": feed_args, "manifest": manifest_args, "refuse": expect_refusal}


def _olmo_manifest(meta: dict, out: str, *, tokens=True, per_epoch=True, extra=()) -> list[str]:
    files = meta["dataset_paths_in_order"] if not meta.get("source_permutation_seed") else meta["data_files"]
    cmd = _spike_audit() + ["manifest", "olmo", "--global-indices", *meta["indices_files"],
                            "--data-files", *files, "--seq-len", str(meta["seq_len"]),
                            "--dtype", meta["dtype"], "--out", out, "--check"]
    if tokens:
        cmd += ["--global-batch-tokens", str(meta["global_batch_tokens"])]
    else:
        cmd += ["--global-batch-size", str(meta["global_batch_instances"])]
    if meta["world_size"] > 1:
        cmd += ["--world-size", str(meta["world_size"])]
    if meta["micro_batch_instances"]:
        cmd += ["--micro-batch-size", str(meta["micro_batch_instances"])]
    if meta.get("max_target_sequence_length"):
        cmd += ["--max-target-sequence-length", str(meta["max_target_sequence_length"])]
    if meta.get("source_permutation_seed") is not None:
        cmd += ["--source-permutation-seed", str(meta["source_permutation_seed"])]
    return cmd + list(extra)


OLMO_CASES = [
    olmo_case("1 rank, uint16, 1 epoch, batch in tokens", {"epochs": 1}, {}),
    olmo_case("1 rank, uint16, 2 epochs (per-epoch indices)", {"epochs": 2}, {}),
    olmo_case("4 ranks, micro-batch 1, 2 epochs", {"epochs": 2, "world-size": 4, "micro-batch-instances": 1}, {}),
    olmo_case("4 ranks, micro-batch 2, uint32, 2 epochs", {"epochs": 2, "world-size": 4, "micro-batch-instances": 2,
                                                           "dtype": "uint32", "global-batch-instances": 16}, {}),
    olmo_case("1 rank, uint32, 2 epochs", {"epochs": 2, "dtype": "uint32"}, {}),
    olmo_case("2 loader workers, 2 epochs", {"epochs": 2, "num-workers": 2}, {}),
    olmo_case("max_target_sequence_length 64", {"epochs": 2, "max-target-sequence-length": 64}, {}),
    olmo_case("source_permutation_seed 3", {"epochs": 1, "source-permutation-seed": 3, "n-files": 5}, {}),
    olmo_case("batch size in instances", {"epochs": 1}, {"tokens": False}),
]


def run_olmo(case: dict, work: Path) -> dict:
    d = work / case["name"].replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    args = []
    for k, v in case["feed_args"].items():
        args += [f"--{k}", str(v)]
    t0 = time.time()
    world = int(case["feed_args"].get("world-size", 1))
    launch = [VENVS["olmocore"]] if world == 1 else [
        VENVS["olmocore"], "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
        "127.0.0.1", "--master_port", "29561"]
    r = _run([*launch, str(FEEDS / "olmo_feed.py"), "--out", str(d), *args])
    if r.returncode:
        err = [ln for ln in r.stderr.strip().splitlines() if "Error" in ln] or r.stderr.strip().splitlines()[-1:]
        return {"error": "feed failed: " + err[-1]}
    meta = json.loads((d / "feed.json").read_text())
    man = str(d / "manifest.parquet")
    cmd = _olmo_manifest(meta, man, **case["manifest"])
    r = _run(cmd)
    res = {"command": " ".join(shlex.quote(c) for c in cmd), "feed_seconds": round(time.time() - t0, 1)}
    if r.returncode:
        res["error"] = f"manifest exit {r.returncode}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}"
        return res
    # OLMo-core's global_step is 1-based: step s trained batch s - 1, the manifest's step
    res.update(compare(str(d / "feed.npz"), man, None, dtype=meta["dtype"], step_key="step", step_base=1))
    return res


RUNNERS = {"olmo-core": run_olmo}
CASES = OLMO_CASES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fidelity against OLMo-core / HF Trainer / mosaicml-streaming")
    p.add_argument("--work", default="/tmp/spike-audit-fidelity")
    p.add_argument("--only", nargs="*", default=None, help="substrings of case names to run")
    p.add_argument("--json", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in CASES:
        if args.only and not any(s in f"{case['framework']} {case['name']}" for s in args.only):
            continue
        py = VENVS[case["venv"]]
        if not Path(py).exists():
            res = {"skipped": f"no virtualenv at {py}"}
        else:
            res = RUNNERS[case["framework"]](case, work)
        rows.append({"framework": case["framework"], "setting": case["name"], **res})
        r = rows[-1]
        status = r.get("error") or r.get("skipped") or (
            f"{r['steps_equal']}/{r['steps_checked']} steps equal"
            + (f", {r['groups_equal']}/{r['groups_checked']} rank/micro groups" if r.get("groups_checked") else ""))
        print(f"{r['framework']:10s} | {r['setting']:48s} | {status}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if "error" in r or r.get("steps_equal") != r.get("steps_checked")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
