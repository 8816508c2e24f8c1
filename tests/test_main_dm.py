import json

import torch

from helpers import needs_fashion, run
from utils import load_pt

FAST = ['--dataset', 'FashionMNIST', '--num_exp', 1, '--epoch_eval_train', 60, '--batch_real', 32, '--ipc', 2,
        '--Iteration', 3]


@needs_fashion
def test_dm_end_to_end_on_real_fashion_mnist(tmp_path):
    res = tmp_path / 'res'
    p = run('main_DM.py', *FAST, '--num_eval', 1, '--data_path', tmp_path / 'data', '--save_path', res)
    assert p.returncode == 0, p.stderr[-2000:]
    saved = load_pt(res / 'res_DM_FashionMNIST_ConvNet_2ipc.pt')
    images, labels = saved['data'][0]
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    accs = saved['accs_all_exps']['ConvNet']
    assert len(accs) == 1 and accs[0] > 0.35  # chance: 0.1
    summary = json.loads((res / 'res_DM_FashionMNIST_ConvNet_2ipc.json').read_text())
    assert summary['results']['ConvNet']['n'] == 1 and summary['protocol']['Iteration'] == 3
    assert (res / 'vis_DM_FashionMNIST_ConvNet_2ipc_exp0_iter0.png').exists()
    assert (res / 'vis_DM_FashionMNIST_ConvNet_2ipc_exp0_iter3.png').exists()
    assert 'mean  = ' in p.stdout and not list(res.glob('*.tmp*'))

    # the same seed gives the same synthetic set, and evaluation runs on its own random stream, so
    # evaluating more models leaves the synthetic set unchanged
    p = run('main_DM.py', *FAST, '--num_eval', 2, '--data_path', tmp_path / 'data', '--save_path', tmp_path / 'again')
    assert p.returncode == 0, p.stderr[-2000:]
    again = load_pt(tmp_path / 'again' / 'res_DM_FashionMNIST_ConvNet_2ipc.pt')
    assert torch.equal(again['data'][0][0], images) and len(again['accs_all_exps']['ConvNet']) == 2
