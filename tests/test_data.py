import gzip
import os
import pickle

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import utils
from helpers import write_mnist
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
    d = tmp_path / 'cifar-10-batches-py'
    d.mkdir()
    for i in range(1, 6):
        pickle.dump({'data': RNG.integers(0, 256, (4, 3072), dtype=np.uint8), 'labels': [i % 10, 1, 2, 3]},
                    open(d / f'data_batch_{i}', 'wb'))
    pickle.dump({'data': RNG.integers(0, 256, (5, 3072), dtype=np.uint8), 'labels': [0, 1, 2, 3, 9]}, open(d / 'test_batch', 'wb'))
    pickle.dump({'label_names': [f'c{k}' for k in range(10)]}, open(d / 'batches.meta', 'wb'))
    out = get_dataset('CIFAR10', str(tmp_path))
    check(out, 3, (32, 32), 10, 20, 5)
    assert out[3][9] == 'c9' and out[7].labels.tolist() == [0, 1, 2, 3, 9]

    d = tmp_path / 'cifar-100-python'
    d.mkdir()
    pickle.dump({'data': RNG.integers(0, 256, (7, 3072), dtype=np.uint8), 'fine_labels': [99, 0, 5, 5, 1, 2, 3]}, open(d / 'train', 'wb'))
    pickle.dump({'data': RNG.integers(0, 256, (3, 3072), dtype=np.uint8), 'fine_labels': [4, 5, 6]}, open(d / 'test', 'wb'))
    pickle.dump({'fine_label_names': [f'k{k}' for k in range(100)]}, open(d / 'meta', 'wb'))
    dst_train, *_ = check(get_dataset('CIFAR100', str(tmp_path)), 3, (32, 32), 100, 7, 3)
    assert dst_train.labels[0] == 99


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


def test_class_images_draws_without_replacement_within_a_class():
    labels = torch.tensor([0, 1, 2] * 5)
    images = torch.arange(15.).view(15, 1, 1, 1)
    real = ClassImages(utils.TensorDataset(images, labels), 3)
    draw = real.get_images(1, 4).flatten().tolist()
    assert len(set(draw)) == 4 and all(int(v) % 3 == 1 for v in draw)
    assert sorted(real.get_images(2, 99).flatten().tolist()) == [2., 5., 8., 11., 14.]
