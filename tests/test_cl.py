"""Continual learning (CL_DM.py): memories built, recorded, saved and reloaded; the papers' files; seeds
finished before an interruption; real data."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import ROOT, needs_fashion, run, write_mnist
from utils import load_pt

TINY = ['--dataset', 'MNIST', '--steps', 2, '--ipc', 2, '--num_eval', 1, '--epoch_eval_train', 2, '--seeds', 1]
HERDING = ['--method', 'herding', '--coreset_epochs', 1]
DM = ['--method', 'DM', '--Iteration', 2, '--batch_real', 8]


@pytest.fixture
def data(tmp_path):
    write_mnist(tmp_path / 'data', n_train=100, n_test=40)
    return tmp_path / 'data'


def released(data, method='cl_herding', seed=0):
    return data / 'metasets' / 'cl_data' / f'{method}_MNIST_ConvNet_2ipc_2steps_seed{seed}.pt'


def ours(save_path, method='cl_herding', seed=0):
    return save_path / f'{method}_MNIST_ConvNet_2ipc_2steps_seed{seed}.pt'


def order(seed=0):
    np.random.seed(seed)
    return np.random.permutation(10).tolist()


def test_memories_are_built_recorded_saved_in_the_save_path_and_then_reused(data, tmp_path):
    res = tmp_path / 'res'
    args = [*TINY, *HERDING, '--data_path', data, '--save_path', res]
    p = run('CL_DM.py', *args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f'class order {order()}' in p.stdout  # the papers' class order
    assert not (data / 'metasets').exists()  # nothing written into the data folder (it may be read-only)
    saved = load_pt(ours(res))
    assert len(saved['data']) == 2
    for step, (images, labels) in enumerate(saved['data']):
        assert images.shape == (10, 1, 28, 28)
        assert sorted(set(labels.tolist())) == sorted(order()[5 * step:5 * step + 5])  # that step's classes only
    record = saved['settings']
    assert record['method'] == 'herding' and record['coreset_epochs'] == 1 and record['class_order'] == order()
    assert record['seed'] == 0 and record['order_seed'] == 0 and record['steps'] == 2 and record['ipc'] == 2
    summary = json.loads((res / 'cl_herding_MNIST_ConvNet_2ipc_2steps.json').read_text())
    assert [row['classes'] for row in summary['steps']] == [5, 10]
    assert all(0 <= row['mean'] <= 1 and len(row['accs']) == 1 for row in summary['steps'])

    again = run('CL_DM.py', *args)  # finished: nothing built or evaluated again
    assert again.returncode == 0 and 'seed 0: evaluated already' in again.stdout, again.stderr[-2000:]
    assert 'Evaluate' not in again.stdout and 'training a network on the real data' not in again.stderr
    other = run('CL_DM.py', *args, '--num_eval', 2)  # the table of other settings is kept
    assert other.returncode == 2 and '--num_eval 1 there, 2 here' in other.stderr, other.stderr
    other = run('CL_DM.py', *args, '--num_eval', 2, '--overwrite')  # a new table; the memories still fit
    assert other.returncode == 0 and f'using the memories of 2 steps in {ours(res)}' in other.stdout, other.stderr[-2000:]
    assert torch.equal(load_pt(ours(res))['data'][1][0], saved['data'][1][0])


def test_a_memory_built_with_other_settings_is_refused_naming_them(data, tmp_path):
    res = tmp_path / 'res'
    assert run('CL_DM.py', *TINY, *DM, '--data_path', data, '--save_path', res).returncode == 0
    os.remove(res / 'cl_DM_MNIST_ConvNet_2ipc_2steps.json')  # (the table would be refused first)
    p = run('CL_DM.py', *TINY, '--method', 'DM', '--Iteration', 3, '--batch_real', 8, '--data_path', data, '--save_path', res)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert 'built with other settings' in p.stderr and '--Iteration 2 there, 3 here' in p.stderr
    p = run('CL_DM.py', *TINY, '--method', 'DM', '--Iteration', 3, '--batch_real', 8, '--data_path', data,
            '--save_path', res, '--overwrite')
    assert p.returncode == 0 and load_pt(ours(res, 'cl_DM'))['settings']['Iteration'] == 3, p.stderr[-2000:]


def test_the_papers_memory_files_load_unchanged(data, tmp_path):
    # a released file: {'data': [[images, labels] per step]}, labels the global class numbers, no record
    data_save = [[torch.randn(10, 1, 28, 28), torch.tensor(order()[5 * k:5 * k + 5]).repeat_interleave(2)] for k in range(2)]
    released(data, 'cl_DM').parent.mkdir(parents=True)
    torch.save({'data': data_save}, released(data, 'cl_DM'))
    p = run('CL_DM.py', *TINY, *DM, '--data_path', data, '--save_path', tmp_path / 'res')
    assert p.returncode == 0 and 'using the memories of 2 steps' in p.stdout, p.stderr[-2000:]
    assert torch.equal(load_pt(released(data, 'cl_DM'))['data'][1][0], data_save[1][0])  # used as it is
    assert not ours(tmp_path / 'res', 'cl_DM').exists()  # nothing built


def test_a_memory_of_other_classes_is_refused(data, tmp_path):
    released(data, 'cl_res_DSA').parent.mkdir(parents=True)
    torch.save({'data': [[torch.randn(10, 1, 28, 28), torch.arange(10) % 5]]}, released(data, 'cl_res_DSA'))
    p = run('CL_DM.py', *TINY, '--method', 'DSA', '--data_path', data, '--save_path', tmp_path / 'res')
    assert p.returncode == 2 and 'other classes' in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_partial_memory_file_is_completed(data, tmp_path):
    res = tmp_path / 'res'
    args = [*TINY, *DM, '--data_path', data, '--save_path', res]
    assert run('CL_DM.py', *args).returncode == 0
    full = load_pt(ours(res, 'cl_DM'))
    torch.save({'data': full['data'][:1], 'settings': full['settings']}, ours(res, 'cl_DM'))  # stopped after step 0
    os.remove(res / 'cl_DM_MNIST_ConvNet_2ipc_2steps.json')
    p = run('CL_DM.py', *args)
    assert p.returncode == 0 and 'using the memories of 1 steps' in p.stdout, p.stderr[-2000:]
    again = load_pt(ours(res, 'cl_DM'))['data']
    assert len(again) == 2 and torch.equal(again[0][0], full['data'][0][0])
    assert torch.equal(again[1][0], full['data'][1][0])  # each step is seeded on its own: the same memory again


def test_a_rerun_does_not_evaluate_the_finished_seeds_again(data, tmp_path):
    res = tmp_path / 'res'
    args = [*TINY, '--method', 'random', '--seeds', 2, '--data_path', data, '--save_path', res]
    p = run('CL_DM.py', *args)
    assert p.returncode == 0, p.stderr[-2000:]
    path = res / 'cl_random_MNIST_ConvNet_2ipc_2steps.json'
    whole = json.loads(path.read_text())
    cut = dict(whole, per_seed={'0': whole['per_seed']['0']}, seeds=1)  # as if stopped after seed 0
    path.write_text(json.dumps(cut))
    p = run('CL_DM.py', *args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'seed 0: evaluated already' in p.stdout and p.stdout.count('Evaluate 1 random ConvNet') == 2  # seed 1's steps
    assert json.loads(path.read_text())['per_seed'] == whole['per_seed']  # evaluation is seeded: the same numbers
    more = run('CL_DM.py', *args[:-4], '--seeds', 3, '--data_path', data, '--save_path', res)  # one more seed
    assert more.returncode == 0 and more.stdout.count('evaluated already') == 2, more.stderr[-2000:]


@needs_fashion
def test_end_to_end_on_real_fashion_mnist(tmp_path):
    p = run('CL_DM.py', '--dataset', 'FashionMNIST', '--method', 'random', '--steps', 2, '--ipc', 5, '--num_eval', 1,
            '--epoch_eval_train', 20, '--seeds', 1, '--data_path', tmp_path / 'data', '--save_path', tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    steps = json.loads((tmp_path / 'cl_random_FashionMNIST_ConvNet_5ipc_2steps.json').read_text())['steps']
    assert steps[0]['mean'] > 0.5 and steps[1]['mean'] > 0.35  # far above chance (0.2 and 0.1)


def test_sigterm_while_a_memory_is_built_stops_within_seconds_keeping_the_finished_steps(data, tmp_path):
    args = [*TINY, '--method', 'DM', '--Iteration', 100000, '--batch_real', 8, '--data_path', data, '--save_path', tmp_path]
    proc = subprocess.Popen([sys.executable, f'{ROOT}/CL_DM.py', *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    while 'class order' not in proc.stdout.readline():  # then it condenses the first step's memory
        assert proc.poll() is None, proc.stderr.read()
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    t = time.time()
    out, err = proc.communicate(timeout=60)
    assert time.time() - t < 20
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1].startswith('error: stopped by SIGTERM')
    assert 'Traceback' not in err and not list(tmp_path.glob('*.tmp*'))
