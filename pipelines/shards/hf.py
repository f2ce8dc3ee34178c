"""Hugging Face ``datasets`` shards: ``save_to_disk`` directories and ``*.arrow`` files, memory-mapped."""

from __future__ import annotations

import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.files import check_regular
from spike_audit.pipelines.shards.base import ShardReader, _TableRowsMixin
from spike_audit.pipelines.shards.paths import is_url


def _check_data_files(path: str, name: str) -> None:
    """The data files a ``save_to_disk`` directory's ``state.json`` names are plain file names inside it (as
    ``datasets`` writes them): a name with a directory part, ``..`` or an absolute path would read a file outside
    the directory the user pointed at, which the fingerprint of the shard does not cover either."""
    import json
    import os

    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        return  # not a dataset directory: datasets' own error says so
    try:
        files = json.loads(open(state, "rb").read()).get("_data_files", [])
        names = [f.get("filename") for f in files]
    except (ValueError, AttributeError, TypeError, OSError):
        return  # a damaged state.json: datasets' own loader names the problem
    for fn in names:
        if not isinstance(fn, str) or not fn or os.path.basename(fn) != fn or fn in (".", "..") or "\x00" in fn:
            raise UserError(f"{name}: state.json names the data file {fn!r}, expected a file name inside the dataset "
                            f"directory (a path out of it is never followed)"[:400])


class HFReader(_TableRowsMixin, ShardReader):
    fmt = "hf"

    def __init__(self, path, name, tokens_col="tokens", text_col="text"):
        super().__init__(path, name)
        import datasets

        self.tokens_col, self.text_col = tokens_col, text_col
        try:
            if str(path).rstrip("/").lower().endswith(".arrow"):
                if not is_url(path):
                    check_regular(path, "shard file")
                ds = datasets.Dataset.from_file(path)
            else:
                if not is_url(path):
                    _check_data_files(path, name)
                ds = datasets.load_from_disk(path)
        except UserError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, pa.ArrowException) as err:
            # (IndexError: datasets' own loader on a directory of no rows)
            msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise UserError(f"{name}: not a readable datasets directory or .arrow file ({msg})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise UserError(f"{name}: is a DatasetDict with splits {sorted(ds)}; point the shard at one split "
                            f"directory, e.g. '{name.rstrip('/')}/{sorted(ds)[0]}'")
        self.ds = ds.with_format("arrow")
        self._valid: set = set()  # (column, record batch) fully validated

    def length(self, unit="row"):
        return len(self.ds)

    def _check_batches(self, rows, cols) -> None:
        """Fully validate (once each) the memory-mapped record batches holding ``rows``, before any is read:
        an ``.arrow`` file is mapped without validation, and a damaged one had offsets pointing outside its
        buffers (an ArrowIndexError traceback at best; reading through them can crash the process)."""
        import numpy as np

        table = self.ds.data.table
        if self.ds._indices is not None:  # a saved selection or shuffle: rows of the file through its indices
            table_rows = self.ds._indices.column(0).combine_chunks().to_numpy()
            rows = table_rows[rows]
        for col in cols:
            chunked = table.column(col)
            ends = np.cumsum([len(c) for c in chunked.chunks])
            for k in np.unique(np.searchsorted(ends, rows, side="right")):
                if (col, int(k)) in self._valid or k >= chunked.num_chunks:
                    continue
                try:
                    chunked.chunk(int(k)).validate(full=True)
                except (pa.ArrowException, ValueError) as err:
                    first = int(ends[k - 1]) if k else 0
                    msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                    raise UserError(f"{self.name}: column {col!r} rows {first}..{int(ends[k]) - 1} of the file are "
                                    f"damaged ({msg})") from None
                self._valid.add((col, int(k)))

    def _schema(self):
        return self.ds.data.schema

    def _read_rows(self, rows):
        cols = self._columns(self.ds.column_names)
        ds = self.ds.select_columns(cols)
        if len(rows) == 0:
            return self._split(ds[:0])
        self._check_batches(rows, cols)
        try:
            table = ds[rows.tolist()]
        except (OSError, ValueError, pa.ArrowException) as err:
            msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise UserError(f"{self.name}: rows unreadable ({msg})") from None
        return self._split(table, rows)
