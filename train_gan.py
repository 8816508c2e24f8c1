"""Train IT-GAN's class-conditional generator (gan.py) on a dataset of the toolkit.

IT-GAN (Zhao & Bilen, "Synthesizing Informative Training Samples with GAN", 2022) learns latent vectors of a
frozen class-conditional generator: the DiffAugment-BigGAN for CIFAR of Zhao et al. ("Differentiable
Augmentation for Data-Efficient GAN Training", 2020), in gan.py (`--arch biggan`, or `small` for CPU budgets:
3000 iterations, about an hour of one CPU core for Fashion-MNIST). This script trains it with the recipe of
DiffAugment-biggan-cifar10.sh: hinge loss, spectral norm in G and D, a projection discriminator, Adam (lr 2e-4,
betas 0 and 0.999), 4 D steps per G step, batch 50, DiffAugment on real and generated images before D (here
color_crop_cutout: every transformation, drawn per image), mirrored real images, and a moving average of G's
weights (decay 0.9999 from iteration 1000): the generator saved.

    python train_gan.py --dataset FashionMNIST --arch small
    python train_gan.py --dataset CIFAR10 --arch biggan --Iteration 2000 --resume auto

Writes in --save_path: G_<dataset>_<arch>.pt (the moving average of G, for gan.load_generator),
vis_GAN_<dataset>_<arch>.png (its samples, one row per class) and checkpoints checkpoint_GAN_<dataset>_<arch>_<it>.pt
(the newest two), every --checkpoint_every iterations and at the end; --resume auto continues bit for bit, also to
a larger --Iteration.
"""
import argparse
import functools
import math
import os

import torch
import torch.nn.functional as F

import utils
from gan import ARCHS, Discriminator, build_generator, channel_stats, generator_record, render
from runs import (Checkpoints, Flags, check_record, exclusive, get_parser, natural, positive, positive_float, progress,
                  run_script, setup, signature)
from utils import DIGITS, DataInfo, Diverged, Group, UsageError, atomic_save, atomic_write, autocast, load_pt, say

RECIPES = {  # the training defaults of each arch (biggan: DiffAugment-biggan-cifar10.sh)
    'biggan': dict(Iteration=250000, batch_size=50, num_D_steps=4, ema_decay=0.9999, ema_start=1000),  # 1000 epochs
    'small': dict(Iteration=3000, batch_size=50, num_D_steps=2, ema_decay=0.999, ema_start=1000),  # ~1 CPU-hour
}
STRATEGY = 'color_crop_cutout'  # DiffAugment's color,translation,cutout in the toolkit's names
ALL_IN_TURN = utils.ParamDiffAug()
ALL_IN_TURN.aug_mode = 'M'  # every transformation in turn, as DiffAugment does


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

class GAN:
    """G, D, the moving average of G (the generator saved) and the two Adam optimisers."""

    def __init__(self, args, data):
        utils.set_seed(args.seed, 'init')
        shape = (data.num_classes, data.channel, data.im_size)
        self.G = build_generator(args.arch, *shape).to(args.device)
        self.D = Discriminator(*shape, D_ch=ARCHS[args.arch]['D_ch']).to(args.device)
        self.G_ema = build_generator(args.arch, *shape).to(args.device).eval().requires_grad_(False)
        self.G_ema.load_state_dict(self.G.state_dict())
        self.G_ema.mean, self.G_ema.std = data.mean, data.std
        adam = functools.partial(torch.optim.Adam, betas=(0.0, 0.999), eps=1e-8)
        self.opt_G, self.opt_D = adam(self.G.parameters(), lr=args.lr_G), adam(self.D.parameters(), lr=args.lr_D)

    def state_dict(self):
        return {k: getattr(self, k).state_dict() for k in ('G', 'D', 'G_ema', 'opt_G', 'opt_D')}

    def load_state_dict(self, state):
        for k, v in state.items():
            getattr(self, k).load_state_dict(v)


@torch.no_grad()
def ema_update(G_ema, G, decay):
    """G_ema <- decay * G_ema + (1 - decay) * G, over every parameter and buffer (as the recipe's utils.ema)."""
    ours = G.state_dict()
    for k, v in G_ema.state_dict().items():
        v.mul_(decay).add_(ours[k], alpha=1 - decay)


def augment(x, args, g):
    """DiffAugment before D: every transformation of the strategy in turn, drawn per image from `g`."""
    return utils.DiffAugment(x, args.dsa_strategy, param=ALL_IN_TURN, generator=g)


@functools.lru_cache(maxsize=2)
def _epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=utils.generator(seed, 'epoch', epoch))


def real_batch(real, start, n, args, g):
    """Real images [start, start + n) of the stream of shuffled epochs (a new order each epoch, from the seed:
    no state to carry across a resume), mirrored at random unless the data are digits."""
    images, labels = real
    positions = torch.arange(start, start + n)
    epochs, idx = positions // len(labels), torch.empty_like(positions)
    for e in epochs.unique().tolist():
        idx[epochs == e] = _epoch_order(len(labels), args.seed, e)[positions[epochs == e] % len(labels)]
    x, y = images[idx.to(images.device)], labels[idx.to(labels.device)]
    if args.mirror:
        flip = (torch.rand(n, generator=g) < 0.5).to(x.device).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
    return x, y


def latents(n, gan, args, g):
    z = torch.randn(n, gan.G.dim_z, generator=g).to(args.device)
    return z, torch.randint(gan.G.num_classes, (n,), generator=g).to(args.device)


def d_step(gan, x_real, y_real, args, g):
    """One step of D on hinge loss: real images above +1, generated ones below -1 (both augmented)."""
    z, y_fake = latents(len(x_real), gan, args, g)
    with torch.no_grad(), autocast(args):
        fake = gan.G(z, y_fake)
    with autocast(args):
        out = gan.D(augment(torch.cat([fake, x_real]), args, g), torch.cat([y_fake, y_real])).float()
    d_fake, d_real = out.split([len(fake), len(x_real)])
    loss_real, loss_fake = F.relu(1 - d_real).mean(), F.relu(1 + d_fake).mean()
    gan.opt_D.zero_grad()
    (loss_real + loss_fake).backward()
    gan.opt_D.step()
    return loss_real.item(), loss_fake.item()


def g_step(gan, args, g):
    """One step of G on hinge loss (-D of its augmented images), D frozen."""
    z, y = latents(args.batch_size, gan, args, g)
    gan.D.requires_grad_(False)
    with autocast(args):
        loss = -gan.D(augment(gan.G(z, y), args, g), y).float().mean()
    gan.opt_G.zero_grad()
    loss.backward()
    gan.opt_G.step()
    gan.D.requires_grad_(True)
    return loss.item()


def train_iteration(it, gan, real, args):
    """Iteration `it` (0-based): num_D_steps steps of D, one of G, the moving average; every draw from a
    stream seeded by (seed, it), so that a resumed run repeats an uninterrupted one bit for bit."""
    g = utils.generator(args.seed, 'iteration', it)
    gan.G.train()
    gan.D.train()
    for s in range(args.num_D_steps):
        x, y = real_batch(real, (it * args.num_D_steps + s) * args.batch_size, args.batch_size, args, g)
        loss_real, loss_fake = d_step(gan, x, y, args, g)
    loss_G = g_step(gan, args, g)
    ema_update(gan.G_ema, gan.G, 0.0 if it + 1 < args.ema_start else args.ema_decay)  # (the recipe counts from 1)
    stats = dict(D_real=loss_real, D_fake=loss_fake, G=loss_G)
    if not all(map(math.isfinite, stats.values())):
        raise Diverged(f'the GAN diverged at iteration {it} ({", ".join(f"{k} {v:.3g}" for k, v in stats.items())}); '
                       'what was saved is kept')
    return stats


# ----------------------------------------------------------------------------------------------------
# Files: generator, samples, checkpoints
# ----------------------------------------------------------------------------------------------------

def run_name(args):
    return f'GAN_{args.dataset}_{args.arch}'


def generator_path(args):
    return os.path.join(args.save_path, f'G_{args.dataset}_{args.arch}.pt')


def vis_path(args):
    return os.path.join(args.save_path, f'vis_{run_name(args)}.png')


@torch.no_grad()
def save_samples(G, args, data):
    """samples_per_class images of every class from fixed latents, one row per class."""
    from torchvision.utils import save_image  # imported here: torchvision takes seconds to import
    n = args.samples_per_class
    g = utils.generator(args.seed, 'samples')
    z = torch.randn(data.num_classes * n, G.dim_z, generator=g).to(args.device)
    labels = torch.arange(data.num_classes, device=args.device).repeat_interleave(n)
    with autocast(args):
        images = torch.cat([render(G, zc, yc).float() for zc, yc in zip(z.split(500), labels.split(500))])
    vis = utils.denormalise(images.cpu(), data.mean, data.std)
    atomic_write(vis_path(args), lambda tmp: save_image(vis, tmp, nrow=n, format='png'))


class Training:
    """The run's files: its checkpoints (the shared primitive, runs.Checkpoints), the generator and its samples."""

    def __init__(self, args, data, group):
        self.args, self.data = args, data
        # what identifies the run: not --Iteration, so that a finished run can be continued further
        self.signature = {k: v for k, v in signature(args, data).items() if k not in ('Iteration', 'samples_per_class')}
        self.checkpoints = Checkpoints(os.path.join(args.save_path, f'checkpoint_{run_name(args)}_'), self.signature,
                                       group, args.checkpoint_every, expected={'it': int, 'gan': dict})
        self.old_checkpoint = os.path.join(args.save_path, f'checkpoint_{run_name(args)}.pt')  # (before 0.2.0)

    def save(self, gan, it):
        """The state after `it` iterations, the generator file and the samples."""
        self.checkpoints.save(it, dict(it=it, finished=it == self.args.Iteration, gan=gan.state_dict()))
        atomic_save(generator_record(gan.G_ema, self.args.arch, self.args.dataset, it, self.signature),
                    generator_path(self.args))
        save_samples(gan.G_ema, self.args, self.data)

    def read_signed(self, path):
        """A file of ours in the save path, refused when a run with other settings wrote it."""
        obj = load_pt(path)
        check_record(path, obj.get('signature') if isinstance(obj, dict) else None, self.signature)
        return obj

    def claim(self):
        """Make sure this run may write its files: --overwrite removes those of an earlier run; otherwise they
        must come from a run with these settings, and an unfinished run's checkpoint is continued (--resume),
        never silently replaced."""
        args = self.args
        if args.overwrite:
            for path in [*self.checkpoints.paths(), self.old_checkpoint, generator_path(args), vis_path(args)]:
                if os.path.exists(path):
                    os.remove(path)
            return
        if os.path.exists(self.old_checkpoint):
            raise UsageError(f'{self.old_checkpoint} is a checkpoint of an earlier version of train_gan.py, which this '
                             'one does not read; start afresh with --overwrite')
        if os.path.exists(generator_path(args)):
            self.read_signed(generator_path(args))
        newest = self.checkpoints.paths()[:1]
        if args.resume == 'none' and newest and not self.read_signed(newest[0]).get('finished'):
            raise UsageError(f'an unfinished run left {newest[0]}: continue it with --resume auto, '
                             'or start afresh with --overwrite')

    def resume(self, gan):
        """The iteration to start from: 0, or that of the checkpoint --resume names (auto: the newest, if any)."""
        args = self.args
        state = self.checkpoints.load(args.resume) if args.resume != 'none' else None
        if state is None:
            if args.resume == 'auto':
                say('no checkpoint to resume from: starting afresh')
            return 0
        path = self.checkpoints.last_path
        if state['it'] > args.Iteration:
            raise UsageError(f'{path} is at iteration {state["it"]}, beyond --Iteration {args.Iteration}')
        try:
            gan.load_state_dict(state['gan'])
        except (RuntimeError, KeyError, ValueError, AttributeError) as e:
            raise UsageError(f'{path} does not fit this GAN: {str(e).strip().splitlines()[0][:200]}') from None
        say(f'resuming from {path}: iteration {state["it"]}')
        return state['it']

    def train(self, gan, real, start, group):
        """Iterations start .. Iteration-1, with checkpoints every --checkpoint_every iterations (default: about
        every 10 minutes) and at the end."""
        args = self.args
        bar = progress(range(start, args.Iteration), group, initial=start, total=args.Iteration, desc=run_name(args))
        for it in bar:
            bar.set_postfix({k: f'{v:.3f}' for k, v in train_iteration(it, gan, real, args).items()}, refresh=False)
            self.checkpoints.tick()
            if self.checkpoints.due() and it + 1 < args.Iteration:
                self.save(gan, it + 1)
        self.save(gan, args.Iteration)


# ----------------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------------

def parser():
    p = get_parser(__doc__.split('\n\n')[0], groups=('data', 'run'), save_path='result',
                   help={'save_path': 'where the generator, samples and checkpoints go',
                         'seed': 'the same seed gives the same generator',
                         'amp': 'bfloat16 autocast for G and D (weights, optimiser states and losses stay float32)',
                         'checkpoint_every': 'save a checkpoint every N iterations (default: about every 10 minutes), '
                                             'and at the end'})
    add = p.add_argument
    add('--arch', default='biggan', choices=list(ARCHS),
        help="biggan: the authors' BigGAN-32 (256 channels); small: 32 channels, for CPU budgets")
    add('--Iteration', type=natural, default=None,
        help="G steps (default: 250000 for biggan, the recipe's 1000 epochs of CIFAR-10; 3000 for small)")
    add('--batch_size', type=positive, default=None, help='images per D and G step (default: 50)')
    add('--num_D_steps', type=positive, default=None, help='D steps per G step (default: 4 for biggan, 2 for small)')
    add('--lr_G', type=positive_float, default=2e-4, help="G's Adam learning rate")
    add('--lr_D', type=positive_float, default=2e-4, help="D's Adam learning rate")
    add('--ema_decay', type=float, default=None,
        help="decay of the moving average of G's weights (default: 0.9999 for biggan, 0.999 for small)")
    add('--ema_start', type=natural, default=None, help='the moving average copies G before this iteration '
                                                        '(default: 1000)')
    add('--dsa_strategy', default=STRATEGY,
        help='DiffAugment before D: _-separated transformations (color crop cutout flip scale rotate), all applied, '
             'per image, or None')
    add('--mirror', action=argparse.BooleanOptionalAction, default=None,
        help=f'flip real images at random (default: on, except for {" and ".join(DIGITS)})')
    add('--samples_per_class', type=positive, default=10, help='images per class in the sample grid')
    return p


def configure(args):
    """Resolve the defaults of the arch and the dataset, check the flags."""
    for k, v in RECIPES[args.arch].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.mirror is None:
        args.mirror = args.dataset not in DIGITS
    if not 0 <= args.ema_decay < 1:
        raise UsageError(f'--ema_decay must lie in [0, 1), got {args.ema_decay}')
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise UsageError('train_gan.py trains in one process; start it without torchrun')
    return args


def load_data(args):
    """The training images in G's range [-1, 1] (converted in place: the dataset is held once), their labels,
    and the DataInfo."""
    loaded = utils.get_dataset(args.dataset, args.data_path, args.im_size, args.device)
    data, images = DataInfo.of(args.dataset, loaded), loaded[6].images
    images.mul_(channel_stats(data.std, images)).add_(channel_stats(data.mean, images)).mul_(2).sub_(1)
    return (images, loaded[6].labels), data


def main():
    args = Flags.freeze(configure(setup(parser().parse_args())))
    real, data = load_data(args)
    training, group = Training(args, data, Group.current()), Group.current()
    with exclusive(os.path.join(args.save_path, f'.lock_{run_name(args)}'), generator_path(args), group):
        training.claim()
        gan = GAN(args, data)
        training.train(gan, real, training.resume(gan), group)
    say(f'saved {generator_path(args)} (the moving average of G after {args.Iteration} iterations) '
        f'and {vis_path(args)}')


if __name__ == '__main__':
    run_script(main)
