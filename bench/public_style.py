"""A stand-in for the papers' public code, for side-by-side timings only (written here, not copied).

It reproduces what makes the public DM iteration and evaluation cost what they cost: stock PyTorch
layers (nn.AvgPool2d), one unchunked forward of each class's 256 real images, augmentation parameters
built in per-image Python loops, a DataLoader rebuilt per evaluation with per-batch host syncs
(.item(), numpy argmax), and no allocator tuning (this file does not import utils).

    python bench/public_style.py dm_iteration   # seconds per DM iteration, Fashion-MNIST, ipc 10
    python bench/public_style.py eval_epoch     # seconds per evaluation epoch (100 images, DSA)
    python bench/public_style.py test_pass      # seconds to test on the 10,000 test images
    python bench/public_style.py dc_iteration_ipc1    # seconds per DC iteration, Fashion-MNIST, ipc 1
    python bench/public_style.py dc_iteration_ipc10   # the same at ipc 10 (10 outer steps, 50 inner epochs)

Its DC iteration is the public one: per class an unchunked forward and backward of 256 real images,
the synthetic gradients with create_graph, a per-layer cosine distance; between outer steps the
synthetic set deep-copied into a new DataLoader, epochs with a host sync per batch.
"""
import copy
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import networks  # noqa: E402  (networks.py does not tune the allocator)

FASHION = '/usr/share/datasets/fashion-mnist'


def load(split):
    prefix = 'train' if split == 'train' else 't10k'
    with gzip.open(f'{FASHION}/{prefix}-images-idx3-ubyte.gz') as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(f'{FASHION}/{prefix}-labels-idx1-ubyte.gz') as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return (torch.tensor(x).float() / 255 - 0.2861) / 0.3530, torch.tensor(y).long()


def stock_convnet():
    net = networks.ConvNet(1, 10, (28, 28))
    for i, m in enumerate(net.features):
        if isinstance(m, networks.AvgPool2x2):
            net.features[i] = nn.AvgPool2d(2, 2)
    return net


def augment(x, seed):
    """One of the six DSA transformations, parameters built image by image in Python (as public code)."""
    torch.manual_seed(seed)
    choice = torch.randint(0, 6, (1,)).item()
    n = x.shape[0]
    if choice in (0, 1):  # scale or rotate through per-image theta lists
        if choice == 0:
            sx, sy = torch.rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2, torch.rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2
            theta = [[[sx[i], 0, 0], [0, sy[i], 0]] for i in range(n)]
        else:
            a = (torch.rand(n) - 0.5) * 2 * 15 / 180 * math.pi
            theta = [[[torch.cos(a[i]), torch.sin(-a[i]), 0], [torch.sin(a[i]), torch.cos(a[i]), 0]] for i in range(n)]
        theta = torch.tensor(theta, dtype=torch.float)
        theta[:] = theta[0]
        return F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=False), align_corners=False)
    if choice == 2:
        return torch.where(torch.rand(1) < 0.5, x.flip(3), x)
    if choice == 3:
        return x + (torch.rand(1) - 0.5)
    if choice == 4:
        i, j = torch.randint(-4, 5, (2,)).tolist()
        return torch.roll(x, (i, j), (2, 3))
    return x * (torch.rand(1, 1, 28, 28) > 0.25)


def dm_iteration(x, y, syn, indices):
    net = stock_convnet()
    net.train()
    for p in net.parameters():
        p.requires_grad = False
    loss = torch.tensor(0.0)
    for c in range(10):
        img_real = x[np.random.permutation(indices[c])[:256]]
        img_syn = syn[c * 10:(c + 1) * 10]
        seed = int(time.time() * 1000) % 100000
        out_real = net.embed(augment(img_real, seed)).detach()
        out_syn = net.embed(augment(img_syn, seed))
        loss += torch.sum((out_real.mean(0) - out_syn.mean(0)) ** 2)
    loss.backward()
    return loss.item()


def distance(gr, gs):
    if gr.dim() == 1:
        return torch.tensor(0.0)
    gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
    return torch.sum(1 - torch.sum(gr * gs, -1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + 0.000001))


def dc_iteration(x, syn, indices, ipc, outer_loop, inner_loop):
    net = stock_convnet()
    net.train()
    params = list(net.parameters())
    optimizer_net = torch.optim.SGD(params, lr=0.01)
    optimizer_img = torch.optim.SGD([syn], lr=0.1, momentum=0.5)
    labels = torch.arange(10).repeat_interleave(ipc)
    for ol in range(outer_loop):
        loss = torch.tensor(0.0)
        for c in range(10):
            img_real = x[np.random.permutation(indices[c])[:256]]
            gw_real = torch.autograd.grad(F.cross_entropy(net(img_real), torch.full((256,), c)), params)
            gw_real = [g.detach().clone() for g in gw_real]
            out_syn = net(syn[c * ipc:(c + 1) * ipc])
            gw_syn = torch.autograd.grad(F.cross_entropy(out_syn, labels[c * ipc:(c + 1) * ipc]), params, create_graph=True)
            loss += sum(distance(a, b) for a, b in zip(gw_real, gw_syn))
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
        loss.item()
        if ol == outer_loop - 1:
            break
        data = torch.utils.data.TensorDataset(copy.deepcopy(syn.detach()), copy.deepcopy(labels))
        loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=True)
        for il in range(inner_loop):
            for img, lab in loader:
                out = net(img)
                loss_net = F.cross_entropy(out, lab)
                optimizer_net.zero_grad()
                loss_net.backward()
                optimizer_net.step()
                loss_net.item(), np.sum(np.argmax(out.detach().numpy(), -1) == lab.numpy())


def main():
    what = sys.argv[1]
    torch.manual_seed(0)
    np.random.seed(0)
    x, y = load('train')
    indices = [np.where(y.numpy() == c)[0] for c in range(10)]
    syn = torch.cat([x[idx[:10]] for idx in indices]).requires_grad_(True)
    if what == 'dm_iteration':
        dm_iteration(x, y, syn, indices)
        times = []
        for _ in range(5):
            t = time.time()
            dm_iteration(x, y, syn, indices)
            times.append(time.time() - t)
    elif what == 'eval_epoch':
        net = stock_convnet()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        labels = torch.arange(10).repeat_interleave(10)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(syn.detach(), labels), batch_size=256, shuffle=True)
        times = []
        for ep in range(12):
            t = time.time()
            for img, lab in loader:
                img = augment(img, np.random.randint(1 << 30))
                out = net(img)
                loss = F.cross_entropy(out, lab)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss.item(), np.sum(np.argmax(out.detach().numpy(), -1) == lab.numpy())
            times.append(time.time() - t)
        times = times[2:]
    elif what.startswith('dc_iteration'):
        ipc, loops = (1, (1, 1)) if what.endswith('ipc1') else (10, (10, 50))
        syn = torch.randn(10 * ipc, 1, 28, 28, requires_grad=True)
        dc_iteration(x, syn, indices, ipc, *loops)
        times = []
        for _ in range(3 if ipc == 1 else 1):
            t = time.time()
            dc_iteration(x, syn, indices, ipc, *loops)
            times.append(time.time() - t)
    elif what == 'test_pass':
        xt, yt = load('test')
        net = stock_convnet()
        times = []
        for _ in range(2):
            t = time.time()
            for i in range(0, len(xt), 256):
                out = net(xt[i:i + 256])  # the public code tests with autograd on
                np.sum(np.argmax(out.detach().numpy(), -1) == yt[i:i + 256].numpy())
            times.append(time.time() - t)
    print(json.dumps({'code': 'public-style', 'what': what, 'seconds': float(np.median(times))}))


if __name__ == '__main__':
    main()
