"""``spike-audit replay``: per-row losses of the audited batches, recomputed by a local checkpoint.

Loads a Hugging Face causal-LM checkpoint directory (``config.json`` + weights) with no network
(``local_files_only``, ``HF_HUB_OFFLINE=1``), reads the sequences of the chosen steps through the
manifest in batch order (:func:`pipelines.replay_pack.read_step_units`), and computes each
sequence's mean next-token loss: tokens ``[:-1]`` predict ``[1:]``, the loss a causal-LM's
``model(input_ids, labels=input_ids)`` reports for the sequence alone. Sequences are batched
(right-padded, masked), the log-softmax is taken in float32 whatever the model's dtype. Sequences
of fewer than 2 tokens get a NaN loss. Text-only shards are tokenized with the checkpoint's
tokenizer (or ``--tokenizer``), without special tokens.

The steps are the ones ``spike-audit run`` audits (each spike's window and the control steps, from
the same log, manifest and options) or an explicit ``--steps`` list. The output is the
``row_losses`` table that ``run --row-losses`` reads (Parquet, or JSONL when the name ends in
``.jsonl``). Needs the optional ``replay`` extra (torch and transformers).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spike_audit.pipelines.errors import UserError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _need_torch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise UserError(f"spike-audit replay needs torch and transformers ({err.name} is not installed): "
                        f"pip install 'spike-audit[replay]'") from None


def load_model(model_dir: str, dtype: str = "float32", device: str = "cpu"):
    """The causal LM in ``model_dir`` (local only), in eval mode on ``device``."""
    _need_torch()
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress goes through our logging
    if not os.path.isdir(model_dir) or not os.path.exists(os.path.join(model_dir, "config.json")):
        raise UserError(f"{model_dir}: not a local checkpoint directory (expected config.json and the weights "
                        f"saved by save_pretrained)")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                     dtype=getattr(torch, dtype))
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir}: cannot load a causal LM ({str(err).splitlines()[0]})") from None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"--device {device}: {str(err).splitlines()[0]}") from None
    model.eval()
    return model


def _context(model) -> int | None:
    cfg = model.config
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def sequence_losses(model, sequences: list[np.ndarray], batch_size: int = 8, device: str = "cpu"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Mean next-token loss (nats) and predicted-token count of every sequence (1-D int arrays)."""
    import torch

    n = len(sequences)
    loss = np.full(n, np.nan)
    count = np.zeros(n, np.int64)
    lengths = np.array([len(s) for s in sequences], np.int64)
    # batch sequences of similar length together (less padding); results go back to their slots
    order = np.argsort(-lengths, kind="stable")
    with torch.inference_mode():
        for a in range(0, n, batch_size):
            idx = order[a:a + batch_size]
            idx = idx[lengths[idx] >= 2]
            if not len(idx):
                continue
            T = int(lengths[idx].max())
            ids = np.zeros((len(idx), T), np.int64)
            mask = np.zeros((len(idx), T), np.int64)
            for r, i in enumerate(idx):  # a loop over the sequences of one model batch
                ids[r, : lengths[i]] = sequences[i]
                mask[r, : lengths[i]] = 1
            x = torch.from_numpy(ids).to(device)
            m = torch.from_numpy(mask).to(device)
            logits = model(input_ids=x, attention_mask=m).logits
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)
            valid = m[:, 1:].to(nll.dtype)
            per = (nll * valid).sum(1) / valid.sum(1)
            loss[idx] = per.double().cpu().numpy()
            count[idx] = lengths[idx] - 1
    return loss, count


@dataclass
class ReplayConfig:
    model: str
    manifest: str
    shards: str
    out: str
    steps: list[int] | None = None
    log: str | None = None
    log_format: str | None = None
    metric: str = "train_loss"
    method: str = "robust"
    lookback: int = 2
    n_controls: int = 100
    guard: int = 20
    seed: int = 0
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    max_length: int | None = None
    tokens_col: str = "tokens"
    text_col: str = "text"
    tokenizer: str | None = None
    token_dtype: str | None = None
    allow_missing_steps: bool = False
    log_trainer: str | None = None  # whose step numbering the log uses when its format does not say
    step_offset: int | None = None  # manifest step = log step + step_offset (overrides the convention)


def plan_steps(cfg: ReplayConfig) -> tuple[list[int], dict[str, list[int]], list[int], int]:
    """(steps, windows, controls, offset): the steps ``run`` would audit, or ``cfg.steps``, numbered as the
    trainer's log numbers them (the manifest's step being ``step + offset``), so the per-row losses written
    join ``run --row-losses`` on the same steps. ``cfg.steps`` are converted with the trainer the manifest
    records (none recorded: the manifest's own numbers)."""
    if cfg.steps is not None:
        from spike_audit.pipelines.manifest import read_meta
        from spike_audit.schemas.steps import STEP_CONVENTION, step_base

        meta = read_meta(cfg.manifest)
        base = step_base(meta.get("trainer")) if meta.get("step_convention") == STEP_CONVENTION else None
        offset = cfg.step_offset if cfg.step_offset is not None else -(base or 0)
        return sorted(set(cfg.steps)), {}, [], offset
    if not cfg.log:
        raise UserError("give --log (replay the steps `run` audits) or --steps")
    from spike_audit.pipelines.run.plan import RunConfig, join_steps, plan_audit, read_loss_and_spikes

    rc = RunConfig(log=cfg.log, manifest=cfg.manifest, shards=cfg.shards, out=cfg.out, log_format=cfg.log_format,
                   metric=cfg.metric, method=cfg.method, lookback=cfg.lookback, n_controls=cfg.n_controls,
                   guard=cfg.guard, seed=cfg.seed, tokens_col=cfg.tokens_col, text_col=cfg.text_col,
                   allow_missing_steps=cfg.allow_missing_steps, log_trainer=cfg.log_trainer,
                   step_offset=cfg.step_offset)
    loss, report, spikes = read_loss_and_spikes(rc)
    join, _ = join_steps(rc, loss, report)
    plan = plan_audit(rc, loss, spikes, offset=join.offset)
    steps = sorted(set(plan.spikes_of) | set(plan.controls))
    return steps, plan.windows, plan.controls, join.offset


class _Encoder:
    """Tokenizes text-only sequences with the checkpoint's tokenizer (or a tokenizer.json)."""

    def __init__(self, model_dir: str, tokenizer: str | None):
        self.model_dir, self.path, self._tok = model_dir, tokenizer, None

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if self._tok is None:
            if self.path:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(self.path)
                self._tok = lambda ts: [np.asarray(e.ids, np.int64) for e in tok.encode_batch(ts,
                                                                                          add_special_tokens=False)]
            else:
                from transformers import AutoTokenizer

                try:
                    tok = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
                except (OSError, ValueError):
                    raise UserError(f"{self.model_dir}: the shards hold text only and the checkpoint has no "
                                    f"tokenizer: give --tokenizer tokenizer.json") from None
                self._tok = lambda ts: [np.asarray(i, np.int64) for i in
                                        tok(ts, add_special_tokens=False)["input_ids"]]
        return self._tok(texts)


def _check_out(cfg: ReplayConfig) -> None:
    """--out never replaces an input (model, manifest, shards, log, tokenizer) or a file that is not per-row
    losses written before (Parquet with the row_losses contract; JSONL whose first record has step and loss)."""
    import json
    import os

    from spike_audit.pipelines.outdir import check_apart, check_file_output

    inputs = [("model", cfg.model), ("manifest", cfg.manifest), ("shard root", cfg.shards), ("log", cfg.log),
              ("tokenizer", cfg.tokenizer)]
    out = str(cfg.out)
    if not out.lower().endswith((".parquet", ".jsonl", ".ndjson")):
        raise UserError(f"--out {out}: expected a .parquet or .jsonl path (the per-row loss table that "
                        "spike-audit run --row-losses reads, which it tells apart by the suffix)")
    if not out.lower().endswith((".jsonl", ".ndjson")):
        check_file_output(out, inputs, "row_losses")
        return
    check_file_output(out, inputs, "row_losses") if "://" in out or os.path.isdir(out) else check_apart(out, inputs)
    if os.path.lexists(out):
        try:
            with open(out, encoding="utf-8") as f:
                first = json.loads(f.readline() or "{}")
        except (OSError, ValueError):
            first = None
        if not (isinstance(first, dict) and {"step", "loss"} <= first.keys()):
            raise UserError(f"{out}: --out exists and is not a per-row losses JSONL file; refusing to replace it "
                            "(remove it or choose another path)")


def run_replay(cfg: ReplayConfig) -> dict:
    """Compute and write the per-row losses of the planned steps. Returns a summary."""
    from spike_audit.pipelines.io import write_table, write_text
    from spike_audit.pipelines.run.replay_pack import read_step_units
    from spike_audit.pipelines.run.row_losses import BatchIndex, losses_table
    from spike_audit.pipelines.run.plan import read_manifest_steps
    from spike_audit.schemas import ROW_LOSSES

    if cfg.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.max_length is not None and cfg.max_length <= 0:
        raise UserError(f"--max-length must be positive, got {cfg.max_length}")
    if cfg.token_dtype is not None:
        from spike_audit.pipelines.settings import is_integer_dtype

        if not is_integer_dtype(cfg.token_dtype):
            raise UserError(f"--token-dtype must be an integer token dtype (uint16, uint32, int32, ...), got "
                            f"{cfg.token_dtype!r}")
    from dataclasses import replace

    from spike_audit.pipelines.settings import check_values

    check_values(replace(cfg, dtype=None))  # --seed -1, a huge --step-offset, --controls -1 (as for run; the
    # dtype here is the model's, not a token dtype)
    _check_out(cfg)  # before the model is loaded
    t0 = time.time()
    steps, windows, controls, offset = plan_steps(cfg)
    if not steps:
        raise UserError("nothing to replay: no spike windows or control steps were found")
    man = read_manifest_steps(cfg.manifest, steps, offset)
    index = BatchIndex.from_manifest(man, cfg.manifest)
    have = set(np.unique(index.step).tolist())
    absent = [s for s in steps if s not in have]
    if absent and cfg.steps is not None:
        raise UserError(f"{cfg.manifest}: no rows for step {absent[0]}"
                        + (f" (and {len(absent) - 1} more of the {len(steps)} steps asked for)" if len(absent) > 1 else ""))
    steps = [s for s in steps if s in have]
    model = load_model(cfg.model, cfg.dtype, cfg.device)
    ctx = _context(model)
    vocab = getattr(model.config, "vocab_size", None)
    encode = _Encoder(cfg.model, cfg.tokenizer)
    loss = np.full(index.n_units, np.nan)
    ntok = np.zeros(index.n_units, np.int64)
    log.info("replay: %d steps (%d sequences) through %s on %s (%s)", len(steps), index.n_units, cfg.model,
             cfg.device, cfg.dtype)
    n_done = 0
    for k, step in enumerate(steps):
        units, tok, txt = read_step_units(index, step, cfg.shards, tokens_col=cfg.tokens_col, text_col=cfg.text_col,
                                          dtype=cfg.token_dtype)
        seqs = _sequences(tok, txt, encode)
        limit = cfg.max_length or ctx
        for j, s in enumerate(seqs):  # checks per sequence of one step (bounded), before the model runs
            if cfg.max_length and len(s) > cfg.max_length:
                seqs[j] = s[: cfg.max_length]
            elif limit and len(s) > limit:
                raise UserError(f"step {step} position {index.position[units[j]]}: a sequence of {len(s)} tokens is "
                                f"longer than the model's context ({limit}); give --max-length to truncate")
            if vocab and len(s) and (s.max() >= vocab or s.min() < 0):
                raise UserError(f"step {step} position {index.position[units[j]]}: token id {int(s.max())} is outside "
                                f"the model's vocabulary ({vocab}): is this the tokenizer the run used?")
        ts = time.time()
        loss[units], ntok[units] = sequence_losses(model, seqs, cfg.batch_size, cfg.device)
        n_done += len(units)
        log.info("replay: step %d (%d/%d): %d sequences, mean loss %.4f, %.1f s", step, k + 1, len(steps),
                 len(units), float(np.nanmean(loss[units])) if np.isfinite(loss[units]).any() else float("nan"),
                 time.time() - ts)
    done = np.isin(index.step, np.asarray(steps, np.int64))
    table = losses_table(index, loss, ntok, units=np.flatnonzero(done))
    out = str(cfg.out)
    if out.lower().endswith((".jsonl", ".ndjson")):
        import json

        recs = table.to_pylist()
        write_text("".join(json.dumps({k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                                       for k, v in r.items() if v is not None}) + "\n" for r in recs), out)
    else:
        write_table(table, out, ROW_LOSSES)
    return {"out": out, "steps": len(steps), "sequences": n_done, "windows": windows, "controls": len(controls),
            "seconds": time.time() - t0,
            "nan": int(np.count_nonzero(~np.isfinite(table.column("loss").to_numpy(zero_copy_only=False))))}


def _sequences(tok: pa.Array, txt: pa.Array, encode) -> list[np.ndarray]:
    n = len(tok)
    valid = np.asarray(tok.is_valid().to_numpy(zero_copy_only=False), bool) if n else np.zeros(0, bool)
    offs = np.asarray(tok.offsets.to_numpy(), np.int64) if n else np.zeros(1, np.int64)
    vals = np.asarray(pc.list_flatten(tok).to_numpy(zero_copy_only=False), np.int64) if n else np.zeros(0, np.int64)
    base = offs[0]
    seqs = [vals[offs[i] - base: offs[i + 1] - base] for i in range(n)]  # views, no copies
    need = np.flatnonzero(~valid)
    if len(need):
        texts = txt.take(pa.array(need)).to_pylist()
        if any(t is None for t in texts):
            raise UserError("a sequence has neither tokens nor text")
        for i, ids in zip(need.tolist(), encode(texts)):
            seqs[i] = ids
    return seqs
