"""The plumbing of spike-audit: log readers, manifest builders, shard readers, Beam pipelines, the
report writer and the command line. Imports :mod:`auditors` and :mod:`schemas`, never the reverse."""
