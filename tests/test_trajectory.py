"""trajectory.py: MTT's science (ZCA, the student unroll, the loss, experts, the authors' buffer files) against
oracles: kornia's ZCA, a re-typed transcription of the authors' distill.py loop, plain torch layers, and
TESLA's gradient against the exact one and against a hand-derived first-order formula. docs/mtt.md records the
numbers these tests pin."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import networks
import trajectory as T
import utils


def tiny_net(norm='instancenorm', pooling='avgpooling', act='relu', seed=0, width=8):
    torch.manual_seed(seed)
    return networks.ConvNet(channel=1, num_classes=3, net_width=width, net_depth=2, net_act=act, net_norm=norm,
                            net_pooling=pooling, im_size=(8, 8))


def dsa(x, g):  # the authors' per-step augmentation: DiffAugment with seed -1 (each image its own draw)
    return utils.DiffAugment(x, T.FULL_STRATEGY, generator=g)


def problem(n=6, seed=0, norm='instancenorm'):
    """A tiny MTT problem: a ConvNet, an expert's start w0 and target w* (w0 plus a small step), images, labels."""
    net = tiny_net(norm, seed=seed)
    w0 = T.flat_params(net)
    gen = torch.Generator().manual_seed(seed + 100)
    w_target = w0 + 0.05 * torch.randn(w0.shape, generator=gen)
    images = torch.randn(n, 1, 8, 8, generator=gen)
    labels = torch.arange(n) % 3
    return net, w0, w_target, images, labels


def cosine(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------------
# ZCA
# ----------------------------------------------------------------------------------------------------

def test_zca_matches_kornia_and_inverts():
    K = pytest.importorskip('kornia')
    torch.manual_seed(0)
    x = torch.rand(300, 3, 5, 5)  # [0,1] pixels, D = 75
    mean, Tm, T_inv = utils.zca_fit(x, eps=0.1, chunk=64)  # chunked as for 50,000 images
    zca = K.enhance.ZCAWhitening(eps=0.1, compute_inv=True).fit(x)  # the authors' call (float32, as they run it)
    ours = utils.zca_apply(x, mean, Tm)
    assert ours.dtype == x.dtype and ours.shape == x.shape
    assert torch.allclose(ours, zca(x), atol=1e-5, rtol=0)
    # in float64 kornia agrees to rounding: the same mathematics (unbiased covariance, (S + eps)^-1/2)
    zca64 = K.enhance.ZCAWhitening(eps=0.1, compute_inv=True).fit(x.double())
    assert torch.allclose(utils.zca_apply(x.double(), mean, Tm), zca64(x.double()), atol=1e-10, rtol=0)
    assert torch.allclose(utils.zca_inverse(ours.double(), mean, T_inv), zca64.inverse_transform(ours.double()),
                          atol=1e-10, rtol=0)
    # chunking changes nothing, and the inverse undoes the whitening
    m2, T2, _ = utils.zca_fit(x, eps=0.1, chunk=1000)
    assert torch.allclose(m2, mean, atol=1e-14) and torch.allclose(T2, Tm, atol=1e-12)
    assert torch.allclose(utils.zca_inverse(ours, mean, T_inv), x, atol=1e-5, rtol=0)
    assert torch.allclose(utils.zca_inverse(utils.zca_apply(x.double(), mean, Tm), mean, T_inv), x.double(), atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# The unroll against a transcription of the authors' distill.py
# ----------------------------------------------------------------------------------------------------

class ReparamLike(nn.Module):
    """The mechanism of the authors' reparam_module.py, re-typed small: the module's parameters are deleted and,
    at each forward, views of one flat vector are set as plain attributes in their place."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.infos, self.numels, self.shapes = [], [], []
        for mn, m in list(module.named_modules()):
            for n, p in list(m.named_parameters(recurse=False)):
                self.infos.append((m, n))
                self.numels.append(p.numel())
                self.shapes.append(p.shape)
        for m, n in self.infos:
            delattr(m, n)

    def forward(self, x, flat_param):
        for (m, n), t, s in zip(self.infos, flat_param.split(self.numels), self.shapes):
            setattr(m, n, t.view(s))
        return self.module(x)


def authors_iteration(net, w0, w_target, image_syn, label_syn, syn_lr, syn_steps, batch_syn, augment, gen):
    """The authors' distill.py (mtt-distillation HEAD 50dccea), lines 303-388, re-typed. Two substitutions:
    torch's global RNG -> the generator `gen` (randperm, DiffAugment), and DiffAugment(x, args.dsa_strategy,
    param=args.dsa_param) -> augment(x, gen), the same draws."""
    student_net = ReparamLike(copy.deepcopy(net))  # line 296: ReparamModule(student_net)
    student_net.train()
    num_params = sum(math.prod(s) for s in student_net.shapes)  # line 303
    target_params = w_target.clone()  # lines 327-328 (already flat)
    student_params = [w0.clone().requires_grad_(True)]  # line 330
    starting_params = w0.clone()  # line 332
    syn_images = image_syn  # line 334
    y_hat = label_syn  # line 336
    indices_chunks = []  # line 340
    for step in range(syn_steps):  # line 342
        if not indices_chunks:  # lines 344-346
            indices = torch.randperm(len(syn_images), generator=gen)
            indices_chunks = list(torch.split(indices, batch_syn))
        these_indices = indices_chunks.pop()  # line 348
        x = syn_images[these_indices]  # lines 351-352
        this_y = y_hat[these_indices]
        x = augment(x, gen)  # line 359
        forward_params = student_params[-1]  # line 364
        x = student_net(x, flat_param=forward_params)  # line 365
        ce_loss = nn.CrossEntropyLoss()(x, this_y)  # line 366
        grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]  # line 368
        student_params.append(student_params[-1] - syn_lr * grad)  # line 370
    param_loss = torch.tensor(0.0)  # lines 373-377
    param_dist = torch.tensor(0.0)
    param_loss += F.mse_loss(student_params[-1], target_params, reduction="sum")
    param_dist += F.mse_loss(starting_params, target_params, reduction="sum")
    param_loss /= num_params  # lines 383-386
    param_dist /= num_params
    param_loss /= param_dist
    return param_loss  # line 388: grand_loss


@pytest.mark.parametrize('n, batch_syn, steps', [(6, 4, 5), (6, 6, 3)])
def test_unroll_equals_authors_transcription(n, batch_syn, steps):
    net, w0, w_target, images, labels = problem(n)
    syn_lr0 = torch.tensor(0.01)
    results = []
    for fn in (authors_iteration, T.mtt_loss):
        x = images.clone().requires_grad_(True)
        a = syn_lr0.clone().requires_grad_(True)
        loss = fn(net, w0, w_target, x, labels, a, steps, batch_syn, dsa, torch.Generator().manual_seed(7))
        loss.backward()
        results.append((loss.detach(), x.grad, a.grad))
    (l1, gx1, ga1), (l2, gx2, ga2) = results
    assert torch.allclose(l1, l2, rtol=1e-6, atol=0)
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=1e-6 * gx1.abs().max())
    assert torch.allclose(ga1, ga2, rtol=1e-6, atol=0)
    assert gx1.abs().sum() > 0 and ga1 != 0


def test_chunk_schedule_pops_last_chunk_and_refills():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sched = T.chunk_schedule(7, 3, g1)
    perm = torch.randperm(7, generator=g2)
    assert torch.equal(next(sched), perm[6:])  # the tail chunk (1 image) comes first
    assert torch.equal(next(sched), perm[3:6])
    assert torch.equal(next(sched), perm[:3])
    assert torch.equal(next(sched), torch.randperm(7, generator=g2)[6:])  # refilled: a fresh permutation


def test_flat_params_order_is_the_reparam_order():
    net = tiny_net()
    flat = T.flat_params(net)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(T.functional_forward(net, flat, x), net(x))
    assert torch.equal(ReparamLike(copy.deepcopy(net))(x, flat), net(x))
    with pytest.raises(ValueError):
        T.unflatten(net, flat[:-1])


# ----------------------------------------------------------------------------------------------------
# TESLA
# ----------------------------------------------------------------------------------------------------

def first_order_loss(net, w0, w_target, images, labels, syn_lr, syn_steps, batch_syn, augment, gen):
    """Hand-derived form of TESLA's gradient: w_N = w0 - a * sum_k g_k(x_k; sg(w_k)), every w_k detached (the
    student's weights held constant), g_k kept differentiable in x_k only; autograd through this gives
    dL/dx_k = -2a/D (w_N - w*) . dg_k/dx_k and dL/da = -2/D (w_N - w*) . G, TESLA's formulas."""
    w = w0.clone()
    G = torch.zeros_like(w0)
    chunks = T.chunk_schedule(len(images), batch_syn, gen)
    for _ in range(syn_steps):
        idx = next(chunks)
        wk = w.detach().requires_grad_(True)
        x = augment(images[idx], gen)
        g = torch.autograd.grad(F.cross_entropy(T.functional_forward(net, wk, x), labels[idx]), wk,
                                create_graph=True)[0]
        G = G + g
        w = (wk - syn_lr.detach() * g).detach()
    return T.trajectory_loss(w0 - syn_lr * G, w0, w_target)


def grads_of(fn, net, w0, w_target, images, labels, lr, steps, batch, seed=7):
    x = images.clone().requires_grad_(True)
    a = torch.tensor(lr, requires_grad=True)
    loss = fn(net, w0, w_target, x, labels, a, steps, batch, dsa, torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.detach(), x.grad, a.grad


def test_tesla_is_the_first_order_formula_not_the_exact_gradient():
    net, w0, w_target, images, labels = problem(6)
    steps, batch, lr = 5, 4, 0.01
    loss, gx, ga = T.tesla_grads(net, w0, w_target, images, labels, torch.tensor(lr), steps, batch, dsa,
                                 torch.Generator().manual_seed(7))
    l_exact, gx_exact, ga_exact = grads_of(T.mtt_loss, net, w0, w_target, images, labels, lr, steps, batch)
    l_first, gx_first, ga_first = grads_of(first_order_loss, net, w0, w_target, images, labels, lr, steps, batch)
    # the loss is the same (same steps, same draws); the gradients are the first-order formula's, exactly
    assert torch.allclose(loss, l_exact, rtol=1e-5)
    assert torch.allclose(gx, gx_first, rtol=1e-5, atol=1e-5 * gx_first.abs().max())
    assert torch.allclose(ga, ga_first, rtol=1e-5)
    # and differ from the exact gradient by the dropped Hessian paths: close in direction, not equal
    # (docs/mtt.md: here images cos 0.9997, rel. error 2.5%; step size -0.078 vs exact -0.105, rel. error 25%)
    assert cosine(gx, gx_exact) > 0.999
    assert 1e-3 < rel(gx, gx_exact) < 0.1
    assert 0.05 < rel(ga, ga_exact) < 0.5
    assert ga.sign() == ga_exact.sign()


def test_tesla_exact_for_one_step_and_error_grows_with_step_size():
    net, w0, w_target, images, labels = problem(6)
    # one step: no earlier weights to depend on, so nothing is dropped
    _, gx, ga = T.tesla_grads(net, w0, w_target, images, labels, torch.tensor(0.05), 1, 6, dsa,
                              torch.Generator().manual_seed(7))
    _, gx_exact, ga_exact = grads_of(T.mtt_loss, net, w0, w_target, images, labels, 0.05, 1, 6)
    assert torch.allclose(gx, gx_exact, rtol=1e-5, atol=1e-5 * gx_exact.abs().max())
    assert torch.allclose(ga, ga_exact, rtol=1e-5)
    # 5 steps: the dropped terms scale with a * Hessian, so the agreement worsens as the step size grows
    errors = []
    for lr in (0.01, 0.1):
        _, gx, _ = T.tesla_grads(net, w0, w_target, images, labels, torch.tensor(lr), 5, 4, dsa,
                                 torch.Generator().manual_seed(7))
        _, gx_exact, _ = grads_of(T.mtt_loss, net, w0, w_target, images, labels, lr, 5, 4)
        errors.append(rel(gx, gx_exact))
    assert errors[0] < errors[1]


def test_tesla_does_not_touch_the_callers_tensors():
    net, w0, w_target, images, labels = problem(4)
    x = images.clone().requires_grad_(True)
    a = torch.tensor(0.01, requires_grad=True)
    loss, gx, ga = T.tesla_grads(net, w0, w_target, x, labels, a, 3, None, None, torch.Generator().manual_seed(1))
    assert x.grad is None and a.grad is None and gx.shape == x.shape and ga.shape == a.shape
    assert not loss.requires_grad and not gx.requires_grad


# ----------------------------------------------------------------------------------------------------
# Second-order gradients through every layer kind of the ConvNet variants
# ----------------------------------------------------------------------------------------------------

def plain_copy(net):
    """The same model with plain torch layers where networks.py has its own: AvgPool2x2 -> nn.AvgPool2d,
    instance norm (GroupNorm with a group per channel) -> nn.InstanceNorm2d(affine), in-place ReLU -> ReLU.
    Same parameters in the same order."""
    ref = copy.deepcopy(net)
    layers = list(ref.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, networks.AvgPool2x2):
            layers[i] = nn.AvgPool2d(2, 2)
        elif isinstance(layer, nn.GroupNorm) and layer.num_groups == layer.num_channels:
            inorm = nn.InstanceNorm2d(layer.num_channels, affine=True, eps=layer.eps)
            inorm.weight, inorm.bias = layer.weight, layer.bias
            layers[i] = inorm
        elif isinstance(layer, nn.ReLU):
            layers[i] = nn.ReLU()
    ref.features = nn.Sequential(*layers)
    return ref


VARIANTS = [dict(norm=n) for n in ('instancenorm', 'batchnorm', 'layernorm', 'groupnorm', 'none')] + \
           [dict(pooling=p) for p in ('maxpooling', 'none')] + \
           [dict(act=a) for a in ('sigmoid', 'leakyrelu', 'swish')]


@pytest.mark.parametrize('variant', VARIANTS, ids=lambda v: next(iter(v.values())))
def test_second_order_gradients_match_plain_torch_layers(variant):
    net = tiny_net(**variant)
    ref = plain_copy(net)
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in ref.named_parameters()]
    gen = torch.Generator().manual_seed(1)
    w0 = T.flat_params(net).requires_grad_(False)
    x0 = torch.randn(4, 1, 8, 8, generator=gen)
    y = torch.tensor([0, 1, 2, 0])
    v = torch.randn(w0.shape, generator=gen)
    out = []
    for model in (net, ref):
        w = w0.clone().requires_grad_(True)
        x = x0.clone().requires_grad_(True)
        g = torch.autograd.grad(F.cross_entropy(T.functional_forward(model, w, x), y), w, create_graph=True)[0]
        gx, gw = torch.autograd.grad(g @ v, (x, w))  # grad of a grad: what the unroll backpropagates
        out.append((g.detach(), gx, gw))
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max()), (a - b).abs().max()
    assert out[0][1].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# Experts and the authors' buffer files
# ----------------------------------------------------------------------------------------------------

def test_train_expert_is_resumable_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(20, 1, 8, 8, generator=gen)
    labels = torch.arange(20) % 3
    saved = {}

    def on_epoch(e, snapshot, net, g):
        saved[e] = (copy.deepcopy(net.state_dict()), g.get_state())

    net = tiny_net(norm='batchnorm')  # BatchNorm: its running statistics are part of the state to resume
    full = T.train_expert(net, images, labels, epochs=3, lr=0.01, batch=8, augment=dsa,
                          generator=torch.Generator().manual_seed(9), on_epoch=on_epoch)
    assert len(full) == 4 and all(s.shape == full[0].shape for s in full)
    assert not torch.equal(full[0], full[1])

    net2 = tiny_net(norm='batchnorm', seed=123)
    state, gstate = saved[1]
    net2.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(gstate)
    resumed = T.train_expert(net2, images, labels, epochs=3, lr=0.01, batch=8, augment=dsa, generator=g2,
                             start_epoch=1)
    assert len(resumed) == 3
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a, b)
    assert torch.equal(net.features[1].running_mean, net2.features[1].running_mean)


def test_train_expert_defaults_are_the_authors():
    import inspect
    p = inspect.signature(T.train_expert).parameters
    assert p['lr'].default == T.AUTHORS_EXPERTS['lr_teacher'] == 0.01
    assert p['batch'].default == T.AUTHORS_EXPERTS['batch_train'] == 256
    assert p['decay'].default is False and T.AUTHORS_EXPERTS['mom'] == T.AUTHORS_EXPERTS['l2'] == 0


def test_load_authors_buffer(tmp_path):
    net = tiny_net()
    experts = []
    for e in range(2):  # their layout: experts -> epochs -> [p.detach().cpu() for p in net.parameters()]
        timestamps = []
        for epoch in range(3):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.01)
            timestamps.append([p.detach().cpu().clone() for p in net.parameters()])
        experts.append(timestamps)
    path = tmp_path / 'replay_buffer_0.pt'
    torch.save(experts, path)
    loaded = T.load_authors_buffer(path, net)
    assert len(loaded) == 2 and loaded[0].shape == (3, sum(p.numel() for p in net.parameters()))
    assert torch.equal(loaded[1][2], T.flat_params(net))
    back = T.to_authors_layout(loaded[0], net)
    assert all(torch.equal(a, b) for a, b in zip(back[1], experts[0][1]))
    with pytest.raises(ValueError, match='shapes'):
        T.load_authors_buffer(path, tiny_net(width=4))
    torch.save([[{'not': 'a list of tensors'}]], tmp_path / 'bad.pt')
    with pytest.raises(ValueError):
        T.load_authors_buffer(tmp_path / 'bad.pt')


def test_load_authors_buffer_runs_no_code(tmp_path):
    import pickle
    torch.save([[[torch.zeros(1)]], Exploit()], tmp_path / 'evil.pt')
    with pytest.raises(pickle.UnpicklingError):
        T.load_authors_buffer(tmp_path / 'evil.pt')


class Exploit:
    def __reduce__(self):
        return (print, ('a pickled call ran',))


# ----------------------------------------------------------------------------------------------------
# DiffAugment's affine grids: the authors' copy (align_corners=True) against ours and the DSA paper's
# ----------------------------------------------------------------------------------------------------

def authors_scale(x, sx, sy, align_corners=True):
    """mtt-distillation utils.py rand_scale, lines 550-565, with the draws given: theta [[sx,0,0],[0,sy,0]],
    float32, F.affine_grid/F.grid_sample with align_corners=True (the DSA paper's: the default, False)."""
    theta = torch.tensor([[[float(sx[i]), 0, 0], [0, float(sy[i]), 0]] for i in range(len(x))], dtype=torch.float)
    return F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=align_corners), align_corners=align_corners)


def authors_rotate(x, angle, align_corners=True):
    """mtt-distillation utils.py rand_rotate, lines 568-580: theta [[cos, sin(-t), 0], [sin, cos, 0]]."""
    theta = torch.tensor([[[math.cos(t), math.sin(-t), 0], [math.sin(t), math.cos(t), 0]] for t in angle.tolist()],
                         dtype=torch.float)
    return F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=align_corners), align_corners=align_corners)


def test_affine_align_corners_matters_only_off_square():
    p = utils.ParamDiffAug()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # ours, replayed: DiffAugment draws the transformation's index, then per image (sx, sy) / an angle
    g = torch.Generator().manual_seed(4)
    ours = utils.DiffAugment(x, 'scale', generator=g)
    g = torch.Generator().manual_seed(4)
    torch.randint(1, (1,), generator=g)
    s = torch.rand(8, 2, generator=g) * (p.ratio_scale - 1 / p.ratio_scale) + 1 / p.ratio_scale
    assert torch.allclose(ours, authors_scale(x, s[:, 0], s[:, 1], align_corners=False), atol=1e-6)
    assert (ours - authors_scale(x, s[:, 0], s[:, 1])).abs().max() < 1e-5  # authors' align_corners=True
    g = torch.Generator().manual_seed(4)
    ours = utils.DiffAugment(x, 'rotate', generator=g)
    g = torch.Generator().manual_seed(4)
    torch.randint(1, (1,), generator=g)
    angle = (torch.rand(8, 1, generator=g)[:, 0] - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    assert torch.allclose(ours, authors_rotate(x, angle, align_corners=False), atol=1e-6)
    assert (ours - authors_rotate(x, angle)).abs().max() < 1e-5
    # on a non-square image the two conventions rotate differently (normalised coordinates scale per axis)
    y = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    angle = torch.tensor([0.2, -0.25])
    assert (authors_rotate(y, angle) - authors_rotate(y, angle, align_corners=False)).abs().max() > 0.05


def peak_saved_bytes(fn):
    """Peak bytes of the tensors autograd holds for backward while fn runs (live count: a saved tensor is
    released with its graph)."""
    live, peak = [0], [0]

    class Held:
        def __init__(self, t):
            self.t, self.n = t, t.numel() * t.element_size()
            live[0] += self.n
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= self.n

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        fn()
    return peak[0]


def test_tesla_memory_does_not_grow_with_steps():
    net, w0, w_target, images, labels = problem(6)
    a = torch.tensor(0.01, requires_grad=True)

    def tesla(steps):
        return peak_saved_bytes(lambda: T.tesla_grads(net, w0, w_target, images, labels, a, steps, 4, dsa,
                                                      torch.Generator().manual_seed(7)))

    def unroll(steps):
        x = images.clone().requires_grad_(True)
        return peak_saved_bytes(lambda: T.mtt_loss(net, w0, w_target, x, labels, a, steps, 4, dsa,
                                                   torch.Generator().manual_seed(7)).backward())

    assert tesla(8) < 1.2 * tesla(2)  # (docs/mtt.md: 115 kB at 2 and 8 steps, 119 kB at 32)
    assert unroll(8) > 3 * unroll(2)


def test_tesla_needs_a_generator_to_replay_augmentation():
    net, w0, w_target, images, labels = problem(4)
    with pytest.raises(ValueError, match='generator'):
        T.tesla_grads(net, w0, w_target, images, labels, torch.tensor(0.01), 2, None, dsa, None)
