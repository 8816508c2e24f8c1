"""Speed side by side with the papers' own code, on the same arrays, in one run.

    python bench/papers.py --papers /path/to/DatasetCondensation --cafe /path/to/CAFE
    python bench/papers.py --papers ... --only dm_ipc10 --datasets CIFAR10

For each method and dataset: seconds per iteration here (float32, and with --amp) and in the papers'
code (VICO-UoE/DatasetCondensation for DC, DSA and DM; kaiwang960112/CAFE for CAFE, 3x32x32 only),
measured as the papers' issue did: the time of a whole run of N iterations minus that of a run of 0
(so data loading and the evaluation at iteration 0, identical in both, cancel), each in a fresh process.
Every row also gives the iteration's floating-point operations (counted here with
torch.utils.flop_counter) as a fraction of this machine's float32 and bfloat16 matrix rates, measured in
the same process just before it: machines differ and drift, such fractions and the ratios between rows
of one run do not. The papers' code is copied to a temporary folder and given two mechanical fixes for
torch 2.x (`.view(` -> `.reshape(` in networks.py; `x[:] = x[0]` -> `x[:] = x[0].clone()` in DSA); its
get_dataset is replaced by one returning the arrays this code loaded. Nothing of it is kept.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
# name: (our script, our flags, the papers' repository ('dc' or 'cafe'), its script, its flags, iterations)
DSA = ['--method', 'DSA', '--dsa_strategy', 'color_crop_cutout_flip_scale_rotate']
RUNS = {
    'dm_ipc10': ('main_DM.py', ['--ipc', '10'], 'dc', 'main_DM.py', ['--ipc', '10'], 10),
    'dc_ipc1': ('main.py', ['--method', 'DC', '--ipc', '1'], 'dc', 'main.py', ['--method', 'DC', '--ipc', '1'], 5),
    'dsa_ipc1': ('main.py', [*DSA, '--ipc', '1'], 'dc', 'main.py', [*DSA, '--ipc', '1'], 5),
    'dc_ipc10': ('main.py', ['--method', 'DC', '--ipc', '10'], 'dc', 'main.py', ['--method', 'DC', '--ipc', '10'], 1),
    'dsa_ipc10': ('main.py', [*DSA, '--ipc', '10'], 'dc', 'main.py', [*DSA, '--ipc', '10'], 1),
    'cafe_ipc1': ('distill.py', ['--ipc', '1'], 'cafe', 'distill.py', ['--ipc', '1'], 1),
}
SHARED = ['--num_exp', '1', '--num_eval', '1', '--epoch_eval_train', '1', '--eval_mode', 'SS']


def matrix_rates():
    """GFLOP/s of a 2048^3 matrix product in float32 and in bfloat16 (median of 5)."""
    import torch
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        times = []
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        rates[str(dtype).split('.')[-1]] = 2 * 2048 ** 3 / sorted(times)[2] / 1e9
    return rates


def patched_copy(repo, kind):
    """The papers' code in a temporary folder, with the two fixes torch 2.x needs."""
    dst = f'/tmp/bench_papers_{kind}'
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(repo, dst, ignore=shutil.ignore_patterns('.git', 'figs', 'docs'))
    for name in ('networks.py', 'utils.py'):
        path = os.path.join(dst, name)
        text = open(path).read()
        if name == 'networks.py':
            text = text.replace('.view(', '.reshape(')
        text = re.sub(r'(\w+)\[:\] = \1\[0\]\n', r'\1[:] = \1[0].clone()\n', text)
        open(path, 'w').write(text)
    return dst


def dump(dataset, data_path):
    """Load `dataset` with this code and keep the normalised arrays for the papers' code."""
    sys.path.insert(0, ROOT)
    import torch
    import utils
    out = os.path.join(data_path, f'{dataset}_arrays.pt')
    if not os.path.exists(out):
        c, size, n, names, mean, std, train, test, _ = utils.get_dataset(dataset, data_path)
        torch.save(dict(channel=c, im_size=size, num_classes=n, class_names=names, mean=mean, std=std,
                        x_train=train.images, y_train=train.labels, x_test=test.images, y_test=test.labels), out)
    return out


def worker(a):
    """In a fresh process: time one run (ours or the papers') and print a JSON line."""
    import torch
    rates = matrix_rates()
    if a.side == 'papers':
        sys.path.insert(0, a.code)
        import utils as theirs
        d = torch.load(a.arrays)
        train, test = theirs.TensorDataset(d['x_train'], d['y_train']), theirs.TensorDataset(d['x_test'], d['y_test'])
        loader = torch.utils.data.DataLoader(test, batch_size=256, shuffle=False, num_workers=0)
        theirs.get_dataset = lambda *args, **kw: (d['channel'], d['im_size'], d['num_classes'], d['class_names'],
                                                  d['mean'], d['std'], train, test, loader)
    else:
        sys.path.insert(0, ROOT)
    script = __import__(a.script[:-3])
    sys.argv = [a.script, *a.flags.split()]
    t = time.perf_counter()
    script.main()
    print(json.dumps({'seconds': time.perf_counter() - t, 'rates': rates}), file=sys.__stdout__)


def count_flops(script, flags, data_path):
    """Floating-point operations of one iteration of our `script` (torch.utils.flop_counter)."""
    code = f'''
import sys; sys.path.insert(0, {ROOT!r})
import torch, utils
from torch.utils.flop_counter import FlopCounterMode
m = __import__({script[:-3]!r})
args = utils.setup(m.parser().parse_args({flags!r} + ['--data_path', {data_path!r}, '--save_path', '/tmp/bench_out/flops']))
if args.lr_img is None: args.lr_img = 1.0
utils.set_dsa(args, augments=args.method in ('DSA', 'DM'))
args.outer_loop, args.inner_loop = utils.get_loops(args.ipc)
if hasattr(m, 'default_layer_weights'):
    args.layer_weights = m.default_layer_weights(len(utils.get_network(args.model, 3, 10, (32, 32), 'cpu').taps))
    args.milestones = [10 ** 9]
real, _ = utils.load_real(args)
utils.set_seed(0); real.start(0, 0)
syn = utils.SynSet(real, args)
with FlopCounterMode(display=False) as counter:
    m.train_iteration(0, syn, real, args)
print(counter.get_total_flops())
'''
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    return int(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None


def timed(side, script, flags, iterations, a, code=None, arrays=None):
    """Seconds per iteration: a run of `iterations` minus a run of 0, each in a fresh process."""
    out = []
    for n in (iterations, 0):
        save = f'/tmp/bench_out/{side}_{script}_{n}'
        shutil.rmtree(save, ignore_errors=True)
        args = [*flags, *SHARED, '--Iteration', str(n), '--data_path', a.data_path, '--save_path', save]
        cmd = [sys.executable, HERE, '--worker', '--side', side, '--script', script, '--flags', ' '.join(args)]
        if code:
            cmd += ['--code', code, '--arrays', arrays]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=code or ROOT)
        if p.returncode:
            return None, f'{side} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}'
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return (out[0]['seconds'] - out[1]['seconds']) / iterations, out[0]['rates']


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--papers', help='a checkout of VICO-UoE/DatasetCondensation (DC, DSA, DM)')
    p.add_argument('--cafe', help='a checkout of kaiwang960112/CAFE')
    p.add_argument('--only', nargs='+', choices=list(RUNS), default=list(RUNS))
    p.add_argument('--datasets', nargs='+', default=['FashionMNIST', 'CIFAR10'], choices=['FashionMNIST', 'CIFAR10'])
    p.add_argument('--cifar10', default=os.path.join(ROOT, '..', 'shared', 'datasets', 'cifar10.tar'))
    p.add_argument('--data_path', default='/tmp/bench_data')
    p.add_argument('--no_amp', action='store_true', help='skip the --amp rows')
    for hidden in ('--worker',):
        p.add_argument(hidden, action='store_true', help=argparse.SUPPRESS)
    for hidden in ('--side', '--script', '--flags', '--code', '--arrays'):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    os.makedirs(a.data_path, exist_ok=True)
    if 'CIFAR10' in a.datasets and not os.path.isdir(os.path.join(a.data_path, 'CIFAR10', 'train')):
        with tarfile.open(a.cifar10) as tar:
            tar.extractall(os.path.join(a.data_path, 'CIFAR10'))
    repos = {k: patched_copy(r, k) for k, r in (('dc', a.papers), ('cafe', a.cafe)) if r}
    for dataset in a.datasets:
        arrays = dump(dataset, a.data_path)
        for name in a.only:
            script, flags, repo, their_script, their_flags, n = RUNS[name]
            flags, their_flags = ['--dataset', dataset, *flags], ['--dataset', dataset, *their_flags]
            flops = count_flops(script, flags, a.data_path)
            rows = [('ours, float32', timed('ours', script, flags, n, a)),
                    *([] if a.no_amp else [('ours, --amp', timed('ours', script, [*flags, '--amp'], n, a))])]
            if repo in repos and not (repo == 'cafe' and dataset != 'CIFAR10'):  # the public CAFE: CIFAR-10 only
                rows.append(('papers', timed('papers', their_script, their_flags, n, a, repos[repo], arrays)))
            base = rows[0][1][0]
            for who, (seconds, rates) in rows:
                row = dict(dataset=dataset, what=name, who=who)
                if seconds is None:
                    row['error'] = rates
                else:
                    row.update(seconds=round(seconds, 3), speed_vs_ours_float32=round(base / seconds, 2) if base else None,
                               fp32_GFLOPs=round(rates['float32'], 1), bf16_GFLOPs=round(rates['bfloat16'], 1))
                    if flops:
                        row.update(GFLOP=round(flops / 1e9, 2),
                                   fraction_of_fp32_rate=round(flops / 1e9 / seconds / rates['float32'], 3),
                                   fraction_of_bf16_rate=round(flops / 1e9 / seconds / rates['bfloat16'], 3))
                print(json.dumps(row), flush=True)


if __name__ == '__main__':
    main()
