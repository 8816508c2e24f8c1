"""Under torchrun (2 processes, gloo on the CPU): the same synthetic sets and accuracies as one process, bit
for bit; evaluation and continual learning shared out; resume; a killed process ends the job."""
import glob
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from helpers import ROOT, one_thread, run_in_process, torchrun, torchrun_command
from utils import load_result

pytestmark = [pytest.mark.torchrun, pytest.mark.e2e]
TINY = ['--dataset', 'MNIST', '--ipc', 2, '--num_exp', 1, '--num_eval', 3, '--epoch_eval_train', 2, '--batch_real', 8]


@pytest.fixture
def plain(monkeypatch, capsys):
    """A script (its __main__ block) in this process, with one thread as each torchrun process has (their
    results must be equal, bit for bit)."""
    def run_plain(script, *args):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return run_in_process(monkeypatch, capsys, script, *args)  # (its __main__ block: run_script(...))
        finally:
            torch.set_num_threads(threads)
    return run_plain


def result(save_path):
    return load_result(glob.glob(os.path.join(save_path, 'res_*.pt'))[0])


def same(a, b):
    assert len(a['data']) == len(b['data'])
    for (x, lx), (y, ly) in zip(a['data'], b['data']):
        assert torch.equal(x, y) and torch.equal(lx, ly)
    assert a['accs_all_exps'] == b['accs_all_exps']  # evaluation shared out: the same accuracies


W32 = ['--model', 'ConvNetW32']  # (a narrow ConvNet where the model does not matter: quicker)


@pytest.mark.parametrize('script,flags', [
    ('main_DM.py', ['--Iteration', 3, *W32]),
    ('main_DM.py', ['--Iteration', 2, '--model', 'ConvNetBN']),  # BatchNorm: every process does every class
    ('main.py', ['--method', 'DC', '--Iteration', 2, '--ipc', 3, *W32]),  # (3 outer steps: images exchanged between)
    ('main.py', ['--method', 'DSA', '--Iteration', 2, *W32]),
    ('main.py', ['--method', 'DC', '--Iteration', 1, '--model', 'ConvNetBN']),  # BatchNorm frozen: classes shared
    ('distill.py', ['--Iteration', 2, '--query', 3, '--window', 2, '--max_outer', 3, '--max_inner', 2, '--eval_mode', 'SS', *W32]),
    ('distill.py', ['--method', 'DSA', '--Iteration', 1, '--query', 3, '--window', 2, '--max_outer', 2, '--max_inner', 2, *W32]),
])
def test_two_processes_give_the_single_process_result_bit_for_bit(data, tmp_path, plain, script, flags):
    args = [*TINY, *flags, '--data_path', data]
    p = plain(script, *args, '--save_path', tmp_path / 'one')
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun(script, *args, '--save_path', tmp_path / 'two')
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert '2 processes' in p.stdout and p.stdout.count('Final Results') == 1  # rank 0 speaks
    same(result(tmp_path / 'one'), result(tmp_path / 'two'))
    assert sorted(os.listdir(tmp_path / 'one')) == sorted(os.listdir(tmp_path / 'two'))  # written once, by rank 0


def test_evaluate_py_shares_its_models_out(data, tmp_path, plain):
    torch.save({'data': [[torch.randn(20, 1, 28, 28), torch.arange(10).repeat_interleave(2)]]}, tmp_path / 'set.pt')
    flags = ['--dataset', 'MNIST', '--num_eval', 3, '--epoch_eval_train', 2, '--data_path', data]
    assert plain('evaluate.py', tmp_path / 'set.pt', *flags, '--save_path', tmp_path / 'one').returncode == 0
    p = torchrun('evaluate.py', tmp_path / 'set.pt', *flags, '--save_path', tmp_path / 'two')
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / 'set_eval.json').read_text()) for d in ('one', 'two'))
    assert one['results'] == two['results'] and one['done'] == two['done']  # every process's models, for --resume
    assert [d['numbers'] for d in two['done']] == [[0], [1], [2]]


def test_continual_learning_shares_its_seeds_out(data, tmp_path, plain):
    flags = ['--dataset', 'MNIST', '--steps', 2, '--ipc', 2, '--num_eval', 1, '--epoch_eval_train', 2, '--seeds', 3,
             '--method', 'DM', '--Iteration', 2, '--batch_real', 8, '--data_path', data]
    assert plain('CL_DM.py', *flags, '--save_path', tmp_path / 'one').returncode == 0
    p = torchrun('CL_DM.py', *flags, '--save_path', tmp_path / 'two')
    assert p.returncode == 0, p.stderr[-3000:]
    name = 'cl_DM_MNIST_ConvNet_2ipc_2steps'
    one, two = (json.loads((tmp_path / d / f'{name}.json').read_text()) for d in ('one', 'two'))
    assert one['per_seed'] == two['per_seed'] and one['steps'] == two['steps']
    for seed in range(3):  # every seed's memories, written by rank 0
        a, b = (torch.load(tmp_path / d / f'cl_DM_MNIST_ConvNet_2ipc_2steps_seed{seed}.pt') for d in ('one', 'two'))
        assert all(torch.equal(x[0], y[0]) for x, y in zip(a['data'], b['data']))


@pytest.mark.slow
def test_resume_under_two_processes(data, tmp_path, plain):
    args = [*TINY, '--Iteration', 15, '--checkpoint_every', 1, '--data_path', data]
    p = plain('main_DM.py', *args, '--save_path', tmp_path / 'whole')
    assert p.returncode == 0, p.stderr[-3000:]
    cut = tmp_path / 'cut'
    job = subprocess.Popen(torchrun_command('main_DM.py', *args, '--save_path', cut), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd=ROOT, env=one_thread())
    while job.poll() is None and len(glob.glob(str(cut / 'checkpoint_*.pt'))) < 2:
        time.sleep(0.05)
    workers = children(job.pid)  # (torchrun starts them in sessions of their own)
    for pid in [job.pid, *workers]:  # the whole job, at once
        os.kill(pid, signal.SIGKILL)
    job.wait()
    while any(map(alive, workers)):  # until the workers are gone too
        time.sleep(0.05)
    p = torchrun('main_DM.py', *args, '--save_path', cut, '--resume', 'auto')
    assert p.returncode == 0 and 'resuming from' in p.stdout, p.stderr[-3000:]
    same(result(tmp_path / 'whole'), result(cut))


def alive(pid):
    try:
        return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def children(pid):
    """The processes whose parent is pid (read from /proc)."""
    found = []
    for stat in glob.glob('/proc/[0-9]*/stat'):
        try:
            fields = open(stat).read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split('/')[2]))
    return found


def rank_of(pid):
    environ = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
    return int(next(v for v in environ if v.startswith(b'RANK=')).split(b'=')[1])


@pytest.mark.parametrize('killed', [0, 1])
def test_a_killed_process_ends_the_job_with_an_error_soon(data, tmp_path, killed):
    """Whichever process dies, the other says why the job ended: it either sees the collective fail or is
    stopped by torchrun (SIGTERM) first; the main process may be the one that died."""
    job = subprocess.Popen(torchrun_command('main_DM.py', *TINY, '--Iteration', 100000, '--data_path', data,
                                            '--save_path', tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, cwd=ROOT, env=one_thread())
    while job.poll() is None and not glob.glob(str(tmp_path / 'checkpoint_*.pt')):  # past the first evaluation
        time.sleep(0.1)
    workers = {rank_of(pid): pid for pid in children(job.pid)}
    assert sorted(workers) == [0, 1]
    os.kill(workers[killed], signal.SIGKILL)
    t = time.time()
    out, err = job.communicate(timeout=120)
    assert job.returncode != 0 and time.time() - t < 60
    assert f'error: process {1 - killed}: ' in err, err[-3000:]


TEARDOWN = '''
import os, sys
sys.path.insert(0, {root!r})
import torch
import runs
runs.init_distributed('cpu')
x = torch.ones(3, requires_grad=True)
torch.optim.SGD([x], lr=0.1)  # (the first optimiser imports torch._dynamo)
torch.distributed.all_reduce(x.detach())
runs.leave_group()
threads = sorted(open(f'/proc/self/task/{{t}}/comm').read().strip() for t in os.listdir('/proc/self/task'))
os.write(1, f'threads left: {{threads}}\\n'.encode())  # (one write: the two processes share the pipe)
'''


@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='lists threads through Linux /proc')
def test_leaving_the_group_ends_its_threads_before_the_interpreter_ends(tmp_path):
    """A process that left the group has no gloo thread left: one that outlived the interpreter aborted a
    finished job's process at exit now and then ('terminate called without an active exception')."""
    script = tmp_path / 'teardown.py'
    script.write_text(TEARDOWN.format(root=str(ROOT)))
    p = subprocess.run(torchrun_command(script), capture_output=True, text=True, timeout=300, env=one_thread())
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.startswith('threads left:')]
    assert len(lines) == 2 and not any('gloo' in line for line in lines), p.stdout


def test_buffer_py_shares_its_experts_out_and_writes_the_single_process_buffer(data, tmp_path):
    """Under torchrun expert i is made by process i % 2: the same expert files as one process writes, bit for bit."""
    import buffer
    flags = ['--dataset', 'MNIST', '--model', 'ConvNetW32', '--train_epochs', 1, '--num_experts', 3, '--batch_train', 50,
             '--data_path', data]
    p = subprocess.run(torchrun_command('buffer.py', *flags, '--buffer_path', tmp_path / 'one', nproc=1),
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=one_thread())
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun('buffer.py', *flags, '--buffer_path', tmp_path / 'two')
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    one, two = (buffer.expert_files(tmp_path / w / 'MNIST' / 'ConvNetW32') for w in ('one', 'two'))
    assert list(one) == list(two) == [0, 1, 2]
    for i in one:
        (r1, t1), (r2, t2) = buffer.read_expert(one[i]), buffer.read_expert(two[i])
        assert torch.equal(t1, t2) and r1 == r2
