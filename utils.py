"""What the methods of dataset condensation call: the papers' `utils` API, importable and copyable on its own
(with networks.py).

Data (the real datasets, held once as one normalised tensor, read by safe readers), model choice, DSA's
differentiable Siamese augmentation and DC's classic one, gradient matching, training and evaluation of
networks, coresets, the synthetic set, and the few low-level pieces these need (seeds, safe file writes,
torchrun primitives). The public names and return values are those of the papers' code (get_dataset,
get_network, get_eval_pool, evaluate_synset, DiffAugment, ParamDiffAug, match_loss, get_loops, get_daparam,
epoch, TensorDataset, get_time), so follow-up code that imports them works. The run harness (command line,
records, checkpoints, the experiment loop) is runs.py; nothing here imports it.
"""
import argparse
import contextlib
import copy
import dataclasses
import gzip
import hashlib
import json
import math
import os
import pickle
import random
import re
import socket
import struct
import time
import warnings
import zipfile
import zlib
import logging
from functools import cache, partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from tqdm import tqdm

from networks import MODELS


class StopRun(Exception):
    """Ends a script with its message on one line of stderr and exit status `code`."""
    code = 1


class UsageError(StopRun):
    """Bad input: exit status 2."""
    code = 2


class Diverged(StopRun):
    """The loss or the synthetic images became non-finite: exit status 3."""
    code = 3


def get_time():
    return time.strftime('[%Y-%m-%d %H:%M:%S]')


log = logging.getLogger('dc')


def say(message):
    """A message for the user: through logging when the program set it up (runs.py does, so that only the
    main process of a job prints), else on the console beside any progress bar."""
    if log.hasHandlers():
        log.info(message)
    else:
        tqdm.write(message)


# --- Datasets -----------------------------------------------------------------------------------------------

# name: (channel, im_size, num_classes, mean, std)
DATASETS = {
    'MNIST': (1, (28, 28), 10, [0.1307], [0.3081]),
    'FashionMNIST': (1, (28, 28), 10, [0.2861], [0.3530]),
    'SVHN': (3, (32, 32), 10, [0.4377, 0.4438, 0.4728], [0.1980, 0.2010, 0.1970]),
    'CIFAR10': (3, (32, 32), 10, [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
    'CIFAR100': (3, (32, 32), 100, [0.5071, 0.4866, 0.4409], [0.2673, 0.2564, 0.2762]),
    'TinyImageNet': (3, (64, 64), 200, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
IDX_FILES = ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte']
MNIST_CLASSES = {'MNIST': [str(c) for c in range(10)],
                 'FashionMNIST': ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                                  'Sneaker', 'Bag', 'Ankle boot']}


class TensorDataset(Dataset):
    """Images and labels held as two tensors. Indexing with a list or tensor returns a whole batch."""

    def __init__(self, images, labels):  # images: n x c x h x w tensor
        self.images = images.detach().float()
        self.labels = labels.detach()

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __len__(self):
        return self.images.shape[0]


def tensor_loader(images, labels, batch_size, shuffle=False):
    """A DataLoader over tensors that fetches whole batches by indexing (no per-sample calls)."""
    dataset = TensorDataset(images, labels)
    sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last=False))


# What readers of damaged files (gzip, pickle, torch.load, scipy.io.loadmat, PIL) raise; named one by one, so that
# a stop signal is never taken for a bad file
DAMAGED = (OSError, EOFError, ValueError, TypeError, LookupError, AttributeError, ArithmeticError, MemoryError,
           struct.error, zlib.error, pickle.UnpicklingError)


def _why(e):
    """An exception's type and the first line of its message."""
    return ': '.join([type(e).__name__, *str(e).strip().splitlines()[:1]])


def _read_idx(path):
    """An IDX file of the MNIST family (optionally gzipped) as a numpy array."""
    try:
        with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
            data = bytearray(f.read())  # writable, so torch can share it
    except DAMAGED as e:  # unreadable, or a truncated or corrupt .gz
        raise UsageError(f'cannot read {path}: {_why(e)}') from None
    if len(data) < 4 or data[:3] != b'\x00\x00\x08':
        raise UsageError(f'{path} is not an IDX file of unsigned bytes')
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    if len(data) != 4 + 4 * ndim + math.prod(shape):  # also when the header itself is cut short
        raise UsageError(f'{path} is truncated or corrupt')
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _partial(folder, names, found):
    """Stop when a dataset's folder holds some of its files but not all of them."""
    if any(found) and not all(found):
        missing = [n for n, f in zip(names, found) if not f]
        raise UsageError(f'{folder} holds part of the dataset; missing: {", ".join(missing)}')


def _load_mnist_like(name, data_path):
    dirs = [os.path.join(data_path, name, 'raw'), os.path.join(data_path, name)]
    if name == 'FashionMNIST':
        dirs.append(DEBIAN_FASHION_MNIST)
    for d in dirs:
        found = [next((p for p in (os.path.join(d, f), os.path.join(d, f + '.gz')) if os.path.isfile(p)), None)
                 for f in IDX_FILES]
        _partial(d, IDX_FILES, found)
        if all(found):
            x_train, y_train, x_test, y_test = map(_read_idx, found)
            return x_train[:, None], y_train, x_test[:, None], y_test, MNIST_CLASSES[name]
    return None


def _pickle_globals():
    """What a pickle of plain data and numpy arrays (pickled by numpy 1 or 2, Python 2 or 3) may name."""
    names = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}
    for core in ('numpy.core', 'numpy._core'):
        names |= {(f'{core}.multiarray', '_reconstruct'), (f'{core}.numeric', '_frombuffer'), (f'{core}.multiarray', 'scalar')}
    return names | {(m, t) for m in ('builtins', '__builtin__') for t in ('set', 'frozenset', 'complex')}


class _DataUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays, and refuses any other global (the documented way to restrict
    them: find_class): a data file cannot run code."""
    GLOBALS = _pickle_globals()

    def find_class(self, module, name):
        if (module, name) not in self.GLOBALS:
            raise pickle.UnpicklingError(f'refusing {module}.{name} in a data file')
        if module.startswith('numpy.core'):  # numpy 1's names, numpy._core in numpy 2
            module = 'numpy._core' + module[len('numpy.core'):] if hasattr(np, '_core') else module
        return super().find_class(module, name)


def _unpickle(path):
    try:
        with open(path, 'rb') as f:
            return _DataUnpickler(f, encoding='latin1').load()
    except DAMAGED as e:
        raise UsageError(f'cannot read {path}: {_why(e)}') from None


def _cifar_split(path, key):
    """Images [N,3,32,32] and labels [N] of one of CIFAR's python files."""
    d = _unpickle(path)
    try:
        x, y = np.asarray(d['data']), np.asarray(d[key])
    except (TypeError, LookupError, ValueError):  # not a dict, a key missing, ragged lists
        x = y = None
    if x is None or x.dtype != np.uint8 or x.shape[1:] != (3072,) or y.shape != x.shape[:1] or y.dtype.kind not in 'iu':
        raise UsageError(f"{path} must hold a dict with 'data' (uint8, N x 3072) and {key!r} (N integer labels)")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _load_cifar(name, data_path):
    folder, train, test, key, names = {
        'CIFAR10': ('cifar-10-batches-py', [f'data_batch_{i}' for i in range(1, 6)], 'test_batch', 'labels', 'label_names'),
        'CIFAR100': ('cifar-100-python', ['train'], 'test', 'fine_labels', 'fine_label_names')}[name]
    root = os.path.join(data_path, folder)
    meta = os.path.join(root, 'batches.meta' if name == 'CIFAR10' else 'meta')
    found = [os.path.isfile(os.path.join(root, f)) for f in train + [test]]
    _partial(root, train + [test], found)
    if not all(found):
        return None
    xs, ys = zip(*[_cifar_split(os.path.join(root, f), key) for f in train + [test]])
    classes = [str(c) for c in range(DATASETS[name][2])]
    if os.path.isfile(meta):
        d = _unpickle(meta)
        classes = d.get(names) if isinstance(d, dict) else None
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise UsageError(f'{meta} must hold a dict with {names!r}, a list of class names')
    return np.concatenate(xs[:-1]), np.concatenate(ys[:-1]), xs[-1], ys[-1], classes


def _load_svhn(name, data_path):
    import scipy.io
    paths = [os.path.join(data_path, f'{split}_32x32.mat') for split in ('train', 'test')]
    found = list(map(os.path.isfile, paths))
    _partial(data_path, [os.path.basename(p) for p in paths], found)
    if not all(found):
        return None
    out = []
    for p in paths:
        try:
            mat = scipy.io.loadmat(p)
        except (*DAMAGED, UnboundLocalError, NotImplementedError, scipy.io.matlab.MatReadError) as e:  # v7.3 is HDF5
            raise UsageError(f'cannot read {p}: {_why(e)}') from None
        x, y = mat.get('X'), mat.get('y')
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 4 and x.shape[:3] == (32, 32, 3)
                and isinstance(y, np.ndarray) and y.size == x.shape[3] and y.dtype.kind in 'iuf' and (y == y.astype(int)).all()):
            raise UsageError(f"{p} must hold 'X' (uint8, 32 x 32 x 3 x N) and 'y' (N whole-number labels)")
        out += [x.transpose(3, 2, 0, 1), y.reshape(-1).astype(np.int64) % 10]  # label 10 is digit 0
    return (*out, [str(c) for c in range(10)])


def _load_tinyimagenet(name, data_path):
    path = os.path.join(data_path, 'tinyimagenet.pt')
    if not os.path.isfile(path):
        return None
    data = load_pt(path, {'images_train': torch.Tensor, 'labels_train': torch.Tensor, 'images_val': torch.Tensor,
                          'labels_val': torch.Tensor, 'classes': list})
    for split in ('train', 'val'):
        x, y = data[f'images_{split}'], data[f'labels_{split}']
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1:] != (3, 64, 64):
            raise UsageError(f'{path}: images_{split} must be uint8 [N,3,64,64]')
        if y.shape != x.shape[:1] or y.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            raise UsageError(f'{path}: labels_{split} must be [N] integers, one per image')
    return data['images_train'], data['labels_train'], data['images_val'], data['labels_val'], data['classes']


TORCHVISION_LOADERS = {'MNIST': _load_mnist_like, 'FashionMNIST': _load_mnist_like, 'SVHN': _load_svhn,
                       'CIFAR10': _load_cifar, 'CIFAR100': _load_cifar, 'TinyImageNet': _load_tinyimagenet}
EXPECTED_FILES = {
    'MNIST': 'the four IDX files (' + ', '.join(IDX_FILES) + ', optionally .gz) in {p}/MNIST/raw/',
    'FashionMNIST': 'the four IDX files (' + ', '.join(IDX_FILES) + ', optionally .gz) in {p}/FashionMNIST/raw/'
                    ' (or apt-get install dataset-fashion-mnist)',
    'SVHN': 'train_32x32.mat and test_32x32.mat in {p}/',
    'CIFAR10': 'the python batches (data_batch_1..5, test_batch) in {p}/cifar-10-batches-py/',
    'CIFAR100': 'the python files (train, test, meta) in {p}/cifar-100-python/',
    'TinyImageNet': 'tinyimagenet.pt in {p}/',
}


def _download(name, data_path):
    """Let torchvision download a dataset into its own layout. Returns the reason when that fails."""
    import torchvision.datasets as tvd
    if name == 'TinyImageNet':
        return 'no public download'
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        os.makedirs(data_path, exist_ok=True)
        for split in (True, False):
            if name == 'SVHN':
                tvd.SVHN(data_path, split='train' if split else 'test', download=True)
            else:
                getattr(tvd, name)(data_path, train=split, download=True)
        return None
    except (OSError, RuntimeError, ValueError) as e:  # offline, refused, or a broken mirror: say why on one line
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    finally:
        socket.setdefaulttimeout(old_timeout)


class _DecodeResized:
    """Open an image file as RGB (or L) and resize it to (h, w) unless it already has that size. Returns
    (image, ok); a file that is not a readable image gives ok=False and a blank image, not an exception
    inside a DataLoader worker."""

    def __init__(self, size, mode):
        self.size, self.mode = size, mode

    def __call__(self, path):
        from PIL import Image
        try:
            with open(path, 'rb') as f:
                img, ok = Image.open(f).convert(self.mode), True
        except (*DAMAGED, SyntaxError, Image.DecompressionBombError):
            img, ok = Image.new(self.mode, (self.size[1], self.size[0])), False
        if img.size != (self.size[1], self.size[0]):
            img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img, np.uint8).copy()).reshape(self.size[0], self.size[1], -1).permute(2, 0, 1), ok


def _decode_folder(folder, im_size, channel):
    """All images of an ImageFolder tree as one uint8 tensor, decoded by parallel DataLoader workers."""
    from torchvision.datasets import ImageFolder
    try:
        ds = ImageFolder(folder, loader=_DecodeResized(im_size, 'L' if channel == 1 else 'RGB'))
    except OSError as e:  # no class folders, or a class folder without images
        raise UsageError(f'{folder} must hold <class>/<image files> ({e})') from None
    batches = list(tqdm(DataLoader(ds, batch_size=500, num_workers=min(4, os.cpu_count() or 1)),
                        desc=f'decoding {folder}', leave=False))
    ok = torch.cat([o for (_, o), _ in batches])
    if not ok.all():
        raise UsageError(f'cannot read image {ds.samples[int((~ok).nonzero()[0])][0]}')
    return torch.cat([x for (x, _), _ in batches]), torch.cat([y for _, y in batches]), ds.classes


def _load_tree(root, im_size, channel):
    """An image-folder tree root/train/<class>/*, root/test/<class>/* as uint8 tensors, decoded once and
    then cached beside the tree as one tensor file (keyed by the file list, sizes and image size)."""
    splits = [os.path.join(root, s) for s in ('train', 'test')]
    if not all(map(os.path.isdir, splits)):
        return None
    listing = [(os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
               for s in splits for d, _, files in sorted(os.walk(s)) for f in sorted(files)]
    key = hashlib.sha1(repr((listing, tuple(im_size), channel)).encode()).hexdigest()[:16]
    stem = os.path.join(root, f'.cache_{im_size[0]}x{im_size[1]}_{channel}ch_')
    cache = stem + key + '.pt'
    with contextlib.suppress(*DAMAGED, RuntimeError, AssertionError):
        d = torch.load(cache, weights_only=True)  # no cache yet, or an unreadable one: decode afresh
        return d['x_train'], d['y_train'], d['x_test'], d['y_test'], d['classes']
    x_train, y_train, classes = _decode_folder(splits[0], im_size, channel)
    x_test, y_test, test_classes = _decode_folder(splits[1], im_size, channel)
    if test_classes != classes:
        raise UsageError(f'{root}: train/ and test/ must have the same class folders; not in both: '
                         + ', '.join(sorted(set(classes) ^ set(test_classes))))
    if not Group.current().main:  # under torchrun rank 0 writes the cache
        return x_train, y_train, x_test, y_test, classes
    with contextlib.suppress(UsageError, OSError):  # a read-only data folder just means no cache
        remove_stale_temporaries(root)
        atomic_save(dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=classes), cache)
        for old in os.listdir(root):  # caches of an earlier state of the tree
            if os.path.join(root, old).startswith(stem) and os.path.join(root, old) != cache:
                os.remove(os.path.join(root, old))
    return x_train, y_train, x_test, y_test, classes


def get_dataset(dataset, data_path, im_size=None, device='cpu', zca=False):
    """Load a dataset as normalised tensors, held once on `device`. Returns (channel, im_size, num_classes,
    class_names, mean, std, dst_train, dst_test, testloader), as the papers' code. Named datasets are read from
    torchvision's layout in `data_path` (downloaded when the network allows) or an image-folder tree
    `data_path/<name>/train|test/<class>/*`; 'ImageFolder' reads a user's tree `data_path/train|test`, resized
    to `im_size` (default 32x32), with the mean/std of its training split. `zca` (MTT's CIFAR rows): [0, 1]
    pixels whitened by ZCA (zca_fit on the training images; mean 0, std 1 returned; dst_train.zca holds it)."""
    if os.path.exists(data_path) and not os.path.isdir(data_path):  # (not silently passed over for a system copy)
        raise UsageError(f'the data path {data_path} is a file, not a folder')
    if dataset == 'ImageFolder':
        im_size = tuple(im_size or (32, 32))
        arrays = _load_tree(data_path, im_size, 3)
        if arrays is None:
            raise UsageError(f'--dataset ImageFolder needs {data_path}/train/<class>/* and {data_path}/test/<class>/*')
        channel, num_classes = 3, len(arrays[4])
        x = torch.as_tensor(arrays[0]).float().div_(255)
        mean, std = x.mean((0, 2, 3)).tolist(), [s or 1.0 for s in x.std((0, 2, 3)).tolist()]  # (a flat channel: 1)
        del x
    elif dataset in DATASETS:
        channel, im_size, num_classes, mean, std = DATASETS[dataset]
        arrays = TORCHVISION_LOADERS[dataset](dataset, data_path) or _load_tree(os.path.join(data_path, dataset), im_size, channel)
        if arrays is None:
            reason = _download(dataset, data_path)
            arrays = TORCHVISION_LOADERS[dataset](dataset, data_path)
            if arrays is None:
                raise UsageError(f'{dataset} not found and not downloadable ({reason}): put '
                                 + EXPECTED_FILES[dataset].format(p=data_path)
                                 + f', or an image-folder tree in {data_path}/{dataset}/train|test/<class>/')
        if len(arrays[4]) != num_classes:
            raise UsageError(f'{dataset} must have {num_classes} classes, found {len(arrays[4])}')
    else:
        raise UsageError(f'unknown dataset {dataset!r}; choose from {", ".join([*DATASETS, "ImageFolder"])}')

    def normalise(x, y, split):
        x, y = torch.as_tensor(x), torch.as_tensor(y).long()
        if x.shape[1:] != (channel, *im_size) or len(y) != len(x):
            raise UsageError(f'{dataset} {split} images have shape {tuple(x.shape[1:])}, expected {(channel, *im_size)}')
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise UsageError(f'{dataset} {split} labels must lie in 0..{num_classes - 1}')
        images = x.to(device).float().div_(255)
        images = images.sub_(torch.tensor(mean, device=device).view(-1, 1, 1)).div_(torch.tensor(std, device=device).view(-1, 1, 1))
        return TensorDataset(images, y.to(device))

    if zca:
        mean, std = [0.0] * channel, [1.0] * channel
    dst_train = normalise(arrays[0], arrays[1], 'train')
    dst_test = normalise(arrays[2], arrays[3], 'test')
    dst_train.fingerprint, dst_train.zca = fingerprint(arrays[:4]), zca_fit(dst_train.images) if zca else None
    for d in (dst_train, dst_test) if zca else ():
        d.images = zca_apply(d.images, *dst_train.zca[:2])
    testloader = tensor_loader(dst_test.images, dst_test.labels, 256)
    return channel, tuple(im_size), num_classes, list(arrays[4]), mean, std, dst_train, dst_test, testloader


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What a run derives from its data: shape, classes, normalisation and identity (a hash of the images and
    labels). Passed explicitly to what needs it; never written into the flags."""
    dataset: str
    channel: int
    im_size: tuple
    num_classes: int
    class_names: tuple
    mean: tuple
    std: tuple
    data_id: str
    zca: tuple = dataclasses.field(default=None, compare=False, repr=False)  # (mean, T, T_inv) of whitened data

    @classmethod
    def of(cls, dataset, loaded):
        """The info of get_dataset's result `loaded` (channel, im_size, num_classes, class_names, mean, std, ...)."""
        channel, im_size, num_classes, class_names, mean, std, dst_train = loaded[:7]
        return cls(dataset, channel, tuple(im_size), num_classes, tuple(class_names), tuple(mean), tuple(std),
                   dst_train.fingerprint, getattr(dst_train, 'zca', None))

    def record(self):
        """As plain JSON values, for records (with zca: whether the data are whitened)."""
        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {'zca': self.zca is not None}))

    def pixels(self, images):
        """The [0, 1] pixels of images in this data's normalisation (un-whitened with zca), for pictures."""
        if self.zca is not None:
            return zca_inverse(images, *(t.to(images.device) for t in self.zca[::2])).clamp(0, 1)
        return denormalise(images, self.mean, self.std)


def zca_fit(images, eps=0.1, chunk=2048):
    """ZCA as kornia's ZCAWhitening(eps) fits it (MTT's): images [N,C,H,W], unbiased covariance U S U^T; returns
    (mean [D], T = U (S + eps)^-1/2 U^T, its inverse U (S + eps)^1/2 U^T), float64, D = C*H*W, in chunks of images."""
    flat = images.reshape(len(images), -1)
    mean = sum(c.double().sum(0) for c in flat.split(chunk)) / len(flat)
    cov = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
    for c in flat.split(chunk):
        d = c.double() - mean
        cov.addmm_(d.t(), d)
    S, U = torch.linalg.eigh(cov / (len(flat) - 1))  # (symmetric: its eigen-decomposition is kornia's SVD)
    S = S.clamp_min(0)
    return mean, (U * (S + eps).rsqrt()) @ U.t(), (U * (S + eps).sqrt()) @ U.t()


def zca_apply(x, mean, T, chunk=4096):
    """Whiten images [N,C,H,W]: (x - mean) @ T per flattened image, in float64; returned in x's dtype and shape."""
    out = [((c.reshape(len(c), -1).double() - mean) @ T).to(x.dtype) for c in x.split(chunk)]
    return torch.cat(out).reshape(x.shape) if out else x.clone()


def zca_inverse(x, mean, T_inv, chunk=4096):
    """Undo zca_apply (for pictures): x @ T_inv + mean."""
    out = [(c.reshape(len(c), -1).double() @ T_inv + mean).to(x.dtype) for c in x.split(chunk)]
    return torch.cat(out).reshape(x.shape) if out else x.clone()


def fingerprint(arrays):
    """A short hash of a dataset's images and labels: which data a run used (another image folder under
    the same --data_path, say, is other data)."""
    h = hashlib.sha1()
    for a in arrays:
        a = torch.as_tensor(a).contiguous().numpy()
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


class ClassImages:
    """The real training images, held once (on the device of `dst_train`) and indexed by class."""

    def __init__(self, dst_train, num_classes):
        self.images, labels = dst_train.images, dst_train.labels
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=num_classes).tolist()
        self.indices_class = list(order.split(counts))
        self.keys, self.streams, self.flat = None, {}, None

    def start(self, *keys):
        """Give every class a random stream of its own, seeded by keys (e.g. seed, experiment, iteration) and
        the class: what is drawn for a class then depends neither on the other classes nor on the order
        (or the process) in which they are handled."""
        self.keys, self.streams = keys, {}

    def rng(self, c, stream='class'):
        """Class c's random stream since start() (torch's global generator before any start()); other
        `stream` names give the class further streams of its own (e.g. for draws every process makes)."""
        if self.keys is None:
            return None
        if (c, stream) not in self.streams:
            self.streams[c, stream] = generator(*self.keys, stream, c)
        return self.streams[c, stream]

    def subset(self, classes):
        """The same images seen as a dataset of `classes` only, relabelled 0..len(classes)-1 (no copy)."""
        sub = copy.copy(self)
        sub.indices_class = [self.indices_class[c] for c in classes]
        sub.keys, sub.streams, sub.flat = None, {}, None
        return sub

    def get_images(self, c, n, stream='class'):
        """n random images of class c, drawn from its stream without replacement (all of them if the class
        has fewer)."""
        idx = self.indices_class[c]
        return self.images[idx[torch.randperm(len(idx), generator=self.rng(c, stream))[:n].to(idx.device)]]

    def sample(self, n):
        """n random images of all classes (without replacement, from torch's global generator) and their
        labels, the class indices of this view."""
        if self.flat is None:  # (every image's index and label, once)
            idx = torch.cat(self.indices_class)
            self.flat = idx, torch.arange(len(self.indices_class), device=idx.device).repeat_interleave(
                torch.tensor([len(i) for i in self.indices_class], device=idx.device))
        idx, labels = self.flat
        pick = torch.randperm(len(idx))[:n].to(idx.device)
        return self.images[idx[pick]], labels[pick]


# --- Models -------------------------------------------------------------------------------------------------

def pick_device(device='auto'):
    if device in (None, 'auto'):
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ('cpu', 'cuda'):
        raise UsageError(f'unknown device {device!r}; use auto, cpu, cuda or cuda:<index>')
    if dev.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f'--device {device}: no CUDA device is available')
        if (dev.index or 0) >= count:
            raise UsageError(f'--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}')
    return str(dev)


def get_network(model, channel, num_classes, im_size=(32, 32), device=None):
    """A freshly initialised model of the family `model` (see networks.MODELS), on `device`
    (default: CUDA when available). Its initialisation draws from torch's global generator."""
    if model not in MODELS:
        raise UsageError(f'unknown model {model!r}; choose from {", ".join(MODELS)}')
    return MODELS[model](channel, num_classes, im_size=tuple(im_size)).to(device or pick_device())


def _embed(net, x):
    return net.embed(x)


@cache
def _compiled_embed():  # built on first use: importing torch's compiler takes seconds
    return torch.compile(_embed, dynamic=False)  # compiles once per architecture and input shape


def autocast(args):
    """--amp: bfloat16 autocast for the forward and backward passes (condensation, evaluation). The synthetic
    images, their gradients, optimiser states and losses stay float32; every layer takes bfloat16 (each was
    faster so: docs/speed.md; GroupNorm still accumulates its statistics in float32)."""
    # no cast cache: a cached bfloat16 copy of a weight would go stale as the weights train inside one context
    return torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=bool(getattr(args, 'amp', False)),
                          cache_enabled=False)


@torch.no_grad()
def embed(net, images, chunk=256, compiled=False):
    """net.embed(images) without autograd, `chunk` images at a time (None: as one batch, which
    BatchNorm in train mode needs), as float32. `compiled`: through torch.compile, in channels-last
    memory format (fuses normalisation, activation and pooling)."""
    if compiled:
        images = images.contiguous(memory_format=torch.channels_last)
    return torch.cat([(_compiled_embed() if compiled else _embed)(net, x).float() for x in images.split(chunk or len(images))])


def batchnorm_layers(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(net):
    return bool(batchnorm_layers(net))


EVAL_POOLS = {
    'M': ['MLP', 'ConvNet', 'LeNet', 'AlexNet', 'VGG11', 'ResNet18'],  # multiple architectures
    'B': ['ConvNetBN', 'ConvNetASwishBN', 'AlexNetBN', 'VGG11BN', 'ResNet18BN'],  # with BatchNorm
    'W': ['ConvNetW32', 'ConvNetW64', 'ConvNetW128', 'ConvNetW256'],  # width
    'D': ['ConvNetD1', 'ConvNetD2', 'ConvNetD3', 'ConvNetD4'],  # depth
    'A': ['ConvNetAS', 'ConvNetAR', 'ConvNetAL', 'ConvNetASwish'],  # activation
    'P': ['ConvNetNP', 'ConvNetMP', 'ConvNetAP'],  # pooling
    'N': ['ConvNetNN', 'ConvNetBN', 'ConvNetLN', 'ConvNetIN', 'ConvNetGN'],  # normalisation
}
EVAL_MODES = ['S', 'SS', *EVAL_POOLS]


def get_eval_pool(eval_mode, model, model_eval):
    """The models a synthetic set is evaluated on. S: the training model, a BatchNorm model as its
    non-BN twin (a synthetic set is too small to estimate BN statistics); SS: the training model itself."""
    if eval_mode in EVAL_POOLS:
        return list(EVAL_POOLS[eval_mode])
    if eval_mode == 'S':
        return [model[:model.index('BN')]] if 'BN' in model else [model]
    if eval_mode == 'SS':
        return [model]
    return [model_eval]


# --- Differentiable Siamese augmentation (DSA) --------------------------------------------------------------

class ParamDiffAug:
    def __init__(self):
        self.aug_mode = 'S'  # 'S': one transformation of the strategy per call; 'M': all of them, in turn
        self.prob_flip = 0.5
        self.ratio_scale = 1.2
        self.ratio_rotate = 15.0
        self.ratio_crop_pad = 0.125
        self.ratio_cutout = 0.5  # the size would be 0.5x0.5
        self.brightness = 1.0
        self.saturation = 2.0
        self.contrast = 0.5


def DiffAugment(x, strategy='', seed=-1, param=None, generator=None):
    """Augment the batch x (N,C,H,W) differentiably with the `_`-separated `strategy`.

    seed >= 0 (Siamese): one parameter draw, from a generator seeded with `seed`, shared by every image,
    so two calls with the same seed (e.g. on a real and a synthetic batch) apply the same transformation.
    seed = -1: every image draws its own parameters, from `generator` (default: torch's global one).
    """
    if strategy in NO_STRATEGY:
        return x
    param = param or ParamDiffAug()
    gen = torch.Generator().manual_seed(seed) if seed >= 0 else generator
    n = 1 if seed >= 0 else x.shape[0]

    def rand(*shape):  # uniform [0,1) draws, one row per image (or a single one), on x's device
        return torch.rand(n, *shape, generator=gen).to(x.device, x.dtype)

    def randint(low, high):
        return torch.randint(low, high, (n,), generator=gen).to(x.device)

    names = strategy.split('_')
    if param.aug_mode == 'S':
        names = [names[int(torch.randint(len(names), (1,), generator=gen))]]
    for name in names:
        x = AUGMENT_FNS[name](x, param, rand, randint)
    return x.contiguous()


def _affine(x, theta, mode='bilinear'):
    """Resample x with the affine maps theta (n,2,3), n = 1 or N, zero outside."""
    grid = F.affine_grid(theta, [len(theta), *x.shape[1:]], align_corners=False)
    return F.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode=mode, align_corners=False)


def _translate(x, tx, ty):
    """out[..., i, j] = x[..., i + tx, j + ty], zero outside; tx, ty: integer tensors of length 1 or N."""
    N, C, H, W = x.shape
    rows = torch.arange(H, device=x.device) + tx.view(-1, 1)
    cols = torch.arange(W, device=x.device) + ty.view(-1, 1)
    inside = ((rows >= 0) & (rows < H))[:, None, :, None] & ((cols >= 0) & (cols < W))[:, None, None, :]
    x = x.gather(2, rows.clamp(0, H - 1)[:, None, :, None].expand(N, C, H, W))
    x = x.gather(3, cols.clamp(0, W - 1)[:, None, None, :].expand(N, C, H, W))
    return x * inside


def rand_scale(x, param, rand, randint):
    r = param.ratio_scale
    s = rand(2) * (r - 1.0 / r) + 1.0 / r
    theta = torch.zeros(len(s), 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
    return _affine(x, theta)


def rand_rotate(x, param, rand, randint):
    a = (rand() - 0.5) * 2 * param.ratio_rotate / 180 * math.pi
    cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def rand_flip(x, param, rand, randint):
    return torch.where(rand().view(-1, 1, 1, 1) < param.prob_flip, x.flip(3), x)


def rand_brightness(x, param, rand, randint):
    return x + (rand().view(-1, 1, 1, 1) - 0.5) * param.brightness


def rand_saturation(x, param, rand, randint):
    x_mean = x.mean(dim=1, keepdim=True)
    return (x - x_mean) * (rand().view(-1, 1, 1, 1) * param.saturation) + x_mean


def rand_contrast(x, param, rand, randint):
    x_mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - x_mean) * (rand().view(-1, 1, 1, 1) + param.contrast) + x_mean


def rand_crop(x, param, rand, randint):  # translate by up to ratio_crop_pad of the size, zero padded
    sx, sy = int(x.size(2) * param.ratio_crop_pad + 0.5), int(x.size(3) * param.ratio_crop_pad + 0.5)
    return _translate(x, randint(-sx, sx + 1), randint(-sy, sy + 1))


def rand_cutout(x, param, rand, randint):  # zero a square of ratio_cutout of the size at a random centre
    H, W = x.shape[2:]
    ch, cw = int(H * param.ratio_cutout + 0.5), int(W * param.ratio_cutout + 0.5)
    top = randint(0, H + (1 - ch % 2)).view(-1, 1) - ch // 2
    left = randint(0, W + (1 - cw % 2)).view(-1, 1) - cw // 2
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    in_rows, in_cols = (rows >= top) & (rows < top + ch), (cols >= left) & (cols < left + cw)
    return x * ~(in_rows[:, None, :, None] & in_cols[:, None, None, :])


def _color(x, param, rand, randint):
    for f in (rand_brightness, rand_saturation, rand_contrast):
        x = f(x, param, rand, randint)
    return x


AUGMENT_FNS = {'color': _color, 'crop': rand_crop, 'cutout': rand_cutout, 'flip': rand_flip,
               'scale': rand_scale, 'rotate': rand_rotate}


def siamese_augment(batches, args, generator=None):
    """The batches (e.g. a class's real and synthetic images) through one and the same random DSA
    transformation, drawn from `generator` (e.g. the class's stream real.rng(c); default: torch's global one)."""
    seed = int(torch.randint(2 ** 31 - 1, (), generator=generator))
    return [DiffAugment(x, args.dsa_strategy, seed=seed, param=getattr(args, 'dsa_param', None)) for x in batches]


FULL_STRATEGY = 'color_crop_cutout_flip_scale_rotate'
DIGITS = ('MNIST', 'SVHN')
NO_STRATEGY = ('', 'none', 'None', None)  # (None: not given, where a script picks one by rule)


def default_strategy(dataset):
    """The DSA paper's strategy for a dataset: all six transformations, but no flip for the digit
    datasets MNIST and SVHN ("flip is not good for digit datasets")."""
    return FULL_STRATEGY.replace('flip_', '') if dataset in DIGITS else FULL_STRATEGY


def check_strategy(strategy):
    if strategy in NO_STRATEGY:
        return
    bad = [s for s in strategy.split('_') if s not in AUGMENT_FNS]
    if bad:
        raise UsageError(f'unknown augmentation {bad[0]!r} in --dsa_strategy; use a _-separated list of '
                         + ' '.join(AUGMENT_FNS) + ', or none')


# --- DC's classic augmentation (evaluation only) ------------------------------------------------------------

def get_daparam(dataset, model, model_eval, ipc):
    """DC's evaluation augmentation: MNIST gets crop/scale/rotate, BatchNorm ConvNets crop/noise."""
    dc_aug_param = dict(crop=4, scale=0.2, rotate=45, noise=0.001, strategy='none')
    if dataset == 'MNIST':
        dc_aug_param['strategy'] = 'crop_scale_rotate'
    if model_eval in ['ConvNetBN']:  # Data augmentation makes model training with Batch Norm layer easier.
        dc_aug_param['strategy'] = 'crop_noise'
    return dc_aug_param


def augment(images, dc_aug_param, device=None, generator=None):
    """Each image gets one transformation of the strategy, drawn per image (from `generator`, default
    torch's global one): crop (shift by up to `crop` pixels, filled with the channel mean), scale (by
    1 +- `scale`), rotate (by up to `rotate` degrees, filled with the mean) or noise (Gaussian, std `noise`)."""
    if not dc_aug_param or dc_aug_param['strategy'] == 'none':
        return images
    p, names, g = dc_aug_param, dc_aug_param['strategy'].split('_'), generator
    mean = images.mean((0, 2, 3), keepdim=True)

    def crop(x):
        tx, ty = (torch.randint(0, 2 * p['crop'], (len(x),), generator=g).to(x.device) - p['crop'] for _ in range(2))
        return _translate(x - mean, tx, ty) + mean

    def scale(x):
        s = 1 + (torch.rand(len(x), 2, generator=g).to(x.device) * 2 - 1) * p['scale']
        theta = torch.zeros(len(x), 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 1, 1] = 1 / s[:, 1], 1 / s[:, 0]
        return _affine(x, theta, mode='nearest')

    def rotate(x):
        a = torch.randint(-p['rotate'], p['rotate'], (len(x),), generator=g).to(x.device) * (math.pi / 180)
        zero, fill = torch.zeros_like(a), mean.mean()
        theta = torch.stack([torch.stack([a.cos(), -a.sin(), zero], 1), torch.stack([a.sin(), a.cos(), zero], 1)], 1)
        return _affine(x - fill, theta) + fill

    def noise(x):
        return x + p['noise'] * torch.randn(x.shape, generator=g).to(x.device)

    fns = dict(crop=crop, scale=scale, rotate=rotate, noise=noise)
    choice = torch.randint(len(names), (len(images),), generator=g)
    out = images.clone()
    for k, name in enumerate(names):
        idx = (choice == k).nonzero().flatten().to(images.device)
        if len(idx):
            out[idx] = fns[name](images[idx])
    return out


# --- Gradient matching (DC, DSA) ----------------------------------------------------------------------------

LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def get_loops(ipc):
    """(outer_loop, inner_loop) of DC/DSA. The papers' values for ipc 1, 10, 20, 30, 40, 50; between
    them both are interpolated linearly (rounded) and above 50 they stay at (50, 10)."""
    if ipc in LOOPS:
        return LOOPS[ipc]
    if ipc > 50:
        return LOOPS[50]
    lo = max(k for k in LOOPS if k < ipc)
    hi = min(k for k in LOOPS if k > ipc)
    t = (ipc - lo) / (hi - lo)
    return tuple(round(a + t * (b - a)) for a, b in zip(LOOPS[lo], LOOPS[hi]))


def distance_wb(gwr, gws):
    """Sum over output units of 1 - cosine similarity; 1-D parameters (biases, norms) contribute 0."""
    if gwr.dim() == 1:
        return torch.zeros((), device=gwr.device)
    gwr, gws = gwr.reshape(gwr.shape[0], -1), gws.reshape(gws.shape[0], -1)
    return torch.sum(1 - torch.sum(gwr * gws, dim=-1) / (gwr.norm(dim=-1) * gws.norm(dim=-1) + 0.000001))


def match_loss(gw_syn, gw_real, args):
    """Distance between two lists of gradients: 'ours' (layer-wise, per output unit), 'mse' or 'cos'."""
    if args.dis_metric == 'ours':
        return sum(distance_wb(gr, gs) for gr, gs in zip(gw_real, gw_syn))
    gr = torch.cat([g.reshape(-1) for g in gw_real])
    gs = torch.cat([g.reshape(-1) for g in gw_syn])
    if args.dis_metric == 'mse':
        return torch.sum((gs - gr) ** 2)
    if args.dis_metric == 'cos':
        return 1 - torch.sum(gr * gs) / (gr.norm() * gs.norm() + 0.000001)
    raise UsageError(f'unknown distance {args.dis_metric!r}; use ours, mse or cos')


def class_gradients(net, images, label, create_graph=False, chunk=64):
    """Gradients of the mean cross-entropy of `images`, all of class `label`, with respect to the
    parameters of `net`. With create_graph (synthetic images) they stay differentiable; without
    (real images: constants) the batch goes through the CPU `chunk` images at a time, which keeps the
    activations in cache (same values: the network must not be a BatchNorm net in train mode)."""
    chunk = chunk if images.device.type == 'cpu' else len(images)  # a GPU wants the whole batch
    params = [p for p in net.parameters() if p.requires_grad]
    target = torch.full((len(images),), label, device=images.device, dtype=torch.long)
    if create_graph:
        return torch.autograd.grad(F.cross_entropy(net(images), target), params, create_graph=True)
    grads = None
    for x, y in zip(images.split(chunk), target.split(chunk)):
        g = torch.autograd.grad(F.cross_entropy(net(x), y, reduction='sum') / len(images), params)
        grads = g if grads is None else [a.add_(b) for a, b in zip(grads, g)]
    return grads


# --- Training and evaluation of networks --------------------------------------------------------------------

def augmented(images, args, generator=None):
    """The method's training-time augmentation: DSA's (every image its own draw) or DC's classic one."""
    if args.dsa:
        return DiffAugment(images, args.dsa_strategy, param=getattr(args, 'dsa_param', None), generator=generator)
    return augment(images, getattr(args, 'dc_aug_param', None), generator=generator)  # (main_DM.py sets none)


def run_epoch(mode, dataloader, net, optimizer, criterion, args, aug):
    """One pass over dataloader; returns (summed loss, correct, count) as device tensors (no host sync)."""
    train = mode == 'train'
    net.train(train)
    loss_sum = torch.zeros((), device=args.device)
    correct = torch.zeros((), device=args.device, dtype=torch.long)
    count = 0
    with torch.set_grad_enabled(train):
        for img, lab in dataloader:  # (lab: class indices, or soft labels [batch, classes])
            img, lab = img.to(args.device).float(), lab.to(args.device)
            if aug:
                img = augmented(img, args)
            if hasattr(criterion, 'relabel'):  # (a teacher labelling every augmented batch)
                lab = criterion.relabel(img, lab)
            output = net(img)
            loss = criterion(output, lab if lab.dim() > 1 else lab.long())
            if train:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            loss_sum += loss.detach() * len(lab)
            correct += (output.argmax(1) == (lab.argmax(1) if lab.dim() > 1 else lab)).sum()
            count += len(lab)
    return loss_sum, correct, count


def epoch(mode, dataloader, net, optimizer, criterion, args, aug):
    """Train ('train') or test one pass over dataloader; returns (mean loss, accuracy)."""
    loss_sum, correct, count = run_epoch(mode, dataloader, net, optimizer, criterion, args, aug)
    loss, correct = torch.stack([loss_sum, correct.float()]).tolist()
    return loss / max(count, 1), correct / max(count, 1)


def untouched_rng(args):
    """A context that leaves torch's random generators (CPU, and args.device's) as it found them: around a test
    on the way, whose DataLoader draws a seed, so that training goes on as without it."""
    device = torch.device(args.device)
    return torch.random.fork_rng(devices=[device] if device.type == 'cuda' else [], device_type=device.type)


def test_epochs(args):
    """The epochs after which an evaluation model is tested: every args.test_every (0: none) and the last."""
    every, last = int(getattr(args, 'test_every', 0) or 0), int(args.epoch_eval_train)
    return sorted(set(range(every, last, every) if every else ()) | {last})


def eval_schedule(args):
    """The evaluation models' schedule, as (epochs, index of the epoch after which the rate drops x0.1, whether a
    new optimiser starts there). 'papers' (default; their evaluate_synset): Epoch + 1 epochs, a new SGD (momentum
    restarted) after epoch index Epoch // 2 + 1. 'toolkit-0.1' (before 0.2.0): Epoch epochs, the rate x0.1 in place
    after Epoch // 2 of them."""
    Epoch, papers = int(args.epoch_eval_train), getattr(args, 'eval_schedule', 'papers') == 'papers'
    return (Epoch + 1, Epoch // 2 + 1, True) if papers else (Epoch, Epoch // 2 - 1, False)


def decayed(optimizer, params, lr, fresh):
    """The optimiser after the schedule's drop to `lr`: a new SGD (the papers') or the same one (toolkit-0.1)."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.0005) if fresh else optimizer


def train_and_test(it_eval, net, images_train, labels_train, testloader, args, train_criterion=None):
    """Train `net` on the synthetic set only (SGD lr_net, momentum 0.9, weight decay 5e-4, batch batch_train, the
    method's augmentation; epochs and the drop of the rate x0.1 as eval_schedule says; cross-entropy, or
    train_criterion, as DATM's, e.g. on soft labels [N, classes]), then test it on the real test set (and every
    args.test_every epochs on the way). Returns (net, acc_train, acc_test, curve at test_epochs)."""
    net = net.to(args.device)
    images_train, labels_train = images_train.to(args.device), labels_train.to(args.device)
    lr, Epoch = float(args.lr_net), int(args.epoch_eval_train)
    epochs, decay_after, fresh = eval_schedule(args)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    criterion, train = nn.CrossEntropyLoss(), train_criterion or nn.CrossEntropyLoss()
    trainloader = tensor_loader(images_train, labels_train, args.batch_train, shuffle=True)
    start, tests, curve = time.time(), test_epochs(args)[:-1], []
    for ep in tqdm(range(epochs), desc=f'training evaluation model {it_eval}', leave=False, dynamic_ncols=True,
                   disable=not Group.current().main):
        stats = run_epoch('train', trainloader, net, optimizer, train, args, aug=True)
        if ep == decay_after:
            optimizer = decayed(optimizer, net.parameters(), lr * 0.1, fresh)
        if ep + 1 in tests:
            with untouched_rng(args):
                curve.append(epoch('test', testloader, net, optimizer, criterion, args, aug=False)[1])
    loss_train, correct, count = stats if epochs else (torch.zeros(()), torch.zeros(()), 1)
    loss_train, acc_train = loss_train.item() / count, correct.item() / count
    time_train = time.time() - start
    loss_test, acc_test = epoch('test', testloader, net, optimizer, criterion, args, aug=False)
    say('%s Evaluate_%02d: epoch = %04d train time = %d s train loss = %.6f train acc = %.4f, test acc = %.4f'
        % (get_time(), it_eval, Epoch, int(time_train), loss_train, acc_train, acc_test))
    return net, acc_train, acc_test, curve + [acc_test]


def evaluate_synset(it_eval, net, images_train, labels_train, testloader, args, train_criterion=None):
    """The papers' evaluation of a synthetic set (see train_and_test). Returns (net, acc_train, acc_test)."""
    return train_and_test(it_eval, net, images_train, labels_train, testloader, args, train_criterion)[:3]


def evaluation_args(args, model_eval, noaug_epochs=300):
    """The evaluation settings of a model_eval trained on a set: the rule of the papers, stated once. The method's
    augmentation (DSA if args.dsa, else DC's classic one for the dataset and model) and the epochs: 1000 with
    augmentation, else `noaug_epochs` (the method's: 300, CAFE's 600), unless args.epoch_eval_train is set.
    Returns a new namespace: args with dc_aug_param and epoch_eval_train."""
    dc_aug_param = None if args.dsa else get_daparam(args.dataset, args.model, model_eval, args.ipc)
    epochs = args.epoch_eval_train
    if epochs is None:
        epochs = 1000 if args.dsa or dc_aug_param['strategy'] != 'none' else noaug_epochs
    return argparse.Namespace(**{**vars(args), 'dc_aug_param': dc_aug_param, 'epoch_eval_train': epochs})


EVAL_GROUP = 10  # --eval_together: at most this many models of an architecture in one batched computation


def evaluate_models(images, labels, model_pool, args, testloader, data, seed_keys=(), noaug_epochs=300, group=None,
                    finished=None, on_finish=None, curves=None, train_criterion=None):
    """Evaluate a synthetic set on num_eval fresh models of every architecture in model_pool (evaluation_args).
    Each model trains on a random stream seeded by (--seed, seed_keys, architecture, number), so evaluating never
    changes the condensation and an accuracy is the same wherever it is computed: the models are shared out among
    the processes of `group` (default: the job's; Group() keeps them all here) and their accuracies gathered.
    `finished` ({(architecture, numbers): accuracies}, filled in as models finish) lets a stopped evaluation
    continue without training them again; `on_finish()` follows every model this process trains; `curves`
    (with args.test_every) is filled in alike with each model's accuracies at test_epochs. `labels` may be soft
    [N, classes], with a `train_criterion` for them (train_and_test)."""
    jobs = []  # (architecture, the numbers of its models, trained together?): BatchNorm models alone
    for m in model_pool:
        numbers = list(range(args.num_eval))
        if getattr(args, 'eval_together', False) and not has_batchnorm(get_network(m, data.channel, 2, data.im_size, 'cpu')):
            jobs += [(m, numbers[i:i + EVAL_GROUP], True) for i in range(0, len(numbers), EVAL_GROUP)]
        else:
            jobs += [(m, [k], False) for k in numbers]
    group = group or Group.current()
    finished = {} if finished is None else finished
    mine = {}
    with untouched_rng(args), autocast(args):
        for j, (model_eval, numbers, together) in enumerate(jobs):
            if j % group.world != group.rank or (model_eval, tuple(numbers)) in finished:
                continue
            a = evaluation_args(args, model_eval, noaug_epochs)
            if together:  # (--eval_together: together.py, for GPUs)
                from together import train_together
                keys = [(args.seed, *seed_keys, 'eval', model_eval, k) for k in numbers]
                result, curve = train_together(model_eval, keys, images, labels, testloader, a, data, train_criterion)
            else:
                set_seed(args.seed, *seed_keys, 'eval', model_eval, numbers[0])
                net = get_network(model_eval, data.channel, data.num_classes, data.im_size, args.device)
                _, _, acc, curve = train_and_test(numbers[0], net, images.detach(), labels, testloader, a, train_criterion)
                result, curve = [acc], [curve]
            mine[model_eval, tuple(numbers)] = curve
            if curves is not None and getattr(args, 'test_every', 0):  # (filled in as `finished`: a stop keeps them)
                curves[model_eval, tuple(numbers)] = curve
            finished[model_eval, tuple(numbers)] = result
            if on_finish:
                on_finish()
    if curves is not None and getattr(args, 'test_every', 0):
        curves.update({k: c for part in (gather_objects(mine) if group.world > 1 else [mine]) for k, c in part.items()})
    done = {k: accs for part in (gather_objects(finished) if group.world > 1 else [finished]) for k, accs in part.items()}
    finished.update(done)  # (every process's models: the caller may save them)
    accs = {m: [a for model_eval, numbers, _ in jobs if model_eval == m for a in done[model_eval, tuple(numbers)]]
            for m in model_pool}
    for m in model_pool:
        say('Evaluate %d random %s, mean = %.4f std = %.4f' % (args.num_eval, m, np.mean(accs[m]), np.std(accs[m])))
    return accs


@torch.no_grad()
def correct(net, images, labels, chunk=256):
    """How many of `images` `net` (in eval mode) classifies as `labels`, as a device tensor."""
    mode = net.training
    net.eval()
    right = sum((net(x).argmax(1) == y).sum() for x, y in zip(images.split(chunk), labels.split(chunk)))
    net.train(mode)
    return right


def accuracy(net, images, labels, chunk=256):
    """Fraction of `images` that `net` (in eval mode) classifies as `labels`, as a device tensor."""
    return correct(net, images, labels, chunk) / len(labels)


# --- Coreset selection (the baselines of the papers' tables) ------------------------------------------------

def train_classifier(net, real, classes, args, epochs, checkpoint=None):
    """Train `net` on all real training images of `classes` (relabelled 0..len(classes)-1), without
    augmentation, with the evaluation protocol's optimiser (SGD lr_net, momentum 0.9, weight decay
    5e-4, batch batch_train, lr x0.1 after half the epochs); with `checkpoint`, a file saved every epoch from which
    a rerun continues bit for bit. Returns the [epochs, N] record of whether each image (in the order of the
    classes' indices) was classified correctly when it was presented."""
    index = torch.cat([real.indices_class[c] for c in classes])
    labels = torch.arange(len(classes), device=index.device).repeat_interleave(
        torch.tensor([len(real.indices_class[c]) for c in classes], device=index.device))
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr_net, momentum=0.9, weight_decay=0.0005)
    device = index.device
    correct, start = torch.zeros(epochs, len(index), dtype=torch.bool, device=device), 0
    if checkpoint and os.path.isfile(checkpoint):  # (its name holds the key of the training: see trained_classifier)
        saved = load_pt(checkpoint)
        net.load_state_dict(saved['net'])
        optimizer.load_state_dict(saved['optimizer'])
        correct, start = saved['correct'].to(device), saved['epoch']
        torch.set_rng_state(saved['rng'][0])
        if device.type == 'cuda':
            torch.cuda.set_rng_state(saved['rng'][1], device)
    net.train()
    for ep in tqdm(range(start, epochs), desc='training a network on the real data', initial=start, total=epochs,
                   leave=False, dynamic_ncols=True):
        if ep == epochs // 2 and ep > 0:
            for group in optimizer.param_groups:
                group['lr'] = args.lr_net * 0.1
        for batch in torch.randperm(len(index), device=index.device).split(args.batch_train):
            output = net(real.images[index[batch]])
            loss = F.cross_entropy(output, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct[ep, batch] = output.argmax(1) == labels[batch]
        if checkpoint and Group.current().main:
            rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == 'cuda' else [])
            atomic_save(dict(net=net.state_dict(), optimizer=optimizer.state_dict(), correct=correct.cpu(), epoch=ep + 1,
                             rng=rng), checkpoint)
    return correct


def trained_classifier(real, classes, args, data, epochs):
    """A --model trained for `epochs` on the real images of `classes` (train_classifier), in eval mode, and its
    [epochs, N] record of correct classifications. Herding, k-center, forgetting and IT-GAN's inversion use
    this network, trained in a random stream seeded by one draw from torch's global generator and kept in
    --save_path (classifier_<dataset>_<model>_<epochs>ep_<key>.pt): a run with the same data, settings and draw
    reads it back, and gets the same network, record and random draws afterwards either way (a stopped training
    continues from its last epoch, kept in classifier_..._<key>.partial.pt)."""
    seed = int(torch.randint(2 ** 62, ()))
    key = dict(data_id=data.data_id, dataset=data.dataset, model=args.model,
               channel=data.channel, im_size=list(data.im_size), classes=[int(c) for c in classes], epochs=epochs,
               lr_net=args.lr_net, batch_train=args.batch_train, amp=bool(getattr(args, 'amp', False)),
               device=torch.device(args.device).type, torch=str(torch.__version__), seed=seed)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = getattr(args, 'save_path', None)
    path = folder and os.path.join(folder, f'classifier_{key["dataset"]}_{args.model}_{epochs}ep_{digest}.pt')
    with untouched_rng(args):
        torch.manual_seed(seed)
        net = get_network(args.model, data.channel, len(classes), data.im_size, args.device)
        if path and os.path.isfile(path):
            with contextlib.suppress(UsageError):  # (a damaged file is trained again)
                saved = load_pt(path, {'key': dict, 'state': dict, 'correct': torch.Tensor})
                if saved['key'] == key:
                    net.load_state_dict(saved['state'])
                    return net.eval(), saved['correct'].to(args.device)
        with autocast(args):
            correct = train_classifier(net, real, classes, args, epochs, checkpoint=path and f'{path[:-3]}.partial.pt')
    if path and Group.current().main:
        atomic_save(dict(key=key, state=net.state_dict(), correct=correct.cpu()), path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(f'{path[:-3]}.partial.pt')
    return net.eval(), correct


def herding(features, n):
    """n rows of `features` (one class), picked greedily so that the mean of the picks stays as close
    as possible to the mean of all rows (Welling, 2009). Returns their indices in picking order."""
    mean, total = features.mean(0), torch.zeros_like(features[0])
    sq_norms = features.square().sum(1)
    free = torch.ones(len(features), dtype=torch.bool, device=features.device)
    picks = []
    for k in range(1, min(n, len(features)) + 1):
        target = k * mean - total  # the next pick x should minimise |target - x|^2
        dist = (sq_norms - 2 * features @ target).masked_fill(~free, math.inf)
        i = dist.argmin()
        picks.append(i)
        free[i] = False
        total += features[i]
    return torch.stack(picks)


def nearest_to_mean(features, n):
    """The n rows of `features` nearest their mean, nearest first."""
    return (features - features.mean(0)).square().sum(1).topk(min(n, len(features)), largest=False).indices


HERDING = {'greedy': herding, 'nearest': nearest_to_mean}
FORGETTING = ['toneva', 'events']


def k_center(features, n):
    """n rows of `features` picked by greedy k-center (Sener & Savarese, 2018): first the row nearest
    the mean, then again and again the row farthest from all picks so far. Returns their indices."""
    sq_norms = features.square().sum(1)

    def sq_dist(x):  # squared distance of every row to x
        return (sq_norms - 2 * features @ x + x.square().sum()).clamp_min(0)

    picks, nearest = [], torch.full_like(sq_norms, math.inf)  # squared distance to the nearest pick
    i = sq_dist(features.mean(0)).argmin()
    for _ in range(min(n, len(features))):
        picks.append(i)
        nearest = torch.minimum(nearest, sq_dist(features[i])).index_fill_(0, i.view(1), -math.inf)
        i = nearest.argmax()
    return torch.stack(picks)


def forgetting_counts(correct, rule='events'):
    """correct: [T, N] bool, whether each of N examples was classified correctly at each of T
    presentations. Returns the number of forgetting events per example (correct at one presentation,
    wrong at the next; Toneva et al., 2019). rule 'events': an example never classified correctly counts
    its events, none (as DeepCore's forgetting counts, and what reproduces the DC paper's forgetting row);
    'toneva': it counts T, more than any learned example (Toneva et al.'s ranking)."""
    events = (correct[:-1] & ~correct[1:]).sum(0)
    return torch.where(correct.any(0), events, correct.shape[0]) if rule == 'toneva' else events


CORESETS = ['random', 'herding', 'kcenter', 'forgetting']


def select_coreset(method, real, args, data, n, classes=None):
    """Indices into real.images of n images per class of `classes` (default: all), one tensor per class,
    chosen by `method`: random, herding or kcenter (in the embedding of a --model network trained for
    --coreset_epochs on the real images of these classes) or forgetting (the images that this training
    forgot most often; ties broken at random). args.herding: its rule (HERDING; default nearest, main.py's;
    CL_DM.py's is greedy); args.forgetting_score: forgetting's (forgetting_counts; default events)."""
    classes = list(range(data.num_classes)) if classes is None else list(classes)
    if method == 'random':
        return [real.indices_class[c][torch.randperm(len(real.indices_class[c]), device=real.images.device)[:n]]
                for c in classes]
    net, correct = trained_classifier(real, classes, args, data, args.coreset_epochs)
    picks = []
    for c, counts in zip(classes, correct.split([len(real.indices_class[c]) for c in classes], dim=1)):
        idx = real.indices_class[c]
        if method == 'forgetting':
            score = forgetting_counts(counts, getattr(args, 'forgetting_score', 'events')) \
                + 0.5 * torch.rand(len(idx), device=idx.device)
            picks.append(idx[score.topk(min(n, len(idx))).indices])
        else:
            features = embed(net, real.images[idx])
            pick = HERDING[getattr(args, 'herding', 'nearest')] if method == 'herding' else k_center
            picks.append(idx[pick(features, n)])
    return picks


# --- Seeds, saving ------------------------------------------------------------------------------------------

def _seed_of(*keys):
    """One 32-bit seed from a tuple of non-negative ints and strings."""
    ints = [k if isinstance(k, int) else int(hashlib.sha1(str(k).encode()).hexdigest()[:8], 16) for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


def set_seed(*keys):
    """Seed torch (CPU and CUDA), numpy and random from a tuple of non-negative ints and strings."""
    seed = _seed_of(*keys)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def generator(*keys):
    """A random stream of its own: a CPU torch.Generator seeded from a tuple of ints and strings."""
    return torch.Generator().manual_seed(_seed_of(*keys))


def _numpy_safe_globals():
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    dtypes = [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    return [multiarray.scalar, (multiarray.scalar, 'numpy.core.multiarray.scalar'), np.dtype, *dtypes]


NUMPY_SAFE_GLOBALS = _numpy_safe_globals()
# what torch.load raises on a truncated, corrupt or unsafe file (never a stop signal: those are BaseExceptions)
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, IndexError,
               AttributeError, ImportError, OSError, zipfile.BadZipFile, struct.error, MemoryError)


def _load_failure(e):
    """Why torch.load refused a file, in a few words."""
    unsafe = re.search(r'(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)', str(e))
    if unsafe:
        return f'it holds {unsafe.group(1)}, which is not plain data (loading it could run code)'
    first = re.sub(r'\x1b\[[0-9;]*m', '', (str(e).strip().splitlines() or [type(e).__name__])[0])
    return first[:300]


def load_pt(path, expected=None):
    """torch.load a file the user gave us without running pickled code (weights_only), allowing only
    numpy's scalar and dtype types beyond tensors and containers (the papers' result files keep
    accuracies as numpy scalars). `expected`: {key: type} that the loaded dict must have."""
    if not os.path.isfile(path):
        raise UsageError(f'{path} does not exist' if not os.path.exists(path) else f'{path} is not a file')
    with open(path, 'rb') as f:  # torch.save writes a zip archive (before torch 1.6 a pickle: first byte 0x80)
        head = f.read(4)
    if head != b'PK\x03\x04' and head[:1] != b'\x80':  # (torch's own message would blame weights_only)
        raise UsageError(f'{path} is not a file that torch.save wrote (cannot load it)')
    if head == b'PK\x03\x04' and not zipfile.is_zipfile(path):
        raise UsageError(f'cannot load {path} safely: it is truncated or damaged')
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # (torch's own advice, over many lines, is not for this case)
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except LOAD_ERRORS as e:
        raise UsageError(f'cannot load {path} safely: {_load_failure(e)}') from None
    if expected:
        if not isinstance(obj, dict):
            raise UsageError(f'{path} must hold a dict with keys {", ".join(expected)}')
        for key, kind in expected.items():
            if key not in obj:
                raise UsageError(f'{path} lacks the key {key!r}')
            if not isinstance(obj[key], kind):
                raise UsageError(f'{path}: {key!r} must be a {kind.__name__}, not {type(obj[key]).__name__}')
    return obj


def load_result(path):
    """A synthetic-set file in the papers' format ({'data': [[images, labels], ...], 'accs_all_exps': ...}),
    loaded safely and checked: float images [N,C,H,W], integer labels [N] in 0..num_classes-1."""
    res = load_pt(path, {'data': list})
    for k, entry in enumerate(res['data']):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(t, torch.Tensor) for t in entry)):
            raise UsageError(f'{path}: data[{k}] must be a pair [images, labels] of tensors')
        images, labels = entry
        if images.dim() != 4 or not images.is_floating_point() or labels.shape != images.shape[:1] \
                or labels.is_floating_point() or (len(labels) and labels.min() < 0):
            raise UsageError(f'{path}: data[{k}] must hold float images [N,C,H,W] and N integer labels >= 0')
    return res


def _fsync_dir(folder):
    """Make a rename in `folder` durable (a power loss after it keeps the new file)."""
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened or synced
        fd = os.open(folder or '.', os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, write):
    """Call write(tmp_path), flush it to disk, rename it to path and sync the folder: a crash, a stop
    signal or a full disk leaves the previous file intact and never a half-written one under its name."""
    path = os.fspath(path)
    tmp = f'{path}.tmp-{_HOST}-{os.getpid()}-{os.urandom(4).hex()}'
    try:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) or isinstance(e, RuntimeError) and 'inline_container' in str(e):  # torch.save
            reason = getattr(e, 'strerror', None) or 'disk full?'
            raise UsageError(f'cannot write {path} ({reason}); any previous version is intact') from None
        raise
    _fsync_dir(os.path.dirname(path))


def atomic_save(obj, path):
    atomic_write(path, partial(torch.save, obj))


def atomic_json(obj, path):
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


# The files this toolkit writes (results, records, images, checkpoints, CL memories and tables, evaluation
# reports, decoded-data caches). Only temporaries of these names are ever cleaned up.
OUR_FILES = r'(res|vis|checkpoint|cl|G|classifier)_.+\.(pt|json|png)|.+_eval\.json|\.cache_.+\.pt'
_HOST = re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname())[:64] or 'host'
_TEMPORARY = re.compile(rf'(?:{OUR_FILES})\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]{{8}}')


def remove_stale_temporaries(folder):
    """Remove the half-written files (see atomic_write) that a killed process left in `folder`, only those it
    can prove are dead: temporaries of our own file names, written on this machine (a shared file system
    holds other machines' live temporaries) by a process that no longer runs. Nothing else."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            match = _TEMPORARY.fullmatch(name)
            if match and match['host'] == _HOST and not _alive(int(match['pid'])):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


def denormalise(images, mean, std):
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)


# --- Many processes (torchrun) ------------------------------------------------------------------------------

COMMUNICATED = [0]  # bytes of tensors this process has sent to or received from the others (bench/scaling.py)
DIST_TIMEOUT = 900  # seconds a collective waits for the other processes before the job fails


@dataclasses.dataclass(frozen=True)
class Group:
    """This process's place in the job: its rank, the number of processes, whether it is the main one (rank 0).
    torch.distributed holds the process group (torchrun); started plainly, rank 0 of 1."""
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0

    @classmethod
    def current(cls):
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def shard(n, group=None):
    """This process's contiguous share of range(n): all of it in a single process."""
    g = group or Group.current()
    return range(n * g.rank // g.world, n * (g.rank + 1) // g.world)


def broadcast_shards(t, n):
    """t holds n equal groups of rows (e.g. the synthetic images of n classes), each process the up-to-date
    rows of its shard(n): afterwards every process holds every group's rows, bit for bit."""
    world = Group.current().world
    if world == 1:
        return
    rows = len(t) // n
    with torch.no_grad():
        for r in range(world):
            lo, hi = n * r // world * rows, n * (r + 1) // world * rows
            if hi > lo:
                torch.distributed.broadcast(t.detach()[lo:hi], src=r)
                COMMUNICATED[0] += t[lo:hi].nbytes


def all_reduce(t):
    """The sum of tensor t over all processes (in place; t itself in a single process)."""
    if Group.current().world > 1:
        torch.distributed.all_reduce(t)
        COMMUNICATED[0] += t.nbytes
    return t


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...]: every process's picklable object, on every process."""
    world = Group.current().world
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def expand(images, labels, factor=2):
    """IDM's storage-equal "factor" sets: every tile of each stored factor x factor mosaic, upsampled (bilinear) to
    the full size, is a training image with the stored image's label; tile-major, column by column (factor 2:
    top-left, bottom-left, top-right, bottom-right of every image), as the IDM authors' code. (labels may be None.)"""
    if factor == 1:
        return images, labels
    H, W = images.shape[-2:]
    tiles = [F.interpolate(images[..., rows, cols], size=(H, W), mode='bilinear', align_corners=False)
             for rows, cols in tile_slices(H, W, factor)]
    return torch.cat(tiles), None if labels is None else labels.repeat(factor * factor)


def tile_slices(H, W, factor):
    """The (rows, columns) of the tiles of an H x W mosaic, in expand's order: column by column."""
    return [(slice(H * i // factor, H * (i + 1) // factor), slice(W * j // factor, W * (j + 1) // factor))
            for j in range(factor) for i in range(factor)]
