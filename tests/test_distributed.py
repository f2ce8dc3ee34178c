"""The main pipeline on a real distributed engine: Beam's DaskRunner on a local dask.distributed
cluster of 2 worker processes. Its output tables must equal the DirectRunner's, byte for byte."""

from __future__ import annotations

import pytest
from distributed import LocalCluster

from pipelines.run import RunConfig, run_audit

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
    assert len(cluster.scheduler_info()["workers"]) == 2
