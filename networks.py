"""The model families of the dataset-condensation papers, chosen by name from `MODELS`.

Every model is `features` (an nn.Sequential) -> flatten -> `classifier` (one nn.Linear), so
`embed(x)` (the features before the last linear layer) and `stages(x)` (intermediate outputs, for
feature alignment as in CAFE) work the same way for all of them. `taps` lists the indices in
`features` whose outputs are the stages.

Inputs may be 1x28x28, 3x32x32, 3x64x64 or any other size. For 28x28 inputs the first convolution of
ConvNet and VGG is padded by 3 (LeNet and AlexNet: their 5x5 kernels get 2 more than usual) so that the
feature maps are those of a 32x32 input: the papers' convention, which their numbers rely on. ResNet18
keeps padding 1 for every input, as in the papers' code (ResNet18BN_AP: 512x3x3 features on 28x28).
"""
from functools import partial

import torch
import torch.nn as nn


class AvgPool2x2(nn.AvgPool2d):
    """2x2 average pooling, stride 2. On the CPU an NCHW tensor is pooled as two small matrix products
    (P @ x @ P^T), which gives the same values faster than the native kernel, forward and backward
    (docs/speed.md)."""

    def __init__(self):
        super().__init__(2, 2)

    def forward(self, x):
        H, W = x.shape[-2:]
        if x.device.type != 'cpu' or not x.is_contiguous() or H % 2 or W % 2:
            return super().forward(x)  # channels-last tensors have a fast native kernel
        return _pool_matrix(H, x) @ x @ _pool_matrix(W, x).t()


def _pool_matrix(n, x):
    """(n/2, n) matrix averaging neighbouring pairs."""
    return torch.eye(n // 2, dtype=x.dtype, device=x.device).repeat_interleave(2, dim=1) * 0.5


class Net(nn.Module):
    taps = ()

    def __init__(self, features, num_classes, channel, im_size):
        super().__init__()
        self.features = features
        with torch.no_grad():  # infer the feature size with a dry run (eval mode: no BatchNorm update)
            self.features.eval()
            num_feat = self.features(torch.zeros(1, channel, *im_size)).numel()
            self.features.train()
        self.classifier = nn.Linear(num_feat, num_classes)

    def embed(self, x):
        return self.features(x).flatten(1)

    @property
    def module(self):
        """The model itself: the papers' main_DM.py reaches `net.module.embed` on machines with several GPUs,
        where their get_network wrapped it in DataParallel (ours never does)."""
        return self

    def forward(self, x):
        return self.classifier(self.embed(x))

    def stages(self, x):
        """(list of the outputs of the layers in `taps`, logits) in one forward pass."""
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
        return outs, self.classifier(x.flatten(1))


def default_size(channel, im_size):
    """The papers' classes take no image size but ConvNet's: 1-channel inputs are 28x28, others 32x32."""
    return tuple(im_size) if im_size is not None else (28, 28) if channel == 1 else (32, 32)


def first_pad(im_size, usual):
    """Padding of the first convolution: 3x3 kernels pad 3 (and 5x5 pad 4) on 28x28 inputs."""
    return usual + 2 if tuple(im_size) == (28, 28) else usual


ACTIVATIONS = {'relu': partial(nn.ReLU, inplace=True), 'sigmoid': nn.Sigmoid,
               'leakyrelu': partial(nn.LeakyReLU, negative_slope=0.01), 'swish': nn.SiLU}
POOLINGS = {'avgpooling': AvgPool2x2, 'maxpooling': partial(nn.MaxPool2d, 2, 2), 'none': None}
NORMS = {  # (channels, h, w) -> layer
    'instancenorm': lambda c, h, w: nn.GroupNorm(c, c, affine=True),
    'batchnorm': lambda c, h, w: nn.BatchNorm2d(c),
    'layernorm': lambda c, h, w: nn.LayerNorm([c, h, w]),
    'groupnorm': lambda c, h, w: nn.GroupNorm(4, c, affine=True),
    'none': None,
}


class ConvNet(Net):
    """`net_depth` blocks of [3x3 conv -> norm -> activation -> 2x2 pooling], then a linear classifier.
    Stages: every block's output after its activation, and the final (pooled) feature map."""

    def __init__(self, channel, num_classes, net_width=128, net_depth=3, net_act='relu', net_norm='instancenorm',
                 net_pooling='avgpooling', im_size=(32, 32)):  # (the papers' order)
        layers, taps = [], []
        h, w = (32, 32) if tuple(im_size) == (28, 28) else im_size
        for d in range(net_depth):
            layers.append(nn.Conv2d(channel if d == 0 else net_width, net_width, 3,
                                    padding=first_pad(im_size, 1) if d == 0 else 1))
            if NORMS[net_norm] is not None:
                layers.append(NORMS[net_norm](net_width, h, w))
            layers.append(ACTIVATIONS[net_act]())
            taps.append(len(layers) - 1)
            if POOLINGS[net_pooling] is not None:
                layers.append(POOLINGS[net_pooling]())
                h, w = h // 2, w // 2
        self.taps = tuple(dict.fromkeys(taps + [len(layers) - 1]))
        super().__init__(nn.Sequential(*layers), num_classes, channel, im_size)


class MLP(Net):
    taps = (2, 4)

    def __init__(self, channel, num_classes, im_size=None, width=128):
        im_size = default_size(channel, im_size)
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(channel * im_size[0] * im_size[1], width),
                                       nn.ReLU(inplace=True), nn.Linear(width, width), nn.ReLU(inplace=True)),
                         num_classes, channel, im_size)


class LeNet(Net):
    taps = (2, 5, 8, 10)

    def __init__(self, channel, num_classes, im_size=None):
        im_size = default_size(channel, im_size)
        pad = first_pad(im_size, 0)
        h, w = [((s + 2 * pad - 4) // 2 - 4) // 2 for s in im_size]
        # the two hidden fully-connected layers belong to the features: embed() is the input of the last layer
        super().__init__(nn.Sequential(
            nn.Conv2d(channel, 6, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2, 2), nn.Flatten(),
            nn.Linear(16 * h * w, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
        ), num_classes, channel, im_size)


def _alexnet_features(channel, im_size, norm):
    cfg = [(128, 5, first_pad(im_size, 2), True), (192, 5, 2, True), (256, 3, 1, False),
           (192, 3, 1, False), (192, 3, 1, True)]
    layers, taps, c_in = [], [], channel
    for c_out, k, pad, pool in cfg:
        layers.append(nn.Conv2d(c_in, c_out, k, padding=pad))
        if norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
        if pool:
            layers.append(nn.MaxPool2d(2, 2))
            taps.append(len(layers) - 1)
        c_in = c_out
    return nn.Sequential(*layers), tuple(taps)


class AlexNet(Net):
    def __init__(self, channel, num_classes, im_size=None, norm=False):
        im_size = default_size(channel, im_size)
        features, self.taps = _alexnet_features(channel, im_size, norm)
        super().__init__(features, num_classes, channel, im_size)


class AlexNetBN(AlexNet):
    def __init__(self, channel, num_classes, im_size=None):
        super().__init__(channel, num_classes, im_size, norm=True)


VGG_CFG = {'VGG11': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M']}


class VGG(Net):
    def __init__(self, channel, num_classes, im_size=None, cfg='VGG11', norm='instancenorm'):
        im_size = default_size(channel, im_size)
        layers, taps, c_in = [], [], channel
        for v in VGG_CFG[cfg]:
            if v == 'M':
                layers.append(nn.MaxPool2d(2, 2))
                taps.append(len(layers) - 1)
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=first_pad(im_size, 1) if not layers else 1),
                           NORMS[norm](v, 0, 0), nn.ReLU(inplace=True)]
                c_in = v
        self.taps = tuple(taps)
        super().__init__(nn.Sequential(*layers), num_classes, channel, im_size)


class VGG11(VGG):
    def __init__(self, channel, num_classes, im_size=None):
        super().__init__(channel, num_classes, im_size, 'VGG11')


class VGG11BN(VGG):
    def __init__(self, channel, num_classes, im_size=None):
        super().__init__(channel, num_classes, im_size, 'VGG11', norm='batchnorm')


class BasicBlock(nn.Module):
    """ResNet basic block. `ap`: downsample by stride-1 convolutions and 2x2 average pooling (ResNet_AP)."""

    def __init__(self, c_in, c_out, stride, norm, ap=False):
        super().__init__()
        s = 1 if ap else stride
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=s, padding=1, bias=False)
        self.bn1 = NORMS[norm](c_out, 0, 0)
        self.pool = AvgPool2x2() if ap and stride != 1 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = NORMS[norm](c_out, 0, 0)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=s, bias=False),
                                          *([AvgPool2x2()] if ap else []), NORMS[norm](c_out, 0, 0))

    def forward(self, x):
        out = self.pool(torch.relu(self.bn1(self.conv1(x))))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(Net):
    """ResNet-18. Global average pooling before the classifier; with `ap` (ResNet18BN_AP) strided
    convolutions become average pooling and the last feature map is kept whole, as in the papers.
    Stages: the output of each of the four residual layers, and the pooled final map."""

    def __init__(self, channel, num_classes, im_size=None, norm='instancenorm', ap=False):
        im_size = default_size(channel, im_size)
        layers, c_in = [nn.Conv2d(channel, 64, 3, padding=1, bias=False),  # 1 for 28x28 too, as in the papers
                        NORMS[norm](64, 0, 0), nn.ReLU(inplace=True)], 64
        for c_out, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride, norm, ap), BasicBlock(c_out, c_out, 1, norm, ap)))
            c_in = c_out
        if not ap:
            layers.append(nn.AdaptiveAvgPool2d(1))
        self.taps = tuple(range(3, len(layers)))
        super().__init__(nn.Sequential(*layers), num_classes, channel, im_size)


class ResNet18BN(ResNet18):
    def __init__(self, channel, num_classes, im_size=None):
        super().__init__(channel, num_classes, im_size, norm='batchnorm')


class ResNet18BN_AP(ResNet18):
    def __init__(self, channel, num_classes, im_size=None):
        super().__init__(channel, num_classes, im_size, norm='batchnorm', ap=True)


# name -> constructor(channel, num_classes, im_size=...): the papers' model names, and ConvNet's variants
MODELS = {
    'MLP': MLP,
    'ConvNet': ConvNet,
    'LeNet': LeNet,
    'AlexNet': AlexNet,
    'AlexNetBN': AlexNetBN,
    'VGG11': VGG11,
    'VGG11BN': VGG11BN,
    'ResNet18': ResNet18,
    'ResNet18BN': ResNet18BN,
    'ResNet18BN_AP': ResNet18BN_AP,
    **{f'ConvNetW{w}': partial(ConvNet, net_width=w) for w in (32, 64, 128, 256)},
    **{f'ConvNetD{d}': partial(ConvNet, net_depth=d) for d in (1, 2, 3, 4)},
    **{f'ConvNetA{k}': partial(ConvNet, net_act=a) for k, a in
       [('S', 'sigmoid'), ('R', 'relu'), ('L', 'leakyrelu'), ('Swish', 'swish')]},
    'ConvNetASwishBN': partial(ConvNet, net_act='swish', net_norm='batchnorm'),
    **{f'ConvNet{k}': partial(ConvNet, net_norm=n) for k, n in
       [('NN', 'none'), ('BN', 'batchnorm'), ('LN', 'layernorm'), ('IN', 'instancenorm'), ('GN', 'groupnorm')]},
    **{f'ConvNet{k}': partial(ConvNet, net_pooling=p) for k, p in
       [('NP', 'none'), ('MP', 'maxpooling'), ('AP', 'avgpooling')]},
}
