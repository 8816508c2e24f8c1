"""Continual learning with condensed memories (Zhao & Bilen, WACV 2023).

Class-incremental learning in --steps steps. For each seed the classes arrive in the order
np.random.seed(seed); np.random.permutation(num_classes). At each step the learner keeps a memory of
--ipc images per class of that step's classes only: random real images, herding, or a synthetic set
condensed by DSA or DM on those classes. A fresh model is trained on all memories so far (DSA
augmentation) and tested on the test images of every class seen so far.

Memories are read from <data_path>/metasets/cl_data/ under the papers' file names when present (their
released files load unchanged); otherwise they are built and saved there, step by step, so a later run
reuses them.
"""
import copy
import json
import os

import numpy as np
import torch
from tqdm import trange

from main import train_iteration as dsa_iteration
from main_DM import train_iteration as dm_iteration
from utils import (FULL_STRATEGY, Diverged, SynSet, UsageError, atomic_save, atomic_write, evaluate_models, get_loops,
                   get_parser, load_real, load_result, run_script, select_coreset, set_seed, setup, tensor_loader)

MEMORY_NAMES = {'herding': 'cl_herding', 'DSA': 'cl_res_DSA', 'DM': 'cl_DM'}  # the papers' file names
CONDENSE = {'DSA': dsa_iteration, 'DM': dm_iteration}


def memory_path(args, seed):
    return os.path.join(args.data_path, 'metasets', 'cl_data', '%s_%s_%s_%dipc_%dsteps_seed%d.pt' % (
        MEMORY_NAMES[args.method], args.dataset, args.model, args.ipc, args.steps, seed))


def build_memory(classes, real, args):
    """--ipc images of each class in `classes` (by --method) and their labels."""
    if args.method in ('random', 'herding'):
        images = real.images[torch.cat(select_coreset(args.method, real, args, args.ipc, classes))]
    else:  # condense a synthetic set of these classes only, as a len(classes)-class problem
        sub, a = real.subset(classes), copy.copy(args)
        a.num_classes = len(classes)
        syn = SynSet(sub, a)
        for it in trange(args.Iteration, desc=f'{args.method} on classes {classes}', leave=False, dynamic_ncols=True):
            CONDENSE[args.method](it, syn, sub, a)
        images = syn.images.detach()
        if not torch.isfinite(images).all():
            raise Diverged(f'the {args.method} memory of classes {classes} became non-finite (try a smaller --lr_img)')
    return [images.cpu(), torch.tensor(classes).repeat_interleave(args.ipc)]


def memories(seed, steps, real, args):
    """The memory of every step for one seed: loaded when saved, otherwise built (and saved)."""
    if args.method == 'random':
        return [build_memory(classes, real, args) for classes in steps]
    path = memory_path(args, seed)
    data = load_result(path)['data'] if os.path.isfile(path) else []
    for k, (images, labels) in enumerate(data[:len(steps)]):
        if sorted(set(labels.tolist())) != sorted(steps[k]) or images.shape[1:] != (args.channel, *args.im_size):
            raise UsageError(f'{path}: step {k} holds other classes or image shapes than this run (seed {seed})')
    if data:
        print(f'seed {seed}: using the memories of {min(len(data), len(steps))} steps in {path}')
    for k in range(len(data), len(steps)):
        set_seed(args.seed, seed, k, args.method)
        data.append(build_memory(steps[k], real, args))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save({'data': data}, path)  # after every step: an interrupted run keeps what it built
    return data[:len(steps)]


def main():
    parser = get_parser('Continual learning with condensed memories', methods=['random', 'herding', 'DSA', 'DM'],
                        omit=('eval_mode', 'num_exp', 'resume', 'checkpoint_every'), method='random',
                        dataset='CIFAR100', ipc=20, num_eval=3, epoch_eval_train=1000, Iteration=None, lr_img=None,
                        init=None, dsa_strategy=FULL_STRATEGY)
    parser.add_argument('--steps', type=int, default=5, help='the number of learning steps (5 or 10 in the paper)')
    parser.add_argument('--seeds', type=int, default=5, help='run the class orders of seeds 0 .. seeds-1')
    parser.add_argument('--coreset_epochs', type=int, default=10, help='herding: epochs of training its network')
    args = setup(parser.parse_args())
    args.dsa = True  # every memory trains (and condenses) with DSA augmentation, as in the paper
    if args.dsa_strategy in ('', 'none', 'None'):
        raise UsageError('continual learning trains with DSA augmentation: --dsa_strategy must name transformations')
    defaults = {'DSA': (1000, 0.1, 'noise'), 'DM': (20000, 1.0, 'real')}.get(args.method, (0, 0.1, 'real'))
    for k, v in zip(['Iteration', 'lr_img', 'init'], defaults):  # the condensation method's own defaults
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    args.outer_loop, args.inner_loop = get_loops(args.ipc)
    real, testloader = load_real(args)
    if args.steps > args.num_classes:
        raise UsageError(f'--steps must be at most the number of classes ({args.num_classes})')
    test = testloader.dataset
    results = np.zeros((args.steps, args.seeds * args.num_eval))
    summary_path = os.path.join(args.save_path, 'cl_%s_%s_%s_%dipc_%dsteps.json' % (
        args.method, args.dataset, args.model, args.ipc, args.steps))
    for seed in range(args.seeds):
        np.random.seed(seed)  # the papers' class order
        class_order = np.random.permutation(args.num_classes).tolist()
        steps = [part.tolist() for part in np.array_split(class_order, args.steps)]
        print(f'seed {seed}: class order {class_order}')
        set_seed(args.seed, seed, 'memories')
        data = memories(seed, steps, real, args)
        for step in range(args.steps):
            seen = torch.tensor(sum(steps[:step + 1], []), device=test.labels.device)
            images = torch.cat([d[0] for d in data[:step + 1]]).to(args.device)
            labels = torch.cat([d[1] for d in data[:step + 1]]).to(args.device)
            mask = torch.isin(test.labels, seen)
            loader = tensor_loader(test.images[mask], test.labels[mask], 256)
            print(f'seed {seed} step {step}: {len(labels)} memory images of {len(seen)} classes, {int(mask.sum())} test images')
            accs = evaluate_models(images, labels, [args.model], args, loader, seed_keys=(seed, step))[args.model]
            results[step, seed * args.num_eval:(seed + 1) * args.num_eval] = accs
        done = results[:, :(seed + 1) * args.num_eval]
        table = [dict(step=k, classes=len(sum(steps[:k + 1], [])), mean=float(r.mean()), std=float(r.std()),
                      accs=r.tolist()) for k, r in enumerate(done)]
        atomic_write(summary_path, lambda tmp: open(tmp, 'w').write(json.dumps(
            dict(method=args.method, seeds=seed + 1, steps=table), indent=1)))
    print(f'\n{args.steps}-step learning, {args.method}: mean +- std over {args.seeds} seeds x {args.num_eval} models')
    for row in table:
        print('step %d (%3d classes): %.2f%% +- %.2f%%' % (row['step'], row['classes'], row['mean'] * 100, row['std'] * 100))
    print(' '.join('& %.1f$\\pm$%.1f' % (r['mean'] * 100, r['std'] * 100) for r in table))  # the paper's table row


if __name__ == '__main__':
    run_script(main)
