import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running checks, deselected by pytest.ini; run with -m slow")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

