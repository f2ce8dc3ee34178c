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

    from spike_audit.pipelines.errors import UserError

    if not 0 <= args.seed < 2 ** 64:  # checked before any work (numpy's generators take 0 .. 2^64 - 1)
        raise UserError(f"--seed {args.seed}: expected an integer from 0 to {2 ** 64 - 1}")
    beam_options(args.extra)  # a misspelled option fails before the demo run is built
    root = Path(args.dir)
    _check_dir(root)
    with _demo_lock(root):
        truth = _build_run(root, args.seed, make_demo, DemoConfig)
        return _audit(args, root, truth, run_audit, RunConfig, print_summary)


def _build_run(root: Path, seed: int, make_demo, DemoConfig) -> dict:
    """The run is built in ``DIR/.run-building`` and moved to ``DIR/run`` when complete: a demo killed while
    building leaves no half-written run (the next demo clears its own building directory), and the audit never
    reads a run another demo is writing (the lock)."""
    import shutil

    building, old = root / ".run-building", root / ".run-replaced"
    from spike_audit.pipelines.errors import UserError

    for d in (building, old):  # ours (these names, under the lock): left by a killed demo
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            raise UserError(f"{d}: not a directory a demo left; refusing to write through it: remove it")
        if d.is_dir():
            shutil.rmtree(d)
    truth = make_demo(building, DemoConfig(seed=seed))
    run = root / "run"
    if run.exists():
        run.rename(old)
    building.rename(run)
    shutil.rmtree(old, ignore_errors=True)
    return truth


def _demo_lock(root: Path):
    """An exclusive lock on ``DIR`` for one demo at a time (two demos in one --dir audited each other's files)."""
    import contextlib
    import errno
    import fcntl
    import os

    from spike_audit.pipelines.errors import UserError

    @contextlib.contextmanager
    def held():
        fd = os.open(root / ".spike-audit-demo.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"{root}: another spike-audit demo is using this --dir; wait for it or choose "
                                    f"another") from None
                raise
            yield
        finally:
            os.close(fd)

    return held()


def _audit(args, root: Path, truth: dict, run_audit, RunConfig, print_summary) -> int:
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
        raise UserError(f"{run}: exists and is not a spike-audit demo run (it holds other files than a demo writes); "
                        f"refusing to replace it: choose another --dir")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{root}: cannot use as --dir ({err.strerror or err})") from None


_DEMO_FILES = frozenset({"shards", "tokenizer.json", "train.log", "manifest.parquet", "truth.json"})


def _is_demo_run(run: Path) -> bool:
    """Only a demo run's own files (it is replaced whole): an empty directory, what an older demo wrote before it
    was killed, or a complete demo run; any other file in it is a user's, and the directory is never replaced."""
    names = {p.name for p in run.iterdir()}
    shards = run / "shards"
    if not names <= _DEMO_FILES or (shards.exists() and not (shards.is_dir() and not shards.is_symlink() and all(
            p.name.startswith("train-") and p.suffix == ".parquet" and p.is_file() and not p.is_symlink()
            for p in shards.iterdir()))):
        return False
    if "truth.json" not in names:  # empty, or an interrupted demo: it made shards/ first, then wrote into it
        return not names or ("shards" in names and any(shards.iterdir()))
    try:
        truth = json.loads((run / "truth.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(truth, dict) and "injections" in truth


def register(sub) -> None:
    p = sub.add_parser("demo", help="generate a small realistic run with planted spikes and audit it")
    p.add_argument("--dir", default="demo-out", help="where to write the run and the audit (demo-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_demo, accepts_extra=True)
