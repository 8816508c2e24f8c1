"""Long runs survive: checkpoints, resume, signals, divergence, safe loading, full disks; and what identifies a
run (its signature: the flags, not the attributes a script derives from them)."""
import errno
import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import main_DM
import runs
import utils
from helpers import assert_one_line_error, dm_args, run, run_in_process, start, stopped_at_call
from utils import Diverged, UsageError, load_pt, load_result

DM = ['--dataset', 'MNIST', '--ipc', 2, '--num_exp', 2, '--num_eval', 1, '--epoch_eval_train', 1, '--batch_real', 8,
      '--eval_mode', 'SS', '--checkpoint_every', 1]


def final_images(save_path):
    return [d[0] for d in load_result(os.path.join(save_path, 'res_DM_MNIST_ConvNet_2ipc.pt'))['data']]


def wait_for_checkpoint(proc, save_path, progress):
    """Wait until a checkpoint at or beyond `progress` exists (or the process ends)."""
    while proc.poll() is None:
        done = [int(p[-13:-3]) for p in glob.glob(os.path.join(save_path, 'checkpoint_*.pt'))]
        if done and max(done) >= progress:
            return
        time.sleep(0.01)


@pytest.fixture
def main_dm(monkeypatch, capsys):
    """main_DM.py's main run in this process (as run_script runs it): its exit status and output."""
    return lambda *args: run_in_process(monkeypatch, capsys, 'main_DM.py', *args, main=dm_main)


def dm_main():
    """main_DM.py's last line (its __main__ block)."""
    return runs.condense(main_DM.DM, main_DM.configure(runs.setup(main_DM.parser().parse_args())))


def method(iteration, interval=2000, base=runs.Method):
    """A method (a subclass of `base`) whose iteration is `iteration(it, syn, real, method)` (None: base's),
    evaluated every `interval` iterations."""
    members = dict(eval_interval=interval)
    if iteration is not None:
        members['iteration'] = lambda self, it, syn, real: iteration(it, syn, real, self)
    return type('Fn', (base,), members)


DM2 = method(None, 2, main_DM.DM)  # DM, evaluated every 2 iterations


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_result(data, tmp_path, main_dm):
    args = [*DM, '--Iteration', 12, '--data_path', data]
    p = main_dm(*args, '--save_path', tmp_path / 'whole')
    assert p.returncode == 0, p.stderr[-2000:]
    whole = final_images(tmp_path / 'whole')

    cut = tmp_path / 'cut'
    proc = start('main_DM.py', *args, '--save_path', cut)
    wait_for_checkpoint(proc, cut, 13 + 5)  # in the second experiment
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    ckpts = sorted(glob.glob(str(cut / 'checkpoint_*.pt')))
    assert 1 <= len(ckpts) <= 3  # two kept, and a third if the kill fell between a save and the removal
    # a truncated newest checkpoint is skipped with a warning
    newest = ckpts[-1]
    with open(newest, 'r+b') as f:
        f.truncate(os.path.getsize(newest) // 2)
    p = run('main_DM.py', *args, '--save_path', cut, '--resume', 'auto')
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'warning: skipping' in p.stdout + p.stderr and 'resuming from' in p.stdout
    assert not glob.glob(str(cut / '*.tmp*'))  # the killed run's half-written files are gone
    for a, b in zip(whole, final_images(cut)):
        assert torch.equal(a, b)  # bit-identical on the CPU (and in this process as in another)
    assert len(glob.glob(str(cut / 'checkpoint_*.pt'))) == 2


@pytest.mark.e2e
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
    proc = start('main_DM.py', *DM, '--num_exp', 1, '--Iteration', 200, '--data_path', data, '--checkpoint_every', 3,
                 '--save_path', tmp_path)
    wait_for_checkpoint(proc, tmp_path, 3)  # three iterations done
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]  # (above it: the progress bar)
    assert last.startswith('error: stopped by SIGTERM') and 'resume' in last and 'Traceback' not in err
    state = load_pt(sorted(glob.glob(str(tmp_path / 'checkpoint_*.pt')))[-1])
    assert 3 <= state['it'] < 200  # saved at the iteration where it stopped


@pytest.mark.e2e
def test_resume_with_other_settings_is_refused(data, tmp_path, main_dm):
    args = [*DM, '--num_exp', 1, '--Iteration', 2, '--data_path', data, '--save_path', tmp_path]
    assert main_dm(*args).returncode == 0
    assert_one_line_error(main_dm(*args, '--resume', 'auto', '--lr_img', 0.5), '--lr_img 1.0 there, 0.5 here')
    p = main_dm(*args, '--resume', 'auto', '--num_exp', 2)  # more experiments: continues
    assert p.returncode == 0 and len(load_result(tmp_path / 'res_DM_MNIST_ConvNet_2ipc.pt')['data']) == 2, p.stderr


def small_args(data, save_path, *extra):
    """main_DM's args for an in-process condense() of 4 iterations, a checkpoint after each."""
    return dm_args(data, save_path, '--ipc', 1, '--Iteration', 4, '--num_eval', 1, '--epoch_eval_train', 1,
                   '--checkpoint_every', 1, '--eval_mode', 'SS', *extra)


def test_nan_in_the_images_stops_the_run_and_keeps_what_was_written(data, tmp_path):
    def poisoned(it, syn, real, m):
        if it == 2:
            with torch.no_grad():
                syn.images[0, 0, 0, 0] = float('nan')
        return 1.0

    args = small_args(data, tmp_path, '--num_exp', '2')
    with pytest.raises(Diverged, match='iteration 2 of experiment 0') as e:
        runs.condense(method(poisoned), args)
    assert 'checkpoint_DM_MNIST_ConvNet_1ipc_0000000002.pt' in str(e.value)
    state = load_pt(tmp_path / 'checkpoint_DM_MNIST_ConvNet_1ipc_0000000002.pt')
    assert torch.isfinite(state['images']).all()  # the last good state, not overwritten by the NaN


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path}/pwned',))

    torch.save({'data': Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(UsageError, match='cannot load .* safely'):
        load_pt(tmp_path / 'evil.pt')
    assert not (tmp_path / 'pwned').exists()
    (tmp_path / 'raw.pt').write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UsageError):
        load_pt(tmp_path / 'raw.pt')
    assert not (tmp_path / 'pwned').exists()


def test_papers_result_files_with_numpy_scalars_load(tmp_path):
    res = {'data': [[torch.randn(10, 3, 32, 32), torch.arange(10)]], 'accs_all_exps': {'ConvNet': [np.float64(0.25)]}}
    torch.save(res, tmp_path / 'new.pt')
    assert load_result(tmp_path / 'new.pt')['accs_all_exps']['ConvNet'][0] == 0.25
    # files written with numpy 1 name its scalar type numpy.core.multiarray.scalar
    torch.save(res, tmp_path / 'old.pt', _use_new_zipfile_serialization=False)
    raw = (tmp_path / 'old.pt').read_bytes()
    if b'numpy._core.multiarray' in raw:
        (tmp_path / 'old.pt').write_bytes(raw.replace(b'numpy._core.multiarray', b'numpy.core.multiarray'))
    assert load_result(tmp_path / 'old.pt')['accs_all_exps']['ConvNet'][0] == 0.25


def test_result_structure_is_checked(tmp_path):
    torch.save({'data': [[torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2])]]}, tmp_path / 'bad.pt')
    with pytest.raises(UsageError, match='integer labels'):
        load_result(tmp_path / 'bad.pt')
    torch.save([1, 2], tmp_path / 'list.pt')
    with pytest.raises(UsageError, match='must hold a dict'):
        load_result(tmp_path / 'list.pt')


def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / 'res.pt'
    utils.atomic_save({'v': 1}, target)

    def full(obj, f, *a, **k):
        with open(f, 'wb') as fh:
            fh.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', full)
    with pytest.raises(UsageError, match='No space left'):
        utils.atomic_save({'v': 2}, target)
    monkeypatch.undo()
    assert load_pt(target) == {'v': 1} and os.listdir(tmp_path) == ['res.pt']


@pytest.mark.skipif(os.geteuid() != 0, reason='mounting a tiny file system needs root')
def test_really_full_disk(tmp_path):
    mnt = tmp_path / 'tiny'
    mnt.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(mnt)], capture_output=True).returncode:
        pytest.skip('cannot mount tmpfs here')
    try:
        utils.atomic_save({'v': 1}, mnt / 'res.pt')
        with pytest.raises(UsageError, match='cannot write'):
            utils.atomic_save({'v': torch.zeros(100000)}, mnt / 'res.pt')
        assert load_pt(mnt / 'res.pt') == {'v': 1} and os.listdir(mnt) == ['res.pt']
    finally:
        subprocess.run(['umount', str(mnt)])


@pytest.mark.e2e
def test_a_stop_during_evaluation_cuts_it_short_and_resume_redoes_it(data, tmp_path, monkeypatch):
    whole = small_args(data, tmp_path / 'whole')
    runs.condense(DM2, whole)
    expected = load_result(tmp_path / 'whole' / 'res_DM_MNIST_ConvNet_1ipc.pt')['data'][0][0]

    evaluate = runs.evaluate_models
    # the second evaluation (iteration 2) is interrupted half way
    monkeypatch.setattr(runs, 'evaluate_models', stopped_at_call(2, evaluate, []))
    cut = small_args(data, tmp_path / 'cut')
    t = time.time()
    with pytest.raises(runs.Interrupted, match='SIGINT at iteration 2'):
        runs.condense(DM2, cut)
    assert time.time() - t < 50  # the evaluation did not run to its end
    state = load_pt(sorted(glob.glob(str(tmp_path / 'cut' / 'checkpoint_*.pt')))[-1])
    assert state['it'] == 2 and state['evaluated'] is False
    monkeypatch.setattr(runs, 'evaluate_models', evaluate)
    runs.condense(DM2, small_args(data, tmp_path / 'cut', '--resume', 'auto'))
    assert torch.equal(load_result(tmp_path / 'cut' / 'res_DM_MNIST_ConvNet_1ipc.pt')['data'][0][0], expected)


@pytest.mark.e2e
def test_a_stopped_evaluation_continues_with_the_models_not_yet_trained(data, tmp_path, monkeypatch):
    """Evaluations are long (DM at ipc 10 on CIFAR-10: 5 models, half an hour on a CPU): a stop keeps the
    accuracies of the models already trained, and the resumed run trains only the others, with the same
    accuracies as an uninterrupted run."""
    three = ('--num_eval', '3', '--num_exp', '1')
    runs.condense(DM2, small_args(data, tmp_path / 'whole', *three))
    whole = json.load(open(tmp_path / 'whole' / 'res_DM_MNIST_ConvNet_1ipc.json'))['history']

    train = utils.train_and_test  # (as utils.evaluate_models calls it: one model)
    calls = []  # models 1-3: iteration 0; 4-6: iteration 2, stopped in the third
    monkeypatch.setattr(utils, 'train_and_test', stopped_at_call(6, train, calls))
    with pytest.raises(runs.Interrupted, match='SIGINT at iteration 2'):
        runs.condense(DM2, small_args(data, tmp_path / 'cut', *three))
    state = load_pt(sorted(glob.glob(str(tmp_path / 'cut' / 'checkpoint_*.pt')))[-1])
    assert state['it'] == 2 and state['evaluated'] is False
    assert sorted(state['finished']) == [('ConvNet', (0,)), ('ConvNet', (1,))]

    calls.clear()
    monkeypatch.setattr(utils, 'train_and_test', lambda *a, **k: calls.append(1) or train(*a, **k))
    runs.condense(DM2, small_args(data, tmp_path / 'cut', *three, '--resume', 'auto'))
    assert len(calls) == 1 + 3  # the third model of iteration 2, then the three of iteration 4
    cut = json.load(open(tmp_path / 'cut' / 'res_DM_MNIST_ConvNet_1ipc.json'))['history']
    assert [(h['it'], h['accs']) for h in cut] == [(h['it'], h['accs']) for h in whole]


@pytest.mark.e2e
@pytest.mark.parametrize('script,cls,flags', [  # (DC: test_runs.py, a stop in the middle of an iteration; DM: above)
    ('main', 'GradientMatching', ['--method', 'DSA', '--dsa_strategy', 'crop_flip']),
    ('distill', 'CAFE', ['--query', '2', '--window', '2', '--max_outer', '3', '--max_inner', '2', '--eval_mode', 'SS']),
])
def test_every_method_resumes_bit_identically_after_a_crash(data, tmp_path, monkeypatch, script, cls, flags):
    module = __import__(script)
    method_class = getattr(module, cls)
    args = ['--dataset', 'MNIST', '--model', 'ConvNetW32', '--ipc', '2', '--Iteration', '4', '--num_exp', '2', '--num_eval', '1',
            '--epoch_eval_train', '1', '--batch_real', '4', '--checkpoint_every', '1', '--data_path', str(data), *flags]

    def run_main(save_path, *extra):
        monkeypatch.setattr(sys, 'argv', [script, *args, '--save_path', str(save_path), *extra])
        runs.condense(method_class, module.configure(runs.setup(module.parser().parse_args())))
        return load_result(glob.glob(str(save_path / 'res_*.pt'))[0])

    whole = run_main(tmp_path / 'whole')
    step = method_class.iteration
    calls = []

    def crash_in_the_second_experiment(self, it, *a):
        calls.append(it)
        if len(calls) == 4 + 3 + 1:  # iteration 3 of experiment 1
            raise RuntimeError('crash')
        return step(self, it, *a)

    monkeypatch.setattr(method_class, 'iteration', crash_in_the_second_experiment)
    with pytest.raises(RuntimeError, match='crash'):
        run_main(tmp_path / 'cut')
    calls = []
    monkeypatch.setattr(method_class, 'iteration', lambda self, it, *a: calls.append(it) or step(self, it, *a))
    resumed = run_main(tmp_path / 'cut', '--resume', 'auto')
    assert calls == [3]  # only the iteration that crashed is done again
    assert len(resumed['data']) == len(whole['data']) == 2
    for (a, la), (b, lb) in zip(resumed['data'], whole['data']):
        assert torch.equal(a, b) and torch.equal(la, lb)  # every experiment, bit for bit
    assert resumed['accs_all_exps'] == whole['accs_all_exps']


def test_a_file_torch_did_not_write_or_a_truncated_one_is_named_as_such(tmp_path):
    (tmp_path / 'notes.pt').write_text('not a checkpoint')
    with pytest.raises(UsageError, match=r'notes.pt is not a file that torch.save wrote \(cannot load it\)$'):
        load_pt(tmp_path / 'notes.pt')
    torch.save({'images': torch.zeros(4, 3)}, tmp_path / 'good.pt')
    data = (tmp_path / 'good.pt').read_bytes()
    (tmp_path / 'cut.pt').write_bytes(data[:len(data) // 2])
    with pytest.raises(UsageError, match=r'cannot load .*cut.pt safely: it is truncated or damaged$'):
        load_pt(tmp_path / 'cut.pt')
    assert torch.equal(load_pt(tmp_path / 'good.pt')['images'], torch.zeros(4, 3))


# ----------------------------------------------------------------------------------------------------
# What identifies a run: the flags (as the script resolved them) and the data, not every attribute
# ----------------------------------------------------------------------------------------------------

def pull(it, syn, real, m):
    """A stand-in method: one step of the images towards the mean of a fresh draw of 2 real images per class."""
    target = torch.stack([real.get_images(c, 2).mean(0)
                          for c in range(m.data.num_classes)]).repeat_interleave(m.args.ipc, 0)
    loss = (syn.images - target).square().sum()
    syn.step(loss)
    return loss.item()


def test_the_signature_is_the_flags_and_the_data(data, tmp_path):
    args = small_args(data, tmp_path)
    _, _, data_info = runs.load_real(args)  # (the identity of the data: data_id)
    sig = runs.signature(args, data_info)
    assert set(sig) == (set(args.flags) - runs.NOT_AN_IDENTITY) | {'data_id'}
    assert sig['dsa_strategy'] == 'color_crop_cutout_scale_rotate' and sig['lr_img'] == 1.0  # as configure() resolved them
    assert 'dsa' not in sig and 'channel' not in sig and 'num_classes' not in sig  # derived, not flags
    args.something_new = 3  # a later version derives one more attribute from the flags
    args.num_classes = 11
    assert runs.signature(args, data_info) == sig
    assert runs.settings(args, data_info)['something_new'] == 3  # (the record's protocol still shows it)
    other = small_args(data, tmp_path / 'b', '--lr_img', 0.5, '--checkpoint_every', 2, '--device', 'cpu')
    assert runs.differences(sig, runs.signature(other, runs.load_real(other)[2])) == '--lr_img 1.0 there, 0.5 here'  # resumable flags aside
    # an older version's signature held more keys: only this version's are compared
    assert runs.differences({**sig, 'outer_loop': 7}, sig) == ''
    assert runs.differences({k: v for k, v in sig.items() if k != 'amp'}, sig) == '--amp None there, False here'
    # a flag added since (--minutes): an older signature without it had no time budget
    older = {k: v for k, v in sig.items() if k != 'minutes'}
    assert runs.differences(older, sig) == ''
    assert runs.differences(older, {**sig, 'minutes': 30.0}) == '--minutes None there, 30.0 here'


def test_a_run_resumes_after_a_script_derives_another_attribute(data, tmp_path, monkeypatch):
    """Checkpoints and the record written before a new derived attribute (or by an older version, whose
    signature held more keys) are this run's: --resume continues them, to the uninterrupted result."""
    monkeypatch.setattr(runs, 'evaluate_models', lambda images, labels, pool, *a, **k: {m: [0.5] for m in pool})
    flags = ['--num_exp', 2, '--ipc', 2]
    runs.condense(method(pull), small_args(data, tmp_path / 'whole', *flags))
    whole = load_result(tmp_path / 'whole' / 'res_DM_MNIST_ConvNet_2ipc.pt')['data']
    calls = []

    def crash_in_the_second_experiment(it, *a):
        calls.append(it)
        if len(calls) == 4 + 3:  # iteration 2 of experiment 1
            raise RuntimeError('crash')
        return pull(it, *a)

    cut = tmp_path / 'cut'
    with pytest.raises(RuntimeError, match='crash'):
        runs.condense(method(crash_in_the_second_experiment), small_args(data, cut, *flags))
    newest = sorted(glob.glob(str(cut / 'checkpoint_*.pt')))[-1]
    state = load_pt(newest)
    assert (state['exp'], state['it']) == (1, 2) and 'something_new' not in state['signature']
    record = json.loads((cut / 'res_DM_MNIST_ConvNet_2ipc.json').read_text())
    assert record['status'] == 'running'
    for sig in (state['signature'], record['signature']):  # as an older version would have written them
        sig['outer_loop'] = 7
    torch.save(state, newest)
    (cut / 'res_DM_MNIST_ConvNet_2ipc.json').write_text(json.dumps(record))

    args = small_args(data, cut, *flags, '--resume', 'auto')
    args.something_new = 3
    calls.clear()
    runs.condense(method(lambda it, *a: calls.append(it) or pull(it, *a)), args)
    assert calls == [2, 3]  # continued where it stopped
    resumed = load_result(cut / 'res_DM_MNIST_ConvNet_2ipc.pt')['data']
    assert len(resumed) == len(whole) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(resumed, whole))
    record = json.loads((cut / 'res_DM_MNIST_ConvNet_2ipc.json').read_text())
    assert record['status'] == 'finished' and record['protocol']['something_new'] == 3
    assert record['signature'] == json.loads((tmp_path / 'whole' / 'res_DM_MNIST_ConvNet_2ipc.json').read_text())['signature']
