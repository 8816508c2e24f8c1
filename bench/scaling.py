"""Seconds per condensation iteration with 1 and 2 processes (torchrun, gloo, 1 thread each) and with 1
process of 2 threads, and the bytes the processes exchange per iteration, on Fashion-MNIST and CIFAR-10.

    python bench/scaling.py                           # DM ipc 10 and DSA ipc 5, both datasets
    python bench/scaling.py --what dm --datasets CIFAR10 --cifar10 ../shared/datasets/cifar10.tar

CIFAR-10 is read as an image-folder tree: the archive is extracted to <--data_path>/CIFAR10 once. Each
configuration runs in fresh processes (`python bench/scaling.py --worker ...` under torchrun); the
figures are medians over the timed iterations (--iterations), after the warm-up ones (--warmup).
"""
import argparse
import os
import sys
import time

import common

WHAT = {  # script, ipc, flags, iterations timed, warm-up iterations before them
    'dm': ('main_DM', 10, [], 5, 1),
    'dsa': ('main', 5, ['--method', 'DSA'], 1, 0),  # 5 outer steps, 4 x 23 inner epochs: a minute
}
CONFIGS = [('1 process, 1 thread', 1, 1), ('2 processes, 1 thread each', 2, 1), ('1 process, 2 threads', 1, 2)]


def worker(a):
    """Inside torchrun (or plainly): time `a.iterations` iterations of the method, count the bytes exchanged."""
    import numpy as np
    import torch
    common.use_code()
    import runs
    import utils
    script, ipc, flags, *_ = WHAT[a.what]
    args, real, _, _, method, syn = common.setup(a.dataset, ipc, a, *flags, script=script)
    method.start(real)
    group = utils.Group.current()
    times, sent = [], []
    for it in range(a.warmup + a.iterations):
        utils.COMMUNICATED[0] = 0
        if group.world > 1:
            torch.distributed.barrier()
        t = time.perf_counter()
        runs.step(method, it, syn, real, (args.seed, 0))
        if group.world > 1:
            torch.distributed.barrier()
        times.append(time.perf_counter() - t)
        sent.append(utils.COMMUNICATED[0])
    if group.main:
        common.emit({'seconds': float(np.median(times[a.warmup:])), 'bytes': int(np.median(sent[a.warmup:]))})


def run(what, dataset, processes, threads, a):
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--what', what, '--dataset', dataset,
           '--data_path', a.data_path, '--save_path', a.save_path, f'--script_flags={a.script_flags}',
           '--iterations', str(a.iterations or WHAT[what][3]),
           '--warmup', str(WHAT[what][4] if a.warmup is None else a.warmup)]
    if processes > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(processes), *cmd[1:]]
    row, error = common.run_json(cmd, env=env, cwd=common.ROOT)
    if error:
        sys.exit(f'{" ".join(cmd)} failed:\n{error}')
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--what', default=None, choices=list(WHAT), help='one method (default: all)')
    p.add_argument('--dataset', help=argparse.SUPPRESS)
    p.add_argument('--iterations', type=int, help='iterations timed (default: 5 for DM, 1 for DSA)')
    p.add_argument('--warmup', type=int, help='untimed iterations before them (default: 1 for DM, 0 for DSA)')
    common.add_arguments(p, rates=False)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    common.prepare_data(a)
    for dataset in a.datasets:
        for what in [a.what] if a.what else WHAT:
            rows = {name: run(what, dataset, n, t, a) for name, n, t in CONFIGS}
            base = rows[CONFIGS[0][0]]['seconds']
            for name, r in rows.items():
                common.emit({'dataset': dataset, 'what': f'{what} ipc {WHAT[what][1]}', 'config': name,
                             'seconds_per_iteration': round(r['seconds'], 3), 'speedup': round(base / r['seconds'], 2),
                             'MB_exchanged_per_iteration': round(r['bytes'] / 1e6, 3)})


if __name__ == '__main__':
    main()
