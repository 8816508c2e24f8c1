"""Continual learning (CL_DM.py): memories built, recorded, saved and reloaded; the papers' files; seeds
finished before an interruption; real data. The first run of each case starts CL_DM.py as a user would; the
reruns that check what it does with the files left behind run its main() in this process."""
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch

import CL_DM
from helpers import assert_one_line_error, needs_fashion, run, run_in_process, start
from utils import load_pt

TINY = ['--dataset', 'MNIST', '--steps', 2, '--ipc', 2, '--num_eval', 1, '--epoch_eval_train', 2, '--seeds', 1]
HERDING = ['--method', 'herding', '--coreset_epochs', 1]
DM = ['--method', 'DM', '--Iteration', 2, '--batch_real', 8]


@pytest.fixture
def cl(monkeypatch, capsys):
    """CL_DM.py's main run in this process (as run_script runs it): its exit status and output."""
    return lambda *args: run_in_process(monkeypatch, capsys, 'CL_DM.py', *args, main=CL_DM.main)


@pytest.fixture(scope='module')
def dm_memories(tmp_path_factory, data):
    """One DM run (2 steps, seed 0) on `data`: its save path, which tests copy and change."""
    res = tmp_path_factory.mktemp('cl_dm') / 'res'
    p = run('CL_DM.py', *TINY, *DM, '--data_path', data, '--save_path', res)
    assert p.returncode == 0, p.stderr[-2000:]
    return res


def released(data, method='cl_herding', seed=0):
    return data / 'metasets' / 'cl_data' / f'{method}_MNIST_ConvNet_2ipc_2steps_seed{seed}.pt'


def ours(save_path, method='cl_herding', seed=0):
    return save_path / f'{method}_MNIST_ConvNet_2ipc_2steps_seed{seed}.pt'


def order(seed=0):
    np.random.seed(seed)
    return np.random.permutation(10).tolist()


@pytest.mark.e2e
def test_memories_are_built_recorded_saved_in_the_save_path_and_then_reused(data, tmp_path, cl):
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
    assert record['herding'] == 'greedy'  # iCaRL's rule, CL_DM.py's default (main.py's is nearest)
    assert record['seed'] == 0 and record['order_seed'] == 0 and record['steps'] == 2 and record['ipc'] == 2
    summary = json.loads((res / 'cl_herding_MNIST_ConvNet_2ipc_2steps.json').read_text())
    assert [row['classes'] for row in summary['steps']] == [5, 10] and list(summary['per_seed']) == ['0']
    for k, row in enumerate(summary['steps']):  # each step's row: the seed's accuracy of that step, its mean
        assert row['accs'] == [summary['per_seed']['0'][k][0]] and row['mean'] == pytest.approx(np.mean(row['accs']))
        assert float(row['accs'][0] * 4 * row['classes']).is_integer()  # tested on the 4 test images of each class seen
    assert f"step 1 ( 10 classes): {100 * summary['steps'][1]['mean']:.2f}%" in p.stdout

    again = cl(*args)  # finished: nothing built or evaluated again
    assert again.returncode == 0 and 'seed 0: evaluated already' in again.stdout, again.stderr[-2000:]
    assert 'Evaluate' not in again.stdout and 'training a network on the real data' not in again.stderr
    assert_one_line_error(cl(*args, '--num_eval', 2), '--num_eval 1 there, 2 here')  # the table of other settings is kept
    other = cl(*args, '--num_eval', 2, '--overwrite')  # a new table; the memories still fit
    assert other.returncode == 0 and f'using the memories of 2 steps in {ours(res)}' in other.stdout, other.stderr[-2000:]
    assert torch.equal(load_pt(ours(res))['data'][1][0], saved['data'][1][0])
    os.remove(res / 'cl_herding_MNIST_ConvNet_2ipc_2steps.json')  # (the table would be refused first)
    assert_one_line_error(cl(*args, '--herding', 'nearest'), 'built with other settings', '--herding greedy there, nearest here')


@pytest.mark.e2e
def test_a_memory_built_with_other_settings_is_refused_naming_them(dm_memories, data, tmp_path, cl):
    res = shutil.copytree(dm_memories, tmp_path / 'res')
    os.remove(res / 'cl_DM_MNIST_ConvNet_2ipc_2steps.json')  # (the table would be refused first)
    other = [*TINY, '--method', 'DM', '--Iteration', 3, '--batch_real', 8, '--data_path', data, '--save_path', res]
    assert_one_line_error(cl(*other), 'built with other settings', '--Iteration 2 there, 3 here')
    p = cl(*other, '--overwrite')
    assert p.returncode == 0 and load_pt(ours(res, 'cl_DM'))['settings']['Iteration'] == 3, p.stderr[-2000:]


@pytest.mark.e2e
def test_the_papers_memory_files_load_unchanged(fresh_data, tmp_path):
    # a released file: {'data': [[images, labels] per step]}, labels the global class numbers, no record
    data_save = [[torch.randn(10, 1, 28, 28), torch.tensor(order()[5 * k:5 * k + 5]).repeat_interleave(2)] for k in range(2)]
    released(fresh_data, 'cl_DM').parent.mkdir(parents=True)
    torch.save({'data': data_save}, released(fresh_data, 'cl_DM'))
    p = run('CL_DM.py', *TINY, *DM, '--data_path', fresh_data, '--save_path', tmp_path / 'res')
    assert p.returncode == 0 and 'using the memories of 2 steps' in p.stdout, p.stderr[-2000:]
    assert torch.equal(load_pt(released(fresh_data, 'cl_DM'))['data'][1][0], data_save[1][0])  # used as it is
    assert not ours(tmp_path / 'res', 'cl_DM').exists()  # nothing built


def test_a_memory_of_other_classes_is_refused(fresh_data, tmp_path, cl):
    released(fresh_data, 'cl_res_DSA').parent.mkdir(parents=True)
    torch.save({'data': [[torch.randn(10, 1, 28, 28), torch.arange(10) % 5]]}, released(fresh_data, 'cl_res_DSA'))
    assert_one_line_error(cl(*TINY, '--method', 'DSA', '--data_path', fresh_data, '--save_path', tmp_path / 'res'),
                          'other classes')


@pytest.mark.e2e
def test_a_partial_memory_file_is_completed(dm_memories, data, tmp_path, cl):
    res = shutil.copytree(dm_memories, tmp_path / 'res')
    full = load_pt(ours(res, 'cl_DM'))
    torch.save({'data': full['data'][:1], 'settings': full['settings']}, ours(res, 'cl_DM'))  # stopped after step 0
    os.remove(res / 'cl_DM_MNIST_ConvNet_2ipc_2steps.json')
    p = cl(*TINY, *DM, '--data_path', data, '--save_path', res)
    assert p.returncode == 0 and 'using the memories of 1 steps' in p.stdout, p.stderr[-2000:]
    again = load_pt(ours(res, 'cl_DM'))['data']
    assert len(again) == 2 and torch.equal(again[0][0], full['data'][0][0])
    assert torch.equal(again[1][0], full['data'][1][0])  # each step is seeded on its own: the same memory again


@pytest.mark.e2e
def test_a_rerun_does_not_evaluate_the_finished_seeds_again(data, tmp_path, cl):
    res = tmp_path / 'res'
    args = [*TINY, '--method', 'random', '--seeds', 2, '--data_path', data, '--save_path', res]
    p = run('CL_DM.py', *args)
    assert p.returncode == 0, p.stderr[-2000:]
    path = res / 'cl_random_MNIST_ConvNet_2ipc_2steps.json'
    whole = json.loads(path.read_text())
    cut = dict(whole, per_seed={'0': whole['per_seed']['0']}, seeds=1)  # as if stopped after seed 0
    path.write_text(json.dumps(cut))
    p = cl(*args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'seed 0: evaluated already' in p.stdout and p.stdout.count('Evaluate 1 random ConvNet') == 2  # seed 1's steps
    assert json.loads(path.read_text())['per_seed'] == whole['per_seed']  # evaluation is seeded: the same numbers
    more = cl(*args[:-4], '--seeds', 3, '--data_path', data, '--save_path', res)  # one more seed
    assert more.returncode == 0 and more.stdout.count('evaluated already') == 2, more.stderr[-2000:]
    assert list(json.loads(path.read_text())['per_seed']) == ['0', '1', '2']


@pytest.mark.e2e
@needs_fashion
def test_end_to_end_on_real_fashion_mnist(tmp_path):
    # ConvNetW32: the ConvNet family at a quarter of the width, so that testing on the 10,000 real test images is quick
    p = run('CL_DM.py', '--dataset', 'FashionMNIST', '--model', 'ConvNetW32', '--method', 'random', '--steps', 2, '--ipc', 5, '--num_eval', 1,
            '--epoch_eval_train', 20, '--seeds', 1, '--data_path', tmp_path / 'data', '--save_path', tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    steps = json.loads((tmp_path / 'cl_random_FashionMNIST_ConvNetW32_5ipc_2steps.json').read_text())['steps']
    assert steps[0]['mean'] > 0.5 and steps[1]['mean'] > 0.35  # far above chance (0.2 and 0.1)


@pytest.mark.e2e
def test_sigterm_while_a_memory_is_built_stops_within_seconds_keeping_the_finished_steps(data, tmp_path):
    proc = start('CL_DM.py', *TINY, '--method', 'DM', '--Iteration', 100000, '--batch_real', 8, '--data_path', data,
                 '--save_path', tmp_path, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    while 'class order' not in proc.stdout.readline():  # then it condenses the first step's memory
        assert proc.poll() is None, proc.stderr.read()
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    t = time.time()
    out, err = proc.communicate(timeout=60)
    assert time.time() - t < 20
    assert proc.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1].startswith('error: stopped by SIGTERM')
    assert 'Traceback' not in err and not list(tmp_path.glob('*.tmp*'))


@pytest.mark.e2e
@pytest.mark.slow  # (IDM's queue trains 10 steps a model each iteration: about 20 s)
def test_idm_memories_are_stored_as_mosaics_and_trained_on_expanded(data, tmp_path, cl, monkeypatch):
    trained_on = []

    def evaluate(images, labels, *a, **k):
        trained_on.append(labels.tolist())
        return {'ConvNet': [0.5]}

    monkeypatch.setattr(CL_DM, 'evaluate_models', evaluate)
    res = tmp_path / 'res'
    p = cl(*TINY, '--method', 'IDM', '--Iteration', 2, '--batch_real', 8, '--data_path', data, '--save_path', res)
    assert p.returncode == 0, p.stderr[-2000:]
    saved = load_pt(ours(res, 'cl_IDM'))
    first, second = order()[:5], order()[5:]
    assert [d[1].tolist() for d in saved['data']] == [np.repeat(first, 2).tolist(), np.repeat(second, 2).tolist()]
    assert saved['settings']['factor'] == 2 and saved['settings']['ce_weight'] == 0.5  # IDM's own defaults
    assert trained_on == [np.repeat(first, 2).tolist() * 4,  # each stored mosaic expanded to its four images
                          np.repeat(first + second, 2).tolist() * 4]
