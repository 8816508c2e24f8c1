"""Golden values: a short CPU run of every method at seed 0 must give the results pinned in tests/golden.json.
The safety net of refactors that must not change results ("the same seed gives the same sets, memories and
accuracies"): the scripts are black boxes here, started as a user starts them, with command-line flags only.

The runs (RUNS): DC, DSA (main.py), DM (main_DM.py), CAFE (distill.py), IDM (main_IDM.py), the coresets random,
herding, kcenter and forgetting (main.py --method), a tiny generator (train_gan.py --arch small, 2 iterations)
and IT-GAN from it (main_ITGAN.py --stage both: a GANInversion run, then ITGAN from its latents), continual
learning (CL_DM.py --method DM and --method herding). Each runs on conftest.py's `data` (a tiny MNIST: 100
training, 40 test images) with tiny settings, one thread (OMP_NUM_THREADS=1: the numbers must not depend on
the thread count), in a save folder of its own; two at a time (the machine has 2 cores).

What is pinned (summary()):
- of each result file res_<method>_MNIST_ConvNet_<ipc>ipc.pt (utils.load_result): the set of the first
  experiment, data[0] = [images, labels]: the images' shape, sum, sum of squares and 8 pixels at fixed
  places, the labels; the accuracies 'accs_all_exps'; IT-GAN's and the inversion's learned latents (same
  statistics) and their source indices;
- of continual learning: each step's memory in the saved cl_<method>_..._seed0.pt (images and labels as
  above), and the accuracies of the JSON table (per seed and step);
- of the generator G_MNIST_small.pt: its state dict's tensors in order, as one flat vector (same statistics).
Numbers are compared with a tolerance (relative 1e-5, absolute 1e-6; integers, labels and shapes exactly),
not bit for bit: another CPU's SIMD kernels may differ in the last bits. A change of numerics that still
"learns" fails; bench/lock.py is the bit-for-bit check between two commits on one machine.

Refreshing the pinned values (only after an upgrade of torch, or a change of results that is meant and
explained; never to make a refactor pass):

    GOLDEN_REFRESH=1 python -m pytest tests/test_golden.py

runs the same commands and rewrites tests/golden.json with this checkout's values (and its commit, the
modified tracked files if any, the torch and Python versions); the tests then pass. Review
`git diff tests/golden.json`, and commit it with the change that explains it.
"""
import concurrent.futures
import json
import math
import os
import platform
import subprocess

import pytest
import torch

from helpers import ROOT, command, one_thread
from utils import load_pt, load_result

pytestmark = pytest.mark.e2e

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden.json')
OFFLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'offline')
REFRESH = os.environ.get('GOLDEN_REFRESH', '') not in ('', '0')
REL, ABS = 1e-5, 1e-6
WORKERS = 2

EVAL = ['--dataset', 'MNIST', '--num_exp', '1', '--num_eval', '1', '--epoch_eval_train', '1']
CL = ['--dataset', 'MNIST', '--steps', '2', '--seeds', '1', '--ipc', '1', '--num_eval', '1', '--epoch_eval_train', '1']


def res(method, ipc):
    return f'res_{method}_MNIST_ConvNet_{ipc}ipc.pt'


# name: ([(script, flags), ...] run in this order in one save folder, {golden key: (file, kind)})
RUNS = {
    'GAN': ([('train_gan.py', ['--dataset', 'MNIST', '--arch', 'small', '--Iteration', '2', '--batch_size', '4',
                               '--num_D_steps', '1', '--samples_per_class', '1']),
             ('main_ITGAN.py', ['--method', 'ITGAN', '--stage', 'both', '--generator', '{save}/G_MNIST_small.pt',
                                '--ipc', '1', '--Iteration', '2', '--inversion_iterations', '2', '--batch_z', '5',
                                '--feature_epochs', '1', '--batch_real', '8', *EVAL])],
            {'GAN': ('G_MNIST_small.pt', 'generator'), 'GANInversion': (res('GANInversion', 1), 'result'),
             'ITGAN': (res('ITGAN', 1), 'result')}),
    'IDM': ([('main_IDM.py', ['--ipc', '2', '--Iteration', '3', '--batch_real', '4', '--eval_interval', '2',
                              '--net_generate_interval', '2', '--model_train_steps', '1', '--trained_bs', '8', *EVAL])],
            {'IDM': (res('IDM', 2), 'result')}),
    'DC': ([('main.py', ['--method', 'DC', '--ipc', '1', '--Iteration', '2', '--batch_real', '8', *EVAL])],
           {'DC': (res('DC', 1), 'result')}),
    'DSA': ([('main.py', ['--method', 'DSA', '--ipc', '1', '--Iteration', '2', '--batch_real', '8', *EVAL])],
            {'DSA': (res('DSA', 1), 'result')}),
    'CAFE': ([('distill.py', ['--ipc', '1', '--Iteration', '2', '--max_outer', '2', '--max_inner', '2', '--query', '4',
                              '--batch_real', '8', *EVAL])],
             {'CAFE': (res('CAFE', 1), 'result')}),
    'DM': ([('main_DM.py', ['--ipc', '2', '--Iteration', '3', '--batch_real', '8', *EVAL])],
           {'DM': (res('DM', 2), 'result')}),
    'CL_DM': ([('CL_DM.py', ['--method', 'DM', *CL, '--Iteration', '2', '--batch_real', '8'])],
              {'CL_DM': ('cl_DM_MNIST_ConvNet_1ipc_2steps', 'cl')}),
    'CL_herding': ([('CL_DM.py', ['--method', 'herding', *CL, '--coreset_epochs', '1'])],
                   {'CL_herding': ('cl_herding_MNIST_ConvNet_1ipc_2steps', 'cl')}),
    **{m: ([('main.py', ['--method', m, '--ipc', '2', *([] if m == 'random' else ['--coreset_epochs', '1']), *EVAL])],
           {m: (res(m, 2), 'result')}) for m in ('herding', 'kcenter', 'forgetting', 'random')},
}
KEYS = [key for _, files in RUNS.values() for key in files]


# ----------------------------------------------------------------------------------------------------
# What is pinned
# ----------------------------------------------------------------------------------------------------

def stats(t):
    """A tensor's shape, sum, sum of squares (in float64) and 8 of its values at fixed places."""
    flat = t.detach().double().flatten()
    places = sorted({int(i) for i in torch.linspace(0, max(flat.numel() - 1, 0), 8)}) if flat.numel() else []
    return {'shape': list(t.shape), 'sum': flat.sum().item(), 'sumsq': (flat * flat).sum().item(),
            'values': [flat[i].item() for i in places]}


def accs(obj):
    """Accuracies as plain floats, in their nesting (dicts and lists)."""
    if isinstance(obj, dict):
        return {str(k): accs(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [accs(v) for v in obj]
    return float(obj)


def summary(folder, file, kind):
    path = os.path.join(folder, file)
    if kind == 'result':
        r = load_result(path)
        images, labels = r['data'][0]
        out = {'images': stats(images), 'labels': labels.tolist(), 'accs_all_exps': accs(r['accs_all_exps'])}
        if 'learned' in r:  # IT-GAN / GAN inversion: the latents behind the images
            learned = r['learned'][0]
            out['latents'] = stats(learned['learned'])
            out['source'] = learned['source'].tolist()
        return out
    if kind == 'generator':
        g = load_pt(path)
        floats = [t.flatten() for t in g['state_dict'].values() if t.is_floating_point()]
        return {'tensors': len(g['state_dict']), 'iteration': g['iteration'], 'weights': stats(torch.cat(floats))}
    if kind == 'cl':
        memory = load_pt(path + '_seed0.pt')
        with open(path + '.json') as f:
            table = json.load(f)
        return {'memory': [{'images': stats(x), 'labels': y.tolist()} for x, y in memory['data']],
                'accs_per_seed': accs(table['per_seed'])}
    raise ValueError(kind)


def differences(expected, got, path=''):
    """Where `got` is not `expected`: floats beyond the tolerance, anything else not equal."""
    if isinstance(expected, dict) and isinstance(got, dict):
        if expected.keys() != got.keys():
            return [f'{path}: keys {sorted(got)} (expected {sorted(expected)})']
        return [d for k in expected for d in differences(expected[k], got[k], f'{path}/{k}')]
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return [f'{path}: length {len(got)} (expected {len(expected)})']
        return [d for i, (e, g) in enumerate(zip(expected, got)) for d in differences(e, g, f'{path}/{i}')]
    if isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        ok = math.isclose(got, expected, rel_tol=REL, abs_tol=ABS)
    else:
        ok = type(expected) is type(got) and expected == got
    return [] if ok else [f'{path}: {got!r} (expected {expected!r})']


# ----------------------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------------------

def env():
    """One thread, no GPU, offline (tests/offline/sitecustomize.py blocks the network in the process)."""
    return {**one_thread(), 'CUDA_VISIBLE_DEVICES': '',
            'PYTHONPATH': os.pathsep.join(filter(None, [OFFLINE, os.environ.get('PYTHONPATH')]))}


def execute(name, data, folder):
    """Run a RUNS entry's commands in order in `folder`; its summaries by golden key, or the failure's text."""
    os.makedirs(folder, exist_ok=True)
    for script, flags in RUNS[name][0]:
        flags = [f.format(save=folder) for f in flags]
        cmd = command(script, *flags, '--data_path', data, '--save_path', folder)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env())
        if p.returncode:
            return f'{script} {" ".join(flags)}: exit status {p.returncode}\n{p.stderr[-3000:]}'
    try:
        return {key: summary(folder, file, kind) for key, (file, kind) in RUNS[name][1].items()}
    except Exception as e:  # (a file missing or of another format: that key's test says so)
        return f'{name}: reading its files in {folder} ({sorted(os.listdir(folder))}): {type(e).__name__}: {e}'


def git(*args):
    return subprocess.run(['git', *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()


@pytest.fixture(scope='module')
def measured(data, tmp_path_factory):
    """Every run's summaries (or failure text) by golden key; two runs at a time, GAN first (the longest).
    With GOLDEN_REFRESH=1, also written to tests/golden.json."""
    root = tmp_path_factory.mktemp('golden')
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(execute, name, str(data), str(root / name)) for name in RUNS}
    out = {}
    for name, future in futures.items():
        result = future.result()
        for key in RUNS[name][1]:
            out[key] = result[key] if isinstance(result, dict) else result
    if REFRESH:
        failed = {k: v for k, v in out.items() if isinstance(v, str)}
        assert not failed, f'not refreshed: runs failed: {failed}'
        modified = [line[3:] for line in git('status', '--porcelain', '--untracked-files=no').splitlines()
                    if line[3:].endswith('.py')]
        record = {'commit': git('rev-parse', 'HEAD'), 'modified': modified, 'torch': torch.__version__,
                  'python': platform.python_version(), 'machine': platform.machine(),
                  'refresh': 'GOLDEN_REFRESH=1 python -m pytest tests/test_golden.py',
                  'runs': {name: [[script, *flags] for script, flags in RUNS[name][0]] for name in RUNS},
                  'golden': {k: out[k] for k in KEYS}}
        with open(GOLDEN, 'w') as f:
            f.write(pretty(record) + '\n')
    return out


def pretty(obj, depth=0, levels=3):
    """JSON with the dicts of the first `levels` levels one item a line, and everything deeper on one line
    (a refresh's diff shows which run and which statistic changed)."""
    if not isinstance(obj, dict) or depth >= levels:
        return json.dumps(obj)
    pad = ' ' * (depth + 1)
    items = [f'{pad}{json.dumps(k)}: {pretty(v, depth + 1, levels)}' for k, v in obj.items()]
    return '{\n' + ',\n'.join(items) + '\n' + ' ' * depth + '}'


@pytest.fixture(scope='module')
def golden():
    if not os.path.exists(GOLDEN) and not REFRESH:
        pytest.fail(f'{GOLDEN} is missing: make it with GOLDEN_REFRESH=1 (see {__name__}\'s docstring)')
    return GOLDEN


@pytest.mark.parametrize('key', KEYS)
def test_a_short_run_gives_the_pinned_results(key, measured, golden):
    got = measured[key]
    if isinstance(got, str):  # (the run failed, or its files could not be read)
        pytest.fail(got, pytrace=False)
    with open(golden) as f:
        record = json.load(f)
    assert key in record['golden'], f'no golden values for {key} in {golden}: refresh it (GOLDEN_REFRESH=1)'
    diff = differences(record['golden'][key], got)
    if diff:
        pytest.fail(f'{key} differs from the values pinned at commit {record["commit"]} (torch {record["torch"]}; '
                    f'this torch {torch.__version__}):\n' + '\n'.join(diff[:40]), pytrace=False)


def test_the_golden_runs_are_the_ones_recorded(golden):
    """The pinned values belong to these command lines: a change of RUNS needs a refresh."""
    with open(golden) as f:
        recorded = json.load(f)['runs']
    assert recorded == {name: [[script, *flags] for script, flags in RUNS[name][0]] for name in RUNS}, \
        'RUNS changed since tests/golden.json was written: refresh it (GOLDEN_REFRESH=1)'
