"""Bad input a new user may give any script ends with one line on stderr and a non-zero exit: sizes that
cannot fit, allocation failures, files that would run code, a data path that names a file."""
import argparse

import pytest
import torch

import runs
import utils
from helpers import assert_one_line_error, run, run_in_process

SCRIPTS = {  # script: flags that make it condense or evaluate almost nothing
    'main.py': ['--Iteration', '1', '--num_exp', '1', '--num_eval', '1', '--epoch_eval_train', '1'],
    'main_DM.py': ['--Iteration', '1', '--num_exp', '1', '--num_eval', '1', '--epoch_eval_train', '1'],
    'distill.py': ['--Iteration', '1', '--num_exp', '1', '--num_eval', '1', '--epoch_eval_train', '1'],
    'CL_DM.py': ['--seeds', '1', '--steps', '2', '--num_eval', '1', '--epoch_eval_train', '1'],
}


@pytest.mark.parametrize('script', SCRIPTS)
def test_a_synthetic_set_that_cannot_fit_is_refused_before_any_work(script, data, tmp_path, monkeypatch, capsys):
    noise = ['--init', 'noise'] if script != 'CL_DM.py' else []  # (CL's memories start from real images)
    p = run_in_process(monkeypatch, capsys, script, '--dataset', 'MNIST', '--data_path', data, '--save_path', tmp_path,
                       '--ipc', 10 ** 9, *noise, *SCRIPTS[script])
    line = assert_one_line_error(p, '--ipc 1000000000')
    assert 'reduce --ipc' in line if noise else 'smallest class has 10' in line
    assert not list(tmp_path.glob('checkpoint_*')) and not list(tmp_path.glob('res_*.pt'))


def test_check_fits_counts_the_images_their_gradient_and_momentum(monkeypatch):
    args = argparse.Namespace(ipc=1000, device='cpu')
    data = utils.DataInfo('CIFAR10', 3, (32, 32), 10, tuple(map(str, range(10))), (0.5,) * 3, (0.25,) * 3, 'id')
    need = 3 * 4 * 10 * 1000 * 3 * 32 * 32
    monkeypatch.setattr(runs, 'available_memory', lambda device: need)
    runs.check_fits(args, data)  # just fits
    monkeypatch.setattr(runs, 'available_memory', lambda device: need - 1)
    with pytest.raises(utils.UsageError, match='--ipc 1000 needs 0.3 GiB'):
        runs.check_fits(args, data)


def test_an_allocation_failure_ends_in_one_line_that_names_what_to_reduce(capsys):
    def main():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 91268055040 bytes.\nmore lines of C++")

    with pytest.raises(SystemExit) as e:
        runs.run_script(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and 'out of memory' in err[0] and '--ipc' in err[0]


def test_other_runtime_errors_keep_their_traceback():
    def main():
        raise RuntimeError('a bug of ours')

    with pytest.raises(RuntimeError, match='a bug of ours'):
        runs.run_script(main)


class Evil:
    def __reduce__(self):
        return (print, ('this ran',))


@pytest.mark.e2e
def test_a_file_that_would_run_code_is_refused_in_one_line_without_torchs_advice(data, tmp_path):
    """In a fresh process (as a user meets it): nothing but our line on stderr, and the code never runs."""
    bad = tmp_path / 'res_DM_MNIST_ConvNet_1ipc.pt'
    torch.save({'data': [Evil()]}, bad)
    p = run('evaluate.py', bad, '--data_path', data, '--num_eval', '1', '--epoch_eval_train', '1')
    assert_one_line_error(p, 'not plain data')
    assert 'this ran' not in p.stdout + p.stderr


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(data, tmp_path, monkeypatch, capsys):
    bad = tmp_path / 'checkpoint.pt'
    torch.save({'signature': {}, 'images': Evil()}, bad)
    p = run_in_process(monkeypatch, capsys, 'main_DM.py', '--dataset', 'MNIST', '--data_path', data, '--save_path',
                       tmp_path / 'out', '--ipc', '1', '--resume', bad, *SCRIPTS['main_DM.py'])
    assert_one_line_error(p, 'not plain data')
    assert 'this ran' not in p.stdout + p.stderr


@pytest.mark.parametrize('script', [*SCRIPTS, 'evaluate.py'])
def test_a_data_path_naming_a_file_is_refused_in_one_line(script, tmp_path, monkeypatch, capsys):
    """Not silently passed over for a system copy of the dataset (Debian's Fashion-MNIST)."""
    afile = tmp_path / 'data.txt'
    afile.write_text('not a folder')
    if script == 'evaluate.py':
        flags = [tmp_path / 'res_DM_FashionMNIST_ConvNet_1ipc.pt']
        torch.save({'data': [[torch.zeros(10, 1, 28, 28), torch.arange(10)]], 'accs_all_exps': {}}, flags[0])
    else:
        flags = ['--save_path', tmp_path / 'out', *SCRIPTS[script]]
    p = run_in_process(monkeypatch, capsys, script, *flags, '--dataset', 'FashionMNIST', '--data_path', afile)
    assert_one_line_error(p, f'{afile} is a file, not a folder')
