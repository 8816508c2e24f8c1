import os
import pickle

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import utils
from helpers import write_cifar, write_mnist
from utils import ClassImages, UsageError, get_dataset

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(utils, '_download', lambda name, path: 'offline (test)')


def check(out, channel, im_size, num_classes, n_train, n_test):
    ch, size, nc, names, mean, std, dst_train, dst_test, testloader = out
    assert (ch, size, nc, len(names)) == (channel, im_size, num_classes, num_classes)
    assert dst_train.images.shape == (n_train, channel, *im_size) and dst_train.images.dtype == torch.float32
    assert dst_test.images.shape == (n_test, channel, *im_size)
    assert len(dst_train.labels) == n_train and dst_train.labels.dtype == torch.long
    batches = list(testloader)
    assert sum(len(b[1]) for b in batches) == n_test and len(batches[0]) == 2
    return dst_train, dst_test, mean, std


def test_mnist_layout_with_and_without_gzip(tmp_path):
    arrays = write_mnist(tmp_path)
    dst_train, _, mean, std = check(get_dataset('MNIST', str(tmp_path)), 1, (28, 28), 10, 30, 10)
    expected = (torch.tensor(arrays[0][3, 5, 7] / 255.) - 0.1307) / 0.3081
    assert torch.isclose(dst_train.images[3, 0, 5, 7], expected.float(), atol=1e-5)
    assert dst_train.labels.tolist() == (np.arange(30) % 10).tolist()


def test_cifar10_and_cifar100_layout(tmp_path):
    write_cifar(tmp_path, 'CIFAR10')
    out = get_dataset('CIFAR10', str(tmp_path))
    check(out, 3, (32, 32), 10, 20, 4)
    assert out[3][9] == 'c9' and out[7].labels.tolist() == [5, 6, 7, 8]  # test_batch is the 6th file
    assert out[6].labels[:5].tolist() == [0, 1, 2, 3, 1]

    write_cifar(tmp_path, 'CIFAR100', n=7)
    dst_train, *_ = check(get_dataset('CIFAR100', str(tmp_path)), 3, (32, 32), 100, 7, 7)
    assert dst_train.labels.tolist() == list(range(7))


@pytest.mark.parametrize('protocol', [0, 2, 5])
def test_cifar_pickles_of_any_protocol_load_exactly(tmp_path, protocol):
    folder = write_cifar(tmp_path, protocol=protocol)
    with open(folder / 'data_batch_2', 'rb') as f:
        expected = pickle.load(f)['data'].reshape(-1, 3, 32, 32)
    dst_train = get_dataset('CIFAR10', str(tmp_path))[6]
    pixels = (dst_train.images[4:8] * torch.tensor(utils.DATASETS['CIFAR10'][4]).view(3, 1, 1)
              + torch.tensor(utils.DATASETS['CIFAR10'][3]).view(3, 1, 1)) * 255
    assert torch.allclose(pixels, torch.tensor(expected).float(), atol=1e-3)


class Python2Array:
    """Pickles like an array that numpy 1 pickled under Python 2 (as CIFAR's files are): numpy.core names,
    the raw bytes as a str (Python 3 reads it with encoding='latin1')."""

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        a, reconstruct = self.array, np.ndarray.__reduce__(self.array)[0]
        return reconstruct, (np.ndarray, (0,), b'b'), (1, a.shape, a.dtype, False, a.tobytes().decode('latin1'))


def test_cifar_files_written_by_python2_and_numpy1_load(tmp_path):
    folder = write_cifar(tmp_path)
    data = RNG.integers(0, 256, (3, 3072), dtype=np.uint8)
    raw = pickle.dumps({'data': Python2Array(data), 'labels': [7, 8, 9]}, 2)
    raw = raw.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')  # the name numpy 1 wrote
    assert b'cnumpy.core.multiarray\n_reconstruct' in raw
    (folder / 'test_batch').write_bytes(raw)
    dst_test = get_dataset('CIFAR10', str(tmp_path))[7]
    assert dst_test.labels.tolist() == [7, 8, 9]
    first = dst_test.images[0, 0, 0, 0] * utils.DATASETS['CIFAR10'][4][0] + utils.DATASETS['CIFAR10'][3][0]
    assert abs(float(first) * 255 - data[0, 0]) < 1e-3


class Call:
    """Unpickling this calls func(*args): what a malicious pickle does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize('protocol', [0, 2, 5])
@pytest.mark.parametrize('func,code', [(os.system, 'touch {}'), (exec, 'open({!r}, "w")')])
def test_a_malicious_cifar_pickle_runs_no_code(tmp_path, protocol, func, code):
    folder = write_cifar(tmp_path)
    marker = tmp_path / 'pwned'
    payload = pickle.dumps({'data': Call(func, code.format(str(marker))), 'labels': [1]}, protocol)
    pickle.loads(payload)  # the payload works: plain pickle creates the file
    assert marker.exists()
    marker.unlink()
    (folder / 'data_batch_4').write_bytes(payload)
    with pytest.raises(UsageError, match=r'data_batch_4: UnpicklingError: refusing (posix\.system|_*builtins?_*\.exec) in a data file'):
        get_dataset('CIFAR10', str(tmp_path))
    assert not marker.exists()


def test_svhn_layout_maps_label_10_to_0(tmp_path):
    for split, n in (('train', 6), ('test', 4)):
        scipy.io.savemat(tmp_path / f'{split}_32x32.mat',
                         {'X': RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), 'y': np.array([[10], [1], [2], [3], [4], [5]][:n])})
    dst_train, *_ = check(get_dataset('SVHN', str(tmp_path)), 3, (32, 32), 10, 6, 4)
    assert dst_train.labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_tinyimagenet_pt(tmp_path):
    torch.save({'images_train': torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8), 'labels_train': torch.arange(8) * 25,
                'images_val': torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), 'labels_val': torch.arange(4),
                'classes': [f'n{k}' for k in range(200)]}, tmp_path / 'tinyimagenet.pt')
    dst_train, *_ = check(get_dataset('TinyImageNet', str(tmp_path)), 3, (64, 64), 200, 8, 4)
    assert dst_train.labels[-1] == 175


def test_tinyimagenet_bad_structure_is_a_usage_error(tmp_path):
    torch.save({'images_train': torch.zeros(2, 3, 32, 32)}, tmp_path / 'tinyimagenet.pt')
    with pytest.raises(UsageError, match='lacks the key'):
        get_dataset('TinyImageNet', str(tmp_path))


def write_tree(root, classes, n, size, mode='RGB'):
    for split in ('train', 'test'):
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = RNG.integers(0, 256, (size[0], size[1], 3 if mode == 'RGB' else 1), dtype=np.uint8).squeeze()
                Image.fromarray(arr, mode).save(d / f'{i}.png')


def test_named_dataset_as_image_tree_keeps_its_constants(tmp_path):
    classes = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    write_tree(tmp_path / 'CIFAR10', classes, 2, (32, 32))
    out = get_dataset('CIFAR10', str(tmp_path))
    dst_train, _, mean, std = check(out, 3, (32, 32), 10, 20, 20)
    assert mean == utils.DATASETS['CIFAR10'][3] and out[3] == classes
    png = np.asarray(Image.open(tmp_path / 'CIFAR10' / 'train' / 'bird' / '1.png'))
    k = dst_train.labels.tolist().index(2) + 1  # images are in class order, file order within a class
    expected = (torch.tensor(png[4, 6, 1] / 255.) - mean[1]) / std[1]
    assert torch.isclose(dst_train.images[k, 1, 4, 6], expected.float(), atol=1e-5)


def test_grey_tree_for_a_one_channel_dataset(tmp_path):
    write_tree(tmp_path / 'FashionMNIST', [str(c) for c in range(10)], 1, (28, 28), mode='L')
    monkey = utils.DEBIAN_FASHION_MNIST
    utils.DEBIAN_FASHION_MNIST = str(tmp_path / 'nowhere')
    try:
        check(get_dataset('FashionMNIST', str(tmp_path)), 1, (28, 28), 10, 10, 10)
    finally:
        utils.DEBIAN_FASHION_MNIST = monkey


def test_own_image_folder_is_resized_normalised_and_cached(tmp_path):
    write_tree(tmp_path, ['cats', 'dogs', 'owls'], 3, (40, 50))
    out = get_dataset('ImageFolder', str(tmp_path), im_size=(24, 24))
    dst_train, _, mean, std = check(out, 3, (24, 24), 3, 9, 9)
    assert torch.allclose(dst_train.images.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)  # its own mean/std
    assert torch.allclose(dst_train.images.std((0, 2, 3)), torch.ones(3), atol=1e-3)
    caches = list(tmp_path.glob('.cache_24x24*'))
    assert len(caches) == 1
    again = get_dataset('ImageFolder', str(tmp_path), im_size=(24, 24))
    assert torch.equal(again[6].images, dst_train.images)
    os.remove(tmp_path / 'train' / 'owls' / '0.png')  # a changed tree is decoded afresh
    assert len(get_dataset('ImageFolder', str(tmp_path), im_size=(24, 24))[6]) == 8


def test_missing_data_names_the_files(tmp_path):
    with pytest.raises(UsageError, match='cifar-10-batches-py'):
        get_dataset('CIFAR10', str(tmp_path))
    with pytest.raises(UsageError, match='unknown dataset'):
        get_dataset('CIFAR11', str(tmp_path))
    with pytest.raises(UsageError, match='ImageFolder needs'):
        get_dataset('ImageFolder', str(tmp_path))


def test_truncated_idx_file_is_a_usage_error(tmp_path):
    write_mnist(tmp_path, gz=(False,) * 4)
    p = tmp_path / 'MNIST' / 'raw' / 'train-images-idx3-ubyte'
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(UsageError, match='truncated'):
        get_dataset('MNIST', str(tmp_path))


def cut(keep):
    """Damage: keep the first `keep` bytes of a file (a fraction of it when below 1)."""
    def damage(path):
        data = path.read_bytes()
        path.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    return damage


def garble(path):
    """Damage: invert 64 bytes in the middle of a file."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i:i + 64] = bytes(255 - b for b in data[i:i + 64])
    path.write_bytes(data)


def replace(obj):
    """Damage: a file's content becomes these bytes, or this object pickled."""
    return lambda path: path.write_bytes(obj if isinstance(obj, bytes) else pickle.dumps(obj))


def write_svhn(root, n=6):
    for split in ('train', 'test'):
        scipy.io.savemat(root / f'{split}_32x32.mat', {'X': RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                       'y': np.arange(1, n + 1).reshape(-1, 1)})


def write_tinyimagenet(root, **changes):
    data = {'images_train': torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), 'labels_train': torch.arange(4),
            'images_val': torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), 'labels_val': torch.arange(2),
            'classes': [f'n{k}' for k in range(200)]}
    torch.save({**data, **changes}, root / 'tinyimagenet.pt')


def empty(path):
    """Damage: remove everything inside a folder."""
    for p in sorted(path.rglob('*'), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()


WRITERS = {'MNIST': write_mnist, 'CIFAR10': write_cifar, 'CIFAR100': lambda root: write_cifar(root, 'CIFAR100'),
           'SVHN': write_svhn, 'TinyImageNet': write_tinyimagenet,
           'ImageFolder': lambda root: write_tree(root, ['a', 'b'], 2, (8, 8))}
C10, C100, RAW = 'cifar-10-batches-py/', 'cifar-100-python/', 'MNIST/raw/'
GOOD_BATCH = {'data': np.zeros((4, 3072), np.uint8), 'labels': [0, 1, 2, 3]}
BAD_FILES = [  # (dataset, file or folder, damage, expected message (a regular expression))
    ('MNIST', RAW + 'train-images-idx3-ubyte.gz', cut(0.5), r'cannot read .*/train-images-idx3-ubyte.gz: EOFError: Compressed'),
    ('MNIST', RAW + 't10k-images-idx3-ubyte.gz', garble, r'cannot read .*/t10k-images-idx3-ubyte.gz: (error|BadGzipFile)'),
    ('MNIST', RAW + 'train-images-idx3-ubyte.gz', replace(b'plain bytes'), r'train-images-idx3-ubyte.gz: BadGzipFile'),
    ('MNIST', RAW + 't10k-labels-idx1-ubyte', cut(6), r't10k-labels-idx1-ubyte is truncated or corrupt'),
    ('CIFAR10', C10 + 'data_batch_3', cut(0.5), r'cannot read .*/data_batch_3: UnpicklingError: pickle (data was truncated|exhausted)'),
    ('CIFAR10', C10 + 'data_batch_1', cut(20), r'cannot read .*/data_batch_1: '),
    ('CIFAR10', C10 + 'test_batch', replace(b'\x80\x04garbage'), r'cannot read .*/test_batch: '),
    ('CIFAR10', C10 + 'batches.meta', cut(0.5), r'cannot read .*/batches.meta: '),
    ('CIFAR10', C10 + 'data_batch_1', replace({'labels': [1]}), r"data_batch_1 must hold a dict with 'data' \(uint8, N x 3072\)"),
    ('CIFAR10', C10 + 'data_batch_2', replace({'data': np.zeros((4, 3000), np.uint8), 'labels': [0] * 4}), r'data_batch_2 must hold'),
    ('CIFAR10', C10 + 'data_batch_2', replace({**GOOD_BATCH, 'data': GOOD_BATCH['data'] * 1.}), r'data_batch_2 must hold'),
    ('CIFAR10', C10 + 'data_batch_5', replace({**GOOD_BATCH, 'labels': [0, 1]}), r"data_batch_5 must hold .* 'labels' \(N integer"),
    ('CIFAR10', C10 + 'data_batch_5', replace({**GOOD_BATCH, 'labels': ['a'] * 4}), r'data_batch_5 must hold'),
    ('CIFAR10', C10 + 'test_batch', replace([GOOD_BATCH]), r'test_batch must hold a dict'),
    ('CIFAR10', C10 + 'batches.meta', replace({'names': []}), r"batches.meta must hold a dict with 'label_names'"),
    ('CIFAR10', C10 + 'batches.meta', replace({'label_names': [f'c{k}' for k in range(9)]}), r'CIFAR10 must have 10 classes, found 9'),
    ('CIFAR100', C100 + 'train', cut(0.3), r'cannot read .*cifar-100-python/train: '),
    ('CIFAR100', C100 + 'test', replace(GOOD_BATCH), r"cifar-100-python/test must hold a dict with 'data' .* 'fine_labels'"),
    ('CIFAR100', C100 + 'meta', replace({'fine_label_names': 'abc'}), r"meta must hold a dict with 'fine_label_names'"),
    ('SVHN', 'train_32x32.mat', cut(0.5), r'cannot read .*/train_32x32.mat: '),
    ('SVHN', 'test_32x32.mat', replace(b'MATLAB garbage' * 20), r'cannot read .*/test_32x32.mat: '),
    ('SVHN', 'train_32x32.mat', lambda p: scipy.io.savemat(p, {'X': np.zeros((32, 32, 3, 2), np.uint8)}), r"train_32x32.mat must hold 'X'"),
    ('SVHN', 'test_32x32.mat', lambda p: scipy.io.savemat(p, {'X': np.zeros((28, 28, 3, 2), np.uint8), 'y': np.ones((2, 1))}),
     r"test_32x32.mat must hold 'X' \(uint8, 32 x 32 x 3 x N\)"),
    ('SVHN', 'test_32x32.mat', lambda p: scipy.io.savemat(p, {'X': np.zeros((32, 32, 3, 2), np.uint8), 'y': np.array([[1.], [2.5]])}),
     r"'y' \(N whole-number labels\)"),
    ('TinyImageNet', '', lambda root: write_tinyimagenet(root, labels_train=torch.arange(4.)), r'labels_train must be \[N\] integers'),
    ('TinyImageNet', '', lambda root: write_tinyimagenet(root, labels_val=torch.arange(3)), r'labels_val must be \[N\] integers'),
    ('TinyImageNet', '', lambda root: write_tinyimagenet(root, labels_val=torch.tensor([0, 200])), r'labels must lie in 0..199'),
    ('TinyImageNet', '', lambda root: write_tinyimagenet(root, images_val=torch.zeros(2, 3, 64, 64)), r'images_val must be uint8'),
    ('TinyImageNet', 'tinyimagenet.pt', cut(0.5), r'cannot load .*tinyimagenet.pt safely'),
    ('ImageFolder', 'train', empty, r"train must hold <class>/<image files> \(Couldn't find any class"),
    ('ImageFolder', 'train/b', empty, r'train must hold <class>/<image files> \(Found no valid file for the classes b\.'),
    ('ImageFolder', 'train/b/1.png', replace(b'not an image'), r'cannot read image .*/train/b/1.png$'),
    ('ImageFolder', 'test/a/0.png', cut(60), r'cannot read image .*/test/a/0.png$'),
    ('ImageFolder', 'test/b', lambda p: p.rename(p.parent / 'z'), r'train/ and test/ must have the same class folders; not in both: b, z'),
]


@pytest.mark.parametrize('dataset,path,damage,message', BAD_FILES,
                         ids=[f'{d}-{p}-{m[:30]}' for d, p, _, m in BAD_FILES])
def test_a_damaged_data_file_is_one_clear_usage_error(tmp_path, dataset, path, damage, message):
    WRITERS[dataset](tmp_path)
    get_dataset(dataset, str(tmp_path))  # the undamaged files load
    for cache in tmp_path.glob('.cache_*'):
        cache.unlink()
    damage(tmp_path / path)
    with pytest.raises(UsageError, match=message) as e:
        get_dataset(dataset, str(tmp_path))
    assert '\n' not in str(e.value)


def test_a_damaged_cache_of_an_image_tree_is_decoded_afresh(tmp_path):
    write_tree(tmp_path, ['a', 'b'], 2, (8, 8))
    first = get_dataset('ImageFolder', str(tmp_path), im_size=(8, 8))[6].images
    (cache,) = tmp_path.glob('.cache_*')
    for damage in (cut(0.5), replace(b'garbage'), replace({'x_train': 1})):
        damage(cache)
        assert torch.equal(get_dataset('ImageFolder', str(tmp_path), im_size=(8, 8))[6].images, first)


def test_class_images_draws_without_replacement_within_a_class():
    labels = torch.tensor([0, 1, 2] * 5)
    images = torch.arange(15.).view(15, 1, 1, 1)
    real = ClassImages(utils.TensorDataset(images, labels), 3)
    draw = real.get_images(1, 4).flatten().tolist()
    assert len(set(draw)) == 4 and all(int(v) % 3 == 1 for v in draw)
    assert sorted(real.get_images(2, 99).flatten().tolist()) == [2., 5., 8., 11., 14.]
