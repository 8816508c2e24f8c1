"""Evaluate a synthetic set under the common protocol.

The set is a result file in the papers' format (ours or the papers' released ones) or a folder of images
<dir>/<class>/*. Each experiment of the file (or the one --exp names) trains --num_eval fresh models of
every architecture of --eval_mode (or --models) on the set, with the augmentation of the method that made
it, and tests them on the real test set; --baseline random does the same for random real images.

    python evaluate.py result/res_DM_CIFAR10_ConvNet_10ipc.pt --eval_mode M --num_eval 5
    python evaluate.py released/res_DSA_CIFAR10_ConvNet_10ipc.pt --models ConvNet AlexNet VGG11 --exp all
    python evaluate.py my_set/ --dataset CIFAR10 --dsa_strategy color_crop_cutout_flip_scale_rotate
"""
import argparse
import json
import os
import re
import struct
import sys

import numpy as np
import torch

from networks import MODELS
from runs import STRATEGY_RULE, Flags, Interrupted, get_parser as shared_parser, init_distributed, natural, on_main, \
    positive, positive_float, refuse, run_script, writable_folder
from scores import SoftLabels, read_released, released_layout, teacher_logits
from utils import (CORESETS, DATASETS, NO_STRATEGY, ClassImages, DataInfo, Group, UsageError, atomic_json, check_strategy,
                   default_strategy, epoch, evaluate_models, evaluation_args, expand, fingerprint, generator, get_dataset,
                   get_eval_pool, load_result, pick_device, say, set_seed, test_epochs, trained_classifier)

# Sets made by this toolkit carry their evaluation settings in their record (dsa, dsa_strategy, factor,
# epoch_eval_noaug); for sets without one (the papers' released files), their file names say which method made them:
DSA_MADE = ['DSA', 'DM', 'CAFE_DSA', 'IDM', 'ITGAN', 'GANInversion', 'GAN']  # sets evaluated with DSA augmentation
MOSAICS = {'IDM': 2}  # methods whose stored images are factor x factor mosaics (see utils.expand)
DC_MADE = ['DC', 'CAFE', *CORESETS]  # sets evaluated with DC's classic augmentation
NO_AUG_EPOCHS = {'CAFE': 600, 'CAFE_DSA': 600}  # the released CAFE sets' epochs without augmentation; others 300
GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')  # PIL modes of one-channel images


def experiment(text):
    if text == 'all':
        return text
    if not re.fullmatch(r'\d+', text):
        raise argparse.ArgumentTypeError(f'{text!r} is not an experiment number (0, 1, ...) or all')
    return int(text)


def get_parser():
    p = shared_parser(__doc__.split('\n\n')[0], groups=('data', 'evaluation', 'run'), omit=('overwrite', 'checkpoint_every', 'log'),
                      dataset=None, save_path=None, help={
                          'dataset': 'the real dataset (default: from the record res_<...>.json beside the file, else from '
                                     'its name)',
                          'save_path': 'folder for <input>_eval.json (default: beside the input)',
                          'seed': 'the same seed gives the same accuracies',
                          'num_eval': 'models trained per architecture and experiment',
                          'amp': "bfloat16 autocast for training and testing the models (off: the papers' float32 protocol)",
                          'resume': 'continue the stopped evaluation in <input>_eval.json (same settings): the models it '
                                    'finished are not trained again, and the accuracies are those of one uninterrupted run'})
    p.epilog = ('A flag wins over the record res_<...>.json that our scripts write beside a result file, '
                'and the record over the file name res_<method>_<dataset>_<model>_<ipc>ipc.pt.')
    p.add_argument('input', help="a result file in the papers' format (res_<method>_<dataset>_<model>_<ipc>ipc.pt) "
                                 'or a folder of images <dir>/<class>/*')
    p.add_argument('--method', choices=DSA_MADE + DC_MADE,
                   help=f'the method that made the set, which picks the augmentation: DSA ({STRATEGY_RULE}) for '
                        f"{', '.join(DSA_MADE)}; DC's classic one for {', '.join(DC_MADE)} (default: from the record, "
                        'else the file name; when nothing says, DSA augmentation)')
    p.add_argument('--dsa_strategy', help='evaluate with DSA augmentation of these _-separated transformations (color '
                                          "crop cutout flip scale rotate), or none for DC's classic augmentation "
                                          '(default: as the method says)')
    p.add_argument('--model', choices=list(MODELS), metavar='MODEL',
                   help='the training model, for --eval_mode S and SS (default: from the record or the file name, '
                        'else ConvNet)')
    p.add_argument('--models', nargs='+', choices=list(MODELS), metavar='MODEL',
                   help='evaluate on these models instead of an --eval_mode pool: ' + ', '.join(MODELS))
    p.add_argument('--factor', type=int, choices=[1, 2],
                   help='the stored images are factor x factor mosaics (IDM\'s), each expanded to factor² training images '
                        '(default: from the record, else 2 for sets made by IDM, else 1)')
    p.add_argument('--zca', action=argparse.BooleanOptionalAction, default=None,
                   help='the set lives in ZCA-whitened space: whiten the real data alike (default: as the record says)')
    p.add_argument('--exp', type=experiment, default='all', help='the experiment of the file to evaluate (0, 1, ...), or all')
    p.add_argument('--baseline', default='none', choices=['none', 'random'],
                   help='random: also evaluate random real training images, as many of each class as the set has')
    p.add_argument('--labels', default='hard', choices=['hard', 'set', 'teacher'],
                   help="what the models train on: hard labels (the papers' protocol); set: the soft labels (logits) "
                        "that come with the set (DATM's); teacher: a --teacher network's logits, the network trained here "
                        'on the real data (DD-Ranking). The random baseline follows the same rule (under set: the teacher)')
    p.add_argument('--teacher', choices=list(MODELS), metavar='MODEL',
                   help="the teacher's architecture (default: the set's --model), trained --teacher_epochs on the real "
                        'training set without augmentation and kept in the output folder')
    p.add_argument('--teacher_epochs', type=positive, default=20, help="the teacher's epochs")
    p.add_argument('--teacher_labels', default='batch', choices=['batch', 'once'],
                   help='batch: the teacher labels every augmented batch (DD-Ranking); once: the images, once, before training')
    p.add_argument('--soft_loss', choices=['kl', 'sce'],
                   help="KL divergence or soft cross-entropy (default: sce for the set's labels, as DATM; kl for a "
                        "teacher's, as DD-Ranking)")
    p.add_argument('--temperature', type=positive_float, default=1.0, help='the soft labels\' temperature')
    p.add_argument('--scores', action='store_true',
                   help="also DD-Ranking's scores (HLR, IOR, LRS, ARS; docs/scores.md): adds the random baseline, the set "
                        'under hard labels (when --labels is not hard), and the set and the baseline without augmentation')
    p.add_argument('--real_acc', type=float, metavar='PERCENT',
                   help='--scores: the accuracy (%%) of the evaluation model trained on the whole real training set, '
                        'with --real_acc_source saying where it comes from (default: measured here, a network trained '
                        '--teacher_epochs on the real data, as the teacher)')
    p.add_argument('--real_acc_source', metavar='TEXT', help='where --real_acc comes from (a paper, a table, a run)')
    p.add_argument('--test_every', type=natural, default=0, metavar='E',
                   help='also test every model after every E epochs of its training (the schedule unchanged): the '
                        'report holds the accuracy against epochs, mean and std over the models (default: 0, at the end only)')
    return p


# ----------------------------------------------------------------------------------------------------
# What made the set: the flags, the record beside the file, its name
# ----------------------------------------------------------------------------------------------------

def read_record(path, settings=None):
    """The settings our scripts record in a result file (`settings`) or beside it (res_<...>.json), or {}."""
    if isinstance(settings, dict):
        return settings
    record = os.path.splitext(path)[0] + '.json'
    if not os.path.isfile(record):
        return {}
    try:
        with open(record) as f:
            protocol = json.load(f)['protocol']
        if isinstance(protocol, dict):
            return protocol
    except (OSError, ValueError, KeyError, TypeError):
        pass
    print(f'warning: ignoring {record}: not a record of our scripts', file=sys.stderr)
    return {}


def parse_name(path):
    """method, dataset and model of a file named res_<method>_<dataset>_<model>_<ipc>ipc.pt, or {}.
    Methods and models may hold '_' (CAFE_DSA, ResNet18BN_AP); the dataset is the known name between them."""
    parts = os.path.splitext(os.path.basename(path))[0].split('_')
    if len(parts) < 5 or parts[0] != 'res' or not re.fullmatch(r'\d+ipc', parts[-1]):
        return {}
    for i in range(2, len(parts) - 2):
        if parts[i] in DATASETS or parts[i] == 'ImageFolder':
            return dict(method='_'.join(parts[1:i]), dataset=parts[i], model='_'.join(parts[i + 1:-1]))
    return {}


def resolve(args, settings=None):
    """Settle the dataset, the training model and the augmentation from the flags, else the record in or
    beside the file, else the file's name; args.sources says where each came from."""
    is_file = os.path.isfile(args.input)
    record = read_record(args.input, settings) if is_file else {}
    where = 'the record in ' + args.input if settings else 'the record ' + os.path.splitext(args.input)[0] + '.json'
    sources = [('--{}', vars(args)), (where, record),
               ('the file name', parse_name(args.input) if is_file else {})]

    def pick(key, default=None):
        return next(((values[key], src.format(key)) for src, values in sources if values.get(key) is not None),
                    (default, 'the default'))

    args.sources = {}
    args.dataset, args.sources['dataset'] = pick('dataset')
    args.model, args.sources['model'] = pick('model', 'ConvNet')
    args.method, args.sources['method'] = pick('method')
    args.factor, args.sources['factor'] = pick('factor', MOSAICS.get(args.method, 1))
    if args.dataset is None:
        raise UsageError(f'which dataset made {args.input}? give --dataset ({", ".join([*DATASETS, "ImageFolder"])})')
    if args.dataset not in DATASETS and args.dataset != 'ImageFolder':
        raise UsageError(f'unknown dataset {args.dataset!r} (from {args.sources["dataset"]}); '
                         f'choose from {", ".join([*DATASETS, "ImageFolder"])}')
    if args.models is None and args.eval_mode in ('S', 'SS') and args.model not in MODELS:
        raise UsageError(f'unknown model {args.model!r} (from {args.sources["model"]}); give --model or --models')
    if args.dsa_strategy is not None:
        args.dsa, why = args.dsa_strategy not in NO_STRATEGY, 'from --dsa_strategy'
    elif args.sources['method'] == '--method' or 'dsa' not in record:
        args.dsa = args.method not in DC_MADE
        args.dsa_strategy = default_strategy(args.dataset) if args.dsa else 'none'
        why = f'as for sets made by {args.method}' if args.method in DSA_MADE + DC_MADE else 'the default for an unknown method'
    else:
        args.dsa, args.dsa_strategy = bool(record['dsa']), str(record.get('dsa_strategy') or 'none')
        why = 'from ' + sources[1][0]
    check_strategy(args.dsa_strategy)
    args.sources['augmentation'] = why
    args.epoch_eval_noaug = int(record.get('epoch_eval_noaug') or NO_AUG_EPOCHS.get(args.method, 300))
    if args.zca is None:  # the set lives in the whitened space of the data it was made from (MTT's --zca)
        args.zca, args.sources['zca'] = bool(record.get('zca')), 'the record' if 'zca' in record else 'the default'
    else:
        args.sources['zca'] = '--zca'

    if args.dataset == 'ImageFolder' or args.models or args.eval_mode not in 'WDAPN' or args.model.startswith('ConvNet'):
        return
    raise UsageError(f'--eval_mode {args.eval_mode} compares ConvNet variants; it needs a ConvNet --model, not {args.model}')


# ----------------------------------------------------------------------------------------------------
# The synthetic sets
# ----------------------------------------------------------------------------------------------------

def read_pt(args):
    """The experiments [(k, images, labels)] of a result file (those --exp names), its recorded accuracies
    and the settings recorded in it (ours), if any."""
    res = load_result(args.input)
    n = len(res['data'])
    if n == 0:
        raise UsageError(f'{args.input} holds no experiments')
    if args.exp != 'all' and args.exp >= n:
        raise UsageError(f'--exp {args.exp} is out of range: {args.input} holds {n} experiment(s), 0..{n - 1}')
    sets = []
    for k in range(n) if args.exp == 'all' else [args.exp]:
        images, labels = res['data'][k]
        if len(images) == 0:
            raise UsageError(f'{args.input}: data[{k}] holds no images')
        if not torch.isfinite(images).all():
            raise UsageError(f'{args.input}: data[{k}] holds non-finite pixel values')
        sets.append((k, images.float(), labels.long()))
    recorded = {}  # the accuracies the file holds, as floats (the papers' files keep numpy scalars)
    accs_all = res.get('accs_all_exps')
    for m, accs in (accs_all.items() if isinstance(accs_all, dict) else []):
        try:
            recorded[str(m)] = summary([float(a) for a in accs])
        except (TypeError, ValueError):  # not a list of numbers: nothing to compare with
            pass
    learned = res.get('learned') if isinstance(res.get('learned'), list) else []
    lrs = {str(k): float(d['syn_lr']) for k, d in enumerate(learned) if isinstance(d, dict)
           and isinstance(d.get('syn_lr'), (int, float))}  # (a step size learned with the set: MTT's)
    return sets, recorded, res.get('settings'), lrs


def read_image(path, channel, size, dataset, sized):
    """An image file as uint8 [channel, h, w], of `size` (h, w) unless None."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            gray = img.mode in GRAY_MODES
            x = np.asarray(img.convert('RGB'))
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError):  # not an image,
        # a truncated one, a decompression bomb: one line says which file
        raise UsageError(f'{path} is not an image that PIL can read') from None
    if size and x.shape[:2] != tuple(size):
        raise UsageError(f'{path} is {x.shape[0]}x{x.shape[1]} pixels, but {sized} {size[0]}x{size[1]} '
                         '(evaluate.py does not resize images)')
    if channel == 1:
        if not gray and not ((x[..., 0] == x[..., 1]) & (x[..., 1] == x[..., 2])).all():
            raise UsageError(f'{path} has colour, but {dataset} images have 1 channel')
        x = x[..., :1]
    elif gray:
        raise UsageError(f'{path} is a one-channel image, but {dataset} images have {channel} channels')
    return torch.from_numpy(x.copy()).permute(2, 0, 1)


def read_folder(args):
    """The images of <dir>/<class>/* as uint8 [N, C, H, W], the class folders' names and each image's folder."""
    root, dataset = args.input, args.dataset
    channel, size = (DATASETS[dataset][0], DATASETS[dataset][1]) if dataset in DATASETS else (3, None)
    entries = sorted(e for e in os.listdir(root) if not e.startswith('.'))
    strays = [e for e in entries if not os.path.isdir(os.path.join(root, e))]
    if strays:
        raise UsageError(f'{os.path.join(root, strays[0])}: the images go in class folders, {root}/<class>/*')
    if not entries:
        raise UsageError(f'{root} holds no class folders ({root}/<class>/* images)')
    images, folder_of = [], []
    for i, name in enumerate(entries):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if not f.startswith('.'))
        if not files:
            raise UsageError(f'{folder} holds no images')
        for f in files:
            images.append(read_image(os.path.join(folder, f), channel, size, dataset,
                                     f'{dataset} images are' if dataset in DATASETS else 'the first image is'))
            size = size or images[0].shape[1:]  # ImageFolder: every image as large as the first
            folder_of.append(i)
    return torch.stack(images), entries, torch.tensor(folder_of)


def name_key(name):
    return re.sub(r'[^0-9a-z]', '', name.lower())


def folder_labels(folders, class_names, num_classes, args):
    """The label of each class folder: by name when the folders are named after the dataset's classes
    (compared without case and punctuation: 'T-shirt_top' is 'T-shirt/top'), else in sorted order
    (numerical when the names are numbers)."""
    index = {name_key(c): i for i, c in enumerate(class_names)}
    known = [name_key(f) in index for f in folders]
    if all(known) and len({name_key(f) for f in folders}) == len(folders):
        args.sources['labels'] = 'folder names matched to class names'
        return [index[name_key(f)] for f in folders]
    if any(known):
        unknown = [f for f, k in zip(folders, known) if not k]
        raise UsageError(f'{args.input}: some class folders are named after {args.dataset} classes but not '
                         f'{", ".join(unknown) or "all uniquely"}; name them all after classes, or none')
    if len(folders) != num_classes:
        raise UsageError(f'{args.input} has {len(folders)} class folders, but {args.dataset} has {num_classes} classes')
    args.sources['labels'] = 'class folders in sorted order'
    order = sorted(folders, key=lambda f: (int(f), f) if all(g.isdigit() for g in folders) else (0, f))
    return [order.index(f) for f in folders]


def check_fit(images, labels, where, args, data):
    shape, expected = tuple(images.shape[1:]), (data.channel, *data.im_size)
    if shape != expected:
        raise UsageError(f'{where}: images are {"x".join(map(str, shape))}, but {args.dataset} images are '
                         f'{"x".join(map(str, expected))}')
    if labels.max() >= data.num_classes:
        raise UsageError(f'{where}: labels go up to {labels.max().item()}, but {args.dataset} has {data.num_classes} classes')


def random_real(real, counts, generator):
    """counts[c] random real training images of each class c, drawn without replacement: (indices, labels)."""
    picks = []
    for c, n in enumerate(counts):
        pool = real.indices_class[c]
        if n > len(pool):
            raise UsageError(f'--baseline random needs {n} real images of class {c}, the training set has {len(pool)}')
        picks.append(pool[torch.randperm(len(pool), generator=generator)[:n].to(pool.device)])
    return torch.cat(picks), torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))


# ----------------------------------------------------------------------------------------------------
# Evaluation and its report
# ----------------------------------------------------------------------------------------------------

def summary(accs, **extra):
    if not accs:  # (a report saved before any experiment is complete)
        return dict(mean=None, std=None, n=0, accs=[], **extra)
    return dict(mean=float(np.mean(accs)), std=float(np.std(accs)), n=len(accs), accs=accs, **extra)


def summarise_exps(per_exp, **extra):
    """The summary of {experiment: [accuracies]}, with the accuracies of each experiment."""
    return summary([a for accs in per_exp.values() for a in accs], per_exp=per_exp, **extra)


def curve(epochs, curves):
    """Mean and std over models of the accuracy at each of `epochs` (--test_every), from curves' lists of
    every model's accuracies at them."""
    accs = np.array([c for per_model in curves for c in per_model]).reshape(-1, len(epochs))
    return dict(epochs=epochs, mean=accs.mean(0).tolist() if len(accs) else [],
                std=accs.std(0).tolist() if len(accs) else [], n=len(accs))


def augmentation(a):
    """The augmentation of the evaluation settings `a` (from utils.evaluation_args), in words."""
    if a.dsa:
        return 'DSA ' + a.dsa_strategy
    return 'none' if a.dc_aug_param['strategy'] == 'none' else 'DC ' + a.dc_aug_param['strategy']


def table(report):
    """Mean +- std (n) per model: the set's, the baseline's, and the accuracies the file recorded."""
    columns = [('synthetic set', report['results'])]
    if report['baseline']:
        columns.append(('random real images', report['baseline']['results']))
    if report['recorded']:
        columns.append(('recorded in the file', report['recorded']))
    cell = lambda r: '%.2f ± %.2f %% (n=%d)' % (100 * r['mean'], 100 * r['std'], r['n']) if r and r['n'] else '-'
    rows = [['model', 'augmentation', 'epochs'] + [name for name, _ in columns]]
    for m, r in report['results'].items():
        rows.append([m, r['augmentation'], str(r['epochs'])] + [cell(results.get(m)) for _, results in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    labels = [f'{name}: {r["labels"]}' for name, results in columns[:2] for r in list(results.values())[:1] if r.get('labels', 'hard labels') != 'hard labels']
    return '\n'.join(['  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
                     + (['labels: ' + '; '.join(labels)] if labels else []))


def scores_text(scores):
    """DD-Ranking's scores as lines: the real-data accuracy beside them, each block labelled by its accuracies."""
    lines = []
    for block in scores['blocks']:
        lines.append(f"DD-Ranking's scores ({block['accuracy']} accuracies; HLR and IOR in points, LRS and ARS with the "
                     'exponent on fractions as published | on percentage points as their released code):')
        for m, r in block['per_model'].items():
            lines.append(f"  {m}: real {r['real_acc']:.2f} % ({scores['real_acc'][m]['source']}), hard {r['hard_acc']:.2f} %, "
                         f"set {r['set_acc']:.2f} %, random {r['random_acc']:.2f} %, without augmentation {r['set_noaug_acc']:.2f} "
                         f"and {r['random_noaug_acc']:.2f} %")
            lines.append(f"    HLR {r['HLR']:.2f}  IOR {r['IOR']:.2f}  LRS {100 * r['LRS']['fraction']['mean']:.2f} ± "
                         f"{100 * r['LRS']['fraction']['std']:.2f} | {r['LRS']['percent']['mean']:.4g}  "
                         f"ARS {100 * r['ARS']['fraction']:.2f} | {r['ARS']['percent']:.4g}  ({r['rounds']} rounds)")
    return '\n'.join(lines)


def output_path(args):
    path = os.path.abspath(args.input)
    stem = os.path.splitext(os.path.basename(path))[0] if os.path.isfile(path) else os.path.basename(path)
    return os.path.join(args.save_path or os.path.dirname(path), stem + '_eval.json')


def load(args):
    """The experiments to evaluate [(k, images, hard labels)], normalised; the soft labels that came with them
    {k: logits} (DATM's layout); the accuracies the file recorded; the real training set and test loader; the
    DataInfo. Fills in args: the settings (see resolve)."""
    soft, released = {}, released_layout(args.input)
    if released:  # MTT's or DATM's layout: images, labels (DATM's: soft) and (DATM's) a learned rate
        images, labels, lr = read_released(args.input)
        soft = {0: labels} if labels.dim() == 2 else {}
        sets, recorded, settings, lrs = [(0, images, labels.argmax(1) if soft else labels)], {}, None, {'0': lr} if lr else {}
    else:
        sets, recorded, settings, lrs = read_pt(args) if os.path.isfile(args.input) else (None, {}, None, {})
    resolve(args, settings)
    if released:
        args.sources['labels'] = ("soft labels (logits) with the set; hard labels: their argmax" if soft else
                                  'hard labels with the set') + " (MTT's or DATM's layout)"
    # a learning rate learned with each set (MTT's) trains its models, unless --lr_net is given; a negative one
    # (the authors' code would stop) falls back to the rate the method started from
    args.learned_lr = {} if 'lr_net' in args.given else {
        k: lr if lr > 0 else float((read_record(args.input, settings) or {}).get('lr_teacher') or args.lr_net)
        for k, lr in lrs.items()}
    if sets is None:
        if args.exp not in ('all', 0):
            raise UsageError(f'--exp {args.exp} is out of range: a folder is one experiment, 0')
        raw, folders, folder_of = read_folder(args)
    im_size = tuple((raw if sets is None else sets[0][1]).shape[2:]) if args.dataset == 'ImageFolder' else None
    loaded = get_dataset(args.dataset, args.data_path, im_size, args.device, args.zca)  # ImageFolder: at the set's size
    data, dst_train, testloader = DataInfo.of(args.dataset, loaded), loaded[6], loaded[8]
    if sets is None:
        labels = torch.tensor(folder_labels(folders, data.class_names, data.num_classes, args))[folder_of]
        mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)
        sets = [(0, (raw.float() / 255 - mean) / std, labels)]
    for k, images, labels in sets:
        check_fit(images, labels, f'{args.input} experiment {k}' if os.path.isfile(args.input) else args.input, args, data)
    if soft and args.factor > 1:
        raise UsageError(f'{args.input}: soft labels with {args.factor}x{args.factor} mosaics are not supported')
    sets = [(k, *expand(images, labels, args.factor)) for k, images, labels in sets]  # (what the models train on)
    return sets, soft, recorded, dst_train, testloader, data


# ----------------------------------------------------------------------------------------------------
# Continuing a stopped evaluation
# ----------------------------------------------------------------------------------------------------

SAME_FOR_RESUME = ('set_id', 'data_id', 'dataset', 'method', 'model', 'models', 'factor', 'dsa', 'dsa_strategy', 'epoch_eval_train',
                   'lr_net', 'learned_lr', 'zca', 'eval_schedule', 'labels', 'teacher', 'teacher_epochs',
                   'teacher_labels', 'soft_loss', 'temperature', 'batch_train', 'seed', 'amp', 'eval_together', 'num_eval', 'baseline',
                   'test_every')  # what the accuracies (and the curves) depend on
ADDED_SETTINGS = {'test_every': 0, 'learned_lr': {}, 'zca': False, 'eval_schedule': 'toolkit-0.1', 'labels': 'hard',
                  'teacher': None, 'teacher_epochs': 20, 'teacher_labels': 'batch', 'soft_loss': None, 'temperature': 1.0}  # settings added since reports were written: their value in reports without them
OTHER_DATA = {'set_id': 'another synthetic set under the same name', 'data_id': 'other real data'}


def done_list(done, curves):
    """{(set, experiment): {(model, numbers): accuracies}} as the report's JSON list, with each model's
    accuracies against epochs (--test_every) from `curves`, keyed alike."""
    return sorted((dict(set=kind, exp=k, model=m, numbers=list(numbers), accs=accs,
                        **({'curves': curves[kind, k][m, numbers]} if (m, numbers) in curves.get((kind, k), {}) else {}))
                   for (kind, k), models in done.items() for (m, numbers), accs in models.items()),
                  key=lambda d: (d['set'], d['exp'], d['model'], d['numbers']))


def models_in(done):
    return sum(len(numbers) for models in done.values() for _, numbers in models)


def resumed(out, settings):
    """The models that the evaluation reported in `out` finished, and their curves, as done_list's dicts;
    refused when `out` is missing or unreadable or was made with other settings."""
    try:
        with open(out) as f:
            report = json.load(f)
        old = report['settings']
        done, curves = {}, {}
        for d in report.get('done', []):
            done.setdefault((d['set'], d['exp']), {})[d['model'], tuple(d['numbers'])] = d['accs']
            if 'curves' in d:
                curves.setdefault((d['set'], d['exp']), {})[d['model'], tuple(d['numbers'])] = d['curves']
    except FileNotFoundError:
        raise UsageError(f'--resume: there is no evaluation to continue in {out}') from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f'--resume: {out} is not a report of evaluate.py ({type(e).__name__}: {e})') from None
    now = json.loads(json.dumps(settings))  # (tuples as lists, as in the file)
    changed = [k for k in SAME_FOR_RESUME if old.get(k, ADDED_SETTINGS.get(k)) != now.get(k)]
    if changed:
        raise UsageError(f'--resume: {out} was made with other settings ('
                         + ', '.join(OTHER_DATA.get(k) or f'{k} {old.get(k, ADDED_SETTINGS.get(k))!r}, now {now.get(k)!r}' for k in changed)
                         + '); give the same ones, or another --save_path')
    return done, curves


def configure(args):
    """Check the flags; the device (under torchrun the models are shared out among the processes)."""
    if args.models and 'eval_mode' in args.given:
        raise UsageError('argument --models: not allowed with argument --eval_mode')
    if args.resume not in ('none', 'auto'):
        raise UsageError(f'--resume takes no file here ({args.resume}): it continues the evaluation in <input>_eval.json')
    if args.num_eval == 0:  # (the shared flag allows 0 for condensation with --snapshots; an evaluation needs a model)
        raise UsageError('--num_eval must be at least 1, got 0')
    if not args.scores:
        refuse(args, ('real_acc', 'real_acc_source'), 'is for --scores')
    elif args.real_acc is not None and not args.real_acc_source:
        raise UsageError('--real_acc: say where it comes from with --real_acc_source')
    elif args.baseline == 'none' and 'baseline' in args.given:
        raise UsageError('--scores compares the set with random real images: it needs --baseline random')
    if args.scores:
        args.baseline = 'random'
    if args.labels == 'hard':
        refuse(args, ('teacher', 'teacher_epochs', 'teacher_labels', 'soft_loss', 'temperature'),
               'is for soft labels: give --labels teacher or --labels set')
    elif args.labels == 'set' and args.baseline != 'random':
        refuse(args, ('teacher', 'teacher_epochs', 'teacher_labels'), "labels the random baseline: --labels set "
               "trains on the set's own labels")
    args.device, _ = init_distributed(pick_device(args.device))
    if args.dsa_strategy is not None:
        check_strategy(args.dsa_strategy)
    if not os.path.exists(args.input):
        raise UsageError(f'{args.input} does not exist')
    return args


def draw_baselines(args, sets, counts, dst_train, num_classes):
    """--baseline random: the random real images of each experiment (as many per class as the set has),
    drawn before hours of evaluation."""
    if args.baseline != 'random':
        return {}
    real = ClassImages(dst_train, num_classes)
    return {k: random_real(real, n, generator(args.seed, 'random', k)) for (k, _, _), n in zip(sets, counts)}


def describe(args, sets, model_pool):
    """Say what is evaluated and how; the evaluation settings of every model."""
    made = f'made by {args.method} (from {args.sources["method"]})' if args.method else 'made by an unnamed method'
    say(f'{args.input}: {len(sets)} experiment(s) of {len(sets[0][1]) // args.factor ** 2} images; dataset {args.dataset} '
          f'(from {args.sources["dataset"]}), {made}, training model {args.model} (from {args.sources["model"]})'
          + (f'; labels: {args.sources["labels"]}' if 'labels' in args.sources else '')
          + (f'; stored as {args.factor}x{args.factor} mosaics (from {args.sources["factor"]}), expanded to '
             f'{len(sets[0][1])} training images' if args.factor > 1 else ''))
    per_model = {m: evaluation_args(args, m, args.epoch_eval_noaug) for m in model_pool}
    for m, a in per_model.items():
        say(f'evaluating on {m}: augmentation {augmentation(a)} ({args.sources["augmentation"]}), '
              f'{a.epoch_eval_train} epochs ({args.eval_schedule} schedule), {args.num_eval} model(s) per experiment')
    if args.learned_lr:
        say(f'learning rate: the one learned with the set ({args.learned_lr}), for the set and the random baseline')
    if args.zca:
        say(f'the set lives in ZCA-whitened space (from {args.sources["zca"]}): the real data are whitened alike')
    return per_model


class LabelsRule:
    """The labels of one evaluation, the same rule for the set and the random baseline: for_set(k, images, labels)
    and for_random(images, labels) give (labels, train_criterion); `words` say what each trained on, `teacher` is
    the teacher's card (or None)."""

    def __init__(self, args, soft, dst_train, testloader, data, folder):
        self.args, self.soft, self.teacher, self.net = args, soft, None, None
        if args.labels == 'set' and not soft:
            raise UsageError(f'--labels set: {args.input} carries no soft labels (hard labels only); '
                             'try --labels teacher')
        if args.labels == 'teacher' or args.labels == 'set' and args.baseline == 'random':
            self.net, self.teacher = train_teacher(args, dst_train, testloader, data, folder)
        self.loss = args.soft_loss or ('sce' if args.labels == 'set' else 'kl')
        how = f'{self.loss} at temperature {args.temperature:g}'
        by_teacher = self.teacher and (f"the {self.teacher['architecture']} teacher's soft labels "
                                       f"({'every augmented batch' if args.teacher_labels == 'batch' else 'once'}; {how})")
        self.words = {'hard': {'set': 'hard labels', 'random': 'hard labels'},
                      'set': {'set': f"the set's soft labels ({how})", 'random': by_teacher},
                      'teacher': {'set': by_teacher, 'random': by_teacher}}[args.labels]

    def by_teacher(self, images, labels):
        if self.args.teacher_labels == 'once':
            return teacher_logits(self.net, images.to(self.args.device)), SoftLabels(self.loss, self.args.temperature)
        return labels, SoftLabels(self.loss, self.args.temperature, self.net)

    def for_set(self, k, images, labels):
        if self.args.labels == 'hard':
            return labels, None
        if self.args.labels == 'set':
            return self.soft[k].to(self.args.device), SoftLabels(self.loss, self.args.temperature)
        return self.by_teacher(images, labels)

    def for_random(self, images, labels):
        return (labels, None) if self.args.labels == 'hard' else self.by_teacher(images, labels)


def plan(args):
    """The evaluations of every experiment: (kind, on the random real images?, under the labels rule (else hard
    labels)?, with augmentation?). The set, the random baseline; for --scores also the set under hard labels (HLR;
    the set's own run when the rule is hard labels) and both without augmentation (ARS)."""
    runs = [('synthetic', False, True, True)] + ([('random', True, True, True)] if args.baseline == 'random' else [])
    if args.scores:
        runs += ([('synthetic, hard labels', False, False, True)] if args.labels != 'hard' else []) + [
            ('synthetic, no augmentation', False, True, False), ('random, no augmentation', True, True, False)]
    return runs


def scores_block(args, accs, real, model_pool, best=False):
    """DD-Ranking's scores of the set, per evaluation model, from `accs` ({kind: {model: [accuracies]}}, fractions;
    the models paired by number as DD-Ranking's rounds): HLR, IOR, LRS (mean and std over rounds) and ARS, with
    the exponent on fractions (the published formula) and on percentage points (DD-Ranking's released code)."""
    from scores import SCALES, ars, hlr, ior, mean_lrs
    out = {}
    for m in model_pool:
        a = {kind: [100 * x for x in per_model[m]] for kind, per_model in accs.items()}
        hard = a.get('synthetic, hard labels', a['synthetic'])
        mean = {kind: float(np.mean(v)) if v else float('nan') for kind, v in a.items()}
        n = min(len(hard), len(a['synthetic']), len(a['random']))
        if n == 0 or not all(a.values()):
            continue
        hlrs = [hlr(real[m], h) for h in hard[:n]]
        iors = [ior(s, r) for s, r in zip(a['synthetic'][:n], a['random'][:n])]
        out[m] = dict(real_acc=real[m], hard_acc=mean.get('synthetic, hard labels', mean['synthetic']),
                      set_acc=mean['synthetic'], random_acc=mean['random'],
                      set_noaug_acc=mean['synthetic, no augmentation'], random_noaug_acc=mean['random, no augmentation'],
                      HLR=float(np.mean(hlrs)), IOR=float(np.mean(iors)), rounds=n,
                      LRS={scale: dict(zip(('mean', 'std'), mean_lrs(hlrs, iors, scale=scale))) for scale in SCALES},
                      ARS={scale: ars(mean['synthetic'], mean['random'], mean['synthetic, no augmentation'],
                                      mean['random, no augmentation'], scale=scale) for scale in SCALES})
    return dict(accuracy='best along the curve, selected on the test set' if best else 'final', percent=True,
                weight=0.5, per_model=out)


def real_accuracy(args, dst_train, testloader, data, folder, model_pool):
    """{model: (accuracy in %, source)}: --real_acc, or measured here (a network trained on the real data)."""
    if args.real_acc is not None:
        return {m: (args.real_acc, args.real_acc_source) for m in model_pool}
    out = {}
    for m in model_pool:
        _, card = train_teacher(args.replace(teacher=m), dst_train, testloader, data, folder)
        out[m] = (100 * card['test_acc'], f'measured here: {m} trained {card["epochs"]} epochs on the real training set '
                                          f'without augmentation (weights {card["weights_sha256"][:12]})')
    return out


def train_teacher(args, dst_train, testloader, data, folder):
    """A --teacher network trained on the real training set (utils.trained_classifier: --teacher_epochs, no
    augmentation, kept in `folder` and read back by a rerun), in eval mode, and its card."""
    import hashlib
    arch = args.teacher or (args.model if args.model in MODELS else 'ConvNet')
    flags = args.replace(model=arch, save_path=folder)
    set_seed(args.seed, 'teacher')
    net, _ = trained_classifier(ClassImages(dst_train, data.num_classes), range(data.num_classes), flags, data,
                                args.teacher_epochs)
    acc = epoch('test', testloader, net, None, torch.nn.CrossEntropyLoss(), flags, aug=False)[1]
    digest = hashlib.sha256()
    for name, t in net.state_dict().items():
        digest.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    card = dict(architecture=arch, epochs=args.teacher_epochs, trained_on=f'the {data.dataset} training set, no augmentation',
                lr_net=args.lr_net, batch_train=args.batch_train, test_acc=acc, weights_sha256=digest.hexdigest(), kept_in=folder)
    say(f'teacher: {arch}, {args.teacher_epochs} epochs on the real training set, test accuracy {100 * acc:.2f} %')
    return net, card


def main():
    args = configure(get_parser().parse_args())
    group, out = Group.current(), output_path(args)
    on_main(group, writable_folder, os.path.dirname(out), '--save_path' if args.save_path else 'the output folder')
    sets, soft, recorded, dst_train, testloader, data = load(args)
    counts = [torch.bincount(labels, minlength=data.num_classes).tolist() for _, _, labels in sets]
    args.ipc = max(max(c) for c in counts)
    model_pool = args.models or get_eval_pool(args.eval_mode, args.model, args.model)
    args.eval_mode = None if args.models else args.eval_mode
    args.resume = args.resume != 'none'  # (the reports record it as a yes or no)
    args = Flags.freeze(args)
    baselines = draw_baselines(args, sets, counts, dst_train, data.num_classes)
    per_model = describe(args, sets, model_pool)
    rule = LabelsRule(args, soft, dst_train, testloader, data, os.path.dirname(out))
    runs = plan(args)
    real = real_accuracy(args, dst_train, testloader, data, os.path.dirname(out), model_pool) if args.scores else {}
    say(f'labels: the set trains on {rule.words["set"]}' + (f', the random baseline on {rule.words["random"]}' if baselines else ''))
    settings = {k: v for k, v in vars(args).items() if k not in ('given', 'flags')
                and isinstance(v, (int, float, str, bool, type(None), list, tuple, dict))}
    settings = dict(settings, channel=data.channel, im_size=list(data.im_size), num_classes=data.num_classes,
                    class_names=list(data.class_names), mean=list(data.mean), std=list(data.std),
                    models=model_pool, data_id=data.data_id,  # (which set, which real data)
                    set_id=fingerprint([t.cpu() for _, images, labels in sets for t in (images, labels)]))
    # (set, experiment) -> {(model, numbers): accuracies}, and with --test_every their accuracies against epochs
    done, curves = on_main(group, resumed, out, settings) if args.resume else ({}, {})
    if args.resume:
        say(f'continuing the evaluation in {out}: {models_in(done)} model(s) done')

    def finished_accs(kind, m):  # {experiment: accuracies of the finished models of m}: a stopped run's too
        return {str(k): [a for _, accs in sorted((n, a) for (mm, n), a in models.items() if mm == m) for a in accs]
                for (s, k), models in sorted(done.items()) if s == kind and any(mm == m for mm, _ in models)}

    def against_epochs(kind, m):  # (only with --test_every)
        if not args.test_every:
            return {}
        c = [c for (s, _), models in curves.items() if s == kind for (mm, _), c in models.items() if mm == m]
        return dict(curve=curve(test_epochs(per_model[m]), c))

    def report(finished):
        return dict(
            settings=settings,
            results={m: summarise_exps(finished_accs('synthetic', m), epochs=per_model[m].epoch_eval_train,
                                       augmentation=augmentation(per_model[m]), labels=rule.words['set'],
                                       **against_epochs('synthetic', m)) for m in model_pool},
            teacher=rule.teacher,
            baseline=dict(kind='random', results={m: summarise_exps(finished_accs('random', m), labels=rule.words['random'],
                                                                    **against_epochs('random', m)) for m in model_pool},
                          indices={str(j): idx.tolist() for j, (idx, _) in baselines.items()}) if baselines else None,
            more={kind: {m: summarise_exps(finished_accs(kind, m), labels=rule.words['random' if on_random else 'set']
                                           if by_rule else 'hard labels', augmentation=augmentation(per_model[m])
                                           if augmented else 'none') for m in model_pool}
                  for kind, on_random, by_rule, augmented in runs[2:]},
            scores=scores_of(finished) if args.scores else None,
            recorded=recorded, finished=finished, done=done_list(done, curves))

    def scores_of(finished):  # DD-Ranking's scores: the final accuracies, and with --test_every the best on the test set
        final = {kind: {m: [a for accs in finished_accs(kind, m).values() for a in accs] for m in model_pool}
                 for kind, *_ in runs}
        blocks = [scores_block(args, final, {m: acc for m, (acc, _) in real.items()}, model_pool)]
        if args.test_every:
            best = {kind: {m: [max(c) for (s, _), models in sorted(curves.items()) if s == kind
                               for (mm, _), cs in sorted(models.items()) if mm == m for c in cs] for m in model_pool}
                    for kind, *_ in runs}
            blocks.append(scores_block(args, best, {m: acc for m, (acc, _) in real.items()}, model_pool, best=True))
        return dict(real_acc={m: dict(percent=acc, source=src) for m, (acc, src) in real.items()}, complete=finished,
                    blocks=blocks)

    # (every finished model is saved at once: a kill loses at most the model in training; under torchrun each
    # process holds only its own models until the experiment ends)
    save = (lambda: atomic_json(report(False), out)) if group.world == 1 else None
    try:
        for k, images, labels in sets:
            # (the set's learned rate, if it has one, for the set and its baseline alike: one protocol)
            flags = args.replace(lr_net=args.learned_lr[str(k)]) if str(k) in args.learned_lr else args
            for kind, on_random, by_rule, augmented in runs:
                imgs, hard = (dst_train.images[baselines[k][0]], baselines[k][1]) if on_random else (images, labels)
                train_labels, criterion = ((rule.for_random(imgs, hard) if on_random else rule.for_set(k, imgs, hard))
                                           if by_rule else (hard, None))
                f = flags if augmented else flags.replace(dsa=True, dsa_strategy='none',  # (the same epochs)
                                                          epoch_eval_train=per_model[model_pool[0]].epoch_eval_train)
                evaluate_models(imgs, train_labels, model_pool, f, testloader, data, (k,) if kind == 'synthetic' else (kind, k),
                                args.epoch_eval_noaug, group, on_finish=save, finished=done.setdefault((kind, k), {}),
                                curves=curves.setdefault((kind, k), {}), train_criterion=criterion)
            on_main(group, atomic_json, report(k == sets[-1][0]), out)  # after every experiment: a long run keeps what it has done
    except Interrupted as stop:
        if group.world > 1:  # (each process holds only its own models: no collective to save them with)
            raise
        atomic_json(report(False), out)  # the models finished so far, in the middle of an experiment too
        raise Interrupted(f'{stop}; the {models_in(done)} model(s) finished are in {out}; continue with --resume',
                          stop.code - 128) from None
    final = report(True)
    say('\n' + table(final))
    if final['scores']:
        say(scores_text(final['scores']))
    for m, r in final['results'].items() if args.test_every else ():
        c = r['curve']
        say(f'{m}, accuracy against epochs (mean over {c["n"]} models): '
              + ', '.join('%d: %.2f %%' % (e, 100 * a) for e, a in zip(c['epochs'], c['mean'])))
    say(f'\nwritten to {out}')


if __name__ == '__main__':
    run_script(main)
