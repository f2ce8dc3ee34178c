"""Self-contained HTML reports (inline SVG, no scripts, no network): open the file in any browser.

Modules: ``run_page`` (``render_run_report``), ``shard_page`` (``render_shard_report``), ``charts`` (what both share),
``loss_strip`` (the per-row loss strip and summary of the model-based verdict).
The pages are fed tables (and the config they were made with) by the pipelines that produced them.

May import: auditors, schemas, :mod:`spike_audit.pipelines.io` and :mod:`spike_audit.pipelines.errors` only; never a
pipeline (``run``, ``shard_audit``), Beam or the readers.
"""
