"""Bounded fuzzing of every input reader (issue 11): mutated bytes of real logs (plain, gzip- or zstd-wrapped, and
mutated after wrapping), random manifests, and random or mutated small shard files (Parquet, JSONL, .npy). The reader
or the command either succeeds or raises UserError (exit 2): never any other exception, never a hang. A fixed
budget (about 30 s); derandomised under CI=true (conftest)."""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.logs.lines import FORMATS
from spike_audit.pipelines.logs.read import read_log
from spike_audit.pipelines.manifest import check_ranges, check_shard_bounds, load_manifest_table
from spike_audit.pipelines.shards.read import open_shard, read_slices, shard_length
from spike_audit.schemas import SchemaError

FIX = Path(__file__).parent / "fixtures" / "logs"
_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


def FUZZ(n: int):
    """A fixed budget of ``n`` examples (derandomised under CI=true by the conftest profile)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=_HEALTH)


def _head(data: bytes, n_lines: int) -> bytes:
    return b"\n".join(data.split(b"\n")[:n_lines]) + b"\n"


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


def _seeds() -> dict[str, bytes]:
    """Small real logs (the first lines of each fixture) and synthetic seeds of the formats without one."""
    out = {}
    for p in sorted((FIX / "modded-nanogpt").glob("*.log.gz"))[:3]:
        out[p.name] = _head(gzip.decompress(p.read_bytes()), 120)
    out["bigscience.log"] = (FIX / "megatron" / "bigscience-chronicles-iterations.log").read_bytes()
    golden = json.loads(gzip.decompress((FIX / "megatron" / "gpt3_15b_8t_release__golden_values_dev_dgx_h100.json.gz")
                                        .read_bytes()))
    spec = golden["lm loss"]
    spec["values"] = dict(list(spec["values"].items())[:60])
    out["golden.json"] = json.dumps({"lm loss": spec}).encode()
    out["wandb.jsonl"] = b"".join(json.dumps({"_step": i, "train/loss": 3 + i / 100, "grad_norm": 1.0}).encode() + b"\n"
                                  for i in range(60))
    out["export.csv"] = b"Step,run - train/loss\n" + b"".join(f"{i},{3 + i / 100}\n".encode() for i in range(60))
    out["olmo.log"] = b"".join(f"INFO [step={i}/100,epoch=1]\n    train/CE loss={3 + i / 50}\n".encode()
                               for i in range(40))
    out["trainer_state.json"] = json.dumps({"log_history": [{"step": i, "loss": 3.0 - i / 100} for i in range(40)]}).encode()
    val = b"\x0a\x0atrain/loss\x15" + struct.pack("<f", 2.5)
    ev = b"\x10\x05\x2a" + bytes([len(val) + 2]) + b"\x0a" + bytes([len(val)]) + val
    out["events.out.tfevents.1"] = b"".join(_tb_record(ev) for _ in range(20))
    return out


SEEDS = _seeds()
NAMES = sorted(SEEDS)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup", "crlf"]))
        n = len(b)
        at = draw(st.integers(0, max(0, n)))
        if op == "flip" and n:
            b[min(at, n - 1)] ^= draw(st.integers(1, 255))
        elif op == "insert":
            b[at:at] = draw(st.binary(min_size=1, max_size=16) | st.sampled_from(
                [b"\r", b"\xef\xbb\xbf", b"\x00", b"\xff\xfe", b"step:-3/9 train_loss:1", b'{"step": 1e20}\n', b"nan",
                 b"9" * 30, b"\n\n", b"{", b"|"]))
        elif op == "delete" and n:
            del b[at:at + draw(st.integers(1, 64))]
        elif op == "truncate":
            del b[at:]
        elif op == "dup" and n:
            b[at:at] = b[max(0, at - 200):at]
        elif op == "crlf":
            b = bytearray(bytes(b).replace(b"\n", draw(st.sampled_from([b"\r", b"\r\n"]))))
    return bytes(b)


@st.composite
def log_case(draw):
    name = draw(st.sampled_from(NAMES))
    data = draw(mutated(SEEDS[name]))
    wrap = draw(st.sampled_from(["", "", "gz", "zst"]))
    if wrap == "gz":
        data = gzip.compress(data)
    elif wrap == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    if wrap and draw(st.booleans()):
        data = draw(mutated(data))  # damage the compressed stream itself
    fmt = draw(st.sampled_from([None, None, None] + [f for f in FORMATS if f != "tensorboard"]))
    return name + ("." + wrap if wrap else ""), data, fmt, draw(st.booleans())


@FUZZ(160)
@given(case=log_case())
def test_fuzzed_logs_are_read_or_refused(tmp_path, case):
    name, data, fmt, strict = case
    path = tmp_path / name
    path.write_bytes(data)
    try:
        table, report = read_log(path, format=fmt, strict=strict,
                                 pattern=r"(?P<step>\d+)\D+(?P<value>[\d.]+)" if fmt == "pattern" else None)
    except UserError as err:
        assert "\n" not in str(err).strip()
        return
    steps = table.column("step").to_numpy()
    assert (steps >= 0).all()
    assert report.n_values == table.num_rows


@FUZZ(12)
@given(case=log_case())
def test_fuzzed_logs_through_the_command_line(tmp_path, case, capsys):
    name, data, _fmt, strict = case
    path = tmp_path / name
    path.write_bytes(data)
    rc = main(["spikes", str(path)] + (["--strict"] if strict else []))
    err = capsys.readouterr().err
    assert rc in (0, 2) and "Traceback" not in err
    if rc == 2:
        assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1


# --------------------------------------------------------------------------------------------- manifests

shard_names = st.one_of(st.sampled_from(["ok.parquet", "ok.jsonl", "ok.npy", "../ok.parquet", "/etc/passwd",
                                         "file:///etc/passwd", "http://127.0.0.1:9/x", "", "sub/../ok.parquet",
                                         "missing.parquet", "ok.parquet\x00", "dir", "s3://b/k"]),
                        st.text(min_size=0, max_size=20))
ints = st.one_of(st.integers(-5, 40), st.sampled_from([0, 2 ** 31, 2 ** 62, -(2 ** 63)]))


@st.composite
def manifest_case(draw):
    n = draw(st.integers(0, 6))
    cols = {"step": [draw(ints) for _ in range(n)], "shard": [draw(shard_names) for _ in range(n)],
            "row_start": [draw(ints) for _ in range(n)], "row_end": [draw(ints) for _ in range(n)],
            "unit": [draw(st.sampled_from(["row", "token", None, "bogus", ""])) for _ in range(n)]}
    drop = draw(st.sets(st.sampled_from(sorted(cols)), max_size=1))
    return {k: v for k, v in cols.items() if k not in drop}, draw(st.booleans())


def _shard_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    if not root.exists():
        root.mkdir()
        (root / "dir").mkdir()
        pq.write_table(pa.table({"tokens": pa.array([[1, 2, 3]] * 30, pa.list_(pa.int64())), "text": ["t"] * 30}),
                       root / "ok.parquet")
        (root / "ok.jsonl").write_text("".join('{"text": "row"}\n' for _ in range(30)))
        np.save(root / "ok.npy", np.arange(300, dtype=np.int32).reshape(30, 10))
    return root


@FUZZ(60)
@given(case=manifest_case(), damage=st.integers(0, 10 ** 6))
def test_fuzzed_manifests_are_read_or_refused(tmp_path, case, damage):
    cols, corrupt = case
    root = _shard_root(tmp_path)
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table(cols) if cols else pa.table({"x": pa.array([], pa.int64())}), path)
    if corrupt:
        b = bytearray(path.read_bytes())
        b[damage % len(b)] ^= 0xA5
        path.write_bytes(bytes(b))
    try:
        table = load_manifest_table(path)
        check_ranges(table, "manifest.parquet")
        check_shard_bounds(table, "manifest.parquet", str(root))
    except (UserError, SchemaError) as err:
        assert "\n" not in str(err).strip()


# ---------------------------------------------------------------------------------------------- shards

token_ids = st.one_of(st.integers(0, 70000), st.integers(-2 ** 63, 2 ** 63 - 1), st.just(None))


@st.composite
def shard_case(draw):
    kind = draw(st.sampled_from(["parquet", "jsonl", "jsonl.gz", "jsonl.zst", "npy"]))
    n = draw(st.integers(0, 12))
    rows = [draw(st.one_of(st.none(), st.lists(token_ids, max_size=6))) for _ in range(n)]
    texts = [draw(st.one_of(st.none(), st.text(max_size=12))) for _ in range(n)]
    buf = io.BytesIO()
    if kind == "parquet":
        cols = {}
        if draw(st.booleans()):
            cols["tokens"] = pa.array([None if r is None else [t for t in r if t is not None] for r in rows],
                                      pa.list_(draw(st.sampled_from([pa.int64(), pa.int32(), pa.uint16()])))) \
                if all(r is None or all(t is None or 0 <= t < 2 ** 15 for t in r) for r in rows) else \
                pa.array([None if r is None else [t for t in r if t is not None] for r in rows], pa.list_(pa.int64()))
        if draw(st.booleans()) or not cols:
            cols["text"] = pa.array(texts, pa.string())
        pq.write_table(pa.table(cols), buf, row_group_size=draw(st.integers(1, 8)),
                       compression=draw(st.sampled_from(["none", "zstd", "snappy"])),
                       write_page_checksum=draw(st.booleans()))
        data = buf.getvalue()
    elif kind.startswith("jsonl"):
        lines = []
        for r, t in zip(rows, texts):
            obj = draw(st.sampled_from([{"tokens": r}, {"text": t}, {"tokens": r, "text": t}, [1, 2], "str", {}]))
            lines.append(json.dumps(obj))
        data = ("\n".join(lines) + ("\n" if draw(st.booleans()) else "")).encode()
        if kind.endswith(".gz"):
            data = gzip.compress(data)
        elif kind.endswith(".zst"):
            data = zstandard.ZstdCompressor().compress(data)
    else:
        dt = draw(st.sampled_from([np.int64, np.int32, np.uint16, np.float32]))
        width = draw(st.integers(1, 5))
        arr = np.asarray(draw(st.lists(st.integers(-3, 70000), min_size=n * width, max_size=n * width))).astype(dt)
        np.save(buf, arr.reshape(n, width) if draw(st.booleans()) else arr)
        data = buf.getvalue()
    if draw(st.booleans()):
        data = draw(mutated(data))
    slices = draw(st.lists(st.tuples(st.integers(-2, 14), st.integers(-2, 16)), max_size=3))
    return kind, data, slices


@FUZZ(140)
@given(case=shard_case())
def test_fuzzed_shards_are_read_or_refused(tmp_path, case):
    kind, data, slices = case
    name = f"s.{kind}"
    (tmp_path / name).write_bytes(data)
    try:
        reader = open_shard(str(tmp_path), name)
        units = reader.units
        getattr(reader, "close", lambda: None)()
        for unit in units:
            n = shard_length(str(tmp_path), name, unit)
            assert n >= 0
            b = read_slices(str(tmp_path), name, [[0, n]] if n < 5000 else [[0, 10]], unit=unit)
            if b.column("tokens").null_count < len(b):
                vals = b.column("tokens").values.to_numpy()
                assert len(vals) == 0 or (vals.min() >= 0)
        for a, z in slices:
            try:
                read_slices(str(tmp_path), name, [[a, z]], unit=units[0])
            except UserError:
                pass
    except UserError as err:
        assert "\n" not in str(err).strip()


# ------------------------------------------------------------------- flat token files, Megatron, MDS

MDS_FIX = Path(__file__).parent / "fixtures" / "mds" / "mixed_zstd"


def _megatron_files(docs, dtype, code) -> tuple[bytes, bytes]:
    """A Megatron .bin/.idx pair (the MMIDIDX layout, written here independently of the reader)."""
    lengths = np.array([len(d) for d in docs], np.int32)
    pointers = (np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * np.dtype(dtype).itemsize
                if len(docs) else np.zeros(0, np.int64))
    body = b"".join(np.asarray(d, dtype).tobytes() for d in docs)
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", len(docs))
           + struct.pack("<Q", len(docs) + 1) + lengths.tobytes() + pointers.tobytes()
           + np.arange(len(docs) + 1, dtype=np.int64).tobytes())
    return body, idx


@st.composite
def flat_case(draw):
    """(files {name: bytes}, shard name, reader kwargs): a raw .bin read with a row definition, a Megatron
    .bin/.idx pair, or an MDS dataset (streaming's own fixture), any of its files mutated."""
    from spike_audit.pipelines.shards.rows import RowDef

    kind = draw(st.sampled_from(["bin", "megatron", "mds"]))
    if kind == "bin":
        dt = draw(st.sampled_from([np.uint16, np.uint32, np.int32]))
        vals = draw(st.lists(st.integers(0, 70000), max_size=60))
        data = draw(mutated(np.asarray(vals).astype(dt).tobytes()))
        rows = draw(st.sampled_from([None, RowDef("windows", draw(st.integers(1, 9))),
                                     RowDef("documents", eos_id=draw(st.integers(0, 3))), RowDef("idx")]))
        return {"t.bin": data}, "t.bin", {"dtype": np.dtype(dt).name if draw(st.booleans()) else None, "rows": rows}
    if kind == "megatron":
        dt, code = draw(st.sampled_from([(np.uint16, 8), (np.int32, 4), (np.int64, 5)]))
        docs = draw(st.lists(st.lists(st.integers(0, 60000), min_size=0, max_size=8), max_size=8))
        body, idx = _megatron_files(docs, dt, code)
        which = draw(st.sampled_from(["idx", "bin", "none"]))
        if which == "idx":
            idx = draw(mutated(idx))
        elif which == "bin":
            body = draw(mutated(body))
        return {"m.bin": body, "m.idx": idx}, draw(st.sampled_from(["m.bin", "m.idx"])), {}
    files = {f"mds/{p.name}": p.read_bytes() for p in sorted(MDS_FIX.iterdir())}
    target = draw(st.sampled_from(sorted(files)))
    if target.endswith(".zstd") and draw(st.booleans()):  # damage inside the compression: the MDS layout itself
        raw = zstandard.ZstdDecompressor().decompress(files[target])
        files[target] = zstandard.ZstdCompressor().compress(draw(mutated(raw)))
    else:
        files[target] = draw(mutated(files[target]))
    col, dtype = draw(st.sampled_from([("tokens", None), ("j", None), ("u", None), ("b", "int64"), ("b", None),
                                       ("text", None)]))
    return files, "mds", {"tokens_col": col, "dtype": dtype}


@FUZZ(90)
@given(case=flat_case(), slices=st.lists(st.tuples(st.integers(-2, 30), st.integers(-2, 40)), max_size=3))
def test_fuzzed_token_files_megatron_and_mds_are_read_or_refused(tmp_path, case, slices):
    files, name, kw = case
    root = tmp_path / "root"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    try:
        reader = open_shard(str(root), name, **kw)
        units = reader.units
        getattr(reader, "close", lambda: None)()
        kw_len = {k: v for k, v in kw.items() if k in ("dtype", "rows")}
        for unit in units:
            n = shard_length(str(root), name, unit, **kw_len)
            assert n >= 0
            b = read_slices(str(root), name, [[0, min(n, 200)]], unit=unit, **kw)
            assert len(b) == (min(n, 200) if unit == "row" else 1)
            if b.column("tokens").null_count < len(b):
                vals = b.column("tokens").values.to_numpy()
                assert len(vals) == 0 or vals.min() >= 0
        for a, z in slices:
            try:
                read_slices(str(root), name, [[a, z]], unit=units[0], **kw)
            except UserError as err:
                assert "\n" not in str(err).strip()
    except UserError as err:
        assert "\n" not in str(err).strip()
