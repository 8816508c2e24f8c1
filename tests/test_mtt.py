"""buffer.py and main_MTT.py on the tiny MNIST of the `data` fixture: experts written, seeded and resumable bit for
bit; a buffer for other data refused in one line; the authors' replay_buffer files read; MTT end to end with its
learned step size saved, with --constant_memory, resumed bit for bit, and refused when its unroll cannot fit.
(The science, trajectory.py: tests/test_trajectory.py.)"""
import json
import os
import sys

import pytest
import torch

import buffer
import main_MTT
import runs
import trajectory as T
import utils
from helpers import assert_one_line_error, run, run_in_process
from utils import get_network, load_result

MODEL = ['--model', 'ConvNetW32']
EXPERTS = [*MODEL, '--dataset', 'MNIST', '--num_experts', 2, '--train_epochs', 2, '--batch_train', 50, '--device', 'cpu']
MTT = [*MODEL, '--dataset', 'MNIST', '--ipc', 1, '--syn_steps', 2, '--expert_epochs', 1, '--max_start_epoch', 1,
       '--num_eval', 1, '--epoch_eval_train', 1, '--device', 'cpu', '--lr_img', 10]


def make_buffer(data, path, *extra):
    args = buffer.parser().parse_args([str(a) for a in [*EXPERTS, '--data_path', data, '--buffer_path', path, *extra]])
    buffer.main(buffer.prepare(args))
    return os.path.join(path, 'MNIST', 'ConvNetW32')


@pytest.fixture(scope='module')
def experts(data, tmp_path_factory):
    """A buffer of 2 experts of 2 epochs (buffer.py, in this process): its path and its folder of experts."""
    path = tmp_path_factory.mktemp('buffers')
    return path, make_buffer(data, path)


def trajectories(folder):
    return [buffer.read_expert(p)[1] for p in buffer.expert_files(folder).values()]


def test_buffer_writes_seeded_experts_with_their_record(experts, data):
    path, folder = experts
    files = sorted(os.listdir(folder))
    assert files == ['expert_0000.pt', 'expert_0001.pt']  # (no checkpoint left behind)
    obj = torch.load(os.path.join(folder, files[1]), weights_only=True)  # plain data: loads with weights only
    record, traj = obj['record'], obj['trajectory']
    assert traj.shape == (3, record['num_params']) and traj.dtype == torch.float32  # init + 2 epochs
    assert {k: record[k] for k in ('dataset', 'model', 'zca', 'seed', 'train_epochs', 'lr_teacher', 'batch_train',
                                   'mom', 'l2', 'expert')} == dict(dataset='MNIST', model='ConvNetW32', zca=False, seed=0,
                                                                   train_epochs=2, lr_teacher=0.01, batch_train=50,
                                                                   mom=0.0, l2=0.0, expert=1)
    assert record['data_id'] and record['torch'] == str(torch.__version__)
    a, b = trajectories(folder)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1])  # each its own start; the experts train


def test_an_interrupted_expert_resumes_bit_identically(experts, data, tmp_path, monkeypatch):
    _, whole = experts
    train = T.train_expert

    def crash_after_the_first_epoch(*a, **k):
        on_epoch = k['on_epoch']

        def crashing(e, *rest):
            on_epoch(e, *rest)  # (its checkpoint is written)
            raise RuntimeError('crash')
        return train(*a, **dict(k, on_epoch=crashing))

    monkeypatch.setattr(T, 'train_expert', crash_after_the_first_epoch)
    with pytest.raises(RuntimeError, match='crash'):
        make_buffer(data, tmp_path)
    folder = os.path.join(tmp_path, 'MNIST', 'ConvNetW32')
    assert os.listdir(folder) == ['checkpoint_expert_0000_0000000001.pt']
    with pytest.raises(runs.UsageError, match='--resume auto'):  # not silently restarted
        make_buffer(data, tmp_path)
    calls = []
    monkeypatch.setattr(T, 'train_expert', lambda *a, **k: calls.append(k['start_epoch']) or train(*a, **k))
    make_buffer(data, tmp_path, '--resume', 'auto')
    assert calls == [1, 0]  # expert 0 from its epoch 1, expert 1 from the start
    assert all(torch.equal(a, b) for a, b in zip(trajectories(folder), trajectories(whole)))
    assert sorted(os.listdir(folder)) == ['expert_0000.pt', 'expert_0001.pt']
    calls.clear()
    make_buffer(data, tmp_path)  # the experts written are kept
    assert calls == []


def mtt_main():
    return main_MTT.condense(main_MTT.MTT, main_MTT.configure(runs.setup(main_MTT.parser().parse_args())))


def mtt(monkeypatch, capsys, *args):
    return run_in_process(monkeypatch, capsys, 'main_MTT.py', *map(str, args), main=mtt_main)


def test_a_buffer_for_other_data_is_refused_in_one_line(experts, data, tmp_path, monkeypatch, capsys):
    _, folder = experts
    other = tmp_path / 'buf' / 'MNIST' / 'ConvNetW32'
    other.mkdir(parents=True)
    record, traj = buffer.read_expert(os.path.join(folder, 'expert_0000.pt'))
    torch.save({'record': dict(record, data_id='0123456789abcdef'), 'trajectory': traj}, other / 'expert_0000.pt')
    p = mtt(monkeypatch, capsys, *MTT, '--Iteration', 1, '--data_path', data, '--buffer_path', tmp_path / 'buf',
            '--save_path', tmp_path / 'res')
    assert_one_line_error(p, 'expert_0000.pt', 'other data')
    torch.save({'record': dict(record, model='ConvNet'), 'trajectory': traj}, other / 'expert_0000.pt')
    assert_one_line_error(mtt(monkeypatch, capsys, *MTT, '--Iteration', 1, '--data_path', data, '--buffer_path',
                              tmp_path / 'buf', '--save_path', tmp_path / 'res'), "model 'ConvNet' there")
    p = mtt(monkeypatch, capsys, *MTT, '--Iteration', 1, '--data_path', data, '--buffer_path', tmp_path / 'none',
            '--save_path', tmp_path / 'res')
    assert_one_line_error(p, 'no experts in', 'buffer.py')
    # the authors draw start epochs from 0 .. max_start_epoch - 1: experts of 2 epochs serve --max_start_epoch 2 with
    # --expert_epochs 1 (the paper's CIFAR-10 ipc-1 row: 3 epochs for 2 and 2), and not 3
    p = mtt(monkeypatch, capsys, *MTT, '--Iteration', 1, '--max_start_epoch', 3, '--data_path', data, '--buffer_path',
            experts[0], '--save_path', tmp_path / 'res')
    assert_one_line_error(p, 'needs experts of at least 3 epochs')
    p = mtt(monkeypatch, capsys, *MTT, '--Iteration', 1, '--max_start_epoch', 2, '--num_eval', 0, '--snapshots',
            '--data_path', data, '--buffer_path', experts[0], '--save_path', tmp_path / 'exact')
    assert p.returncode == 0, p.stderr


def result(save_path):
    return load_result(save_path / 'res_MTT_MNIST_ConvNetW32_1ipc.pt')


@pytest.mark.e2e
def test_mtt_end_to_end_saves_the_set_and_its_learned_step_size(experts, data, tmp_path):
    res = tmp_path / 'res'
    p = run('main_MTT.py', *MTT, '--Iteration', 3, '--data_path', data, '--buffer_path', experts[0], '--save_path', res)
    assert p.returncode == 0, p.stderr[-3000:]
    saved = result(res)
    images, labels = saved['data'][0]
    assert images.shape == (10, 1, 28, 28) and torch.isfinite(images).all() and labels.tolist() == list(range(10))
    lr = saved['learned'][0]['syn_lr']
    assert isinstance(lr, float) and lr != 0.01  # learned (it started at --lr_teacher)
    assert saved['learned'] == [dict(syn_lr=lr, negative_lr_iterations=0)]
    assert saved['settings']['zca'] is False
    record = json.loads((res / 'res_MTT_MNIST_ConvNetW32_1ipc.json').read_text())
    assert record['status'] == 'finished' and record['learned'] == [dict(syn_lr=lr, negative_lr_iterations=0)]
    assert record['protocol']['buffer_experts'] == 2 and 'buffer_id' in record['signature']
    # evaluate.py trains the set's models with the learned step size, without being told (the report says it)
    p = run('evaluate.py', res / 'res_MTT_MNIST_ConvNetW32_1ipc.pt', '--num_eval', 1, '--epoch_eval_train', 1,
            '--data_path', data, '--device', 'cpu')
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((res / 'res_MTT_MNIST_ConvNetW32_1ipc_eval.json').read_text())
    assert report['settings']['learned_lr'] == {'0': lr} and 'the one learned with the set' in p.stdout
    assert set(record['pace']) >= {'loss', 'syn_lr', 'negative_lr', 'seconds'}


def test_constant_memory_runs_and_the_authors_buffer_files_load(experts, data, tmp_path, monkeypatch, capsys):
    """TESLA's gradient through the harness, on experts in the authors' replay_buffer layout."""
    authors = tmp_path / 'buf' / 'MNIST' / 'ConvNetW32'
    authors.mkdir(parents=True)
    net = get_network('ConvNetW32', 1, 10, (28, 28), 'cpu')
    torch.save([T.to_authors_layout(t, net) for t in trajectories(experts[1])], authors / 'replay_buffer_0.pt')
    p = mtt(monkeypatch, capsys, *MTT, '--Iteration', 2, '--constant_memory', '--data_path', data, '--buffer_path',
            tmp_path / 'buf', '--save_path', tmp_path / 'res')
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 experts from" in p.stdout and "authors' layout" in p.stdout
    saved = result(tmp_path / 'res')
    assert torch.isfinite(saved['data'][0][0]).all() and saved['learned'][0]['syn_lr'] != 0.01
    assert saved['settings']['constant_memory'] is True


@pytest.mark.e2e
def test_mtt_resumes_bit_identically_after_a_crash(experts, data, tmp_path, monkeypatch, capsys):
    args = [*MTT, '--Iteration', 3, '--num_eval', 0, '--snapshots', '--checkpoint_every', 1, '--data_path', data,
            '--buffer_path', experts[0]]
    assert mtt(monkeypatch, capsys, *args, '--save_path', tmp_path / 'whole').returncode == 0
    step, calls = main_MTT.MTT.iteration, []

    def crash_at_iteration_2(self, it, *a):
        calls.append(it)
        if it == 2:
            raise RuntimeError('crash')
        return step(self, it, *a)

    monkeypatch.setattr(main_MTT.MTT, 'iteration', crash_at_iteration_2)
    monkeypatch.setattr(sys, 'argv', ['main_MTT.py', *map(str, args), '--save_path', str(tmp_path / 'cut')])
    with pytest.raises(RuntimeError, match='crash'):
        mtt_main()
    calls = []
    monkeypatch.setattr(main_MTT.MTT, 'iteration', lambda self, it, *a: calls.append(it) or step(self, it, *a))
    assert mtt(monkeypatch, capsys, *args, '--save_path', tmp_path / 'cut', '--resume', 'auto').returncode == 0
    assert calls == [2]  # only the iteration that crashed is done again
    whole, cut = result(tmp_path / 'whole'), result(tmp_path / 'cut')
    assert torch.equal(whole['data'][0][0], cut['data'][0][0])  # the images, bit for bit
    assert whole['learned'] == cut['learned']  # and the learned step size


def test_an_unroll_that_cannot_fit_is_refused_before_it_starts(experts, data, tmp_path, monkeypatch, capsys):
    p = mtt(monkeypatch, capsys, *MTT, '--syn_steps', 10 ** 9, '--data_path', data, '--buffer_path', experts[0],
            '--save_path', tmp_path / 'res')
    assert_one_line_error(p, '--batch_syn', '--constant_memory', 'GiB')
    assert not (tmp_path / 'res' / 'res_MTT_MNIST_ConvNetW32_1ipc.json').exists()  # nothing started


def test_defaults_are_the_authors_by_dataset_and_ipc():
    d = main_MTT.MTT.defaults('CIFAR10', 1)
    assert (d['syn_steps'], d['expert_epochs'], d['max_start_epoch'], d['lr_lr'], d['zca']) == (50, 2, 2, 1e-7, True)
    assert main_MTT.MTT.defaults('CIFAR10', 10)['lr_img'] == 100  # (the table's value is a confirmed typo)
    assert main_MTT.MTT.defaults('TinyImageNet', 10)['batch_syn'] == 200
    assert main_MTT.MTT.defaults('CIFAR100', 20) == main_MTT.MTT.defaults('CIFAR100', 10)  # the nearest ipc below
    assert main_MTT.MTT.defaults('MNIST', 1) == dict(main_MTT.DIGITS, lr_img=100.0, init='real')  # chosen here
    args = main_MTT.configure(main_MTT.parser().parse_args(['--dataset', 'CIFAR10', '--ipc', '10', '--syn_steps', '7']))
    assert (args.syn_steps, args.expert_epochs, args.zca, args.init, args.dsa) == (7, 2, True, 'real', True)
    assert main_MTT.configure(main_MTT.parser().parse_args(['--dataset', 'CIFAR10', '--no-zca'])).zca is False


def test_zca_experts_and_distillation(data, tmp_path, monkeypatch, capsys):
    """--zca: the experts in <model>_zca, the set learned in the whitened space, the result saying so; a
    whitened run refuses a buffer made without whitening (no such folder)."""
    folder = make_buffer(data, tmp_path / 'buf', '--zca', '--num_experts', 1)
    assert folder.endswith('ConvNetW32') and not os.path.exists(folder)
    zca = os.path.join(tmp_path, 'buf', 'MNIST', 'ConvNetW32_zca')
    assert buffer.read_expert(os.path.join(zca, 'expert_0000.pt'))[0]['zca'] is True
    p = mtt(monkeypatch, capsys, *MTT, '--Iteration', 1, '--zca', '--data_path', data, '--buffer_path', tmp_path / 'buf',
            '--save_path', tmp_path / 'res')
    assert p.returncode == 0, p.stderr[-3000:]
    saved = result(tmp_path / 'res')
    assert saved['settings']['zca'] is True and saved['settings']['zca_eps'] == 0.1
    assert (tmp_path / 'res' / 'vis_MTT_MNIST_ConvNetW32_1ipc_exp0_iter1.png').exists()
    # evaluate.py whitens the real data alike, from the set's record
    p = run('evaluate.py', tmp_path / 'res' / 'res_MTT_MNIST_ConvNetW32_1ipc.pt', '--num_eval', 1, '--epoch_eval_train', 1,
            '--data_path', data, '--device', 'cpu')
    assert p.returncode == 0 and 'ZCA-whitened space (from the record)' in p.stdout, p.stderr[-3000:]
    report = json.loads((tmp_path / 'res' / 'res_MTT_MNIST_ConvNetW32_1ipc_eval.json').read_text())
    assert report['settings']['zca'] is True
    p = mtt(monkeypatch, capsys, *MTT, '--Iteration', 1, '--no-zca', '--data_path', data, '--buffer_path',
            tmp_path / 'buf', '--save_path', tmp_path / 'res2')
    assert_one_line_error(p, 'no experts in', '--zca')  # (the command it suggests: without --zca)


def test_get_dataset_whitens_the_pixels_with_zca(data):
    """utils.get_dataset(zca=True), what --zca loads: the [0, 1] pixels (no mean/std), ZCA fitted on the training
    images and applied to both splits; pictures un-whiten them; the record says so."""
    plain, zca = utils.get_dataset('MNIST', str(data)), utils.get_dataset('MNIST', str(data), zca=True)
    train, test = (plain[k].images * 0.3081 + 0.1307 for k in (6, 7))  # the [0, 1] pixels
    z_mean, Tm, _ = utils.zca_fit(train)
    assert zca[4:6] == ([0.0], [1.0]) and not torch.allclose(zca[6].images, train, atol=0.1)
    assert torch.allclose(zca[6].images, utils.zca_apply(train, z_mean, Tm), atol=1e-4)
    assert torch.allclose(zca[7].images, utils.zca_apply(test, z_mean, Tm), atol=1e-4)
    info = utils.DataInfo.of('MNIST', zca)
    assert torch.allclose(info.pixels(zca[6].images[:4]), train[:4], atol=1e-4) and info.record()['zca'] is True