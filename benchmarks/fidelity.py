"""Fidelity against the real frameworks: does ``spike-audit`` say a step consumed exactly what the
trainer's own data loader fed at that step?

For every framework and setting this harness

1. runs the framework's own feed script (``benchmarks/fidelity/<framework>_feed.py``) in the
   framework's own virtualenv: the framework writes its data and its own data-order files on small
   data, and its own data loader records the tokens it feeds at each step (and a log of those steps);
2. builds the step manifest with ``spike-audit manifest ...`` from those files, as a user would;
3. for every step, asks spike-audit what that step consumed (the checks ``spike-audit batch`` runs,
   then the manifest's slices read from the shards) and compares the tokens with what the framework
   fed: equal when the slices of each step (per rank and micro-batch, where the manifest records them)
   concatenate exactly into the framework's sequences, every slice used once;
4. checks the framework's log against the manifest as ``spike-audit run`` does (step range, consumed
   samples), and that a manifest shifted by one batch is refused.

Usage (in spike-audit's own environment)::

    python benchmarks/fidelity.py                 # every framework whose virtualenv exists
    python benchmarks/fidelity.py --setup         # first create the framework virtualenvs
    python benchmarks/fidelity.py --framework megatron --setting blend_weighted --json out.json

Virtualenvs live in ``$SPIKE_AUDIT_FIDELITY_VENVS`` (default ``/work/venvs``): ``mcore`` for
megatron-core (Python >= 3.12). A framework whose virtualenv is missing is skipped with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FEEDS = HERE / "fidelity"
log = logging.getLogger("fidelity")


def venv_root() -> Path:
    return Path(os.environ.get("SPIKE_AUDIT_FIDELITY_VENVS", "/work/venvs"))


# ---------------------------------------------------------------------------------------------------
# Frameworks


@dataclasses.dataclass(frozen=True)
class Framework:
    name: str
    venv: str  # directory name under venv_root()
    python: str  # interpreter version the venv needs, e.g. "3.12"
    packages: tuple[str, ...]
    probe: str  # python code that must run in the venv
    feed: str  # feed script in benchmarks/fidelity/

    def python_path(self) -> Path:
        return venv_root() / self.venv / "bin" / "python"

    def skip_reason(self) -> str | None:
        py = self.python_path()
        if not py.exists():
            return f"no virtualenv at {py.parent.parent} (run: python benchmarks/fidelity.py --setup)"
        r = subprocess.run([str(py), "-c", self.probe], capture_output=True, text=True)
        if r.returncode:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            return f"{py.parent.parent}: {self.probe!r} fails ({last})"
        return None


FRAMEWORKS = {
    "megatron": Framework(
        name="megatron", venv="mcore", python="3.12",
        packages=("torch==2.13.0", "megatron-core==0.19.2"),
        probe="import megatron.core, megatron.training.datasets.data_samplers, torch; "
              "assert megatron.core.__version__ == '0.19.2', megatron.core.__version__",
        feed="megatron_feed.py",
    ),
}


def _find_python(version: str) -> str:
    cands = [shutil.which(f"python{version}")]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    cands += sorted(glob.glob(os.path.join(pyenv_root, "versions", f"{version}*", "bin", f"python{version}")))
    for c in cands:
        if c and subprocess.run([c, "-c", "import venv"], capture_output=True).returncode == 0:
            return c
    raise SystemExit(f"fidelity --setup: no python{version} found (PATH or pyenv)")


def setup(fw: Framework) -> None:
    target = venv_root() / fw.venv
    if fw.skip_reason() is None:
        print(f"{fw.name}: {target} ready")
        return
    py = _find_python(fw.python)
    print(f"{fw.name}: creating {target} with {py}", flush=True)
    subprocess.run([py, "-m", "venv", str(target)], check=True)
    subprocess.run([str(target / "bin" / "pip"), "install", *fw.packages], check=True)
    reason = fw.skip_reason()
    if reason:
        raise SystemExit(f"{fw.name}: set up but still not usable: {reason}")


# ---------------------------------------------------------------------------------------------------
# Megatron settings (small data; every one a real megatron-core code path)

_DOCS = {"n_docs": 40, "min_len": 2, "max_len": 40}
MEGATRON_SETTINGS: dict[str, dict] = {
    # 40 docs, ~840 tokens; 2.2 epochs: the last epoch's share is below 80%, shuffled separately
    "multi_epoch_separate_final": {"prefixes": [dict(_DOCS, name="a", seed=1)], "seq_len": 16,
                                   "global_batch_size": 8, "train_iters": 14, "expect": {"separate_final_epoch": True}},
    # ~2.9 epochs: one shuffle over all epochs (a document can recur within a batch)
    "multi_epoch_joint": {"prefixes": [dict(_DOCS, name="a", seed=2)], "seq_len": 16,
                          "global_batch_size": 8, "train_iters": 17, "expect": {"separate_final_epoch": False}},
    # documents longer than a sample, several sequences per document, 2 ranks x 2 micro-batches
    "docs_across_samples_dp2": {"prefixes": [{"name": "long", "n_docs": 25, "min_len": 5, "max_len": 90,
                                              "sentences": 2, "seed": 3}],
                                "seq_len": 32, "global_batch_size": 8, "micro_batch_size": 2,
                                "data_parallel_size": 2, "train_iters": 20, "num_workers": 2},
    # vocabulary over 65,535: the .bin is int32
    "int32": {"prefixes": [dict(_DOCS, name="big", seed=4, token_low=60000)], "vocab_size": 100000,
              "seq_len": 16, "global_batch_size": 4, "train_iters": 30},
    # resume from a checkpoint at iteration 12: the loader starts at consumed samples 96
    "resume_consumed_samples": {"prefixes": [dict(_DOCS, name="a", seed=5)], "seq_len": 16,
                                "global_batch_size": 8, "micro_batch_size": 4, "data_parallel_size": 2,
                                "train_iters": 30, "resume_iteration": 12},
    "no_extra_token": {"prefixes": [dict(_DOCS, name="a", seed=6)], "seq_len": 16, "global_batch_size": 8,
                       "train_iters": 20, "add_extra_token_to_sequence": False},
    # --data-path 0.5 A 0.3 B 0.2 C
    "blend_weighted": {"prefixes": [dict(_DOCS, name="w0", seed=7), dict(_DOCS, name="w1", seed=8),
                                    dict(_DOCS, name="w2", seed=9, max_len=80)],
                       "weights": [0.5, 0.3, 0.2], "seq_len": 16, "global_batch_size": 8,
                       "micro_batch_size": 2, "data_parallel_size": 2, "train_iters": 40},
    # --data-path A B (no weights): megatron-core still builds a BlendedDataset, one epoch of each
    "blend_unweighted": {"prefixes": [dict(_DOCS, name="u0", seed=10), dict(_DOCS, name="u1", seed=11, n_docs=60)],
                         "seq_len": 16, "global_batch_size": 8, "train_iters": 14},
    # a train/valid split of the documents (the train split sees a subset)
    "split_90_10": {"prefixes": [dict(_DOCS, name="a", seed=12, n_docs=60)], "split": "90,10,0", "seq_len": 16,
                    "global_batch_size": 8, "train_iters": 20, "eval_iters": 2, "eval_interval": 10},
    # a tokenizer with a pad id (not its EOD) that occurs in the data (a 64-token vocabulary): megatron-core
    # feeds 0 there and masks the loss; the manifest records the id (--pad-id) and the reads show the 0
    "pad_id_in_data": {"prefixes": [dict(_DOCS, name="a", seed=13)], "vocab_size": 64, "eod_id": 63, "pad_id": 5,
                       "seq_len": 16, "global_batch_size": 8, "train_iters": 12, "expect_pad_fed": True},
}


# ---------------------------------------------------------------------------------------------------
# Comparison


def partition_equal(samples: list[np.ndarray], pieces: list[np.ndarray], max_nodes: int = 200_000) -> bool:
    """True when ``pieces`` (the manifest's slices) can be concatenated into exactly ``samples`` (what the
    framework fed), every piece used exactly once. Order of pieces inside the manifest does not matter
    (the manifest sorts slices); the order of pieces inside a sample does."""
    if sum(len(s) for s in samples) != sum(len(p) for p in pieces):
        return False
    counts: dict[bytes, int] = {}
    by_len: dict[bytes, np.ndarray] = {}
    for p in pieces:
        k = np.ascontiguousarray(p, np.int64).tobytes()
        counts[k] = counts.get(k, 0) + 1
        by_len[k] = p
    keys = list(counts)
    nodes = [0]
    samples = [np.ascontiguousarray(s, np.int64) for s in samples]

    def fill(si: int, pos: int) -> bool:
        nodes[0] += 1
        if nodes[0] > max_nodes:
            return False
        if si == len(samples):
            return True
        s = samples[si]
        if pos == len(s):
            return fill(si + 1, 0)
        for k in keys:
            if counts[k] == 0:
                continue
            n = len(k) // 8
            if pos + n <= len(s) and s[pos:pos + n].tobytes() == k:
                counts[k] -= 1
                if fill(si, pos + n):
                    return True
                counts[k] += 1
        return False

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    return fill(0, 0)


@dataclasses.dataclass
class Result:
    framework: str
    setting: str
    steps_checked: int = 0
    steps_equal: int = 0
    note: str = ""
    log_check: str = ""
    seconds: float = 0.0
    failures: list = dataclasses.field(default_factory=list)


def _spike_audit() -> list[str]:
    exe = Path(sys.executable).with_name("spike-audit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "spike_audit.pipelines.cli"]


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_spike_audit() + args, capture_output=True, text=True)


def _manifest_meta(path: str) -> dict:
    from spike_audit.pipelines.manifest import read_meta

    return read_meta(path)


def compare_steps(manifest: str, shard_root: str, fed: dict, *, manifest_step_of) -> tuple[int, int, list]:
    """Step-by-step comparison of the manifest with what the framework fed. ``fed``: arrays from the feed
    script (``tokens`` (steps, gbs, L), ``batch_index``, ``rank``, ``micro_batch``)."""
    from spike_audit.pipelines.cli.batch import step_report
    from spike_audit.pipelines.errors import UserError
    from spike_audit.pipelines.manifest import fed_tokens, load_manifest_table, read_meta, step_rows
    from spike_audit.pipelines.shards.read import read_slices

    table = load_manifest_table(manifest)
    meta = read_meta(manifest)
    shard = np.asarray(table.column("shard").to_pylist(), dtype=object)
    unit = np.asarray(table.column("unit").to_pylist(), dtype=object)
    start, end = table.column("row_start").to_numpy(), table.column("row_end").to_numpy()
    rank = np.asarray(table.column("rank").to_pylist(), dtype=object)
    micro = np.asarray(table.column("micro_batch").to_pylist(), dtype=object)
    checked = equal = 0
    failures = []
    for k, b in enumerate(fed["batch_index"].tolist()):
        checked += 1
        step = manifest_step_of(b)
        try:
            step_report(manifest, shard_root, step, limit=1)  # what `spike-audit batch --step` checks
        except UserError as err:
            failures.append({"batch_index": b, "step": step, "reason": f"refused: {err}"})
            continue
        ids = step_rows(table, step)
        pieces = []
        for i in ids:
            batch = read_slices(shard_root, shard[i], np.array([[start[i], end[i]]]), unit=unit[i])
            for t in fed_tokens(batch.column("tokens"), meta)[0].to_pylist():  # as `batch` shows them
                pieces.append((rank[i], micro[i], np.asarray(t, np.int64)))
        samples = fed["tokens"][k]
        have_groups = len(ids) and all(r is not None for r, _, _ in pieces) and all(m is not None for _, m, _ in pieces)
        if have_groups:
            groups = sorted({(int(r), int(m)) for r, m in zip(fed["rank"], fed["micro_batch"])})
            ok = all(partition_equal([samples[j] for j in np.flatnonzero((fed["rank"] == r) & (fed["micro_batch"] == m))],
                                     [p for pr, pm, p in pieces if pr == r and pm == m]) for r, m in groups)
            ok = ok and {(int(r), int(m)) for r, m, _ in pieces} <= set(groups)
        else:
            ok = partition_equal(list(samples), [p for _, _, p in pieces])
        if ok:
            equal += 1
        else:
            failures.append({"batch_index": b, "step": step, "reason": "tokens differ"})
    return checked, equal, failures


def log_check(log_path: str, manifest: str, *, offset_manifest: str | None = None) -> str:
    """The log/manifest step check of ``spike-audit run`` on the framework's own log: the right manifest
    must be accepted (with the consumed samples agreeing), a manifest one batch off refused in one line."""
    import pyarrow.parquet as pq

    from spike_audit.pipelines.errors import UserError
    from spike_audit.pipelines.logs.read import read_log
    from spike_audit.pipelines.manifest import read_meta
    from spike_audit.pipelines.run.steps import align

    loss, report = read_log(log_path)

    def check(m):
        steps = pq.read_table(m, columns=["step"]).column("step").to_numpy()
        return align(loss, log_path=log_path, log_format=report.format, report_trainer=report.trainer,
                     meta=read_meta(m), manifest_range=(int(steps.min()), int(steps.max())))

    try:
        join = check(manifest)
    except UserError as err:
        return f"FAIL: right manifest refused: {err}"
    if not any("consumed samples agree" in c for c in join.checked):
        return f"FAIL: consumed samples not checked ({join.checked})"
    if offset_manifest:
        try:
            check(offset_manifest)
        except UserError as err:
            return "ok (off-by-one refused)" if "\n" not in str(err) else "FAIL: multi-line error"
        return "FAIL: manifest one batch off accepted"
    return "ok"


def run_framework(fw: Framework, jobs: dict[str, dict], workdir: Path) -> dict[str, Path]:
    """One framework process for all settings (the framework's imports are paid once). Returns the
    output directory per setting; a setting the framework failed on has an ``error.txt`` there."""
    outs = {}
    cmd = [str(fw.python_path()), str(FEEDS / fw.feed)]
    for name, spec in jobs.items():
        out = workdir / f"{fw.name}-{name}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "spec.json").write_text(json.dumps(spec))
        cmd += ["--spec", str(out / "spec.json"), "--out", str(out)]
        outs[name] = out
    log.info("%s: running the framework on %d settings", fw.name, len(jobs))
    subprocess.run(cmd, capture_output=True, text=True)
    return outs


def check_megatron(name: str, spec: dict, out: Path) -> Result:
    t0 = time.time()
    res = Result("megatron", name)
    if (out / "error.txt").exists() or not (out / "feed.json").exists():
        err = (out / "error.txt").read_text().strip() if (out / "error.txt").exists() else "no output"
        res.note = "framework run failed: " + err
        return res
    info = json.loads((out / "feed.json").read_text())
    for key, want in spec.get("expect", {}).items():  # the setting really exercises what it is named after
        got = [m[key] for m in info["members"]]
        if any(g != want for g in got):
            res.note = f"setting does not exercise {key}={want} (framework built {got})"
            return res
    fed = dict(np.load(out / "feed.npz"))
    root = str(out / "data")
    gbs = spec["global_batch_size"]
    args = ["manifest", "megatron", "--shards", root, "--cache", info["cache_dir"],
            "--data", *[os.path.basename(p["prefix"]) + ".bin" for p in info["prefixes"]],
            "--global-batch-size", str(gbs), "--out", str(out / "manifest.parquet")]
    if spec.get("micro_batch_size") and spec.get("data_parallel_size"):
        args += ["--micro-batch-size", str(spec["micro_batch_size"]),
                 "--data-parallel-size", str(spec["data_parallel_size"])]
    if not info["add_extra_token_to_sequence"]:
        args.append("--no-extra-token")
    b0 = int(fed["batch_index"][0])
    if info["consumed_samples_start"]:
        args += ["--consumed-samples", str(info["consumed_samples_start"])]
    if spec.get("pad_id") is not None:
        args += ["--pad-id", str(spec["pad_id"])]  # the run's tokenizer's pad id
    # only the steps the loader fed (the caches hold more): batch indices b0 .. b0 + n - 1
    r = _cli(args + ["--check"])
    if r.returncode:
        res.steps_checked = len(fed["batch_index"])
        res.note = "manifest refused: " + (r.stderr.strip().splitlines() or ["?"])[-1]
        res.seconds = time.time() - t0
        return res
    manifest = str(out / "manifest.parquet")
    meta = _manifest_meta(manifest)
    if meta.get("step_convention") != "batch_index":
        res.note = f"manifest records no batch-index step convention ({meta})"
        return res
    step_of = lambda b: b  # noqa: E731
    res.steps_checked, res.steps_equal, res.failures = compare_steps(manifest, root, fed, manifest_step_of=step_of)
    if spec.get("expect_pad_fed"):  # the setting really has the pad id in the data, fed as 0
        from spike_audit.pipelines.cli.batch import step_report

        n_pad = sum(step_report(manifest, root, int(b), limit=1)["n_pad_fed_as_0"] for b in fed["batch_index"])
        if not n_pad:
            res.note = "setting does not exercise the pad id (it never occurs in the fed steps)"
        elif not res.failures:
            res.note = f"{n_pad} pad ids fed as 0"
    if res.failures and not res.note:
        res.note = res.failures[0]["reason"]
    # the log check of `spike-audit run`
    off = str(out / "manifest_off_by_one.parquet")
    # the same data numbered one batch later (as the old --first-step 1 default did): must be refused
    off_args = args + ["--first-step", str(b0 + 1)]
    off_args[off_args.index("--out") + 1] = off
    ro = _cli(off_args)
    if ro.returncode:
        res.log_check = "FAIL: could not build the off-by-one manifest: " + (ro.stderr.strip().splitlines() or ["?"])[-1]
    else:
        res.log_check = log_check(str(out / "train.log"), manifest, offset_manifest=off)
    res.seconds = time.time() - t0
    return res


RUNNERS = {"megatron": (MEGATRON_SETTINGS, check_megatron)}


def run_all(frameworks: list[str], settings: list[str] | None, workdir: Path) -> tuple[list[Result], dict]:
    results, skipped = [], {}
    for name in frameworks:
        fw = FRAMEWORKS[name]
        reason = fw.skip_reason()
        if reason:
            skipped[name] = reason
            continue
        table, check = RUNNERS[name]
        chosen = settings or list(table)
        unknown = [s for s in chosen if s not in table]
        if unknown:
            raise SystemExit(f"fidelity: {name} has no setting {unknown[0]!r} (have: {', '.join(table)})")
        outs = run_framework(fw, {s: table[s] for s in chosen}, workdir)
        for s in chosen:
            log.info("%s / %s: checking", name, s)
            results.append(check(s, table[s], outs[s]))
    return results, skipped


def format_table(results: list[Result], skipped: dict) -> str:
    rows = [("framework", "setting", "steps checked", "steps equal", "log check", "note")]
    for r in results:
        rows.append((r.framework, r.setting, str(r.steps_checked), str(r.steps_equal), r.log_check,
                     r.note[:110]))
    w = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(row)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (x + 2) for x in w) + "|")
    for name, reason in skipped.items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--framework", action="append", choices=sorted(FRAMEWORKS), help="default: all")
    ap.add_argument("--setting", action="append", help="default: all settings of the framework")
    ap.add_argument("--setup", action="store_true", help="create the framework virtualenvs first")
    ap.add_argument("--workdir", default=None, help="keep the framework outputs here (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results as JSON")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = a.framework or sorted(FRAMEWORKS)
    if a.setup:
        for n in names:
            setup(FRAMEWORKS[n])
    tmp = None
    if a.workdir:
        workdir = Path(a.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="fidelity-")
        workdir = Path(tmp.name)
    try:
        results, skipped = run_all(names, a.setting, workdir)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_table(results, skipped))
    if a.json:
        Path(a.json).write_text(json.dumps({"results": [dataclasses.asdict(r) for r in results],
                                            "skipped": skipped}, indent=2, default=int))
    bad = [r for r in results if r.steps_equal != r.steps_checked or r.steps_checked == 0
           or r.log_check.startswith("FAIL")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
