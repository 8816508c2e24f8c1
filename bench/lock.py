"""Behaviour lock for refactors: tiny runs of every script, in this checkout and in another commit's, must
give byte-identical synthetic sets and accuracies.

    python bench/lock.py --against <commit>      # e.g. the commit before a redesign

Each tree runs the same commands on the same data (Fashion-MNIST: the Debian package, or --data_path),
in a save folder of its own; then every result tensor (res_*.pt: images, labels, accuracies; CL memories)
and every accuracy in the JSON records (condensation records, CL tables, evaluation reports) is compared.
Exit status 1 if anything differs.
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--dataset', 'FashionMNIST', '--num_exp', '1', '--num_eval', '2', '--epoch_eval_train', '2']
COMMANDS = [
    ['main.py', '--method', 'DC', '--ipc', '1', '--Iteration', '2', *TINY],
    ['main.py', '--method', 'DSA', '--ipc', '2', '--Iteration', '1', *TINY],
    ['main.py', '--method', 'herding', '--ipc', '2', '--coreset_epochs', '1', *TINY],
    ['main_DM.py', '--ipc', '2', '--Iteration', '3', '--eval_mode', 'S', *TINY],
    ['distill.py', '--ipc', '1', '--Iteration', '2', '--max_outer', '3', '--max_inner', '2', '--query', '16', *TINY],
    ['CL_DM.py', '--method', 'DM', '--dataset', 'FashionMNIST', '--steps', '2', '--seeds', '1', '--ipc', '1',
     '--Iteration', '2', '--num_eval', '1', '--epoch_eval_train', '2'],
    ['evaluate.py', '{save}/res_DM_FashionMNIST_ConvNet_2ipc.pt', '--num_eval', '2', '--epoch_eval_train', '2',
     '--models', 'ConvNet', 'MLP'],
]


def run_all(tree, save, data_path):
    for cmd in COMMANDS:
        cmd = [c.format(save=save) for c in cmd]
        extra = [] if cmd[0] == 'evaluate.py' else ['--save_path', save]
        started = time.perf_counter()
        p = subprocess.run([sys.executable, cmd[0], *cmd[1:], '--data_path', data_path, *extra], cwd=tree,
                           capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
        print(f'{os.path.basename(tree) or tree}: {" ".join(cmd)}: exit {p.returncode} '
              f'({time.perf_counter() - started:.0f} s)', flush=True)
        if p.returncode:
            sys.exit(f'{cmd[0]} failed in {tree}:\n{p.stderr[-2000:]}')


def accuracies(obj):
    """Every number under an 'accs', 'results' or 'steps' key of a JSON record, by path."""
    out = {}

    def walk(x, path, keep):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f'{path}/{k}', keep or k in ('accs', 'results', 'steps', 'per_seed', 'history'))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f'{path}/{i}', keep)
        elif keep and isinstance(x, (int, float)):
            out[path] = x
    walk(obj, '', False)
    return out


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def compare(ours, theirs):
    differ = 0
    for path in sorted(glob.glob(os.path.join(theirs, '*.pt')) + glob.glob(os.path.join(theirs, '*.json'))):
        name = os.path.basename(path)
        mine = os.path.join(ours, name)
        if not os.path.exists(mine):
            print(f'MISSING here: {name}')
            differ += 1
            continue
        if name.endswith('.pt'):
            a, b = (torch.load(p, weights_only=False) for p in (mine, path))
            keys = [k for k in ('data', 'accs_all_exps') if k in b]
            ok = all(same(a.get(k), b[k]) for k in keys)
        else:
            with open(mine) as f, open(path) as g:
                a, b = accuracies(json.load(f)), accuracies(json.load(g))
            ok = a == b and bool(b) or not b and not a
        print(f'{"same" if ok else "DIFFERENT"}: {name}')
        differ += not ok
    return differ


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--against', required=True, help='the commit to compare this checkout with')
    p.add_argument('--data_path', default='data', help='where the scripts look for Fashion-MNIST (default: the '
                                                       'Debian package is found anyway)')
    p.add_argument('--work', default=None, help='folder for the two trees\' outputs (default: a temporary one); '
                                                'the other commit\'s outputs found there are reused')
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix='lock_')
    theirs, ours = os.path.join(work, 'theirs'), os.path.join(work, 'ours')
    data_path = os.path.abspath(args.data_path)
    if not os.path.exists(os.path.join(theirs, '.done')):  # (kept from an earlier call with the same --work)
        other = os.path.join(work, 'tree')
        subprocess.run(['git', 'worktree', 'add', '--detach', other, args.against], cwd=ROOT, check=True)
        try:
            run_all(other, theirs, data_path)
        finally:
            subprocess.run(['git', 'worktree', 'remove', '--force', other], cwd=ROOT)
        open(os.path.join(theirs, '.done'), 'w').close()
    shutil.rmtree(ours, ignore_errors=True)  # (this checkout's outputs are always made afresh)
    run_all(ROOT, ours, data_path)
    differ = compare(ours, theirs)
    print(f'{differ} file(s) differ' if differ else f'every result is identical to {args.against}\'s')
    sys.exit(1 if differ else 0)


if __name__ == '__main__':
    main()
