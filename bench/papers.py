"""Speed side by side with the papers' own code, on the same arrays, in one run.

    python bench/papers.py --papers /path/to/DatasetCondensation --cafe /path/to/CAFE
    python bench/papers.py --papers ... --only dm_ipc10 --datasets CIFAR10

For each method and dataset: seconds per iteration here (float32, and with --amp) and in the papers'
code (VICO-UoE/DatasetCondensation for DC, DSA and DM; kaiwang960112/CAFE for CAFE, 3x32x32 only),
measured as the papers' issue did: the time of a whole run of N iterations minus that of a run of 0
(so data loading and the evaluation at iteration 0, identical in both, cancel), each in a fresh process.
Without --papers and --cafe only our rows run. Every row also gives the iteration's floating-point
operations (counted here with torch.utils.flop_counter) as a fraction of this machine's float32 and
bfloat16 matrix rates, measured in the same process just before it: machines differ and drift, such
fractions and the ratios between rows of one run do not. The papers' code is copied to a temporary folder
and given two mechanical fixes for torch 2.x (`.view(` -> `.reshape(` in networks.py; `x[:] = x[0]` ->
`x[:] = x[0].clone()` in DSA); its get_dataset is replaced by one returning the arrays this code loaded.
Nothing of it is kept.
"""
import argparse
import os
import re
import shlex
import shutil
import sys
import time

import common

HERE = os.path.abspath(__file__)
# name: (script (ours and the papers' alike), its flags (the same names in both), ipc, the papers' repository
# ('dc' or 'cafe'), iterations timed)
DSA = ['--method', 'DSA', '--dsa_strategy', 'color_crop_cutout_flip_scale_rotate']
RUNS = {
    'dm_ipc10': ('main_DM.py', [], 10, 'dc', 10),
    'dc_ipc1': ('main.py', ['--method', 'DC'], 1, 'dc', 5),
    'dsa_ipc1': ('main.py', DSA, 1, 'dc', 5),
    'dc_ipc10': ('main.py', ['--method', 'DC'], 10, 'dc', 1),
    'dsa_ipc10': ('main.py', DSA, 10, 'dc', 1),
    'cafe_ipc1': ('distill.py', [], 1, 'cafe', 1),
}
SHARED = ['--num_exp', '1', '--num_eval', '1', '--epoch_eval_train', '1', '--eval_mode', 'SS']


def patched_copy(repo, kind):
    """The papers' code in a temporary folder, with the two fixes torch 2.x needs."""
    dst = f'/tmp/bench_papers_{kind}'  # (the papers' scripts run from there)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(repo, dst, ignore=shutil.ignore_patterns('.git', 'figs', 'docs'))
    for name in ('networks.py', 'utils.py'):
        path = os.path.join(dst, name)
        text = open(path).read()
        if name == 'networks.py':
            text = text.replace('.view(', '.reshape(')
        text = re.sub(r'(\w+)\[:\] = \1\[0\]\n', r'\1[:] = \1[0].clone()\n', text)
        open(path, 'w').write(text)
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
    if a.side == 'papers':
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
    script.main()
    common.emit({'seconds': time.perf_counter() - t, 'rates': rates})


def count_flops(script, flags, ipc, dataset, a):
    """Floating-point operations of one iteration of our `script` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    import runs
    common.use_code()
    args, real, _, syn = common.setup(dataset, ipc, a, *flags, '--save_path', os.path.join(a.save_path, 'flops'),
                                  script=script)
    with FlopCounterMode(display=False) as counter:
        runs.step(common.script_module(script).train_iteration, 0, syn, real, args, (args.seed, 0))
    return counter.get_total_flops()


def timed(side, script, flags, iterations, a, code=None, arrays=None):
    """Seconds per iteration: a run of `iterations` minus a run of 0, each in a fresh process; and the matrix
    rates measured before the first. (None, the reason) when a run failed."""
    out = []
    for n in (iterations, 0):
        save = os.path.join(a.save_path, f'{side}_{script}_{n}')
        shutil.rmtree(save, ignore_errors=True)
        args = [*flags, *SHARED, '--Iteration', str(n), '--data_path', a.data_path, '--save_path', save]
        cmd = [sys.executable, HERE, '--worker', '--side', side, '--script', script, f'--flags={shlex.join(args)}',
               '--matrix_size', str(a.matrix_size)]
        if code:
            cmd += ['--code', code, '--arrays', arrays]
        row, error = common.run_json(cmd, cwd=code or common.ROOT)
        if error:
            return None, f'{side} failed: {error.splitlines()[-1]}'
        out.append(row)
    return (out[0]['seconds'] - out[1]['seconds']) / iterations, out[0]['rates']


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--papers', help='a checkout of VICO-UoE/DatasetCondensation (DC, DSA, DM)')
    p.add_argument('--cafe', help='a checkout of kaiwang960112/CAFE')
    p.add_argument('--only', nargs='+', choices=list(RUNS), default=list(RUNS))
    common.add_arguments(p)  # (--script_flags: for both sides, whose shared flags have the same names)
    p.add_argument('--iterations', type=int, help='iterations timed in every row (default: as many as each needs)')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    for hidden in ('--side', '--script', '--flags', '--code', '--arrays'):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    common.use_code()
    common.prepare_data(a)
    repos = {k: patched_copy(r, k) for k, r in (('dc', a.papers), ('cafe', a.cafe)) if r}
    for dataset in a.datasets:
        arrays = dump(dataset, a.data_path) if repos else None
        for name in a.only:
            script, ours, ipc, repo, n = RUNS[name]
            n = a.iterations or n
            flops = count_flops(script, ours, ipc, dataset, a)
            flags = ['--dataset', dataset, '--ipc', str(ipc), *ours, *shlex.split(a.script_flags)]
            rows = [('ours, float32', timed('ours', script, flags, n, a)),
                    *([] if a.float32_only else [('ours, --amp', timed('ours', script, [*flags, '--amp'], n, a))])]
            if repo in repos and not (repo == 'cafe' and dataset != 'CIFAR10'):  # the public CAFE: CIFAR-10 only
                rows.append(('papers', timed('papers', script, flags, n, a, repos[repo], arrays)))
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
