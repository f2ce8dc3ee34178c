"""The command line: one thin module per command (``spikes``, ``batch``, ``run``, ``shards``, ``demo``,
``manifest``, ``replay``): parse the arguments, call the library, print. ``main`` (in :mod:`.main`) builds the parser
from them and turns a user's mistake into a one-line error with exit code 2.

May import anything below it: the pipelines (``run``, ``shard_audit``), the demo, readers, builders, io,
errors, auditors and schemas. Nothing imports the command line (except ``python -m``).
"""
