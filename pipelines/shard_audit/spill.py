"""Row keys of the cross-shard near-duplicate join spilled to files, so that the join's memory is one bucket's band
keys and the candidates' sketches, not every row's (a runner that holds a GroupByKey's input in memory, like the
in-process DirectRunner, held every row's 9 band keys and 128-byte sketch).

Each work element of the shard audit writes one key file into the run's staging directory (the place the sink's
parts go, removed with the stage): its LSH band keys and their nodes sorted by band bucket, and its non-empty rows'
nodes and 8-bit sketches. The join then reads, per band bucket, that bucket's slice of every file; finds the band
keys two rows share; and fetches only those rows' sketches, one read of each file that holds one.

A key file is data, never a pickle: ``MAGIC``, the little-endian length of a JSON header, the header (per array: its
numpy dtype string, shape and byte offset), then the arrays' raw bytes. It is read back only by this module, from
files this run wrote.
"""

from __future__ import annotations

import json
import struct

import numpy as np

MAGIC = b"SAKEYS01"
_LEN = struct.Struct("<Q")
_DTYPES = frozenset({"<u8", "<i8", "|u1"})


def key_file_path(spill_dir: str, rec: dict) -> str:
    nodes = rec["nodes"]
    first = int(nodes[0]) if len(nodes) else 0
    return f"{spill_dir}/keys-{first:016x}-{len(nodes):d}.bin"


def write_key_file(rec: dict, spill_dir: str, buckets: int):
    """A work element's row keys (:func:`~spike_audit.pipelines.shard_audit.graph._row_keys`) -> its key file;
    returns ``(path, first node, last node)`` of its non-empty rows (no file and nothing for an element without a
    non-empty row)."""
    from apache_beam.io.filesystems import FileSystems

    from spike_audit.pipelines.beam.scoring import bucket_order

    keys, nodes = rec["bands"], rec["ne_nodes"]
    if not len(nodes):
        return
    sketch = np.ascontiguousarray(rec["sketch"], dtype=np.uint8)
    nodes = np.asarray(nodes, dtype=np.int64)
    if len(nodes) > 1 and (np.diff(nodes) <= 0).any():  # sketches are looked up by binary search on the nodes
        o = np.argsort(nodes, kind="stable")
        keys, nodes, sketch = keys[o], nodes[o], sketch[o]
    flat = keys.ravel()
    owner = np.repeat(nodes, keys.shape[1])
    b = (flat % np.uint64(buckets)).astype(np.int64)
    order = bucket_order(b, buckets)  # the order split_by_bucket gives within a bucket
    off = np.zeros(buckets + 1, dtype=np.int64)
    np.cumsum(np.bincount(b, minlength=buckets), out=off[1:])
    arrays = {"band_off": off, "band_keys": flat[order], "band_nodes": owner[order],
              "nodes": nodes, "sketch": sketch}
    header, pos = {}, 0
    for name, a in arrays.items():
        header[name] = [a.dtype.str, list(a.shape), pos]
        pos += a.nbytes
    h = json.dumps(header, sort_keys=True).encode()
    path = key_file_path(spill_dir, rec)
    with FileSystems.create(path) as f:
        f.write(MAGIC + _LEN.pack(len(h)) + h)
        for a in arrays.values():
            f.write(a.tobytes())
    yield path, int(nodes[0]), int(nodes[-1])


class KeyFile:
    """A key file opened for reading slices of its arrays."""

    def __init__(self, path: str):
        from apache_beam.io.filesystems import FileSystems

        self.path = path
        self.f = FileSystems.open(path)
        head = self.f.read(len(MAGIC) + _LEN.size)
        if head[: len(MAGIC)] != MAGIC:
            raise RuntimeError(f"{path}: not a spike-audit key file")
        n = _LEN.unpack(head[len(MAGIC):])[0]
        self.header = json.loads(self.f.read(n))
        self.base = len(MAGIC) + _LEN.size + n

    def read(self, name: str, lo: int | None = None, hi: int | None = None) -> np.ndarray:
        """Rows ``lo..hi`` of array ``name`` (all of it by default)."""
        dt, shape, off = self.header[name]
        if dt not in _DTYPES:
            raise RuntimeError(f"{self.path}: unexpected dtype {dt!r}")
        dtype = np.dtype(dt)
        row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        lo, hi = (0 if lo is None else int(lo)), (shape[0] if hi is None else int(hi))
        if hi <= lo:
            return np.zeros((0, *shape[1:]), dtype=dtype)
        self.f.seek(self.base + off + lo * row)
        data = self.f.read((hi - lo) * row)
        return np.frombuffer(data, dtype=dtype).reshape(hi - lo, *shape[1:])

    def close(self):
        self.f.close()


def shared_band_keys(keys: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (band key, node) pairs whose band key another pair shares (the LSH candidates)."""
    from spike_audit.auditors.hashing import maybe_repeated

    if len(keys) < 2:
        return keys[:0], nodes[:0]
    c = maybe_repeated(keys.astype(np.uint64, copy=False))  # a superset of the shared keys, in order: only those
    # are sorted
    order = c[np.argsort(keys[c], kind="stable")]
    ks = keys[order]
    dup = np.zeros(len(ks), dtype=bool)
    same = ks[1:] == ks[:-1]
    dup[1:] |= same
    dup[:-1] |= same
    sel = order[dup]
    return keys[sel], nodes[sel]


def band_bucket_candidates(bucket: int, files: list):
    """One band bucket -> its candidates ``(band key, node)`` keyed by the key file holding the node's sketch:
    ``(path, (keys, nodes, band bucket))``. ``files``: every key file's ``(path, first node, last node)``."""
    files = sorted(files, key=lambda f: (f[1], f[0]))
    parts_k, parts_n = [], []
    for path, _, _ in files:
        kf = KeyFile(path)
        try:
            off = kf.read("band_off")
            parts_k.append(kf.read("band_keys", off[bucket], off[bucket + 1]))
            parts_n.append(kf.read("band_nodes", off[bucket], off[bucket + 1]))
        finally:
            kf.close()
    if not parts_k:
        return
    k, n = shared_band_keys(np.concatenate(parts_k), np.concatenate(parts_n))
    if not len(n):
        return
    first = np.array([f[1] for f in files], dtype=np.int64)
    last = np.array([f[2] for f in files], dtype=np.int64)
    fi = np.searchsorted(first, n, side="right") - 1
    if (fi < 0).any() or (n > last[np.maximum(fi, 0)]).any():
        raise RuntimeError("a near-duplicate candidate outside every key file")
    order = np.argsort(fi, kind="stable")
    cuts = np.flatnonzero(np.diff(fi[order])) + 1
    for idx in np.split(order, cuts):
        if len(idx):
            yield files[int(fi[idx[0]])][0], (k[idx], n[idx], np.full(len(idx), bucket, dtype=np.int64))


def attach_file_sketches(kv):
    """One key file's candidates -> per band bucket, ``(band key, node, sketch)`` of the candidates (the sketches
    read from the file)."""
    from spike_audit.pipelines.beam.scoring import concat_parts

    path, parts = kv
    cols = concat_parts(parts)
    if cols is None:
        return
    keys, nodes, bb = cols
    kf = KeyFile(path)
    try:
        hn = kf.read("nodes")
        pos = np.minimum(np.searchsorted(hn, nodes), len(hn) - 1)
        if not (hn[pos] == nodes).all():  # a node whose keys were read but whose sketch was not: a bug, never silent
            raise RuntimeError(f"{int((hn[pos] != nodes).sum())} near-duplicate candidates without a sketch")
        lo, hi = int(pos.min()), int(pos.max()) + 1
        sk = kf.read("sketch", lo, hi)[pos - lo]
    finally:
        kf.close()
    order = np.argsort(bb, kind="stable")
    cuts = np.flatnonzero(np.diff(bb[order])) + 1
    for idx in np.split(order, cuts):
        if len(idx):
            yield int(bb[idx[0]]), (keys[idx], nodes[idx], sk[idx])
