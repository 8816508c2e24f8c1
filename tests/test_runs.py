"""One results folder, many runs: no run overwrites or deletes another's files; checkpoints in every
experiment and never onto other data; stop signals honoured within seconds and never mistaken for a
corrupt file; only our own temporaries are cleaned; renames are made durable.

One finished run of main_DM.py (the module's `finished` fixture) is what most tests run against: each
copies its folder, and runs the script's main() again in this process."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import main
import main_DM
import runs
import utils
from helpers import ROOT, assert_one_line_error, dm_args, run, run_in_process, start, write_mnist
from runs import Interrupted
from utils import load_pt, load_result

DM = ['--dataset', 'MNIST', '--ipc', 1, '--num_exp', 1, '--num_eval', 1, '--epoch_eval_train', 1, '--batch_real', 4,
      '--eval_mode', 'SS', '--Iteration', 2, '--checkpoint_every', 1]
RES = 'res_DM_MNIST_ConvNet_1ipc.pt'


@pytest.fixture(scope='module')
def finished(tmp_path_factory, data):
    """The save path of one finished main_DM.py run (DM flags, a checkpoint after every iteration) on `data`."""
    res = tmp_path_factory.mktemp('finished') / 'res'
    p = run('main_DM.py', *DM, '--data_path', data, '--save_path', res)
    assert p.returncode == 0, p.stderr[-2000:]
    assert glob.glob(str(res / 'checkpoint_*.pt')) and (res / RES).exists()
    return res


@pytest.fixture
def main_dm(monkeypatch, capsys):
    """main_DM.py's main run in this process (as run_script runs it): its exit status and output."""
    return lambda *args: run_in_process(monkeypatch, capsys, 'main_DM.py', *args, main=dm_main)


def dm_main():
    """main_DM.py's last line (its __main__ block)."""
    return runs.condense(main_DM.DM, main_DM.configure(runs.setup(main_DM.parser().parse_args())))


def method(iteration, interval=2000):
    """A runs.Method whose iteration is `iteration(it, syn, real)`, evaluated every `interval` iterations."""
    return type('Fn', (runs.Method,), dict(eval_interval=interval,
                                           iteration=lambda self, it, syn, real: iteration(it, syn, real)))


def files(folder):
    """{name: bytes} of every file in folder (but the lock file and temporaries that a killed run left)."""
    return {f: open(os.path.join(folder, f), 'rb').read() for f in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, f)) and not f.startswith('.lock_') and '.tmp' not in f}


@pytest.mark.e2e
@pytest.mark.parametrize('other', [['--seed', 1], ['--lr_img', 0.5], ['--Iteration', 3], ['--num_eval', 2]])
def test_a_run_with_other_settings_never_touches_the_files_of_another(finished, data, tmp_path, main_dm, other):
    res = shutil.copytree(finished, tmp_path / 'res')
    before = files(res)
    args = [*DM, *other, '--data_path', data, '--save_path', res]  # (a later value of a flag wins)
    assert_one_line_error(main_dm(*args), 'belongs to a run with other settings', f'--{other[0][2:]}', '--save_path',
                          '--overwrite')
    assert files(res) == before
    p = main_dm(*args, '--overwrite')
    assert p.returncode == 0, p.stderr[-2000:]
    assert load_result(res / RES)['settings'][other[0][2:]] == other[1]


def test_a_result_file_without_a_record_is_not_ours_to_replace(data, tmp_path, main_dm):
    res = tmp_path / 'res'
    res.mkdir()
    torch.save({'data': [], 'accs_all_exps': {}}, res / RES)  # e.g. the papers' released file
    before = files(res)
    assert_one_line_error(main_dm(*DM, '--data_path', data, '--save_path', res), 'has no record', '--overwrite')
    assert files(res) == before


@pytest.mark.e2e
def test_checkpoints_are_never_resumed_onto_other_data(finished, tmp_path, main_dm):
    res = shutil.copytree(finished, tmp_path / 'res')
    write_mnist(tmp_path / 'b', n_train=100, n_test=40, seed=1)  # the same shapes and labels, other images
    before = files(res)
    for extra in (['--resume', 'auto'], []):
        assert_one_line_error(main_dm(*DM, '--data_path', tmp_path / 'b', '--save_path', res, *extra), 'other data')
    assert files(res) == before


@pytest.mark.e2e
@pytest.mark.slow
def test_a_rerun_without_resume_never_deletes_an_unfinished_run(data, tmp_path, main_dm):
    res = tmp_path / 'res'
    args = [*DM, '--Iteration', 60, '--data_path', data, '--save_path', res]  # (a few seconds)
    proc = start('main_DM.py', *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(glob.glob(str(res / 'checkpoint_*.pt'))) < 2:
        time.sleep(0.05)
    assert_one_line_error(main_dm(*args), 'another run is writing')  # while it runs: its lock
    proc.kill()
    proc.wait()
    before = files(res)
    assert_one_line_error(main_dm(*args), 'unfinished run', '--resume auto', '--overwrite')
    assert files(res) == before
    p = main_dm(*args, '--resume', 'auto')
    assert p.returncode == 0 and 'resuming from' in p.stdout, p.stderr[-2000:]
    p = main_dm(*args)  # the same command again after it finished: a fresh run that replaces it
    assert p.returncode == 0 and 'resuming from' not in p.stdout, p.stderr[-2000:]
    assert load_result(res / RES)['settings']['Iteration'] == 60


def test_periodic_checkpoints_in_every_experiment(data, tmp_path, monkeypatch):
    monkeypatch.setattr(runs, 'evaluate_models', lambda images, labels, pool, *a, **k: {m: [0.5] for m in pool})
    saved = []
    save = runs.Checkpoints.save
    monkeypatch.setattr(runs.Checkpoints, 'save', lambda self, progress, state: saved.append((state['exp'], state['it']))
                        or save(self, progress, state))
    args = dm_args(data, tmp_path / 'r', '--ipc', 1, '--Iteration', 7, '--num_exp', 3, '--eval_mode', 'M',
                   '--checkpoint_every', 3, '--dsa_strategy', 'none')
    runs.condense(method(lambda it, syn, real: 0.0), args)
    # every 3 iterations (3 done since the last checkpoint), and after each (final) evaluation
    assert saved == [(0, 3), (0, 6), (0, 7), (1, 3), (1, 6), (1, 7), (2, 3), (2, 6), (2, 7)]


@pytest.mark.e2e
def test_a_stop_signal_is_not_mistaken_for_a_corrupt_checkpoint(finished, data, tmp_path, monkeypatch):
    res = shutil.copytree(finished, tmp_path / 'res')

    def signal_arrives(*a, **k):
        raise Interrupted('stopped by SIGTERM', signal.SIGTERM)

    monkeypatch.setattr(torch, 'load', signal_arrives)
    with pytest.raises(Interrupted):  # not "warning: skipping ... corrupt"
        runs.Checkpoints(str(res / 'checkpoint_DM_MNIST_ConvNet_1ipc_'), {}, utils.Group(0, 1)).load('auto')
    with pytest.raises(Interrupted):
        load_pt(res / RES)


@pytest.mark.e2e
def test_sigterm_mid_iteration_stops_within_seconds_and_resume_reproduces_the_run(data, tmp_path, monkeypatch, capsys):
    """A DC iteration at ipc 10 (10 outer steps, 9 x 50 inner epochs) takes long; SIGTERM abandons it. (Here
    one iteration of 6 outer steps and 5 x 28 inner epochs, a few seconds.)"""
    args = ['--method', 'DC', '--dataset', 'MNIST', '--model', 'ConvNetW32', '--ipc', 6, '--num_exp', 1, '--num_eval', 1,
            '--epoch_eval_train', 1, '--batch_real', 4, '--eval_mode', 'SS', '--Iteration', 1, '--checkpoint_every', 1,
            '--data_path', data]
    p = run_in_process(monkeypatch, capsys, 'main.py', *args, '--save_path', tmp_path / 'whole', main=main.main)
    assert p.returncode == 0, p.stderr[-2000:]
    whole = load_result(tmp_path / 'whole' / 'res_DC_MNIST_ConvNetW32_6ipc.pt')['data']
    whole_start = load_pt(sorted(glob.glob(str(tmp_path / 'whole' / 'checkpoint_*.pt')))[0])['images']  # (at iteration 0)

    cut = tmp_path / 'cut'
    proc = start('main.py', *args, '--save_path', cut)
    while proc.poll() is None and not glob.glob(str(cut / 'checkpoint_*.pt')):  # evaluated: iteration 0 has begun
        time.sleep(0.05)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    t = time.time()
    out, err = proc.communicate(timeout=120)
    assert time.time() - t < 10, 'not honoured within seconds'
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert 'stopped by SIGTERM at iteration 0 of experiment 0' in err.strip().splitlines()[-1]
    state = load_pt(sorted(glob.glob(str(cut / 'checkpoint_*.pt')))[-1])
    assert state['it'] == 0 and torch.equal(state['images'], whole_start)  # the state before iteration 0
    p = run_in_process(monkeypatch, capsys, 'main.py', *args, '--save_path', cut, '--resume', 'auto', main=main.main)
    assert p.returncode == 0 and 'resuming from' in p.stdout, p.stderr[-2000:]
    resumed = load_result(cut / 'res_DC_MNIST_ConvNetW32_6ipc.pt')['data']
    assert len(resumed) == len(whole) and all(torch.equal(a[0], b[0]) for a, b in zip(resumed, whole))


def test_only_our_own_temporaries_are_cleaned(tmp_path):
    """Temporaries are `<name>.tmp-<host>-<pid>-<8 hex>`: only ours (our file names), of this host, of a dead
    process are removed; a live process's, another host's (a shared file system) and anything else stay."""
    dead = 2 ** 22 + 12345  # beyond the pid range: no such process
    host = utils._HOST
    other = 'x' + host  # another machine sharing the folder (its pid means nothing here)
    ours = ['res_DM_MNIST_ConvNet_1ipc.pt', 'vis_DM_MNIST_ConvNet_1ipc_exp0_iter0.png', 'checkpoint_DM_x_0000000003.pt',
            'cl_DM_CIFAR100_ConvNet_20ipc_5steps_seed0.pt', 'cl_DM_MNIST_ConvNet_2ipc_2steps.json', 'res_x_eval.json',
            '.cache_32x32_3ch_abcdef.pt']
    theirs = ['notes.tmp1', f'data.csv.tmp-{host}-{dead}-0123abcd', f'my_res_file.txt.tmp-{host}-{dead}-0123abcd',
              f'res_DM.pt.tmp-{host}-{os.getpid()}-0123abcd',  # a live process's
              f'experiment.pt.tmp-{host}-{dead}-0123abcd', f'res_DM_x.pt.tmpx-{host}-{dead}-0123abcd',
              f'res_DM_x.pt.tmp-{host}-{dead}-0123abcz', f'res_DM_x.pt.tmp-{host}-{dead}',
              f'res_DM_x.pt.tmp{dead}'] + \
             [f'{n}.tmp-{other}-{dead}-0123abcd' for n in ours]  # another host's: never removed
    for name in [f'{n}.tmp-{host}-{dead}-0123abcd' for n in ours] + theirs + ours:
        (tmp_path / name).write_text('x')
    utils.remove_stale_temporaries(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(theirs + ours)


def test_a_completed_write_syncs_its_folder(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: synced.append(os.path.realpath(f'/proc/self/fd/{fd}')) or fsync(fd))
    utils.atomic_save({'v': 1}, tmp_path / 'res_a.pt')
    assert synced[-1] == str(tmp_path.resolve())  # after the rename: the folder
    assert synced[0].startswith(str(tmp_path.resolve() / 'res_a.pt.tmp'))  # before it: the file


def test_a_write_makes_its_folder_or_says_in_one_line_why_it_cannot(tmp_path):
    utils.atomic_save({'v': 1}, tmp_path / 'new' / 'deeper' / 'res_a.pt')
    assert load_pt(tmp_path / 'new' / 'deeper' / 'res_a.pt') == {'v': 1}
    (tmp_path / 'file').write_text('')
    with pytest.raises(utils.UsageError, match='cannot write .*any previous version is intact'):
        utils.atomic_json({}, tmp_path / 'file' / 'res_b.json')  # (a file where a folder should be)


def test_a_signal_during_a_write_leaves_the_previous_file(tmp_path, monkeypatch):
    utils.atomic_save({'v': 1}, tmp_path / 'res_a.pt')

    def interrupted(obj, f, *a, **k):
        open(f, 'wb').write(b'half')
        raise Interrupted('stopped by SIGTERM', signal.SIGTERM)

    monkeypatch.setattr(torch, 'save', interrupted)
    with pytest.raises(Interrupted):
        utils.atomic_save({'v': 2}, tmp_path / 'res_a.pt')
    monkeypatch.undo()
    assert load_pt(tmp_path / 'res_a.pt') == {'v': 1} and os.listdir(tmp_path) == ['res_a.pt']


def test_sigint_in_process_is_caught_by_the_loop(data, tmp_path):
    """condense installs its own handlers: a stop signal mid-iteration leaves the pre-iteration state."""
    args = dm_args(data, tmp_path / 'r', '--ipc', 1, '--Iteration', 5, '--num_exp', 1, '--eval_mode', 'M',
                   '--checkpoint_every', 1, '--dsa_strategy', 'none', '--num_eval', 1, '--epoch_eval_train', 1)
    seen = []

    def iteration(it, syn, real):
        with torch.no_grad():
            syn.images.add_(1.0)  # a partial update...
        seen.append(syn.images.detach().clone())
        if it == 2:
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
            time.sleep(30)  # ...then a long step, cut short
        return 0.0

    t = time.time()
    with pytest.raises(Interrupted, match='SIGINT at iteration 2 of experiment 0'):
        runs.condense(method(iteration), args)
    assert time.time() - t < 20
    state = load_pt(sorted(glob.glob(str(tmp_path / 'r' / 'checkpoint_*.pt')))[-1])
    assert state['it'] == 2 and torch.equal(state['images'], seen[1])  # not seen[2]: iteration 2 was abandoned


ENDING = """
import os, signal, sys
sys.path.insert(0, {root!r})
import runs
from utils import UsageError
def main():
    raise UsageError("bad input")
def leave_group():  # a stop signal arrives while the run ends (torchrun stopping the other processes)
    os.kill(os.getpid(), signal.SIGTERM)
runs.leave_group = leave_group
runs.run_script(main)
"""


def test_a_stop_signal_while_a_run_ends_does_not_cut_it_short():
    proc = subprocess.run([sys.executable, '-c', ENDING.format(root=ROOT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == 'error: bad input', (proc.returncode, proc.stderr)


class FakeClock:
    """time.perf_counter for runs.py: every condensation iteration takes `seconds`."""

    def __init__(self, seconds):
        self.now, self.seconds, self.calls = 0.0, seconds, 0

    def __call__(self):
        self.calls += 1
        self.now += self.seconds if self.calls % 2 == 0 else 0.0  # (called at the start and end of each)
        return self.now


def test_minutes_end_the_run_on_time_with_evaluations_at_0_half_and_the_end_and_resume_keeps_the_clock(
        data, tmp_path, monkeypatch):
    evaluated, crash = [], {'at': None}
    monkeypatch.setattr(runs, 'evaluate_models',
                        lambda images, labels, pool, a, t, d, keys, *r, **k: evaluated.append(keys) or {m: [0.5] for m in pool})

    def train_iteration(it, syn, real):  # every iteration leaves its mark on the images
        if it == crash['at']:
            raise RuntimeError('crash')
        syn.images.data.add_(1.0)
        return 0.0

    def condense(save_path, *flags):
        monkeypatch.setattr(runs.time, 'perf_counter', FakeClock(10.0))
        args = dm_args(data, save_path, '--ipc', 1, '--Iteration', 100, '--num_exp', 1, '--minutes', 1, '--snapshots',
                       '--checkpoint_every', 1, '--dsa_strategy', 'none', *flags)
        return runs.condense(method(train_iteration, 2), args)

    condense(tmp_path / 'whole')
    # 10 s per iteration: half the time (30 s) is past after 3 iterations, the minute after 6
    assert evaluated == [(0, 0), (0, 3), (0, 6)]
    record = runs.read_json(str(tmp_path / 'whole' / 'res_DM_MNIST_ConvNet_1ipc.json'))
    assert [h['it'] for h in record['history']] == [0, 3, 6] and record['pace']['iterations'] == 6
    start = load_pt(tmp_path / 'whole' / 'res_DM_MNIST_ConvNet_1ipc_exp0_iter0.pt')['data'][0][0]
    for it in (3, 6):
        snapshot = load_pt(tmp_path / 'whole' / f'res_DM_MNIST_ConvNet_1ipc_exp0_iter{it}.pt')
        assert torch.allclose(snapshot['data'][0][0], start + it) and snapshot['settings']['minutes'] == 1
    assert torch.allclose(load_result(tmp_path / 'whole' / 'res_DM_MNIST_ConvNet_1ipc.pt')['data'][0][0], start + 6)

    # a crash in iteration 4: the resumed run counts the 40 s already spent
    evaluated.clear()
    crash['at'] = 4
    with pytest.raises(RuntimeError, match='crash'):
        condense(tmp_path / 'cut')
    crash['at'] = None
    condense(tmp_path / 'cut', '--resume', 'auto')
    assert evaluated == [(0, 0), (0, 3), (0, 6)]
    assert [f for f in files(tmp_path / 'cut') if f.startswith('res_')] == \
        [f for f in files(tmp_path / 'whole') if f.startswith('res_')]
    assert torch.equal(load_result(tmp_path / 'cut' / 'res_DM_MNIST_ConvNet_1ipc.pt')['data'][0][0],
                       load_result(tmp_path / 'whole' / 'res_DM_MNIST_ConvNet_1ipc.pt')['data'][0][0])


def test_num_eval_0_with_snapshots_saves_the_sets_without_evaluating(data, tmp_path, monkeypatch):
    monkeypatch.setattr(runs, 'evaluate_models', lambda *a, **k: pytest.fail('evaluated'))
    args = dm_args(data, tmp_path / 'r', '--ipc', 1, '--Iteration', 2, '--num_exp', 1, '--num_eval', 0, '--snapshots',
                   '--eval_mode', 'SS', '--dsa_strategy', 'none')
    summary = runs.condense(method(lambda it, syn, real: 0.0, 1), args)
    assert summary == {'ConvNet': dict(mean=None, std=None, n=0, accs=[])}
    assert sorted(f for f in os.listdir(tmp_path / 'r') if f.startswith('res_')) == [
        'res_DM_MNIST_ConvNet_1ipc.json', 'res_DM_MNIST_ConvNet_1ipc.pt', 'res_DM_MNIST_ConvNet_1ipc_exp0_iter0.pt',
        'res_DM_MNIST_ConvNet_1ipc_exp0_iter1.pt', 'res_DM_MNIST_ConvNet_1ipc_exp0_iter2.pt']
    with pytest.raises(utils.UsageError, match='--num_eval must be at least 1 \\(0 with --snapshots\\)'):
        dm_args(data, tmp_path / 'r2', '--num_eval', 0)
