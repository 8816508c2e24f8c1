"""IT-GAN's generator: train a class-conditional GAN on a dataset of the toolkit, and load one back.

IT-GAN (Zhao & Bilen, "Synthesizing Informative Training Samples with GAN", 2022) learns latent vectors of a
frozen class-conditional generator: the DiffAugment-BigGAN for CIFAR of Zhao et al. ("Differentiable
Augmentation for Data-Efficient GAN Training", 2020). This file holds

- that generator (`--arch biggan`: G_ch 64, dim_z 128, bottom width 4, BigGAN's own spectral norm with u0/sv0
  buffers, class-conditional BatchNorm, tanh output in [-1, 1]) under the authors' parameter and buffer names,
  so that their released `G_Pretrained_<dataset>_exp<e>.pth` loads with strict=True; and a narrower one for
  CPU budgets (`--arch small`: 32 channels instead of 256, two upsampling blocks from a quarter of the image
  size; 3000 iterations, about an hour of one CPU core for Fashion-MNIST);
- `render(G, z, labels)`: images in the dataset's normalisation, and `load_generator(path, ...)`, which
  reads our generator files or the authors' bare state dicts without running code from them;
- the training recipe of DiffAugment-biggan-cifar10.sh: hinge loss, spectral norm in G and D, a projection
  discriminator, Adam (lr 2e-4, betas 0 and 0.999), 4 D steps per G step, batch 50, DiffAugment on real and
  generated images before D (here color_crop_cutout: every transformation, drawn per image), mirrored real
  images, and a moving average of G's weights (decay 0.9999 from iteration 1000): the generator saved.

Sizes that bottom_width * 2**k does not reach exactly are generated larger and centre-cropped: BigGAN-32
makes 28x28 images (MNIST, Fashion-MNIST) as 32x32 with 2 pixels cropped at each side; the small arch makes
them exactly (7 -> 14 -> 28).

    python train_gan.py --dataset FashionMNIST --arch small
    python train_gan.py --dataset CIFAR10 --arch biggan --Iteration 2000 --resume auto

Writes in --save_path: G_<dataset>_<arch>.pt (the moving average of G, for load_generator),
vis_GAN_<dataset>_<arch>.png (its samples, one row per class) and checkpoint_GAN_<dataset>_<arch>.pt, every
--checkpoint_every iterations and at the end; --resume auto continues bit for bit, also to a larger --Iteration.
"""
import argparse
import functools
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import runs
import utils
from runs import ArgumentParser, check_record, exclusive, run_script, writable_folder
from utils import DATASETS, DIGITS, Diverged, UsageError, atomic_save, atomic_write, autocast, load_pt

ARCHS = {  # the networks (G_ch, D_ch: channels per unit of width; each block has 4 units, as BigGAN-32)
    'biggan': dict(G_ch=64, D_ch=64, dim_z=128, bottom_width=4),
    'small': dict(G_ch=8, D_ch=8, dim_z=128, bottom_width=None),  # None: a quarter of the size (7 for 28x28)
}
RECIPES = {  # the training defaults of each arch (biggan: DiffAugment-biggan-cifar10.sh)
    'biggan': dict(Iteration=250000, batch_size=50, num_D_steps=4, ema_decay=0.9999, ema_start=1000),  # 1000 epochs
    'small': dict(Iteration=3000, batch_size=50, num_D_steps=2, ema_decay=0.999, ema_start=1000),  # ~1 CPU-hour
}
BN_EPS, SN_EPS = 1e-5, 1e-8  # the authors' BN_eps and SN_eps
STRATEGY = 'color_crop_cutout'  # DiffAugment's color,translation,cutout in the toolkit's names


# ----------------------------------------------------------------------------------------------------
# BigGAN's layers, under the names of its state dicts
# ----------------------------------------------------------------------------------------------------

class SpectralNorm:
    """BigGAN's spectral norm (not torch's parametrisation): the weight is divided by its largest singular
    value, estimated by one power iteration per forward pass from the vector `u0` (a buffer, updated in
    training mode only); `sv0` logs the estimate. State dict keys: weight, bias, u0, sv0."""

    def init_spectral_norm(self, rows, eps=SN_EPS):
        self.eps = eps
        self.register_buffer('u0', torch.randn(1, rows))
        self.register_buffer('sv0', torch.ones(1))

    def normalised_weight(self):
        with torch.autocast(self.weight.device.type, enabled=False):  # the estimate in float32, also under --amp
            w = self.weight.float().flatten(1)
            with torch.no_grad():
                v = F.normalize(self.u0 @ w, eps=self.eps)
                u = F.normalize(v @ w.t(), eps=self.eps)
                if self.training:
                    self.u0.copy_(u)
            sv = (v @ w.t() @ u.t()).squeeze()
            if self.training:
                self.sv0.copy_(sv.detach())
            return self.weight / sv


class SNConv2d(nn.Conv2d, SpectralNorm):
    def __init__(self, in_channels, out_channels, kernel_size=3, padding=1):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, padding=padding)
        self.init_spectral_norm(out_channels)

    def forward(self, x):
        return F.conv2d(x, self.normalised_weight(), self.bias, self.stride, self.padding)


class SNLinear(nn.Linear, SpectralNorm):
    def __init__(self, in_features, out_features):
        nn.Linear.__init__(self, in_features, out_features)
        self.init_spectral_norm(out_features)

    def forward(self, x):
        return F.linear(x, self.normalised_weight(), self.bias)


class SNEmbedding(nn.Embedding, SpectralNorm):
    def __init__(self, num_embeddings, embedding_dim):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim)
        self.init_spectral_norm(num_embeddings)

    def forward(self, y):
        return F.embedding(y, self.normalised_weight())


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then a gain 1 + gain[y] and a bias bias[y] per class (BigGAN's
    ccbn without shared embeddings). Keys: stored_mean, stored_var, gain.weight, bias.weight."""

    def __init__(self, channels, num_classes):
        super().__init__()
        self.gain, self.bias = nn.Embedding(num_classes, channels), nn.Embedding(num_classes, channels)
        self.register_buffer('stored_mean', torch.zeros(channels))
        self.register_buffer('stored_var', torch.ones(channels))

    def forward(self, x, y):
        out = F.batch_norm(x, self.stored_mean, self.stored_var, None, None, self.training, 0.1, BN_EPS)
        return out * (1 + self.gain(y))[:, :, None, None] + self.bias(y)[:, :, None, None]


class BatchNorm(nn.Module):
    """BigGAN's plain BatchNorm. Keys: gain, bias, stored_mean, stored_var."""

    def __init__(self, channels):
        super().__init__()
        self.gain, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.register_buffer('stored_mean', torch.zeros(channels))
        self.register_buffer('stored_var', torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.stored_mean, self.stored_var, self.gain, self.bias, self.training, 0.1, BN_EPS)


class GBlock(nn.Module):
    """G's residual block: BN-ReLU-upsample-conv-BN-ReLU-conv, plus an upsampled 1x1-conv shortcut."""

    def __init__(self, in_channels, out_channels, num_classes):
        super().__init__()
        self.conv1, self.conv2 = SNConv2d(in_channels, out_channels), SNConv2d(out_channels, out_channels)
        self.conv_sc = SNConv2d(in_channels, out_channels, kernel_size=1, padding=0)
        self.bn1 = ConditionalBatchNorm(in_channels, num_classes)
        self.bn2 = ConditionalBatchNorm(out_channels, num_classes)

    def forward(self, x, y):
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.conv_sc(F.interpolate(x, scale_factor=2))


class DBlock(nn.Module):
    """D's residual block: (ReLU)-conv-ReLU-conv-(avgpool), plus a 1x1-conv shortcut where the shape changes."""

    def __init__(self, in_channels, out_channels, preactivation, downsample):
        super().__init__()
        self.preactivation, self.downsample = preactivation, downsample
        self.conv1, self.conv2 = SNConv2d(in_channels, out_channels), SNConv2d(out_channels, out_channels)
        self.learnable_sc = in_channels != out_channels or downsample
        if self.learnable_sc:
            self.conv_sc = SNConv2d(in_channels, out_channels, kernel_size=1, padding=0)

    def shortcut(self, x):
        if self.learnable_sc and self.preactivation:
            x = self.conv_sc(x)
        if self.downsample:
            x = F.avg_pool2d(x, 2)
        if self.learnable_sc and not self.preactivation:
            x = self.conv_sc(x)
        return x

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(F.relu(x) if self.preactivation else x)))
        return (F.avg_pool2d(h, 2) if self.downsample else h) + self.shortcut(x)


def init_n02(net):
    """The recipe's initialisation (G_init, D_init N02): N(0, 0.02) weights of convolutions, linear layers
    and embeddings."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0, 0.02)


class Generator(nn.Module):
    """BigGAN's generator for 32x32 images (the authors' Generator(G_ch=64, dim_z=128, bottom_width=4,
    resolution=32, G_attn='0', G_shared=False)): G(z, labels) -> images in [-1, 1]. Keys: linear.*,
    blocks.<i>.0.*, output_layer.0.* (BN), output_layer.2.* (conv). Other sizes: as many upsampling
    blocks as bring bottom_width to the size, then a centre crop."""

    def __init__(self, num_classes, channel=3, im_size=(32, 32), G_ch=64, dim_z=128, bottom_width=4):
        super().__init__()
        self.num_classes, self.channel, self.im_size = num_classes, channel, tuple(im_size)
        bottom_width = bottom_width or math.ceil(max(im_size) / 4)
        self.G_ch, self.dim_z, self.bottom_width, self.width = G_ch, dim_z, bottom_width, 4 * G_ch
        self.mean = self.std = None  # the dataset's normalisation, for render (set by its maker)
        n_blocks = max(1, math.ceil(math.log2(max(im_size) / bottom_width)))
        self.linear = SNLinear(dim_z, self.width * bottom_width ** 2)
        self.blocks = nn.ModuleList([nn.ModuleList([GBlock(self.width, self.width, num_classes)])
                                     for _ in range(n_blocks)])
        self.output_layer = nn.Sequential(BatchNorm(self.width), nn.ReLU(), SNConv2d(self.width, channel))
        init_n02(self)

    def forward(self, z, y):
        h = self.linear(z).view(len(z), self.width, self.bottom_width, self.bottom_width)
        for (block,) in self.blocks:
            h = block(h, y)
        return centre_crop(torch.tanh(self.output_layer(h)), self.im_size)


def centre_crop(x, im_size):
    top, left = (x.shape[2] - im_size[0]) // 2, (x.shape[3] - im_size[1]) // 2
    return x[:, :, top:top + im_size[0], left:left + im_size[1]]


class Discriminator(nn.Module):
    """BigGAN's projection discriminator for 32x32 images (the authors' Discriminator(D_ch=64, D_wide=True,
    resolution=32, D_attn='0'), under its state-dict names): residual blocks that halve the size down to 8x8
    or less, two more, global sum pooling, a linear output plus the projection onto a class embedding."""

    def __init__(self, num_classes, channel=3, im_size=(32, 32), D_ch=64):
        super().__init__()
        downsample, size = [], max(im_size)
        while size > 8:
            downsample.append(True)
            size = math.ceil(size / 2)
        widths = [channel] + [4 * D_ch] * (len(downsample) + 2)
        self.blocks = nn.ModuleList([nn.ModuleList([DBlock(widths[i], widths[i + 1], i > 0, down)])
                                     for i, down in enumerate(downsample + [False, False])])
        self.linear = SNLinear(widths[-1], 1)
        self.embed = SNEmbedding(num_classes, widths[-1])
        init_n02(self)

    def forward(self, x, y):
        for (block,) in self.blocks:
            x = block(x)
        h = F.relu(x).sum((2, 3))
        return (self.linear(h) + (self.embed(y) * h).sum(1, keepdim=True)).squeeze(1)


# ----------------------------------------------------------------------------------------------------
# Rendering, and generators in files
# ----------------------------------------------------------------------------------------------------

def build_generator(arch, num_classes, channel, im_size, **overrides):
    kw = {k: v for k, v in {**ARCHS[arch], **overrides}.items() if k != 'D_ch'}
    return Generator(num_classes, channel, im_size, **kw)


def _stats(values, x):
    return torch.tensor(values, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)


def to_gan_range(images, mean, std):
    """Images in a dataset's normalisation -> G's range [-1, 1]."""
    return (images * _stats(std, images) + _stats(mean, images)) * 2 - 1


def render(G, z, labels, mean=None, std=None):
    """G's images for latents z and class labels, in the dataset's normalisation: G's output in [-1, 1]
    mapped to [0, 1] pixels, then normalised with the dataset's mean and std (default: G.mean, G.std, which
    load_generator sets). Differentiable with respect to z (IT-GAN learns z)."""
    mean, std = (G.mean if mean is None else mean), (G.std if std is None else std)
    if mean is None or std is None:
        raise UsageError("render needs the dataset's mean and std (give them to load_generator or render)")
    x = (G(z, labels) + 1) / 2
    return (x - _stats(mean, x)) / _stats(std, x)


def generator_record(G, arch, dataset, iteration, signature):
    """What our generator files hold (plain data, loadable with weights only)."""
    return dict(arch=arch, num_classes=G.num_classes, channel=G.channel, im_size=list(G.im_size), dim_z=G.dim_z,
                G_ch=G.G_ch, bottom_width=G.bottom_width, mean=list(G.mean), std=list(G.std), dataset=dataset,
                iteration=iteration, signature=signature, state_dict=G.state_dict())


def require_tensors(path, state):
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f'{path} holds neither a generator of train_gan.py nor a state dict of tensors')


def check_fit(path, G, state):
    """One line saying why the state dict `state` does not fit G, if it does not."""
    ours = G.state_dict()
    require_tensors(path, state)
    missing, unexpected = [k for k in ours if k not in state], [k for k in state if k not in ours]
    if missing or unexpected:
        said = (f'lacks {missing[0]!r}' if missing else '') + (' and ' if missing and unexpected else '') \
            + (f'has the unknown key {unexpected[0]!r}' if unexpected else '')
        raise UsageError(f'{path} does not hold this generator: it {said} '
                         f'({len(missing)} missing, {len(unexpected)} unknown keys)')
    for k, v in ours.items():
        if state[k].shape != v.shape:
            raise UsageError(f'{path} does not fit: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}')


def _check_made_for(path, obj, num_classes, channel, im_size):
    wanted = dict(num_classes=num_classes, channel=channel, im_size=list(im_size))
    for key, value in wanted.items():
        if not isinstance(obj.get(key), type(value)):
            raise UsageError(f'{path}: {key!r} is missing or not a {type(value).__name__}')
    found = {k: obj[k] for k in wanted}
    if found != wanted:
        said = ', '.join(f'{k} {found[k]} there, {v} here' for k, v in wanted.items() if found[k] != v)
        raise UsageError(f'{path} holds a generator for other data ({said})')
    if obj.get('arch') not in ARCHS:
        raise UsageError(f'{path}: unknown arch {obj.get("arch")!r}; expected one of {", ".join(ARCHS)}')


def _check_authors_data(path, state, num_classes, channel, im_size):
    """The authors' BigGAN-32 makes 32x32 images of as many classes and channels as its embeddings and last
    convolution say."""
    require_tensors(path, state)
    if im_size != (32, 32):
        raise UsageError(f'{path}: a bare BigGAN state dict makes 32x32 images; the data are {im_size[0]}x{im_size[1]}')
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    classes, last = shapes.get('blocks.0.0.bn1.gain.weight', ()), shapes.get('output_layer.2.weight', ())
    if len(classes) == 2 and classes[0] != num_classes:
        raise UsageError(f'{path} holds a generator of {classes[0]} classes; the data have {num_classes}')
    if len(last) == 4 and last[0] != channel:
        raise UsageError(f'{path} holds a generator of {last[0]}-channel images; the data have {channel} channel(s)')


def load_generator(path, num_classes, channel, im_size, mean=None, std=None):
    """A frozen generator (eval mode, no gradients for its weights) from `path`: a file of train_gan.py, or
    the authors' bare BigGAN-32 state dict (G_Pretrained_<dataset>_exp<e>.pth). Loaded with weights only
    (utils.load_pt: nothing in the file runs); a file that does not fit (other keys or shapes, another number
    of classes, channels or image size) is refused in one line (UsageError). mean, std: the dataset's
    normalisation for render (default: those saved in our file)."""
    im_size = tuple(im_size)
    obj = load_pt(path)
    if isinstance(obj, dict) and 'state_dict' in obj:
        _check_made_for(path, obj, num_classes, channel, im_size)
        sizes = {k: obj.get(k) for k in ('G_ch', 'dim_z', 'bottom_width') if isinstance(obj.get(k), int)}
        G, state = build_generator(obj['arch'], num_classes, channel, im_size, **sizes), obj['state_dict']
        mean, std = mean or obj.get('mean'), std or obj.get('std')
    else:  # the authors' files: BigGAN-32's bare state dict
        G, state = build_generator('biggan', num_classes, channel, im_size), obj
        _check_authors_data(path, state, num_classes, channel, im_size)
    check_fit(path, G, state)
    G.load_state_dict(state, strict=True)
    G.mean, G.std = mean, std
    return G.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

class GAN:
    """G, D, the moving average of G (the generator saved) and the two Adam optimisers."""

    def __init__(self, args):
        utils.set_seed(args.seed, 'init')
        shape = (args.num_classes, args.channel, args.im_size)
        self.G = build_generator(args.arch, *shape).to(args.device)
        self.D = Discriminator(*shape, D_ch=ARCHS[args.arch]['D_ch']).to(args.device)
        self.G_ema = build_generator(args.arch, *shape).to(args.device).eval().requires_grad_(False)
        self.G_ema.load_state_dict(self.G.state_dict())
        self.G_ema.mean, self.G_ema.std = args.mean, args.std
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
    return utils.DiffAugment(x, args.dsa_strategy, param=args.diff_param, generator=g)


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
    return z, torch.randint(args.num_classes, (n,), generator=g).to(args.device)


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


def checkpoint_path(args):
    return os.path.join(args.save_path, f'checkpoint_{run_name(args)}.pt')


@torch.no_grad()
def save_samples(G, args):
    """samples_per_class images of every class from fixed latents, one row per class."""
    from torchvision.utils import save_image  # imported here: torchvision takes seconds to import
    n = args.samples_per_class
    g = utils.generator(args.seed, 'samples')
    z = torch.randn(args.num_classes * n, G.dim_z, generator=g).to(args.device)
    labels = torch.arange(args.num_classes, device=args.device).repeat_interleave(n)
    with autocast(args):
        images = torch.cat([render(G, zc, yc).float() for zc, yc in zip(z.split(500), labels.split(500))])
    vis = utils.denormalise(images.cpu(), args.mean, args.std)
    atomic_write(vis_path(args), lambda tmp: save_image(vis, tmp, nrow=n, format='png'))


def save_checkpoint(gan, it, args):
    """The state after `it` iterations, the generator file and the samples."""
    atomic_save(dict(signature=args.signature, it=it, finished=it == args.Iteration, gan=gan.state_dict()),
                checkpoint_path(args))
    atomic_save(generator_record(gan.G_ema, args.arch, args.dataset, it, args.signature), generator_path(args))
    save_samples(gan.G_ema, args)


def read_checkpoint(path, args):
    state = load_pt(path, {'signature': dict, 'it': int, 'gan': dict})
    check_record(path, state['signature'], args.signature, 'was made with other settings',
                 'rerun its command line, or start afresh with --overwrite')
    return state


def resume(gan, args):
    """The iteration to start from: 0, or that of the checkpoint --resume names (auto: ours, if any)."""
    path = checkpoint_path(args) if args.resume == 'auto' else args.resume
    if args.resume == 'none' or not os.path.exists(path):
        if args.resume == 'auto':
            print('no checkpoint to resume from: starting afresh')
        return 0
    state = read_checkpoint(path, args)
    if state['it'] > args.Iteration:
        raise UsageError(f'{path} is at iteration {state["it"]}, beyond --Iteration {args.Iteration}')
    try:
        gan.load_state_dict(state['gan'])
    except (RuntimeError, KeyError, ValueError, AttributeError) as e:
        raise UsageError(f'{path} does not fit this GAN: {str(e).strip().splitlines()[0][:200]}') from None
    print(f'resuming from {path}: iteration {state["it"]}')
    return state['it']


def read_signed(path, args):
    """A file of ours in the save path, refused when a run with other settings wrote it."""
    obj = load_pt(path)
    check_record(path, obj.get('signature') if isinstance(obj, dict) else None, args.signature)
    return obj


def claim(args):
    """Make sure this run may write its files: --overwrite removes those of an earlier run; otherwise they must
    come from a run with these settings, and an unfinished run's checkpoint is continued (--resume), never
    silently replaced."""
    if args.overwrite:
        for path in (checkpoint_path(args), generator_path(args), vis_path(args)):
            if os.path.exists(path):
                os.remove(path)
        return
    if os.path.exists(generator_path(args)):
        read_signed(generator_path(args), args)
    if args.resume == 'none' and os.path.exists(checkpoint_path(args)) \
            and not read_signed(checkpoint_path(args), args).get('finished'):
        raise UsageError(f'an unfinished run left {checkpoint_path(args)}: continue it with --resume auto, '
                         'or start afresh with --overwrite')


def train(gan, real, start, args):
    """Iterations start .. Iteration-1, with checkpoints every --checkpoint_every iterations (default: about
    every 10 minutes) and at the end."""
    bar = tqdm(range(start, args.Iteration), initial=start, total=args.Iteration, desc=run_name(args))
    last, since = time.monotonic(), 0
    for it in bar:
        bar.set_postfix({k: f'{v:.3f}' for k, v in train_iteration(it, gan, real, args).items()}, refresh=False)
        since += 1
        due = since >= args.checkpoint_every if args.checkpoint_every else time.monotonic() - last >= 600
        if due and it + 1 < args.Iteration:
            save_checkpoint(gan, it + 1, args)
            last, since = time.monotonic(), 0
    save_checkpoint(gan, args.Iteration, args)


# ----------------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------------

def parser():
    p = ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dataset', default='CIFAR10', choices=[*DATASETS, 'ImageFolder'],
                   help='dataset (ImageFolder: your own images in --data_path/train|test/<class>/)')
    p.add_argument('--arch', default='biggan', choices=list(ARCHS),
                   help="biggan: the authors' BigGAN-32 (256 channels); small: 32 channels, for CPU budgets")
    p.add_argument('--Iteration', type=int, default=None,
                   help="G steps (default: 250000 for biggan, the recipe's 1000 epochs of CIFAR-10; 3000 for small)")
    p.add_argument('--batch_size', type=int, default=None, help='images per D and G step (default: 50)')
    p.add_argument('--num_D_steps', type=int, default=None,
                   help='D steps per G step (default: 4 for biggan, 2 for small)')
    p.add_argument('--lr_G', type=float, default=2e-4, help="G's Adam learning rate")
    p.add_argument('--lr_D', type=float, default=2e-4, help="D's Adam learning rate")
    p.add_argument('--ema_decay', type=float, default=None,
                   help="decay of the moving average of G's weights (default: 0.9999 for biggan, 0.999 for small)")
    p.add_argument('--ema_start', type=int, default=None, help='the moving average copies G before this iteration '
                                                                '(default: 1000)')
    p.add_argument('--dsa_strategy', default=STRATEGY,
                   help='DiffAugment before D: _-separated transformations (color crop cutout flip scale rotate), '
                        'all applied, per image, or None')
    p.add_argument('--mirror', action=argparse.BooleanOptionalAction, default=None,
                   help=f'flip real images at random (default: on, except for {" and ".join(DIGITS)})')
    p.add_argument('--samples_per_class', type=int, default=10, help='images per class in the sample grid')
    p.add_argument('--data_path', default='data', help='dataset path')
    p.add_argument('--save_path', default='result', help='where the generator, samples and checkpoints go')
    p.add_argument('--im_size', type=int, nargs='+', default=None,
                   help='image size for --dataset ImageFolder (default: 32x32)')
    p.add_argument('--seed', type=int, default=0, help='the same seed gives the same generator')
    p.add_argument('--device', default='auto', help='auto (CUDA when present), cpu, cuda or cuda:<i>')
    p.add_argument('--amp', action='store_true', help='bfloat16 autocast for G and D (weights, optimiser states and '
                                                       'losses stay float32)')
    p.add_argument('--resume', default='none', help="'auto': continue from our checkpoint in --save_path (if any); "
                                                    'or a checkpoint file')
    p.add_argument('--checkpoint_every', type=int, default=None,
                   help='save a checkpoint every N iterations (default: about every 10 minutes), and at the end')
    p.add_argument('--overwrite', action='store_true', help='replace the files of an earlier run of another command')
    return p


def check_flags(args):
    """Numbers in their ranges, --im_size only for ImageFolder, a known strategy, a --resume file that exists."""
    for k in ('Iteration', 'batch_size', 'num_D_steps', 'samples_per_class', 'checkpoint_every'):
        least = 0 if k == 'Iteration' else 1
        if getattr(args, k) is not None and getattr(args, k) < least:
            raise UsageError(f'--{k} must be at least {least}, got {getattr(args, k)}')
    for k in ('lr_G', 'lr_D'):
        if not (getattr(args, k) > 0 and math.isfinite(getattr(args, k))):
            raise UsageError(f'--{k} must be a positive number, got {getattr(args, k)}')
    if not 0 <= args.ema_decay < 1 or args.ema_start < 0:
        raise UsageError(f'--ema_decay must lie in [0, 1) and --ema_start be at least 0, '
                         f'got {args.ema_decay} and {args.ema_start}')
    if args.im_size is not None and (args.dataset != 'ImageFolder' or len(args.im_size) not in (1, 2)
                                     or min(args.im_size) < 8):
        raise UsageError('--im_size is for --dataset ImageFolder: one or two sizes of at least 8 pixels')
    utils.check_strategy(args.dsa_strategy)
    if args.resume not in ('none', 'auto') and not os.path.isfile(args.resume):
        raise UsageError(f'--resume {args.resume}: no such checkpoint file (use auto to pick ours)')
    if args.resume != 'none' and args.overwrite:
        raise UsageError('--resume continues a run and --overwrite replaces it: give one of them')


def configure(args):
    """Resolve the defaults of the arch and the dataset, check the flags, prepare the device and folder."""
    for k, v in RECIPES[args.arch].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.mirror is None:
        args.mirror = args.dataset not in DIGITS
    check_flags(args)
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        raise UsageError('train_gan.py trains in one process; start it without torchrun')
    if args.im_size is not None:
        args.im_size = tuple(args.im_size) * (3 - len(args.im_size))
    args.diff_param = utils.ParamDiffAug()
    args.diff_param.aug_mode = 'M'  # every transformation in turn, as DiffAugment does
    args.device = utils.pick_device(args.device)
    writable_folder(args.save_path)
    return args


def load_data(args):
    """The training images in G's range [-1, 1] (converted in place) and their labels; the dataset's shape
    and constants in args, and the run's signature (its flags that change the result, and the data's identity;
    not --Iteration, so that a finished run can be continued further)."""
    (args.channel, args.im_size, args.num_classes, args.class_names, args.mean, args.std,
     dst_train, _, _) = utils.get_dataset(args.dataset, args.data_path, args.im_size, args.device)
    args.data_id = dst_train.fingerprint
    args.signature = {k: v for k, v in runs.signature(args).items() if k not in ('Iteration', 'samples_per_class')}
    images = dst_train.images  # (to_gan_range, in place: the dataset is held once)
    images.mul_(_stats(args.std, images)).add_(_stats(args.mean, images)).mul_(2).sub_(1)
    return images, dst_train.labels


def main():
    args = configure(parser().parse_args())
    real = load_data(args)
    with exclusive(os.path.join(args.save_path, f'.lock_{run_name(args)}'), generator_path(args)):
        claim(args)
        gan = GAN(args)
        start = resume(gan, args)
        train(gan, real, start, args)
    print(f'saved {generator_path(args)} (the moving average of G after {args.Iteration} iterations) '
          f'and {vis_path(args)}')


if __name__ == '__main__':
    run_script(main)
