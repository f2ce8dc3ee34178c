"""Hugging Face ``datasets`` shards: ``save_to_disk`` directories and ``*.arrow`` files, memory-mapped."""

from __future__ import annotations

import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.files import check_regular
from spike_audit.pipelines.shards.base import ShardReader, _TableRowsMixin
from spike_audit.pipelines.shards.paths import is_url


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
                ds = datasets.load_from_disk(path)
        except UserError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException) as err:
            msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise UserError(f"{name}: not a readable datasets directory or .arrow file ({msg})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise UserError(f"{name}: is a DatasetDict with splits {sorted(ds)}; point the shard at one split "
                            f"directory, e.g. '{name.rstrip('/')}/{sorted(ds)[0]}'")
        self.ds = ds.with_format("arrow")

    def length(self, unit="row"):
        return len(self.ds)

    def _read_rows(self, rows):
        cols = self._columns(self.ds.column_names)
        ds = self.ds.select_columns(cols)
        if len(rows) == 0:
            return self._split(ds[:0])
        try:
            table = ds[rows.tolist()]
        except (OSError, ValueError, pa.ArrowException) as err:
            msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise UserError(f"{self.name}: rows unreadable ({msg})") from None
        return self._split(table, rows)
