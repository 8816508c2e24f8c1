"""The harness of the condensation scripts: the command line, run records and ownership, checkpoints, stop
signals and the experiment loop. A method does not need to read it: it is one `train_iteration(it, syn, real,
args)` given to `condense` (see docs/adding_a_method.md); utils.py holds everything a method calls.

The harness calls utils through the module (utils.evaluate_models, utils.RANK, ...), so that a patch of
utils reaches it and the torchrun rank is read where it lives.
"""
import argparse
import contextlib
import ctypes
import functools
import json
import math
import os
import re
import signal
import sys
import threading
import time

import numpy as np
import torch
from tqdm import tqdm

import utils
from networks import MODELS
from utils import (DATASETS, DIGITS, EVAL_MODES, FULL_STRATEGY, Diverged, StopRun, UsageError, atomic_json, atomic_save,
                   atomic_write, denormalise, load_pt, remove_stale_temporaries)


# ----------------------------------------------------------------------------------------------------
# Stop signals and the end of a script
# ----------------------------------------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGINT/SIGTERM: exit status 128 + signal number. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` can mistake a stop signal for an error of its own (e.g. a corrupt file)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.code = 128 + signum


def stop_signal(signum, frame):
    raise Interrupted(f'stopped by {signal.Signals(signum).name}', signum)


@contextlib.contextmanager
def stop_signals():
    """SIGINT and SIGTERM raise Interrupted at once, wherever the run is (a batch scheduler kills 30 s
    after SIGTERM); whoever holds a consistent state catches it, saves, and passes it on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, stop_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def keep_freed_memory():
    """Keep freed memory in the process instead of handing large blocks back to the kernel: glibc serves
    every large activation with a fresh mmap whose pages fault in (and are zeroed) on first touch, which
    slows forward passes (docs/speed.md). No effect on other C libraries."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: do not trim the heap's top below 1 GiB


def out_of_memory(e):
    """Whether `e` is an allocator's failure (CUDA's, or the CPU's)."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or isinstance(e, RuntimeError) and any(
        s in str(e) for s in ('DefaultCPUAllocator', 'out of memory', 'Cannot allocate memory'))


def run_script(main):
    """Run a script's main(): bad input, divergence, an allocation failure and stop signals end with one line
    on stderr and their exit status (2, 3, 1, 128 + signal number), without a traceback; what was saved is
    kept. Under torchrun rank 0 says it (the others stop with the same status), and a process that fails or
    stops makes the whole job stop (torchrun stops the others; a collective that waits too long fails)."""
    say = int(os.environ.get('RANK', 0)) == 0
    keep_freed_memory()
    try:
        with stop_signals():
            main()
        if utils.WORLD > 1:  # every process has finished its collectives before any of them tears its connections down
            torch.distributed.barrier()
    except StopRun as e:
        if say:
            print(f'error: {e}', file=sys.stderr)
        sys.exit(e.code)
    except Interrupted as e:
        if say:
            print(f'error: {e}' + ('' if 'resume' in str(e) else '; what was saved is kept')
                  + (' (torchrun stops every process when one fails or is stopped)' if utils.WORLD > 1 else ''),
                  file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        if say:
            print('error: interrupted; what was saved is kept', file=sys.stderr)
        sys.exit(130)
    except (RuntimeError, MemoryError) as e:
        if out_of_memory(e):
            print(f'error: out of memory ({type(e).__name__}); reduce --ipc, --batch_real or --batch_train '
                  '(or use a larger device); what was saved is kept', file=sys.stderr)
            sys.exit(1)
        if utils.WORLD == 1:  # a collective failed: another process died, stopped or timed out
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f'error: process {utils.RANK}: the job stopped: another process failed, stopped or timed out '
              f'({first[:200]})', file=sys.stderr)
        sys.exit(1)
    finally:
        if utils.WORLD > 1 and torch.distributed.is_initialized():
            with contextlib.suppress(RuntimeError):
                torch.distributed.destroy_process_group()
            leaving = sys.exc_info()[1]
            if leaving is None or isinstance(leaving, SystemExit):  # (an unexpected error still shows its traceback)
                # End here: in the interpreter's teardown the C++ destructors of the distributed threads can
                # abort the process ("terminate called without an active exception", seen once on a loaded
                # 2-core machine after the job had finished). Everything is written and synced already.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0 if leaving is None else leaving.code)  # (our exits all give an int status)


# ----------------------------------------------------------------------------------------------------
# Many processes (torchrun): joining, and who writes
# ----------------------------------------------------------------------------------------------------

def init_distributed(device):
    """Started by torchrun (RANK and WORLD_SIZE in the environment), join the process group: NCCL on CUDA
    with one device per local rank, gloo on the CPU; only rank 0 prints logs and progress bars. Returns the
    device to use. Started plainly, nothing changes."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return device
    import datetime
    import torch.distributed as dist
    if torch.device(device).type == 'cuda':
        device = f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}'
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo',
                                timeout=datetime.timedelta(seconds=utils.DIST_TIMEOUT))
    utils.RANK, utils.WORLD = dist.get_rank(), dist.get_world_size()  # (where evaluation reads them)
    if utils.RANK:
        sys.stdout = open(os.devnull, 'w')
        tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)
    return device


def on_main(fn, *args):
    """fn(*args) on rank 0 only (checking and writing files); its result, or the usage error it raised, on
    every process (whose own copy of the error prints nothing: rank 0 says it)."""
    if utils.WORLD == 1:
        return fn(*args)
    out = [None]
    if utils.RANK == 0:
        try:
            out[0] = (fn(*args), None)
        except StopRun as e:
            out[0] = (None, e)
    torch.distributed.broadcast_object_list(out, src=0)
    result, error = out[0]
    if error is not None:
        error.quiet = utils.RANK > 0
        raise error
    return result


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

_UNSET = object()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # every default shown; a default set by a rule says so itself
        if 'default:' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, every default in --help, `args.given` (the flags typed on the
    command line), `args.flags` (every flag's name, and the script's fixed settings: what identifies a run)
    and `unused` flags refused with a reason, instead of silently ignored."""

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


def refuse(args, flags, reason):
    """Bad input: one of `flags` was given although, as `reason` says, it does not apply."""
    for flag in flags:
        if flag in args.given:
            raise UsageError(f'--{flag} {reason}')


def set_dsa(args, augments):
    """args.dsa and args.dsa_strategy. A method that matches with DSA augmentation (`augments`: DSA, DM,
    continual learning) uses the DSA paper's strategy for the dataset unless --dsa_strategy is given; DC
    matches and evaluates without augmentation, so it takes no strategy; the coresets evaluate with DSA
    augmentation when a strategy is named. An explicit --dsa_strategy always wins."""
    if augments and 'dsa_strategy' not in getattr(args, 'given', ()):
        args.dsa_strategy = utils.default_strategy(args.dataset)
    args.dsa = args.dsa_strategy not in utils.NO_STRATEGY
    if args.method == 'DC' and args.dsa:
        raise UsageError('--dsa_strategy goes with --method DSA; DC matches and evaluates without it')
    if args.method == 'DSA' and not args.dsa:
        raise UsageError('--method DSA needs a --dsa_strategy; --method DC works without augmentation')


STRATEGY_RULE = f'default: {FULL_STRATEGY}, without flip for {" and ".join(DIGITS)}'


def get_parser(description, methods=None, omit=(), unused=None, rules=None, **defaults):
    """The flags shared by the condensation scripts (the papers' names); script defaults as keywords,
    `methods`: the choices of --method; `omit`: flags a script does not offer (their defaults stay);
    `unused`: {flag: reason} for flags a script accepts from the papers' command lines but refuses;
    `rules`: {flag: 'default: ...'} for defaults that follow a rule, shown in --help."""
    p = ArgumentParser(description=description, unused=unused)
    rules = rules or {}

    def add(flag, **kw):
        if flag[2:] in omit:
            p.set_defaults(**{flag[2:]: kw.get('default', False)})
        else:
            if flag[2:] in rules:
                kw['help'] += f' ({rules[flag[2:]]})'
            if flag[2:] in p.unused:  # accepted from the papers' command lines, but refused with a reason
                kw['help'] = argparse.SUPPRESS
            p.add_argument(flag, **kw)

    add('--method', type=str, default='DC', choices=methods, help='method name, used in output file names')
    add('--dataset', type=str, default='CIFAR10', choices=[*DATASETS, 'ImageFolder'],
        help='dataset (ImageFolder: your own images in --data_path/train|test/<class>/)')
    add('--model', type=str, default='ConvNet', choices=list(MODELS), metavar='MODEL',
        help='training model: ' + ', '.join(MODELS))
    add('--ipc', type=int, default=1, help='image(s) per class')
    add('--eval_mode', type=str, default='S', choices=EVAL_MODES,
        help='S: the training model (BN as its non-BN twin), SS: itself, M/B/W/D/A/P/N: model pools')
    add('--num_exp', type=int, default=5, help='the number of experiments')
    add('--num_eval', type=int, default=20, help='the number of evaluated randomly initialised models')
    add('--epoch_eval_train', type=int, default=None,
        help='epochs to train an evaluation model (default: 1000 with augmentation, else 300; CAFE 600)')
    add('--Iteration', type=int, default=1000, help='training iterations')
    add('--lr_img', type=float, default=0.1, help='learning rate for the synthetic images')
    add('--lr_net', type=float, default=0.01, help='learning rate for network parameters')
    add('--batch_real', type=int, default=256, help='batch size for real data')
    add('--batch_train', type=int, default=256, help='batch size for training networks')
    add('--init', type=str, default='noise', choices=['noise', 'real'],
        help='initialise the synthetic images from noise or from random real images')
    add('--dsa_strategy', type=str, default='None',
        help='_-separated DSA transformations (color crop cutout flip scale rotate), or None')
    add('--data_path', type=str, default='data', help='dataset path')
    add('--save_path', type=str, default='result', help='path to save results')
    add('--dis_metric', type=str, default='ours', choices=['ours', 'mse', 'cos'], help='gradient distance')
    add('--im_size', type=int, nargs='+', default=None,
        help='image size for --dataset ImageFolder (default: 32x32)')
    add('--seed', type=int, default=0, help='the same seed gives the same synthetic sets')
    add('--device', type=str, default='auto', help='auto (CUDA when present), cpu, cuda or cuda:<i>')
    add('--amp', action='store_true',
        help='bfloat16 autocast for condensation and evaluation (training and testing); the synthetic images, '
             'their gradients, optimiser states and losses stay float32 (off: the papers\' float32 protocol)')
    add('--eval_together', action='store_true',
        help='train the evaluation models of an architecture (up to 10, without BatchNorm) as one batched computation '
             '(torch.func.vmap): for GPUs, which many small models leave idle; slower on the CPU (see README)')
    add('--compile', action='store_true',
        help='torch.compile those forward passes (compiling takes a few seconds to a minute, once)')
    add('--resume', type=str, default='none',
        help="'auto': continue from the newest valid checkpoint in --save_path (if any); or a checkpoint file")
    add('--checkpoint_every', type=int, default=None,
        help='save a checkpoint every N iterations (default: about every 10 minutes), and at each evaluation')
    add('--minutes', type=float, default=None,
        help='condense for this many minutes of iterations (evaluations not counted; a resumed run keeps its clock) '
             'or --Iteration iterations, whichever ends first; the set is then evaluated at iteration 0, at the first '
             'iteration past half the time, and at the end (to compare methods at equal time)')
    add('--snapshots', action='store_true',
        help="also save the synthetic set at every evaluation as res_<run>_exp<e>_iter<it>.pt (the papers' format, "
             'unexpanded; evaluate.py evaluates it); with --num_eval 0 the run saves the sets without evaluating them')
    add('--overwrite', action='store_true',
        help='replace the files of an earlier run of the same name in --save_path (other settings, or unfinished)')
    p.set_defaults(**{'epoch_eval_noaug': 300, **defaults})
    return p


# whole-number flags (of any script) that must be at least 1, or at least 0
POSITIVE = ['ipc', 'num_exp', 'batch_real', 'batch_train', 'epoch_eval_train', 'checkpoint_every',
            'coreset_epochs', 'query', 'window', 'max_outer', 'max_inner', 'steps', 'seeds']
NON_NEGATIVE = ['Iteration', 'seed', 'test_every']


def check_numbers(args):
    """Whole numbers in their ranges, learning rates positive and finite (any flags a script has)."""
    for k in POSITIVE:
        if getattr(args, k, None) is not None and getattr(args, k) < 1:
            raise UsageError(f'--{k} must be at least 1, got {getattr(args, k)}')
    for k in NON_NEGATIVE:
        if getattr(args, k, None) is not None and getattr(args, k) < 0:
            raise UsageError(f'--{k} must be at least 0, got {getattr(args, k)}')
    if getattr(args, 'num_eval', None) is not None and args.num_eval < (0 if getattr(args, 'snapshots', False) else 1):
        raise UsageError(f'--num_eval must be at least 1 (0 with --snapshots), got {args.num_eval}')
    for k in ('lr_img', 'lr_net', 'minutes'):
        if getattr(args, k, None) is not None and not (getattr(args, k) > 0 and math.isfinite(getattr(args, k))):
            raise UsageError(f'--{k} must be a positive number, got {getattr(args, k)}')


def writable_folder(folder, what='--save_path'):
    """Make `folder` if needed and make sure a file can be written there (before hours of work); clean the
    temporaries that a killed run of ours left in it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f'{what} {folder} is a file, not a folder')
    probe = os.path.join(folder, f'.write_test{os.getpid()}')
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f'cannot write to {what} {folder}: {e.strerror}') from None
    remove_stale_temporaries(folder)


def setup(args):
    """Check the arguments and prepare the run: device, save path, augmentation parameters."""
    check_numbers(args)
    if args.im_size is not None:
        if args.dataset != 'ImageFolder':
            h, w = DATASETS[args.dataset][1]
            raise UsageError(f'--im_size is for --dataset ImageFolder; {args.dataset} images are {h}x{w}')
        if len(args.im_size) not in (1, 2) or min(args.im_size) < 8:
            raise UsageError('--im_size takes one or two sizes of at least 8 pixels')
        args.im_size = tuple(args.im_size) * (3 - len(args.im_size))
    utils.check_strategy(args.dsa_strategy)
    if args.eval_mode in 'WDAPN' and not args.model.startswith('ConvNet'):
        raise UsageError(f'--eval_mode {args.eval_mode} compares ConvNet variants; it needs a ConvNet --model, not {args.model}')
    args.device = init_distributed(utils.pick_device(args.device))
    args.dsa_param = utils.ParamDiffAug()
    if args.resume not in ('none', 'auto') and not os.path.isfile(args.resume):
        raise UsageError(f'--resume {args.resume}: no such checkpoint file (use auto to pick the newest)')
    if args.resume != 'none' and args.overwrite:
        raise UsageError('--resume continues a run and --overwrite replaces it: give one of them')
    on_main(writable_folder, args.save_path)
    return args


def load_real(args):
    """Load the dataset onto the device; record its shape, constants and identity in args; the real
    images by class. Refuses a synthetic set that cannot fit beside them."""
    (args.channel, args.im_size, args.num_classes, args.class_names, args.mean, args.std,
     dst_train, dst_test, testloader) = utils.get_dataset(args.dataset, args.data_path, args.im_size, args.device)
    args.data_id = dst_train.fingerprint
    real = utils.ClassImages(dst_train, args.num_classes)
    fewest = min(map(len, real.indices_class))
    if args.init == 'real' and args.ipc > fewest:
        raise UsageError(f'--ipc {args.ipc}: the set starts from real images and the smallest class has {fewest}; '
                         'use at most that')
    check_fits(args)
    return real, testloader


def available_memory(device):
    """Bytes that can still be allocated on `device` (None: unknown)."""
    if torch.device(device).type == 'cuda':
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open('/proc/meminfo') as f:
            return int(next(line for line in f if line.startswith('MemAvailable:')).split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    return None


def check_fits(args, copies=3):
    """Refuse, before any work, a synthetic set whose images (with their gradient and momentum: `copies`)
    cannot fit in the memory left on the device."""
    need = copies * 4 * args.num_classes * args.ipc * args.channel * math.prod(args.im_size)
    free = available_memory(args.device)
    if free is not None and need > free:
        raise UsageError(f'--ipc {args.ipc} needs {need / 2 ** 30:.1f} GiB for the synthetic set of {args.num_classes} '
                         f'classes, more than the {free / 2 ** 30:.1f} GiB free on {args.device}; reduce --ipc')


# ----------------------------------------------------------------------------------------------------
# Run records: names, settings, signatures, ownership of the files
# ----------------------------------------------------------------------------------------------------

def run_name(args):
    return '%s_%s_%s_%dipc' % (args.method, args.dataset, args.model, args.ipc)


def result_path(args, ext='pt'):
    return os.path.join(args.save_path, f'res_{run_name(args)}.{ext}')


def snapshot_path(args, exp, it):
    return os.path.join(args.save_path, f'res_{run_name(args)}_exp{exp}_iter{it}.pt')


def save_result(data, accs_all_exps, args, path, learned=None):
    """Synthetic sets [[images, labels]] and their accuracies in the papers' format, with our settings (and
    what the method learned in the images' place, one dict per set, when it learns no images)."""
    atomic_save({'data': data, 'accs_all_exps': accs_all_exps, 'settings': settings(args),
                 **({'learned': learned} if learned and learned[0] is not None else {})}, path)


def vis_path(args, exp, it):
    return os.path.join(args.save_path, f'vis_{run_name(args)}_exp{exp}_iter{it}.png')


def save_vis(images, args, exp, it):
    """The de-normalised synthetic images, one row per class."""
    from torchvision.utils import save_image  # imported here: torchvision takes seconds to import
    vis = denormalise(images.detach().cpu(), args.mean, args.std)
    atomic_write(vis_path(args, exp, it), lambda tmp: save_image(vis, tmp, nrow=args.ipc, format='png'))


# flags that do not change a run's results, so it may continue with other values
RESUMABLE = {'device', 'data_path', 'save_path', 'resume', 'overwrite', 'checkpoint_every', 'num_exp', 'snapshots'}


def settings(args):
    """The run's settings as plain JSON values (tuples become lists): its flags and what was derived from them."""
    plain = {k: v for k, v in vars(args).items()
             if k not in ('given', 'flags') and isinstance(v, (int, float, str, bool, type(None), list, tuple))}
    return json.loads(json.dumps(plain))


def signature(args):
    """What identifies a run: the flags that change its results (as the script resolved them) and the
    identity of its data. Not the attributes a script derives from them, so that deriving another one
    later keeps the runs and checkpoints made before valid."""
    plain = settings(args)
    flags = getattr(args, 'flags', None) or plain  # (args made by hand, not by our parser: all of them)
    return {k: plain[k] for k in [*flags, 'data_id'] if k in plain and k not in RESUMABLE}


# flags added after runs were recorded without them: the value those runs had, in effect
ADDED_FLAGS = {'minutes': None, 'herding': 'greedy', 'forgetting_score': 'toneva'}


def differences(theirs, ours):
    """The settings of signature `ours` that differ in `theirs`, for a one-line message. Keys only `theirs`
    has (what an older version put in a signature) are not compared; a flag added since `theirs` was
    recorded counts with the value it had in effect then (ADDED_FLAGS)."""
    theirs = {**{k: v for k, v in ADDED_FLAGS.items() if k in ours}, **theirs}
    keys = sorted(k for k in ours if theirs.get(k) != ours[k])
    said = ['other data' if k == 'data_id' else f'--{k} {theirs.get(k)} there, {ours.get(k)} here' for k in keys]
    return ', '.join(said[:4] + ['...'] * (len(said) > 4))


def check_record(path, theirs, ours, what='belongs to a run with other settings', remedy='--overwrite to replace it'):
    """Refuse to write over `path`, whose signature `theirs` (None: not a record of this toolkit) differs from
    this run's `ours`: one line that says what differs and how to go on."""
    if not isinstance(theirs, dict):
        raise UsageError(f'{path} is not a record of this toolkit; use another --save_path, or {remedy}')
    changed = differences(theirs, ours)
    if changed:
        raise UsageError(f'{path} {what} ({changed}); use another --save_path, or {remedy}')


def read_json(path):
    """A JSON file's dict, or None when it is unreadable or not a dict."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def our_run_files(args, checkpoints):
    """This run name's files in the save path: result, record, images, snapshots, checkpoints."""
    vis = re.compile(f'(vis|res)_{re.escape(run_name(args))}_exp' + r'\d+_iter\d+\.(png|pt)')
    return [p for p in (result_path(args), result_path(args, 'json')) if os.path.exists(p)] + checkpoints.paths() \
        + [os.path.join(args.save_path, f) for f in os.listdir(args.save_path) if vis.fullmatch(f)]


def claim(args, checkpoints):
    """Make sure this run may write its files (result, record, images, checkpoints) in --save_path: they
    must not belong to a run with other settings, and a run of this command left unfinished is
    continued (--resume) or replaced (--overwrite), never silently deleted. Records the run as running."""
    record_path, sig = result_path(args, 'json'), checkpoints.signature
    if args.overwrite:
        for p in our_run_files(args, checkpoints):
            os.remove(p)
    record = read_json(record_path) if os.path.exists(record_path) else None
    if os.path.exists(record_path):
        check_record(record_path, record and record.get('signature'), sig)
    elif os.path.exists(result_path(args)):
        raise UsageError(f'{result_path(args)} was not written by a run with these settings (it has no record '
                         'beside it); use another --save_path, or --overwrite to replace it')
    ours = checkpoints.paths()
    for path in ours[:1]:
        with contextlib.suppress(UsageError):  # an unreadable newest checkpoint: --resume auto skips it
            theirs = checkpoints.read(path)['signature']
            check_record(path, theirs, sig)
    if args.resume == 'none' and ours:
        if not record or record.get('status') != 'finished':
            raise UsageError(f'an unfinished run of this command left checkpoints in {args.save_path}: continue it '
                             'with --resume auto, or start afresh with --overwrite')
        for p in ours:  # those of a finished run of this very command, which this one repeats
            os.remove(p)
    atomic_json(dict(record or {}, status='running', protocol=settings(args), signature=sig), record_path)


def record_history(args, history):
    """The accuracies of every evaluation so far, in the run's record (res_<...>.json)."""
    path = result_path(args, 'json')
    with open(path) as f:
        record = json.load(f)
    atomic_json(dict(record, history=history), path)


def summarise(args, accs_all_exps, history=(), pace=None):
    """Print the final mean +- std per evaluation model and write the run's record beside the .pt.

    The record (res_<method>_<dataset>_<model>_<ipc>ipc.json), read by docs/figures.py and evaluate.py:
      status     'running' while the run goes on, 'finished' at its end
      signature  the flags that identify the run (see signature()), data_id among them
      protocol   every setting, derived ones included (channel, im_size, mean, std, ...)
      results    {evaluation model: {mean, std, n, accs}} over all experiments, at the last iteration
      history    [{exp, it, accs: {evaluation model: [accuracies]}}] for every evaluation so far
      pace       per condensation iteration of this process: seconds and the method's statistics
    """
    record = {}
    if pace and pace['iterations']:
        n = pace['iterations']
        record['pace'] = {k: v if k == 'iterations' else round(v / n, 4) for k, v in pace.items()}
        print(f'\n{n} condensation iterations ran in this process; per iteration: '
              + ', '.join(f'{k} {v:.4g}' for k, v in record['pace'].items() if k != 'iterations'))
    print('\n==================== Final Results ====================\n')
    summary = {}
    for key, accs in accs_all_exps.items():
        if not accs:
            print(f'{key}: not evaluated (--num_eval 0)')
            summary[key] = dict(mean=None, std=None, n=0, accs=[])
            continue
        print('Run %d experiments, train on %s, evaluate %d random %s, mean  = %.2f%%  std = %.2f%%'
              % (args.num_exp, args.model, len(accs), key, np.mean(accs) * 100, np.std(accs) * 100))
        summary[key] = dict(mean=float(np.mean(accs)), std=float(np.std(accs)), n=len(accs), accs=list(map(float, accs)))
    atomic_json(dict(status='finished', results=summary, protocol=settings(args), signature=signature(args),
                     history=list(history), **record), result_path(args, 'json'))
    return summary


# ----------------------------------------------------------------------------------------------------
# Checkpoints and locks
# ----------------------------------------------------------------------------------------------------

class Checkpoints:
    """What a run needs to continue after a crash, a pre-emption or a stop signal, saved atomically as
    `checkpoint_<run>_<progress>.pt` in the save path; the newest two are kept."""

    MINUTES = 10  # default interval between checkpoints

    def __init__(self, args, signature):
        self.args, self.signature = args, signature
        self.prefix = os.path.join(args.save_path, f'checkpoint_{run_name(args)}_')
        self.last_path, self.last_time, self.since = None, time.monotonic(), 0

    def paths(self):
        """This run's checkpoint files, newest first."""
        found = [p for p in (os.path.join(self.args.save_path, f) for f in os.listdir(self.args.save_path))
                 if p.startswith(self.prefix) and p.endswith('.pt') and p[len(self.prefix):-3].isdigit()]
        return sorted(found, key=lambda p: int(p[len(self.prefix):-3]), reverse=True)

    def tick(self):
        """One more iteration done since the last checkpoint."""
        self.since += 1

    def due(self):
        """Time for a checkpoint (by rank 0's clock: every process must agree; see Condensation.check)."""
        if self.args.checkpoint_every:
            return self.since >= self.args.checkpoint_every
        return utils.RANK == 0 and time.monotonic() - self.last_time >= 60 * self.MINUTES

    def save(self, exp, it, syn, accs, progress, evaluated=True, finished=None, carried=None):
        """The state at the start of iteration `it` of experiment `exp` (evaluated, or not yet: then with the
        accuracies of the evaluation models already `finished`): every process's classes, and the method's
        state carried across iterations, written by rank 0 (all processes call this)."""
        syn.sync(momentum=True)
        path = f'{self.prefix}{exp * (self.args.Iteration + 1) + it:010d}.pt'
        if utils.RANK == 0:
            extra = {} if carried is None else {'method_state': carried.state_dict()}
            atomic_save(dict(signature=self.signature, exp=exp, it=it, images=syn.images.detach().cpu(),
                             optimizer=syn.optimizer.state_dict(), accs=accs, evaluated=evaluated,
                             history=progress.history, finished={} if evaluated else dict(finished or {}),
                             accs_all_exps=progress.accs_all_exps, data=progress.data, processes=utils.WORLD,
                             clock=progress.clock, learned=progress.learned,
                             **extra), path)
            for p in [p for p in self.paths() if p != path][1:]:  # keep the one before it too
                with contextlib.suppress(OSError):
                    os.remove(p)
        self.last_path, self.last_time, self.since = path, time.monotonic(), 0

    def read(self, path):
        return load_pt(path, {'signature': dict, 'exp': int, 'it': int, 'images': torch.Tensor, 'optimizer': dict,
                              'accs_all_exps': dict, 'data': list})

    def load(self, which):
        """The newest valid checkpoint ('auto') or the given file; a corrupt or truncated one falls back to
        the one before it with a warning. None when there is none."""
        for path in self.paths() if which == 'auto' else [which]:
            try:
                state = self.read(path)
            except UsageError as e:
                if which != 'auto':
                    raise
                tqdm.write(f'warning: skipping {path}: {e}')
                continue
            check_record(path, state['signature'], self.signature, 'was made with other settings',
                         'rerun its command line, or start afresh with --overwrite')
            if state['images'].shape[0] != self.args.num_classes * self.args.ipc:
                raise UsageError(f'{path} holds {state["images"].shape[0]} images, not {self.args.num_classes * self.args.ipc}')
            if state.get('processes', 1) != utils.WORLD:  # every process's classes are in it: any number may go on
                print(f'note: {path} was saved by {state.get("processes", 1)} process(es), this run has {utils.WORLD}; '
                      'it continues from it (the synthetic set does not depend on the number of processes)')
            self.last_path = path
            return state
        return None


@contextlib.contextmanager
def exclusive(path, what):
    """Hold an exclusive lock on `path` (a hidden lock file, removed afterwards) while the block runs: a
    second run writing the same files in the same folder stops at once. The system drops the lock if the
    process dies."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        fcntl = None
    if fcntl is None or utils.RANK > 0:  # (under torchrun rank 0 writes, and holds the lock)
        yield
        return
    with open(path, 'a') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:  # removed by its holder meanwhile
                raise BlockingIOError
        except OSError:
            raise UsageError(f'another run is writing {what} right now; wait for it, or use another --save_path') from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)


# ----------------------------------------------------------------------------------------------------
# The experiment loop
# ----------------------------------------------------------------------------------------------------

def eval_iterations(args, interval):
    """Iterations at which the synthetic set is evaluated: every `interval` in modes S/SS (and always the
    last one), else only the last one."""
    its = set(range(0, args.Iteration + 1, interval)) if args.eval_mode in ('S', 'SS') else set()
    return sorted(its | {args.Iteration})


def new_synset(real, args, keys, init_images=None, classes=None, optimizer=None):
    """A synthetic set initialised (by `init_images(real, args)`, else as --init says) from the random streams
    of `keys`: torch's global generator and each class's own (see ClassImages.start)."""
    utils.set_seed(*keys)
    real.start(*keys, 'init')
    return utils.SynSet(real, args, init_images(real, args) if init_images else None, classes, optimizer)


def step(train_iteration, it, syn, real, args, keys, *carried):
    """Iteration `it` of a method, from the random streams of (*keys, it), under --amp's autocast."""
    utils.set_seed(*keys, it)
    real.start(*keys, it)
    with utils.autocast(args):
        return train_iteration(it, syn, real, args, *carried)


class ModelQueue:
    """Models that train alongside a method's iterations (IDM's queue): each with its optimiser and an
    accuracy meter of the batches it trained on; at most `size`, the oldest dropped. A method's state across
    iterations (see condense's method_state): checkpoints keep it, so --resume continues it exactly."""

    def __init__(self, args, size, optimizer):
        self.args, self.size, self.optimizer = args, size, optimizer  # optimizer(parameters) -> torch optimizer
        self.models, self.optimizers, self.right, self.seen = [], [], [], []

    def __len__(self):
        return len(self.models)

    def push(self):
        """A freshly initialised model (from torch's global generator), with a new optimiser and meter."""
        a = self.args
        self.models.append(utils.get_network(a.model, a.channel, a.num_classes, a.im_size, a.device).train())
        self.optimizers.append(self.optimizer(self.models[-1].parameters()))
        self.right.append(torch.zeros((), dtype=torch.long, device=a.device))
        self.seen.append(0)
        if len(self.models) > self.size:
            for kept in (self.models, self.optimizers, self.right, self.seen):
                kept.pop(0)

    def accuracy(self, i):
        """Model i's accuracy in percent on the batches it trained on since the meters were reset (0 before
        any), as a device tensor: no host sync."""
        return self.right[i] * (100.0 / self.seen[i]) if self.seen[i] else torch.zeros((), device=self.args.device)

    def reset_meters(self):
        self.right = [torch.zeros_like(r) for r in self.right]
        self.seen = [0] * len(self.seen)

    def train_step(self, i, images, labels):
        """One optimiser step of model i on a batch (cross-entropy, train mode); its meter counts the batch."""
        net, optimizer = self.models[i], self.optimizers[i]
        net.train()
        logits = net(images)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.right[i] += (logits.detach().argmax(1) == labels).sum()
        self.seen[i] += len(labels)

    def state_dict(self):
        return dict(models=[m.state_dict() for m in self.models], optimizers=[o.state_dict() for o in self.optimizers],
                    right=[int(r) for r in self.right], seen=list(self.seen))

    def load_state_dict(self, state):
        self.models, self.optimizers, self.right, self.seen = [], [], [], []
        with torch.random.fork_rng(devices=[]):  # (rebuilding draws initial weights, which the state replaces)
            for _ in state['models']:
                self.push()
        for model, optimizer, s, o in zip(self.models, self.optimizers, state['models'], state['optimizers']):
            model.load_state_dict(s)
            optimizer.load_state_dict(o)
        self.right = [torch.tensor(r, device=self.args.device) for r in state['right']]
        self.seen = list(state['seen'])


class Progress:
    """What a run has done: the finished experiments' synthetic sets (`data`) and accuracies, the
    accuracies of every evaluation (`history`), the pace of this process's iterations, and the seconds the
    current experiment's iterations took (`clock`, by rank 0's clock under torchrun; for --minutes)."""

    def __init__(self, model_pool, state=None):
        self.accs_all_exps = state['accs_all_exps'] if state else {m: [] for m in model_pool}
        self.data = state['data'] if state else []
        self.learned = state.get('learned', []) if state else []
        self.history = state.get('history', []) if state else []
        self.pace = {'iterations': 0, 'seconds': 0.0}  # sums over the iterations this process runs
        self.clock = state.get('clock', 0.0) if state else 0.0

    def add_pace(self, stats, seconds):
        for k, v in dict(stats, iterations=1, seconds=seconds).items():
            self.pace[k] = self.pace.get(k, 0) + v


def condense(args, train_iteration, eval_interval, init_images=None, joint_batchnorm=False, method_state=None,
             expand=None, optimizer=None, render=None):
    """The experiment loop of a condensation method.

    For each experiment: a fresh synthetic set (from `init_images(real, args)` when given, else as
    --init says); then for it = 0 .. Iteration-1 the method's `train_iteration(it, syn, real, args)`
    (returns the loss as a float, or a dict of numbers for the progress bar with the loss under 'loss'),
    with the synthetic set evaluated (and drawn) at the evaluation iterations. Each iteration starts from
    random streams seeded by (--seed, experiment, iteration): torch's global generator, and one stream per
    class (real.rng(c), used by real.get_images), so a class's draws do not depend on the others. The
    final synthetic sets and accuracies are saved after every experiment in the papers' format.
    Checkpoints (see Checkpoints) let an interrupted run continue with --resume, giving the same
    synthetic sets as an uninterrupted one.

    `method_state(real, args)`: for a method with state across iterations (e.g. a queue of models), builds
    it at the start of every experiment, after the synthetic set; train_iteration then gets it as a fifth
    argument, and checkpoints keep it (its state_dict() and load_state_dict(), torch.save-able; see ModelQueue).
    `expand(images, labels)`: the set that evaluation models train on, when the stored set is a compact
    encoding of it (IDM's mosaics); the set is saved as it is stored.
    `render(learned, labels, state)`: the images, when what the method learns is not images (IT-GAN's latents
    of a generator, the method's state); the rendered images are drawn, evaluated and saved in the papers'
    format, and what was learned is saved beside them ('learned', with the state's `saved(syn)` if it has one).
    `optimizer(params)`: the optimiser of what is learned (default: SGD, lr_img, momentum 0.5).

    Under torchrun each process moves the synthetic images of its share of the classes (syn.classes) and
    returns its share of the loss; `joint_batchnorm`: the method puts all classes through a BatchNorm
    model as one batch, so with such a model every process does every class (the same work).
    """
    real, testloader = load_real(args)
    loop = Condensation(args, train_iteration, eval_interval, init_images, joint_batchnorm, method_state, expand,
                        optimizer, render)
    checkpoints = loop.checkpoints
    with stop_signals(), exclusive(os.path.join(args.save_path, f'.lock_{run_name(args)}'), result_path(args)):
        on_main(claim, args, checkpoints)
        state = on_main(checkpoints.load, args.resume) if args.resume != 'none' else None
        if state:
            print(f'resuming from {checkpoints.last_path}: experiment {state["exp"]}, iteration {state["it"]}')
        elif args.resume == 'auto':
            print('no checkpoint to resume from: starting afresh')
        progress = Progress(loop.model_pool, state)
        for exp in range(state['exp'] if state else 0, args.num_exp):
            resumed = state if state and exp == state['exp'] else None
            syn, carried = loop.start(exp, real, resumed)
            accs = loop.run(exp, syn, carried, real, testloader, progress, resumed)
            loop.end(syn, carried, accs, progress)
        return on_main(summarise, args, progress.accs_all_exps, progress.history, progress.pace)


NO_SNAPSHOT = object()  # the images moved, with a method's state that has no snapshot to return to


class Condensation:
    """The steps of condense(): what stays the same over a run's experiments, and each experiment's
    start, iterations, evaluations and end."""

    def __init__(self, args, train_iteration, eval_interval, init_images, joint_batchnorm, method_state, expand,
                 optimizer=None, render=None):
        self.args, self.train_iteration, self.init_images, self.method_state = args, train_iteration, init_images, method_state
        self.expand = expand or (lambda images, labels: (images, labels))
        self.optimizer, self.render = optimizer, render
        self.model_pool = utils.get_eval_pool(args.eval_mode, args.model, args.model)
        self.eval_its = eval_iterations(args, eval_interval)
        world = utils.WORLD
        if world > args.num_classes:
            raise UsageError(f'{world} processes for {args.num_classes} classes: use at most one process per class')
        self.joint = joint_batchnorm and utils.has_batchnorm(utils.get_network(args.model, args.channel, 2,
                                                                               args.im_size, 'cpu'))
        print('Hyper-parameters:', {k: v for k, v in settings(args).items() if k != 'class_names'})
        when = (f'at iteration 0, past {args.minutes / 2:g} minutes and at the end' if args.minutes else
                f'at iterations {self.eval_its}')
        print('Evaluation model pool:', self.model_pool, when,
              *([f'| {world} processes, each condensing '
                 f'{"every class (BatchNorm)" if self.joint else "its share of the classes"}'] if world > 1 else []))
        self.checkpoints = Checkpoints(args, signature(args))

    def start(self, exp, real, resumed):
        """The synthetic set of experiment `exp` (and the method's state), new or as a checkpoint left them."""
        args = self.args
        syn = new_synset(real, args, (args.seed, exp), (lambda *_: resumed['images']) if resumed else self.init_images,
                         None if self.joint else utils.shard(args.num_classes), self.optimizer)
        carried = self.method_state(real, args) if self.method_state else None
        if resumed:
            syn.restore((resumed['images'], resumed['optimizer']))
            if carried is not None:
                carried.load_state_dict(resumed['method_state'])
        return syn, carried

    def run(self, exp, syn, carried, real, testloader, progress, resumed):
        """Iterations `start` .. Iteration of experiment `exp`, with the evaluations and checkpoints due.
        Returns the accuracies of the last evaluation."""
        args, checkpoints = self.args, self.checkpoints
        start, accs = (resumed['it'], resumed['accs']) if resumed else (0, None)
        if not resumed:
            progress.clock = 0.0
        bar = tqdm(range(start, args.Iteration + 1), desc=f'exp {exp}', dynamic_ncols=True, initial=start,
                   total=args.Iteration + 1)
        due, seconds = False, 0.0
        for it in bar:
            last = it == args.Iteration or self.out_of_time(progress.clock)
            if resumed and it == start:
                evaluated = resumed.get('evaluated', True) or not (it in self.eval_its or args.minutes)
            elif args.minutes:  # at 0, at the first iteration past half the time, and at the end
                evaluated = not (it == 0 or last or progress.clock - seconds < 30 * args.minutes <= progress.clock)
            else:
                evaluated = it not in self.eval_its
            finished = dict(resumed.get('finished', {})) if resumed and it == start and not evaluated else {}
            before = None  # (the state this iteration starts from, once it moves the images)
            try:
                if not evaluated:
                    accs = self.evaluate(exp, it, syn, carried, testloader, progress, finished)
                    evaluated = True
                    checkpoints.save(exp, it, syn, accs, progress, carried=carried)
                elif due:
                    checkpoints.save(exp, it, syn, accs, progress, carried=carried)
                if last:
                    break
                before = syn.state() if carried is None else NO_SNAPSHOT
                stats, seconds = self.iterate(exp, it, syn, carried, real)
            except Interrupted as stop:
                self.interrupted(stop, exp, it, syn, before, accs, progress, evaluated, finished, carried)
            stats, due, seconds = self.check(exp, it, syn, stats, seconds)
            bar.set_postfix({k: f'{v:.4f}' if k == 'loss' else v for k, v in stats.items()})
            progress.add_pace(stats, seconds)
            progress.clock += seconds
        bar.close()
        return accs

    def stored(self, syn, carried):
        """The set as it is saved: [images, labels, what was learned in their place (or None)]."""
        if self.render is None:
            return [syn.images.detach(), syn.labels, None]
        with torch.no_grad():
            images = self.render(syn.images.detach(), syn.labels, carried)
        learned = dict(learned=syn.images.detach().cpu(), labels=syn.labels.cpu(),
                       **(carried.saved(syn) if hasattr(carried, 'saved') else {}))
        return [images, syn.labels, learned]

    def evaluate(self, exp, it, syn, carried, testloader, progress, finished):
        """Evaluate the synthetic set on the model pool (continuing a stopped evaluation's `finished` models),
        draw it, and record the accuracies."""
        syn.sync()
        if finished:
            tqdm.write(f'continuing the evaluation at iteration {it}: {len(finished)} model(s) done')
        stored = self.stored(syn, carried)
        if self.args.snapshots:
            on_main(save_result, [stored[:2]], {}, self.args, snapshot_path(self.args, exp, it), [stored[2]])
        images, labels = self.expand(*stored[:2])
        accs = utils.evaluate_models(images, labels, self.model_pool, self.args, testloader, (exp, it), finished=finished) \
            if self.args.num_eval else {m: [] for m in self.model_pool}
        progress.history.append(dict(exp=exp, it=it, accs=accs))
        on_main(save_vis, stored[0], self.args, exp, it)
        on_main(record_history, self.args, progress.history)
        return accs

    def iterate(self, exp, it, syn, carried, real):
        """One iteration of the method, from the random streams of (--seed, exp, it). Returns its statistics
        and the seconds it took."""
        started = time.perf_counter()
        stats = step(self.train_iteration, it, syn, real, self.args, (self.args.seed, exp),
                     *([carried] if carried is not None else []))
        self.checkpoints.tick()
        return stats if isinstance(stats, dict) else {'loss': stats}, time.perf_counter() - started

    def check(self, exp, it, syn, stats, seconds):
        """The iteration's loss over all processes, stop if it or the images became non-finite; whether a
        checkpoint is due, and the iteration's seconds (one collective per iteration under torchrun: rank 0's clock)."""
        finite = math.isfinite(stats['loss']) and bool(torch.isfinite(syn.images[syn.of_classes()]).all())
        due = self.checkpoints.due()
        if utils.WORLD > 1:
            shared = utils.all_reduce(torch.tensor([stats['loss'] if syn.sharded else stats['loss'] / utils.WORLD,
                                                    not finite, due, seconds if utils.RANK == 0 else 0.0],
                                                   dtype=torch.float64, device=self.args.device))
            loss, diverged, due, seconds = shared.tolist()
            stats, finite, due = dict(stats, loss=loss), diverged == 0, due > 0
        if not finite:
            raise Diverged(f'the loss or the synthetic images became non-finite at iteration {it} of experiment '
                           f'{exp} (try a smaller --lr_img); last good checkpoint: {self.checkpoints.last_path}')
        return stats, due, seconds

    def out_of_time(self, clock):
        return self.args.minutes is not None and clock >= 60 * self.args.minutes

    def interrupted(self, stop, exp, it, syn, before, accs, progress, evaluated, finished, carried):
        """A stop signal: abandon this iteration, save the state it started from, and stop. Under torchrun
        the processes stop wherever they are (no collective to save with), and a method's state carried
        across iterations has no snapshot to return to: then the last checkpoint is where to continue."""
        if utils.WORLD > 1 or before is NO_SNAPSHOT:
            raise Interrupted(f'{stop} at iteration {it} of experiment {exp}; the last checkpoint is '
                              f'{self.checkpoints.last_path}; continue with --resume auto', stop.code - 128) from None
        if before is not None:
            syn.restore(before)
        self.checkpoints.save(exp, it, syn, accs, progress, evaluated, finished, carried)
        raise Interrupted(f'{stop} at iteration {it} of experiment {exp}; checkpoint {self.checkpoints.last_path}; '
                          'continue with --resume auto', stop.code - 128) from None

    def end(self, syn, carried, accs, progress):
        """The experiment's synthetic set and accuracies join the results, saved in the papers' format."""
        syn.sync()
        for m in self.model_pool:
            progress.accs_all_exps[m] += accs[m]
        images, labels, learned = self.stored(syn, carried)
        progress.data.append([images.cpu(), labels.cpu()])
        if learned is not None:
            progress.learned.append(learned)
        on_main(save_result, progress.data, progress.accs_all_exps, self.args, result_path(self.args), progress.learned)
