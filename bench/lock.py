"""Behaviour lock for refactors: tiny runs of every script, in this checkout and in another commit's, must
give byte-identical synthetic sets, memories, generators and accuracies.

    python bench/lock.py --against <commit>      # e.g. the commit before a redesign

Each tree runs the same commands (COMMANDS: DC, DSA, herding, forgetting, DM, CAFE, IDM, train_gan.py's small
generator, IT-GAN from it (GANInversion then ITGAN: --stage both), continual learning (DM and herding) and
evaluate.py) on the same data (Fashion-MNIST: the Debian package, or --data_path), in a save folder of its
own; then compared, bit for bit:
- the result files res_*.pt: images, labels, accuracies, and IT-GAN's learned latents (their tensors);
- the generator G_*.pt of train_gan.py: every tensor of its state dict, its mean and std and iteration;
- the continual-learning memories cl_*_seed<s>.pt: every step's images and labels;
- every accuracy in the JSON records (condensation records, CL tables, evaluation reports).
Checkpoints and cached classifiers (checkpoint_*.pt, classifier_*.pt) are internal and not compared.
Exit status 1 if anything differs. With the same --work folder, the other commit's outputs of an earlier call
are reused (delete <work>/theirs after changing COMMANDS).
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
CL = ['--dataset', 'FashionMNIST', '--steps', '2', '--seeds', '1', '--ipc', '1', '--num_eval', '1',
      '--epoch_eval_train', '2']
COMMANDS = [
    ['main.py', '--method', 'DC', '--ipc', '1', '--Iteration', '2', *TINY],
    ['main.py', '--method', 'DSA', '--ipc', '2', '--Iteration', '1', *TINY],
    ['main.py', '--method', 'herding', '--ipc', '2', '--coreset_epochs', '1', *TINY],
    ['main.py', '--method', 'forgetting', '--ipc', '2', '--coreset_epochs', '1', *TINY],
    ['main_DM.py', '--ipc', '2', '--Iteration', '3', '--eval_mode', 'S', *TINY],
    ['distill.py', '--ipc', '1', '--Iteration', '2', '--max_outer', '3', '--max_inner', '2', '--query', '16', *TINY],
    ['main_IDM.py', '--ipc', '2', '--Iteration', '3', '--batch_real', '16', '--eval_interval', '2',
     '--net_generate_interval', '2', '--model_train_steps', '1', '--trained_bs', '16', *TINY],
    ['train_gan.py', '--dataset', 'FashionMNIST', '--arch', 'small', '--Iteration', '3', '--batch_size', '8',
     '--num_D_steps', '1', '--samples_per_class', '1'],
    ['main_ITGAN.py', '--method', 'ITGAN', '--stage', 'both', '--generator', '{save}/G_FashionMNIST_small.pt',
     '--ipc', '1', '--Iteration', '2', '--inversion_iterations', '2', '--batch_z', '5', '--feature_epochs', '1',
     '--batch_real', '64', *TINY],
    ['CL_DM.py', '--method', 'DM', *CL, '--Iteration', '2'],
    ['CL_DM.py', '--method', 'herding', *CL, '--coreset_epochs', '1'],
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


def tensors(obj, path=''):
    """Every tensor in a nest of dicts, lists and tuples, by path (strings such as file paths left out: they
    name each tree's own save folder)."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {p: t for k, v in items for p, t in tensors(v, f'{path}/{k}').items()}


INTERNAL = ('checkpoint_', 'classifier_')  # files not compared (nor required): resumption and caches


def comparable(obj):
    """What of a saved .pt file must be identical in both trees."""
    if not isinstance(obj, dict):
        return obj
    if 'state_dict' in obj:  # a generator of train_gan.py
        return {'state_dict': dict(obj['state_dict']), **{k: obj.get(k) for k in ('mean', 'std', 'iteration')}}
    keep = {k: obj[k] for k in ('data', 'accs_all_exps') if k in obj}  # a result file; a CL memory: its 'data'
    if 'learned' in obj:  # IT-GAN's latents (beside the generator's path)
        keep['learned'] = tensors(obj['learned'])
    return keep


def compare(ours, theirs):
    differ = 0
    for path in sorted(glob.glob(os.path.join(theirs, '*.pt')) + glob.glob(os.path.join(theirs, '*.json'))):
        name = os.path.basename(path)
        mine = os.path.join(ours, name)
        if name.startswith(INTERNAL):
            continue
        if not os.path.exists(mine):
            print(f'MISSING here: {name}')
            differ += 1
            continue
        if name.endswith('.pt'):
            a, b = (torch.load(p, weights_only=False) for p in (mine, path))
            a, b = comparable(a), comparable(b)
            ok = bool(b) and same(a, b)  # (a file with nothing to compare is a difference: the format changed)
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
