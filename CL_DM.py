"""Continual learning with condensed memories (Zhao & Bilen, WACV 2023).

Class-incremental learning in --steps steps. For each seed the classes arrive in the order
np.random.seed(seed); np.random.permutation(num_classes). At each step the learner keeps a memory of
--ipc images per class of that step's classes only: random real images, herding, or a synthetic set
condensed by DSA, DM or IDM on those classes. A fresh model is trained on all memories so far (DSA
augmentation) and tested on the test images of every class seen so far.

Memories built here are saved in --save_path under the papers' file names, with a record of the
settings that shaped them, after every step; the papers' released memories are read from
<data_path>/metasets/cl_data/. The table is written after every seed, so a rerun continues where an
interrupted one stopped.
"""
import contextlib
import dataclasses
import os

import numpy as np
import torch

from main import GradientMatching
from main_DM import DM
from main_IDM import IDM
from runs import (STRATEGY_RULE, Checkpoints, Flags, check_record, differences, exclusive, get_parser, load_real,
                  new_synset, on_main, positive, progress, read_json, refuse, resolve_dsa, run_script, setup, signature,
                  step)
from utils import (HERDING, Diverged, Group, UsageError, atomic_json, atomic_save, evaluate_models, gather_objects,
                   load_result, say, select_coreset, set_seed, tensor_loader)

MEMORY_NAMES = {'herding': 'cl_herding', 'DSA': 'cl_res_DSA', 'DM': 'cl_DM', 'IDM': 'cl_IDM'}  # the papers' file names
METHODS = {'DSA': GradientMatching, 'DM': DM, 'IDM': IDM}  # the condensation methods (runs.Method), with their defaults
SHAPED_BY = {  # besides method, dataset and its data, model, ipc, steps, class order and --seed
    'random': [],
    'herding': ['herding', 'coreset_epochs', 'lr_net', 'batch_train', 'amp'],
    'DSA': ['Iteration', 'lr_img', 'init', 'batch_real', 'dsa_strategy', 'dis_metric', 'lr_net', 'batch_train', 'amp'],
    'DM': ['Iteration', 'lr_img', 'init', 'batch_real', 'dsa_strategy', 'amp'],
    'IDM': ['Iteration', 'lr_img', 'batch_real', 'dsa_strategy', 'amp', 'factor', 'ce_weight', 'reset_every',
            'net_generate_interval', 'net_num', 'fetch_net_num', 'model_train_steps', 'trained_bs', 'lr_net'],
}


def main():
    """For each seed's class order, learn step by step and test after every step; the table over the seeds."""
    args = Flags.freeze(configure(setup(parser().parse_args())))
    real, testloader, data = load_real(args)
    if args.steps > data.num_classes:
        raise UsageError(f'--steps must be at most the number of classes ({data.num_classes})')
    group = Group.current()
    table = Table(args, data, group)
    with exclusive(table.lock, table.path, group):
        for seed in this_process_seeds(table.finished(), args.seeds, group):
            table.add(gather_objects((seed, learn(seed, real, testloader.dataset, args, data, group))))
    table.show()


def memory_name(args, seed):
    return '%s_%s_%s_%dipc_%dsteps_seed%d.pt' % (MEMORY_NAMES[args.method], args.dataset, args.model, args.ipc,
                                                  args.steps, seed)


def memory_record(args, data, seed, class_order):
    """The settings that shape the memories of one seed."""
    keys = ['method', 'dataset', 'model', 'ipc', 'steps', 'seed', *SHAPED_BY[args.method]]
    return dict({k: getattr(args, k) for k in keys}, data_id=data.data_id, order_seed=seed, class_order=class_order)


def build_memory(classes, real, args, data, keys, record):
    """--ipc images of each class in `classes` (by --method) and their labels; random draws seeded by keys. A
    condensed memory checkpoints as it goes (every --checkpoint_every iterations, else about every 10 minutes)
    and a rerun continues from its checkpoint."""
    if args.method in ('random', 'herding'):
        set_seed(*keys)
        images = real.images[torch.cat(select_coreset(args.method, real, args, data, args.ipc, classes))]
    else:  # condense a synthetic set of these classes only, as a len(classes)-class problem
        sub = real.subset(classes)
        method = METHODS[args.method](args, dataclasses.replace(data, num_classes=len(classes)))
        checkpoints = Checkpoints(os.path.join(args.save_path, f'checkpoint_{memory_name(args, keys[1])[:-3]}_step{keys[2]}_'),
                                  dict(record, classes=classes), Group(), args.checkpoint_every,
                                  expected={'it': int, 'images': torch.Tensor, 'optimizer': dict})
        state = checkpoints.load('auto') if args.overwrite is False else None
        syn = new_synset(sub, method, keys, images=state and state['images'])
        method.start(sub)
        if state:
            say(f'continuing the memory of classes {classes} from {checkpoints.last_path}: iteration {state["it"]}')
            syn.restore((state['images'], state['optimizer']))
            if method.stateful:
                method.load_state_dict(state['method_state'])
        for it in progress(range(state['it'] if state else 0, args.Iteration), Group(), leave=False,
                           desc=f'{args.method} on classes {classes}'):
            if checkpoints.due():
                checkpoints.save(it, dict(it=it, images=syn.images.detach().cpu(), optimizer=syn.optimizer.state_dict(),
                                          **({'method_state': method.state_dict()} if method.stateful else {})))
            step(method, it, syn, sub, keys)
            checkpoints.tick()
        images = syn.images.detach()
        if not torch.isfinite(images).all():
            raise Diverged(f'the {args.method} memory of classes {classes} became non-finite (try a smaller --lr_img)')
        for path in checkpoints.paths():  # (the memory is saved with the step)
            with contextlib.suppress(OSError):
                os.remove(path)
    return [images.cpu(), torch.tensor(classes).repeat_interleave(args.ipc)]


def load_memories(path, record, steps, args, data):
    """The memories in a file (ours, with the record of its settings, or the papers' released one, without)
    that fit this run, and how many steps of them the papers released. A record of other settings is an
    error, or with --overwrite: nothing to use."""
    saved = load_result(path)
    theirs = saved.get('settings')
    if theirs is not None:
        if args.overwrite and differences(theirs, record):
            return [], 0
        check_record(path, theirs, record, 'was built with other settings', '--overwrite to build the memories again')
    stored = saved['data']
    for k, (images, labels) in enumerate(stored[:len(steps)]):
        if sorted(set(labels.tolist())) != sorted(steps[k]) or images.shape[1:] != (data.channel, *data.im_size):
            raise UsageError(f'{path}: step {k} holds other classes or image shapes than this run')
    return stored, theirs.get('released_steps', 0) if theirs else len(stored)


def memories(seed, steps, real, args, data, record):
    """The memory of every step for one seed, a step at a time: (the memories so far, whether the newest
    was built just now). Loaded when saved (here, or released by the papers), otherwise built."""
    kept, from_papers = [], 0
    if args.method != 'random':
        for path in (os.path.join(args.save_path, memory_name(args, seed)),
                     os.path.join(args.data_path, 'metasets', 'cl_data', memory_name(args, seed))):
            if os.path.isfile(path):
                kept, from_papers = load_memories(path, record, steps, args, data)
                say(f'seed {seed}: using the memories of {min(len(kept), len(steps))} steps in {path}')
                break
    record['released_steps'] = from_papers
    for k in range(len(steps)):
        built = k >= len(kept)
        if built:
            kept.append(build_memory(steps[k], real, args, data, (args.seed, seed, k, args.method), record))
        yield kept[:k + 1], built and args.method != 'random'


def save_memories(built, args):
    """Rank 0 saves the memories that the processes have just built (each process one seed's)."""
    for seed, data, record in filter(None, built):
        atomic_save({'data': data, 'settings': record}, os.path.join(args.save_path, memory_name(args, seed)))


def class_order(seed, args, num_classes):
    np.random.seed(seed)  # the papers' class order
    order = np.random.permutation(num_classes).tolist()
    return order, [part.tolist() for part in np.array_split(order, args.steps)]


def parser():
    p = get_parser('Continual learning with condensed memories', methods=['random', 'herding', 'DSA', 'DM', 'IDM'],
                   omit=('eval_mode', 'num_exp', 'resume', 'minutes', 'snapshots'), method='random',
                   dataset='CIFAR100', ipc=20, num_eval=3, epoch_eval_train=1000, Iteration=None, lr_img=None,
                   init=None, dsa_strategy=None,
                   rules={'Iteration': 'default: DSA 1000, DM and IDM 20000', 'lr_img': 'default: DSA 0.1, DM 1, IDM 0.2',
                          'init': 'default: DSA noise, DM real; IDM: mosaics of real images',
                          'dsa_strategy': STRATEGY_RULE})
    p.add_argument('--steps', type=positive, default=5, help='the number of learning steps (5 or 10 in the paper)')
    p.add_argument('--seeds', type=positive, default=5, help='run the class orders of seeds 0 .. seeds-1')
    p.add_argument('--coreset_epochs', type=positive, default=10, help='herding: epochs of training its network')
    p.add_argument('--herding', choices=list(HERDING), default='greedy',
                   help="herding's rule: greedy (iCaRL's running mean, which the DM paper's continual learning follows) "
                        'or nearest (the ipc images nearest the class mean)')
    return p


def configure(args):
    """Refuse the flags that do not apply to --method; the condensation methods' own defaults (their scripts')."""
    resolve_dsa(args, augments=True)  # every memory trains (and condenses) with DSA augmentation, as in the paper
    if not args.dsa:
        raise UsageError('continual learning trains with DSA augmentation: --dsa_strategy must name transformations')
    if args.method in ('random', 'herding'):
        refuse(args, ['Iteration', 'lr_img', 'init', 'batch_real', 'dis_metric', 'compile'],
               f'does not apply to --method {args.method}: its memories are real images, not optimised')
    if args.method != 'herding':
        refuse(args, ['coreset_epochs', 'herding'], f'is for --method herding, not {args.method}')
    if args.method != 'DSA':
        refuse(args, ['dis_metric'], f'is for --method DSA (gradient matching), not {args.method}')
    if args.method != 'DM':
        refuse(args, ['compile'], f'is for --method DM, not {args.method}')
    if args.method == 'IDM':
        refuse(args, ['init'], 'does not apply to --method IDM: its memories start as mosaics of real images')
    if args.method in ('random', 'herding'):
        refuse(args, ['checkpoint_every'], f'does not apply to --method {args.method}: nothing is condensed')
    # the condensation method's own settings for this dataset and ipc (those this script has no flag for too)
    own = METHODS[args.method].defaults(args.dataset, args.ipc) if args.method in METHODS else \
        dict(Iteration=0, lr_img=0.1, init='real')
    for k, v in own.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def this_process_seeds(done, seeds, group):
    """The seeds of 0 .. seeds-1 still to run (not in `done`), one per process in each round: under torchrun
    each process takes one seed of a round (None where a round has fewer seeds than processes; it still takes
    part in the round's collectives)."""
    todo = [seed for seed in range(seeds) if str(seed) not in done]
    for first in range(0, len(todo), group.world):
        yield todo[first + group.rank] if first + group.rank < len(todo) else None


def learn(seed, real, test, args, data, group):
    """Class-incremental learning in the class order of `seed`: after each step, a fresh model trained on
    the memories of every class so far and tested on their test images. Returns [per-step accuracies]
    (None for a process without a seed in this round)."""
    if seed is not None:
        order, steps = class_order(seed, args, data.num_classes)
        say(f'seed {seed}: class order {order}')
        record = memory_record(args, data, seed, order)
        stream = memories(seed, steps, real, args, data, record)
    accs = []
    for k in range(args.steps):
        kept, built = next(stream) if seed is not None else (None, False)
        on_main(group, save_memories, gather_objects((seed, kept, record) if built else None), args)
        if seed is not None:
            accs.append(test_step(kept, sum(steps[:k + 1], []), test, args, data, (seed, k)))
    return accs if seed is not None else None


def test_step(kept, seen, test, args, data, keys):
    """The accuracies of --num_eval fresh models trained on the memories `data` and tested on the test images
    of the classes `seen`."""
    images = torch.cat([d[0] for d in kept]).to(args.device)
    labels = torch.cat([d[1] for d in kept]).to(args.device)
    if args.method in METHODS:  # (memories stored as a method encodes them: IDM's mosaics)
        images, labels = METHODS[args.method](args, data).training_set(images, labels)
    mask = torch.isin(test.labels, torch.tensor(seen, device=test.labels.device))
    loader = tensor_loader(test.images[mask], test.labels[mask], 256)
    say(f'seed {keys[0]} step {keys[1]}: {len(labels)} memory images of {len(seen)} classes, {int(mask.sum())} test images')
    return evaluate_models(images, labels, [args.model], args, loader, data, keys, group=Group())[args.model]


class Table:
    """The per-step accuracies of every finished seed, in cl_<method>_<dataset>_<model>_<ipc>ipc_<steps>steps.json
    (rewritten after every seed, so a rerun continues with the seeds still to do)."""

    def __init__(self, args, data, group):
        self.args, self.data, self.group = args, data, group
        name = 'cl_%s_%s_%s_%dipc_%dsteps' % (args.method, args.dataset, args.model, args.ipc, args.steps)
        self.path = os.path.join(args.save_path, name + '.json')
        self.lock = os.path.join(args.save_path, f'.lock_{name}')
        self.signature = {k: v for k, v in signature(args, data).items() if k != 'seeds'}  # more seeds may be added later
        self.done = {}

    def finished(self):
        """{seed: per-step accuracies} of the seeds an earlier run of these settings finished."""
        self.done = on_main(self.group, self.read)
        for seed in sorted(map(int, self.done)):
            say(f'seed {seed}: evaluated already (in {self.path})')
        return self.done

    def read(self):
        if not os.path.exists(self.path) or self.args.overwrite:
            return {}
        table = read_json(self.path)
        if not table or not isinstance(table.get('per_seed', {}), dict):
            raise UsageError(f'{self.path} is not a table of this toolkit; use another --save_path, '
                             'or --overwrite to replace it')
        check_record(self.path, table.get('signature'), self.signature)
        return {s: a for s, a in table.get('per_seed', {}).items() if int(s) < self.args.seeds}

    def add(self, results):
        """The seeds that the processes have just finished ([(seed, accuracies)], from every process)."""
        self.done.update({str(s): a for s, a in results if s is not None})
        on_main(self.group, self.write)

    def write(self):
        """Per-step mean +- std over the finished seeds x models, written with every seed's accuracies."""
        args = self.args
        results = np.array([[a for s in sorted(self.done, key=int) for a in self.done[s][k]] for k in range(args.steps)])
        sizes = np.cumsum([len(part) for part in np.array_split(range(self.data.num_classes), args.steps)]).tolist()
        rows = [dict(step=k, classes=sizes[k], mean=float(r.mean()), std=float(r.std()), accs=r.tolist())
                for k, r in enumerate(results)]
        atomic_json(dict(method=args.method, seeds=len(self.done), steps=rows, per_seed=self.done,
                         signature=self.signature), self.path)
        return rows

    def show(self):
        rows = on_main(self.group, self.write)
        args = self.args
        say(f'\n{args.steps}-step learning, {args.method}: mean +- std over {args.seeds} seeds x {args.num_eval} models')
        for row in rows:
            say('step %d (%3d classes): %.2f%% +- %.2f%%' % (row['step'], row['classes'], row['mean'] * 100,
                                                            row['std'] * 100))
        say(' '.join('& %.1f$\\pm$%.1f' % (r['mean'] * 100, r['std'] * 100) for r in rows))  # the paper's table row


if __name__ == '__main__':
    run_script(main)
