"""Read audited steps' sequences in batch order, and write them as a replay pack.

:func:`read_step_units` reads the sequences (units of a :class:`~pipelines.row_losses.BatchIndex`) of
one step in batch order: the pieces of a sequence are read with the shard readers (only the rows or
token ranges asked for) and concatenated in ``seq_piece`` order. ``spike-audit replay`` feeds them to
a model; :func:`write_replay_pack` (``spike-audit run --replay-pack DIR``) writes them, for the
window steps of every audited spike and the control steps, as

* ``rows.parquet``: one row per sequence in batch order (``step``, ``role``, ``spike_ids``,
  ``position``, ``shard``, ``row``, ``row_end``, ``unit``, ``n_tokens``, ``token_start``,
  ``token_end``, ``tokens``, ``text``);
* ``tokens.npy``: every sequence's tokens back to back in the same order (``tokens.npy[token_start:
  token_end]`` is a sequence; the smallest unsigned dtype that holds the ids);
* ``README.md``: what is in the pack and how to replay it.

The pack is written one step at a time (memory bounded by one step's tokens) into a staging
directory that replaces ``DIR`` only when complete.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.run.row_losses import BatchIndex

log = logging.getLogger(__name__)

PACK_SCHEMA = pa.schema([
    pa.field("step", pa.int64(), nullable=False),
    pa.field("role", pa.string(), nullable=False),
    pa.field("spike_ids", pa.list_(pa.string())),
    pa.field("position", pa.int64(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("row", pa.int64(), nullable=False),
    pa.field("row_end", pa.int64(), nullable=False),
    pa.field("unit", pa.string(), nullable=False),
    pa.field("n_pieces", pa.int64(), nullable=False),
    pa.field("n_tokens", pa.int64(), nullable=False),
    pa.field("token_start", pa.int64(), nullable=False),
    pa.field("token_end", pa.int64(), nullable=False),
    pa.field("tokens", pa.list_(pa.int64())),
    pa.field("text", pa.string()),
])


def read_step_units(index: BatchIndex, step: int, shard_root: str | None, *, tokens_col: str = "tokens",
                    text_col: str = "text", dtype=None) -> tuple[np.ndarray, pa.Array, pa.Array]:
    """The sequences of ``step`` in batch order: ``(unit ids, tokens list<int64>, text string)``.

    ``tokens`` is null for a sequence whose shard has only text (``text`` then holds it); a
    sequence of several pieces gets its pieces' tokens (and texts) concatenated in order."""
    from spike_audit.pipelines.shards.read import read_slices

    units = index.units_of(step)
    pieces = np.flatnonzero(index.piece_step == step)
    pieces = pieces[np.lexsort((index.piece_order[pieces], index.piece_unit[pieces]))]
    n = len(pieces)
    shards = index.piece_shard.take(pa.array(pieces)).cast(pa.string())
    enc = pc.dictionary_encode(shards)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    names = enc.dictionary.to_pylist()
    kind = index.piece_kind[pieces]
    chunks_tok, chunks_txt, chunks_at = [], [], []
    for c, name in enumerate(names):  # one read per (shard, unit) of this step
        for unit in ("row", "token"):
            sel = np.flatnonzero((codes == c) & (kind == unit))
            if not len(sel):
                continue
            p = pieces[sel]
            slices = np.stack([index.piece_row[p], index.piece_end[p]], axis=1)
            rb = read_slices(shard_root, name, slices, unit=unit, tokens_col=tokens_col, text_col=text_col,
                             dtype=dtype)
            chunks_tok.append(rb.column("tokens"))
            chunks_txt.append(rb.column("text"))
            chunks_at.append(sel)
    if chunks_at:
        at = np.concatenate(chunks_at)
        inv = np.empty(n, np.int64)
        inv[at] = np.arange(n)
        tok = pa.concat_arrays([c.cast(pa.list_(pa.int64())) for c in chunks_tok]).take(pa.array(inv))
        txt = pa.concat_arrays([c.cast(pa.string()) for c in chunks_txt]).take(pa.array(inv))
    else:
        tok, txt = pa.array([], pa.list_(pa.int64())), pa.array([], pa.string())
    pu = index.piece_unit[pieces]
    if len(pu) == len(units) and (n == 0 or np.array_equal(pu, units)):
        return units, tok, txt
    # several pieces per unit: concatenate the pieces' tokens (vectorised) and texts
    bounds = np.r_[0, np.flatnonzero(pu[1:] != pu[:-1]) + 1, n]
    lengths = pc.fill_null(pc.list_value_length(tok), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    per_unit = np.add.reduceat(lengths, bounds[:-1]) if n else np.zeros(0, np.int64)
    offsets = np.r_[0, np.cumsum(per_unit)]
    values = pc.list_flatten(tok)
    tok_valid = np.asarray(tok.is_valid().to_numpy(zero_copy_only=False), bool)
    any_tok = np.logical_or.reduceat(tok_valid, bounds[:-1]) if n else np.zeros(0, bool)
    merged = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32) if offsets[-1] < 2**31 else offsets),
                                      values, mask=pa.array(~any_tok))
    txt_py = txt.to_pylist()
    merged_txt = pa.array([None if all(t is None for t in txt_py[a:b]) else "".join(t or "" for t in txt_py[a:b])
                           for a, b in zip(bounds[:-1], bounds[1:])], pa.string())  # per unit, small
    return pu[bounds[:-1]], merged.cast(pa.list_(pa.int64())), merged_txt


def _pack_readme(n_steps: int, n_rows: int, n_tokens: int, dtype: str, known_positions: bool, windows: dict,
                 controls: list[int]) -> str:
    spikes = "\n".join(f"* `{sid}`: window steps {', '.join(map(str, w))}" for sid, w in sorted(windows.items()))
    pos = ("`position` is the sequence's position in the step's global batch (the manifest's `batch_pos`)."
           if known_positions else
           "The manifest records no batch positions: `position` is the order in which the manifest lists the "
           "step's sequences, which may differ from the order your trainer batched them.")
    return f"""# spike-audit replay pack

The sequences {n_steps} steps of a training run consumed ({n_rows} sequences, {n_tokens} tokens): the
window steps of each audited spike and the control steps (normal steps drawn away from every spike),
in batch order, so any trainer can recompute their per-row losses from its own checkpoint.

{spikes}
* controls: {len(controls)} steps

## Files

* `rows.parquet`: one row per sequence, sorted by `step` then `position`: `role` (`window` or
  `control`), `spike_ids`, `position`, where it came from (`shard`, `row`, `row_end`, `unit` as in
  the step manifest; the first piece when a sequence spans several slices), `n_tokens`, `tokens`
  (null for text-only shards: `text` holds the text), and `token_start`/`token_end` into
  `tokens.npy`.
* `tokens.npy`: all sequences' tokens back to back (`{dtype}`), in the order of `rows.parquet`.

{pos}

## Replaying

1. Load the checkpoint saved before the spike (the same one for every step: then the control steps
   are the baseline the window is compared with).
2. For every row of `rows.parquet`, compute the sequence's mean next-token loss, exactly as the
   trainer does (`tokens[:-1]` predict `tokens[1:]`), e.g. with PyTorch:

       import numpy as np, pyarrow.parquet as pq, torch
       rows = pq.read_table("rows.parquet").to_pylist()
       toks = np.load("tokens.npy", mmap_mode="r")
       for r in rows:
           ids = torch.as_tensor(np.asarray(toks[r["token_start"]:r["token_end"]], dtype=np.int64))[None]
           loss = model(input_ids=ids, labels=ids).loss.item()

3. Write the losses as Parquet or JSONL with columns `step`, `position`, `loss` (or `step`, `shard`,
   `row`, `loss`) and give them to `spike-audit run ... --row-losses FILE`. A Hugging Face causal-LM
   checkpoint can do steps 1-3 in one command: `spike-audit replay --model DIR ...`.
"""


def write_replay_pack(dest: str, index: BatchIndex, shard_root: str | None, windows: dict[str, list[int]],
                      controls: list[int], *, tokens_col: str = "tokens", text_col: str = "text", dtype=None) -> dict:
    """Write the replay pack of ``windows`` (spike id -> window steps) and ``controls`` into
    ``dest`` (replaced atomically). Returns a summary."""
    import pyarrow.parquet as pq

    from spike_audit.pipelines.io import write_text
    from spike_audit.pipelines.outdir import OutDir

    spikes_of: dict[int, list[str]] = {}
    for sid, w in windows.items():
        for s in w:
            spikes_of.setdefault(int(s), []).append(sid)
    ctrl = set(int(c) for c in controls)
    steps = sorted(set(spikes_of) | ctrl)
    have = set(np.unique(index.step).tolist())
    steps = [s for s in steps if s in have]
    t0 = time.time()
    n_rows = n_tokens = 0
    max_id = 0
    with OutDir(dest, "replay-pack", flag="--replay-pack") as pack:  # checked, locked, one atomic swap
        stage = pack.stage() / "files"
        stage.mkdir()
        raw_path = stage / ".tokens.int64"
        writer = pq.ParquetWriter(stage / "rows.parquet", PACK_SCHEMA, compression="zstd")
        try:
            with open(raw_path, "wb") as raw:
                for k, step in enumerate(steps):
                    units, tok, txt = read_step_units(index, step, shard_root, tokens_col=tokens_col,
                                                      text_col=text_col, dtype=dtype)
                    lengths = pc.fill_null(pc.list_value_length(tok), 0).to_numpy(zero_copy_only=False).astype(np.int64)
                    values = np.asarray(pc.list_flatten(tok).to_numpy(zero_copy_only=False), np.int64)
                    if len(values):
                        max_id = max(max_id, int(values.max()))
                        if values.min() < 0:
                            raise UserError(f"step {step}: negative token id {values.min()} in the data")
                    raw.write(values.tobytes())
                    starts = n_tokens + np.r_[0, np.cumsum(lengths)[:-1]]
                    first = _first_pieces(index, units)
                    n = len(units)
                    role = "window" if step in spikes_of else "control"
                    sids = sorted(spikes_of.get(step, []))
                    n_pieces = np.bincount(index.piece_unit[index.piece_step == step] - (units[0] if n else 0),
                                           minlength=n) if n else np.zeros(0, np.int64)
                    batch = pa.record_batch([
                        pa.array(np.full(n, step, np.int64)), pa.array([role] * n, pa.string()),
                        pa.array([sids] * n, pa.list_(pa.string())), pa.array(index.position[units]),
                        index.piece_shard.take(pa.array(first)).cast(pa.string()),
                        pa.array(index.piece_row[first]), pa.array(index.piece_end[first]),
                        pa.array(index.piece_kind[first].tolist(), pa.string()),
                        pa.array(n_pieces.astype(np.int64)), pa.array(lengths), pa.array(starts),
                        pa.array(starts + lengths), tok, txt], schema=PACK_SCHEMA)
                    writer.write_batch(batch)
                    n_rows += n
                    n_tokens += int(lengths.sum())
                    if (k + 1) % 10 == 0 or k + 1 == len(steps):
                        log.info("replay pack: %d/%d steps, %d sequences, %d tokens (%.1f s)", k + 1, len(steps),
                                 n_rows, n_tokens, time.time() - t0)
        finally:
            writer.close()
        dt = np.uint16 if max_id < 2**16 else np.uint32 if max_id < 2**32 else np.int64
        flat = np.lib.format.open_memmap(stage / "tokens.npy", mode="w+", dtype=dt, shape=(n_tokens,))
        src = np.memmap(raw_path, dtype=np.int64, mode="r") if n_tokens else np.zeros(0, np.int64)
        for a in range(0, n_tokens, 1 << 24):  # bounded copy
            flat[a:a + (1 << 24)] = src[a:a + (1 << 24)]
        flat.flush()
        del flat, src
        raw_path.unlink()
        write_text(_pack_readme(len(steps), n_rows, n_tokens, np.dtype(dt).name, index.known_positions, windows,
                                sorted(ctrl & set(steps))), stage / "README.md")
        pack.publish(stage)
    return {"dir": str(Path(dest)), "steps": len(steps), "sequences": n_rows, "tokens": n_tokens,
            "dtype": np.dtype(dt).name}


def _first_pieces(index: BatchIndex, units: np.ndarray) -> np.ndarray:
    """Index of the first piece (in seq_piece order) of each unit."""
    if not len(units):
        return np.zeros(0, np.int64)
    sel = np.flatnonzero((index.piece_unit >= units[0]) & (index.piece_unit <= units[-1]))
    sel = sel[np.lexsort((index.piece_order[sel], index.piece_unit[sel]))]
    pu = index.piece_unit[sel]
    starts = np.r_[0, np.flatnonzero(pu[1:] != pu[:-1]) + 1]
    first = np.full(len(units), -1, np.int64)
    first[pu[starts] - units[0]] = sel[starts]
    return first


def write_plan_pack(cfg, plan) -> dict:
    """``run --replay-pack DIR``: the pack of the plan's window and control steps."""
    from spike_audit.pipelines.run.plan import read_manifest_steps

    steps = sorted(set(plan.spikes_of) | set(plan.controls))
    man = read_manifest_steps(cfg.manifest, steps, getattr(plan, "offset", 0))
    index = BatchIndex.from_manifest(man, cfg.manifest)
    info = write_replay_pack(cfg.replay_pack, index, cfg.shards, plan.windows, plan.controls,
                             tokens_col=cfg.tokens_col, text_col=cfg.text_col)
    log.info("replay pack %s: %d steps, %d sequences, %d tokens (%s)", info["dir"], info["steps"],
             info["sequences"], info["tokens"], info["dtype"])
    return info
