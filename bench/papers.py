"""Speed side by side with the papers' own code, on the same arrays, in one run.

    python bench/papers.py --papers /path/to/DatasetCondensation --cafe /path/to/CAFE
    python bench/papers.py --papers ... --only dm_ipc10 --datasets CIFAR10
    python bench/papers.py --idm /path/to/IDM --only idm_ipc10 --datasets CIFAR10
    python bench/papers.py --mtt /path/to/mtt-distillation --only mtt_ipc1 --datasets CIFAR10

For each method and dataset: seconds per iteration here (float32, and with --amp) and in the papers'
code (VICO-UoE/DatasetCondensation for DC, DSA and DM; kaiwang960112/CAFE for CAFE, 3x32x32 only;
uitrbn/IDM's IDM_cifar10.py for IDM, CIFAR-10 only),
measured as the papers' issue did: the time of a whole run of N iterations minus that of a run of 0
(so data loading and the evaluation at iteration 0, identical in both, cancel), each in a fresh process;
ours runs without evaluating (--num_eval 0 --snapshots), since ours would evaluate the N run's last iteration
too, one evaluation more than the papers' code (DC, DSA and DM rows before 0.2.0 were charged it).
Without --papers, --cafe and --idm only our rows run. Every row also gives the iteration's floating-point
operations (counted here with torch.utils.flop_counter) as a fraction of this machine's float32 and
bfloat16 matrix rates, measured in the same process just before it: machines differ and drift, such
fractions and the ratios between rows of one run do not. The papers' code is copied to a temporary folder
and given two mechanical fixes for torch 2.x (`.view(` -> `.reshape(` in networks.py; `x[:] = x[0]` ->
`x[:] = x[0].clone()` in DSA); its get_dataset is replaced by one returning the arrays this code loaded.
Nothing of it is kept.

MTT (--mtt: a checkout of GeorgeCazenavette/mtt-distillation) runs its distill.py and ours main_MTT.py on one
buffer: one expert of 3 epochs made by our buffer.py (first, once per dataset, under --save_path), written again
in the authors' replay_buffer_0.pt layout (trajectory.to_authors_layout); the paper's CIFAR-10 ipc-1 settings
(MTT_SETTINGS: 50 student steps, 2 expert epochs, start epoch 0 or 1), without ZCA, float32. Theirs evaluates once at
iteration 0 in both runs (--eval_it beyond the run, one model of one epoch), which cancels; ours never. The copy of
their code gets a stand-in wandb module (log calls do nothing) and `image_syn.cuda()` -> `image_syn.to(args.device)`
(their image saving at iteration 0, which assumes a GPU) besides the two fixes of the DC code (networks.py's
`.view(`, DSA's in-place copy); their get_dataset returns our arrays, as for IDM. (The
stand-in's init keeps the flags it is given as wandb.config, from which distill.py reads them back.)

IDM (--idm: a checkout of uitrbn/IDM, or its bare git mirror, whose HEAD is then extracted with git
archive) runs as the authors' command.txt runs CIFAR-10 at ipc 10 (IDM_SETTINGS below: --ce_weight 0.5
--lr_img 0.2, batch_real 256, a model added every 30 iterations, 2 models trained 10 steps of 256 real
images each per iteration, DSA with all six transformations, 2x2 mosaics: their --aug, our --factor 2),
in both codes with no evaluation at all: an evaluation interval longer than the run, and ours --num_eval
0 --snapshots (theirs at that interval never evaluates; --num_eval 0 is ours only). Their script runs
Iteration+1 iterations and ours Iteration, so N minus 0 is N iterations in both. The copy of their
code gets these mechanical patches, and nothing else:
- dc_networks.py: `.view(` -> `.reshape(` (as for the DC code);
- dc_utils.py: `theta[:] = theta[0]` -> `theta[:] = theta[0].clone()` in DSA's scale and rotate (torch 2.x
  refuses the overlapping in-place copy);
- IDM_cifar10.py: `from utils import get_dataset as get_dataset_mtt` (MTT's utils.py, which needs kornia
  and torchvision's CIFAR-10 download) -> `from bench_arrays import get_dataset as get_dataset_mtt`, a
  bench_arrays.py written beside it whose get_dataset returns, in MTT's 12-tuple, the arrays this code
  loaded (a training set yielding (image, int label) as torchvision's does, a test set and loader);
- torchnet (for its ClassErrorMeter only) when it is not installed: a torchnet/meter.py written beside
  it with torchnet 0.0.4's ClassErrorMeter (reset, add, value, n; the same numpy arithmetic);
- paths: --data_path and --save_path as for the other rows (their evaluation's ./checkpoints is never
  reached). They have no wandb and need no other change.
"""
import argparse
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import common

HERE = os.path.abspath(__file__)
# name: (script (ours and the papers' alike unless PAPERS_SCRIPT names theirs), its flags (the same names in
# both), ipc, the papers' repository ('dc', 'cafe' or 'idm'), iterations timed)
DSA = ['--method', 'DSA', '--dsa_strategy', 'color_crop_cutout_flip_scale_rotate']
RUNS = {
    'dm_ipc10': ('main_DM.py', [], 10, 'dc', 10),
    'dc_ipc1': ('main.py', ['--method', 'DC'], 1, 'dc', 5),
    'dsa_ipc1': ('main.py', DSA, 1, 'dc', 5),
    'dc_ipc10': ('main.py', ['--method', 'DC'], 10, 'dc', 1),
    'dsa_ipc10': ('main.py', DSA, 10, 'dc', 1),
    'cafe_ipc1': ('distill.py', [], 1, 'cafe', 1),
}
# IDM: the authors' command.txt for CIFAR-10 at ipc 10, flags that both codes take under the same names (their
# defaults and ours alike, stated so that both run them whatever the defaults become); no evaluation in either
IDM_SETTINGS = ['--model', 'ConvNet', '--init', 'real', '--lr_img', '0.2', '--lr_net', '0.01', '--ce_weight', '0.5',
                '--batch_real', '256', '--batch_train', '256', '--net_generate_interval', '30', '--net_num', '100',
                '--model_train_steps', '10', '--fetch_net_num', '2', '--trained_bs', '256',
                '--dsa_strategy', 'color_crop_cutout_flip_scale_rotate', '--eval_interval', '1000000']
RUNS['idm_ipc10'] = ('main_IDM.py', IDM_SETTINGS, 10, 'idm', 3)
# MTT: the paper's CIFAR-10 ipc-1 settings (the flags of both scripts), on a buffer of one expert of 3 epochs
MTT_SETTINGS = ['--model', 'ConvNet', '--syn_steps', '50', '--expert_epochs', '2', '--max_start_epoch', '2',
                '--lr_img', '100', '--lr_lr', '1e-07', '--lr_teacher', '0.01', '--pix_init', 'real',
                '--dsa_strategy', 'color_crop_cutout_flip_scale_rotate']
RUNS['mtt_ipc1'] = ('main_MTT.py', MTT_SETTINGS, 1, 'mtt', 3)
# the papers' script where it is not ours' name, and the flags of command.txt that only it has (after SHARED)
PAPERS_SCRIPT = {'idm': ('IDM_cifar10.py', ['--net_train_real', '--outer_loop', '1', '--mismatch_lambda', '0',
                                            '--net_decay', '--embed_last', '1000', '--syn_ce', '--train_net_num', '1',
                                            '--aug']),
                 'mtt': ('distill.py', ['--eval_it', '1000000', '--num_eval', '1', '--epoch_eval_train', '1'])}
NO_SHARED = ('mtt',)  # the papers' scripts that take none of SHARED nor --save_path (theirs: the flags above only)
# flags that only our script has, after SHARED: no evaluation (IDM: and its mosaics). The papers' DC, DSA and DM
# scripts evaluate at iteration 0 only in runs this short (every 500 / 2000 iterations), so their N and 0 runs
# evaluate once each and the evaluation cancels; ours would also evaluate the last iteration of the N run, an
# evaluation more than theirs: it runs without any
OURS_ONLY = {'dc': ['--num_eval', '0', '--snapshots'], 'idm': ['--factor', '2', '--num_eval', '0', '--snapshots'],
             'mtt': ['--num_eval', '0', '--snapshots']}
PAPERS_DATASETS = {'cafe': ['CIFAR10'], 'idm': ['CIFAR10']}  # the public CAFE and IDM_cifar10.py: CIFAR-10 only
SHARED = ['--num_exp', '1', '--num_eval', '1', '--epoch_eval_train', '1', '--eval_mode', 'SS']

BENCH_ARRAYS = '''\
"""Written by our bench/papers.py: MTT's get_dataset, returning the arrays our code dumped."""
import torch

ARRAYS = None  # set by the bench's worker


class Images(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def get_dataset(dataset, data_path, batch_size=1, subset='imagenette', args=None):
    d = torch.load(ARRAYS)
    train, test = Images(d['x_train'], d['y_train']), Images(d['x_test'], d['y_test'])
    loader = torch.utils.data.DataLoader(test, batch_size=128, shuffle=False, num_workers=0)
    n = d['num_classes']
    return (d['channel'], d['im_size'], n, d['class_names'], d['mean'], d['std'], train, test, loader, None,
            {c: c for c in range(n)}, None)
'''

TORCHNET_METER = '''\
"""Written by our bench/papers.py (torchnet is not installed): torchnet 0.0.4's ClassErrorMeter."""
import numbers

import numpy as np
import torch


class ClassErrorMeter:
    def __init__(self, topk=[1], accuracy=False):
        self.topk = np.sort(topk)
        self.accuracy = accuracy
        self.reset()

    def reset(self):
        self.sum = {v: 0 for v in self.topk}
        self.n = 0

    def add(self, output, target):
        if torch.is_tensor(output):
            output = output.cpu().squeeze().numpy()
        if torch.is_tensor(target):
            target = np.atleast_1d(target.cpu().squeeze().numpy())
        elif isinstance(target, numbers.Number):
            target = np.asarray([target])
        if np.ndim(output) == 1:
            output = output[np.newaxis]
        topk = self.topk
        maxk = int(topk[-1])
        no = output.shape[0]
        pred = torch.from_numpy(output).topk(maxk, 1, True, True)[1].numpy()
        correct = pred == target[:, np.newaxis].repeat(pred.shape[1], 1)
        for k in topk:
            self.sum[k] += no - correct[:, 0:k].sum()
        self.n += no

    def value(self, k=-1):
        if k != -1:
            if self.accuracy:
                return (1. - float(self.sum[k]) / self.n) * 100.0
            return float(self.sum[k]) / self.n * 100.0
        return [self.value(k_) for k_ in self.topk]
'''


WANDB_STANDIN = '''\
"""Written by our bench/papers.py: a stand-in for wandb in MTT's distill.py (its logging does nothing here)."""


class _Config:
    _items = {}


class _Run:
    name = 'bench'


config, run = _Config(), _Run()


def init(*args, config=None, **kwargs):  # (distill.py reads its flags back from wandb.config._items)
    config_items = vars(config) if config is not None else {}
    _Config._items = dict(config_items)
    return run


def log(*args, **kwargs):
    pass


def finish(*args, **kwargs):
    pass


def Histogram(*args, **kwargs):
    return None


def Image(*args, **kwargs):
    return None
'''


def patch_mtt(dst):
    """GeorgeCazenavette/mtt-distillation's code in `dst`, given the patches listed in the module's docstring."""
    path = os.path.join(dst, 'distill.py')
    text = open(path).read()
    if 'image_save = image_syn.cuda()' not in text:
        raise SystemExit('distill.py of --mtt is not the code this bench knows: nothing to patch for image_syn.cuda()')
    open(path, 'w').write(text.replace('image_save = image_syn.cuda()', 'image_save = image_syn.to(args.device)'))
    open(os.path.join(dst, 'wandb.py'), 'w').write(WANDB_STANDIN)
    open(os.path.join(dst, 'bench_arrays.py'), 'w').write(BENCH_ARRAYS)
    return dst


def mtt_buffers(dataset, a):
    """One expert of 3 epochs by our buffer.py (kept under --save_path), and the same expert in the authors' layout:
    (our --buffer_path, theirs)."""
    import torch
    import trajectory
    import utils
    ours, theirs = os.path.join(a.save_path, 'mtt_buffer_ours'), os.path.join(a.save_path, 'mtt_buffer_theirs')
    folder = trajectory.buffer_folder(ours, dataset, 'ConvNet', False)
    if not trajectory.expert_files(folder):
        subprocess.run([sys.executable, os.path.join(common.ROOT, 'buffer.py'), '--dataset', dataset, '--model', 'ConvNet',
                        '--train_epochs', '3', '--num_experts', '1', '--data_path', a.data_path, '--buffer_path', ours],
                       check=True, cwd=common.ROOT)
    _, traj = trajectory.read_expert(trajectory.expert_files(folder)[0])
    c, size, n = utils.DATASETS[dataset][:3]
    net = utils.get_network('ConvNet', c, n, size, 'cpu')
    target = os.path.join(theirs, dataset + ('_NO_ZCA' if dataset in ('CIFAR10', 'CIFAR100') else ''), 'ConvNet')
    os.makedirs(target, exist_ok=True)
    torch.save([trajectory.to_authors_layout(traj, net)], os.path.join(target, 'replay_buffer_0.pt'))
    return ours, theirs


def patched_copy(repo, kind):
    """The papers' code in a temporary folder, with the fixes torch 2.x needs (IDM: see the module's docstring)."""
    dst = f'/tmp/bench_papers_{kind}'  # (the papers' scripts run from there)
    shutil.rmtree(dst, ignore_errors=True)
    if kind == 'idm' and not os.path.exists(os.path.join(repo, 'IDM_cifar10.py')):  # a bare git mirror: its HEAD
        os.makedirs(dst)
        archive = subprocess.run(['git', '--git-dir', repo, 'archive', 'HEAD'], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dst, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
    else:
        shutil.copytree(repo, dst, ignore=shutil.ignore_patterns('.git', 'figs', 'docs'))
    if kind == 'idm':
        return patch_idm(dst)
    for name in ('networks.py', 'utils.py'):  # (DC's and MTT's alike)
        path = os.path.join(dst, name)
        text = open(path).read()
        if name == 'networks.py':
            text = text.replace('.view(', '.reshape(')
        text = re.sub(r'(\w+)\[:\] = \1\[0\]\n', r'\1[:] = \1[0].clone()\n', text)
        open(path, 'w').write(text)
    return patch_mtt(dst) if kind == 'mtt' else dst


def patch_idm(dst):
    """uitrbn/IDM's code in `dst`, given the patches listed in the module's docstring."""
    def edit(name, old, new, pattern=False):
        path = os.path.join(dst, name)
        with open(path, newline='') as f:  # (their files end lines with CRLF: kept as they are)
            text = f.read()
        changed = re.sub(old, new, text) if pattern else text.replace(old, new)
        if changed == text:
            raise SystemExit(f'{name} of --idm is not the code this bench knows: nothing to patch for {old!r}')
        with open(path, 'w', newline='') as f:
            f.write(changed)

    edit('dc_networks.py', '.view(', '.reshape(')
    edit('dc_utils.py', r'(\w+)\[:\] = \1\[0\](\r?\n)', r'\1[:] = \1[0].clone()\2', pattern=True)
    edit('IDM_cifar10.py', 'from utils import get_dataset as get_dataset_mtt',
         'from bench_arrays import get_dataset as get_dataset_mtt')
    open(os.path.join(dst, 'bench_arrays.py'), 'w').write(BENCH_ARRAYS)
    if importlib.util.find_spec('torchnet') is None:
        os.makedirs(os.path.join(dst, 'torchnet'))
        open(os.path.join(dst, 'torchnet', '__init__.py'), 'w').write('from . import meter\n')
        open(os.path.join(dst, 'torchnet', 'meter.py'), 'w').write(TORCHNET_METER)
    return dst


def dump(dataset, data_path):
    """Load `dataset` with this code and keep the normalised arrays for the papers' code."""
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
    rates = common.matrix_rates(a.matrix_size)
    if a.side == 'papers' and a.kind in ('idm', 'mtt'):
        sys.path.insert(0, a.code)
        import bench_arrays
        bench_arrays.ARRAYS = a.arrays
        if a.kind == 'mtt':  # (distill.py imports get_dataset from MTT's utils.py)
            import utils as theirs
            theirs.get_dataset = bench_arrays.get_dataset
    elif a.side == 'papers':
        sys.path.insert(0, a.code)
        import utils as theirs
        d = torch.load(a.arrays)
        train, test = theirs.TensorDataset(d['x_train'], d['y_train']), theirs.TensorDataset(d['x_test'], d['y_test'])
        loader = torch.utils.data.DataLoader(test, batch_size=256, shuffle=False, num_workers=0)
        theirs.get_dataset = lambda *args, **kw: (d['channel'], d['im_size'], d['num_classes'], d['class_names'],
                                                  d['mean'], d['std'], train, test, loader)
    else:
        common.use_code()
    script = common.script_module(a.script)
    sys.argv = [a.script, *shlex.split(a.flags)]
    t = time.perf_counter()
    if a.side == 'papers' and a.kind == 'mtt':  # (main(args) after the parser of its __main__ block)
        import runpy
        runpy.run_path(os.path.join(a.code, a.script), run_name='__main__')
    elif a.side == 'papers':
        script.main()
    else:  # (our scripts' __main__ block: their parser, setup, configure and runs.condense with their method)
        common.condense(script, sys.argv[1:])
    common.emit({'seconds': time.perf_counter() - t, 'rates': rates})


def count_flops(script, flags, ipc, dataset, a):
    """Floating-point operations of one iteration of our `script` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    import runs
    common.use_code()
    args, real, _, _, method, syn = common.setup(dataset, ipc, a, *flags, '--save_path',
                                                 os.path.join(a.save_path, 'flops'), script=script)
    method.start(real)  # (IDM's queue of models)
    with FlopCounterMode(display=False) as counter:
        runs.step(method, 0, syn, real, (args.seed, 0))
    return counter.get_total_flops()


def timed(side, script, flags, iterations, a, code=None, arrays=None, late=(), kind=None):
    """Seconds per iteration: a run of `iterations` minus a run of 0, each in a fresh process; and the matrix
    rates measured before the first. (None, the reason) when a run failed. `late`: flags after SHARED."""
    out = []
    os.makedirs(a.save_path, exist_ok=True)  # (the IDM authors' script makes its save path with os.mkdir)
    for n in (iterations, 0):
        save = os.path.join(a.save_path, f'{side}_{script}_{n}')
        shutil.rmtree(save, ignore_errors=True)
        args = ([*flags, *late, '--Iteration', str(n), '--data_path', a.data_path] if kind in NO_SHARED else
                [*flags, *SHARED, *late, '--Iteration', str(n), '--data_path', a.data_path, '--save_path', save])
        cmd = [sys.executable, HERE, '--worker', '--side', side, '--script', script, f'--flags={shlex.join(args)}',
               '--matrix_size', str(a.matrix_size)]
        if code:
            cmd += ['--code', code, '--arrays', arrays, '--kind', kind]
        row, error = common.run_json(cmd, cwd=code or common.ROOT)
        if error:
            return None, f'{side} failed: {error.splitlines()[-1]}'
        out.append(row)
    return (out[0]['seconds'] - out[1]['seconds']) / iterations, out[0]['rates']


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--papers', help='a checkout of VICO-UoE/DatasetCondensation (DC, DSA, DM)')
    p.add_argument('--cafe', help='a checkout of kaiwang960112/CAFE')
    p.add_argument('--idm', help="a checkout of uitrbn/IDM (or its bare git mirror: its HEAD is extracted)")
    p.add_argument('--mtt', help='a checkout of GeorgeCazenavette/mtt-distillation')
    p.add_argument('--only', nargs='+', choices=list(RUNS), default=list(RUNS))
    common.add_arguments(p)  # (--script_flags: for both sides, whose shared flags have the same names)
    p.add_argument('--iterations', type=int, help='iterations timed in every row (default: as many as each needs)')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    for hidden in ('--side', '--script', '--flags', '--code', '--arrays', '--kind'):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    common.use_code()
    common.prepare_data(a)
    repos = {k: patched_copy(r, k) for k, r in (('dc', a.papers), ('cafe', a.cafe), ('idm', a.idm), ('mtt', a.mtt)) if r}
    for dataset in a.datasets:
        arrays = dump(dataset, a.data_path) if repos else None
        for name in a.only:
            script, ours, ipc, repo, n = RUNS[name]
            n = a.iterations or n
            mine, only_theirs = OURS_ONLY.get(repo, []), []
            if repo == 'mtt':  # (one buffer in both layouts)
                ours_buffer, theirs_buffer = mtt_buffers(dataset, a)
                mine, only_theirs = [*mine, '--buffer_path', ours_buffer], ['--buffer_path', theirs_buffer]
            flops = count_flops(script, [*ours, *(['--buffer_path', ours_buffer] if repo == 'mtt' else [])], ipc, dataset, a)
            flags = ['--dataset', dataset, '--ipc', str(ipc), *ours, *shlex.split(a.script_flags)]
            rows = [('ours, float32', timed('ours', script, flags, n, a, late=mine)),
                    *([] if a.float32_only else [('ours, --amp', timed('ours', script, [*flags, '--amp'], n, a,
                                                                       late=mine))])]
            if repo in repos and dataset in PAPERS_DATASETS.get(repo, [dataset]):
                theirs, only = PAPERS_SCRIPT.get(repo, (script, []))
                rows.append(('papers', timed('papers', theirs, flags, n, a, repos[repo], arrays, late=[*only, *only_theirs],
                                             kind=repo)))
            base = rows[0][1][0]
            for who, (seconds, rates) in rows:
                row = dict(dataset=dataset, what=name, who=who)
                if seconds is None:
                    row['error'] = rates
                else:
                    row.update(seconds=round(seconds, 3), speed_vs_ours_float32=round(base / seconds, 2) if base else None,
                               **common.rate_fields(rates))
                    if flops:
                        share = common.fractions(flops / 1e9, seconds, rates)
                        row.update(GFLOP=round(flops / 1e9, 2), fraction_of_fp32_rate=share['float32'],
                                   fraction_of_bf16_rate=share['bfloat16'])
                common.emit(row)


if __name__ == '__main__':
    main()
