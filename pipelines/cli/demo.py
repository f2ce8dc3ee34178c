"""``spike-audit demo``: build a small realistic run with planted spikes and audit it."""

from __future__ import annotations

import json
from pathlib import Path


def _demo(args) -> int:
    from spike_audit.pipelines.beam.options import beam_options
    from spike_audit.pipelines.cli.run import print_summary
    from spike_audit.pipelines.demo import DemoConfig, make_demo
    from spike_audit.pipelines.run.audit import run_audit
    from spike_audit.pipelines.run.plan import RunConfig

    beam_options(args.extra)  # a misspelled option fails before the demo run is built
    root = Path(args.dir)
    _check_dir(root)
    truth = make_demo(root / "run", DemoConfig(seed=args.seed))
    print(f"demo run written to {root / 'run'}: {truth['steps']} steps, {truth['tokens']:,} tokens; planted: "
          + ", ".join(f"step {s} {t['kind']}" for s, t in truth["injections"].items()))
    cfg = RunConfig(log=str(root / "run" / "train.log"), manifest=str(root / "run" / "manifest.parquet"),
                    shards=str(root / "run" / "shards"), out=str(root / "audit"),
                    tokenizer=str(root / "run" / "tokenizer.json"), seed=args.seed)
    res = run_audit(cfg, beam_args=args.extra)
    print_summary(res)
    print(f"report: {root / 'audit' / 'report.html'}")
    if args.json:
        print(json.dumps({"truth": truth, "out": str(res.out)}))
    return 0


def _check_dir(root: Path) -> None:
    """--dir gets two subdirectories, ``run`` (the generated run, files written over) and ``audit`` (an output
    directory, replaced safely): ``run`` must be new or a previous demo run, never a user's directory (``--dir /``
    wrote into the system's /run); a --dir that is a file is one line, not a traceback."""
    from spike_audit.pipelines.errors import UserError

    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: --dir exists and is not a directory; expected a directory for the demo run")
    run = root / "run"
    if run.is_symlink() or (run.exists() and not (run.is_dir() and _is_demo_run(run))):
        raise UserError(f"{run}: exists and is not a spike-audit demo run (no truth.json of one); refusing to write "
                        f"into it: choose another --dir")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{root}: cannot use as --dir ({err.strerror or err})") from None


def _is_demo_run(run: Path) -> bool:
    try:
        truth = json.loads((run / "truth.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return not any(run.iterdir())  # an empty directory (a demo interrupted before its first file) is fine
    return isinstance(truth, dict) and "injections" in truth


def register(sub) -> None:
    p = sub.add_parser("demo", help="generate a small realistic run with planted spikes and audit it")
    p.add_argument("--dir", default="demo-out", help="where to write the run and the audit (demo-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_demo, accepts_extra=True)
