"""Exact readers for the shard formats trainers read: fetch just the rows (or token ranges) asked for.

Modules: ``read`` (the entry points: format by name, ``open_shard``, ``read_slices``, ``shard_length``), one reader per
format family (``parquet``, ``jsonl``, ``hf``, ``tokens`` for npy / raw bin / Megatron idx), ``rows`` (what a
row of a flat token file is: windows, EOS-delimited documents, Megatron .idx sequences), ``base`` (the reader
interface), ``slices`` (row-slice arithmetic and the output batch), ``paths`` (names and file access).

May import: :mod:`spike_audit.pipelines.errors`, :mod:`spike_audit.pipelines.files`; never Beam, auditors or another
pipelines package.

Formats (chosen by the shard's name; see :func:`read.shard_format`):

===============  ============================================  =====================================
format           files                                         units
===============  ============================================  =====================================
``parquet``      ``*.parquet``, ``*.pq``                       ``row`` (a ``tokens`` list<int> column
                                                               and/or a ``text`` column)
``jsonl``        ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst``  ``row`` = line (0-based)
                 (also ``.json``/``.ndjson`` variants)
``hf``           ``datasets`` ``save_to_disk`` directories     ``row``
                 and ``*.arrow`` files
``npy``          ``*.npy`` with a NumPy header                 1-D: ``token`` (``row`` under a row
                                                               definition); 2-D: ``row`` (and
                                                               ``token`` over the flattened array)
``bin``          raw token memmaps (``*.bin``, header-less     ``token`` (``row`` under a row
                                                               definition, ``rows.RowDef``)
                 ``*.npy`` as written by OLMo / OLMo-core
                 with ``np.memmap``, ``*.u16``...)
``megatron``     ``X.bin`` with ``X.idx`` (``MMIDIDX``)        ``row`` = sequence (document),
                                                               ``token`` = offset into ``X.bin``
===============  ============================================  =====================================

Raw token files default to ``uint16`` (pass ``dtype``); a 256 x int32 header (modded-nanogpt / llm.c:
magic 20240520 version 1 = uint16 GPT-2 tokens; llm.c's magic 20240801 version 7 = uint32 Llama-3
tokens) is detected and skipped, so token offsets count tokens after the 1024-byte header. Megatron ``.bin`` files take their dtype from
the ``.idx``.

I/O: Parquet reads only the row groups holding requested rows (from the footer metadata); memmaps
read only the requested byte ranges (coalesced); Megatron reads the ``.idx`` arrays as memmaps.
JSONL cannot be random-accessed: the file is streamed once per call (decompressing ``.gz``/``.zst``)
and only requested lines are parsed. Paths that are URLs (``gs://``, ``s3://``, ...) go through
``fsspec`` (the matching extra must be installed); local paths are opened directly.

Where a name may point (``paths``): a shard name from a manifest resolves inside the shard root; ``../``, absolute
paths outside it, symlinks out of it and URLs are refused unless the root (a :class:`paths.ShardRoot`, from
``--allow-outside-root`` / ``--allow-urls``) allows them. Local files are regular files only (a FIFO or a device is
refused at once); compressed JSONL is checked whole (a truncated or corrupt stream is an error).

What a read guarantees: a null ``tokens`` value (or a null ``text`` in a text-only shard) is an error naming the
shard and row, never an empty row; every token id is an integer in ``[0, slices.MAX_TOKEN_ID]`` (2^24 - 1), else
an error naming the row; unreadable data (a corrupt Parquet page, invalid JSON, a token list that is not integers)
is a one-line :class:`UserError` naming the shard and the row (or row group).

:func:`read_slices` returns one ``pa.RecordBatch`` with :data:`SLICES_SCHEMA`: ``tokens`` is always
``list<int64>`` (null for shards that only have text), whatever the on-disk dtype, so batches from
different shards concatenate.
"""
