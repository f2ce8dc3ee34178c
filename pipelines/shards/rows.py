"""Row definitions for flat token files (raw ``.bin`` / header-less or 1-D ``.npy`` memmaps), which have no rows
of their own: what ``unit='row'`` means for them.

===============  ===================================================================================
``windows``      fixed windows of ``seq_len`` tokens: row ``i`` = ``tokens[i*L:(i+1)*L]``; the file has
                 ``n // L`` rows and a trailing ``n % L`` tokens that are no row (as OLMo / OLMo-core
                 cut instances out of their token memmaps)
``documents``    EOS-delimited documents: row ``i`` runs from after the ``i-1``-th EOS token up to and
                 including the ``i``-th (the EOS belongs to the document it ends, as tokenizers append
                 it); tokens after the last EOS are one more row (a document without an EOS)
``idx``          the sequences of the Megatron ``X.idx`` next to ``X.bin`` (what megatron-core's
                 ``GPTDataset`` calls documents); a file without one is refused
===============  ===================================================================================

Files with rows of their own keep them: a Megatron ``.bin`` with its ``.idx`` (whatever definition is
asked), Parquet / JSONL / HF / MDS rows, a 2-D ``.npy`` (whose width must equal ``seq_len`` when
``windows`` is asked). A row definition is a small frozen value (picklable, hashable): it travels in
Beam DoFns and is recorded in the outputs (``RowDef.to_meta``) and in a manifest's metadata
(``flat_rows``), where readers take it from and check it against what a user passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from spike_audit.pipelines.errors import UserError

KINDS = ("windows", "documents", "idx")

HOW = ("--seq-len L (fixed windows of L tokens), --rows documents with --eos-id E (EOS-delimited documents) "
       "or --rows idx (the sequences of a Megatron .idx)")


@dataclass(frozen=True)
class RowDef:
    kind: str
    seq_len: int | None = None
    eos_id: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"row definition {self.kind!r} is not known (expected {', '.join(KINDS)})")
        if self.kind == "windows" and (self.seq_len is None or int(self.seq_len) <= 0):
            raise UserError(f"rows as fixed windows need a positive --seq-len (got {self.seq_len})")
        if self.kind == "documents" and (self.eos_id is None or int(self.eos_id) < 0):
            raise UserError("rows as EOS-delimited documents need the EOS token id (--eos-id, or a --tokenizer "
                            "that has one)")

    def describe(self) -> str:
        if self.kind == "windows":
            return f"windows of {self.seq_len} tokens"
        if self.kind == "documents":
            return f"documents ending in EOS id {self.eos_id}"
        return "Megatron .idx sequences"

    def to_meta(self) -> dict:
        out: dict = {"kind": self.kind}
        if self.kind == "windows":
            out["seq_len"] = int(self.seq_len)
        if self.kind == "documents":
            out["eos_id"] = int(self.eos_id)
        return out

    @classmethod
    def from_meta(cls, meta: dict | None, source: str = "manifest") -> "RowDef | None":
        if not meta:
            return None
        if not isinstance(meta, dict) or meta.get("kind") not in KINDS:
            raise UserError(f"{source}: flat_rows metadata {meta!r} is not a row definition (kind one of "
                            f"{', '.join(KINDS)})")
        return cls(meta["kind"], meta.get("seq_len"), meta.get("eos_id"))


def row_def(rows: str | None = None, seq_len: int | None = None, eos_id: int | None = None) -> RowDef | None:
    """The row definition a command's flags state: ``--rows`` when given (``windows`` needs ``--seq-len``,
    ``documents`` an EOS id); else ``windows`` when ``--seq-len`` is given; else none (``--eos-id`` alone is
    a signal setting, never a row definition: documents must be asked for)."""
    if rows:
        return RowDef(rows, seq_len if rows == "windows" else None, eos_id if rows == "documents" else None)
    if seq_len is not None:
        return RowDef("windows", seq_len)
    return None


def agree(given: RowDef | None, recorded: RowDef | None, source: str) -> RowDef | None:
    """The row definition to read with: the one given and the one a manifest records must be the same."""
    if given is not None and recorded is not None and given != recorded:
        raise UserError(f"{source}: the manifest's flat token rows are {recorded.describe()} but the command "
                        f"asks for {given.describe()}: drop the row flags or rebuild the manifest")
    return given if given is not None else recorded

