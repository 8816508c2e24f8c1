"""CAFE: Learning to Condense Dataset by Aligning Features (Wang et al., CVPR 2022).

Each iteration samples a fresh network. The synthetic images move so that in that network (1) the
per-class mean features of real and synthetic images agree at every stage, and (2) the synthetic class
centres classify real images well. A dynamic bi-level optimisation sets how long: synthetic-set steps
continue until the network's accuracy on real query images settles; between them the network trains on
the synthetic set until that accuracy moves.
"""
import math
from collections import deque

import torch
import torch.nn.functional as F

from runs import STRATEGY_RULE, Method, condense, get_parser, positive, resolve_dsa, run_script, setup
from utils import (COMMUNICATED, Group, UsageError, all_reduce, broadcast_shards, correct, get_network, has_batchnorm,
                   run_epoch, shard, siamese_augment, tensor_loader)


def features(net, images, grad):
    """For images [K, n, ...] of K classes: the per-class mean of every stage of `net` ([K, ...] each) and
    the final embeddings [K, n, d], as float32. A BatchNorm net (in train mode) sees all K classes as one
    batch; other nets one class at a time, so a class's features do not depend on which others are
    computed with it (and no stage of all the images is ever held at once: only its class means)."""
    with torch.set_grad_enabled(grad):
        groups = [images] if has_batchnorm(net) else images.split(1)
        means, embeddings = [], []
        for x in groups:
            stages = [s.float().unflatten(0, x.shape[:2]) for s in net.stages(x.flatten(0, 1))[0]]
            means.append([s.mean(1) for s in stages])
            embeddings.append(stages[-1].flatten(2))
    return [torch.cat(m) for m in zip(*means)], torch.cat(embeddings)


def cafe_losses(net, img_real, img_syn, args):
    """img_real [K, n, ...] and img_syn [K, ipc, ...] of K classes. Returns CAFE's alignment loss (the
    weighted squared differences of the per-class mean features at every stage), its final-layer
    alignment of the class centres, the synthetic class centres [K, d] and the real embeddings [K, n, d]."""
    real_means, real_embeddings = features(net, img_real, grad=False)
    syn_means, _ = features(net, img_syn, grad=True)
    alignment = sum(w * (r - s).square().sum() for w, r, s in zip(args.layer_weights, real_means, syn_means))
    real_centres, syn_centres = real_means[-1].flatten(1), syn_means[-1].flatten(1)
    return alignment, (syn_centres - real_centres).square().sum(), syn_centres, real_embeddings


def discrimination(centres, real_embeddings, classes, num_classes, sharded):
    """CAFE's discrimination loss for this process's `classes`: their real embeddings [K, n, d] classified by
    their inner products with the class centres of the whole synthetic set, the summed cross-entropy.

    Returns (a surrogate whose gradient with respect to this process's `centres` [K, d] is the loss's, the
    loss's value). The gradient is derived by hand, (softmax - one-hot)^T @ embeddings for each class, and
    summed over every class of every process exactly (exact_sum), so that any number of processes
    gives the same synthetic set, bit for bit."""
    all_centres = torch.zeros(num_classes, centres.shape[1], device=centres.device)
    all_centres[classes] = centres.detach()
    broadcast_shards(all_centres, num_classes)  # every class's centre, from the process that moves it
    value, grads = 0.0, []
    for c, e in zip(classes, real_embeddings):
        log_p = torch.log_softmax(e @ all_centres.t(), dim=1)
        value -= log_p[:, c].sum().item()
        p = log_p.exp()
        p[:, c] -= 1
        grads.append(p.t() @ e)
    centre_grads = exact_sum(grads, all_centres, across=sharded)
    return (centres * centre_grads[classes]).sum(), value


def exact_sum(parts, like, across=True):
    """The sum of a list of float32 tensors shaped like `like`, over all processes (`across`; else this
    process's only), computed exactly in 64-bit fixed point: it does not depend on how the terms are
    grouped in processes, so any number of processes gives the same float32 result, bit for bit."""
    reduce, reduce_max = (all_reduce, all_reduce_max) if across else (lambda t: t, lambda t: t)
    stats = torch.tensor([max([float(p.abs().max()) for p in parts] + [0.0]), len(parts)], dtype=torch.float64,
                         device=like.device)
    top = reduce_max(stats[:1].clone()).item()
    count = reduce(stats[1:].clone()).item()
    if top == 0:
        return torch.zeros_like(like)
    scale = 2.0 ** (61 - math.ceil(math.log2(top * count)))  # every term and the sum fit in 62 bits
    total = torch.zeros(like.shape, dtype=torch.int64, device=like.device)
    for p in parts:
        total += (p.double() * scale).round().long()
    return (reduce(total).double() / scale).float()


def all_reduce_max(t):
    """The maximum of tensor t over all processes (in place)."""
    if Group.current().world > 1:
        torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MAX)
        COMMUNICATED[0] += t.nbytes
    return t


def query_accuracy(net, real, args, num_classes):
    """The network's accuracy on a fresh draw of --query real images per class (each process draws its
    share of the classes, from streams of their own; the correct answers are summed)."""
    classes = shard(num_classes)
    images = [real.get_images(c, args.query, 'query') for c in classes]
    labels = torch.cat([torch.full((len(x),), c, device=args.device) for c, x in zip(classes, images)])
    counts = torch.stack([correct(net, torch.cat(images), labels).double(), torch.tensor(len(labels), dtype=torch.float64,
                                                                                       device=args.device)])
    right, total = all_reduce(counts).tolist()
    return right / total


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


class CAFE(Method):
    eval_interval = 100
    noaug_epochs = 600  # the public code's evaluation without augmentation
    joint_batchnorm = True

    def __init__(self, args, data):
        super().__init__(args, data)
        self.milestones = [round(f * args.Iteration) for f in (0.6, 0.8, 0.9)]  # 1200, 1600, 1800 of 2000

    def iteration(self, it, syn, real):
        args, num_classes = self.args, self.data.num_classes
        for group in syn.optimizer.param_groups:  # halved at each milestone
            group['lr'] = args.lr_img * 0.5 ** sum(it >= m for m in self.milestones)
        net = self.network()
        optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
        syn_loader = tensor_loader(syn.images.detach(), syn.labels, args.batch_train, shuffle=True)  # sees each update
        losses = []

        def outer_step():
            n = min([args.batch_real, *map(len, real.indices_class)])  # as many real images of every class
            classes = syn.classes  # (under torchrun: this process's share)
            pairs = [(real.get_images(c, n), syn.of_class(c)) for c in classes]
            if args.dsa:  # the same transformation for the real and the synthetic batch of a class
                pairs = [siamese_augment(pair, args, real.rng(c)) for c, pair in zip(classes, pairs)]
            img_real, img_syn = map(torch.stack, zip(*pairs))
            net.requires_grad_(False)  # only the synthetic images learn here
            alignment, centre_loss, centres, real_embeddings = cafe_losses(net, img_real, img_syn, args)
            surrogate, value = discrimination(centres, real_embeddings, classes, num_classes, syn.sharded)
            loss = alignment + centre_loss + args.inner_weight * surrogate
            syn.step(loss)
            syn.sync()  # every process trains the network on the whole set and classifies with every centre
            net.requires_grad_(True)
            losses.append(alignment.item() + centre_loss.item() + args.inner_weight * value)

        def inner_step():
            run_epoch('train', syn_loader, net, optimizer_net, F.cross_entropy, args, aug=args.dsa)

        n_outer, n_inner = dynamic_loops(outer_step, inner_step, lambda: query_accuracy(net, real, args, num_classes), args)
        return {'loss': sum(losses) / len(losses) / num_classes, 'outer': n_outer, 'inner': n_inner}


PUBLIC_WEIGHTS = ['first', 'second', 'third', 'fourth']  # the public code's names, from the deepest stage


def default_layer_weights(n_stages):
    """The public code's weights for a depth-3 ConvNet (0.1, 0.1, 1, 1), generalised: 1 for the last
    block and the final feature map, 0.1 for every earlier stage."""
    return [0.1] * (n_stages - 2) + [1.0] * min(2, n_stages)


def parser():
    parser = get_parser('CAFE: dataset condensation by aligning features', methods=['DC', 'DSA'], method='DC', omit=['compile'],
                        Iteration=2000, lr_img=0.1, init='noise', num_exp=1, num_eval=20,
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
    parser.add_argument('--window', type=positive, default=10, help='the number of query accuracies compared')
    parser.add_argument('--query', type=positive, default=128, help='real images per class in a query')
    parser.add_argument('--max_outer', type=positive, default=50, help='at most this many outer steps per iteration')
    parser.add_argument('--max_inner', type=positive, default=50, help='at most this many inner epochs per outer step')
    return parser


def configure(args):
    """Resolve the flags: DSA's augmentation, the output name, the layer weights and the learning-rate milestones."""
    resolve_dsa(args, augments=args.method == 'DSA', required={'DC': False, 'DSA': True}.get(args.method))
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
    return args


if __name__ == '__main__':
    run_script(lambda: condense(CAFE, configure(setup(parser().parse_args()))))
