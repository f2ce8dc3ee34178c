"""Hugging Face ``datasets`` shards: ``save_to_disk`` directories and ``*.arrow`` files, memory-mapped."""

from __future__ import annotations

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.shards.base import ShardReader, _TableRowsMixin


class HFReader(_TableRowsMixin, ShardReader):
    fmt = "hf"

    def __init__(self, path, name, tokens_col="tokens", text_col="text"):
        super().__init__(path, name)
        import datasets

        self.tokens_col, self.text_col = tokens_col, text_col
        try:
            if str(path).rstrip("/").lower().endswith(".arrow"):
                ds = datasets.Dataset.from_file(path)
            else:
                ds = datasets.load_from_disk(path)
        except FileNotFoundError as err:
            raise UserError(f"{name}: not a datasets directory or .arrow file ({err})") from None
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
        return self._split(ds[rows.tolist()])
