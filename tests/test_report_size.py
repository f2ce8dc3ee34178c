"""The reports stay light whatever the size of the run or the corpus (issue 14): a run report at 200 events and a
shard report at 10,000 shards, measured on generated tables. Sizes are behaviour (what a browser has to open and a
user has to download), not timing. The bounds are about 10 KB per event and a few hundred KB per shard report;
the report before this change drew one SVG tick per control and family per event (84 KB per event) and one tick
per shard and signal."""

from report_cases import run_case, shard_case

from spike_audit.pipelines.report.run_page import render_run_report
from spike_audit.pipelines.report.shard_page import render_shard_report

MB = 1024 * 1024


def _size(html: str) -> int:
    return len(html.encode("utf-8"))


def test_run_report_at_200_events_is_under_2_mb():
    # every event with a model verdict, per-row losses, 40 flagged rows with 300-character excerpts, 44 families
    html = render_run_report(*run_case(n_events=200, n_controls=200, flags_per_event=40, loss_rows_per_step=64))
    assert html.count("<div class='card'") == 200
    assert _size(html) < 2 * MB, _size(html)


def test_run_report_does_not_grow_with_controls_or_flagged_rows():
    small = _size(render_run_report(*run_case(n_events=10, n_controls=100, flags_per_event=10, loss_rows_per_step=32,
                                              n_steps=2000)))
    many_controls = _size(render_run_report(*run_case(n_events=10, n_controls=1500, flags_per_event=10,
                                                      loss_rows_per_step=32, n_steps=2000)))
    many_rows = _size(render_run_report(*run_case(n_events=10, n_controls=100, flags_per_event=1000,
                                                  loss_rows_per_step=1024, n_steps=2000)))
    assert many_controls < 1.1 * small, (small, many_controls)
    assert many_rows < 1.1 * small, (small, many_rows)


def test_shard_report_at_10000_shards_is_under_400_kb_and_flat_in_the_number_of_shards():
    big = render_shard_report(*shard_case(n_shards=10_000, n_clusters=5_000))
    assert _size(big) < 400 * 1024, _size(big)
    assert "10,000 shards audited" in big
    small = render_shard_report(*shard_case(n_shards=1_000, n_clusters=500))
    assert _size(big) < 1.2 * _size(small), (_size(small), _size(big))
