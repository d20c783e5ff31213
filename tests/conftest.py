import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running sweeps; run with -m slow")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    # @pytest.mark.slow tests run only when a -m expression is given (e.g. -m slow)
    if config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
