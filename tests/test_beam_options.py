"""Beam options: the runner is always named (nothing downloaded or executed), and an option neither the command
nor Beam knows is a one-line error (exit 2), never handed to Beam and dropped."""

from __future__ import annotations

import socket

import pytest

from spike_audit.pipelines.beam.options import beam_options
from spike_audit.pipelines.cli.main import main
from spike_audit.pipelines.errors import UserError


def test_no_runner_given_names_the_in_process_runner():
    assert beam_options([]) == ["--runner=FnApiRunner"]
    # Beam's DirectRunner would try (download) its Prism runner first: the same in-process engine is named
    assert beam_options(["--runner", "DirectRunner"]) == ["--runner=FnApiRunner"]
    assert beam_options(["--runner=PrismRunner"]) == ["--runner=PrismRunner"]  # asked for explicitly
    assert beam_options(["--direct_num_workers=2"]) == ["--direct_num_workers=2", "--runner=FnApiRunner"]


def test_a_pipeline_without_runner_makes_no_network_attempt_and_never_starts_prism(monkeypatch, tmp_path):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability import prism_runner

    from spike_audit.pipelines.beam.runner import run_pipeline

    attempts = []
    real_connect = socket.socket.connect

    def connect(self, addr):
        host = addr[0] if isinstance(addr, tuple) else addr
        if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
            attempts.append(addr)
            raise OSError("network disabled by the test")
        return real_connect(self, addr)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection",
                        lambda addr, *a, **k: attempts.append(addr) or (_ for _ in ()).throw(OSError("no network")))

    def no_prism(*a, **k):
        raise AssertionError("the Prism runner was started")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", no_prism)
    out = tmp_path / "out.txt"
    opts = PipelineOptions(beam_options([]))
    assert opts.get_all_options()["runner"] == "FnApiRunner"

    def build(p):
        (p | beam.Create([1, 2, 3]) | beam.CombineGlobally(sum)
         | beam.Map(lambda s: out.write_text(str(s))))

    run_pipeline(build, opts)
    assert out.read_text() == "6"
    assert attempts == []


@pytest.mark.parametrize("argv", [
    ["run", "--log", "L", "--manifest", "M", "--shards", "S", "--out", "O", "--controlz", "5", "--alpah", "0.5"],
    ["shards", "nowhere", "--out", "O", "--quarantine_z=3"],
    ["demo", "--dir", "D", "--sed", "1"],
])
def test_misspelled_options_are_a_one_line_error_before_any_work(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unrecognized arguments" in err, err
    bad = [a for a in argv if a.startswith("--") and a.split("=")[0] in ("--controlz", "--alpah", "--quarantine_z",
                                                                          "--sed")]
    for a in bad:
        assert a in err
    assert "not found" not in err  # refused before any input was looked at
    assert list(tmp_path.iterdir()) == []  # and nothing written


def test_beam_options_are_still_accepted():
    flags = beam_options(["--direct_num_workers", "2", "--direct_running_mode=multi_threading"])
    assert "--direct_running_mode=multi_threading" in flags
    with pytest.raises(UserError, match="unknown runner"):
        beam_options(["--runner=NoSuchRunner"])
    with pytest.raises(UserError, match="expected a runner name"):
        beam_options(["--runner"])
