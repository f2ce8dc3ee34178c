"""The spike lab: does `spike-audit` give the right verdict, rows and shards on realistic runs?

    python benchmarks/verdicts.py [--seeds 10] [--quick] [--out DIR] [--spike-audit PATH] [--jobs 2]
                                  [--record NAME]

Builds audited training runs from real text on this machine (Python sources and docs, Debian
changelogs and copyright files, licences, man pages, installed packages' documentation; nothing
de-duplicated), tokenized with a byte-level BPE trained offline. Every kind of anomaly in
``spikelab/lab_plant.py`` is planted at doses of 16, 8, 4 and 2 rows of 16 over 1-6 consecutive
steps, several events per run, plus normal (optimizer-like) spikes whose data is untouched; the
loss log spikes at every planted step and holds a crash and resume. Each seed draws new data
order, positions, rows, sizes and layout, and is the ``--seed`` of the audit (the control draw).

The tool is driven only through its command line (``spike-audit run``, ``spike-audit shards``) and
its documented output files, so the lab measures whatever version is installed. Prints one table
(recall per kind and dose, false ``data`` on normal spikes, agreement across seeds, skip-list rows
against the planted rows, shard ranks, quarantine, effect sizes, control false alarms) and writes
it with every event's details to ``DIR/verdicts.json`` and ``DIR/verdicts.md`` (and to
``benchmarks/results/verdicts-NAME.*`` with ``--record NAME``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "spikelab"))

import lab_corpus  # noqa: E402
import lab_eval  # noqa: E402
import lab_run  # noqa: E402

log = logging.getLogger("spikelab")


def find_tool(given: str | None) -> str:
    if given:
        return given
    cand = Path(sys.executable).parent / "spike-audit"
    if cand.exists():
        return str(cand)
    found = shutil.which("spike-audit")
    if not found:
        sys.exit("spike-audit not found: install the package (pip install .) or pass --spike-audit PATH")
    return found


def call(cmd: list[str], logfile: Path) -> tuple[float, float]:
    """Run one tool command; (wall seconds, CPU seconds of the process and its children)."""
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        tail = logfile.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd[:2])} failed with exit code {p.returncode} (see {logfile}):\n"
                           + "\n".join(tail))
    return time.perf_counter() - t0, ru.ru_utime + ru.ru_stime


def _own_output(out: Path) -> Path:
    """The lab's own audit directory: one an older spike-audit wrote (no output marker, which the current tool
    refuses to replace) is removed first."""
    if out.is_dir() and not (out / ".spike-audit.json").exists():
        shutil.rmtree(out)
    return out


def audit_run(tool: str, run_dir: Path, seed: int, with_shards: bool, run_args: tuple[str, ...] = ()) -> dict:
    truth = json.loads((run_dir / "truth.json").read_text())
    audit = _own_output(run_dir / "audit")
    t_run, c_run = call([tool, "run", "--log", str(run_dir / truth["log"]), "--manifest", str(run_dir / "manifest.parquet"),
                  "--shards", str(run_dir / "shards"), "--out", str(audit), "--seed", str(seed),
                  "--eos-id", str(truth["eos_id"]), "--tokenizer", str(run_dir / "tokenizer.json"), *run_args],
                 run_dir / "audit.log")
    t_shards = c_shards = None
    shard_audit = None
    if with_shards:
        shard_audit = _own_output(run_dir / "shard-audit")
        t_shards, c_shards = call([tool, "shards", str(run_dir / "shards"), "--out", str(shard_audit),
                         "--eos-id", str(truth["eos_id"]), "--seed", str(seed)], run_dir / "shard-audit.log")
    res = lab_eval.score_run(run_dir, audit, shard_audit)
    res["seconds"] = {"run": t_run, "shards": t_shards, "run_cpu": c_run, "shards_cpu": c_shards}
    return res


def draw_seed(seed: int, j: int) -> int:
    """The audit's ``--seed`` for control draw ``j`` of a run built from ``seed`` (draw 0 is the seed itself)."""
    return seed + 1000 * j


def audit_draws(tool: str, run_dir: Path, seed: int, draws: int) -> tuple[list[list[str]], float]:
    """Audit the same run again under ``draws - 1`` other ``--seed`` values (the same data, other control steps):
    every event's verdict under each extra draw, in the order of ``score_run``'s events; and their CPU seconds."""
    truth = json.loads((run_dir / "truth.json").read_text())
    out, cpu = [], 0.0
    for j in range(1, draws):
        audit = _own_output(run_dir / f"audit-draw{j}")
        _, c = call([tool, "run", "--log", str(run_dir / truth["log"]), "--manifest", str(run_dir / "manifest.parquet"),
                     "--shards", str(run_dir / "shards"), "--out", str(audit), "--seed", str(draw_seed(seed, j)),
                     "--eos-id", str(truth["eos_id"]), "--tokenizer", str(run_dir / "tokenizer.json")],
                    run_dir / f"audit-draw{j}.log")
        cpu += c
        out.append([e["verdict"] for e in lab_eval.score_run(run_dir, audit, None)["events"]])
    return out, cpu


def pool_outputs(dirs: list[Path], out: Path, record: str | None) -> int:
    """One table over the runs of several lab outputs (``--pool``): their runs concatenated, scored together."""
    docs = []
    for d in dirs:
        f = d / "verdicts.json"
        if not f.is_file():
            sys.exit(f"--pool: {f} does not exist (a directory written by an earlier lab run)")
        docs.append(json.loads(f.read_text()))
    runs = [r for doc in docs for r in doc["runs"]]
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        sys.exit("--pool: the same run occurs in two outputs (" +
                 ", ".join(sorted({n for n in names if names.count(n) > 1})[:3]) + "): pool outputs of other seeds")
    seeds = sum(doc["meta"]["seeds"] for doc in docs)
    pooled = lab_eval.pool_scores(runs, seeds)
    meta = {"command": "python benchmarks/verdicts.py --pool " + " ".join(map(str, dirs)),
            "pooled": [doc["meta"] for doc in docs],
            "footer": f"{seeds} seeds pooled from {len(docs)} lab outputs ({len(runs)} runs, "
                      f"{sum(len(r['events']) for r in runs)} planted events): "
                      + "; ".join(f"`{doc['meta']['command']}` (pool {doc['meta'].get('pool', '?')})" for doc in docs)}
    table = lab_eval.render(pooled, meta)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "table": pooled, "runs": runs}
    (out / "verdicts.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "verdicts.md").write_text(table)
    if record:
        dest = HERE / "results"
        dest.mkdir(exist_ok=True)
        (dest / f"verdicts-{record}.md").write_text(f"`{meta['command']}`\n\n" + table)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 10; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="2 seeds, one small run each (about 2 minutes)")
    ap.add_argument("--out", default="/tmp/spikelab", help="work directory: runs, audits, results")
    ap.add_argument("--cache", default=None, help="token pool cache (default: OUT/cache)")
    ap.add_argument("--spike-audit", dest="tool", default=None, help="the spike-audit executable")
    ap.add_argument("--jobs", type=int, default=2, help="runs built and audited at once (2)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--record", default=None, help="also write benchmarks/results/verdicts-NAME.{json,md}")
    ap.add_argument("--keep", action="store_true", help="keep the runs' shards after scoring them")
    ap.add_argument("--rescore", action="store_true",
                    help="score the audits already in OUT/runs again (no build, no tool run)")
    ap.add_argument("--control-draws", type=int, default=1,
                    help="audit every run under this many --seed values (the same data, other control steps) and "
                         "report how often an event's verdict changes with the draw alone (1: only the seed)")
    ap.add_argument("--reaudit", action="store_true",
                    help="run the tool again on the runs kept in OUT/runs by an earlier --keep (no build)")
    ap.add_argument("--run-args", default="", help="more options for every `spike-audit run` (one string, e.g. "
                    "'--controls 500'): the lab under other settings")
    ap.add_argument("--no-shards", action="store_true", help="no `spike-audit shards` audits (with --reaudit: only "
                    "`run` again)")
    ap.add_argument("--pool", nargs="+", metavar="DIR", default=None,
                    help="no run: one table over the runs of earlier lab outputs (each DIR/verdicts.json; other "
                         "seeds, other machines' pools), written to --out")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.pool:
        return pool_outputs([Path(d) for d in args.pool], Path(args.out), args.record)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    n_seeds = args.seeds or (2 if args.quick else 10)
    tool = find_tool(args.tool)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    version = subprocess.run([tool, "--help"], capture_output=True, text=True).returncode
    if version != 0:
        sys.exit(f"{tool} --help failed: is it the spike-audit executable?")

    cache = Path(args.cache) if args.cache else out / "cache"
    pool_cfg = lab_corpus.QUICK_POOL if args.quick else lab_corpus.PoolConfig()
    pool_cached = (cache / f"pool-{pool_cfg.key()}" / "pool.json").exists()
    pool = lab_corpus.build_pool(cache, pool_cfg)
    t_pool = time.perf_counter() - t0
    n_runs = len(lab_run.design(args.quick))
    tasks = [(seed, r) for seed in range(args.first_seed, args.first_seed + n_seeds) for r in range(n_runs)]
    results: dict = {}
    lock = threading.Lock()
    done = [0]

    def one(task):
        seed, r = task
        spec = lab_run.make_spec(seed, r, lab_run.design(args.quick, seed)[r], args.quick)
        run_dir = out / "runs" / spec.name
        if args.rescore:
            sa = run_dir / "shard-audit"
            res = lab_eval.score_run(run_dir, run_dir / "audit", sa if sa.exists() else None)
            res["seconds"] = {"build": 0.0, "run": 0.0, "shards": None, "run_cpu": 0.0, "shards_cpu": None}
            if args.control_draws > 1:
                res["draws"] = [[e["verdict"] for e in lab_eval.score_run(run_dir, run_dir / f"audit-draw{j}",
                                                                           None)["events"]]
                                for j in range(1, args.control_draws) if (run_dir / f"audit-draw{j}").is_dir()]
            return task, res
        tb = time.perf_counter()
        if args.reaudit:
            if not (run_dir / "shards").is_dir():
                raise SystemExit(f"--reaudit: {run_dir / 'shards'} is missing (build the runs with --keep first)")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            lab_run.build_run(pool, spec, run_dir)
        t_build = time.perf_counter() - tb
        res = audit_run(tool, run_dir, seed, with_shards=(r == seed % n_runs) and not args.no_shards,
                        run_args=tuple(shlex.split(args.run_args)))
        res["seconds"]["build"] = t_build
        if args.control_draws > 1:
            res["draws"], res["seconds"]["draws_cpu"] = audit_draws(tool, run_dir, seed, args.control_draws)
        if not args.keep and not args.reaudit:
            shutil.rmtree(run_dir / "shards", ignore_errors=True)
        with lock:
            done[0] += 1
            log.info("[%d/%d] %s: build %.0f s, run %.0f s%s; %d/%d data events judged data", done[0], len(tasks),
                     spec.name, t_build, res["seconds"]["run"],
                     f", shards {res['seconds']['shards']:.0f} s" if res["seconds"]["shards"] else "",
                     sum(e["verdict"] == "data" for e in res["events"] if e["kind"] != "optimizer"),
                     sum(e["kind"] != "optimizer" for e in res["events"]))
        return task, res

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        for task, res in ex.map(one, tasks):
            results[task] = res
    runs = [results[t] for t in tasks]
    pooled = lab_eval.pool_scores(runs, n_seeds)
    wall = time.perf_counter() - t0
    sizes = sorted({(r["spec"]["steps"], r["spec"]["rows_per_step"], r["spec"]["seq_len"], r["spec"]["layout"])
                    for r in runs})
    meta = {
        "command": "python benchmarks/verdicts.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "tool": tool, "seeds": n_seeds, "runs": len(runs), "quick": args.quick,
        "corpus": lab_corpus.describe(pool), "pool": pool.dir.name,
        "seconds": {"total": wall, "pool": t_pool,
                    "build": sum(r["seconds"]["build"] for r in runs),
                    "run": sum(r["seconds"]["run"] for r in runs),
                    "shards": sum(r["seconds"]["shards"] or 0 for r in runs),
                    "run_cpu": sum(r["seconds"]["run_cpu"] for r in runs),
                    "shards_cpu": sum(r["seconds"]["shards_cpu"] or 0 for r in runs),
                    "draws_cpu": sum(r["seconds"].get("draws_cpu") or 0 for r in runs),
                    "lab_cpu": time.process_time()},
        "load_average": os.getloadavg()[0], "cores": os.cpu_count(),
        "tokens": sum(r["tokens"] for r in runs),
    }
    meta["footer"] = (
        f"{n_seeds} seeds, {len(runs)} runs ({', '.join(f'{a}x{b}x{c} {d}' for a, b, c, d in sizes[:6])}"
        f"{' ...' if len(sizes) > 6 else ''}; steps x rows x seq), {meta['tokens'] / 1e6:.1f}M tokens; "
        f"{sum(len(r['events']) for r in runs)} planted events; wall {wall:.0f} s with {args.jobs} jobs, load "
        f"{meta['load_average']:.1f} on {meta['cores']} cores; CPU: tool run {meta['seconds']['run_cpu']:.0f} s, "
        f"tool shards {meta['seconds']['shards_cpu']:.0f} s, "
        + (f"{args.control_draws - 1} more control draws {meta['seconds']['draws_cpu']:.0f} s, "
           if args.control_draws > 1 else "")
        + f"lab {meta['seconds']['lab_cpu']:.0f} s "
        f"(token pool {'cached' if pool_cached else 'built'}: {t_pool:.0f} s wall)"
        + ("; rescored from the audits in OUT/runs" if args.rescore else ""))
    table = lab_eval.render(pooled, meta)
    print(table)
    doc = {"meta": meta, "table": pooled, "runs": runs}
    (out / "verdicts.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "verdicts.md").write_text(table)
    if args.record:
        dest = HERE / "results"
        dest.mkdir(exist_ok=True)
        (dest / f"verdicts-{args.record}.json").write_text(json.dumps(doc, indent=1, default=str))
        (dest / f"verdicts-{args.record}.md").write_text(f"`{meta['command']}`\n\n" + table)
    log.info("results in %s/verdicts.{json,md}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
