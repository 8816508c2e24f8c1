"""CAFE: Learning to Condense Dataset by Aligning Features (Wang et al., CVPR 2022).

Each iteration samples a fresh network. The synthetic images move so that in that network (1) the
per-class mean features of real and synthetic images agree at every stage, and (2) the synthetic class
centres classify real images well. A dynamic bi-level optimisation sets how long: synthetic-set steps
continue until the network's accuracy on real query images settles; between them the network trains on
the synthetic set until that accuracy moves.
"""
from collections import deque

import torch
import torch.nn.functional as F

from utils import (STRATEGY_RULE, UsageError, accuracy, condense, get_network, get_parser, has_batchnorm, run_epoch, run_script,
                   set_dsa, setup, siamese_augment, tensor_loader)


def class_means(x, shape):
    """Per-class means of features x [C*n, ...] ordered by class, shape = (C, n): [C, ...]."""
    return x.unflatten(0, shape).mean(1)


def real_features(net, img_real):
    """For real images [C, n, ...] (constants): the per-class mean of every stage of `net` and the
    embeddings [C*n, d], without autograd; one class at a time (a BatchNorm net: all as one batch)."""
    groups = [img_real] if has_batchnorm(net) else img_real.split(1)
    means, embeddings = [], []
    with torch.no_grad():
        for x in groups:
            stages, _ = net.stages(x.flatten(0, 1))
            means.append([class_means(s, x.shape[:2]) for s in stages])
            embeddings.append(stages[-1].flatten(1))
    return [torch.cat(m) for m in zip(*means)], torch.cat(embeddings)


def cafe_losses(net, img_real, img_syn, args):
    """img_real [C, n, ...], img_syn [C, ipc, ...]. Returns the three terms of CAFE's loss: the weighted
    layer-wise alignment of per-class mean features, the final-layer alignment of the class centres,
    and the discrimination loss (cross-entropy, summed, of real embeddings classified by their inner
    products with the synthetic centres)."""
    real_means, real_embeddings = real_features(net, img_real)
    syn_stages, _ = net.stages(img_syn.flatten(0, 1))
    syn_means = [class_means(s, img_syn.shape[:2]) for s in syn_stages]
    alignment = sum(w * (r - s).square().sum() for w, r, s in zip(args.layer_weights, real_means, syn_means))
    real_centres, syn_centres = real_means[-1].flatten(1), syn_means[-1].flatten(1)
    logits = real_embeddings @ syn_centres.t()
    labels = torch.arange(len(img_real), device=logits.device).repeat_interleave(img_real.shape[1])
    return alignment, (syn_centres - real_centres).square().sum(), F.cross_entropy(logits, labels, reduction='sum')


def query_accuracy(net, real, args):
    """The network's accuracy on a fresh draw of --query real images per class."""
    images = [real.get_images(c, args.query) for c in range(args.num_classes)]
    labels = torch.cat([torch.full((len(x),), c, device=args.device) for c, x in enumerate(images)])
    return accuracy(net, torch.cat(images), labels).item()


def dynamic_loops(outer_step, inner_step, query, args):
    """CAFE's dynamic bi-level optimisation. Synthetic-set steps (outer_step) go on until the last
    --window query accuracies vary by less than --lambda_1; after each, the network trains an epoch at a
    time (inner_step) until the last --window query accuracies vary by more than --lambda_2. At most
    --max_outer and --max_inner steps. Returns the numbers of outer and inner steps taken."""
    outer, n_inner = deque(maxlen=args.window), 0
    for n_outer in range(1, args.max_outer + 1):
        outer_step()
        outer.append(query())
        if n_outer == args.max_outer or len(outer) == args.window and max(outer) - min(outer) < args.lambda_1:
            break
        inner = deque(maxlen=args.window)
        for _ in range(args.max_inner):
            inner_step()
            n_inner += 1
            inner.append(query())
            if len(inner) == args.window and max(inner) - min(inner) > args.lambda_2:
                break
    return n_outer, n_inner


def train_iteration(it, syn, real, args):
    for group in syn.optimizer.param_groups:  # halved at each milestone
        group['lr'] = args.lr_img * 0.5 ** sum(it >= m for m in args.milestones)
    net = get_network(args.model, args.channel, args.num_classes, args.im_size, args.device)
    optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
    syn_loader = tensor_loader(syn.images.detach(), syn.labels, args.batch_train, shuffle=True)  # sees each update
    losses = []

    def outer_step():
        n = min([args.batch_real, *map(len, real.indices_class)])  # as many real images of every class
        img_real = [real.get_images(c, n) for c in range(args.num_classes)]
        img_syn = [syn.of_class(c) for c in range(args.num_classes)]
        if args.dsa:  # the same transformation for the real and the synthetic batch of a class
            img_real, img_syn = zip(*[siamese_augment(pair, args, real.rng(c)) for c, pair in enumerate(zip(img_real, img_syn))])
        net.requires_grad_(False)  # only the synthetic images learn here
        alignment, centres, discrimination = cafe_losses(net, torch.stack(img_real), torch.stack(img_syn), args)
        loss = alignment + centres + args.inner_weight * discrimination
        syn.step(loss)
        net.requires_grad_(True)
        losses.append(loss.detach())

    def inner_step():
        run_epoch('train', syn_loader, net, optimizer_net, F.cross_entropy, args, aug=args.dsa)

    n_outer, n_inner = dynamic_loops(outer_step, inner_step, lambda: query_accuracy(net, real, args), args)
    return {'loss': torch.stack(losses).mean().item() / args.num_classes, 'outer': n_outer, 'inner': n_inner}


PUBLIC_WEIGHTS = ['first', 'second', 'third', 'fourth']  # the public code's names, from the deepest stage


def default_layer_weights(n_stages):
    """The public code's weights for a depth-3 ConvNet (0.1, 0.1, 1, 1), generalised: 1 for the last
    block and the final feature map, 0.1 for every earlier stage."""
    return [0.1] * (n_stages - 2) + [1.0] * min(2, n_stages)


def parser():
    parser = get_parser('CAFE: dataset condensation by aligning features', methods=['DC', 'DSA'], omit=['amp', 'compile'],
                        Iteration=2000, lr_img=0.1, init='noise', num_exp=1, num_eval=20, epoch_eval_noaug=600,
                        unused={'dis_metric': 'does not apply to CAFE: it aligns features, not gradients'},
                        rules={'dsa_strategy': f'default: None; with --method DSA {STRATEGY_RULE}'})
    parser.add_argument('--layer_weights', type=float, nargs='+', default=None,
                        help='alignment weight of each stage, from the first block to the final feature map '
                             '(default: 1 for the last block and the final map, 0.1 before)')
    for k, name in enumerate(PUBLIC_WEIGHTS):
        parser.add_argument(f'--{name}_weight', type=float, default=None,
                            help=f'the public code\'s name for the weight of stage {k + 1} from the deepest')
    parser.add_argument('--inner_weight', type=float, default=0.01, help='weight of the discrimination loss')
    parser.add_argument('--lambda_1', type=float, default=0.04, help='outer loop: stop when the accuracies vary less')
    parser.add_argument('--lambda_2', type=float, default=0.03, help='inner loop: stop when the accuracies vary more')
    parser.add_argument('--window', type=int, default=10, help='the number of query accuracies compared')
    parser.add_argument('--query', type=int, default=128, help='real images per class in a query')
    parser.add_argument('--max_outer', type=int, default=50, help='at most this many outer steps per iteration')
    parser.add_argument('--max_inner', type=int, default=50, help='at most this many inner epochs per outer step')
    return parser


def main():
    args = setup(parser().parse_args())
    set_dsa(args, augments=args.method == 'DSA')
    if args.method == 'DSA' and not args.dsa:
        raise UsageError('--method DSA needs a --dsa_strategy; --method DC aligns without augmentation')
    args.method = {'DC': 'CAFE', 'DSA': 'CAFE_DSA'}[args.method]  # names the outputs apart from main.py's
    n_stages = len(get_network(args.model, 3, 10, (32, 32), 'cpu').taps)  # the same for every input shape
    weights = args.layer_weights or default_layer_weights(n_stages)
    if len(weights) != n_stages:
        raise UsageError(f'--layer_weights needs {n_stages} weights for {args.model}, got {len(weights)}')
    for k, name in enumerate(PUBLIC_WEIGHTS[:n_stages]):
        if getattr(args, f'{name}_weight') is not None:
            weights[n_stages - 1 - k] = getattr(args, f'{name}_weight')
    if min(weights) < 0 or args.inner_weight < 0 or args.lambda_1 < 0 or args.lambda_2 < 0:
        raise UsageError('the layer weights, --inner_weight, --lambda_1 and --lambda_2 must not be negative')
    args.layer_weights = weights
    args.milestones = [round(f * args.Iteration) for f in (0.6, 0.8, 0.9)]  # 1200, 1600, 1800 of 2000
    condense(args, train_iteration, eval_interval=100)


if __name__ == '__main__':
    run_script(main)
