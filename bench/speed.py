"""Evaluation and CAFE speed, in float32 and with --amp, as ratios measured in one run.

    python bench/speed.py eval        # evaluation models one at a time vs trained together (--eval_together)
    python bench/speed.py cafe        # a CAFE iteration at fixed numbers of outer and inner steps
    python bench/speed.py eval cafe --datasets FashionMNIST
    python bench/speed.py dm          # DM iterations, float32 and --amp taking turns in one process

eval: seconds per evaluation model (ConvNet, DSA augmentation, --epochs epochs and a test pass on the whole
test set) for synthetic sets of ipc 1, 10 and 50, num_eval 5 and 20, trained one at a time or together,
with the work of one model (torch.utils.flop_counter) per second as a fraction of the matrix rates.
dm: DM iterations at ipc 10 (the papers' defaults: DSA augmentation, 256 real images per class), float32
and --amp in turn, --repeats of each after a warm-up of each, so that the machine's drift touches both
alike; reported as the median seconds per iteration and their ratio.
cafe: one CAFE iteration (ipc 1) with the dynamic loops held at --outer outer steps and --inner inner
epochs after each (lambda_1 0 and lambda_2 1 never stop them early), so float32 and bfloat16 do the same
work; reported with the number of queries and the seconds per query. `--baseline <checkout>` first runs
the same float32 iteration with another checkout's distill.py and utils.py (e.g. a `git worktree` of the
commit before a change), in a fresh process of the same run, and states every row's speed relative to it.
Every row also gives this machine's float32 and bfloat16 matrix rates, measured just before it.
"""
import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = sys.argv[sys.argv.index('--code') + 1] if '--code' in sys.argv else ROOT  # whose distill.py and utils.py
sys.path.insert(0, os.path.abspath(CODE))

import distill  # noqa: E402
import utils  # noqa: E402
from papers import matrix_rates  # noqa: E402


def setup(dataset, ipc, a, *flags, script=None):
    parser = script.parser() if script else utils.get_parser('bench', method='DSA', init='real')
    args = utils.setup(parser.parse_args(['--dataset', dataset, '--ipc', str(ipc), '--data_path', a.data_path,
                                          '--save_path', '/tmp/bench_out', *flags]))
    utils.set_dsa(args, augments=args.method in ('DSA', 'DM'))  # DM always augments (main_DM.py)
    real, testloader = utils.load_real(args)
    utils.set_seed(0)
    real.start(0, 'init')
    return args, real, testloader, utils.SynSet(real, args)


def evaluation_flops(syn, args, testloader):
    """Floating-point operations of evaluating one model (training for args.epoch_eval_train epochs, then the
    test pass), counted with torch.utils.flop_counter: runs of 1 and 2 epochs give the test pass and an epoch."""
    from torch.utils.flop_counter import FlopCounterMode
    counts = []
    for epochs in (1, 2):
        one = copy.copy(args)
        one.epoch_eval_train, one.num_eval, one.eval_together = epochs, 1, False
        with FlopCounterMode(display=False) as counter:
            utils.evaluate_models(syn.images, syn.labels, ['ConvNet'], one, testloader)
        counts.append(counter.get_total_flops())
    return counts[0] + (counts[1] - counts[0]) * (args.epoch_eval_train - 1)


def evaluation(dataset, a):
    for ipc in a.ipcs:
        for amp in (False, True):
            args, real, testloader, syn = setup(dataset, ipc, a, *(['--amp'] if amp else []))
            args.epoch_eval_train = a.epochs
            flops = evaluation_flops(syn, args, testloader)
            per_model = {}
            for num_eval, together in [(2, False), (5, True), (20, True)]:
                args.num_eval, args.eval_together = num_eval, together
                rates = matrix_rates()
                t = time.perf_counter()
                utils.evaluate_models(syn.images, syn.labels, ['ConvNet'], args, testloader)
                per_model[num_eval if together else 'alone'] = (time.perf_counter() - t) / num_eval, rates
            for num_eval in (5, 20):
                (alone, rates_alone), (together, rates) = per_model['alone'], per_model[num_eval]
                fraction = {d: [round(flops / 1e9 / sec / r[d], 2) for sec, r in ((alone, rates_alone), (together, rates))]
                            for d in ('float32', 'bfloat16')}  # each against the rates measured just before it
                print(json.dumps(dict(dataset=dataset, what=f'evaluation, ipc {ipc}, num_eval {num_eval}', amp=amp,
                                      epochs=a.epochs, seconds_per_model_alone=round(alone, 2),
                                      seconds_per_model_together=round(together, 2), speedup=round(alone / together, 2),
                                      GFLOP_per_model=round(flops / 1e9, 1),
                                      fraction_of_fp32_rate_alone_together=fraction['float32'],
                                      fraction_of_bf16_rate_alone_together=fraction['bfloat16'],
                                      fp32_GFLOPs=round(rates['float32'], 1), bf16_GFLOPs=round(rates['bfloat16'], 1))),
                      flush=True)


def dm(dataset, a):
    import main_DM
    args, real, _, syn = setup(dataset, 10, a, '--lr_img', str(main_DM.default_lr_img(dataset, 10)), script=main_DM)
    amp_args = copy.copy(args)
    amp_args.amp = True  # the same real images (and draws) for both; a synthetic set of its own
    runs = {False: (args, syn, []), True: (amp_args, utils.SynSet(real, amp_args), [])}
    rates = matrix_rates()
    for it in range(a.repeats + 1):
        for amp, (args, syn, times) in runs.items():
            real.start(0, 0, it)
            t = time.perf_counter()
            with utils.autocast(args):
                main_DM.train_iteration(it, syn, real, args)
            if it:  # the first of each is a warm-up
                times.append(time.perf_counter() - t)
    median = {amp: sorted(times)[len(times) // 2] for amp, (*_, times) in runs.items()}
    print(json.dumps(dict(dataset=dataset, what='DM iteration, ipc 10', repeats=a.repeats,
                          seconds_float32=round(median[False], 3), seconds_amp=round(median[True], 3),
                          speedup_of_amp=round(median[False] / median[True], 2), fp32_GFLOPs=round(rates['float32'], 1),
                          bf16_GFLOPs=round(rates['bfloat16'], 1))), flush=True)


def cafe(dataset, a):
    base = None
    if a.baseline:
        cmd = [sys.executable, os.path.abspath(__file__), 'cafe', '--code', a.baseline, '--float32_only', '--datasets',
               dataset, '--data_path', a.data_path, '--outer', str(a.outer), '--inner', str(a.inner)]
        row = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.splitlines()[-1])
        base = row['seconds']
        print(json.dumps(dict(row, code=a.baseline, speedup=1.0)), flush=True)
    autocast = getattr(utils, 'autocast', lambda args: contextlib.nullcontext())  # older checkouts have no --amp
    for amp in (False,) if a.float32_only else (False, True):
        args, real, _, syn = setup(dataset, 1, a, '--lambda_1', '0', '--lambda_2', '1', '--max_outer', str(a.outer),
                                   '--max_inner', str(a.inner), *(['--amp'] if amp else []), script=distill)
        args.layer_weights = distill.default_layer_weights(4)
        args.milestones = [10 ** 9]
        queries = []
        query = distill.query_accuracy

        def counted(*x):
            t = time.perf_counter()
            out = query(*x)
            queries.append(time.perf_counter() - t)
            return out

        distill.query_accuracy = counted
        rates = matrix_rates()
        t = time.perf_counter()
        with autocast(args):
            stats = distill.train_iteration(0, syn, real, args)
        seconds = time.perf_counter() - t
        distill.query_accuracy = query
        base = base or seconds
        print(json.dumps(dict(dataset=dataset, what='CAFE iteration, ipc 1', code=CODE, amp=amp, outer=stats['outer'],
                              inner=stats['inner'], seconds=round(seconds, 2), speedup=round(base / seconds, 2),
                              queries=len(queries), seconds_per_query=round(sum(queries) / len(queries), 3),
                              share_of_queries=round(sum(queries) / seconds, 2), fp32_GFLOPs=round(rates['float32'], 1),
                              bf16_GFLOPs=round(rates['bfloat16'], 1))), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('parts', nargs='+', choices=['eval', 'cafe', 'dm'])
    p.add_argument('--datasets', nargs='+', default=['FashionMNIST', 'CIFAR10'], choices=['FashionMNIST', 'CIFAR10'])
    p.add_argument('--cifar10', default=os.path.join(ROOT, '..', 'shared', 'datasets', 'cifar10.tar'))
    p.add_argument('--data_path', default='/tmp/bench_data')
    p.add_argument('--epochs', type=int, default=20, help='evaluation: training epochs per model')
    p.add_argument('--ipcs', type=int, nargs='+', default=[1, 10, 50], help='evaluation: the sizes of the synthetic sets')
    p.add_argument('--repeats', type=int, default=9, help='DM: timed iterations of each precision')
    p.add_argument('--outer', type=int, default=10, help='CAFE: outer steps')
    p.add_argument('--inner', type=int, default=5, help='CAFE: inner epochs after each outer step but the last')
    p.add_argument('--baseline', help='CAFE: a checkout whose float32 iteration is the 1x row')
    p.add_argument('--code', default=ROOT, help='CAFE: the checkout whose distill.py and utils.py run')
    p.add_argument('--float32_only', action='store_true', help='CAFE: no --amp row')
    a = p.parse_args()
    if 'CIFAR10' in a.datasets and not os.path.isdir(os.path.join(a.data_path, 'CIFAR10', 'train')):
        with tarfile.open(a.cifar10) as tar:
            tar.extractall(os.path.join(a.data_path, 'CIFAR10'))
    for dataset in a.datasets:
        for part in a.parts:
            {'eval': evaluation, 'cafe': cafe, 'dm': dm}[part](dataset, a)


if __name__ == '__main__':
    main()
