import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# The folder's helper modules (``report_cases``) import: with ``--import-mode=importlib`` pytest puts no test
# folder on ``sys.path``. The package under test is still the installed one (its sources are not in here).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# CI runs the property tests on a fixed example sequence (reproducible: a red CI is a real
# regression, never a newly drawn example); local runs keep exploring new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo run (real text, planted spikes, a resume), built once per test session."""
    from spike_audit.pipelines.demo import DemoConfig, make_demo

    root = tmp_path_factory.mktemp("demo")
    truth = make_demo(root / "run", DemoConfig())
    return root, truth


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A generated corpus: 50 clean Parquet shards of real text and 4 planted anomalous ones."""
    from spike_audit.pipelines.demo import make_shard_corpus

    root = tmp_path_factory.mktemp("corpus")
    truth = make_shard_corpus(root / "shards", n_clean=50, rows_per_shard=120)
    return root, truth
