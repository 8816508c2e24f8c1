"""The command line of every script: one table of flags (the papers' names) in groups that each script picks
from, argparse with one-line errors and typed ranges, and the frozen Flags of a configured run."""
import argparse
import math

from networks import MODELS
from utils import DATASETS, DIGITS, EVAL_MODES, FULL_STRATEGY, NO_STRATEGY, UsageError, default_strategy


def number(kind, least):
    """An argparse type: an int of at least `least`, or a finite float above `least`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {"a whole number" if kind is int else "a number"}') from None
        if kind is float and not (math.isfinite(value) and value > least) or kind is int and value < least:
            raise argparse.ArgumentTypeError(f'must be a positive number, got {text}' if kind is float
                                             else f'must be at least {least}, got {text}')
        return value
    return parse


positive, natural, positive_float = number(int, 1), number(int, 0), number(float, 0.0)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # every default shown; a default set by a rule says so itself
        if 'default:' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


_UNSET = object()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, every default in --help, `args.given` (the flags typed on the command
    line), `args.flags` (every flag's name, and the script's fixed settings: what identifies a run) and
    `unused` flags refused with a reason, instead of silently ignored."""

    def __init__(self, *a, unused=None, **k):
        super().__init__(*a, formatter_class=_HelpFormatter, **k)
        self.unused = unused or {}

    def error(self, message):  # one line on stderr and exit status 2, no usage dump
        self.exit(2, f'{self.prog}: error: {message}\n')

    def parse_known_args(self, args=None, namespace=None):
        namespace = namespace or argparse.Namespace(
            **{a.dest: _UNSET for a in self._actions if a.default is not argparse.SUPPRESS})
        namespace, extra = super().parse_known_args(args, namespace)
        namespace.given = set()
        namespace.flags = [a.dest for a in self._actions if a.default is not argparse.SUPPRESS] + list(self._defaults)
        for a in self._actions:
            if getattr(namespace, a.dest, None) is _UNSET:
                default = self._get_value(a, a.default) if isinstance(a.default, str) else a.default
                setattr(namespace, a.dest, default)
            elif a.default is not argparse.SUPPRESS:
                namespace.given.add(a.dest)
        for flag, reason in self.unused.items():
            if flag in namespace.given:
                self.error(f'--{flag} {reason}')
        return namespace, extra


class Flags(argparse.Namespace):
    """The flags of a run once configured: read-only. What is derived from them or from the data travels in
    values of its own (utils.DataInfo, the method's attributes); replace() makes a changed copy."""

    def __setattr__(self, name, value):
        raise AttributeError(f'the flags are frozen after configuration (setting {name})')

    __delattr__ = __setattr__

    @classmethod
    def freeze(cls, namespace):
        flags = cls.__new__(cls)
        flags.__dict__.update(vars(namespace))
        return flags

    def replace(self, **changes):
        return Flags.freeze(argparse.Namespace(**{**vars(self), **changes}))


STRATEGY_RULE = f'default: {FULL_STRATEGY}, without flip for {" and ".join(DIGITS)}'
FLAGS = {  # every flag a script shares with others (the papers' names): name -> argparse keywords
    # the data
    'dataset': dict(type=str, default='CIFAR10', choices=[*DATASETS, 'ImageFolder'],
                    help='dataset (ImageFolder: your own images in --data_path/train|test/<class>/)'),
    'data_path': dict(type=str, default='data', help='dataset path'),
    'im_size': dict(type=int, nargs='+', default=None, help='image size for --dataset ImageFolder (default: 32x32)'),
    # condensation
    'method': dict(type=str, default=None, help='method name, used in output file names'),
    'model': dict(type=str, default='ConvNet', choices=list(MODELS), metavar='MODEL',
                  help='training model: ' + ', '.join(MODELS)),
    'ipc': dict(type=positive, default=1, help='image(s) per class'),
    'num_exp': dict(type=positive, default=5, help='the number of experiments'),
    'Iteration': dict(type=natural, default=1000, help='training iterations'),
    'lr_img': dict(type=positive_float, default=0.1, help='learning rate for the synthetic images'),
    'batch_real': dict(type=positive, default=256, help='batch size for real data'),
    'init': dict(type=str, default='noise', choices=['noise', 'real'],
                 help='initialise the synthetic images from noise or from random real images'),
    'dsa_strategy': dict(type=str, default='None',
                         help='_-separated DSA transformations (color crop cutout flip scale rotate), or None'),
    'dis_metric': dict(type=str, default='ours', choices=['ours', 'mse', 'cos'], help='gradient distance'),
    'compile': dict(action='store_true', help='torch.compile those forward passes (seconds to a minute, once)'),
    'minutes': dict(type=positive_float, default=None,
                    help='condense for this many minutes of iterations or --Iteration iterations, whichever ends first; '
                         'evaluate at 0, past half the time and at the end (methods at equal time: docs/runs.md)'),
    'snapshots': dict(action='store_true', help='also save the set at every evaluation as res_<run>_exp<e>_iter<it>.pt '
                                                '(evaluate.py evaluates it); with --num_eval 0, without evaluating it'),
    # evaluation
    'eval_mode': dict(type=str, default='S', choices=EVAL_MODES,
                      help='S: the training model (BN as its non-BN twin), SS: itself, M/B/W/D/A/P/N: model pools'),
    'num_eval': dict(type=natural, default=20, help='the number of evaluated randomly initialised models'),
    'epoch_eval_train': dict(type=positive, default=None,
                             help='epochs to train an evaluation model (default: 1000 with augmentation, else 300; CAFE 600)'),
    'lr_net': dict(type=positive_float, default=0.01, help='learning rate for network parameters'),
    'eval_schedule': dict(type=str, default='papers', choices=['papers', 'toolkit-0.1'],
                          help="papers: their evaluate_synset, epoch_eval_train + 1 epochs and a new SGD at the rate "
                               "x0.1 after epoch index epoch_eval_train // 2 + 1; toolkit-0.1: this toolkit before 0.2.0, "
                               "epoch_eval_train epochs, the rate x0.1 in place after half of them"),
    'batch_train': dict(type=positive, default=256, help='batch size for training networks'),
    'eval_together': dict(action='store_true', help='train the evaluation models of an architecture (up to 10, no '
                                                    'BatchNorm) as one batched computation: for GPUs (together.py)'),
    # the run
    'save_path': dict(type=str, default='result', help='path to save results'),
    'seed': dict(type=natural, default=0, help='the same seed gives the same results'),
    'device': dict(type=str, default='auto', help='auto (CUDA when present), cpu, cuda or cuda:<i>'),
    'amp': dict(action='store_true', help="bfloat16 autocast for forward and backward passes (off: the papers' float32)"),
    'resume': dict(type=str, nargs='?', const='auto', default='none',
                   help='auto (or a bare --resume): continue from the newest valid checkpoint in --save_path; or a file'),
    'checkpoint_every': dict(type=positive, default=None,
                             help='save a checkpoint every N iterations (default: about every 10 minutes) and at evaluations'),
    'overwrite': dict(action='store_true', help='replace the files of an earlier run of the same name in --save_path'),
    'log': dict(type=str, default='none', choices=['none', 'tensorboard', 'wandb'],
                help='also stream the numbers to TensorBoard (--save_path/tensorboard) or wandb (pip install either)'),
    'keep_memory': dict(action='store_true', help="keep freed memory in the process (glibc): faster on some CPUs"),
}
GROUPS = {
    'data': ['dataset', 'data_path', 'im_size'],
    'condensation': ['method', 'model', 'ipc', 'num_exp', 'Iteration', 'lr_img', 'batch_real', 'init', 'dsa_strategy',
                     'dis_metric', 'compile', 'minutes', 'snapshots'],
    'evaluation': ['eval_mode', 'num_eval', 'epoch_eval_train', 'lr_net', 'eval_schedule', 'batch_train', 'eval_together'],
    'run': ['save_path', 'seed', 'device', 'amp', 'resume', 'checkpoint_every', 'overwrite', 'log', 'keep_memory'],
}
NOT_AN_IDENTITY = {'device', 'data_path', 'save_path', 'resume', 'overwrite', 'checkpoint_every', 'num_exp', 'snapshots',
                   'log', 'keep_memory'}  # flags that do not change a run's results: it may continue with other values


def get_parser(description, groups=('data', 'condensation', 'evaluation', 'run'), methods=None, omit=(), unused=None,
               rules=None, help=None, **defaults):
    """A parser of the shared flags of `groups` (FLAGS), with the script's defaults as keywords; `methods`: the
    choices of --method; `omit`: flags the script does not offer (their defaults stay); `unused`: {flag: reason}
    for flags accepted from the papers' command lines but refused; `rules`: {flag: 'default: ...'} for defaults
    that follow a rule; `help`: {flag: text} where the script means something else by a flag."""
    p = ArgumentParser(description=description, unused=unused)
    rules, help = rules or {}, help or {}
    for name in [n for g in groups for n in GROUPS[g]]:
        kw = dict(FLAGS[name], **({'choices': methods} if name == 'method' and methods else {}))
        kw['help'] = help.get(name, kw['help'])
        if name in defaults:
            kw['default'] = defaults.pop(name)
        if name in omit:
            p.set_defaults(**{name: kw.get('default', False)})
            continue
        if name in rules:
            kw['help'] += f' ({rules[name]})'
        if name in p.unused:  # accepted from the papers' command lines, but refused with a reason
            kw['help'] = argparse.SUPPRESS
        p.add_argument('--' + name, **kw)
    p.set_defaults(**defaults)
    return p


def refuse(args, flags, reason):
    """Bad input: one of `flags` was given although, as `reason` says, it does not apply."""
    for flag in flags:
        if flag in args.given:
            raise UsageError(f'--{flag} {reason}')


def resolve_dsa(args, augments, required=None):
    """args.dsa_strategy and args.dsa, before the flags freeze. A method that matches with DSA augmentation
    (`augments`) uses the DSA paper's strategy for the dataset unless --dsa_strategy is given. An explicit
    --dsa_strategy always wins. `required`: True, the method needs a strategy; False, it takes none."""
    if augments and 'dsa_strategy' not in getattr(args, 'given', ()):
        args.dsa_strategy = default_strategy(args.dataset)
    args.dsa = args.dsa_strategy not in NO_STRATEGY
    if required is False and args.dsa:
        raise UsageError(f'--dsa_strategy goes with --method DSA; {args.method} matches and evaluates without it')
    if required and not args.dsa:
        raise UsageError(f'--method {args.method} needs a --dsa_strategy; without augmentation use --method DC')
    return args
