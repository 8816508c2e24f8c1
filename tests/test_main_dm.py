"""DM (main_DM.py) end to end: on the real Fashion-MNIST, and the same seed giving the same synthetic set.
(Its loss and its BatchNorm path: test_defaults.py.)"""
import json

import pytest
import torch

from helpers import needs_fashion, run, run_in_process
from utils import load_pt

# ConvNetW32: the ConvNet family at a quarter of the width, so that testing on the 10,000 real test images is quick
FAST = ['--dataset', 'FashionMNIST', '--model', 'ConvNetW32', '--num_exp', 1, '--epoch_eval_train', 60, '--batch_real', 32,
        '--ipc', 2, '--Iteration', 3]


@pytest.mark.e2e
@needs_fashion
def test_dm_end_to_end_on_real_fashion_mnist(tmp_path):
    res = tmp_path / 'res'
    p = run('main_DM.py', *FAST, '--num_eval', 1, '--data_path', tmp_path / 'data', '--save_path', res)
    assert p.returncode == 0, p.stderr[-2000:]
    saved = load_pt(res / 'res_DM_FashionMNIST_ConvNetW32_2ipc.pt')
    images, labels = saved['data'][0]
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    accs = saved['accs_all_exps']['ConvNetW32']
    assert len(accs) == 1 and accs[0] > 0.35  # chance: 0.1
    summary = json.loads((res / 'res_DM_FashionMNIST_ConvNetW32_2ipc.json').read_text())
    assert summary['results']['ConvNetW32']['n'] == 1 and summary['protocol']['Iteration'] == 3
    assert [h['it'] for h in summary['history']] == [0, 3]  # evaluated at the start and at the last iteration
    assert (res / 'vis_DM_FashionMNIST_ConvNetW32_2ipc_exp0_iter0.png').exists()
    assert (res / 'vis_DM_FashionMNIST_ConvNetW32_2ipc_exp0_iter3.png').exists()
    assert 'mean  = ' in p.stdout and not list(res.glob('*.tmp*'))


@pytest.mark.e2e
def test_the_same_seed_gives_the_same_set_however_many_models_evaluate_it(data, tmp_path, monkeypatch, capsys):
    """Evaluation runs on random streams of its own: evaluating more models leaves the synthetic set unchanged."""
    flags = ['--dataset', 'MNIST', '--num_exp', 2, '--epoch_eval_train', 1, '--batch_real', 8, '--ipc', 2, '--Iteration', 3,
             '--data_path', data]
    sets = []
    for num_eval, save_path in ((1, tmp_path / 'one'), (2, tmp_path / 'two')):
        p = run_in_process(monkeypatch, capsys, 'main_DM.py', *flags, '--num_eval', num_eval, '--save_path', save_path)
        assert p.returncode == 0, p.stderr[-2000:]
        saved = load_pt(save_path / 'res_DM_MNIST_ConvNet_2ipc.pt')
        assert len(saved['accs_all_exps']['ConvNet']) == 2 * num_eval  # num_eval models per experiment
        sets.append([images for images, _ in saved['data']])
    assert all(torch.equal(a, b) for a, b in zip(*sets)) and not torch.equal(*sets[0])  # (the two experiments differ)
