"""IT-GAN's generator (and its discriminator): the DiffAugment-BigGAN for CIFAR of Zhao et al. ("Differentiable
Augmentation for Data-Efficient GAN Training", 2020), which IT-GAN (Zhao & Bilen, 2022) freezes and learns latents of.

- `Generator` (`arch` 'biggan': G_ch 64, dim_z 128, bottom width 4, BigGAN's own spectral norm with u0/sv0
  buffers, class-conditional BatchNorm, tanh output in [-1, 1]) under the authors' parameter and buffer names,
  so that their released `G_Pretrained_<dataset>_exp<e>.pth` loads with strict=True; and a narrower one for CPU
  budgets ('small': 32 channels instead of 256, two upsampling blocks from a quarter of the image size);
- `Discriminator`: BigGAN's projection discriminator, for train_gan.py;
- `render(G, z, labels)`: images in the dataset's normalisation, and `load_generator(path, ...)`, which reads
  train_gan.py's generator files or the authors' bare state dicts without running code from them.

Sizes that bottom_width * 2**k does not reach exactly are generated larger and centre-cropped: BigGAN-32 makes
28x28 images (MNIST, Fashion-MNIST) as 32x32 with 2 pixels cropped at each side; the small arch makes them
exactly (7 -> 14 -> 28).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UsageError, load_pt

ARCHS = {  # the networks (G_ch, D_ch: channels per unit of width; each block has 4 units, as BigGAN-32)
    'biggan': dict(G_ch=64, D_ch=64, dim_z=128, bottom_width=4),
    'small': dict(G_ch=8, D_ch=8, dim_z=128, bottom_width=None),  # None: a quarter of the size (7 for 28x28)
}
BN_EPS, SN_EPS = 1e-5, 1e-8  # the authors' BN_eps and SN_eps


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


def channel_stats(values, x):
    return torch.tensor(values, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)


def to_gan_range(images, mean, std):
    """Images in a dataset's normalisation -> G's range [-1, 1]."""
    return (images * channel_stats(std, images) + channel_stats(mean, images)) * 2 - 1


def render(G, z, labels, mean=None, std=None):
    """G's images for latents z and class labels, in the dataset's normalisation: G's output in [-1, 1]
    mapped to [0, 1] pixels, then normalised with the dataset's mean and std (default: G.mean, G.std, which
    load_generator sets). Differentiable with respect to z (IT-GAN learns z)."""
    mean, std = (G.mean if mean is None else mean), (G.std if std is None else std)
    if mean is None or std is None:
        raise UsageError("render needs the dataset's mean and std (give them to load_generator or render)")
    x = (G(z, labels) + 1) / 2
    return (x - channel_stats(mean, x)) / channel_stats(std, x)


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
