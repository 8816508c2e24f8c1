"""Bad command lines end with one line on stderr and exit status 2, without a traceback."""
import os
import pickle
import re
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_one_line_error, run, run_in_process, write_cifar, write_mnist
from utils import UsageError, pick_device

BAD = [  # (script, arguments, a part of the expected message)
    ('main_DM.py', ['--dataset', 'CIFAR11'], 'invalid choice'),
    ('main_DM.py', ['--model', 'ConvNetX'], 'invalid choice'),
    ('main_DM.py', ['--dsa_strategy', 'color_blur'], 'unknown augmentation'),
    ('main_DM.py', ['--ipc', '0'], 'error: argument --ipc: must be at least 1, got 0'),
    ('main_DM.py', ['--ipc', 'ten'], "argument --ipc: 'ten' is not a whole number"),
    ('main_DM.py', ['--eval_mode', 'Q'], 'invalid choice'),
    ('main_DM.py', ['--lr_img', '-1'], 'argument --lr_img: must be a positive number, got -1'),
    ('main_DM.py', ['--num_exp', '0'], 'argument --num_exp: must be at least 1, got 0'),
    ('main_DM.py', ['--batch_real', '0'], 'argument --batch_real: must be at least 1, got 0'),
    ('main_DM.py', ['--Iteration', '-5'], 'argument --Iteration: must be at least 0, got -5'),
    ('main_DM.py', ['--device', 'cuda:0'], 'no CUDA device'),
    ('main_DM.py', ['--device', 'tpu'], 'unknown device'),
    ('main_DM.py', ['--dataset', 'CIFAR10', '--data_path', '{tmp}/empty'], 'cifar-10-batches-py'),
    ('main_DM.py', ['--dataset', 'SVHN', '--data_path', '{tmp}/empty'], 'train_32x32.mat'),
    ('main_DM.py', ['--save_path', '{tmp}/a_file'], 'is a file'),
    ('main_DM.py', ['--save_path', '/proc/forbidden'], 'cannot write'),
    ('main_DM.py', ['--init', 'zeros'], 'invalid choice'),
    ('main_DM.py', ['--no_such_flag'], 'unrecognized'),
    ('main_DM.py', ['--model', 'VGG11', '--eval_mode', 'W'], 'needs a ConvNet'),
    ('main_DM.py', ['--checkpoint_every', '0'], 'argument --checkpoint_every: must be at least 1, got 0'),
    ('main_DM.py', ['--resume', '{tmp}/no_such_checkpoint.pt'], 'no such checkpoint'),
    ('main_DM.py', ['--epoch_eval_train', '0'], 'argument --epoch_eval_train: must be at least 1, got 0'),
    ('main_DM.py', ['--lr_net', '0'], 'argument --lr_net: must be a positive number, got 0'),
    ('main_DM.py', ['--lr_img', 'nan'], 'argument --lr_img: must be a positive number, got nan'),
    ('main_DM.py', ['--num_eval', '-1'], 'argument --num_eval: must be at least 0, got -1'),
    ('main_DM.py', ['--batch_train', '0'], 'argument --batch_train: must be at least 1, got 0'),
    ('main_DM.py', ['--dataset', 'ImageFolder', '--data_path', '{tmp}/empty'], 'ImageFolder needs'),
    ('main_DM.py', ['--dataset', 'ImageFolder', '--im_size', '4'], '--im_size'),
    ('main_DM.py', ['--dataset', 'MNIST', '--data_path', '{tmp}/partial'], 'missing: t10k-labels'),
    ('main_DM.py', ['--dataset', 'MNIST', '--data_path', '{tmp}/corrupt'], 'not an IDX file'),
    ('main_DM.py', ['--dataset', 'MNIST', '--data_path', '{tmp}/complete', '--init', 'real', '--ipc', '100000'], 'smallest class'),
    ('main.py', ['--method', 'KIP'], 'invalid choice'),
    ('main.py', ['--dis_metric', 'l1'], 'invalid choice'),
    ('main.py', ['--method', 'DC', '--dsa_strategy', 'crop'], 'goes with --method DSA'),
    ('main.py', ['--method', 'DSA', '--dsa_strategy', 'crop_zoom'], 'unknown augmentation'),
    ('main.py', ['--method', 'herding', '--coreset_epochs', '0'], 'argument --coreset_epochs: must be at least 1, got 0'),
    ('main.py', ['--model', 'ResNet18', '--eval_mode', 'D'], 'needs a ConvNet'),
    ('distill.py', ['--layer_weights', '1', '2'], 'needs 4 weights'),
    ('distill.py', ['--lambda_1', '-0.1'], 'must not be negative'),
    ('distill.py', ['--window', '0'], 'argument --window: must be at least 1, got 0'),
    ('distill.py', ['--max_inner', '0'], 'argument --max_inner: must be at least 1, got 0'),
    ('distill.py', ['--method', 'DM'], 'invalid choice'),
    ('CL_DM.py', ['--method', 'DC'], 'invalid choice'),
    ('CL_DM.py', ['--steps', '0'], 'argument --steps: must be at least 1, got 0'),
    ('CL_DM.py', ['--seeds', '0'], 'argument --seeds: must be at least 1, got 0'),
    ('CL_DM.py', ['--eval_mode', 'M'], 'unrecognized'),
    ('CL_DM.py', ['--dsa_strategy', 'None'], 'must name transformations'),
    ('CL_DM.py', ['--dataset', 'MNIST', '--data_path', '{tmp}/complete', '--ipc', '2', '--steps', '11', '--seeds', '1',
                  '--num_eval', '1', '--epoch_eval_train', '1'], '--steps must be at most'),  # (short, were it not refused)
    # a negative seed, and flags that do not apply: refused, not ignored
    ('main.py', ['--seed', '-1'], 'argument --seed: must be at least 0, got -1'),
    ('main_DM.py', ['--seed', '-3'], 'argument --seed: must be at least 0, got -3'),
    ('distill.py', ['--seed', '-1'], 'argument --seed: must be at least 0, got -1'),
    ('CL_DM.py', ['--seed', '-1'], 'argument --seed: must be at least 0, got -1'),
    ('main.py', ['--compile'], 'unrecognized arguments: --compile'),
    ('distill.py', ['--compile'], 'unrecognized arguments: --compile'),
    ('main_DM.py', ['--dis_metric', 'ours'], '--dis_metric does not apply to DM'),
    ('distill.py', ['--dis_metric', 'mse'], '--dis_metric does not apply to CAFE'),
    ('main_DM.py', ['--method', 'DC'], 'invalid choice'),
    ('main.py', ['--method', 'herding', '--Iteration', '10'], '--Iteration does not apply to --method herding'),
    ('main.py', ['--method', 'kcenter', '--init', 'noise'], '--init does not apply to --method kcenter'),
    ('main.py', ['--method', 'random', '--lr_img', '1'], '--lr_img does not apply to --method random'),
    ('main.py', ['--method', 'forgetting', '--dis_metric', 'cos'], '--dis_metric does not apply'),
    ('main.py', ['--method', 'random', '--coreset_epochs', '3'], '--coreset_epochs does not apply to --method random'),
    ('main.py', ['--method', 'DC', '--coreset_epochs', '3'], '--coreset_epochs is for the coreset methods'),
    ('main.py', ['--method', 'kcenter', '--herding', 'nearest'], '--herding is for --method herding, not kcenter'),
    ('main.py', ['--method', 'herding', '--forgetting_score', 'events'], '--forgetting_score is for --method forgetting'),
    ('main.py', ['--method', 'herding', '--herding', 'mean'], "invalid choice: 'mean'"),
    ('main.py', ['--method', 'DSA', '--dsa_strategy', 'none'], '--method DSA needs a --dsa_strategy'),
    ('distill.py', ['--method', 'DSA', '--dsa_strategy', 'None'], '--method DSA needs a --dsa_strategy'),
    ('main.py', ['--dataset', 'CIFAR10', '--im_size', '28'], '--im_size is for --dataset ImageFolder'),
    ('main_DM.py', ['--resume', 'auto', '--overwrite'], 'give one of them'),
    ('main_DM.py', ['--lr_net', 'inf'], 'argument --lr_net: must be a positive number, got inf'),
    ('main_DM.py', ['--dataset', 'MNIST', '--data_path', '{tmp}/complete', '--ipc', '1', '--resume', '{tmp}/a_file'], 'cannot load'),
    ('CL_DM.py', ['--method', 'herding', '--Iteration', '5'], '--Iteration does not apply to --method herding'),
    ('CL_DM.py', ['--method', 'random', '--batch_real', '5'], '--batch_real does not apply'),
    ('CL_DM.py', ['--method', 'DM', '--coreset_epochs', '3'], '--coreset_epochs is for --method herding'),
    ('CL_DM.py', ['--method', 'DSA', '--compile'], '--compile is for --method DM'),
    ('CL_DM.py', ['--method', 'DM', '--dis_metric', 'cos'], '--dis_metric is for --method DSA'),
    ('CL_DM.py', ['--overwrite', '--resume', 'auto'], 'unrecognized arguments: --resume'),
]


def prepare(tmp_path, args):
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'empty').mkdir(exist_ok=True)
    if not (tmp_path / 'partial').exists():
        write_mnist(tmp_path / 'partial', n_train=20, n_test=10)
        os.remove(tmp_path / 'partial' / 'MNIST' / 'raw' / 't10k-labels-idx1-ubyte')
        write_mnist(tmp_path / 'corrupt', n_train=20, n_test=10, gz=(False,) * 4)
        (tmp_path / 'corrupt' / 'MNIST' / 'raw' / 't10k-labels-idx1-ubyte').write_bytes(b'not an idx file')
        write_mnist(tmp_path / 'complete', n_train=20, n_test=10)
    args = [a.replace('{tmp}', str(tmp_path)) for a in args]
    return args if '--save_path' in args else args + ['--save_path', str(tmp_path / 'res')]


@pytest.mark.parametrize('script,args,expected', BAD, ids=[' '.join(a) for _, a, _ in BAD])
def test_bad_command_line(tmp_path, capsys, monkeypatch, script, args, expected):
    """Runs the script's entry point in this process (as `python script ...` would)."""
    assert_one_line_error(run_in_process(monkeypatch, capsys, script, *prepare(tmp_path, args)), expected)


def test_bad_command_line_in_a_real_process(tmp_path):
    """(The cases above in this process, as a process's entry point runs them; here one in its own process.)"""
    assert_one_line_error(run('main_DM.py', *prepare(tmp_path, ['--ipc', '0']), timeout=120),
                          'main_DM.py: error: argument --ipc: must be at least 1, got 0')


class Touch:
    """Unpickling this with pickle.load creates the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f'touch {self.path}',)


def truncated_cifar(data):
    batch = write_cifar(data) / 'data_batch_2'
    batch.write_bytes(batch.read_bytes()[:5000])


def malicious_cifar(data):
    (write_cifar(data) / 'test_batch').write_bytes(pickle.dumps({'data': Touch(data / 'pwned'), 'labels': [0]}))


def unreadable_image(data):
    for split in ('train', 'test'):
        for c in ('cats', 'dogs'):
            (data / split / c).mkdir(parents=True)
            (data / split / c / 'x.png').write_bytes(b'not a png')


BAD_DATA = [  # (dataset, a function making its data folder, part of the expected message)
    ('CIFAR10', truncated_cifar, r'^error: cannot read \S+/data_batch_2: UnpicklingError: pickle'),
    ('CIFAR10', malicious_cifar, r'^error: cannot read \S+/test_batch: UnpicklingError: refusing posix\.system in a data file$'),
    ('ImageFolder', unreadable_image, r'^error: cannot read image \S+/train/cats/x\.png$'),
]


def bad_data_run(tmp_path, dataset, make, start):
    make(tmp_path)
    p = start('main_DM.py', '--dataset', dataset, '--data_path', tmp_path, '--save_path', tmp_path / 'res')
    lines = [line for line in re.split(r'[\r\n]', p.stderr) if line.strip() and not line.startswith('decoding ')]
    assert not (tmp_path / 'pwned').exists()
    return SimpleNamespace(returncode=p.returncode, stderr='\n'.join(lines))  # progress bars aside


@pytest.mark.parametrize('dataset,make,message', BAD_DATA, ids=[m.__name__ for _, m, _ in BAD_DATA])
def test_bad_data(tmp_path, capsys, monkeypatch, dataset, make, message):
    p = bad_data_run(tmp_path, dataset, make, lambda *a: run_in_process(monkeypatch, capsys, *a))
    assert_one_line_error(p, match=message)


def test_bad_data_in_a_real_process(tmp_path):
    """A malicious data file: in a process of its own too, one line and no code run."""
    dataset, make, message = BAD_DATA[1]
    assert_one_line_error(bad_data_run(tmp_path, dataset, make, lambda *a: run(*a, timeout=120)), match=message)


def test_a_cuda_device_beyond_the_machine_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert [pick_device(d) for d in ('cuda', 'cuda:0', 'cuda:1', 'cpu')] == ['cuda', 'cuda:0', 'cuda:1', 'cpu']
    for device in ('cuda:2', 'cuda:7'):
        with pytest.raises(UsageError, match=f'--device {device}: this machine has 2 CUDA device\\(s\\), cuda:0 to cuda:1'):
            pick_device(device)
    for device in ('mps', 'meta', 'cuda:x', 'gpu'):
        with pytest.raises(UsageError, match='unknown device'):
            pick_device(device)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    for device in ('cuda', 'cuda:0', 'cuda:7'):
        with pytest.raises(UsageError, match='no CUDA device is available'):
            pick_device(device)
