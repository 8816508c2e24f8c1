"""The harness: the run's setup, records and ownership, checkpoints, stop signals, and the experiment loop that
calls a method (the command line's flag table is flags.py). Its contract is written down in
docs/architecture.md; it knows no method by name.

A method is a `Method` subclass (one iteration, and whatever else it needs of the protocol below) handed to
`condense(MethodClass, args)`; utils.py holds what a method calls (the papers' API and the science).
"""
import contextlib
import copy
import ctypes
import importlib
import json
import logging
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

# the command line (flags.py), also given to the scripts from here
from flags import (NOT_AN_IDENTITY, STRATEGY_RULE, Flags, get_parser, natural, positive, positive_float,  # noqa: F401
                   refuse, resolve_dsa)
from utils import (DATASETS, DIST_TIMEOUT, ClassImages, DataInfo, Diverged, Group, StopRun, UsageError,
                   all_reduce, atomic_json, atomic_save, atomic_write, autocast, broadcast_shards, check_strategy,
                   evaluate_models, get_dataset, get_eval_pool, get_network, has_batchnorm, load_pt, pick_device,
                   remove_stale_temporaries, say, set_seed, shard)


# ----------------------------------------------------------------------------------------------------
# Stop signals, and the end of a script
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
def stop_signals(handler=stop_signal):
    """SIGINT and SIGTERM raise Interrupted at once, wherever the run is (a batch scheduler kills 30 s
    after SIGTERM); whoever holds a consistent state catches it, saves, and passes it on. (`handler`:
    signal.SIG_IGN while a run ends.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def keep_freed_memory():
    """--keep_memory: keep freed memory in the process instead of handing large blocks back to the kernel:
    glibc serves every large activation with a fresh mmap whose pages fault in (and are zeroed) on first
    touch, which slows forward passes on the CPU (docs/speed.md). No effect on other C libraries."""
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
    kept. Under torchrun the main process says bad input; a stop or a failed collective every process says
    (the main process may be the one that died), and a process that fails or stops stops the whole job.
    Output is flushed and the process group left before the exit."""
    status, line, everyone = 0, None, False  # (everyone: every process says it, not only the main one)
    with stop_signals(signal.SIG_IGN):  # while the run ends, a late stop signal (torchrun stopping the others) is ignored
        try:
            with stop_signals():
                main()
                if Group.current().world > 1:  # every process has finished its collectives before any tears them down
                    torch.distributed.barrier()
        except StopRun as e:
            status, line = e.code, f'error: {e}'
        except Interrupted as e:  # (under torchrun every process says it: the main one may be the process that died)
            group, status = Group.current(), e.code
            everyone = group.world > 1
            line = (f'error: {f"process {group.rank}: " if everyone else ""}{e}'
                    + ('' if 'resume' in str(e) else '; what was saved is kept')
                    + (' (torchrun stops every process when one fails or is stopped)' if everyone else ''))
        except KeyboardInterrupt:
            status, line = 130, 'error: interrupted; what was saved is kept'
        except (RuntimeError, MemoryError) as e:
            group, everyone, status = Group.current(), True, 1
            if out_of_memory(e):
                line = (f'error: out of memory ({type(e).__name__}); reduce --ipc, --batch_real or --batch_train '
                        '(or use a larger device); what was saved is kept')
            elif group.world == 1:
                raise
            else:  # a collective failed: another process died, stopped or timed out
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                line = (f'error: process {group.rank}: the job stopped: another process failed, stopped or timed out '
                        f'({first[:200]})')
        finally:
            if line and (everyone or int(os.environ.get('RANK', 0)) == 0):
                print(line, file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            leave_group()
    sys.exit(status)


# ----------------------------------------------------------------------------------------------------
# Many processes (torchrun), messages and progress
# ----------------------------------------------------------------------------------------------------

def leave_group():
    """Leave torchrun's process group, if any: its gloo threads are joined here, while the interpreter is whole
    (threads that outlive it abort the process at exit: 'terminate called without an active exception').
    torch._dynamo, which the first optimiser imports, keeps references to the process group that exists when
    it is imported, so that destroying the group would not end its threads: init_distributed imports it first."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(RuntimeError):
            torch.distributed.destroy_process_group()


def init_distributed(device):
    """Started by torchrun (RANK and WORLD_SIZE in the environment), join the process group: NCCL on CUDA
    with one device per local rank, gloo on the CPU. Returns the device to use and the Group. Started
    plainly, nothing changes. Only the main process prints messages (set_up_logging)."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        import datetime
        import torch.distributed as dist
        if torch.device(device).type == 'cuda':
            device = f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}'
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            importlib.import_module('torch._dynamo')  # (see leave_group)
            dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo',
                                    timeout=datetime.timedelta(seconds=DIST_TIMEOUT))
    group = Group.current()
    set_up_logging(group)
    return device, group


class _ConsoleHandler(logging.Handler):
    def emit(self, record):  # beside the progress bars, on the stdout of the moment
        tqdm.write(self.format(record))


def set_up_logging(group):
    """Messages (utils.say, logger 'dc') on the console of the main process only."""
    log = logging.getLogger('dc')
    if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        log.addHandler(_ConsoleHandler())
    log.propagate = False
    log.setLevel(logging.INFO if group.main else logging.CRITICAL + 1)


def progress(iterable, group, **kw):
    """A progress bar on the main process; the others iterate silently."""
    return tqdm(iterable, dynamic_ncols=True, disable=not group.main, **kw)


def on_main(group, fn, *args):
    """fn(*args) on the main process only (checking and writing files); its result, or the usage error it
    raised, on every process (whose own copy of the error prints nothing: the main one says it)."""
    if group.world == 1:
        return fn(*args)
    out = [None]
    if group.main:
        try:
            out[0] = (fn(*args), None)
        except StopRun as e:
            out[0] = (None, e)
    torch.distributed.broadcast_object_list(out, src=0)
    result, error = out[0]
    if error is not None:
        raise error
    return result


class Metrics:
    """--log: the run's numbers (iteration statistics, accuracies) as a stream that TensorBoard or wandb
    follows, from the main process. Neither package is installed by default."""

    def __init__(self, kind, folder, name, config, group):
        self.writer = self.run = None
        if kind == 'none' or not group.main:
            return
        try:
            if kind == 'tensorboard':
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(folder, 'tensorboard', name))
            else:
                import wandb
                self.run = wandb.init(project='dataset-condensation', name=name, config=config, reinit=True)
        except ImportError:
            raise UsageError(f'--log {kind} needs the {kind} package: pip install {kind}') from None

    def __call__(self, step, values):
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.run:
            self.run.log(values, step=step)

    def close(self):
        if self.writer:
            self.writer.close()
        if self.run:
            self.run.finish()


def writable_folder(folder, what='--save_path'):
    """Make `folder` if needed and make sure a file can be written there (before hours of work); clean the
    temporaries that a killed process of ours on this machine left in it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f'{what} {folder} is a file, not a folder')
    probe = os.path.join(folder, f'.write_test{os.getpid()}-{os.urandom(4).hex()}')
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, 'w').close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f'cannot write to {what} {folder}: {e.strerror}') from None
    remove_stale_temporaries(folder)


def setup(args):
    """Check the shared flags and prepare the run: the device (joining torchrun's process group), the save path."""
    if getattr(args, 'keep_memory', False):
        keep_freed_memory()
    if getattr(args, 'num_eval', 1) == 0 and not getattr(args, 'snapshots', True):
        raise UsageError('--num_eval must be at least 1 (0 with --snapshots), got 0')
    if getattr(args, 'im_size', None) is not None:
        if args.dataset != 'ImageFolder':
            h, w = DATASETS[args.dataset][1]
            raise UsageError(f'--im_size is for --dataset ImageFolder; {args.dataset} images are {h}x{w}')
        if len(args.im_size) not in (1, 2) or min(args.im_size) < 8:
            raise UsageError('--im_size takes one or two sizes of at least 8 pixels')
        args.im_size = tuple(args.im_size) * (3 - len(args.im_size))
    if hasattr(args, 'dsa_strategy'):
        check_strategy(args.dsa_strategy)
    if getattr(args, 'eval_mode', 'S') in 'WDAPN' and not args.model.startswith('ConvNet'):
        raise UsageError(f'--eval_mode {args.eval_mode} compares ConvNet variants; it needs a ConvNet --model, not {args.model}')
    args.device, group = init_distributed(pick_device(args.device))
    if args.resume not in ('none', 'auto') and not os.path.isfile(args.resume):
        raise UsageError(f'--resume {args.resume}: no such checkpoint file (use auto to pick the newest)')
    if args.resume != 'none' and args.overwrite:
        raise UsageError('--resume continues a run and --overwrite replaces it: give one of them')
    on_main(group, writable_folder, args.save_path)
    return args


def load_real(args):
    """The dataset on the device: the real images by class, the test loader and the DataInfo. Refuses a
    synthetic set that cannot fit beside them."""
    loaded = get_dataset(args.dataset, args.data_path, args.im_size, args.device, getattr(args, 'zca', False))
    data = DataInfo.of(args.dataset, loaded)
    real = ClassImages(loaded[6], data.num_classes)
    fewest = min(map(len, real.indices_class))
    if args.init == 'real' and args.ipc > fewest:
        raise UsageError(f'--ipc {args.ipc}: the set starts from real images and the smallest class has {fewest}; '
                         'use at most that')
    check_fits(args, data)
    return real, loaded[8], data


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


def check_fits(args, data, copies=3):
    """Refuse, before any work, a synthetic set whose images (with their gradient and momentum: `copies`)
    cannot fit in the memory left on the device."""
    need = copies * 4 * data.num_classes * args.ipc * data.channel * math.prod(data.im_size)
    free = available_memory(args.device)
    if free is not None and need > free:
        raise UsageError(f'--ipc {args.ipc} needs {need / 2 ** 30:.1f} GiB for the synthetic set of {data.num_classes} '
                         f'classes, more than the {free / 2 ** 30:.1f} GiB free on {args.device}; reduce --ipc')


# ----------------------------------------------------------------------------------------------------
# Run records: names, settings, identity, ownership of the files
# ----------------------------------------------------------------------------------------------------

def run_name(args):
    return '%s_%s_%s_%dipc' % (args.method, args.dataset, args.model, args.ipc)


def result_path(args, ext='pt'):
    return os.path.join(args.save_path, f'res_{run_name(args)}.{ext}')


def snapshot_path(args, exp, it):
    return os.path.join(args.save_path, f'res_{run_name(args)}_exp{exp}_iter{it}.pt')


def vis_path(args, exp, it):
    return os.path.join(args.save_path, f'vis_{run_name(args)}_exp{exp}_iter{it}.png')


def plain(values):
    """The JSON-able entries of a dict, as JSON values (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in values.items()
                                  if isinstance(v, (int, float, str, bool, type(None), list, tuple))}))


def settings(args, data=None, **extra):
    """What a record says made the run (its 'protocol'): every flag as resolved, what was derived from the
    data, and the method's own settings (`extra`, e.g. its evaluation rule)."""
    flags = plain({k: v for k, v in vars(args).items() if k not in ('given', 'flags')})
    return {**flags, **(data.record() if data else {}), **plain(extra)}


def signature(args, data=None):
    """What identifies a run: the flags that change its results (as the script resolved them) and the
    identity of its data."""
    values = settings(args, data)
    names = getattr(args, 'flags', None) or values  # (args made by hand, not by our parser: all of them)
    return {k: values[k] for k in [*names, 'data_id'] if k in values and k not in NOT_AN_IDENTITY}


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


def save_result(data, accs_all_exps, protocol, path, learned=None):
    """Synthetic sets [[images, labels]] and their accuracies in the papers' format, with the run's settings
    (and what the method learned in the images' place, one dict per set, when it learns no images)."""
    atomic_save({'data': data, 'accs_all_exps': accs_all_exps, 'settings': protocol,
                 **({'learned': learned} if learned and learned[0] is not None else {})}, path)


def save_vis(images, args, data, exp, it):
    """The synthetic images as pixels (de-normalised, or un-whitened), one row per class; one-channel data as an
    8-bit grayscale PNG (a third of the bytes of RGB)."""
    from PIL import Image
    from torchvision.utils import make_grid  # imported here: torchvision takes seconds to import
    grid = make_grid(data.pixels(images.detach().cpu()), nrow=args.ipc).mul(255).add_(0.5).clamp_(0, 255)
    pixels = grid.to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[..., 0] if data.channel == 1 else pixels)
    atomic_write(vis_path(args, exp, it), lambda tmp: picture.save(tmp, format='png'))


class Record:
    """The run's record beside its result (res_<method>_<dataset>_<model>_<ipc>ipc.json), read by
    docs/figures.py and evaluate.py:
      status     'running' while the run goes on, 'finished' at its end
      signature  the flags that identify the run (see signature()), data_id among them
      protocol   every flag as resolved, the data's shape, constants and identity, the method's settings
      results    {evaluation model: {mean, std, n, accs}} over all experiments, at the last iteration
      history    [{exp, it, accs: {evaluation model: [accuracies]}}] for every evaluation so far
      pace       per condensation iteration of this process: seconds and the method's statistics
    Written by the main process only."""

    def __init__(self, args, protocol, signature):
        self.path, self.protocol, self.signature, self.args = result_path(args, 'json'), protocol, signature, args

    def claim(self, checkpoints):
        """Make sure this run may write its files (result, record, images, checkpoints) in --save_path: they
        must not belong to a run with other settings, and a run of this command left unfinished is
        continued (--resume) or replaced (--overwrite), never silently deleted. Records the run as running."""
        args, sig = self.args, self.signature
        if args.overwrite:
            for p in self.files(checkpoints):
                os.remove(p)
        record = read_json(self.path) if os.path.exists(self.path) else None
        if os.path.exists(self.path):
            check_record(self.path, record and record.get('signature'), sig)
        elif os.path.exists(result_path(args)):
            raise UsageError(f'{result_path(args)} was not written by a run with these settings (it has no record '
                             'beside it); use another --save_path, or --overwrite to replace it')
        ours = checkpoints.paths()
        for path in ours[:1]:
            with contextlib.suppress(UsageError):  # an unreadable newest checkpoint: --resume auto skips it
                check_record(path, checkpoints.read(path)['signature'], sig)
        if args.resume == 'none' and ours:
            if not record or record.get('status') != 'finished':
                raise UsageError(f'an unfinished run of this command left checkpoints in {args.save_path}: continue it '
                                 'with --resume auto, or start afresh with --overwrite')
            for p in ours:  # those of a finished run of this very command, which this one repeats
                os.remove(p)
        atomic_json(dict(record or {}, status='running', protocol=self.protocol, signature=sig), self.path)

    def files(self, checkpoints):
        """This run name's files in the save path: result, record, images, snapshots, checkpoints."""
        args = self.args
        vis = re.compile(f'(vis|res)_{re.escape(run_name(args))}_exp' + r'\d+_iter\d+\.(png|pt)')
        return [p for p in (result_path(args), self.path) if os.path.exists(p)] + checkpoints.paths() \
            + [os.path.join(args.save_path, f) for f in os.listdir(args.save_path) if vis.fullmatch(f)]

    def history(self, history):
        """The accuracies of every evaluation so far."""
        with open(self.path) as f:
            record = json.load(f)
        atomic_json(dict(record, history=history), self.path)

    def finish(self, accs_all_exps, history=(), pace=None, num_exp=1, learned=()):
        """Print the final mean +- std per evaluation model and write the finished record (with what each set
        keeps beside its images, e.g. a learned step size: `learned`)."""
        record = {}
        if pace and pace['iterations']:
            n = pace['iterations']
            record['pace'] = {k: v if k == 'iterations' else round(v / n, 4) for k, v in pace.items()}
            say(f'\n{n} condensation iterations ran in this process; per iteration: '
                + ', '.join(f'{k} {v:.4g}' for k, v in record['pace'].items() if k != 'iterations'))
        say('\n==================== Final Results ====================\n')
        summary = {}
        for key, accs in accs_all_exps.items():
            if not accs:
                say(f'{key}: not evaluated (--num_eval 0)')
                summary[key] = dict(mean=None, std=None, n=0, accs=[])
                continue
            say('Run %d experiments, train on %s, evaluate %d random %s, mean  = %.2f%%  std = %.2f%%'
                % (num_exp, self.args.model, len(accs), key, np.mean(accs) * 100, np.std(accs) * 100))
            summary[key] = dict(mean=float(np.mean(accs)), std=float(np.std(accs)), n=len(accs), accs=list(map(float, accs)))
        learned = [plain(d) for d in learned if isinstance(d, dict)]  # (its plain values: no tensors)
        atomic_json(dict(status='finished', results=summary, protocol=self.protocol, signature=self.signature,
                         history=list(history), **record, **({'learned': learned} if any(learned) else {})), self.path)
        return summary


# ----------------------------------------------------------------------------------------------------
# Checkpoints and locks: the one primitive every long loop saves and resumes with
# ----------------------------------------------------------------------------------------------------

class Checkpoints:
    """What a long loop needs to continue after a crash, a pre-emption or a stop signal, saved atomically by
    the main process as `<prefix><progress>.pt` (progress: a whole number that grows with the work done);
    the newest `keep` are kept. Every state holds the run's `signature`: one made with other settings is
    refused. due(): every `every` ticks, or about every MINUTES minutes by the main process's clock."""

    MINUTES = 10  # default interval between checkpoints

    def __init__(self, prefix, signature, group, every=None, keep=2, expected=None):
        self.prefix, self.signature, self.group, self.every, self.keep = prefix, signature, group, every, keep
        self.expected = {'signature': dict, **(expected or {})}
        self.last_path, self.last_time, self.since = None, time.monotonic(), 0

    def paths(self):
        """The checkpoint files, newest first."""
        folder, stem = os.path.split(self.prefix)
        found = [os.path.join(folder, f) for f in os.listdir(folder or '.')
                 if f.startswith(stem) and f.endswith('.pt') and f[len(stem):-3].isdigit()]
        return sorted(found, key=lambda p: int(p[len(self.prefix):-3]), reverse=True)

    def tick(self):
        """One more unit of work done since the last checkpoint."""
        self.since += 1

    def due(self):
        """Time for a checkpoint (by the main process's clock: under torchrun every process must agree, so the
        caller shares the answer)."""
        if self.every:
            return self.since >= self.every
        return self.group.main and time.monotonic() - self.last_time >= 60 * self.MINUTES

    def save(self, progress, state):
        """`state` (a dict of plain data and tensors) as the checkpoint at `progress`, with the signature."""
        path = f'{self.prefix}{progress:010d}.pt'
        if self.group.main:
            atomic_save(dict(state, signature=self.signature), path)
            for p in [p for p in self.paths() if p != path][self.keep - 1:]:
                with contextlib.suppress(OSError):
                    os.remove(p)
        self.last_path, self.last_time, self.since = path, time.monotonic(), 0

    def read(self, path):
        return load_pt(path, self.expected)

    def load(self, which):
        """The newest valid checkpoint ('auto') or the given file; a corrupt or truncated one falls back to
        the one before it with a warning. None when there is none."""
        for path in self.paths() if which == 'auto' else [which]:
            try:
                state = self.read(path)
            except UsageError as e:
                if which != 'auto':
                    raise
                say(f'warning: skipping {path}: {e}')
                continue
            check_record(path, state['signature'], self.signature, 'was made with other settings',
                         'rerun its command line, or start afresh with --overwrite')
            self.last_path = path
            return state
        return None


@contextlib.contextmanager
def exclusive(path, what, group):
    """Hold an exclusive lock on `path` (a hidden lock file, removed afterwards) while the block runs: a
    second run writing the same files in the same folder stops at once. The system drops the lock if the
    process dies."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        fcntl = None
    if fcntl is None or not group.main:  # (under torchrun the main process writes, and holds the lock)
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
# The method protocol
# ----------------------------------------------------------------------------------------------------

class Method:
    """A condensation method as the harness calls it (docs/architecture.md). A subclass gives `iteration`;
    the rest has defaults. Built once per run with the frozen flags and the DataInfo:

      init_images(real)        the first synthetic set (None: as --init says)
      optimizer(params)        what moves the learned tensors (default SGD, --lr_img, momentum 0.5)
      start(real)              each experiment, after the synthetic set is made: state across iterations
      iteration(it, syn, real) one iteration; returns the loss, or a dict of numbers with the loss under 'loss'
      state_dict() / load_state_dict(state)   the state across iterations (checkpoints keep it)
      training_set(images, labels)            what evaluation models train on (IDM: the expanded mosaics)
      render(learned, labels)  the images, when what is learned is not images (IT-GAN's latents); else None
      saved(syn)               what is saved with the set (a dict: 'learned' in the .pt; e.g. a learned rate)
      evaluation()             the evaluation's settings that the method learned (a dict of flags: {'lr_net': ...})
      record(), identity()     what the method adds to the record's protocol, and to the run's identity (dicts)
    and its class attributes: eval_interval (evaluations every so many iterations in modes S/SS),
    noaug_epochs (the evaluation rule's epochs without augmentation, utils.evaluation_args), joint_batchnorm
    (all classes through a BatchNorm model as one batch: every process does every class), stateful (state
    across iterations: a stop then resumes from the last checkpoint instead of the stopped iteration)."""
    eval_interval = 500
    noaug_epochs = 300
    joint_batchnorm = False
    stateful = False

    def __init__(self, args, data):
        self.args, self.data = args, data

    def init_images(self, real):
        return None

    def optimizer(self, params):
        return torch.optim.SGD(params, lr=self.args.lr_img, momentum=0.5)

    def start(self, real):
        pass

    def iteration(self, it, syn, real):
        raise NotImplementedError

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def training_set(self, images, labels):
        return images, labels

    def render(self, learned, labels):
        return None

    def saved(self, syn):
        return {}

    def evaluation(self):
        return {}

    def record(self):
        return {}

    def identity(self):
        return {}

    def network(self, model=None, num_classes=None):
        """A freshly initialised network of --model (or `model`) for this data, on the run's device."""
        d = self.data
        return get_network(model or self.args.model, d.channel, num_classes or d.num_classes, d.im_size, self.args.device)


class SynSet:
    """The synthetic set: num_classes x ipc images (labels [0]*ipc + [1]*ipc + ...) and their optimiser (SGD lr_img,
    momentum 0.5, or `optimizer([tensor])`), from --init or the given `images` (or what a method learns in their
    place, one row per image). `classes`: those this process moves (torchrun; sync() shares them)."""

    def __init__(self, real, args, data, images=None, classes=None, optimizer=None):
        C, ipc = data.num_classes, args.ipc
        self.ipc, self.num_classes = ipc, C
        self.classes = list(range(C) if classes is None else classes)
        if images is not None:
            self.images = images.detach().clone().to(args.device)
        elif args.init == 'real':
            self.images = torch.cat([real.get_images(c, ipc) for c in range(C)])
        else:
            self.images = torch.randn(C * ipc, data.channel, *data.im_size, device=args.device)
        self.images.requires_grad_(True)
        self.labels = torch.arange(C, device=args.device).repeat_interleave(ipc)
        self.optimizer = (optimizer or (lambda p: torch.optim.SGD(p, lr=args.lr_img, momentum=0.5)))([self.images])

    def of_class(self, c):
        return self.images[c * self.ipc:(c + 1) * self.ipc]

    def of_classes(self):
        """The rows of this process's classes."""
        return slice(self.classes[0] * self.ipc, (self.classes[-1] + 1) * self.ipc)

    def step(self, loss):
        """One optimiser step of the images on loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @property
    def sharded(self):
        return len(self.classes) < self.num_classes

    def sync(self, momentum=False):
        """Every process's classes' images (and with `momentum` the optimiser's state of them) to every process:
        where the method needs the whole set (training a network on it, evaluating it, saving it)."""
        if self.sharded:
            broadcast_shards(self.images, self.num_classes)
            for t in self.optimizer.state[self.images].values() if momentum else ():
                if torch.is_tensor(t) and t.shape == self.images.shape:  # (SGD's momentum, Adam's moments)
                    broadcast_shards(t, self.num_classes)

    def state(self):
        """A copy of the images and the optimiser's state (for restore)."""
        return self.images.detach().clone(), copy.deepcopy(self.optimizer.state_dict())

    def restore(self, state):
        with torch.no_grad():
            self.images.copy_(state[0])
        self.optimizer.load_state_dict(state[1])


def new_synset(real, method, keys, classes=None, images=None):
    """A synthetic set initialised from the random streams of `keys` (torch's global generator and each class's
    own, see ClassImages.start): `images`, or the method's init_images(real), or as --init says."""
    set_seed(*keys)
    real.start(*keys, 'init')
    if images is None:
        images = method.init_images(real)
    return SynSet(real, method.args, method.data, images, classes, method.optimizer)


def step(method, it, syn, real, keys):
    """Iteration `it` of a method, from the random streams of (*keys, it), under --amp's autocast."""
    set_seed(*keys, it)
    real.start(*keys, it)
    with autocast(method.args):
        return method.iteration(it, syn, real)


# ----------------------------------------------------------------------------------------------------
# The experiment loop
# ----------------------------------------------------------------------------------------------------

def condense(method_class, args):
    """A run of a condensation method: for each experiment a fresh synthetic set and `Iteration` iterations of
    the method, evaluated at the evaluation iterations; the results saved in the papers' format after every
    experiment. Each iteration starts from random streams seeded by (--seed, experiment, iteration): torch's
    global generator, and one stream per class (real.rng(c)). Checkpoints let an interrupted run continue with
    --resume, giving the same synthetic sets as an uninterrupted one. Returns the final summary."""
    args = Flags.freeze(args)
    group = Group.current()
    real, testloader, data = load_real(args)
    run = Run(args, data, method_class(args, data), group, testloader)
    with stop_signals(), exclusive(os.path.join(args.save_path, f'.lock_{run_name(args)}'), result_path(args), group):
        on_main(group, run.record.claim, run.checkpoints)
        state = on_main(group, run.checkpoints.load, args.resume) if args.resume != 'none' else None
        if state:
            run.check_checkpoint(state)
            say(f'resuming from {run.checkpoints.last_path}: experiment {state["exp"]}, iteration {state["it"]}')
        elif args.resume == 'auto':
            say('no checkpoint to resume from: starting afresh')
        results = Results(run.model_pool, state)
        try:
            for exp in range(state['exp'] if state else 0, args.num_exp):
                Experiment(run, exp, real, results, state if state and exp == state['exp'] else None).execute()
        finally:
            run.metrics.close()
        return on_main(group, run.record.finish, results.accs_all_exps, results.history, results.pace, args.num_exp,
                       results.learned)


class Run:
    """What stays the same over a run's experiments: the flags, the data, the method, the process group, the
    evaluation pool and iterations, the record, the checkpoints and the metrics stream."""

    def __init__(self, args, data, method, group, testloader):
        self.args, self.data, self.method, self.group, self.testloader = args, data, method, group, testloader
        self.model_pool = get_eval_pool(args.eval_mode, args.model, args.model)
        if group.world > data.num_classes:
            raise UsageError(f'{group.world} processes for {data.num_classes} classes: use at most one process per class')
        self.joint = method.joint_batchnorm and has_batchnorm(get_network(args.model, data.channel, 2, data.im_size, 'cpu'))
        self.classes = None if self.joint else shard(data.num_classes, group)
        interval = method.eval_interval
        self.eval_its = sorted(set(range(0, args.Iteration + 1, interval) if args.eval_mode in ('S', 'SS') else ())
                               | {args.Iteration})
        self.protocol = settings(args, data, **{'epoch_eval_noaug': method.noaug_epochs, **method.record(), **method.identity()})
        self.record = Record(args, self.protocol, {**signature(args, data), **method.identity()})
        self.checkpoints = Checkpoints(os.path.join(args.save_path, f'checkpoint_{run_name(args)}_'), self.record.signature,
                                       group, args.checkpoint_every, expected={
                                           'exp': int, 'it': int, 'images': torch.Tensor, 'optimizer': dict,
                                           'accs_all_exps': dict, 'data': list})
        self.metrics = Metrics(args.log, args.save_path, run_name(args), self.protocol, group)
        say(f'Hyper-parameters: { {k: v for k, v in self.protocol.items() if k != "class_names"} }')
        when = (f'at iteration 0, past {args.minutes / 2:g} minutes and at the end' if args.minutes else
                f'at iterations {self.eval_its}')
        say(' '.join(['Evaluation model pool:', str(self.model_pool), when,
                      *([f'| {group.world} processes, each condensing '
                         f'{"every class (BatchNorm)" if self.joint else "its share of the classes"}'] if group.world > 1 else [])]))

    def check_checkpoint(self, state):
        args, data = self.args, self.data
        if state['images'].shape[0] != data.num_classes * args.ipc:
            raise UsageError(f'{self.checkpoints.last_path} holds {state["images"].shape[0]} images, not '
                             f'{data.num_classes * args.ipc}')
        if state.get('processes', 1) != self.group.world:  # every process's classes are in it: any number may go on
            say(f'note: {self.checkpoints.last_path} was saved by {state.get("processes", 1)} process(es), this run has '
                f'{self.group.world}; it continues from it (the synthetic set does not depend on the number of processes)')


class Results:
    """What a run has done: the finished experiments' synthetic sets (`data`, and what was `learned` in their
    place) and accuracies, the accuracies of every evaluation (`history`), the pace of this process's
    iterations, and the seconds the current experiment's iterations took (`clock`, by the main process's clock
    under torchrun; for --minutes)."""

    def __init__(self, model_pool, state=None):
        state = state or {}
        self.accs_all_exps = state.get('accs_all_exps') or {m: [] for m in model_pool}
        self.data = state.get('data', [])
        self.learned = state.get('learned', [])
        self.history = state.get('history', [])
        self.clock = state.get('clock', 0.0)
        self.pace = {'iterations': 0, 'seconds': 0.0}  # sums over the iterations this process runs

    def add_pace(self, stats, seconds):
        for k, v in dict(stats, iterations=1, seconds=seconds).items():
            self.pace[k] = self.pace.get(k, 0) + v


NO_SNAPSHOT = object()  # the set moved, with a method's state that has no snapshot to return to


class Experiment:
    """One experiment: a synthetic set and its iterations, evaluations and checkpoints, from iteration 0 or
    from where a checkpoint left it. The decisions of the loop are the predicates evaluation_due,
    checkpoint_due and finished."""

    def __init__(self, run, exp, real, results, resumed=None):
        self.run, self.args, self.method, self.exp, self.real, self.results = run, run.args, run.method, exp, real, results
        self.syn = new_synset(real, run.method, (self.args.seed, exp), run.classes,
                              resumed['images'] if resumed else None)
        run.method.start(real)
        self.it, self.accs = (resumed['it'], resumed['accs']) if resumed else (0, None)
        if resumed:
            self.syn.restore((resumed['images'], resumed['optimizer']))
            if 'method_state' in resumed:
                run.method.load_state_dict(resumed['method_state'])
        else:
            results.clock = 0.0
        unevaluated = bool(resumed) and not resumed.get('evaluated', True)  # stopped during the evaluation at it
        self.evaluated_at = None if unevaluated or not resumed else self.it  # the iteration whose evaluation is done
        self.resumed_evaluation = unevaluated
        self.finished_models = dict(resumed.get('finished', {})) if unevaluated else {}  # of a stopped evaluation
        self.checkpoint_requested = False  # by the last iteration's check
        self.seconds = 0.0  # the last iteration's

    # the decisions
    def evaluation_due(self):
        """Not yet evaluated at this iteration, and an evaluation iteration (with --minutes: the first, the first
        past half the time, the last) or a stopped evaluation to continue."""
        if self.evaluated_at == self.it:
            return False
        if self.resumed_evaluation:
            return True
        if self.args.minutes:
            half = 30 * self.args.minutes
            return self.it == 0 or self.finished() or self.results.clock - self.seconds < half <= self.results.clock
        return self.it in self.run.eval_its

    def checkpoint_due(self):
        return self.checkpoint_requested

    def finished(self):
        """At the last iteration, or out of --minutes."""
        return self.it == self.args.Iteration or (self.args.minutes is not None
                                                  and self.results.clock >= 60 * self.args.minutes)

    # the loop
    def execute(self):
        """Iterations from the current one to the last, with the evaluations and checkpoints due; the experiment's
        set and accuracies join the results at the end."""
        args = self.args
        bar = progress(range(self.it, args.Iteration + 1), self.run.group, desc=f'exp {self.exp}', initial=self.it,
                       total=args.Iteration + 1)
        for self.it in bar:
            before = None  # the state this iteration starts from, once it moves the set
            try:
                if self.evaluation_due():
                    self.evaluate()
                    self.save_checkpoint()
                elif self.checkpoint_due():
                    self.save_checkpoint()
                if self.finished():
                    break
                before = self.snapshot()
                stats = self.iterate()
            except Interrupted as stop:
                self.stopped(stop, before)
            bar.set_postfix({k: f'{v:.4f}' if k == 'loss' else v for k, v in stats.items()})
        bar.close()
        self.end()

    def snapshot(self):
        """The state to return to if this iteration is stopped: the set and its optimiser (NO_SNAPSHOT for a
        method with state across iterations: it returns to the last checkpoint)."""
        return NO_SNAPSHOT if self.method.stateful else self.syn.state()

    def iterate(self):
        """One iteration of the method, from the random streams of (--seed, exp, it); then the checks that
        every process shares (one collective under torchrun): a finite loss and set, a checkpoint request,
        the iteration's seconds (the main process's clock)."""
        started = time.perf_counter()
        stats = step(self.method, self.it, self.syn, self.real, (self.args.seed, self.exp))
        self.run.checkpoints.tick()
        stats = stats if isinstance(stats, dict) else {'loss': stats}
        seconds = time.perf_counter() - started
        syn, group = self.syn, self.run.group
        finite = math.isfinite(stats['loss']) and bool(torch.isfinite(syn.images[syn.of_classes()]).all())
        due = self.run.checkpoints.due()
        if group.world > 1:
            shared = all_reduce(torch.tensor([stats['loss'] if syn.sharded else stats['loss'] / group.world,
                                              not finite, due, seconds if group.main else 0.0],
                                             dtype=torch.float64, device=self.args.device))
            loss, diverged, due, seconds = shared.tolist()
            stats, finite, due = dict(stats, loss=loss), diverged == 0, due > 0
        if not finite:
            raise Diverged(f'the loss or the synthetic images became non-finite at iteration {self.it} of experiment '
                           f'{self.exp} (try a smaller --lr_img); last good checkpoint: {self.run.checkpoints.last_path}')
        self.checkpoint_requested, self.seconds = due, seconds
        self.results.add_pace(stats, seconds)
        self.results.clock += seconds
        self.run.metrics(self.exp * (self.args.Iteration + 1) + self.it, stats)
        return stats

    def stored(self):
        """The set as it is saved: [images, labels, what was learned in their place (or None)]."""
        syn, method = self.syn, self.method
        with torch.no_grad():
            images = method.render(syn.images.detach(), syn.labels)
        if images is None:
            return [syn.images.detach(), syn.labels, method.saved(syn) or None]
        learned = dict(learned=syn.images.detach().cpu(), labels=syn.labels.cpu(), **method.saved(syn))
        return [images, syn.labels, learned]

    def evaluate(self):
        """Evaluate the set on the model pool (continuing a stopped evaluation's finished models), draw it,
        and record the accuracies."""
        run, args, it = self.run, self.args, self.it
        self.syn.sync()
        if self.finished_models:
            say(f'continuing the evaluation at iteration {it}: {len(self.finished_models)} model(s) done')
        stored = self.stored()
        if args.snapshots:
            on_main(run.group, save_result, [stored[:2]], {}, run.protocol, snapshot_path(args, self.exp, it), [stored[2]])
        images, labels = self.method.training_set(*stored[:2])
        learned = self.method.evaluation()  # (e.g. MTT's learned step size as the evaluation's lr_net)
        self.accs = evaluate_models(images, labels, run.model_pool, args.replace(**learned) if learned else args,
                                    run.testloader, run.data, (self.exp, it), self.method.noaug_epochs, run.group,
                                    finished=self.finished_models) \
            if args.num_eval else {m: [] for m in run.model_pool}
        self.evaluated_at, self.resumed_evaluation, self.finished_models = it, False, {}
        self.results.history.append(dict(exp=self.exp, it=it, accs=self.accs))
        run.metrics(self.exp * (args.Iteration + 1) + it, {f'accuracy/{m}': float(np.mean(a))
                                                           for m, a in self.accs.items() if a})
        on_main(run.group, save_vis, stored[0], args, run.data, self.exp, it)
        on_main(run.group, run.record.history, self.results.history)

    def save_checkpoint(self):
        """The state at the start of this iteration (evaluated, or not yet: then with the models of the stopped
        evaluation that finished): every process's classes and the method's state, written by the main process
        (every process calls this)."""
        syn, results = self.syn, self.results
        syn.sync(momentum=True)
        evaluated = not self.evaluation_due()
        state = dict(exp=self.exp, it=self.it, images=syn.images.detach().cpu(), optimizer=syn.optimizer.state_dict(),
                     accs=self.accs, evaluated=evaluated, finished={} if evaluated else dict(self.finished_models),
                     history=results.history, accs_all_exps=results.accs_all_exps, data=results.data,
                     processes=self.run.group.world, clock=results.clock, learned=results.learned)
        if self.method.stateful:
            state['method_state'] = self.method.state_dict()
        self.run.checkpoints.save(self.exp * (self.args.Iteration + 1) + self.it, state)

    def stopped(self, stop, before):
        """A stop signal: abandon this iteration, save the state it started from, and stop. Under torchrun the
        processes stop wherever they are (no collective to save with), and a method with state across
        iterations has no snapshot to return to: then the last checkpoint is where to continue."""
        where = f'{stop} at iteration {self.it} of experiment {self.exp}'
        if self.run.group.world > 1 or before is NO_SNAPSHOT:
            raise Interrupted(f'{where}; the last checkpoint is {self.run.checkpoints.last_path}; '
                              'continue with --resume auto', stop.code - 128) from None
        if before is not None:
            self.syn.restore(before)
        self.save_checkpoint()
        raise Interrupted(f'{where}; checkpoint {self.run.checkpoints.last_path}; continue with --resume auto',
                          stop.code - 128) from None

    def end(self):
        """The experiment's synthetic set and accuracies join the results, saved in the papers' format."""
        run, results = self.run, self.results
        self.syn.sync()
        for m in run.model_pool:
            results.accs_all_exps[m] += self.accs[m]
        images, labels, learned = self.stored()
        results.data.append([images.cpu(), labels.cpu()])
        if learned is not None:
            results.learned.append(learned)
        on_main(run.group, save_result, results.data, results.accs_all_exps, run.protocol, result_path(self.args),
                results.learned)
