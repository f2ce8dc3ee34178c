"""Records on disk are data (pipelines/records.py): exact round trips, hostile files refused with one line, and no
module of the package unpickles anything."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spike_audit.pipelines import records
from spike_audit.pipelines.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

_dtypes = st.sampled_from([np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                           np.uint64, np.float16, np.float32, np.float64]).map(np.dtype)
_arrays = _dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                                     max_side=5)))
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=8), st.binary(max_size=8),
                     _arrays.filter(lambda a: a.ndim == 0).map(lambda a: a[()]))
_trees = st.recursive(st.one_of(_scalars, _arrays), lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.tuples(kids, kids),
    st.dictionaries(st.text(max_size=6), kids, max_size=4),
    st.dictionaries(st.integers(-5, 5), kids, max_size=3)), max_leaves=12)


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return (a != a and b != b) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


@settings(max_examples=150, deadline=None)
@given(st.lists(_trees, max_size=4))
@example([np.frombuffer(b"\x01\x7e", np.float16)[0], np.frombuffer(b"\x01\x00\xc0\x7f", np.float32)[0]])
def test_round_trip_is_exact_in_values_types_and_dtypes(recs):
    # (the example: NaN scalars with payload bits, once stored as their value and read back as the canonical NaN)
    back = records.from_bytes(records.to_bytes(recs, "t"), "part", "t")
    assert len(back) == len(recs) and all(_same(a, b) for a, b in zip(recs, back))


def test_objects_that_are_not_data_are_never_written():
    for bad in ({"f": lambda x: x}, [object()], {"a": np.array([object()], dtype=object)}, {1, 2}):
        with pytest.raises(TypeError):
            records.to_bytes([bad], "t")


def _tamper(recs, **change) -> bytes:
    t = records.encode(recs, "t")
    if "tree" in change:
        t = t.set_column(0, "tree", pa.array([change["tree"]], pa.large_string()))
    if "arrays" in change:
        t = t.set_column(1, "arrays", pa.array([change["arrays"]], t.schema.field("arrays").type))
    if "meta" in change:
        t = t.replace_schema_metadata(change["meta"])
    buf = pa.BufferOutputStream()
    pq.write_table(t, buf)
    return buf.getvalue().to_pybytes()


@pytest.mark.parametrize("data, what", [
    (pickle.dumps([{"shard": "a"}]), "not a readable spike-audit records file"),
    (b"", "not a readable spike-audit records file"),
    (None, "no spike_audit.records in its metadata"),  # a foreign Parquet file
    (_tamper([{"a": 1}], meta={b"spike_audit.records": b"99", b"spike_audit.kind": b"t"}), "format version '99'"),
    (_tamper([{"a": 1}], meta={b"spike_audit.records": b"1", b"spike_audit.kind": b"other"}), "holds 'other'"),
    (_tamper([{"a": np.zeros(2)}], arrays=[{"dtype": "|O8", "shape": [2], "data": b"x" * 16}]), "not an allowed"),
    (_tamper([{"a": np.zeros(2)}], arrays=[{"dtype": "<f8", "shape": [3], "data": b"x" * 16}]), "does not match"),
    (_tamper([{"a": np.zeros(2)}], arrays=[{"dtype": "<f8", "shape": [-2], "data": b""}]), "does not match"),
    (_tamper([{"a": 1}], tree='{"a": {"$a": 5}}'), "row 0: not a valid record"),
    (_tamper([{"a": 1}], tree='{"$x": 1}'), "unknown marker"),
    (_tamper([{"a": 1}], tree='{"a": '), "row 0: not a valid record"),
    (_tamper([{"a": 1}], tree='{"$n": ["|O8", 1]}'), "not an allowed"),
])
def test_foreign_corrupt_or_hostile_parts_are_a_one_line_error(data, what):
    if data is None:
        buf = io.BytesIO()
        pq.write_table(pa.table({"tree": ["{}"]}), buf)
        data = buf.getvalue()
    with pytest.raises(UserError, match=re.escape(what)) as err:
        records.from_bytes(data, "STATE/part-00000.records.parquet", "t")
    assert str(err.value).startswith("STATE/part-00000.records.parquet: ") and "\n" not in str(err.value)


def test_no_module_of_the_package_unpickles_anything():
    """State and staging on disk are data: no pickle/dill/cloudpickle/joblib/torch loads, no allow_pickle."""
    banned = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|cloudpickle|joblib|shelve|marshal)\b"
                        r"|\bpickle\.loads?\(|allow_pickle\s*=\s*True|torch\.load\(|\.load_state_dict\(", re.M)
    hits = []
    for top in ("schemas", "auditors", "pipelines"):
        for path in (ROOT / top).rglob("*.py"):
            for m in banned.finditer(path.read_text()):
                hits.append(f"{path.relative_to(ROOT)}: {m.group(0).strip()}")
    assert not hits, hits


@pytest.mark.parametrize("bits", ["zz", "0100", 7, None, "01"])
def test_nan_bits_that_do_not_fit_their_dtype_are_a_one_line_error(bits):
    import json as _json

    table = records.encode([np.float32("nan")], "t")
    tree = _json.dumps([{"$nb": ["<f4", bits]}][0])
    table = table.set_column(0, "tree", pa.array([tree], pa.large_string()))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    with pytest.raises(UserError, match=r"row 0: not a valid record"):
        records.from_bytes(sink.getvalue().to_pybytes(), "part", "t")
