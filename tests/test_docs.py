"""The example in docs/adding_a_method.md runs as written."""
import os
import re

import pytest

from helpers import ROOT, run
from utils import load_result


@pytest.mark.e2e
def test_adding_a_method_example_runs(tmp_path, data):
    text = open(os.path.join(ROOT, 'docs', 'adding_a_method.md')).read()
    code = re.search(r'```python\n(.*?)```', text, re.S).group(1)
    script = tmp_path / 'my_method.py'
    script.write_text(code)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([ROOT, os.environ['PYTHONPATH']])}  # (offline, as every test)
    p = run(script, '--dataset', 'MNIST', '--ipc', '2', '--Iteration', '2', '--num_exp', '1', '--num_eval', '1',
            '--epoch_eval_train', '1', '--batch_real', '4', '--data_path', data, '--save_path', tmp_path / 'res',
            timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    images, labels = load_result(tmp_path / 'res' / 'res_MLM_MNIST_ConvNet_2ipc.pt')['data'][0]
    assert images.shape == (20, 1, 28, 28) and labels.tolist() == [c for c in range(10) for _ in range(2)]
