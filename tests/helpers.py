import gzip
import os
import pickle
import signal
import subprocess
import sys
import time

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


def run(script, *args, timeout=900):
    """Run a script of the project as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def stopped_at_call(n, fn, calls):
    """fn, except that its n-th call (counted in `calls`) sends this process SIGINT and waits for it."""
    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)
        return fn(*a, **k)
    return wrapped


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


def tiny(num_classes=3, per_class=8, channel=1, size=12, seed=0):
    """Real images of a few classes, class c around the value c (small, separable), held as ClassImages."""
    import torch
    from utils import ClassImages, TensorDataset
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), channel, size, size, generator=g) + labels.view(-1, 1, 1, 1)
    return ClassImages(TensorDataset(images, labels), num_classes)
