"""What the tests share (a plain module, imported by the test modules and by conftest.py): starting a script,
the one-line error check, tiny datasets in the real on-disk layouts, small in-memory problems.
No test module imports another test module: what two of them need is here."""
import gzip
import os
import pickle
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from utils import DEBIAN_FASHION_MNIST as FASHION, IDX_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fashion = pytest.mark.needs_fashion  # a test that reads the real Fashion-MNIST: see require_fashion


def require_fashion():
    """Skip the running test when Debian's Fashion-MNIST is not installed, or fail it in CI (CI=true): there
    a missing package must not pass for a green run. (conftest.py calls this for tests marked needs_fashion.)"""
    missing = [f for f in IDX_FILES if not any(os.path.isfile(os.path.join(FASHION, f + z)) for z in ('', '.gz'))]
    if missing:
        reason = f'the real Fashion-MNIST is not in {FASHION} (apt-get install dataset-fashion-mnist)'
        if os.environ.get('CI', '').lower() in ('true', '1'):
            pytest.fail(f'{reason}, and CI must run the tests that need it', pytrace=False)
        pytest.skip(reason)


# ----------------------------------------------------------------------------------------------------
# Starting a script: the one way (a subprocess, as a user runs it), and in this process
# ----------------------------------------------------------------------------------------------------

def command(script, *args):
    """The command line of a script of the project (or any .py path) with these arguments."""
    return [sys.executable, script if os.path.isabs(str(script)) else os.path.join(ROOT, script), *map(str, args)]


def run(script, *args, timeout=900, env=None):
    """Run a script of the project as a user would, to its end; returns the CompletedProcess."""
    return subprocess.run(command(script, *args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def start(script, *args, env=None, **popen):
    """Start a script of the project (to be signalled or killed); returns the Popen, its output piped as text."""
    popen = {'stdout': subprocess.PIPE, 'stderr': subprocess.PIPE, **popen}
    return subprocess.Popen(command(script, *args), text=True, cwd=ROOT, env=env, **popen)


def one_thread():
    """The environment for a process with one thread, as every torchrun process has: for comparing their
    results bit for bit. (Read at the call: the test's environment, offline PYTHONPATH included.)"""
    return {**os.environ, 'OMP_NUM_THREADS': '1'}


def torchrun_command(script, *args, nproc=2):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc),
            *command(script, *args)[1:]]


def torchrun(script, *args, nproc=2, timeout=600):
    """Run a script under torchrun on the CPU, one thread per process."""
    return subprocess.run(torchrun_command(script, *args, nproc=nproc), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=one_thread())


def run_in_process(monkeypatch, capsys, script, *args, main=None):
    """A script's entry point run in this process, as `python script args` would run it (seconds faster
    than a subprocess): its exit status and output, like a CompletedProcess. `main`: run this function
    under runs.run_script instead of the script's `__main__` block."""
    import runpy

    import runs
    monkeypatch.setattr(sys, 'argv', [os.path.basename(script), *map(str, args)])
    with pytest.raises(SystemExit) as end:
        if main is None:
            runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
        else:
            runs.run_script(main)
        sys.exit(0)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=end.value.code or 0, stdout=out.out, stderr=out.err)


def assert_one_line_error(proc, *parts, code=2, match=None):
    """The script ended as bad input must: exit status `code` and exactly one line on stderr, no traceback;
    the line contains every one of `parts` and matches the regular expression `match`.
    `proc`: a CompletedProcess or run_in_process's result. Returns the line."""
    import re
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and 'Traceback' not in proc.stderr, \
        f'exit status {proc.returncode} (expected {code}); stderr:\n{proc.stderr[-3000:]}'
    for part in parts:
        assert part in lines[0], lines[0]
    assert match is None or re.search(match, lines[0]), lines[0]
    return lines[0]


def stopped_at_call(n, fn, calls):
    """fn, except that its n-th call (counted in `calls`) sends this process SIGINT and waits for it."""
    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)
        return fn(*a, **k)
    return wrapped


def dm_args(data, save_path, *flags):
    """main_DM's args for a tiny in-process run on `data` (MNIST layout), as its command line and configure()
    resolve them: setup, then the script's own rules."""
    import main_DM
    from runs import setup
    os.makedirs(save_path, exist_ok=True)
    return main_DM.configure(setup(main_DM.parser().parse_args(
        ['--dataset', 'MNIST', '--data_path', str(data), '--save_path', str(save_path), *map(str, flags)])))


# ----------------------------------------------------------------------------------------------------
# Tiny datasets in the real on-disk layouts
# ----------------------------------------------------------------------------------------------------

def idx_bytes(arr):
    header = bytes([0, 0, 8, arr.ndim]) + b''.join(int(s).to_bytes(4, 'big') for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_mnist(root, name='MNIST', n_train=30, n_test=10, gz=(True, False, True, False), seed=0):
    """A tiny dataset in torchvision's MNIST layout (root/<name>/raw/ IDX files); labels cycle 0..9."""
    rng = np.random.default_rng(seed)
    raw = root / name / 'raw'
    raw.mkdir(parents=True)
    arrays = [rng.integers(0, 256, (n_train, 28, 28)), np.arange(n_train) % 10,
              rng.integers(0, 256, (n_test, 28, 28)), np.arange(n_test) % 10]
    for fname, arr, z in zip(['train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                              't10k-labels-idx1-ubyte'], arrays, gz):
        data = idx_bytes(arr)
        if z:
            with gzip.open(raw / (fname + '.gz'), 'wb') as f:
                f.write(data)
        else:
            (raw / fname).write_bytes(data)
    return arrays


CIFAR_FILES = {'CIFAR10': ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch'], 'labels',
                           'batches.meta', 'label_names'),
               'CIFAR100': ('cifar-100-python', ['train', 'test'], 'fine_labels', 'meta', 'fine_label_names')}


def write_cifar(root, name='CIFAR10', n=4, seed=0, protocol=pickle.DEFAULT_PROTOCOL):
    """A tiny dataset in CIFAR's python layout (root/cifar-10-batches-py/ or root/cifar-100-python/), n images
    per file, labels counting up from the file's index; returns the folder."""
    rng = np.random.default_rng(seed)
    folder, files, key, meta, names = CIFAR_FILES[name]
    num_classes = 10 if name == 'CIFAR10' else 100
    d = root / folder
    d.mkdir(parents=True)
    for i, f in enumerate(files):
        batch = {'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: [(i + k) % num_classes for k in range(n)]}
        (d / f).write_bytes(pickle.dumps(batch, protocol))
    (d / meta).write_bytes(pickle.dumps({names: [f'c{k}' for k in range(num_classes)]}, protocol))
    return d


def patterns(labels, rng):
    """1x28x28 uint8 images: class c is a bright 7x7 square in cell c of a 4x4 grid, on dark noise."""
    x = rng.integers(0, 60, (len(labels), 28, 28))
    for i, c in enumerate(labels):
        r, s = divmod(int(c), 4)
        x[i, 7 * r:7 * r + 7, 7 * s:7 * s + 7] = 255
    return x.astype(np.uint8)


def write_patterns(root, name, n_train=40, n_test=40):
    """A dataset in the MNIST layout whose classes are told apart by the place of a square (learnable in a few
    epochs: a test of accuracy above chance)."""
    raw = root / name / 'raw'
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('t10k', n_test)):
        labels = np.arange(n) % 10
        (raw / f'{split}-images-idx3-ubyte').write_bytes(idx_bytes(patterns(labels, rng)))
        (raw / f'{split}-labels-idx1-ubyte').write_bytes(idx_bytes(labels))


# ----------------------------------------------------------------------------------------------------
# Small problems in memory
# ----------------------------------------------------------------------------------------------------

def tiny(num_classes=3, per_class=8, channel=1, size=12, seed=0):
    """Real images of a few classes, class c around the value c (small, separable), held as ClassImages."""
    import torch
    from utils import ClassImages, TensorDataset
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), channel, size, size, generator=g) + labels.view(-1, 1, 1, 1)
    return ClassImages(TensorDataset(images, labels), num_classes)


def separable(n_per_class, seed):
    """10 classes of 1x12x12 images: class c has a bright 3x3 square at a class-specific place, plus noise."""
    import torch
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    x = torch.randn(len(labels), 1, 12, 12, generator=g) * 0.3
    for c in range(10):
        r, s = divmod(c, 4)
        x[labels == c, 0, 3 * r:3 * r + 3, 3 * s:3 * s + 3] += 2.0
    return x, labels


def crash_and_resume(monkeypatch, run_main, owner, name, n, path):
    """A run cut by an exception at the n-th call of `owner`'s `name` (a module attribute or a dict item: the
    method's iteration), then continued with --resume auto, in `path`. run_main(save_path, *extra) runs the
    script's main and returns its result. Returns the resumed run's result."""
    setter = monkeypatch.setitem if isinstance(owner, dict) else monkeypatch.setattr
    step, calls = (owner[name] if isinstance(owner, dict) else getattr(owner, name)), []

    def crash(*a):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError('crash')
        return step(*a)

    setter(owner, name, crash)
    with pytest.raises(RuntimeError, match='crash'):
        run_main(path)
    setter(owner, name, step)
    return run_main(path, '--resume', 'auto')
