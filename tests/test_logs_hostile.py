"""Hostile and damaged logs (issue 11): every case is read completely and correctly, or refused with a one-line
UserError naming the file (and line) and what was expected: never a traceback, a hang or a silent partial read."""

from __future__ import annotations

import gzip
import json
import os
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.logs import lines as lines_mod
from spike_audit.pipelines.logs.read import read_log

HSET = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def modded(steps, values, total=100000):
    return [f"step:{s}/{total} train_loss:{v!r} train_time:{s * 3}ms step_avg:3.00ms" for s, v in zip(steps, values)]


def _train(table, metric="train_loss"):
    t = table.filter(pc.equal(table.column("metric"), metric))
    return t.column("step").to_pylist(), t.column("value").to_pylist(), t.column("source_line").to_pylist()


def _finishes(fn, timeout=20.0):
    """Run fn in a thread; fail (not hang) if it does not return. Returns (result, exception)."""
    box = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as err:  # noqa: BLE001 - reported to the test
            box["err"] = err

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    assert not th.is_alive(), "the reader hung"
    return box.get("out"), box.get("err")


STEPS = list(range(0, 500, 5))
VALUES = [3.0 + (i % 7) / 10 for i in range(len(STEPS))]
TEXT = ("\n".join(modded(STEPS, VALUES)) + "\n").encode()


# ------------------------------------------------------------------------------------- compression


def test_multi_frame_zst_reads_every_frame(tmp_path):
    cut = [0, 1000, 2500, len(TEXT)]
    data = b"".join(zstandard.ZstdCompressor().compress(TEXT[a:b]) for a, b in zip(cut, cut[1:]))
    # a skippable frame in between (pzstd and seekable zstd write them) is skipped, not the end
    data = data[:10] + data[10:]
    skippable = struct.pack("<II", 0x184D2A50, 3) + b"abc"
    p = tmp_path / "run.log.zst"
    p.write_bytes(skippable + data + skippable)
    table, rep = read_log(p)
    s, v, _ = _train(table)
    assert s == STEPS and v == VALUES and rep.n_lines == len(STEPS)


def test_multi_member_gzip_reads_every_member(tmp_path):
    p = tmp_path / "run.log.gz"
    p.write_bytes(gzip.compress(TEXT[:1234]) + gzip.compress(TEXT[1234:]))
    s, v, _ = _train(read_log(p)[0])
    assert s == STEPS and v == VALUES


@pytest.mark.parametrize("kind", ["zst", "gz"])
@pytest.mark.parametrize("keep", [0.3, 0.9, -1])
def test_truncated_compressed_log_is_an_error_naming_the_file(tmp_path, kind, keep):
    comp = zstandard.ZstdCompressor().compress(TEXT) if kind == "zst" else gzip.compress(TEXT)
    n = len(comp) - 1 if keep == -1 else int(len(comp) * keep)
    p = tmp_path / f"run.log.{kind}"
    p.write_bytes(comp[:n])
    with pytest.raises(UserError, match=rf"^{p}: truncated {'zstd' if kind == 'zst' else 'gzip'} stream"):
        read_log(p)
    assert main(["spikes", str(p)]) == 2


@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_corrupt_compressed_log_is_an_error_naming_the_file(tmp_path, kind):
    comp = bytearray(zstandard.ZstdCompressor().compress(TEXT) if kind == "zst" else gzip.compress(TEXT))
    for i in range(20, len(comp) - 20, 7):
        comp[i] ^= 0x5A
    p = tmp_path / f"run.log.{kind}"
    p.write_bytes(bytes(comp))
    with pytest.raises(UserError, match=rf"^{p}: (corrupt|truncated) "):
        read_log(p)


def test_gzip_crc_mismatch_is_an_error(tmp_path):
    comp = bytearray(gzip.compress(TEXT))
    comp[-8] ^= 1  # the CRC32 of the trailer
    p = tmp_path / "run.log.gz"
    p.write_bytes(bytes(comp))
    with pytest.raises(UserError, match=rf"^{p}: corrupt gzip stream"):
        read_log(p)


# ------------------------------------------------------------------------------ line endings, encodings


@pytest.mark.parametrize("eol", ["\r", "\r\n", "\n"])
def test_line_endings_split_correctly(tmp_path, eol):
    p = tmp_path / "run.log"
    p.write_bytes((eol.join(modded(STEPS, VALUES)) + eol).encode())
    s, v, lines = _train(read_log(p)[0])
    assert s == STEPS and v == VALUES and lines == list(range(1, len(STEPS) + 1))


def test_crlf_split_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(lines_mod, "CHUNK_BYTES", 7)  # every \r\n pair is cut by some chunk boundary
    p = tmp_path / "run.log"
    p.write_bytes(("\r\n".join(modded(STEPS[:20], VALUES[:20])) + "\r\n").encode())
    table, rep = read_log(p)
    s, v, lines = _train(table)
    assert s == STEPS[:20] and lines == list(range(1, 21)) and rep.n_lines == 20


def test_utf8_bom_keeps_the_first_record(tmp_path):
    for name, body in (("run.log", TEXT), ("run.jsonl", b'{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n'),
                       ("run.csv", b"step,loss\n1,2.5\n2,2.4\n")):
        p = tmp_path / name
        p.write_bytes(b"\xef\xbb\xbf" + body)
        s, v, _ = _train(read_log(p)[0])
        assert s[0] in (0, 1) and len(s) == (len(STEPS) if name == "run.log" else 2)


@pytest.mark.parametrize("enc", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_logs_with_a_bom_are_transcoded(tmp_path, enc):
    p = tmp_path / "run.log"
    bom = {"utf-16": b"", "utf-16-be": b"\xfe\xff", "utf-32": b""}[enc]
    p.write_bytes(bom + TEXT.decode().encode(enc))
    s, v, _ = _train(read_log(p)[0])
    assert s == STEPS and v == VALUES


@pytest.mark.parametrize("fmt,line", [
    ("modded-nanogpt", "step:7/100 train_loss:2.5 train_time:1ms step_avg:1.00ms"),
    ("llmc", "s:7 trl:2.5 lr:0.0006 norm:1.25"),
    ("nanogpt", "iter 7: loss 2.5, time 35.12ms, mfu 12.00%"),
    ("torchtitan", "step:  7  loss:  2.5  grad_norm:  1.25"),
    ("megatron", " iteration        7/  500000 | consumed samples: 14336 | lm loss: 2.500000E+00 | grad norm: 1.250 |"),
    ("jsonl", '{"step": 7, "loss": 2.5}'),
    ("csv", "7,2.5"),
])
def test_non_utf8_bytes_in_any_text_format_are_read_around(tmp_path, fmt, line):
    garbage = b"\xff\xfe\xc3\x28 binary \x80\x81 junk"
    head = b"step,loss\n" if fmt == "csv" else b""
    tail = {"csv": b"8,\xff\n", "jsonl": b'{"step": 8, "note": "\xff\xfe", "loss": 2.4}\n'}.get(fmt, garbage + b"\n")
    p = tmp_path / ("run.csv" if fmt == "csv" else "run.log")
    p.write_bytes(head + line.encode() + b"\n" + tail + line.replace("7", "9", 1).encode() + b"\n")
    table, rep = read_log(p, format=fmt)
    s, v, _ = _train(table)
    assert 7 in s and 9 in s and v[s.index(7)] == 2.5
    if fmt == "jsonl":
        assert 8 in s


# ----------------------------------------------------------------------------------- malformed values


def test_value_cut_mid_number_is_malformed(tmp_path):
    p = tmp_path / "run.log"
    p.write_bytes(TEXT + b"step:500/100000 train_loss:3.1")  # the writer was killed mid-line
    table, rep = read_log(p)
    s, _, _ = _train(table)
    assert 500 not in s and s == STEPS
    assert rep.n_malformed == 1 and rep.malformed_lines == [len(STEPS) + 1]
    with pytest.raises(UserError, match=rf"^{p}:{len(STEPS) + 1}: expected a complete last line, got "
                                        r"'step:500/100000 train_loss:3.1' \(the log ends"):
        read_log(p, strict=True)
    # an unterminated last line that ends after the value is complete: read
    p.write_bytes(TEXT + b"step:500/100000 train_loss:3.1 train_time:1ms step_avg:1.00ms")
    assert _train(read_log(p)[0])[0][-1] == 500


@pytest.mark.parametrize("bad", ["step:-3/100000 train_loss:2.0", "step:abc/100000 train_loss:2.0",
                                 "step:1e3/100000 train_loss:2.0", "step:99999999999999999999/100000 train_loss:2"])
def test_negative_or_non_integer_steps_are_malformed_with_line_numbers(tmp_path, bad):
    lines = modded(STEPS, VALUES)
    lines[10:10] = [bad, bad]
    p = tmp_path / "run.log"
    p.write_text("\n".join(lines) + "\n")
    table, rep = read_log(p)
    s, v, _ = _train(table)
    assert s == STEPS and v == VALUES and rep.n_replaced == 0
    assert rep.n_malformed == 2 and rep.malformed_lines == [11, 12]
    with pytest.raises(UserError, match=rf"^{p}:11: expected 'step:<int>/<int> train_loss:<float>'"):
        read_log(p, strict=True)
    assert main(["spikes", str(p), "--strict"]) == 2


@pytest.mark.parametrize("fmt,bad", [
    ("llmc", "s:-3 trl:2.5 lr:0.0006 norm:1.2"), ("nanogpt", "iter -3: loss 2.5, time 1ms"),
    ("torchtitan", "step: abc  loss: 2.5"), ("megatron", " iteration       -3/  500000 | lm loss: 2.5 |")])
def test_negative_steps_are_malformed_in_other_formats(tmp_path, fmt, bad):
    good = {"llmc": "s:7 trl:2.5 lr:0.0006 norm:1.25", "nanogpt": "iter 7: loss 2.5, time 1ms",
            "torchtitan": "step: 7  loss: 2.5", "megatron": " iteration        7/  500000 | lm loss: 2.5 |"}[fmt]
    p = tmp_path / "run.log"
    p.write_text(good + "\n" + bad + "\n")
    table, rep = read_log(p, format=fmt)
    assert _train(table)[0] == [7] and rep.malformed_lines == [2]


@pytest.mark.parametrize("step", ["1e20", "-1", "1.5", str(2 ** 64), str(10 ** 30), "1e400", "true", '"abc"',
                                  "9007199254740994.0"])
def test_jsonl_out_of_range_steps_are_malformed_never_wrapped(tmp_path, step):
    rows = [f'{{"step": {s}, "loss": {v}}}' for s, v in zip(STEPS, VALUES)]
    rows.insert(30, f'{{"step": {step}, "loss": 9.0}}')
    p = tmp_path / "run.jsonl"
    p.write_text("\n".join(rows) + "\n")
    table, rep = read_log(p)
    s, v, _ = _train(table)
    # earlier values are never discarded as "replaced by a resume"
    assert s == STEPS and v == VALUES and rep.n_replaced == 0
    assert rep.n_malformed == 1 and rep.malformed_lines == [31]
    assert int(pc.min(table.column("step")).as_py()) >= 0
    with pytest.raises(UserError, match=rf"^{p}:31: expected .*step"):
        read_log(p, strict=True)


def test_jsonl_large_numbers(tmp_path):
    p = tmp_path / "run.jsonl"
    p.write_text('{"step": 1, "loss": 2.5}\n'
                 '{"step": 2, "loss": 1e999}\n'  # overflows float64: inf, kept as logged
                 f'{{"step": 3, "loss": {10 ** 400}}}\n'
                 '{"step": ' + "9" * 5000 + ', "loss": 1.0}\n'  # beyond Python's int-parsing limit: malformed
                 f'{{"step": {2 ** 63 - 1}, "loss": 2.0}}\n')
    table, rep = read_log(p)
    s, v, _ = _train(table)
    assert s == [1, 2, 3, 2 ** 63 - 1] and v[:1] == [2.5] and v[1] == v[2] == float("inf")
    assert rep.malformed_lines == [4]


@pytest.mark.parametrize("bad", [b'{"step": 2, "loss": \xff2.5}', b'{"step": 2, "loss": 2\xc3.5}',
                                 b'{"step": \xd9\xa3, "loss": 2.5}', b'{"step": "\xff", "loss": 2.5}',
                                 b'{"step": 2\x80, "loss": 2.5}', '{"step": "\u0663", "loss": 2.5}'.encode()])
def test_jsonl_non_utf8_or_non_ascii_numbers_are_malformed_with_line_numbers(tmp_path, bad, capsys):
    """Invalid UTF-8 inside a number, or digits of another script (Python's int() would take '\u0663' as 3): the
    line is malformed, counted with its number, and --strict names it in one line; never a traceback."""
    p = tmp_path / "run.jsonl"
    p.write_bytes(b'{"step": 1, "loss": 2.5}\n' + bad + b'\n{"step": 3, "loss": 2.4}\n')
    table, rep = read_log(p)
    s, v, _ = _train(table)
    assert s == [1, 3] and v == [2.5, 2.4] and rep.malformed_lines == [2]
    with pytest.raises(UserError, match=rf"^{p}:2: expected"):
        read_log(p, strict=True)
    assert main(["-q", "spikes", str(p), "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and f"{p}:2:" in err, err


def test_jsonl_keys_first_seen_in_a_later_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(lines_mod, "CHUNK_BYTES", 64)
    rows = [json.dumps({"_step": i, "lr": 1e-4}) for i in range(30)]
    rows += [json.dumps({"_step": i, "train/loss": 2.0 + i / 100, "grad_norm": 1.0}) for i in range(30, 60)]
    rows.insert(45, '{"_step": 45.5, "train/loss": NaN}')  # slow path in one chunk, fast in the others
    p = tmp_path / "run.jsonl"
    p.write_text("\n".join(rows) + "\n")
    table, rep = read_log(p)
    s, v, _ = _train(table)
    assert s == list(range(30, 60)) and rep.malformed_lines == [46]
    assert _train(table, "grad_norm")[0] == list(range(30, 60))
    assert rep.n_ignored == 30


def test_csv_out_of_range_steps(tmp_path):
    p = tmp_path / "run.csv"
    p.write_text("step,train/loss\n1,2.5\n1e20,3.0\n-2,3.0\n2,2.4\n")
    table, rep = read_log(p)
    assert _train(table)[0] == [1, 2] and rep.malformed_lines == [3, 4] and rep.n_replaced == 0


def test_golden_values_and_trainer_state_bad_steps(tmp_path):
    p = tmp_path / "golden.json"
    p.write_text(json.dumps({"lm loss": {"start_step": 1, "end_step": 3, "step_interval": 1, "values": {
        "1": 2.5, "-3": 2.0, "1e20": 2.0, str(10 ** 30): 2.0, "2": 10 ** 400}}}))
    table, rep = read_log(p)
    s, v, _ = _train(table)
    assert s == [1, 2] and v == [2.5, float("inf")] and rep.n_malformed == 3
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"log_history": [{"step": 1, "loss": 2.5}, {"step": True, "loss": 2.0},
                                             {"step": -4, "loss": 2.0}, {"step": 2 ** 70, "loss": 2.0},
                                             {"step": 2, "loss": 2.4}]}))
    table, rep = read_log(p)
    assert _train(table)[0] == [1, 2] and rep.n_malformed == 3 and rep.n_replaced == 0


def _crc32c_bitwise(data: bytes) -> int:
    """CRC-32C bit by bit (no table): an implementation independent of the reader's."""
    c = 0xFFFFFFFF
    for x in data:
        c ^= x
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 & -(c & 1))
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    c = _crc32c_bitwise(data)
    return struct.pack("<I", ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF)


def _tb_record(payload: bytes) -> bytes:
    """One TFRecord: length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
    head = struct.pack("<Q", len(payload))
    return head + _masked_crc(head) + payload + _masked_crc(payload)


def _varint(v: int) -> bytes:
    out = b""
    while True:
        b, v = v & 0x7F, v >> 7
        out += bytes([b | (0x80 if v else 0)])
        if not v:
            return out


def _tb_event(step: int, tag: str, value: float, step_wire: int = 0) -> bytes:
    val = b"\x0a" + _varint(len(tag)) + tag.encode() + b"\x15" + struct.pack("<f", value)
    summary = b"\x0a" + _varint(len(val)) + val
    st = (b"\x10" + _varint(step)) if step_wire == 0 else (b"\x12\x01x")
    return st + b"\x2a" + _varint(len(summary)) + summary


def test_tensorboard_negative_steps_and_wrong_wire_types_are_malformed(tmp_path):
    p = tmp_path / "events.out.tfevents.1"
    p.write_bytes(_tb_record(_tb_event(1, "train/loss", 2.5)) + _tb_record(_tb_event(2 ** 64 - 3, "train/loss", 9.0))
                  + _tb_record(_tb_event(3, "train/loss", 9.0, step_wire=2)) + _tb_record(b"\x2a\x05")
                  + _tb_record(b"\x28\x07") + _tb_record(_tb_event(4, "train/loss", 2.25)))
    table, rep = read_log(p)
    assert _train(table)[0] == [1, 4] and rep.n_malformed == 4 and rep.n_replaced == 0


def test_tensorboard_impossible_record_length_is_not_allocated(tmp_path):
    p = tmp_path / "events.out.tfevents.2"
    p.write_bytes(_tb_record(_tb_event(1, "loss", 2.5)) + struct.pack("<Q", 2 ** 62) + b"\0" * 20)
    table, rep = read_log(p)
    assert _train(table)[0] == [1] and rep.n_malformed == 1


# ------------------------------------------------------------------------- non-regular files, limits


def test_fifo_log_is_refused_at_once(tmp_path):
    fifo = tmp_path / "run.log"
    os.mkfifo(fifo)
    _out, err = _finishes(lambda: read_log(fifo))
    assert isinstance(err, UserError) and str(err) == f"{fifo}: not a regular file (a FIFO); expected a log"
    _out, err = _finishes(lambda: read_log(fifo, format="jsonl"))
    assert isinstance(err, UserError) and "not a regular file" in str(err)
    rc, err = _finishes(lambda: main(["spikes", str(fifo)]))
    assert rc == 2 and err is None


@pytest.mark.parametrize("dev", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_devices_are_refused(dev):
    if not os.path.exists(dev):
        pytest.skip(f"no {dev}")
    _out, err = _finishes(lambda: read_log(dev))
    assert isinstance(err, UserError) and "not a regular file (a character device)" in str(err)


def test_socket_is_refused(tmp_path):
    path = tmp_path / "s.log"
    srv = socket.socket(socket.AF_UNIX)
    try:
        srv.bind(str(path))
        _out, err = _finishes(lambda: read_log(path))
        assert isinstance(err, UserError) and "not a regular file (a socket)" in str(err)
    finally:
        srv.close()


def test_tensorboard_directory_skips_non_regular_files(tmp_path):
    d = tmp_path / "tb"
    d.mkdir()
    (d / "events.out.tfevents.1").write_bytes(_tb_record(_tb_event(1, "train/loss", 2.5)))
    os.mkfifo(d / "events.out.tfevents.fifo")
    (out, err) = _finishes(lambda: read_log(d))
    assert err is None and _train(out[0])[0] == [1]


def test_a_line_longer_than_the_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(lines_mod, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(lines_mod, "CHUNK_BYTES", 256)
    p = tmp_path / "run.log"
    p.write_bytes(TEXT + b"x" * 5000)
    with pytest.raises(UserError, match=rf"^{p}:{len(STEPS) + 1}: a line longer than"):
        read_log(p, format="modded-nanogpt")


def test_a_json_document_larger_than_the_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(lines_mod, "MAX_DOCUMENT_BYTES", 100)
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({"log_history": [{"step": i, "loss": 1.0} for i in range(20)]}))
    with pytest.raises(UserError, match=rf"^{p}: larger than"):
        read_log(p, format="hf-trainer-state")


def test_permission_denied_is_a_user_error(tmp_path, monkeypatch):
    p = tmp_path / "run.log"
    p.write_bytes(TEXT)
    real_open = os.open

    def denied(path, *a, **kw):
        if str(path) == str(p):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(UserError, match=rf"^{p}: permission denied$"):
        read_log(p, format="modded-nanogpt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_for_real(tmp_path):
    p = tmp_path / "run.log"
    p.write_bytes(TEXT)
    p.chmod(0)
    with pytest.raises(UserError, match="permission denied"):
        read_log(p)


# ------------------------------------------------------------------ chunked parsing equals a whole parse


def _olmo(steps, values):
    out = []
    for s, v in zip(steps, values):
        out += [f"2025-01-01 INFO [step={s}/100000,epoch=1]", f"    train/CE loss={v!r}", "    train/PPL=12.5"]
    return out


RENDER = {
    "modded-nanogpt": lambda s, v: modded(s, v),
    "olmo": _olmo,
    "jsonl": lambda s, v: [json.dumps({"_step": a, "train/loss": b}) for a, b in zip(s, v)],
    "csv": lambda s, v: ["Step,run - train/loss"] + [f"{a},{b!r}" for a, b in zip(s, v)],
    "megatron": lambda s, v: [f" iteration {a:8d}/  500000 | lm loss: {b:E} | grad norm: 0.5 |" for a, b in zip(s, v)],
}


@pytest.mark.parametrize("fmt", sorted(RENDER))
@HSET
@given(n=st.integers(1, 60), chunk=st.integers(1, 300), eol=st.sampled_from(["\n", "\r\n", "\r"]),
       seed=st.integers(0, 2 ** 16))
def test_tiny_chunks_give_the_same_table(tmp_path, monkeypatch, fmt, n, chunk, eol, seed):
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(10 ** 6, n, replace=False)).tolist()
    values = np.round(rng.uniform(1, 5, n), 4).tolist()
    p = tmp_path / ("run.csv" if fmt == "csv" else "run.jsonl" if fmt == "jsonl" else "run.log")
    p.write_bytes((eol.join(RENDER[fmt](steps, values)) + eol).encode())
    whole, rep_whole = read_log(p, format=fmt)
    monkeypatch.setattr(lines_mod, "CHUNK_BYTES", chunk)
    parts, rep_parts = read_log(p, format=fmt)
    monkeypatch.undo()
    assert parts.equals(whole)
    assert rep_parts.to_dict() == rep_whole.to_dict()
    assert _train(whole)[0] == steps


def test_cli_spikes_errors_are_one_line(tmp_path, capsys):
    p = tmp_path / "run.log.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(TEXT)[:-5])
    assert main(["spikes", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spike-audit spikes: error: ") and str(p) in err[0]


NUL_RENDER = {
    **RENDER,
    "llmc": lambda s, v: [f"s:{a} trl:{b!r} lr:0.0006 norm:1.25" for a, b in zip(s, v)],
    "torchtitan": lambda s, v: [f"step: {a}  loss: {b!r}  grad_norm: 1.25" for a, b in zip(s, v)],
    "nanogpt": lambda s, v: [f"iter {a}: loss {b!r}, time 35.12ms, mfu 12.00%" for a, b in zip(s, v)],
}


@pytest.mark.parametrize("fmt", sorted(set(NUL_RENDER) - {"jsonl", "csv"}))
@pytest.mark.parametrize("start, stop", [(10, 20), (3, 4), (30, 31)])
def test_a_crash_zeroed_block_never_gives_a_step_another_steps_value(tmp_path, fmt, start, stop):
    """A crash leaves zeros where the log's tail was written; the bytes around them join the head of one record to
    the tail of a later one. That line is malformed (reported; --strict refuses the log), never read as the first
    record's step with the later record's values; every other step keeps its own value."""
    steps = list(range(1, 61))
    values = [round(2.0 + s / 1000 + (s % 7) / 100, 6) for s in steps]
    lines = NUL_RENDER[fmt](steps, values)
    data = ("\n".join(lines) + "\n").encode()
    starts = np.cumsum([0] + [len(ln.encode()) + 1 for ln in lines])
    a = int(starts[start] + len(lines[start]) // 2)  # mid record `start` ...
    b = int(starts[stop] + len(lines[stop]) // 2)  # ... to mid record `stop`
    p = tmp_path / "run.log"
    p.write_bytes(data[:a] + b"\x00" * (b - a) + data[b:])
    table, rep = read_log(p, format=fmt)
    truth = dict(zip(steps, values))
    s, v, _ = _train(table)
    assert all(truth[x] == y for x, y in zip(s, v)), "a step got another step's value"
    assert rep.n_malformed >= 1
    assert set(steps) - set(s) <= set(range(steps[0] if fmt != "olmo" else 1, steps[-1] + 1))
    kept = [x for x in steps if x in s]
    assert len(kept) >= len(steps) - (stop - start + 1) - (3 if fmt == "olmo" else 1)
    with pytest.raises(UserError, match=r"run\.log:\d+: expected"):
        read_log(p, format=fmt, strict=True)


@pytest.mark.parametrize("first, second", [("jsonl", "megatron"), ("megatron", "modded-nanogpt"),
                                           ("modded-nanogpt", "jsonl")])
def test_a_log_mixing_two_formats_warns_about_the_ignored_records(tmp_path, caplog, first, second):
    """The format is detected from the log's head; records of a second format further down were ignored as
    unrelated text with only an INFO count. Now a warning (shown at -q) names the other format."""
    steps = list(range(1, 41))
    values = [2.0 + s / 100 for s in steps]
    render = {**NUL_RENDER}
    p = tmp_path / "run.log"
    p.write_text("\n".join(render[first](steps, values) + render[second]([s + 100 for s in steps], values)) + "\n")
    with caplog.at_level("WARNING", logger="spike_audit.pipelines.logs.read"):
        _, rep = read_log(p)
    assert rep.format in (first, second)  # detected from the head: either may win
    other = second if rep.format == first else first
    warned = [r.getMessage() for r in caplog.records if "mixing two formats" in r.getMessage()]
    assert len(warned) == 1 and f"like {other} records" in warned[0], caplog.text
    caplog.clear()
    q = tmp_path / "pure.log"
    q.write_text("\n".join(render[first](steps, values)) + "\n")
    with caplog.at_level("WARNING", logger="spike_audit.pipelines.logs.read"):
        read_log(q)
    assert not [r for r in caplog.records if "mixing two formats" in r.getMessage()]


# ------------------------------------------------------------------------- TensorBoard checksums (session 13)


@HSET
@given(bodies=st.lists(st.binary(min_size=0, max_size=300), max_size=40), seed=st.integers(0, 2 ** 32 - 1))
def test_crc32c_of_many_records_equals_the_bitwise_checksum(bodies, seed):
    from spike_audit.pipelines.logs.tensorboard import crc32c, crc32c_many

    rng = np.random.default_rng(seed)
    long = rng.integers(0, 256, size=int(rng.integers(4097, 5000)), dtype=np.uint8).tobytes()  # one by one

    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    for batch in (bodies, bodies + [long]):
        assert crc32c_many(batch).tolist() == [_crc32c_bitwise(b) for b in batch]


def _tb_log(n=40, spike_at=None):
    return b"".join(_tb_record(_tb_event(i, "train/loss", 3.0 + (2.0 if i == spike_at else 0.0) + 0.01 * (i % 3)))
                    for i in range(n))


def test_tensorboard_record_with_a_flipped_byte_is_malformed_not_a_value(tmp_path):
    """A bit flipped in a float makes a value of 1e10 out of 3.0 (a false spike) unless the record's checksum is
    checked: the record is malformed, every other value is read."""
    data = bytearray(_tb_log())
    rec = len(_tb_record(_tb_event(0, "train/loss", 3.0)))
    data[20 * rec + rec - 6] ^= 0x40  # the float's high byte in record 21 (step 20)
    p = tmp_path / "events.out.tfevents.1"
    p.write_bytes(bytes(data))
    table, rep = read_log(p)
    steps, values, _ = _train(table)
    assert steps == [i for i in range(40) if i != 20] and max(values) < 3.1
    assert rep.n_malformed == 1 and rep.malformed_lines == [21]
    with pytest.raises(UserError, match="record 21"):
        read_log(p, strict=True)


def test_tensorboard_damaged_length_mid_file_is_an_error_naming_the_record(tmp_path, capsys):
    data = bytearray(_tb_log())
    rec = len(_tb_record(_tb_event(0, "train/loss", 3.0)))
    data[10 * rec] ^= 0x10  # record 11's length field: its own checksum no longer matches
    p = tmp_path / "events.out.tfevents.1"
    p.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["spikes", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"record 11 at byte {10 * rec}: damaged TFRecord framing" in err and "10 records before it" in err


def test_tensorboard_zero_filled_tail_ends_the_log(tmp_path):
    """A crash can leave a file's last blocks zero-filled: the values before them are read, the tail is one
    malformed record, not an error."""
    p = tmp_path / "events.out.tfevents.1"
    p.write_bytes(_tb_log() + b"\0" * 4096)
    table, rep = read_log(p)
    assert _train(table)[0] == list(range(40)) and rep.n_malformed == 1
