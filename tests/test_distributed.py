"""The main pipeline on a real distributed engine: Beam's DaskRunner on a local dask.distributed
cluster of 2 worker processes. Its output tables must equal the DirectRunner's, byte for byte."""

from __future__ import annotations

import pytest
from distributed import LocalCluster

from spike_audit.pipelines.run.audit import run_audit
from spike_audit.pipelines.run.plan import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TABLES = ("spikes", "batch_scores", "shard_scores", "row_flags", "verdicts")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def test_dask_runner_gives_the_same_tables_as_the_direct_runner(demo, cluster, tmp_path):
    root, _ = demo
    run = root / "run"

    def cfg(out):
        return RunConfig(log=str(run / "train.log"), manifest=str(run / "manifest.parquet"),
                         shards=str(run / "shards"), out=str(tmp_path / out), tokenizer=str(run / "tokenizer.json"))

    direct = run_audit(cfg("direct"))
    before = cluster.scheduler.transition_counter
    dask = run_audit(cfg("dask"), beam_args=["--runner=DaskRunner", f"--dask_client_address={cluster.scheduler_address}"])
    assert dask.tables["verdicts"].num_rows == direct.tables["verdicts"].num_rows > 0
    for name in TABLES:
        a = (tmp_path / "direct" / f"{name}.parquet").read_bytes()
        b = (tmp_path / "dask" / f"{name}.parquet").read_bytes()
        assert a == b, f"{name} differs between DirectRunner and DaskRunner"
    # the work really ran through the cluster's scheduler, on its two worker processes
    assert cluster.scheduler.transition_counter - before > 50
    assert len(cluster.scheduler.workers) == 2


def test_dask_list_side_input_of_a_combine_has_each_element_once(cluster, tmp_path):
    """Regression test for the DaskRunner bug patched by pipelines.dask_compat: a bundle must return
    only its own outputs, so a side input built from a CombinePerKey holds each key once."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from spike_audit.pipelines.beam.runner import run_pipeline
    from spike_audit.pipelines.beam.options import beam_options

    out = tmp_path / "rows.json"

    def _write_rows(kv, path):  # local, so pickled by value: the workers need not import this test module
        import json

        with open(path, "w") as f:
            json.dump(sorted(kv[1]), f)

    opts = PipelineOptions(beam_options(["--runner=DaskRunner", f"--dask_client_address={cluster.scheduler_address}"]))
    def build(p):
        x = p | beam.Create([(i % 20, i) for i in range(400)]) | beam.Reshuffle()
        per = x | beam.CombinePerKey(sum)
        rows = per | beam.Map(lambda kv, side: ("r", (kv[0], len(side), sorted(k for k, _ in side))),
                              beam.pvalue.AsList(per))
        rows | beam.GroupByKey() | beam.Map(_write_rows, str(out))

    run_pipeline(build, opts)
    import json

    got = json.loads(out.read_text())
    assert [r[0] for r in got] == list(range(20))
    assert all(r[1] == 20 and r[2] == list(range(20)) for r in got)


def test_shard_audit_on_dask_equals_the_direct_runner(corpus, cluster, tmp_path):
    from spike_audit.pipelines.shard_audit.audit import run_shard_audit
    from spike_audit.pipelines.shard_audit.config import ShardAuditConfig

    root, truth = corpus

    def cfg(out, state=None):
        return ShardAuditConfig(inputs=(str(root / "shards"),), out=str(tmp_path / out), state=state)

    direct = run_shard_audit(cfg("direct"))
    dask = run_shard_audit(cfg("dask", str(tmp_path / "state")),
                           beam_args=["--runner=DaskRunner", f"--dask_client_address={cluster.scheduler_address}"])
    assert direct.tables["duplicates"].num_rows > 0
    for name in ("shard_scores", "duplicates"):
        assert (tmp_path / "direct" / f"{name}.parquet").read_bytes() == \
            (tmp_path / "dask" / f"{name}.parquet").read_bytes(), name
    assert dask.n_scanned == truth["n_shards"]


def test_two_worker_processes_give_the_same_tables_and_keep_their_logs_quiet(corpus, tmp_path):
    """``--direct_running_mode=multi_processing --direct_num_workers=2`` on the CLI: byte-identical tables, and at
    the default log level the worker processes print none of their harness's INFO lines (each printed about 18
    before the workers were given the pipeline options); only the line Beam logs before it reads them is left."""
    import shutil
    import subprocess
    import sys

    root, _ = corpus
    exe = shutil.which("spike-audit") or str(__import__("pathlib").Path(sys.executable).parent / "spike-audit")
    outs = {}
    for label, extra in (("one", []), ("two", ["--direct_running_mode=multi_processing", "--direct_num_workers=2"])):
        r = subprocess.run([exe, "shards", str(root / "shards"), "--out", str(tmp_path / label), "-q",
                            "--allow-outside-root", *extra], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[label] = r.stderr
    for name in ("shard_scores", "duplicates", "row_flags"):
        assert (tmp_path / "one" / f"{name}.parquet").read_bytes() == \
            (tmp_path / "two" / f"{name}.parquet").read_bytes(), name
    noisy = [ln for ln in outs["two"].splitlines()
             if ln.startswith("INFO:") and "Logging handler created" not in ln]
    assert noisy == [], noisy[:5]
