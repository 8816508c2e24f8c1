"""Every test runs offline and on the CPU, and so does every process a test starts. The fixtures the test
modules share; the markers (pytest.ini): e2e, torchrun, slow, needs_fashion."""
import os
import shutil

os.environ['CUDA_VISIBLE_DEVICES'] = ''  # set before torch is imported anywhere; inherited by subprocesses

import pytest  # noqa: E402

from helpers import require_fashion, write_mnist  # noqa: E402
from offline.sitecustomize import block_network  # noqa: E402

pytest_plugins = ['pytester']
OFFLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'offline')
SLOW = 20  # seconds: a test that takes longer is marked slow


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Connections go to loopback or unix sockets only: in this process, and (through PYTHONPATH, which
    makes Python import offline/sitecustomize.py at startup) in every process the test starts."""
    block_network(monkeypatch.setattr)
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [OFFLINE, os.environ.get('PYTHONPATH')])))


def pytest_runtest_setup(item):
    if item.get_closest_marker('needs_fashion'):
        require_fashion()


@pytest.fixture(scope='session')
def data(tmp_path_factory):
    """A data path holding a tiny MNIST (100 training images, 40 test images, labels cycling 0..9), shared by
    the whole session: read it, never write into it (see fresh_data)."""
    path = tmp_path_factory.mktemp('data')
    write_mnist(path, n_train=100, n_test=40)
    return path


@pytest.fixture
def fresh_data(data, tmp_path):
    """A test's own copy of `data`, for a test that puts files into the data path (e.g. released memories)."""
    return shutil.copytree(data, tmp_path / 'data')


# A test over SLOW seconds that is not marked slow is named at the end of the run (the machine's load varies,
# so it is a note to look at, not a failure).
_unmarked_slow = []


def pytest_runtest_logreport(report):
    if report.when == 'call' and report.duration > SLOW and 'slow' not in report.keywords:
        _unmarked_slow.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter):
    if _unmarked_slow:
        terminalreporter.section(f'tests over {SLOW} s not marked slow')
        for nodeid, seconds in _unmarked_slow:
            terminalreporter.line(f'{seconds:6.1f} s  {nodeid}')
