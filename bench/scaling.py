"""Seconds per condensation iteration with 1 and 2 processes (torchrun, gloo, 1 thread each) and with 1
process of 2 threads, and the bytes the processes exchange per iteration, on Fashion-MNIST and CIFAR-10.

    python bench/scaling.py                           # DM ipc 10 and DSA ipc 10, both datasets
    python bench/scaling.py --what dm --datasets CIFAR10 --cifar10 ../shared/datasets/cifar10.tar

CIFAR-10 is read as an image-folder tree: the archive is extracted to <--data_path>/CIFAR10 once. Each
configuration runs in fresh processes (`python bench/scaling.py --worker ...` under torchrun); the
figures are medians over the timed iterations, after one warm-up iteration.
"""
import argparse
import json
import os
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WHAT = {  # script, flags, iterations timed, warm-up iterations before them
    'dm': ('main_DM', ['--ipc', '10'], 5, 1),
    'dsa': ('main', ['--method', 'DSA', '--ipc', '5'], 1, 0),  # 5 outer steps, 4 x 23 inner epochs: a minute
}
CONFIGS = [('1 process, 1 thread', 1, 1), ('2 processes, 1 thread each', 2, 1), ('1 process, 2 threads', 1, 2)]


def worker(a):
    """Inside torchrun (or plainly): time `a.iterations` iterations of the method, count the bytes exchanged."""
    import numpy as np
    import torch
    import utils
    script = __import__(WHAT[a.what][0])
    args = utils.setup(script.parser().parse_args(['--dataset', a.dataset, '--data_path', a.data_path,
                                                    '--save_path', a.save_path, *WHAT[a.what][1]]))
    if args.lr_img is None:
        args.lr_img = 1.0
    utils.set_dsa(args, augments=True)
    args.outer_loop, args.inner_loop = utils.get_loops(args.ipc)
    real, _ = utils.load_real(args)
    utils.set_seed(0)
    syn = utils.SynSet(real, args, classes=utils.shard(args.num_classes))
    times, sent = [], []
    for it in range(a.warmup + a.iterations):
        utils.COMMUNICATED[0] = 0
        if utils.WORLD > 1:
            torch.distributed.barrier()
        t = time.perf_counter()
        utils.set_seed(0, it)
        real.start(0, it)
        script.train_iteration(it, syn, real, args)
        if utils.WORLD > 1:
            torch.distributed.barrier()
        times.append(time.perf_counter() - t)
        sent.append(utils.COMMUNICATED[0])
    if utils.RANK == 0:
        print(json.dumps({'seconds': float(np.median(times[a.warmup:])), 'bytes': int(np.median(sent[a.warmup:]))}),
              file=sys.__stdout__)


def run(what, dataset, processes, threads, a):
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--what', what, '--dataset', dataset,
           '--data_path', a.data_path, '--save_path', a.save_path, '--iterations', str(WHAT[what][2]),
           '--warmup', str(WHAT[what][3])]
    if processes > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(processes), *cmd[1:]]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        sys.exit(f'{" ".join(cmd)} failed:\n{p.stderr[-2000:]}')
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--what', default=None, choices=list(WHAT), help='one method (default: all)')
    p.add_argument('--dataset', help=argparse.SUPPRESS)
    p.add_argument('--iterations', type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument('--warmup', type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument('--datasets', nargs='+', default=['FashionMNIST', 'CIFAR10'], choices=['FashionMNIST', 'CIFAR10'])
    p.add_argument('--cifar10', default=os.path.join(ROOT, '..', 'shared', 'datasets', 'cifar10.tar'),
                   help='the CIFAR-10 image-folder archive')
    p.add_argument('--data_path', default='/tmp/bench_data', help='where the data is (and CIFAR-10 is extracted)')
    p.add_argument('--save_path', default='/tmp/bench_out')
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if 'CIFAR10' in a.datasets and not os.path.isdir(os.path.join(a.data_path, 'CIFAR10', 'train')):
        with tarfile.open(a.cifar10) as tar:
            tar.extractall(os.path.join(a.data_path, 'CIFAR10'))
    for dataset in a.datasets:
        for what in [a.what] if a.what else WHAT:
            rows = {name: run(what, dataset, n, t, a) for name, n, t in CONFIGS}
            base = rows[CONFIGS[0][0]]['seconds']
            for name, r in rows.items():
                print(json.dumps({'dataset': dataset, 'what': f'{what} ipc {WHAT[what][1][-1]}', 'config': name,
                                  'seconds_per_iteration': round(r['seconds'], 3), 'speedup': round(base / r['seconds'], 2),
                                  'MB_exchanged_per_iteration': round(r['bytes'] / 1e6, 3)}), flush=True)


if __name__ == '__main__':
    main()
