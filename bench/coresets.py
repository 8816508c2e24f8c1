"""What the coreset rules see: the network that herding, k-center and forgetting select with, per class.

    python bench/coresets.py --dataset FashionMNIST --data_path data --save_path coresets --ipc 1 10 50
    python bench/coresets.py --dataset CIFAR10 --coreset_epochs 30 ...

The network is the one `main.py --method herding|kcenter|forgetting` trains for experiment 0 with the same
flags (the same random stream: utils.trained_classifier keeps it in --save_path, so this script and those
runs train it once between them). For each class it reports how many images the network never classified
right in any epoch (forgetting's toneva rule ranks those first: with more of them than --ipc, its picks are
all never-learned images), how many it forgot at least once (the events rule's candidates, ranked by their
count; the others score 0), and for each --ipc how many images greedy herding and the nearest-to-the-mean
rule pick in common. Also the network's accuracy on the real test set.
Prints a table and writes coresets_<dataset>_<epochs>ep.json to --save_path.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main  # noqa: E402
import utils  # noqa: E402
from runs import Flags, load_real, run_script, setup  # noqa: E402


def stats(real, testloader, args, data, ipcs):
    utils.set_seed(args.seed, 0)  # experiment 0's stream, as main.py's selection draws it
    real.start(args.seed, 0, 'init')
    classes = list(range(data.num_classes))
    net, correct = utils.trained_classifier(real, classes, args, data, args.coreset_epochs)
    rows = []
    for c, record in zip(classes, correct.split([len(i) for i in real.indices_class], dim=1)):
        idx = real.indices_class[c]
        events = utils.forgetting_counts(record, 'events')
        features = utils.embed(net, real.images[idx])
        rows.append(dict(cls=data.class_names[c], images=len(idx), never_learned=int((~record.any(0)).sum()),
                         forgotten=int((events > 0).sum()), most_events=int(events.max()),
                         last_epoch_right=float(record[-1].float().mean()),
                         herding_rules_agree={n: len(set(utils.herding(features, n).tolist())
                                                     & set(utils.nearest_to_mean(features, n).tolist())) for n in ipcs}))
    test_acc = utils.epoch('test', testloader, net, None, torch.nn.CrossEntropyLoss(), args, aug=False)[1]
    return dict(dataset=args.dataset, model=args.model, coreset_epochs=args.coreset_epochs, seed=args.seed,
                test_accuracy=test_acc, classes=rows)


def table(report, ipcs):
    head = ['class', 'images', 'never learned', 'forgotten ≥ 1 time', 'most forgetting events', 'right in the last epoch'] + \
        [f'herding rules agree, ipc {n}' for n in ipcs]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in report['classes']:
        cells = [r['cls'], r['images'], r['never_learned'], r['forgotten'], r['most_events'],
                 '%.1f %%' % (100 * r['last_epoch_right'])] + [f'{r["herding_rules_agree"][n]}/{n}' for n in ipcs]
        lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
    return '\n'.join(lines)


def run():
    sizes = argparse.ArgumentParser(add_help=False)
    sizes.add_argument('--ipc', type=int, nargs='+', default=[1, 10, 50], help='the set sizes to report picks for')
    ours, rest = sizes.parse_known_args()
    ipcs = ours.ipc  # (every other flag is main.py's, resolved as main.py resolves it for --method herding)
    args = main.configure(setup(main.parser().parse_args([*rest, '--method', 'herding', '--ipc', str(max(ipcs))])))
    args = Flags.freeze(args)  # (as main.py's run freezes them)
    real, testloader, data = load_real(args)
    report = stats(real, testloader, args, data, ipcs)
    print(f'{args.dataset}: a {args.model} trained {args.coreset_epochs} epochs (seed {args.seed}, experiment 0); '
          f'test accuracy {100 * report["test_accuracy"]:.2f} %')
    print(table(report, ipcs))
    out = os.path.join(args.save_path, f'coresets_{args.dataset}_{args.coreset_epochs}ep.json')
    utils.atomic_json(report, out)
    print(f'written to {out}')


if __name__ == '__main__':
    run_script(run)
