"""Every test runs offline and on the CPU, and so does every process a test starts."""
import os

os.environ['CUDA_VISIBLE_DEVICES'] = ''  # set before torch is imported anywhere; inherited by subprocesses

import pytest  # noqa: E402

from helpers import require_fashion  # noqa: E402
from offline.sitecustomize import block_network  # noqa: E402

pytest_plugins = ['pytester']
OFFLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'offline')


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Connections go to loopback or unix sockets only: in this process, and (through PYTHONPATH, which
    makes Python import offline/sitecustomize.py at startup) in every process the test starts."""
    block_network(monkeypatch.setattr)
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [OFFLINE, os.environ.get('PYTHONPATH')])))


def pytest_runtest_setup(item):
    if item.get_closest_marker('needs_fashion'):
        require_fashion()
