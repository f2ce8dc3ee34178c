import pytest


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo run (real text, planted spikes, a resume), built once per test session."""
    from pipelines.demo import DemoConfig, make_demo

    root = tmp_path_factory.mktemp("demo")
    truth = make_demo(root / "run", DemoConfig())
    return root, truth
