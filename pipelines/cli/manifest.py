"""``spike-audit manifest {olmo,megatron,hf,streaming,sequential}``: build a step manifest from a trainer's own
data-order files (see :mod:`pipelines.builders`). Steps are 0-based global batch indices (the one step
convention, :mod:`spike_audit.schemas.steps`): Megatron's iteration N is step N - 1."""

from __future__ import annotations

import glob
import logging
import os

from spike_audit.pipelines.errors import UserError

log = logging.getLogger(__name__)


def _steps(text: str | None):
    if not text:
        return None
    try:
        a, _, b = text.partition(":")
        lo, hi = int(a), int(b or a)
    except ValueError:
        raise UserError(f"--steps: expected FIRST:LAST (inclusive), got {text!r}") from None
    if lo < 0 or hi < lo or hi >= 2 ** 62:
        raise UserError(f"--steps: expected FIRST:LAST with 0 <= FIRST <= LAST < 2^62 (0-based batch indices), "
                        f"got {text!r}")
    return lo, hi


def _data_files(args) -> list[str]:
    files = list(args.data_files or [])
    if getattr(args, "data_list", None):
        from spike_audit.pipelines import fs

        try:
            text = fs.read_bytes(args.data_list).decode("utf-8")  # a regular file (a FIFO would block)
        except UnicodeDecodeError as err:
            raise UserError(f"{args.data_list}: byte {err.start}: not UTF-8 text; expected a list of data files, "
                            f"one per line") from None
        files += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not files:
        raise UserError("no data files: give --data-files or --data-list")
    return files


def _common(p, shards_help="root the data file paths are relative to"):
    p.add_argument("--shards", default=None, help=shards_help)
    p.add_argument("--out", required=True, help="output manifest (Parquet)")
    p.add_argument("--first-step", type=int, default=None,
                   help="0-based batch index of the first batch the files describe (default 0; Megatron: "
                   "--consumed-samples / --global-batch-size)")
    p.add_argument("--steps", default=None, help="only steps FIRST:LAST (inclusive, 0-based batch indices)")
    p.add_argument("--check", action="store_true", help="re-read the written manifest and check it against the shards")


def register(subparsers) -> None:
    p = subparsers.add_parser("manifest", help="build a step manifest from a trainer's data-order files",
                              description="Build a step manifest (which shard slices each step read) from a "
                              "trainer's own data-order files.")
    sub = p.add_subparsers(dest="trainer", metavar="TRAINER")
    sub.required = True

    o = sub.add_parser("olmo", help="OLMo / OLMo-core global_indices over token memmaps")
    o.add_argument("--global-indices", required=True, nargs="+",
                   help="global indices file(s): OLMo's global_indices.npy, or OLMo-core's per-epoch "
                   "global_indices_..._epochN_..._v1.npy (several epochs: give each; the epoch is read from the name)")
    o.add_argument("--data-files", nargs="*", help="token memmap files in config order (relative to --shards)")
    o.add_argument("--data-list", help="text file listing the data files, one per line, in config order")
    o.add_argument("--seq-len", type=int, required=True, help="sequence length (tokens per instance)")
    g = o.add_mutually_exclusive_group(required=True)
    g.add_argument("--global-batch-tokens", type=int, help="global batch size in tokens (OLMo-core's global_batch_size)")
    g.add_argument("--global-batch-size", type=int, help="global batch size in instances (OLMo's global_train_batch_size)")
    o.add_argument("--dtype", default="uint16", help="token dtype of the memmaps (uint16 or uint32)")
    o.add_argument("--max-target-sequence-length", type=int, default=None,
                   help="OLMo-core's max_target_sequence_length (changes the instances of each file)")
    o.add_argument("--source-permutation-seed", type=int, default=None,
                   help="OLMo-core's source_permutation_seed (data files permuted as it does; give them in config order)")
    o.add_argument("--dataset", default="NumpyFSLDataset",
                   help="OLMo-core's dataset class (its config's class without 'Config'): only NumpyFSLDataset "
                   "(fixed-length instances, the default) is supported; the padded, packed, interleaved, mixture and "
                   "variable-length (VSL) datasets are refused by name")
    o.add_argument("--epoch", type=int, default=None, help="epoch of a single indices file whose name does not say it")
    o.add_argument("--world-size", type=int, default=None, help="data-parallel world size (records ranks)")
    mb = o.add_mutually_exclusive_group()
    mb.add_argument("--micro-batch-size", type=int, default=None, help="device micro-batch size in instances")
    mb.add_argument("--micro-batch-tokens", type=int, default=None,
                    help="device micro-batch size in tokens (OLMo-core's rank_microbatch_size)")
    _common(o)
    o.set_defaults(func=run)

    m = sub.add_parser("megatron", help="Megatron-LM GPTDataset / BlendedDataset index caches over .bin/.idx data")
    m.add_argument("--data", required=True, nargs="+",
                   help="the .bin of every --data-path prefix, in the run's order (relative to --shards; .idx next "
                   "to each); a blend needs all of them")
    m.add_argument("--cache", required=True,
                   help="the run's --data-cache-path directory (its train split's cache; a blend's own "
                   "BlendedDataset cache when there is one), or a cache prefix DIR/{hash}-GPTDataset-train")
    m.add_argument("--split", default="train", help="which split's cache (default train)")
    m.add_argument("--global-batch-size", type=int, required=True, help="global batch size in samples")
    m.add_argument("--consumed-samples", type=int, default=0,
                   help="samples consumed before the first batch (a resumed run's checkpoint; default 0)")
    m.add_argument("--dataloader-type", default="single",
                   help="Megatron's --dataloader-type: only 'single' (MegatronPretrainingSampler) is supported")
    m.add_argument("--rampup-batch-size", nargs="*", default=None,
                   help="Megatron's --rampup-batch-size: not supported (refused)")
    m.add_argument("--no-extra-token", action="store_true", help="samples hold seq_len tokens, not seq_len + 1")
    m.add_argument("--micro-batch-size", type=int, default=None, help="micro batch size (records micro-batches)")
    m.add_argument("--data-parallel-size", type=int, default=None, help="data-parallel size (records ranks)")
    m.add_argument("--pad-id", type=int, default=None,
                   help="the pad id of the run's Megatron tokenizer (megatron-core feeds 0 where it occurs in the data "
                   "and masks its loss; recorded so batch shows what was fed); -1: none")
    m.add_argument("--tokenizer", default=None,
                   help="the run's tokenizer (tokenizer.json or a directory): its pad id, when it is not its EOS, "
                   "is the pad id above")
    _common(m, "root the --data path is relative to")
    m.set_defaults(func=run)

    h = sub.add_parser("hf", help="Hugging Face Trainer (RandomSampler seeding, ranks, gradient accumulation, epochs)")
    h.add_argument("--data", required=True, help="the training dataset as a shard (datasets directory, Parquet, ...)")
    h.add_argument("--seed", type=int, default=42, help="TrainingArguments.seed (default 42)")
    h.add_argument("--data-seed", type=int, default=None, help="TrainingArguments.data_seed (overrides --seed for the order)")
    h.add_argument("--per-device-train-batch-size", type=int, required=True)
    h.add_argument("--gradient-accumulation-steps", type=int, default=1)
    h.add_argument("--world-size", type=int, default=1, help="number of processes (default 1)")
    h.add_argument("--num-train-epochs", type=float, default=3.0, help="TrainingArguments.num_train_epochs (default 3)")
    h.add_argument("--max-steps", type=int, default=-1, help="TrainingArguments.max_steps (default -1: from epochs)")
    h.add_argument("--dataloader-drop-last", action="store_true")
    h.add_argument("--sampler", choices=("trainer", "distributed"), default="trainer",
                   help="trainer: transformers Trainer + accelerate (default); distributed: torch DistributedSampler")
    h.add_argument("--group-by-length", action="store_true", help="TrainingArguments.group_by_length (refused)")
    tf = ("true", "false")
    h.add_argument("--use-seedable-sampler", choices=tf, default="true",
                   help="accelerator_config.use_seedable_sampler (default true; false is refused)")
    h.add_argument("--even-batches", choices=tf, default="true",
                   help="accelerator_config.even_batches (default true; false is refused)")
    h.add_argument("--split-batches", action="store_true", help="accelerator_config.split_batches (refused)")
    h.add_argument("--dispatch-batches", action="store_true", help="accelerator_config.dispatch_batches (refused)")
    h.add_argument("--iterable-dataset", action="store_true",
                   help="the training dataset is an IterableDataset, e.g. datasets streaming=True (refused)")
    _common(h, "root the --data path is relative to")
    h.set_defaults(func=run)

    ms = sub.add_parser("streaming", help="mosaicml-streaming StreamingDataset + DataLoader (order from its settings)",
                        description="The sample order of a mosaicml-streaming StreamingDataset iterated by a torch "
                        "DataLoader, reproduced from the dataset's own settings (streaming is not needed).")
    ms.add_argument("--data", required=True, nargs="+",
                    help="the streams: MDS dataset directories (holding index.json), relative to --shards, in order")
    ms.add_argument("--batch-size", type=int, required=True, help="per-device batch size (StreamingDataset and DataLoader)")
    ms.add_argument("--shuffle", action="store_true", help="StreamingDataset shuffle=True")
    ms.add_argument("--shuffle-algo", default="py1e", help="py1e (default), py1s, py1br, py2s or naive")
    ms.add_argument("--shuffle-seed", type=int, default=9176, help="shuffle_seed (default 9176)")
    ms.add_argument("--shuffle-block-size", type=int, default=None,
                    help="shuffle_block_size (default max(4000000 // num_canonical_nodes, 262144))")
    ms.add_argument("--num-canonical-nodes", type=int, default=None,
                    help="num_canonical_nodes (default: 64 x nodes for py1s/py2s, else the number of nodes); "
                    "a resumed run: the checkpoint's")
    ms.add_argument("--partition-algo", default="relaxed", help="relaxed (default) or orig")
    ms.add_argument("--world-size", type=int, default=1, help="ranks (WORLD_SIZE, default 1)")
    ms.add_argument("--ranks-per-node", type=int, default=None, help="LOCAL_WORLD_SIZE (default: the world size)")
    ms.add_argument("--num-workers", type=int, default=0, help="DataLoader num_workers (default 0)")
    ms.add_argument("--drop-last", action="store_true", help="DataLoader drop_last")
    ms.add_argument("--epochs", type=int, default=1, help="passes of the DataLoader (default 1)")
    ms.add_argument("--epoch-size", type=int, default=None, help="epoch_size (samples per epoch, resampled)")
    ms.add_argument("--sampling-method", default="balanced", help="balanced (default) or fixed")
    ms.add_argument("--sampling-granularity", type=int, default=1)
    ms.add_argument("--sample-in-epoch", type=int, default=0,
                    help="a resumed run: the checkpoint's sample_in_epoch (the first epoch starts there)")
    ms.add_argument("--initial-physical-nodes", type=int, default=None,
                    help="a resumed run on another number of nodes: the checkpoint's initial_physical_nodes")
    ms.add_argument("--batching-method", default="random", help="only random (the default) is supported")
    ms.add_argument("--replication", type=int, default=None, help="not supported")
    for w, what in (("proportion", "relative weights, one per stream: Stream(proportion=...); with --epoch-size, "
                     "the epoch's samples are split by them"),
                    ("repeat", "absolute weights, one per stream ('-' for none): Stream(repeat=...)"),
                    ("choose", "absolute sample counts, one per stream ('-' for none): Stream(choose=...)")):
        ms.add_argument(f"--{w}", nargs="+", default=None, metavar=w.upper(), help=what)
    _common(ms, "root the --data directories are relative to")
    ms.set_defaults(func=run)

    s = sub.add_parser("sequential", help="modded-nanogpt (2024-10) / llm.c sequential .bin loaders")
    s.add_argument("--data-files", nargs="*", help="shard files or glob patterns, relative to --shards (sorted)")
    s.add_argument("--data-list", help="text file listing the shard files")
    s.add_argument("--variant", choices=("modded-nanogpt", "llm.c"), default="modded-nanogpt")
    s.add_argument("-B", "--batch-size", type=int, required=True, help="sequences per rank per micro-step")
    s.add_argument("-T", "--seq-len", type=int, required=True, help="sequence length")
    s.add_argument("--world-size", type=int, default=1, help="number of processes (default 1)")
    s.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    s.add_argument("--num-steps", type=int, required=True, help="optimizer steps to emit")
    s.add_argument("--dtype", default=None, help="dtype of header-less token files (default uint16)")
    _common(s, "root the shard files are relative to")
    s.set_defaults(func=run)


def _weight_values(flag: str, values: list[str] | None) -> list[float | None] | None:
    """``--proportion`` / ``--repeat`` / ``--choose`` values: numbers, ``-`` for a stream without one."""
    if values is None:
        return None
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v == "-":
            out.append(None)
            continue
        try:
            out.append(float(v))
        except ValueError:
            raise UserError(f"--{flag}: {v!r} for stream {i} is not a number (expected a number, or '-' for a stream "
                            f"without a {flag})") from None
    return out


def _expand_globs(root: str | None, patterns: list[str]) -> list[str]:
    out = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            base = root or ""
            hits = sorted(os.path.relpath(h, base) if base else h for h in glob.glob(os.path.join(base, pat)))
            if not hits:
                raise UserError(f"{pat}: no files match under {root or '.'}")
            out += hits
        else:
            out.append(pat)
    return out


def _check_out(args, table) -> None:
    """--out never replaces an input (a data file the manifest names, the trainer's index files) or a file that
    is not a step manifest."""
    import pyarrow.compute as pc

    from spike_audit.pipelines.outdir import check_file_output
    from spike_audit.pipelines.shards.paths import resolve

    inputs = [("data file", resolve(args.shards, s)) for s in pc.unique(table.column("shard")).to_pylist()]
    for flag in ("global_indices", "data_list", "cache", "data"):
        v = getattr(args, flag, None)
        for x in (v if isinstance(v, list) else [v] if v else []):
            inputs.append((f"--{flag.replace('_', '-')} file", x if flag != "data" else resolve(args.shards, x)))
    inputs += [("data file", i[1][: -len(".bin")] + ".idx") for i in list(inputs) if i[1].endswith(".bin")]
    check_file_output(args.out, inputs, "step_manifest")


def _check_numbers(args) -> None:
    """Counts and ids every builder takes, before any file is read (--global-batch-size 0 was a ZeroDivisionError,
    --first-step -1 wrote a manifest of negative steps, --dtype float32 read token memmaps as floats)."""
    for name, v in sorted(vars(args).items()):  # (--seq-len 1e20 was an OverflowError traceback in numpy)
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2 ** 62:
            raise UserError(f"--{name.replace('_', '-')} must be below 2^62, got {v}")
    first = getattr(args, "first_step", None)
    if first is not None and not 0 <= first < 2 ** 62:
        raise UserError(f"--first-step must be a 0-based batch index (>= 0), got {first}")
    for name in ("global_batch_size", "global_batch_tokens", "micro_batch_size", "micro_batch_tokens", "world_size",
                 "batch_size", "max_target_sequence_length", "data_parallel_size", "num_canonical_nodes",
                 "shuffle_block_size", "ranks_per_node", "epoch_size"):
        v = getattr(args, name, None)
        if v is not None and not isinstance(v, bool) and isinstance(v, int) and v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")
    # (--shuffle-seed -1 was numpy's ValueError traceback; --pad-id -1 is megatron-core's "no pad", allowed)
    for name in ("consumed_samples", "shuffle_seed"):
        v = getattr(args, name, None)
        if v is not None and isinstance(v, int) and v < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    dt = getattr(args, "dtype", None)
    if isinstance(dt, str):
        from spike_audit.pipelines.settings import is_integer_dtype

        if not is_integer_dtype(dt):
            raise UserError(f"--dtype must be an integer token dtype (uint16, uint32, int32, ...), got {dt!r}")


def run(args) -> int:
    from spike_audit.pipelines.manifest import read_manifest, write_manifest

    steps = _steps(args.steps)
    _check_numbers(args)
    allow_overlap = False
    if args.trainer == "olmo":
        from spike_audit.pipelines.builders.olmo import build_olmo_core_manifest, check_dataset_class

        check_dataset_class(args.dataset)  # before any file is read

        table = build_olmo_core_manifest(args.global_indices, _data_files(args), seq_len=args.seq_len,
                                         global_batch_size=args.global_batch_size,
                                         global_batch_tokens=args.global_batch_tokens, dtype=args.dtype,
                                         max_target_sequence_length=args.max_target_sequence_length,
                                         source_permutation_seed=args.source_permutation_seed, epoch=args.epoch,
                                         shard_root=args.shards, first_step=args.first_step or 0, steps=steps,
                                         world_size=args.world_size, micro_batch_size=args.micro_batch_size,
                                         micro_batch_tokens=args.micro_batch_tokens)
        dtype = args.dtype
    elif args.trainer == "hf":
        from spike_audit.pipelines.builders.hf import build_hf_manifest
        from spike_audit.pipelines.shards.paths import trusted_root
        from spike_audit.pipelines.shards.read import shard_length

        from spike_audit.pipelines.builders.hf import refuse_unsupported

        if args.group_by_length:
            raise UserError("--group-by-length (LengthGroupedSampler) is not supported")
        hf_settings = dict(iterable=args.iterable_dataset, use_seedable_sampler=args.use_seedable_sampler == "true",
                           split_batches=args.split_batches, dispatch_batches=args.dispatch_batches,
                           even_batches=args.even_batches == "true")
        refuse_unsupported(**hf_settings)  # before the data is opened
        table = build_hf_manifest(args.data, shard_length(trusted_root(args.shards), args.data),
                                  first_step=args.first_step or 0,
                                  steps=steps, seed=args.seed, data_seed=args.data_seed,
                                  per_device_batch_size=args.per_device_train_batch_size,
                                  world_size=args.world_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
                                  num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
                                  drop_last=args.dataloader_drop_last, sampler=args.sampler, **hf_settings)
        dtype = None
        allow_overlap = True  # epochs' tails and even_batches fills repeat rows within a step
    elif args.trainer == "megatron":
        from spike_audit.pipelines.builders.megatron import build_megatron_manifest, load_cache

        if args.dataloader_type != "single":
            raise UserError(f"--dataloader-type {args.dataloader_type} is not supported (only 'single', Megatron's "
                            f"MegatronPretrainingSampler; 'cyclic' reshuffles with its own RNG per epoch)")
        if args.rampup_batch_size is not None:
            raise UserError("--rampup-batch-size is not supported: the batch size changes during the ramp-up, so "
                            "the batch of an iteration is not a fixed slice of the samples")
        cache = load_cache(args.cache, split=args.split)
        pad_id = args.pad_id
        if pad_id is None and args.tokenizer:
            from spike_audit.pipelines.tokenizer import megatron_pad_id

            pad_id = megatron_pad_id(args.tokenizer)  # none when it collides with a special token, as megatron-core does
        if pad_id is None:
            log.info("no --pad-id / --tokenizer: the manifest assumes the Megatron tokenizer has no pad id in the "
                     "data (megatron-core feeds 0 where its pad id occurs)")
        table = build_megatron_manifest(args.data, cache, global_batch_size=args.global_batch_size,
                                        shard_root=args.shards, first_step=args.first_step,
                                        consumed_samples=args.consumed_samples, steps=steps,
                                        add_extra_token=not args.no_extra_token,
                                        micro_batch_size=args.micro_batch_size,
                                        data_parallel_size=args.data_parallel_size, pad_id=pad_id)
        dtype = None
    elif args.trainer == "streaming":
        from spike_audit.pipelines.builders.streaming import (build_streaming_manifest, check_settings, stream_sizes,
                                                           stream_weights)

        weights = {w: _weight_values(w, getattr(args, w)) for w in ("proportion", "repeat", "choose")}
        kw = dict(**weights, batch_size=args.batch_size, shuffle=args.shuffle, shuffle_algo=args.shuffle_algo,
                  shuffle_seed=args.shuffle_seed, shuffle_block_size=args.shuffle_block_size,
                  num_canonical_nodes=args.num_canonical_nodes, partition_algo=args.partition_algo,
                  world_size=args.world_size, ranks_per_node=args.ranks_per_node, num_workers=args.num_workers,
                  drop_last=args.drop_last, epochs=args.epochs, epoch_size=args.epoch_size,
                  sampling_method=args.sampling_method, sampling_granularity=args.sampling_granularity,
                  sample_in_epoch=args.sample_in_epoch, initial_physical_nodes=args.initial_physical_nodes,
                  batching_method=args.batching_method, replication=args.replication)
        check_settings(**kw)  # before the data is read
        stream_weights(len(args.data), epoch_size=args.epoch_size, **weights)
        table = build_streaming_manifest(args.data, stream_sizes(args.shards, args.data),
                                         first_step=args.first_step or 0, steps=steps, **kw)
        dtype = None
        allow_overlap = True  # padding and resampling repeat samples within a step
    else:
        from spike_audit.pipelines.builders.sequential import build_sequential_manifest

        files = _expand_globs(args.shards, _data_files(args))
        if steps is not None:
            raise UserError("--steps is not supported for sequential loaders; use --num-steps")
        table = build_sequential_manifest(files, batch_size=args.batch_size, seq_len=args.seq_len,
                                          world_size=args.world_size, num_steps=args.num_steps,
                                          grad_accum=args.grad_accum, variant=args.variant, shard_root=args.shards,
                                          first_step=args.first_step or 0, dtype=args.dtype)
        dtype = args.dtype
    _check_out(args, table)
    write_manifest(table, args.out)
    steps_col = table.column("step").to_numpy()
    log.info("wrote %s: %d slices, steps %d..%d", args.out, table.num_rows,
             steps_col.min() if len(steps_col) else 0, steps_col.max() if len(steps_col) else -1)
    print(f"{args.out}: {table.num_rows} slices over {len(set(steps_col.tolist()))} steps")
    if args.check:
        from spike_audit.pipelines.shards.paths import trusted_root

        read_manifest(args.out, trusted_root(args.shards), check_shards=True, dtype=dtype, allow_overlap=allow_overlap)
        print(f"{args.out}: checked against the shards")
    return 0
