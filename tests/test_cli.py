"""Bad command lines end with one line on stderr and exit status 2, without a traceback."""
import os
import runpy
import sys

import pytest

from helpers import ROOT, run

BAD = [
    ('main_DM.py', ['--dataset', 'CIFAR11']),
    ('main_DM.py', ['--model', 'ConvNetX']),
    ('main_DM.py', ['--dsa_strategy', 'color_blur']),
    ('main_DM.py', ['--ipc', '0']),
    ('main_DM.py', ['--ipc', 'ten']),
    ('main_DM.py', ['--eval_mode', 'Q']),
    ('main_DM.py', ['--lr_img', '-1']),
    ('main_DM.py', ['--num_exp', '0']),
    ('main_DM.py', ['--batch_real', '0']),
    ('main_DM.py', ['--Iteration', '-5']),
    ('main_DM.py', ['--device', 'cuda:0']),
    ('main_DM.py', ['--device', 'tpu']),
    ('main_DM.py', ['--dataset', 'CIFAR10', '--data_path', '{tmp}/empty']),
    ('main_DM.py', ['--save_path', '{tmp}/a_file']),
    ('main_DM.py', ['--save_path', '/proc/forbidden']),
    ('main_DM.py', ['--init', 'zeros']),
    ('main_DM.py', ['--no_such_flag']),
]


def prepare(tmp_path, args):
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'empty').mkdir(exist_ok=True)
    args = [a.replace('{tmp}', str(tmp_path)) for a in args]
    return args if '--save_path' in args else args + ['--save_path', str(tmp_path / 'res')]


@pytest.mark.parametrize('script,args', BAD, ids=[' '.join(a) for _, a in BAD])
def test_bad_command_line(tmp_path, capsys, monkeypatch, script, args):
    """Runs the script's entry point in this process (as `python script ...` would)."""
    monkeypatch.setattr(sys, 'argv', [script, *prepare(tmp_path, args)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err


@pytest.mark.parametrize('args', [['--ipc', '0'], ['--dataset', 'SVHN', '--data_path', '{tmp}/empty']])
def test_bad_command_line_in_a_real_process(tmp_path, args):
    p = run('main_DM.py', *prepare(tmp_path, args), timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and 'Traceback' not in p.stderr, p.stderr
