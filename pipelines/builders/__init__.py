"""Step manifests from trainers' own data-order files.

- :mod:`.olmo`: OLMo / OLMo-core ``global_indices`` over token memmaps.
- :mod:`.megatron`: Megatron-LM ``GPTDataset`` index caches over ``.bin/.idx``.
- :mod:`.hf`: Hugging Face ``Trainer`` / torch ``DistributedSampler`` order from the seed.
- :mod:`.streaming`: mosaicml-streaming ``StreamingDataset`` + ``DataLoader`` order from its settings.
- :mod:`.sequential`: sequential loaders (modded-nanogpt ``DistributedDataLoader``
  as in its 2024-10 records; llm.c ``dataloader.h`` without shuffling).

Each builder returns a ``STEP_MANIFEST`` table (write it with
:func:`spike_audit.pipelines.manifest.write_manifest`) whose slices are exactly the tokens the trainer fed at
each step, including the extra target token where the trainer reads ``seq_len + 1`` tokens.
``step_range`` turns a requested step range into global batch indices.

May import: :mod:`spike_audit.pipelines.manifest`, the readers (``shards``), ``io``, ``errors`` and schemas;
never Beam, a pipeline or the command line.
"""

from spike_audit.pipelines.builders.megatron import build_megatron_manifest
from spike_audit.pipelines.builders.olmo import build_olmo_manifest
from spike_audit.pipelines.builders.sequential import build_sequential_manifest

__all__ = ["build_megatron_manifest", "build_olmo_manifest", "build_sequential_manifest"]
