"""Hugging Face ``transformers`` ``Trainer`` (and plain torch ``DistributedSampler`` loops): the sample
order reproduced from the seed and the settings, without torch -> STEP_MANIFEST.

The order, as transformers 4.57 / accelerate 1.x produce it for a map-style dataset of ``n`` rows
(``Trainer._get_train_sampler`` -> ``RandomSampler``; ``Accelerator.prepare`` -> accelerate's
``prepare_data_loader`` with the Trainer's default ``use_seedable_sampler=True``):

- **permutation** of epoch ``e`` (0-based, the Trainer calls ``set_epoch(e)``): accelerate's
  ``SeedableRandomSampler`` seeds a CPU ``torch.Generator`` with ``initial_seed + e`` and yields
  ``torch.randperm(n)``; ``initial_seed`` is ``TrainingArguments.data_seed`` when set, else
  ``torch.initial_seed()``, which the Trainer set to ``TrainingArguments.seed``. ``torch.randperm``
  on the CPU (``n < 2**32 / 20``) is a forward Fisher-Yates shuffle drawing ``mt19937() % (n - i)``
  from the generator's MT19937, seeded like numpy's legacy ``RandomState`` (seed mod 2**32): it is
  reproduced here exactly with ``numpy.random.RandomState`` (checked against torch in the tests
  when torch is installed, and against the real Trainer in ``benchmarks/fidelity_olmo.py``). The
  swap loop runs over plain ints (about 1 s per million rows).
- **batches**: ``BatchSampler(perm, per_device_train_batch_size, dataloader_drop_last)``.
- **ranks** (``world_size > 1``): accelerate's ``BatchSamplerShard`` (``split_batches=False``,
  ``even_batches=True``): batch ``i`` goes to rank ``i % world_size``; an incomplete last round is
  completed from the start of the epoch's order so every rank gets the same number of full
  batches (with ``drop_last`` an incomplete round is dropped).
- **steps**: per epoch, ``len(dataloader)`` micro-batches are grouped into optimizer steps of
  ``gradient_accumulation_steps`` (the last step of an epoch takes the remainder);
  ``max_steps = ceil(num_train_epochs * ceil(len / GA))`` unless ``--max-steps`` is given; the
  Trainer's ``global_step`` (``trainer_state.json`` ``step``) is 1-based: step ``s`` is global
  batch ``s - 1``.

``sampler='distributed'``: a torch ``DistributedSampler(dataset, num_replicas, rank, shuffle=True,
seed, drop_last)`` with ``set_epoch(e)``: ``randperm(n)`` seeded ``seed + e``, padded by repeating
its head to a multiple of ``world_size`` (or truncated with ``drop_last``), rank ``r`` takes
``[r::world_size]``, then batches of ``per_device_batch_size`` per rank (``DataLoader`` without
``drop_last`` keeps a short last batch).

Unsupported (refused by name with a one-line error; the CLI has a flag for each so a user who
states the setting is told): ``group_by_length`` (``LengthGroupedSampler``),
``use_seedable_sampler=False`` (an unseeded generator), ``split_batches``, ``dispatch_batches``,
``even_batches=False``, iterable datasets, ``n >= 2**32 / 20`` rows (torch switches to 64-bit draws).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa

from spike_audit.pipelines.errors import UserError
from spike_audit.pipelines.manifest import manifest_from_arrays, with_meta

log = logging.getLogger(__name__)

RANDPERM_SMALL_N = (2**32 - 1) // 20  # torch's randperm_cpu uses 32-bit draws below this


def torch_randperm(n: int, seed: int) -> np.ndarray:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` on the CPU, exactly."""
    n = int(n)
    if n >= RANDPERM_SMALL_N:
        raise UserError(f"{n:,} rows: torch draws 64-bit numbers for randperm above {RANDPERM_SMALL_N:,} rows; "
                        f"not supported")
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    draws = np.random.RandomState(int(seed) & 0xFFFFFFFF).randint(0, 2**32, size=n - 1, dtype=np.uint32)
    i = np.arange(n - 1, dtype=np.int64)
    z = (draws.astype(np.int64) % (n - i) + i).tolist()
    a = list(range(n))
    for k, j in enumerate(z):  # sequential by nature (Fisher-Yates); plain ints keep it ~1 us a swap
        a[k], a[j] = a[j], a[k]
    return np.asarray(a, dtype=np.int64)


def _batches(order: np.ndarray, bs: int, drop_last: bool) -> list[np.ndarray]:
    nb = len(order) // bs if drop_last else -(-len(order) // bs)
    return [order[i * bs:(i + 1) * bs] for i in range(nb)]


def _shard_batches(batches: list[np.ndarray], world: int, bs: int, drop_last: bool) -> list[list[np.ndarray]]:
    """accelerate's BatchSamplerShard (split_batches=False, even_batches=True): per rank, its batches."""
    out: list[list[np.ndarray]] = [[] for _ in range(world)]
    if world == 1:
        out[0] = list(batches)
        return out
    initial = np.concatenate(batches[:world]) if batches and not drop_last else np.zeros(0, np.int64)
    for idx, b in enumerate(batches):
        if idx % world == world - 1 and len(b) == bs:
            for r in range(world):
                out[r].append(batches[idx - world + 1 + r])
    if drop_last or not len(initial):
        return out
    # Incomplete last round: ranks that got a batch of the full size in it keep it; the rest are
    # filled from the start of the epoch's order (cycled when the epoch is shorter than a round).
    last_round = len(out[0]) * world
    tail = batches[last_round:]
    while len(initial) < world * bs:
        initial = np.concatenate([initial, initial])
    cursor = 0
    idx = last_round
    for b in tail:
        if len(b) == bs:
            out[idx % world].append(b)
        else:
            need = bs - len(b)
            out[idx % world].append(np.concatenate([b, initial[cursor:cursor + need]]))
            cursor += need
        idx += 1
    while idx % world:
        out[idx % world].append(initial[cursor:cursor + bs])
        cursor += bs
        idx += 1
    return out


def _distributed(order: np.ndarray, world: int, drop_last: bool) -> list[np.ndarray]:
    n = len(order)
    if drop_last and n % world:
        num = math.ceil((n - world) / world)
    else:
        num = math.ceil(n / world)
    total = num * world
    if not drop_last:
        pad = total - n
        order = np.concatenate([order, np.resize(order, pad)]) if pad else order
    else:
        order = order[:total]
    return [order[r:total:world] for r in range(world)]


#: settings whose order is not reproduced, with the value that is: (setting, supported value, why)
UNSUPPORTED = {
    "use_seedable_sampler": (True, "accelerate then keeps torch's RandomSampler with an unseeded generator: "
                                   "the order is not reproducible from the seed"),
    "split_batches": (False, "accelerate then splits each global batch across ranks instead of dealing batches"),
    "dispatch_batches": (False, "rank 0 then iterates the data and dispatches slices of its batches"),
    "even_batches": (True, "accelerate then gives ranks unequal numbers of batches"),
    "iterable": (False, "an IterableDataset's order comes from the dataset's own iterator, not a sampler"),
}


def refuse_unsupported(**settings) -> None:
    """One-line :class:`UserError` naming the first setting in ``settings`` whose order is not reproduced."""
    for name, value in settings.items():
        ok, why = UNSUPPORTED[name]
        if value is not None and bool(value) != ok:
            label = "an iterable training dataset" if name == "iterable" else f"{name}={bool(value)}"
            raise UserError(f"{label} is not supported: {why}")


def hf_trainer_order(n_rows: int, *, seed: int = 42, data_seed: int | None = None, per_device_batch_size: int = 8,
                     world_size: int = 1, gradient_accumulation_steps: int = 1, num_train_epochs: float = 3.0,
                     max_steps: int = -1, drop_last: bool = False, sampler: str = "trainer",
                     use_seedable_sampler: bool = True, split_batches: bool = False, dispatch_batches: bool = False,
                     even_batches: bool = True, iterable: bool = False):
    """Per fed row: (0-based global batch, rank, micro-batch within the step, dataset row). The accelerate
    settings (``use_seedable_sampler`` ... ``iterable``) are checked: any but the Trainer's defaults for a
    map-style dataset is refused with a one-line error naming it."""
    refuse_unsupported(iterable=iterable, use_seedable_sampler=use_seedable_sampler, split_batches=split_batches,
                       dispatch_batches=dispatch_batches, even_batches=even_batches)
    if n_rows <= 0:
        raise UserError("the dataset has no rows")
    if per_device_batch_size <= 0 or world_size <= 0 or gradient_accumulation_steps <= 0:
        raise UserError("batch size, world size and gradient accumulation steps must be positive")
    if sampler not in ("trainer", "distributed"):
        raise UserError(f"sampler {sampler!r} is not supported (trainer or distributed)")
    ga, bs, w = gradient_accumulation_steps, per_device_batch_size, world_size
    base_seed = data_seed if (data_seed is not None and sampler == "trainer") else seed

    def epoch_batches(e: int) -> list[list[np.ndarray]]:
        order = torch_randperm(n_rows, base_seed + e)
        if sampler == "trainer":
            return _shard_batches(_batches(order, bs, drop_last), w, bs, drop_last)
        return [_batches(part, bs, drop_last) for part in _distributed(order, w, drop_last)]

    first = epoch_batches(0)
    len_dl = len(first[0])
    if len_dl == 0:
        raise UserError(f"{n_rows} rows give no batch of {bs} per device (drop_last)")
    updates_per_epoch = -(-len_dl // ga)
    if max_steps <= 0 and not math.isfinite(num_train_epochs):
        raise UserError(f"--num-train-epochs {num_train_epochs}: expected a finite number of epochs (or --max-steps)")
    total_steps = max_steps if max_steps > 0 else math.ceil(num_train_epochs * updates_per_epoch)
    if total_steps <= 0:
        raise UserError(f"no training steps: --num-train-epochs {num_train_epochs} and --max-steps {max_steps} give "
                        f"none (expected a positive number of epochs, or --max-steps > 0)")
    if total_steps * bs * w * ga > MAX_FED_ROWS:
        raise UserError(f"{total_steps:,} steps of {bs * w * ga:,} rows are more than the {MAX_FED_ROWS:,} fed rows a "
                        f"manifest is built with here; check --max-steps / --num-train-epochs")
    n_epochs = -(-total_steps // updates_per_epoch)
    cols: dict[str, list[np.ndarray]] = {"batch": [], "rank": [], "micro": [], "row": []}
    step0 = 0
    for e in range(n_epochs):
        per_rank = first if e == 0 else epoch_batches(e)
        for r in range(w):
            for m, b in enumerate(per_rank[r]):
                s = step0 + m // ga
                if s >= total_steps:
                    break
                cols["batch"].append(np.full(len(b), s, np.int64))
                cols["rank"].append(np.full(len(b), r, np.int64))
                cols["micro"].append(np.full(len(b), m % ga, np.int64))
                cols["row"].append(np.asarray(b, np.int64))
        step0 += updates_per_epoch
    return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}


MAX_FED_ROWS = 1 << 31  # one manifest row each, built in memory (a typo'd --max-steps 1e11 ran for ever)


def build_hf_manifest(shard: str, n_rows: int, *, first_step: int = 0, steps: tuple[int, int] | None = None,
                      record_ranks: bool | None = None, **order_kw) -> pa.Table:
    """STEP_MANIFEST: one ``unit='row'`` slice per fed row (a row fed twice in one step, e.g. the
    even_batches fill, appears twice). ``first_step``: the step of global batch 0 (0: steps are 0-based
    batch indices; the Trainer's ``global_step`` N, 1-based, is step N - 1)."""
    o = hf_trainer_order(n_rows, **order_kw)
    step = o["batch"] + first_step
    keep = np.ones(len(step), bool)
    if steps is not None:
        keep = (step >= steps[0]) & (step <= steps[1])
        if not keep.any():
            have = f"{step.min()}..{step.max()}" if len(step) else "none"
            raise UserError(f"{shard}: steps {steps[0]}..{steps[1]} are outside the run's steps ({have})")
    w = order_kw.get("world_size", 1)
    rank = o["rank"][keep] if (record_ranks or w > 1) else None
    micro = o["micro"][keep] if order_kw.get("gradient_accumulation_steps", 1) > 1 else None
    rows = o["row"][keep]
    return with_meta(manifest_from_arrays(step[keep], shard, rows, rows + 1, "row", rank, micro), trainer="hf",
                     first_step=int(first_step))
