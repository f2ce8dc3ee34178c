"""Cloud paths through the one filesystem layer: logs, manifests, shards, config files and outputs on ``s3://``,
against a local S3 server (moto in server mode on 127.0.0.1, started here and stopped after; skipped with the
reason when moto or s3fs is not installed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spike_audit.pipelines import api, fs
from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError

pytest.importorskip("s3fs", reason="s3fs is not installed (pip install s3fs): no s3:// tests")
MOTO = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
if not os.path.exists(MOTO):
    pytest.skip("moto_server is not installed (pip install 'moto[server]'): no local S3 server", allow_module_level=True)

BUCKET = "spike-audit-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 for this module (bounded start, always stopped), with one bucket; the
    endpoint and dummy credentials in the environment (botocore reads AWS_ENDPOINT_URL, fsspec
    FSSPEC_S3_ENDPOINT_URL at import, so both are set and fsspec's config updated)."""
    import fsspec

    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.skip("moto_server did not start within 30 s")
                time.sleep(0.2)
        env = {"AWS_ENDPOINT_URL": url, "FSSPEC_S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        old_conf = fsspec.config.conf.get("s3")
        fsspec.config.conf["s3"] = {"endpoint_url": url}
        s3fs_ = fsspec.filesystem("s3", skip_instance_cache=True)
        s3fs_.mkdir(BUCKET)
        yield {"url": url, "env": env}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if "old" in locals():
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if old_conf is None:
                fsspec.config.conf.pop("s3", None)
            else:
                fsspec.config.conf["s3"] = old_conf


def _put(local: Path, url: str) -> None:
    fsys, p = fs.url_fs(url)
    if local.is_dir():
        for f in sorted(local.rglob("*")):
            if f.is_file():
                fsys.put_file(str(f), f"{p}/{f.relative_to(local).as_posix()}")
    else:
        fsys.put_file(str(local), p)


def _shards(dest: Path, n: int = 8) -> str:
    rng = np.random.default_rng(0)
    dest.mkdir(parents=True)
    for i in range(n):
        if i == 3:  # the anomalous one: one token repeated
            rows = [[7] * 64 for _ in range(60)]
        else:
            rows = [(rng.zipf(1.3, size=64) % 2000).tolist() for _ in range(60)]
        pq.write_table(pa.table({"tokens": pa.array(rows, pa.list_(pa.int32()))}), dest / f"part-{i:02d}.parquet")
    return "part-03.parquet"


def test_shards_logs_config_and_outputs_on_s3(s3, tmp_path):
    bad = _shards(tmp_path / "shards")
    _put(tmp_path / "shards", f"s3://{BUCKET}/corpus")
    assert [s["shard"] for s in api.plan_shards(f"s3://{BUCKET}/corpus")["shards"]][:2] == [
        "part-00.parquet", "part-01.parquet"]
    conf = tmp_path / "c.toml"
    conf.write_text(f'[shards]\ninputs = ["s3://{BUCKET}/corpus/"]\nout = "s3://{BUCKET}/out"\n')
    _put(conf, f"s3://{BUCKET}/conf/c.toml")
    assert main(["shards", "--config", f"s3://{BUCKET}/conf/c.toml", "--json"]) == 0
    res = api.load_results(f"s3://{BUCKET}/out")
    scores = res["shard_scores"].to_pylist()
    assert scores[0]["shard"] == bad and len(scores) == 8
    assert res["completion"]["files"] and "metadata" in res
    # a rerun replaces the output: nothing stale is left, the marker is there
    assert main(["shards", f"s3://{BUCKET}/corpus/part-0[0-5].parquet", "--out", f"s3://{BUCKET}/out"]) == 0
    again = api.load_results(f"s3://{BUCKET}/out")
    assert again["shard_scores"].num_rows == 6 and "completion" in again

    log = tmp_path / "train.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 1000 + (2.0 if s == 150 else 0.0)}) + "\n"
                           for s in range(1, 301)))
    _put(log, f"s3://{BUCKET}/logs/train.jsonl")
    loss, report = api.read_log(f"s3://{BUCKET}/logs/train.jsonl")
    assert loss.num_rows == 300 and report.path == f"s3://{BUCKET}/logs/train.jsonl"
    assert api.detect_spikes(loss).column("peak_step").to_pylist() == [150]

    with pytest.raises(UserError, match="not found"):
        api.read_log(f"s3://{BUCKET}/logs/missing.jsonl")
    assert main(["shards", f"s3://{BUCKET}/nothing/", "--out", str(tmp_path / "o")]) == 2


def test_a_url_whose_filesystem_package_is_missing_is_a_one_line_error():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"gs://.*needs the gcsfs package"):
            fs.exists("gs://bucket/shard.parquet")
    else:
        pytest.skip("gcsfs is installed")


@pytest.mark.slow
def test_run_with_log_manifest_shards_and_output_on_s3(s3, demo, tmp_path):
    root, truth = demo
    _put(root / "run", f"s3://{BUCKET}/demo")
    u = f"s3://{BUCKET}/demo"
    assert main(["run", "--log", f"{u}/train.log", "--manifest", f"{u}/manifest.parquet", "--shards", f"{u}/shards",
                 "--out", f"s3://{BUCKET}/audit"]) == 0
    res = api.load_results(f"s3://{BUCKET}/audit")
    verdicts = {v["peak_step"]: v["verdict"] for v in res["verdicts"].to_pylist() if "train_loss" in v["spike_id"]}
    data_steps = [s for s, t in truth["injections"].items() if t["kind"] != "optimizer"]
    assert all(verdicts.get(int(s)) == "data" for s in data_steps), verdicts
    meta = res["metadata"]
    assert {i["what"]: i["path"] for i in meta["inputs"]}["log"] == f"{u}/train.log"
    assert all(i["size"] for i in meta["inputs"])


@pytest.mark.parametrize("url, needle", [
    ("ftp://127.0.0.1:9/x.log", "cannot open ftp:// (ConnectionRefusedError"),
    ("zip://x.log", "cannot open zip://"),
    ("s3://", "cannot list the files under it"),
    ("sftp://h/x.log", "needs an fsspec implementation of it, which is not installed"),
])
def test_a_url_whose_filesystem_fails_to_start_is_a_one_line_error(url, needle, capsys, tmp_path, monkeypatch):
    """A filesystem that cannot start (a refused connection, a missing JVM for hdfs, a listing of all of S3) was a
    traceback: only a missing package and a bad URL were turned into one line."""
    monkeypatch.chdir(tmp_path)
    if url.startswith("sftp"):
        try:
            import paramiko  # noqa: F401
            pytest.skip("paramiko is installed")
        except ImportError:
            pass
    if url == "s3://":
        pytest.importorskip("s3fs")
    assert main(["spikes", url, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and needle in err, err


def test_a_file_url_of_a_directory_lists_its_absolute_paths(tmp_path):
    """file:///abs/dir was listed as the relative file://abs/dir/... (FileNotFoundError, or a shard not found)."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("x")
    found = fs.list_files(f"file://{d}")
    assert [f for f, _, _ in found] == [f"file://{d}/a.txt"]
    assert fs.exists(found[0][0])
