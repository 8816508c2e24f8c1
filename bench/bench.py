"""Speed on Fashion-MNIST, on this machine, side by side with bench/public_style.py (a stand-in for the
papers' public code). Seconds per DM iteration (ipc 10), per DC iteration (ipc 1 and 10), per DSA
iteration (ipc 1), per evaluation epoch (100 synthetic images, DSA augmentation) and test pass (10,000
images); and per CAFE iteration (ipc 1) with its mean numbers of outer and inner steps. Run it on a
quiet machine:

    python bench/bench.py                  # everything, with ratios to the public-style code
    python bench/bench.py dm eval --ours   # some of it, this code only
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import distill  # noqa: E402
import main  # noqa: E402
import main_DM  # noqa: E402
import utils  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def median_time(fn, repeat, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.time()
        fn()
        times.append(time.time() - t)
    return float(np.median(times))


def setup(method, ipc, extra, **defaults):
    """args, real images, test loader and a synthetic set for `method` on Fashion-MNIST."""
    parser = utils.get_parser('bench', method=method, **defaults)
    args = utils.setup(parser.parse_args(['--dataset', 'FashionMNIST', '--ipc', str(ipc), '--data_path', '/tmp/bench_data',
                                          '--save_path', '/tmp/bench_out', *extra]))
    real, testloader = utils.load_real(args)
    utils.set_seed(0)
    return args, real, testloader, utils.SynSet(real, args)


def dm(extra):
    args, real, _, syn = setup('DM', 10, extra, lr_img=1.0, init='real', dsa_strategy=utils.FULL_STRATEGY)
    args.dsa = True
    return {'dm_iteration': median_time(lambda: main_DM.train_iteration(0, syn, real, args), 5)}


def dc(extra):
    out = {}
    for method, ipc, repeat in [('DC', 1, 5), ('DC', 10, 1), ('DSA', 1, 5)]:
        args, real, _, syn = setup(method, ipc, extra)
        utils.set_dsa(args)
        args.outer_loop, args.inner_loop = utils.get_loops(ipc)
        out[f'{method.lower()}_iteration_ipc{ipc}'] = median_time(lambda: main.train_iteration(0, syn, real, args), repeat)
    return out


def evaluation(extra):
    args, real, testloader, syn = setup('DM', 10, extra, init='real', dsa_strategy=utils.FULL_STRATEGY)
    args.dsa = True
    net = utils.get_network('ConvNet', 1, 10, (28, 28), args.device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    a = utils.eval_args(args, 'ConvNet')
    loader = utils.tensor_loader(syn.images.detach(), syn.labels, 256, shuffle=True)
    crit = torch.nn.CrossEntropyLoss()
    return {'eval_epoch': median_time(lambda: utils.run_epoch('train', loader, net, opt, crit, a, True)[0].item(), 10, 2),
            'test_pass': median_time(lambda: utils.epoch('test', testloader, net, None, crit, a, False), 2)}


def cafe(extra, iterations=3):
    args, real, _, syn = setup('DC', 1, extra)
    utils.set_dsa(args)
    vars(args).update(layer_weights=distill.default_layer_weights(4), inner_weight=0.01, lambda_1=0.04, lambda_2=0.03,
                      window=10, query=128, max_outer=50, max_inner=50, milestones=[1200, 1600, 1800])
    t, steps = time.time(), [distill.train_iteration(it, syn, real, args) for it in range(iterations)]
    return {'cafe_iteration_ipc1': (time.time() - t) / iterations,
            'cafe_outer_steps': float(np.mean([s['outer'] for s in steps])),
            'cafe_inner_steps': float(np.mean([s['inner'] for s in steps]))}


PARTS = {'dm': dm, 'dc': dc, 'eval': evaluation, 'cafe': cafe}
PUBLIC = ['dm_iteration', 'dc_iteration_ipc1', 'dc_iteration_ipc10', 'eval_epoch', 'test_pass']


def main_bench():
    p = argparse.ArgumentParser()
    p.add_argument('parts', nargs='*', help='what to time: ' + ', '.join(PARTS) + ' (default: all)')
    p.add_argument('--ours', action='store_true', help='only this code, not the public-style stand-in')
    p.add_argument('--flags', nargs=argparse.REMAINDER, default=[], help='more flags for the scripts (e.g. --device cuda)')
    a = p.parse_args()
    if set(a.parts) - set(PARTS):
        p.error(f'unknown part {sorted(set(a.parts) - set(PARTS))[0]}; choose from {", ".join(PARTS)}')
    rows = {}
    for part in a.parts or PARTS:
        for what, s in PARTS[part](a.flags).items():
            rows[what] = {'what': what, 'ours': round(s, 3)}
            if what in PUBLIC and not a.ours:
                r = subprocess.run([sys.executable, os.path.join(HERE, 'public_style.py'), what], capture_output=True, text=True)
                public = json.loads(r.stdout.strip().splitlines()[-1])['seconds']
                rows[what].update(public=round(public, 3), speedup=round(public / s, 2))
            print(json.dumps(rows[what]), flush=True)
    if 'eval_epoch' in rows:  # 1000 epochs and a test pass
        model = {k: round(rows['eval_epoch'][k] * 1000 + rows['test_pass'][k], 1) for k in ('ours', 'public') if k in rows['eval_epoch']}
        print(json.dumps({'what': 'one evaluated model (1000 epochs + test)', **model}))


if __name__ == '__main__':
    main_bench()
