"""IDM: Improved Distribution Matching for Dataset Condensation (Zhao et al., CVPR 2023), as the authors'
code (uitrbn/IDM, command.txt) runs it.

The stored set is storage-equal to DM's: each image is a 2x2 mosaic of four smaller images of its class
(--factor 2), split into its four tiles and upsampled back to full size before matching and before
evaluation. A queue of models trains on real data alongside the condensation. Each iteration one model of
the queue embeds real and synthetic images of every class; the loss of a class is DM's distance between
the mean embeddings (one DSA draw shared by both batches) plus --ce_weight x that model's running training
accuracy (percent) x the cross-entropy of its classifier on the class's synthetic images; the images take
one SGD step per class, in turn. Then --fetch_net_num models of the queue train --model_train_steps steps
on random real images.
"""
import torch
import torch.nn.functional as F

from runs import Method, condense, get_parser, positive, resolve_dsa, run_script, setup
from utils import UsageError, embed, expand, siamese_augment, tile_slices


class IDM(Method):
    """The stored set is factor x factor mosaics (init_images, training_set); a queue of models trains on real
    images alongside (start, state_dict: checkpoints keep it)."""
    stateful = True

    @staticmethod
    def defaults(dataset, ipc):
        """The settings of the authors' command.txt for a dataset and ipc (the flags given override them)."""
        own = authors_defaults(dataset, ipc)
        return dict(Iteration=20000, lr_img=0.2, init='real', factor=2, net_num=100, fetch_net_num=2, trained_bs=256,
                    **own, reset_every=own['eval_interval'])

    @property
    def eval_interval(self):
        return self.args.eval_interval

    def init_images(self, real):
        return mosaic_init(real, self.args.ipc, self.args.factor)

    def start(self, real):
        """The authors' queue: 3 fresh models at the start (one more every --net_generate_interval iterations),
        SGD lr --lr_net, momentum 0.9, weight decay 5e-4 (--net_decay)."""
        args = self.args
        self.queue = ModelQueue(self.network, args.net_num,
                                lambda p: torch.optim.SGD(p, lr=args.lr_net, momentum=0.9, weight_decay=5e-4))
        for _ in range(3):
            self.queue.push()

    def iteration(self, it, syn, real):
        args, queue = self.args, self.queue
        if it and it % args.reset_every == 0:  # (the authors reset the meters at their evaluation iterations)
            queue.reset_meters()
        if it % args.net_generate_interval == 0:
            queue.push()
        i = int(torch.randint(len(queue), ()))
        loss = match(queue.models[i], queue.accuracy(i), syn, real, args)
        for j in torch.randperm(len(queue))[:args.fetch_net_num].tolist():
            for _ in range(args.model_train_steps):
                queue.train_step(j, *real.sample(args.trained_bs))
        return loss

    def state_dict(self):
        return self.queue.state_dict()

    def load_state_dict(self, state):
        self.queue.load_state_dict(state)

    def training_set(self, images, labels):
        """The set that models train on: every stored mosaic expanded to its factor² images."""
        return expand(images, labels, self.args.factor)


class ModelQueue:
    """Models that train alongside the condensation: each with its optimiser and an accuracy meter of the
    batches it trained on; at most `size`, the oldest dropped. `network()` makes a freshly initialised model
    (from torch's global generator), `optimizer(parameters)` its optimiser."""

    def __init__(self, network, size, optimizer):
        self.network, self.size, self.optimizer = network, size, optimizer
        self.models, self.optimizers, self.right, self.seen = [], [], [], []

    def __len__(self):
        return len(self.models)

    def push(self):
        """A freshly initialised model, with a new optimiser and meter."""
        self.models.append(self.network().train())
        self.optimizers.append(self.optimizer(self.models[-1].parameters()))
        device = next(self.models[-1].parameters()).device
        self.right.append(torch.zeros((), dtype=torch.long, device=device))
        self.seen.append(0)
        if len(self.models) > self.size:
            for kept in (self.models, self.optimizers, self.right, self.seen):
                kept.pop(0)

    def accuracy(self, i):
        """Model i's accuracy in percent on the batches it trained on since the meters were reset (0 before
        any), as a device tensor: no host sync."""
        return self.right[i] * (100.0 / self.seen[i]) if self.seen[i] else torch.zeros((), device=self.right[i].device)

    def reset_meters(self):
        self.right = [torch.zeros_like(r) for r in self.right]
        self.seen = [0] * len(self.seen)

    def train_step(self, i, images, labels):
        """One optimiser step of model i on a batch (cross-entropy, train mode); its meter counts the batch."""
        net, optimizer = self.models[i], self.optimizers[i]
        net.train()
        logits = net(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.right[i] += (logits.detach().argmax(1) == labels).sum()
        self.seen[i] += len(labels)

    def state_dict(self):
        return dict(models=[m.state_dict() for m in self.models], optimizers=[o.state_dict() for o in self.optimizers],
                    right=[int(r) for r in self.right], seen=list(self.seen))

    def load_state_dict(self, state):
        self.models, self.optimizers, self.right, self.seen = [], [], [], []
        with torch.random.fork_rng(devices=[]):  # (rebuilding draws initial weights, which the state replaces)
            for _ in state['models']:
                self.push()
        for model, optimizer, s, o in zip(self.models, self.optimizers, state['models'], state['optimizers']):
            model.load_state_dict(s)
            optimizer.load_state_dict(o)
        self.right = [torch.tensor(r, device=rr.device) for r, rr in zip(state['right'], self.right)]
        self.seen = list(state['seen'])


def match(net, accuracy, syn, real, args):
    """The class-by-class image steps (see class_steps) on IDM's loss under `net`; returns the mean loss."""
    net.eval().requires_grad_(False)  # only the images learn here
    losses = []

    def class_loss(c, images):  # images: class c's stored images, where its own step finds them
        img_real, img_syn = siamese_augment([real.get_images(c, args.batch_real), expand(images, None, args.factor)[0]],
                                            args, real.rng(c))
        features = net.embed(img_syn)  # one forward for the features and the logits
        logits = net.classifier(features).float()
        distance = (embed(net, img_real).mean(0) - features.float().mean(0)).square().sum()
        labels = torch.full((len(logits),), c, device=logits.device)
        loss = distance + args.ce_weight * accuracy * F.cross_entropy(logits, labels)
        losses.append(loss.detach())
        return loss

    class_steps(syn, class_loss)
    net.requires_grad_(True)
    return torch.stack(losses).sum().item() / syn.num_classes


@torch.no_grad()
def class_steps(syn, class_loss):
    """The authors' update: for every class in turn, one SGD step of the whole synthetic set (lr --lr_img,
    momentum 0.5) on that class's loss. A class's loss depends on its own images only, so the images of
    class c take c momentum-only steps, then their own step, then the remaining ones; here all classes of
    this process move through those steps together, with the same arithmetic as SGD's, and each class's
    gradient is taken where its own step finds its images."""
    x, opt = syn.images, syn.optimizer
    lr, m = opt.param_groups[0]['lr'], opt.param_groups[0]['momentum']
    buf = opt.state[x].get('momentum_buffer')
    if buf is None:  # (SGD's first step starts the buffer at the gradient, as 0 * momentum + gradient does)
        buf = opt.state[x]['momentum_buffer'] = torch.zeros_like(x)
    mine, K = syn.of_classes(), syn.num_classes
    lo, hi, ipc = mine.start, mine.stop, syn.ipc

    def momentum_steps(rows):  # rows of x take one step without a gradient of their own
        if rows.stop > rows.start:
            buf[rows].mul_(m)
            x[rows].add_(buf[rows], alpha=-lr)

    for k in range(K - 1):  # classes after k take class k's step
        momentum_steps(slice(max(lo, (k + 1) * ipc), hi))
    grad = torch.zeros_like(x)
    for c in syn.classes:
        with torch.enable_grad():
            images = x[c * ipc:(c + 1) * ipc].detach().requires_grad_(True)
            grad[c * ipc:(c + 1) * ipc] = torch.autograd.grad(class_loss(c, images), images)[0]
    for k in range(K):  # class k's own step; the classes before it take it without a gradient
        own = slice(max(lo, k * ipc), min(hi, (k + 1) * ipc))
        if own.stop > own.start:
            buf[own].mul_(m).add_(grad[own])
            x[own].add_(buf[own], alpha=-lr)
        momentum_steps(slice(lo, min(hi, k * ipc)))


def mosaic_init(real, ipc, factor):
    """Every stored image a mosaic of factor² distinct real images of its class, each shrunk into its tile."""
    n = factor ** 2 * ipc
    fewest = min(map(len, real.indices_class))
    if n > fewest:
        raise UsageError(f'--ipc {ipc} with --factor {factor} starts from {n} real images per class; the '
                         f'smallest class has {fewest}')
    return torch.cat([mosaic(real.get_images(c, n), factor) for c in range(len(real.indices_class))])


def mosaic(tiles, factor=2):
    """The inverse of expand's layout: factor² groups of N images (in expand's tile order), each shrunk
    (bilinear) into its tile of N mosaics."""
    N, C, H, W = tiles.shape[0] // factor ** 2, *tiles.shape[1:]
    out = torch.empty(N, C, H, W, dtype=tiles.dtype, device=tiles.device)
    for group, (rows, cols) in zip(tiles.split(N), tile_slices(H, W, factor)):
        out[..., rows, cols] = F.interpolate(group, size=(rows.stop - rows.start, cols.stop - cols.start),
                                             mode='bilinear', align_corners=False)
    return out


# The authors' settings by dataset and ipc (command.txt): the weight of the cross-entropy, the evaluation
# interval (their meters reset there too), the queue's training steps; others follow CIFAR10's.
CE_WEIGHT = {'CIFAR10': {1: 0.5, 10: 0.5, 50: 0.1}, 'CIFAR100': {1: 0.5, 10: 0.1, 50: 0.1},
             'TinyImageNet': {1: 0.5, 10: 0.5, 50: 0.8}}
EVAL_INTERVAL = {'TinyImageNet': {1: 100, 10: 500, 50: 1000}}
TRAIN_STEPS = {'CIFAR100': {10: 50}, 'TinyImageNet': {50: 50}}


def by_ipc(table, ipc):
    """The value of the nearest ipc at or below (the smallest one's below it)."""
    return table[max([k for k in table if k <= ipc], default=min(table))]


def authors_defaults(dataset, ipc):
    return dict(ce_weight=by_ipc(CE_WEIGHT.get(dataset, CE_WEIGHT['CIFAR10']), ipc),
                eval_interval=by_ipc(EVAL_INTERVAL.get(dataset, {1: 100, 50: 500}), ipc),
                model_train_steps=TRAIN_STEPS.get(dataset, {}).get(ipc, 10),
                batch_real=5000 if ipc == 1 else 256, net_generate_interval=5 if ipc == 1 else 30)


def parser():
    p = get_parser('IDM: improved distribution matching', methods=['IDM'], method='IDM', ipc=10, num_exp=5,
                   num_eval=5, eval_mode='S', Iteration=None, lr_img=None, init='real', dsa_strategy=None,
                   batch_real=None, unused={'dis_metric': 'does not apply to IDM: it matches embeddings, not gradients'},
                   rules={'dsa_strategy': 'default: color_crop_cutout_flip_scale_rotate, without flip for MNIST and SVHN',
                          'batch_real': 'default: 5000 at ipc 1, else 256', 'Iteration': 'default: 20000',
                          'lr_img': 'default: 0.2'})
    add = p.add_argument
    add('--factor', type=int, default=None, choices=[1, 2],
        help='stored images are factor x factor mosaics, expanded to factor² images each (1: plain images; default: 2)')
    add('--ce_weight', type=float, default=None,
        help='weight of the accuracy-weighted cross-entropy (default: the authors\', by dataset and ipc: 0.5, or 0.1 '
             'at ipc 50 on CIFAR10 and from ipc 10 on CIFAR100; TinyImageNet 0.5, 0.8 at ipc 50)')
    add('--eval_interval', type=positive, default=None,
        help='evaluate every N iterations in modes S/SS (default: the authors\': 100, 500 from ipc 50; TinyImageNet '
             '1000 at ipc 50)')
    add('--reset_every', type=positive, default=None, help='reset the queue\'s accuracy meters every N iterations '
                                                      '(default: --eval_interval, as the authors do)')
    add('--net_generate_interval', type=positive, default=None, help='add a model to the queue every N iterations '
                                                                '(default: 5 at ipc 1, else 30)')
    add('--net_num', type=positive, default=None, help='at most this many models in the queue (the oldest is dropped; '
                                                       'default: 100)')
    add('--fetch_net_num', type=positive, default=None,
        help='models of the queue that train on real images each iteration (default: 2)')
    add('--model_train_steps', type=positive, default=None,
        help='SGD steps of each of them (default: 10; 50 on CIFAR100 at ipc 10 and TinyImageNet at ipc 50)')
    add('--trained_bs', type=positive, default=None, help='real images per step of the queue\'s training (default: 256)')
    return p


def configure(args):
    """Resolve the flags: the authors' defaults by dataset and ipc, DSA's augmentation (always on)."""
    for k, v in IDM.defaults(args.dataset, args.ipc).items():
        if getattr(args, k) is None:
            setattr(args, k, args.eval_interval if k == 'reset_every' else v)  # (every N evaluations, as the authors)
    if args.init != 'real':
        raise UsageError('--init noise does not apply to IDM: its images start as mosaics of real images')
    if args.ce_weight < 0:
        raise UsageError(f'--ce_weight must not be negative, got {args.ce_weight}')
    return resolve_dsa(args, augments=True)


if __name__ == '__main__':
    run_script(lambda: condense(IDM, configure(setup(parser().parse_args()))))
