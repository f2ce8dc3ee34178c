"""A small, realistic training run to audit: real text, a real BPE tokenizer, Parquet shards, a step
manifest, and a Megatron-style log with spikes at known steps.

Real text: the English reference topics of the Python documentation (``pydoc_data``) and the Python
standard library's own sources, both shipped with every CPython, chunked into documents of about
1,200 characters, exact duplicates dropped, shuffled with a fixed seed. A byte-level BPE tokenizer
(``tokenizers``) is trained on it offline and saved as ``tokenizer.json``.

The run (defaults): 400 steps of 16 documents each, read in order through 16 Parquet shards of 400
rows (``tokens`` list<uint16>, ``text``). Planted at known steps (see :data:`INJECTIONS`):

* ``repeated_ngram`` - 6 rows become one phrase repeated ~60 times (the OLMo 2 failure);
* ``backslashes`` - 8 rows become runs of backslashes (the BigScience 104B failure);
* ``duplicates`` - 12 rows become copies of one document (a dedup failure);
* ``optimizer`` - a loss and grad-norm spike with untouched data (must be judged ``not_data``).

Each data injection makes the loss spike at that step. The log also holds a crash and resume: steps
``resume_from+1 .. crash_at`` are logged twice, and the second values (the resumed run) are the truth.
"""

from __future__ import annotations

import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spike_audit.pipelines.io import write_json, write_table, write_text
from spike_audit.pipelines.manifest import write_manifest
from spike_audit.schemas import STEP_MANIFEST

log = logging.getLogger(__name__)

INJECTIONS = {120: "repeated_ngram", 180: "optimizer", 230: "backslashes", 310: "duplicates"}
RESUME = (250, 270)  # resumed from the checkpoint at step 250 after a crash at step 270


@dataclass(frozen=True)
class DemoConfig:
    steps: int = 400
    rows_per_step: int = 16
    rows_per_shard: int = 400
    max_tokens: int = 256
    vocab_size: int = 4096
    seed: int = 0


def _documents(n_needed: int, seed: int) -> list[str]:
    import pydoc_data.topics as topics

    texts = [topics.topics[k] for k in sorted(topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("[a-z]*/**/*.py"))
    files = [p for p in files if p.relative_to(stdlib).parts[0] != "site-packages"]
    is_test = [any("test" in part for part in p.relative_to(stdlib).parts) for p in files]
    # the library's own modules first; its test suites (real code too) only when more text is needed
    for path in [p for p, t in zip(files, is_test) if not t] + [p for p, t in zip(files, is_test) if t]:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        if sum(map(len, texts)) > n_needed * 1500:
            break
    docs, seen = [], set()
    for text in texts:
        for i in range(0, len(text) - 400, 1200):
            chunk = text[i : i + 1200].strip()
            if chunk and chunk not in seen:
                seen.add(chunk)
                docs.append(chunk)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    if len(docs) < n_needed:
        raise RuntimeError(f"demo needs {n_needed} documents, the bundled text gives {len(docs)}")
    return [docs[i] for i in order[:n_needed]]


def _train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs[:3000], trainer=trainer)
    return tok


def _inject(docs: list[str], cfg: DemoConfig, rng: np.random.Generator) -> dict[int, dict]:
    truth = {}
    for step, kind in sorted(INJECTIONS.items()):
        first = (step - 1) * cfg.rows_per_step
        if kind == "optimizer":
            truth[step] = {"kind": kind, "rows": []}
            continue
        n = {"repeated_ngram": 6, "backslashes": 8, "duplicates": 12}[kind]
        rows = sorted(rng.choice(cfg.rows_per_step, size=n, replace=False).tolist())
        for k, r in enumerate(rows):
            if kind == "repeated_ngram":
                docs[first + r] = "Click here to subscribe to our newsletter! " * 60
            elif kind == "backslashes":
                docs[first + r] = "\\" * (300 + 37 * k)
            else:
                docs[first + r] = docs[first + rows[0]] if k else docs[first + r]
        truth[step] = {"kind": kind, "rows": [first + r for r in rows]}
    return truth


def _loss_curve(cfg: DemoConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = np.arange(1, cfg.steps + 1, dtype=np.float64)
    loss = 2.1 + 8.8 * (s / 4.0 + 1.0) ** -0.55 + rng.normal(0, 0.012, len(s))
    gnorm = 0.9 + 3.0 * (s / 10.0 + 1.0) ** -0.7 + np.abs(rng.normal(0, 0.03, len(s)))
    for step, kind in INJECTIONS.items():
        bump = {"repeated_ngram": 2.4, "optimizer": 3.0, "backslashes": 1.8, "duplicates": 1.5}[kind]
        tail = np.exp(-np.clip(s - step, 0, None) / 2.0) * (s >= step)
        loss += bump * tail
        gnorm += (6.0 if kind == "optimizer" else 1.5) * tail
    return loss, gnorm


def _megatron_line(step: int, total: int, consumed: int, loss: float, gnorm: float, rank: int = 0) -> str:
    return (f"[default{rank}]: iteration {step:8d}/{total:8d} | consumed samples: {consumed:12d} | "
            f"elapsed time per iteration (ms): {812.4 + (step % 7):.1f} | learning rate: 3.000E-04 | "
            f"global batch size: {16:5d} | lm loss: {loss:.6E} | loss scale: 1.0 | grad norm: {gnorm:.3f} | "
            f"number of skipped iterations:   0 | number of nan iterations:   0 |")


def make_demo(dest: str | Path, cfg: DemoConfig = DemoConfig()) -> dict:
    """Write the demo run into ``dest`` and return its ground truth (also saved as truth.json)."""
    dest = Path(dest)
    rng = np.random.default_rng(cfg.seed)
    n_rows = cfg.steps * cfg.rows_per_step
    log.info("demo: building %d documents from the Python docs and stdlib", n_rows)
    docs = _documents(n_rows, cfg.seed)
    tok = _train_tokenizer(docs, cfg.vocab_size)
    truth = _inject(docs, cfg, rng)
    (dest / "shards").mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))

    log.info("demo: tokenizing and writing %d shards", -(-n_rows // cfg.rows_per_shard))
    encoded = tok.encode_batch(docs)
    ids = [e.ids[: cfg.max_tokens] for e in encoded]
    texts = [tok.decode(i) for i in ids]  # the text the model actually saw (truncated)
    manifest = {"step": [], "shard": [], "row_start": [], "row_end": [], "batch_pos": []}
    shard_names = []
    for k, start in enumerate(range(0, n_rows, cfg.rows_per_shard)):
        end = min(start + cfg.rows_per_shard, n_rows)
        name = f"shards/train-{k:05d}.parquet"
        shard_names.append(name)
        table = pa.table({
            "tokens": pa.array(ids[start:end], type=pa.list_(pa.uint16())),
            "text": pa.array(texts[start:end], type=pa.string()),
        })
        pq.write_table(table, dest / name, row_group_size=100)
    for step in range(1, cfg.steps + 1):  # Megatron's iteration `step` reads batch `step - 1`
        g0, g1 = (step - 1) * cfg.rows_per_step, step * cfg.rows_per_step
        while g0 < g1:  # a step's rows may straddle two shards
            k = g0 // cfg.rows_per_shard
            stop = min(g1, (k + 1) * cfg.rows_per_shard)
            manifest["step"].append(step - 1)
            manifest["shard"].append(f"train-{k:05d}.parquet")
            manifest["row_start"].append(g0 - k * cfg.rows_per_shard)
            manifest["row_end"].append(stop - k * cfg.rows_per_shard)
            manifest["batch_pos"].append(g0 - (step - 1) * cfg.rows_per_step)
            g0 = stop
    write_manifest(STEP_MANIFEST.from_arrays(manifest), dest / "manifest.parquet", trainer="megatron",
                   samples_per_step=cfg.rows_per_step, first_step=0, samples_before_first_step=0)

    loss, gnorm = _loss_curve(cfg, rng)
    lines = ["[default0]: > building train, validation, and test datasets ...",
             "[default0]: > finished creating GPT datasets ..."]
    crash_from, crash_at = RESUME
    for step in range(1, crash_at + 1):
        lines.append(_megatron_line(step, cfg.steps, step * cfg.rows_per_step, loss[step - 1] + 0.004,
                                    gnorm[step - 1]))
        if step % 100 == 0:
            lines.append(f"[default0]: saving checkpoint at iteration {step:8d} to checkpoints")
    lines += ["[default3]: RuntimeError: NCCL communicator was aborted on rank 3.",
              f"[default0]:  loading checkpoint from checkpoints at iteration {crash_from}"]
    for step in range(crash_from + 1, cfg.steps + 1):
        lines.append(_megatron_line(step, cfg.steps, step * cfg.rows_per_step, loss[step - 1], gnorm[step - 1]))
    write_text("\n".join(lines) + "\n", dest / "train.log")

    shard_of = {}
    for step, t in truth.items():
        t["shards"] = sorted({f"train-{r // cfg.rows_per_shard:05d}.parquet" for r in t["rows"]})
        shard_of[step] = t
    out = {
        "injections": {str(s): t for s, t in sorted(shard_of.items())},
        "resume": {"resumed_from": crash_from, "crashed_at": crash_at},
        "steps": cfg.steps,
        "rows_per_step": cfg.rows_per_step,
        "tokens": int(sum(len(i) for i in ids)),
    }
    write_json(out, dest / "truth.json")
    log.info("demo: wrote %s (%d tokens)", dest, out["tokens"])
    return out


SHARD_PLANTS = {
    "random_tokens": "uniformly random token ids (a corrupted or mis-tokenized shard)",
    "duplication": "70% of rows are copies of 5 documents (a dedup failure)",
    "repeated_ngram": "a third of rows are one phrase repeated 40+ times (the OLMo 2 failure)",
    "out_of_domain": "numeric CSV dumps instead of prose and code (wrong source mixed in)",
}


def make_shard_corpus(dest: str | Path, n_clean: int = 50, rows_per_shard: int = 200, max_tokens: int = 256,
                      seed: int = 0, vocab_size: int = 4096) -> dict:
    """A corpus of Parquet shards (``tokens``, ``text``) of real text with one planted anomalous shard
    per kind in :data:`SHARD_PLANTS`, at seeded positions among the clean ones. Returns the truth."""
    dest = Path(dest)
    rng = np.random.default_rng(seed)
    n_total = n_clean + len(SHARD_PLANTS)
    docs = _documents(n_clean * rows_per_shard, seed)
    tok = _train_tokenizer(docs, vocab_size)
    slots = rng.permutation(n_total)
    planted = {f"shard-{int(slots[n_clean + k]):05d}.parquet": kind for k, kind in enumerate(SHARD_PLANTS)}
    clean_iter = iter(range(n_clean))
    dest.mkdir(parents=True, exist_ok=True)
    # planted random-token rows copy the clean rows' lengths: only their token distribution differs
    clean_lengths = np.array([len(e.ids[:max_tokens]) for e in tok.encode_batch(docs[: 4 * rows_per_shard])])
    for i in range(n_total):
        name = f"shard-{i:05d}.parquet"
        kind = planted.get(name)
        if kind is None:
            c = next(clean_iter)
            texts = docs[c * rows_per_shard : (c + 1) * rows_per_shard]
            ids = [e.ids[:max_tokens] for e in tok.encode_batch(texts)]
        elif kind == "random_tokens":
            ids = [rng.integers(0, vocab_size, size=int(n)).tolist()
                   for n in rng.choice(clean_lengths, size=rows_per_shard)]
            texts = None
        else:
            base = [docs[int(j)] for j in rng.integers(0, len(docs), size=rows_per_shard)]
            if kind == "duplication":
                pool = base[:5]
                texts = [pool[int(j)] if rng.random() < 0.7 else t for j, t in
                         zip(rng.integers(0, 5, size=rows_per_shard), base)]
            elif kind == "repeated_ngram":
                texts = [("Buy cheap watches online today! " * int(rng.integers(40, 60))) if k % 3 == 0 else t
                         for k, t in enumerate(base)]
            else:
                texts = ["\n".join(",".join(f"{v:.4f}" for v in rng.random(6)) for _ in range(30))
                         for _ in range(rows_per_shard)]
            ids = [e.ids[:max_tokens] for e in tok.encode_batch(texts)]
        texts = [tok.decode(i) for i in ids]  # the text of exactly the (truncated) tokens
        pq.write_table(pa.table({"tokens": pa.array(ids, type=pa.list_(pa.uint16())),
                                 "text": pa.array(texts, type=pa.string())}), dest / name, row_group_size=100)
    truth = {"planted": planted, "n_shards": n_total, "rows_per_shard": rows_per_shard}
    write_json(truth, dest.parent / f"{dest.name}-truth.json")
    return truth
