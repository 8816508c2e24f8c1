"""Evaluation and CAFE speed, in float32 and with --amp, as ratios measured in one run.

    python bench/speed.py eval        # evaluation models one at a time vs trained together (--eval_together)
    python bench/speed.py cafe        # a CAFE iteration at fixed numbers of outer and inner steps
    python bench/speed.py eval cafe --datasets FashionMNIST
    python bench/speed.py dm          # DM iterations, float32 and --amp taking turns in one process
    python bench/speed.py soft        # an evaluation model on soft labels vs on hard labels
    python bench/speed.py mtt --datasets CIFAR10   # an MTT iteration, where its time goes (torch.profiler)
    python bench/speed.py mtt --datasets CIFAR10 --mtt <mtt-distillation checkout>   # and the authors' beside it

eval: seconds per evaluation model (ConvNet, DSA augmentation, --epochs epochs and a test pass) for
synthetic sets of each of --ipcs, --alone models trained one at a time and --num_evals models trained
together, in float32 and with --amp, with the work of one model (torch.utils.flop_counter) per second as a
fraction of the matrix rates. By default the test pass is on the whole test set; so that training
dominates, as the former bench/eval_together.py measured (20 ConvNets on a Fashion-MNIST set, 100 / ipc
epochs, a 256-image test set):
    python bench/speed.py eval --datasets FashionMNIST --ipcs 1 10 --epochs_per_ipc 100 --test_images 256 \\
        --alone 20 --num_evals 20
dm: DM iterations at ipc 10 (the papers' defaults: DSA augmentation, 256 real images per class), float32
and --amp in turn, --repeats of each after a warm-up of each, so that the machine's drift touches both
alike; reported as the median seconds per iteration and their ratio.
soft: seconds per evaluation model (ConvNet, DSA, --epochs epochs, a test pass on --test_images) at ipc 10 on
hard labels, on soft labels fixed before training (a teacher's logits of the images, computed once), and on a
teacher's logits of every augmented batch (evaluate.py --labels teacher), the teacher a ConvNet; the three
take turns --repeats times after a warm-up of each, reported as medians and ratios to hard labels.
mtt: one MTT iteration (the exact unroll and its backward: --syn_steps steps of a ConvNet on --ipc images per class
with DSA, then the gradient through the unroll into the images and the step size) on random images and a random
expert segment (the cost depends on shapes only). With --mtt <checkout>, the authors' loop body of distill.py on
their own ReparamModule, ConvNet and DiffAugment beside ours; the sides take turns in fresh processes, --repeats
rounds of one timed iteration after a warm-up, reported as medians and their ratio; then one iteration of each
under torch.profiler: the operators' share of the wall time (the rest is Python and the autograd engine) and each
operator's share of their self CPU time, the largest first; and each side's peak resident memory (the process's,
with Python and torch: compare the two).
cafe: one CAFE iteration (ipc 1) with the dynamic loops held at --outer outer steps and --inner inner
epochs after each (lambda_1 0 and lambda_2 1 never stop them early), so float32 and bfloat16 do the same
work; reported with the number of queries and the seconds per query. `--baseline <checkout>` first runs
the same float32 iteration with another checkout's distill.py, runs.py and utils.py (e.g. a `git worktree`
of the commit before a change; from commit ea91562 on, whose harness has the method classes), in a fresh
process of the same run, and states every row's speed relative to it.
Every row also gives this machine's float32 and bfloat16 matrix rates, measured just before it.
"""
import argparse
import os
import sys
import time

import common

CODE = sys.argv[sys.argv.index('--code') + 1] if '--code' in sys.argv else common.ROOT  # whose scripts and utils
common.use_code(CODE)

import distill  # noqa: E402
import runs  # noqa: E402
import utils  # noqa: E402


def evaluation_flops(syn, args, test, data):
    """Floating-point operations of evaluating one model (training for args.epoch_eval_train epochs, then the
    test pass), counted with torch.utils.flop_counter: runs of 1 and 2 epochs give the test pass and an epoch."""
    from torch.utils.flop_counter import FlopCounterMode
    counts = []
    for epochs in (1, 2):
        one = args.replace(epoch_eval_train=epochs, num_eval=1, eval_together=False)
        with FlopCounterMode(display=False) as counter:
            utils.evaluate_models(syn.images, syn.labels, ['ConvNet'], one, test, data)
        counts.append(counter.get_total_flops())
    return counts[0] + (counts[1] - counts[0]) * (args.epoch_eval_train - 1)


def precisions(a):
    """Whether each measurement runs under --amp: float32, and bfloat16 unless --float32_only."""
    return (False,) if a.float32_only else (False, True)


def seconds_per_model(syn, args, test, data, num_eval, together, a):
    """Seconds per model of evaluating `num_eval` ConvNets (trained together or one at a time), and the
    matrix rates measured just before."""
    args = args.replace(num_eval=num_eval, eval_together=together)
    rates = common.matrix_rates(a.matrix_size)
    t = time.perf_counter()
    utils.evaluate_models(syn.images, syn.labels, ['ConvNet'], args, test, data)
    return (time.perf_counter() - t) / num_eval, rates


def evaluation(dataset, a):
    for ipc in a.ipcs:
        for amp in precisions(a):
            args, real, testloader, data, _, syn = common.setup(dataset, ipc, a, '--method', 'DSA', '--init', 'real',
                                                                *(['--amp'] if amp else []))
            test = common.test_batches(testloader, a.test_images)
            args = args.replace(epoch_eval_train=max(1, a.epochs_per_ipc // ipc) if a.epochs_per_ipc else a.epochs)
            gflop = evaluation_flops(syn, args, test, data) / 1e9
            alone, rates_alone = seconds_per_model(syn, args, test, data, a.alone, False, a)
            for num_eval in a.num_evals:
                together, rates = seconds_per_model(syn, args, test, data, num_eval, True, a)
                # each against the rates measured just before it
                was, now = common.fractions(gflop, alone, rates_alone), common.fractions(gflop, together, rates)
                common.emit(dict(dataset=dataset, what=f'evaluation, ipc {ipc}, num_eval {num_eval}', amp=amp,
                                 epochs=args.epoch_eval_train, test_images=a.test_images or 'all', models_alone=a.alone,
                                 seconds_per_model_alone=round(alone, 3), seconds_per_model_together=round(together, 3),
                                 speedup=round(alone / together, 2), GFLOP_per_model=round(gflop, 1),
                                 fraction_of_fp32_rate_alone_together=[was['float32'], now['float32']],
                                 fraction_of_bf16_rate_alone_together=[was['bfloat16'], now['bfloat16']],
                                 **common.rate_fields(rates)))


def dm(dataset, a):
    import main_DM
    args, real, _, data, method, syn = common.setup(dataset, 10, a, script=main_DM)
    runs_of = {False: (method, syn)}
    if not a.float32_only:  # the same real images (and draws) for both; a synthetic set of its own
        amp_method = main_DM.DM(args.replace(amp=True), data)
        runs_of[True] = amp_method, runs.new_synset(real, amp_method, (args.seed, 0), classes=syn.classes)
    times = {amp: [] for amp in runs_of}
    rates = common.matrix_rates(a.matrix_size)
    for it in range(a.repeats + 1):
        for amp, (run_method, run_syn) in runs_of.items():
            t = time.perf_counter()
            runs.step(run_method, it, run_syn, real, (args.seed, 0))
            if it:  # the first of each is a warm-up
                times[amp].append(time.perf_counter() - t)
    median = {amp: sorted(t)[len(t) // 2] for amp, t in times.items()}
    row = dict(dataset=dataset, what='DM iteration, ipc 10', repeats=a.repeats, seconds_float32=round(median[False], 3))
    if True in median:
        row.update(seconds_amp=round(median[True], 3), speedup_of_amp=round(median[False] / median[True], 2))
    common.emit(dict(row, **common.rate_fields(rates)))


def soft(dataset, a):
    from scores import SoftLabels, teacher_logits
    args, real, testloader, data, _, syn = common.setup(dataset, 10, a, '--method', 'DSA', '--init', 'real')
    test = common.test_batches(testloader, a.test_images)
    args = args.replace(epoch_eval_train=a.epochs, num_eval=1)
    teacher = utils.get_network('ConvNet', data.channel, data.num_classes, data.im_size, args.device).eval()
    fixed = teacher_logits(teacher, syn.images.detach())
    modes = {'hard': (syn.labels, None), 'fixed soft': (fixed, SoftLabels('kl')),
             'teacher every batch': (syn.labels, SoftLabels('kl', teacher=teacher))}
    times = {m: [] for m in modes}
    rates = common.matrix_rates(a.matrix_size)
    for r in range(a.repeats + 1):
        for m, (labels, criterion) in modes.items():
            t = time.perf_counter()
            utils.evaluate_models(syn.images, labels, ['ConvNet'], args, test, data, train_criterion=criterion)
            if r:  # the first of each is a warm-up
                times[m].append(time.perf_counter() - t)
    median = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
    common.emit(dict(dataset=dataset, what='evaluation model, ipc 10, hard vs soft labels', epochs=a.epochs,
                     test_images=a.test_images or 'all', repeats=a.repeats,
                     seconds={m: round(v, 3) for m, v in median.items()},
                     ratio_to_hard={m: round(v / median['hard'], 2) for m, v in median.items()}, **common.rate_fields(rates)))


# One MTT iteration (the exact unroll and its backward) on random images and a random expert segment, in a fresh
# process: {side} is 'ours' (trajectory.mtt_loss) or 'theirs' (the authors' distill.py loop body, lines 330-390 of
# GeorgeCazenavette/mtt-distillation, run on their own ReparamModule, ConvNet and DiffAugment from bench/papers.py's
# patched copy of the checkout).
# Prints {{"seconds": [...], "max_rss_mib": peak resident memory after the timed iterations, "top_operators": {{...}},
# "operators_share_of_wall": x}} as its last line.
MTT_WORKER = """
import json, sys, time
sys.path.insert(0, {code!r})
import numpy as np
import torch
torch.manual_seed(0)
channel, im_size, num_classes, ipc, steps = {channel}, {im_size}, {num_classes}, {ipc}, {steps}
images = torch.randn(num_classes * ipc, channel, *im_size, requires_grad=True)
labels = torch.arange(num_classes).repeat_interleave(ipc)
syn_lr = torch.tensor(0.01, requires_grad=True)
strategy = {strategy!r}  # (the same DSA strategy on both sides: the dataset's default here)
if {side!r} == 'ours':
    import trajectory, utils
    net = utils.get_network('ConvNet', channel, num_classes, im_size, 'cpu').train()
    w0 = trajectory.flat_params(net)
    w_target = w0 + 0.01 * torch.randn_like(w0)

    def iteration():
        g = torch.Generator().manual_seed(0)
        loss = trajectory.mtt_loss(net, w0, w_target, images, labels, syn_lr, steps, None,
                                   lambda x, gen: utils.DiffAugment(x, strategy, generator=gen), g)
        loss.backward()
else:
    import utils, reparam_module
    net = reparam_module.ReparamModule(utils.get_network('ConvNet', channel, num_classes, im_size, dist=False)).train()
    param, criterion = utils.ParamDiffAug(), torch.nn.CrossEntropyLoss()
    num_params = sum(np.prod(p.size()) for p in net.parameters())
    starting = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    target = starting + 0.01 * torch.randn_like(starting)

    def iteration():
        student_params, chunks = [starting.clone().requires_grad_(True)], []
        for step in range(steps):
            if not chunks:
                chunks = list(torch.split(torch.randperm(len(images)), len(images)))
            idx = chunks.pop()
            x = utils.DiffAugment(images[idx], strategy, param=param)
            grad = torch.autograd.grad(criterion(net(x, flat_param=student_params[-1]), labels[idx]), student_params[-1],
                                       create_graph=True)[0]
            student_params.append(student_params[-1] - syn_lr * grad)
        loss = torch.nn.functional.mse_loss(student_params[-1], target, reduction='sum') / num_params
        loss = loss / (torch.nn.functional.mse_loss(starting, target, reduction='sum') / num_params)
        loss.backward()

iteration()  # (a warm-up)
seconds = []
for _ in range({timed}):
    t = time.perf_counter()
    iteration()
    seconds.append(time.perf_counter() - t)
import resource
out = dict(seconds=seconds, max_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
if {profile}:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        iteration()
        wall = time.perf_counter() - t
    ops = sorted(((e.key, e.self_cpu_time_total) for e in prof.key_averages()), key=lambda kv: -kv[1])
    total = sum(v for _, v in ops)
    out.update(operators_share_of_wall=round(total / 1e6 / wall, 2), top_operators={{k: round(v / total, 3) for k, v in ops[:12]}})
print(json.dumps(out))
"""


def mtt(dataset, a):
    """Our MTT iteration, and with --mtt the authors' beside it, in fresh processes taking turns (--repeats rounds,
    one timed iteration each after a warm-up), then one profiled iteration of each."""
    import papers  # (their code as bench/papers.py runs it: a copy with the fixes torch 2 needs, e.g. .view -> .reshape)
    channel, im_size, num_classes = utils.DATASETS[dataset][:3]
    sides = {'ours': common.ROOT, **({'theirs': papers.patched_copy(a.mtt, 'mtt')} if a.mtt else {})}
    seconds, profiles, rss = {side: [] for side in sides}, {}, {side: [] for side in sides}
    rates = common.matrix_rates(a.matrix_size)
    for r in range(a.repeats + 1):
        for side, code in sides.items():
            last = r == a.repeats
            worker = MTT_WORKER.format(code=os.path.abspath(code), side=side, strategy=utils.default_strategy(dataset),
                                       channel=channel, im_size=tuple(im_size), num_classes=num_classes, ipc=a.ipc,
                                       steps=a.syn_steps, timed=0 if last else 1, profile=last)
            row, error = common.run_json([sys.executable, '-c', worker], cwd=os.path.abspath(code))
            if error:
                sys.exit(f'the MTT iteration ({side}) failed:\n{error}')
            seconds[side] += row['seconds']
            rss[side].append(row['max_rss_mib'])
            if last:
                profiles[side] = {k: row[k] for k in ('operators_share_of_wall', 'top_operators')}
    median = {side: sorted(t)[len(t) // 2] for side, t in seconds.items() if t}
    common.emit(dict(dataset=dataset, what=f'MTT iteration, ipc {a.ipc}, {a.syn_steps} steps, DSA', repeats=a.repeats,
                     seconds={side: round(v, 2) for side, v in median.items()},
                     peak_memory_mib={side: max(v) for side, v in rss.items()},
                     **({'ours_faster': round(median['theirs'] / median['ours'], 2)} if 'theirs' in median else {}),
                     profile=profiles, **common.rate_fields(rates)))


def cafe(dataset, a):
    base = None
    if a.baseline:
        cmd = [sys.executable, os.path.abspath(__file__), 'cafe', '--code', a.baseline, '--float32_only',
               '--datasets', dataset, '--data_path', a.data_path, '--save_path', a.save_path, '--outer', str(a.outer),
               '--inner', str(a.inner), '--matrix_size', str(a.matrix_size), f'--script_flags={a.script_flags}']
        row, error = common.run_json(cmd)
        if error:
            sys.exit(f'the baseline {a.baseline} failed:\n{error}')
        base = row['seconds']
        common.emit(dict(row, code=a.baseline, speedup=1.0))
    for amp in precisions(a):
        args, real, _, _, method, syn = common.setup(dataset, 1, a, '--lambda_1', '0', '--lambda_2', '1',
                                                     '--max_outer', str(a.outer), '--max_inner', str(a.inner),
                                                     *(['--amp'] if amp else []), script=distill)
        queries = []
        query = distill.query_accuracy

        def counted(*x):
            t = time.perf_counter()
            out = query(*x)
            queries.append(time.perf_counter() - t)
            return out

        distill.query_accuracy = counted
        rates = common.matrix_rates(a.matrix_size)
        t = time.perf_counter()
        try:
            stats = runs.step(method, 0, syn, real, (args.seed, 0))
        finally:
            distill.query_accuracy = query
        seconds = time.perf_counter() - t
        base = base or seconds
        common.emit(dict(dataset=dataset, what='CAFE iteration, ipc 1', code=CODE, amp=amp, outer=stats['outer'],
                         inner=stats['inner'], seconds=round(seconds, 2), speedup=round(base / seconds, 2),
                         queries=len(queries), seconds_per_query=round(sum(queries) / len(queries), 3),
                         share_of_queries=round(sum(queries) / seconds, 2), **common.rate_fields(rates)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('parts', nargs='+', choices=['eval', 'cafe', 'dm', 'soft', 'mtt'])
    common.add_arguments(p)
    p.add_argument('--epochs', type=int, default=20, help='evaluation: training epochs per model')
    p.add_argument('--epochs_per_ipc', type=int, help='evaluation: train N // ipc epochs per model instead of --epochs')
    p.add_argument('--ipcs', type=int, nargs='+', default=[1, 10, 50], help='evaluation: the sizes of the synthetic sets')
    p.add_argument('--test_images', type=int, help='evaluation: test on the first N test images (default: all)')
    p.add_argument('--alone', type=int, default=2, help='evaluation: the models timed one at a time')
    p.add_argument('--num_evals', type=int, nargs='+', default=[5, 20],
                   help='evaluation: the numbers of models timed trained together')
    p.add_argument('--repeats', type=int, default=9, help='DM: timed iterations of each precision; soft: models of each; MTT: timed iterations of each side')
    p.add_argument('--syn_steps', type=int, default=50, help="MTT: the student's steps (the paper's CIFAR-10 ipc 1: 50)")
    p.add_argument('--ipc', type=int, default=1, help='MTT: images per class')
    p.add_argument('--mtt', help="MTT: a checkout of GeorgeCazenavette/mtt-distillation, timed beside ours")
    p.add_argument('--outer', type=int, default=10, help='CAFE: outer steps')
    p.add_argument('--inner', type=int, default=5, help='CAFE: inner epochs after each outer step but the last')
    p.add_argument('--baseline', help='CAFE: a checkout whose float32 iteration is the 1x row')
    p.add_argument('--code', default=common.ROOT, help='CAFE: the checkout whose distill.py, runs.py and utils.py run')
    a = p.parse_args()
    common.prepare_data(a)
    for dataset in a.datasets:
        for part in a.parts:
            {'eval': evaluation, 'cafe': cafe, 'dm': dm, 'soft': soft, 'mtt': mtt}[part](dataset, a)


if __name__ == '__main__':
    main()
