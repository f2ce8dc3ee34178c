"""The one step convention: a log's steps join a manifest's 0-based batch indices through the trainer's
own numbering, and a log and a manifest that disagree (range, consumed samples) are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.logs.read import read_log
from spike_audit.pipelines.manifest import manifest_from_arrays, read_meta, write_manifest
from spike_audit.pipelines.run.outputs import skip_list
from spike_audit.pipelines.run.steps import align
from spike_audit.schemas import ROW_FLAGS, VERDICTS
from spike_audit.schemas.steps import FORMAT_TRAINER, TRAINER_STEP_BASE, as_logged

GBS = 4


def _megatron_log(path, iterations, *, gbs=GBS, shift=0, consumed_shift=0):
    lines = []
    for it in iterations:
        lines.append(f" [2025-01-01 00:00:00] iteration {it + shift:8d}/{max(iterations) + shift:8d} | consumed samples: "
                     f"{(it + consumed_shift) * gbs:12d} | elapsed time per iteration (ms): 100.0 | "
                     f"lm loss: {2.5 + 0.01 * np.sin(it):.6E} | grad norm: 1.000 |")
    path.write_text("\n".join(lines) + "\n")
    return path


def _manifest(path, steps, **meta):
    steps = np.asarray(list(steps))
    write_manifest(manifest_from_arrays(steps, "t.bin", steps * 8, steps * 8 + 8, "token"), path, **meta)
    return path


def _align(log, manifest, **kw):
    import pyarrow.parquet as pq

    loss, report = read_log(log)
    steps = pq.read_table(manifest, columns=["step"]).column("step").to_numpy()
    return align(loss, log_path=str(log), log_format=report.format, report_trainer=report.trainer,
                 meta=read_meta(manifest), manifest_range=(int(steps.min()), int(steps.max())), **kw)


MEGATRON_META = dict(trainer="megatron", samples_per_step=GBS, first_step=0, samples_before_first_step=0)


def test_every_format_names_a_known_trainer_or_none():
    from spike_audit.pipelines.logs.lines import FORMATS

    assert set(FORMATS) == set(FORMAT_TRAINER)
    assert all(t is None or t in TRAINER_STEP_BASE for t in FORMAT_TRAINER.values())
    assert TRAINER_STEP_BASE["megatron"] == 1 and TRAINER_STEP_BASE["llm.c"] == 0
    assert as_logged("megatron", 919) == "megatron iteration 920" and as_logged(None, 3) is None


def test_megatron_iteration_n_is_batch_n_minus_1(tmp_path):
    log = _megatron_log(tmp_path / "train.log", range(1, 21))
    man = _manifest(tmp_path / "m.parquet", range(0, 20), **MEGATRON_META)
    join = _align(log, man)
    assert join.offset == -1 and join.batch_index(1) == 0 and join.log_trainer == "megatron"
    assert any("consumed samples agree at 20 logged steps" in c for c in join.checked)


def test_a_log_one_iteration_off_is_refused_in_one_line(tmp_path):
    man = _manifest(tmp_path / "m.parquet", range(0, 20), **MEGATRON_META)
    # iteration numbers shifted by one, consumed samples as the run logged them
    log = _megatron_log(tmp_path / "train.log", range(1, 20), shift=1)
    with pytest.raises(UserError) as err:
        _align(log, man)
    msg = str(err.value)
    assert "\n" not in msg and "train.log:1: step 2 logs consumed samples 4 but its manifest step 1 ends at 8" in msg
    assert "1 batch(es) behind the manifest" in msg
    # the last iteration past the manifest's end: the range check names the off-by-one
    log = _megatron_log(tmp_path / "train2.log", range(1, 21), shift=1, consumed_shift=1)
    with pytest.raises(UserError, match=r"outside the manifest's steps 0\.\.19 .*off by one batch"):
        _align(log, man)


def test_a_manifest_built_one_batch_off_is_refused(tmp_path):
    log = _megatron_log(tmp_path / "train.log", range(1, 21))
    # the manifest of the same data numbered from 1 (the old default) but claiming the batch-index convention
    man = _manifest(tmp_path / "m.parquet", range(1, 21), trainer="megatron", samples_per_step=GBS, first_step=1,
                    samples_before_first_step=0)
    with pytest.raises(UserError, match="consumed samples 4 but its manifest step 0|outside the manifest's steps 1..20"):
        _align(log, man)


def test_step_offset_overrides_and_is_recorded(tmp_path):
    log = _megatron_log(tmp_path / "train.log", range(1, 20), shift=1)
    man = _manifest(tmp_path / "m.parquet", range(0, 20), **MEGATRON_META)
    join = _align(log, man, step_offset=-2)
    assert join.offset == -2 and join.step_offset_given and join.checked
    join = _align(log, man, step_offset=-1)  # what the checks would have refused: accepted, recorded
    assert join.disagreed and "consumed samples" in join.disagreed[0]


def test_a_log_that_does_not_say_its_trainer_needs_one(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text("\n".join(json.dumps({"step": s, "loss": 2.0 + 0.01 * s}) for s in range(1, 21)) + "\n")
    man = _manifest(tmp_path / "m.parquet", range(0, 20), **MEGATRON_META)
    with pytest.raises(UserError, match="a jsonl log does not say how its trainer numbers steps.*--log-trainer"):
        _align(log, man)
    assert _align(log, man, log_trainer="hf").offset == -1
    assert _align(log, tmp_path / "m.parquet", log_trainer="batch-index", allow_missing_steps=True).offset == 0
    with pytest.raises(UserError, match="--log-trainer 'deepspeed': expected one of"):
        _align(log, man, log_trainer="deepspeed")


def test_a_manifest_without_a_convention_joins_the_logs_own_steps(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    log = _megatron_log(tmp_path / "train.log", range(1, 21))
    pq.write_table(pa.table({"step": list(range(1, 21)), "shard": ["t.bin"] * 20, "row_start": [0] * 20,
                             "row_end": [8] * 20}), tmp_path / "hand.parquet")
    join = _align(log, tmp_path / "hand.parquet")
    assert join.offset == 0 and join.manifest_convention is None and join.batch_index(5) is None


def test_skip_list_renders_each_trainers_numbering(tmp_path):
    log = _megatron_log(tmp_path / "train.log", range(1, 21))
    man = _manifest(tmp_path / "m.parquet", range(0, 20), **MEGATRON_META)
    join = _align(log, man)
    v = VERDICTS.from_pylist([{"spike_id": "r/train_loss/12", "run": "r", "peak_step": 12, "verdict": "data",
                               "p_value": 0.01, "effect_size": 9.0, "margin": 3.0, "top_signal": "x", "top_step": 12,
                               "top_shards": ["t.bin"], "n_controls": 50, "n_window_steps": 3, "reason": "r"}])
    out = skip_list(v, ROW_FLAGS.empty(), join)
    assert out["steps_to_skip"] == [12]  # the log's own numbering: Megatron iteration 12
    assert out["batch_indices_to_skip"] == [11]
    assert out["render"]["megatron"]["iterations_to_skip"] == [12]
    assert out["render"]["olmo_core"]["steps_to_skip"] == [12]


def test_run_refuses_an_off_by_one_log_before_any_work(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    np.arange(400, dtype=np.uint16).tofile(tmp_path / "shards" / "t.bin")
    man = _manifest(tmp_path / "m.parquet", range(0, 20), **MEGATRON_META)
    log = _megatron_log(tmp_path / "train.log", range(1, 20), shift=1)
    rc = main(["run", "--log", str(log), "--manifest", str(man), "--shards", str(tmp_path / "shards"),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "consumed samples" in err, err
    assert not (tmp_path / "out").exists()


def test_replay_steps_are_numbered_as_the_log(tmp_path):
    # replay --steps takes the trainer's numbering (like run's --row-losses), converted with the manifest's trainer
    from spike_audit.pipelines.run.replay import ReplayConfig, plan_steps

    man = _manifest(tmp_path / "m.parquet", range(0, 20), **MEGATRON_META)
    steps, _, _, offset = plan_steps(ReplayConfig(model="m", manifest=str(man), shards=".", out="o", steps=[5, 6]))
    assert steps == [5, 6] and offset == -1  # Megatron iterations 5, 6 are batches 4, 5
    hand = _manifest(tmp_path / "h.parquet", range(0, 20))  # no trainer recorded: the manifest's own numbers
    assert plan_steps(ReplayConfig(model="m", manifest=str(hand), shards=".", out="o", steps=[5]))[3] == 0


def test_run_reads_flat_files_with_the_manifests_dtype_and_refuses_another(tmp_path, capsys):
    """uint32 token files (a vocabulary over 65,535): `run` takes the dtype the manifest records, and a --dtype
    that contradicts it is a one-line error before any work (read as uint16 they would be other data)."""
    from spike_audit.pipelines.logs.read import read_log
    from spike_audit.pipelines.run.plan import RunConfig, join_steps

    (tmp_path / "shards").mkdir()
    (np.arange(400, dtype=np.uint32) + 70_000).tofile(tmp_path / "shards" / "t.bin")
    man = _manifest(tmp_path / "m.parquet", range(0, 20), token_dtype="uint32", **MEGATRON_META)
    log = _megatron_log(tmp_path / "train.log", range(1, 21))
    loss, report = read_log(log)
    cfg = RunConfig(log=str(log), manifest=str(man), shards=str(tmp_path / "shards"), out=str(tmp_path / "o"))
    join, dtype = join_steps(cfg, loss, report)
    assert dtype == "uint32" and join.offset == -1
    rc = main(["run", "--log", str(log), "--manifest", str(man), "--shards", str(tmp_path / "shards"),
               "--out", str(tmp_path / "out"), "--dtype", "uint16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "--dtype uint16 but the manifest records token dtype uint32" in err
    assert not (tmp_path / "out").exists()


def test_an_olmo_log_numbered_from_0_against_an_olmo_manifest_is_refused_as_off_by_one(tmp_path):
    """OLMo-core's global_step is 1-based (step 1 trained batch 0). A log whose steps start at 0 (another logger,
    or a manifest built for --first-step 1 by hand) cannot be joined silently: the range check names the shift."""
    def olmo_log(path, steps):
        path.write_text("".join(f"2025-01-01 INFO [step={s}/40,epoch=1]\n    train/CE loss={2.5 + 0.01 * s}\n"
                                f"    optim/total grad norm=1.0\n" for s in steps))
        return path

    meta = dict(trainer="olmo", samples_per_step=GBS, first_step=0, samples_before_first_step=0)
    man = _manifest(tmp_path / "m.parquet", range(0, 40), **meta)
    join = _align(olmo_log(tmp_path / "ok.log", range(1, 41)), man)
    assert join.offset == -1 and join.log_trainer == "olmo" and join.batch_index(1) == 0
    with pytest.raises(UserError) as err:
        _align(olmo_log(tmp_path / "zero.log", range(0, 40)), man)
    msg = str(err.value)
    assert "\n" not in msg and "outside the manifest's steps 0..39" in msg and "off by one batch" in msg, msg


def test_olmo_core_total_tokens_in_a_jsonl_log_pin_each_step_to_its_batch(tmp_path):
    """OLMo-core's metrics (W&B / JSONL) carry ``throughput/total tokens`` (global_train_tokens_seen, exact): after
    step s (1-based) the run has seen s batches of tokens. `run` checks it, so a manifest numbered one batch off
    is refused even when every logged step still maps into the manifest."""
    per = 8 * 64
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"_step": s, "train/CE loss": 2.5 + 0.01 * s, "throughput/total tokens": s * per})
                           + "\n" for s in range(1, 21)))
    meta = dict(trainer="olmo", samples_per_step=8, tokens_per_step=per, first_step=0, samples_before_first_step=0,
                tokens_before_first_step=0)
    man = _manifest(tmp_path / "m.parquet", range(0, 30), **meta)
    join = _align(log, man, log_trainer="olmo")
    assert join.offset == -1 and any("consumed tokens agree at 20 logged steps" in c for c in join.checked)
    off = _manifest(tmp_path / "off.parquet", range(1, 31), **dict(meta, first_step=1))  # built for --first-step 1
    with pytest.raises(UserError) as err:
        _align(log, off, log_trainer="olmo")
    msg = str(err.value)
    assert "\n" not in msg and "outside the manifest's steps 1..30" in msg and "off by one batch" in msg, msg
    # a manifest whose steps still cover the log but whose batches are one off: only the token count can tell
    off2 = _manifest(tmp_path / "off2.parquet", range(0, 30), **dict(meta, tokens_before_first_step=per))
    with pytest.raises(UserError, match=r"consumed tokens 512 but its manifest step 0 ends at 1024 .*1 batch\(es\) "
                                        r"behind"):
        _align(log, off2, log_trainer="olmo")
