"""Parquet shards: only the row groups holding the requested rows are read (from the footer metadata)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError, reason
from spike_audit.pipelines.shards.base import ShardReader, _TableRowsMixin
from spike_audit.pipelines.shards.paths import _open, is_url


class ParquetReader(_TableRowsMixin, ShardReader):
    fmt = "parquet"

    def __init__(self, path, name, tokens_col="tokens", text_col="text"):
        super().__init__(path, name)
        import pyarrow.parquet as pq

        self.tokens_col, self.text_col = tokens_col, text_col
        self._group = None  # (row group, columns) and its table: the last whole group read (_read_group)
        # _open: a regular local file (a FIFO or an unreadable file is a one-line error) or a URL; local files are
        # then read natively by path.
        self._file = _open(path)
        if not is_url(path):
            self._file.close()
            self._file = None
        try:
            # page checksums, where the writer stored them, are verified: a corrupt page is an error, not data
            self.pf = pq.ParquetFile(self._file if self._file is not None else path, page_checksum_verification=True)
            self.pf.schema_arrow.names  # a corrupt footer can hold names that are not UTF-8
        except (pa.ArrowException, OSError, ValueError) as err:
            self.close()
            raise UserError(f"{name}: not a readable Parquet file ({_first_line(err)})") from None
        md = self.pf.metadata
        counts = np.array([md.row_group(i).num_rows for i in range(md.num_row_groups)], np.int64)
        if len(counts) and counts.min() < 0:
            self.close()
            raise UserError(f"{name}: not a readable Parquet file (corrupt footer: row group "
                            f"{int(np.argmin(counts))} has {int(counts.min())} rows)")
        self.rg_start = np.concatenate([[0], np.cumsum(counts)])

    def length(self, unit="row"):
        return int(self.rg_start[-1])

    def _schema(self):
        return self.pf.schema_arrow

    def _read_rows(self, rows):
        cols = self._columns(self.pf.schema_arrow.names)
        if len(rows) == 0:
            return self._split(self.pf.schema_arrow.empty_table().select(cols))
        rg = np.searchsorted(self.rg_start, rows, side="right") - 1
        # One row group at a time (the I/O unit): read it, keep only the requested rows. Reading
        # groups one by one bounds memory to one group and is faster than read_row_groups + take.
        order = np.argsort(rg, kind="stable")
        rg_sorted = rg[order]
        cuts = np.flatnonzero(np.diff(rg_sorted)) + 1
        pieces = []
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(order)]])):
            g = int(rg_sorted[lo])
            local = rows[order[lo:hi]] - self.rg_start[g]
            try:
                group = self._read_group(g, int(local.max()) + 1, cols)
            except (pa.ArrowException, OSError, ValueError) as err:
                raise UserError(f"{self.name}: row group {g} (rows {int(self.rg_start[g])}.."
                                f"{int(self.rg_start[g + 1]) - 1}) is unreadable: corrupt Parquet data "
                                f"({_first_line(err)})") from None
            if len(local) and local[-1] - local[0] == len(local) - 1 and (np.diff(local) == 1).all():
                pieces.append(group.slice(int(local[0]), len(local)))  # a run of rows (a chunk): no gather
            else:
                pieces.append(group.take(pa.array(local)))
        table = pa.concat_tables(pieces).combine_chunks()
        if (np.diff(order) == 1).all():  # the rows were asked in file order: already in place
            return self._split(table, rows)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return self._split(table.take(pa.array(inverse)), rows)

    def _read_group(self, g: int, upto: int, cols) -> pa.Table:
        """Row group ``g``, or only its first ``upto`` rows when they are a small part of it (a probe of the first
        row, a few rows of a manifest slice): the pages after them are then neither read nor decoded."""
        n = int(self.rg_start[g + 1] - self.rg_start[g])
        if upto * 4 > n:
            # the last whole group read is kept (one group per open reader, the bound it already had): a shard's
            # consecutive row chunks inside one group decode it once, not once per chunk
            key = (g, tuple(cols))
            if self._group is None or self._group[0] != key:
                self._group = None  # the previous group is released before the next one is decoded
                self._group = key, self.pf.read_row_group(g, columns=cols)
            return self._group[1]
        batch = next(self.pf.iter_batches(batch_size=upto, row_groups=[g], columns=cols, use_threads=False))
        return pa.Table.from_batches([batch])

    def close(self):
        self._group = None
        if self._file is not None:
            self._file.close()


def _first_line(err: Exception) -> str:
    return reason(err)
