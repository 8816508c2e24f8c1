"""Continual learning (CL_DM.py): memories built, saved and reloaded; the papers' files; real data."""
import json
import os

import numpy as np
import pytest
import torch

from helpers import needs_fashion, run, write_mnist
from utils import load_pt

TINY = ['--dataset', 'MNIST', '--steps', 2, '--ipc', 2, '--num_eval', 1, '--epoch_eval_train', 2, '--seeds', 1,
        '--coreset_epochs', 1, '--batch_real', 8]


@pytest.fixture
def data(tmp_path):
    write_mnist(tmp_path / 'data', n_train=100, n_test=40)
    return tmp_path / 'data'


def memory_file(data, method='cl_herding', seed=0):
    return data / 'metasets' / 'cl_data' / f'{method}_MNIST_ConvNet_2ipc_2steps_seed{seed}.pt'


def test_memories_are_built_saved_and_then_reused(data, tmp_path):
    args = [*TINY, '--method', 'herding', '--data_path', data, '--save_path', tmp_path / 'res']
    p = run('CL_DM.py', *args)
    assert p.returncode == 0, p.stderr[-2000:]
    np.random.seed(0)
    order = np.random.permutation(10).tolist()
    assert f'class order {order}' in p.stdout  # the papers' class order
    saved = load_pt(memory_file(data))['data']
    assert len(saved) == 2
    for step, (images, labels) in enumerate(saved):
        assert images.shape == (10, 1, 28, 28)
        assert sorted(set(labels.tolist())) == sorted(order[5 * step:5 * step + 5])  # that step's classes only
    summary = json.loads((tmp_path / 'res' / 'cl_herding_MNIST_ConvNet_2ipc_2steps.json').read_text())
    assert [row['classes'] for row in summary['steps']] == [5, 10]
    assert all(0 <= row['mean'] <= 1 and len(row['accs']) == 1 for row in summary['steps'])

    again = run('CL_DM.py', *args)
    assert again.returncode == 0 and 'using the memories of 2 steps' in again.stdout, again.stderr[-2000:]
    assert 'training a network on the real data' not in again.stderr  # nothing rebuilt


def test_the_papers_memory_files_load_unchanged(data, tmp_path):
    # a released file: {'data': [[images, labels] per step]}, labels the global class numbers
    np.random.seed(0)
    order = np.random.permutation(10).tolist()
    data_save = [[torch.randn(10, 1, 28, 28), torch.tensor(order[5 * k:5 * k + 5]).repeat_interleave(2)] for k in range(2)]
    memory_file(data, 'cl_DM').parent.mkdir(parents=True)
    torch.save({'data': data_save}, memory_file(data, 'cl_DM'))
    p = run('CL_DM.py', *TINY, '--method', 'DM', '--data_path', data, '--save_path', tmp_path / 'res')
    assert p.returncode == 0 and 'using the memories of 2 steps' in p.stdout, p.stderr[-2000:]
    assert torch.equal(load_pt(memory_file(data, 'cl_DM'))['data'][1][0], data_save[1][0])  # used as it is


def test_a_memory_of_other_classes_is_refused(data, tmp_path):
    memory_file(data, 'cl_res_DSA').parent.mkdir(parents=True)
    torch.save({'data': [[torch.randn(10, 1, 28, 28), torch.arange(10) % 5]]}, memory_file(data, 'cl_res_DSA'))
    p = run('CL_DM.py', *TINY, '--method', 'DSA', '--data_path', data, '--save_path', tmp_path / 'res')
    assert p.returncode == 2 and 'other classes' in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_partial_memory_file_is_completed(data, tmp_path):
    args = [*TINY, '--method', 'DM', '--Iteration', 2, '--data_path', data, '--save_path', tmp_path / 'res']
    assert run('CL_DM.py', *args).returncode == 0
    full = load_pt(memory_file(data, 'cl_DM'))['data']
    torch.save({'data': full[:1]}, memory_file(data, 'cl_DM'))  # as if the run had stopped after step 0
    p = run('CL_DM.py', *args)
    assert p.returncode == 0 and 'using the memories of 1 steps' in p.stdout, p.stderr[-2000:]
    again = load_pt(memory_file(data, 'cl_DM'))['data']
    assert len(again) == 2 and torch.equal(again[0][0], full[0][0])
    assert torch.equal(again[1][0], full[1][0])  # each step is seeded on its own: the same memory again


@needs_fashion
def test_end_to_end_on_real_fashion_mnist(tmp_path):
    p = run('CL_DM.py', '--dataset', 'FashionMNIST', '--method', 'random', '--steps', 2, '--ipc', 5, '--num_eval', 1,
            '--epoch_eval_train', 20, '--seeds', 1, '--data_path', tmp_path / 'data', '--save_path', tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    steps = json.loads((tmp_path / 'cl_random_FashionMNIST_ConvNet_5ipc_2steps.json').read_text())['steps']
    assert steps[0]['mean'] > 0.3 and steps[1]['mean'] > 0.2  # well above chance (0.2 and 0.1)


def test_sigterm_keeps_the_memories_of_finished_steps(data, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from helpers import ROOT
    args = [*TINY, '--method', 'DM', '--Iteration', 100000, '--steps', 2, '--data_path', data, '--save_path', tmp_path]
    proc = subprocess.Popen([sys.executable, f'{ROOT}/CL_DM.py', *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    while 'class order' not in proc.stdout.readline():  # then it condenses the first step's memory
        assert proc.poll() is None, proc.stderr.read()
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1].startswith('error: stopped by SIGTERM')
    assert 'Traceback' not in err and not list(memory_file(data, 'cl_DM').parent.glob('*.tmp*'))
