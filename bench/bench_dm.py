"""DM speed on Fashion-MNIST, ipc 10: seconds per condensation iteration, per evaluation epoch (100
synthetic images, DSA augmentation) and per test pass (10,000 images), for this code and, side by side,
for bench/public_style.py (a stand-in for the papers' code). Run on a quiet machine:

    python bench/bench_dm.py            # both, with ratios
    python bench/bench_dm.py --ours     # this code only
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


def ours(extra):
    args = utils.get_parser('bench', method='DM', lr_img=1.0, init='real', dsa_strategy='color_crop_cutout_flip_scale_rotate')
    args = utils.setup(args.parse_args(['--dataset', 'FashionMNIST', '--ipc', '10', '--data_path', '/tmp/bench_data',
                                        '--save_path', '/tmp/bench_out', *extra]))
    args.dsa = True
    real, testloader = utils.load_real(args)
    utils.set_seed(0)
    syn = utils.SynSet(real, args)
    out = {'dm_iteration': median_time(lambda: main_DM.train_iteration(0, syn, real, args), 5)}
    net = utils.get_network('ConvNet', 1, 10, (28, 28), args.device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    a = utils.eval_args(args, 'ConvNet')
    loader = utils.tensor_loader(syn.images.detach(), syn.labels, 256, shuffle=True)
    crit = torch.nn.CrossEntropyLoss()
    out['eval_epoch'] = median_time(lambda: utils.run_epoch('train', loader, net, opt, crit, a, True)[0].item(), 10, 2)
    out['test_pass'] = median_time(lambda: utils.epoch('test', testloader, net, None, crit, a, False), 2)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--ours', action='store_true', help='only this code')
    p.add_argument('extra', nargs='*', help='more flags for main_DM (e.g. -- --device cuda)')
    a = p.parse_args()
    mine = ours(a.extra)
    public = {}
    if not a.ours:
        for what in mine:
            r = subprocess.run([sys.executable, os.path.join(HERE, 'public_style.py'), what], capture_output=True, text=True)
            public[what] = json.loads(r.stdout.strip().splitlines()[-1])['seconds']
    for what, s in mine.items():
        row = {'what': what, 'ours_s': round(s, 3)}
        if public:
            row.update(public_s=round(public[what], 3), speedup=round(public[what] / s, 2))
        print(json.dumps(row))
    epochs = 1000
    total = mine['eval_epoch'] * epochs + mine['test_pass']
    print(json.dumps({'what': 'one evaluated model (1000 epochs + test)', 'ours_s': round(total, 1),
                      **({'public_s': round(public['eval_epoch'] * epochs + public['test_pass'], 1)} if public else {})}))


if __name__ == '__main__':
    main()
