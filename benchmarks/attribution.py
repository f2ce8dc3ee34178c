"""Loss attribution on a real model: train a tiny causal LM on CPU over real text with planted data
anomalies and one optimizer event, log its per-row losses, and check what the model-based verdict says.

    python benchmarks/attribution.py                 # needs the replay extra (torch, transformers)

The run (defaults: 320 steps, global batch 32 sequences of 128 tokens, about 1.3M tokens):

* text: the demo's real text (Python docs and stdlib sources), a byte-level BPE of 2,048 tokens
  trained on it, documents joined with EOS and packed into 128-token instances in one flat uint16
  token file, read through an OLMo-style ``global_indices`` permutation (the OLMo manifest builder
  reconstructs the data order, batch positions included);
* model: GPT-2 architecture, 2 layers, width 128, 4 heads (about 0.5M parameters), AdamW (lr 2e-3,
  50 warm-up steps), gradient clipping at 1.0;
* planted at known steps, in 8 of the 32 batch positions each: ``random_tokens`` (uniform token
  ids), ``cjk_text`` (random CJK characters: a script the corpus lacks), ``shuffled_tokens`` (real
  rows with their tokens permuted: normal unigram statistics), ``repeated_ngram`` (one phrase
  repeated); and ``lr_spike``: the learning rate is multiplied by 40 for one step, the data
  untouched.

The trainer logs its loss (JSONL) and every step's per-row losses (a ``[steps, batch]`` .npy, from
the same forward pass it trains on) and saves a checkpoint before the first plant. Then:

1. ``spike-audit run --row-losses row_losses.npy``: the data verdict and the model verdict from the
   trainer's own per-row losses (baseline: the steps before each window);
2. ``spike-audit replay`` from the saved checkpoint, and ``run --row-losses`` on its output (baseline:
   the control steps, replayed through the same checkpoint).

For every detected spike it prints both verdicts, the flagged rows' share of the excess loss (95%
bootstrap interval), the breadth, and whether the loss outliers are exactly the planted rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.attribution")

PLANTS = {150: "random_tokens", 185: "cjk_text", 220: "shuffled_tokens", 255: "repeated_ngram", 290: "lr_spike"}


def build_corpus(dest: Path, steps: int, batch: int, seq_len: int, vocab: int, seed: int, rows_per_plant: int):
    from spike_audit.pipelines.demo import _documents, _train_tokenizer

    rng = np.random.default_rng(seed)
    n_inst = steps * batch
    need_tokens = n_inst * seq_len
    docs = _documents(max(2000, need_tokens // 230), seed)
    tok = _train_tokenizer(docs, vocab)
    eos = tok.token_to_id("<|endoftext|>")
    ids = np.concatenate([np.r_[e.ids, eos] for e in tok.encode_batch(docs)]).astype(np.uint16)
    if len(ids) < need_tokens:
        raise SystemExit(f"corpus has {len(ids)} tokens, the run needs {need_tokens}: fewer --steps")
    flat = ids[:need_tokens].copy()
    order = rng.permutation(n_inst).astype(np.uint32)  # OLMo's global_indices: a seeded permutation
    truth = {}
    phrase = np.asarray(tok.encode("Click here to subscribe to our newsletter! ").ids, np.uint16)
    for step, kind in sorted(PLANTS.items()):
        if step > steps:
            continue
        if kind == "lr_spike":
            truth[step] = {"kind": kind, "positions": []}
            continue
        pos = np.sort(rng.choice(batch, size=rows_per_plant, replace=False))
        for p in pos:
            inst = int(order[(step - 1) * batch + p])
            if kind == "random_tokens":
                row = rng.integers(1, vocab, seq_len)
            elif kind == "repeated_ngram":
                row = np.resize(phrase, seq_len)
            elif kind == "shuffled_tokens":  # a real row in a random order: normal unigram statistics
                row = rng.permutation(flat[inst * seq_len:(inst + 1) * seq_len])
            else:  # text in a script the corpus does not have (a wrong source mixed in)
                text = "".join(chr(int(c)) for c in rng.integers(0x4E00, 0x9FFF, 2 * seq_len))
                row = np.resize(np.asarray(tok.encode(text).ids), seq_len)
            flat[inst * seq_len:(inst + 1) * seq_len] = row
        truth[step] = {"kind": kind, "positions": pos.tolist()}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "data").mkdir(exist_ok=True)
    flat.tofile(dest / "data" / "train.bin")  # header-less uint16 memmap, as OLMo writes
    order.tofile(dest / "global_indices.npy")  # raw uint32, as OLMo writes it (despite the name)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "truth.json").write_text(json.dumps({str(k): v for k, v in truth.items()}, indent=1))
    return flat, order, truth


def train(dest: Path, flat, order, steps: int, batch: int, seq_len: int, vocab: int, seed: int, lr: float,
          ckpt_step: int, threads: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=128, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    data = torch.from_numpy(flat.astype(np.int64).reshape(-1, seq_len))
    row_losses = np.full((steps, batch), np.nan, np.float32)
    lines = []
    t0 = time.time()
    for step in range(1, steps + 1):
        warm = min(1.0, step / 50)
        mult = 40.0 if PLANTS.get(step) == "lr_spike" else 1.0
        for g in opt.param_groups:
            g["lr"] = lr * warm * mult
        x = data[torch.from_numpy(order[(step - 1) * batch: step * batch].astype(np.int64))]
        logits = model(input_ids=x).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), x[:, 1:].reshape(-1),
                                                reduction="none").view(batch, seq_len - 1)
        per_row = nll.mean(1)
        loss = per_row.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        row_losses[step - 1] = per_row.detach().numpy()
        lines.append(json.dumps({"step": step, "train/loss": float(loss.detach()), "grad_norm": gn}))
        if step == ckpt_step:
            model.save_pretrained(dest / f"ckpt-{step}")
        if step % 50 == 0:
            log.info("train: step %d/%d loss %.3f (%.1f s)", step, steps, float(loss.detach()), time.time() - t0)
    (dest / "train.jsonl").write_text("\n".join(lines) + "\n")
    np.save(dest / "row_losses.npy", row_losses)
    return time.time() - t0


def _fmt_ci(x, ci):
    if x is None or not np.isfinite(x):
        return "n/a"
    lo, hi = ci
    return f"{x:.2f} [{lo:.2f}, {hi:.2f}]" if lo is not None and np.isfinite(lo) else f"{x:.2f}"


def report(title: str, verdicts, loss_rows, truth: dict):
    """One line per audited event; which planted rows the model's loss outliers are."""
    print(f"\n{title}")
    print("| event | planted | data verdict | model verdict | judged step | excess (sigma) | flagged share [95%] | "
          "breadth [95%] | loss outliers: planted / others | outlier share [95%] | flag P / R |")
    print("|---|---|---|---|---:|---:|---|---|---|---|---|")
    for v in sorted(verdicts, key=lambda v: (v["peak_step"], v["spike_id"])):
        peak = v["peak_step"]
        planted = next(((int(s), t) for s, t in truth.items() if 0 <= peak - int(s) <= 3), None)
        kind = planted[1]["kind"] if planted else "-"
        ms = v.get("model_step")
        carriers = "n/a"
        if ms is not None:
            got = {r["position"] for r in loss_rows
                   if r["spike_id"] == v["spike_id"] and r["step"] == ms and r["role"] == "window" and r["outlier"]}
            want = set(planted[1]["positions"]) if planted is not None and planted[0] == ms else set()
            carriers = f"{len(got & want)}/{len(want)} / {len(got - want)}"
        event = "/".join(v["spike_id"].split("/")[1:])
        print(f"| {event} | {kind} | {v['verdict']} | {v.get('model_verdict')} | {ms} | {_num(v.get('excess_z'))} | "
              f"{_fmt_ci(v.get('flagged_share'), (v.get('flagged_share_lo'), v.get('flagged_share_hi')))} | "
              f"{_fmt_ci(v.get('breadth'), (v.get('breadth_lo'), v.get('breadth_hi')))} | {carriers} | "
              f"{_fmt_ci(v.get('outlier_share'), (v.get('outlier_share_lo'), v.get('outlier_share_hi')))} | "
              f"{_num(v.get('flag_precision'), '{:.2f}')} / {_num(v.get('flag_recall'), '{:.2f}')} |")
    audited = {int(s) for s, t in truth.items()
               if any(0 <= v["peak_step"] - int(s) <= 3 for v in verdicts)}
    missed = [f"{t['kind']} (step {s})" for s, t in sorted(truth.items(), key=lambda kv: int(kv[0]))
              if int(s) not in audited]
    if missed:
        print(f"planted but not detected as a spike (so not audited): {', '.join(missed)}")
    for v in sorted(verdicts, key=lambda v: (v["peak_step"], v["spike_id"])):
        print(f"  {v['spike_id']}: model: {v.get('model_reason')}")


def _num(x, fmt="{:+.1f}"):
    return fmt.format(x) if x is not None and np.isfinite(x) else "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/spike_audit_attribution")
    ap.add_argument("--steps", type=int, default=320)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--rows-per-plant", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--controls", type=int, default=60)
    ap.add_argument("--reuse", action="store_true", help="keep the corpus, training and checkpoint already in --dir; "
                    "only audit (and replay) again")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)

    import pyarrow.parquet as pq

    from spike_audit.pipelines.builders.olmo import build_olmo_manifest
    from spike_audit.pipelines.manifest import write_manifest
    from spike_audit.pipelines.run.replay import ReplayConfig, run_replay
    from spike_audit.pipelines.run.audit import run_audit
    from spike_audit.pipelines.run.plan import RunConfig

    dest = Path(args.dir)
    ckpt = min(PLANTS) - 20
    t0 = time.time()
    if args.reuse and (dest / "row_losses.npy").exists() and (dest / f"ckpt-{ckpt}").exists():
        truth = {k: v for k, v in json.loads((dest / "truth.json").read_text()).items()}
        t_corpus = t_train = float("nan")
    else:
        flat, order, truth = build_corpus(dest, args.steps, args.batch, args.seq_len, args.vocab, args.seed,
                                          args.rows_per_plant)
        truth = {str(k): v for k, v in truth.items()}
        t_corpus = time.time() - t0
        t_train = train(dest, flat, order, args.steps, args.batch, args.seq_len, args.vocab, args.seed, args.lr,
                        ckpt, args.threads)
    man = build_olmo_manifest(str(dest / "global_indices.npy"), ["train.bin"], seq_len=args.seq_len,
                              global_batch_size=args.batch, dtype="uint16", shard_root=str(dest / "data"))
    write_manifest(man, dest / "manifest.parquet")
    # the loop logs step s for batch s - 1 (as OLMo-core does); the manifest counts 0-based batches
    common = dict(log=str(dest / "train.jsonl"), manifest=str(dest / "manifest.parquet"), shards=str(dest / "data"),
                  tokenizer=str(dest / "tokenizer.json"), n_controls=args.controls, vocab_size=args.vocab,
                  log_trainer="olmo")
    t1 = time.time()
    logged = run_audit(RunConfig(out=str(dest / "audit-logged"), row_losses=str(dest / "row_losses.npy"), **common))
    t_logged = time.time() - t1
    t2 = time.time()
    rep = run_replay(ReplayConfig(model=str(dest / f"ckpt-{ckpt}"), out=str(dest / "replay_losses.parquet"),
                                  log=common["log"], manifest=common["manifest"], shards=common["shards"],
                                  n_controls=args.controls, batch_size=16, log_trainer="olmo"))
    t_replay = time.time() - t2
    replayed = run_audit(RunConfig(out=str(dest / "audit-replayed"), row_losses=str(dest / "replay_losses.parquet"),
                                   **common))

    print(f"\nrun: {args.steps} steps x {args.batch} sequences x {args.seq_len} tokens "
          f"({args.steps * args.batch * args.seq_len:,} tokens), GPT-2 2x128, vocab {args.vocab}; planted: "
          + ", ".join(f"{k} at step {s}" for s, k in sorted(PLANTS.items()) if s <= args.steps))
    print(f"times: corpus {t_corpus:.0f} s, training {t_train:.0f} s ({args.threads} thread; nan: reused), audit with logged "
          f"losses {t_logged:.0f} s, replay of {rep['sequences']} sequences from ckpt-{ckpt} {t_replay:.0f} s")
    for title, res, sub in (("trainer-logged per-row losses (baseline: preceding steps)", logged, "audit-logged"),
                            (f"replayed from the step-{ckpt} checkpoint (baseline: control steps)", replayed,
                             "audit-replayed")):
        rows = pq.read_table(dest / sub / "loss_rows.parquet").to_pylist()
        report(title, res.tables["verdicts"].to_pylist(), rows, truth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
