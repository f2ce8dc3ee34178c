"""The options that widen where a manifest's shard names may point (the rule:
:mod:`spike_audit.pipelines.shards.paths`), shared by ``batch``, ``run`` and ``replay``."""

from __future__ import annotations


def add_confinement_arguments(p) -> None:
    """``--allow-outside-root`` and ``--allow-urls`` (the rule: :mod:`spike_audit.pipelines.shards.paths`)."""
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read shards the manifest names outside the shard root (../, absolute paths, symlinks out)")
    p.add_argument("--allow-urls", action="store_true",
                   help="read shards the manifest names as URLs (file://, http://, s3://...) under a local root")


def shard_root_of(args):
    from spike_audit.pipelines.shards.paths import ShardRoot

    root = args.shards if args.shards is not None else "."
    return ShardRoot(root, allow_outside_root=args.allow_outside_root, allow_urls=args.allow_urls)
