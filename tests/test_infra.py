"""The test infrastructure itself: offline, on the CPU, and a missing real dataset fails CI."""
import os
import socket
import subprocess
import sys

import pytest

import helpers

pytestmark = pytest.mark.tooling

OFFLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'offline')  # (see conftest.py)

CONNECT_OUT = '''
import socket, sys
for connect in (lambda: socket.create_connection(('8.8.8.8', 53), timeout=5),
                lambda: socket.socket().connect(('1.1.1.1', 80)),
                lambda: socket.socket(socket.AF_INET6).connect_ex(('2001:4860:4860::8888', 53, 0, 0))):
    try:
        connect()
        print('connected')
    except OSError as e:
        print(e)
socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5).sendall(b'loopback works')
'''


@pytest.fixture
def server():
    """A listening socket on the loopback interface."""
    with socket.create_server(('127.0.0.1', 0)) as s:
        yield s


def test_this_process_cannot_connect_out_but_loopback_works(server):
    with pytest.raises(OSError, match=r"tests run offline: no connection to \('8.8.8.8', 53\)"):
        socket.create_connection(('8.8.8.8', 53), timeout=5)
    with socket.socket() as s, pytest.raises(OSError, match='tests run offline'):
        s.connect(('93.184.215.14', 443))
    with socket.socket() as s, pytest.raises(OSError, match='tests run offline'):
        s.connect_ex(('example.org', 443))
    for host in ('127.0.0.1', 'localhost'):
        with socket.create_connection((host, server.getsockname()[1]), timeout=5):
            pass


def test_a_process_started_by_a_test_cannot_connect_out_but_loopback_works(server):
    p = subprocess.run([sys.executable, '-c', CONNECT_OUT, str(server.getsockname()[1])], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["tests run offline: no connection to ('8.8.8.8', 53)",
                                     "tests run offline: no connection to ('1.1.1.1', 80)",
                                     "tests run offline: no connection to ('2001:4860:4860::8888', 53, 0, 0)"]
    conn, _ = server.accept()
    with conn:
        assert conn.recv(100) == b'loopback works'


def test_every_way_a_test_starts_a_process_keeps_it_offline():
    for env in (os.environ, helpers.one_thread()):  # (run, start, run_in_process; torchrun)
        assert OFFLINE in env['PYTHONPATH'].split(os.pathsep) and env['CUDA_VISIBLE_DEVICES'] == ''
    assert helpers.command('main.py', '--ipc', 1)[1:] == [os.path.join(helpers.ROOT, 'main.py'), '--ipc', '1']


def test_tests_and_their_processes_see_no_gpu():
    import torch
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '' and torch.cuda.device_count() == 0
    p = subprocess.run([sys.executable, '-c', 'import os, torch; print(repr(os.environ["CUDA_VISIBLE_DEVICES"]), '
                        'torch.cuda.is_available())'], capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["''", 'False'], p.stderr


@pytest.mark.parametrize('ci', [None, 'true'])
def test_needs_fashion_skips_without_the_data_and_fails_in_ci(pytester, monkeypatch, tmp_path, ci):
    pytester.makeconftest(open(os.path.join(helpers.ROOT, 'tests', 'conftest.py')).read())  # this project's
    pytester.makepyfile('from helpers import needs_fashion\n\n@needs_fashion\ndef test_reads_it():\n    pass\n')
    monkeypatch.setattr(helpers, 'FASHION', str(tmp_path / 'nowhere'))
    monkeypatch.delenv('CI', raising=False)
    if ci:
        monkeypatch.setenv('CI', ci)
    result = pytester.runpytest_inprocess('-rsE')
    if ci:
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(['*Fashion-MNIST is not in */nowhere*CI must run the tests that need it*'])
    else:
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(['*Fashion-MNIST is not in */nowhere (apt-get install dataset-fashion-mnist)*'])
    monkeypatch.setattr(helpers, 'FASHION', str(tmp_path))  # with the four files present, the test runs
    helpers.write_mnist(tmp_path, 'x')
    for f in (tmp_path / 'x' / 'raw').iterdir():
        f.rename(tmp_path / f.name)
    pytester.runpytest_inprocess().assert_outcomes(passed=1)
