"""DC and DSA (main.py): gradient distances, one matching step, loops, BatchNorm freezing, evaluation
pools and end-to-end runs."""
import argparse
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import main
import runs
import utils
from helpers import needs_fashion, run, tiny
from runs import SynSet
from utils import (EVAL_POOLS, DataInfo, Group, class_gradients, get_eval_pool,
                   get_loops, get_network, load_result, match_loss, tensor_loader)

# gradients of a conv weight (2 output units), a linear weight (1 unit) and a bias
GR = [torch.tensor([[[[1., 0.]]], [[[1., 1.]]]]), torch.tensor([[3., 4.]]), torch.tensor([1., 2.])]
GS = [torch.tensor([[[[0., 1.]]], [[[2., 2.]]]]), torch.tensor([[4., 3.]]), torch.tensor([5., -1.])]


def metric(name):
    return argparse.Namespace(dis_metric=name)


def test_match_loss_ours_by_hand():
    # per output unit 1 - cos: conv unit 0 orthogonal (1), conv unit 1 parallel (0), linear 1 - 24/25;
    # the 1-D bias contributes nothing
    eps = 1e-6
    expected = (1 - 0 / (1 * 1 + eps)) + (1 - 4 / (math.sqrt(2) * math.sqrt(8) + eps)) + (1 - 24 / (5 * 5 + eps))
    assert match_loss(GS, GR, metric('ours')).item() == pytest.approx(expected, rel=1e-6)
    assert match_loss(GS[2:], GR[2:], metric('ours')).item() == 0


def test_match_loss_mse_and_cos_by_hand():
    r = [1, 0, 1, 1, 3, 4, 1, 2]
    s = [0, 1, 2, 2, 4, 3, 5, -1]
    mse = sum((a - b) ** 2 for a, b in zip(r, s))
    dot = sum(a * b for a, b in zip(r, s))
    cos = 1 - dot / (math.sqrt(sum(a * a for a in r)) * math.sqrt(sum(b * b for b in s)) + 1e-6)
    assert match_loss(GS, GR, metric('mse')).item() == pytest.approx(mse)
    assert match_loss(GS, GR, metric('cos')).item() == pytest.approx(cos, rel=1e-6)


def test_loops_of_the_papers_and_the_rule_between_them():
    assert [get_loops(i) for i in (1, 10, 20, 30, 40, 50)] == [(1, 1), (10, 50), (20, 25), (30, 20), (40, 15), (50, 10)]
    assert get_loops(15) == (15, 38) and get_loops(5) == (5, 23)  # linear between the neighbours, rounded
    assert get_loops(100) == (50, 10)


def test_chunked_real_gradients_equal_the_whole_batch():
    torch.manual_seed(0)
    net = get_network('ConvNetW32', 3, 4, (16, 16), 'cpu')
    x = torch.randn(37, 3, 16, 16)
    whole = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), torch.full((37,), 2)), list(net.parameters()))
    for a, b in zip(class_gradients(net, x, 2, chunk=8), whole):
        assert torch.allclose(a, b, atol=1e-6)


def step_args(**kw):
    a = dict(model='ConvNetW32', device='cpu', ipc=2, batch_real=8, batch_train=256, lr_img=0.1, lr_net=0.01,
             init='noise', dis_metric='ours', dsa=False, dsa_strategy='none')
    a.update(kw)
    return argparse.Namespace(**a)


DATA = DataInfo('toy', 1, (12, 12), 3, ('0', '1', '2'), (0.,), (1.,), 'toy-data')  # tiny()'s


def gradient_matching(args, outer_loop=1, inner_loop=1):
    """DC/DSA on tiny()'s data, with the given loops (not those of --ipc)."""
    method = main.GradientMatching(args, DATA)
    method.outer_loop, method.inner_loop = outer_loop, inner_loop
    return method


@pytest.mark.parametrize('dsa', [False, True])
def test_one_matching_step_moves_the_images_and_lowers_the_loss(monkeypatch, dsa):
    torch.manual_seed(0)
    real = tiny()  # batch_real = class size: every draw is the whole class, so the real gradients are fixed
    args = step_args(dsa=dsa, dsa_strategy='flip' if dsa else 'none')
    fixed = get_network(args.model, 1, 3, (12, 12), 'cpu')
    monkeypatch.setattr(main.GradientMatching, 'network', lambda self, *a, **k: copy.deepcopy(fixed))
    syn, method = SynSet(real, args, DATA), gradient_matching(args)
    before = syn.images.detach().clone()
    losses = [method.iteration(it, syn, real) for it in range(4)]
    assert not torch.equal(syn.images, before) and torch.isfinite(syn.images).all()
    if not dsa:  # a flip changes the real gradients from step to step
        assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize('outer_loop', [1, 2])
def test_inner_loop_trains_the_network_between_outer_steps_only(monkeypatch, outer_loop):
    torch.manual_seed(0)
    real, args = tiny(), step_args()
    made = []

    def network(*a, **k):
        made.append(get_network(*a, **k))
        made.append(copy.deepcopy(made[-1]))  # its initial state
        return made[-2]

    monkeypatch.setattr(runs, 'get_network', network)  # (what Method.network builds with)
    gradient_matching(args, outer_loop, 3).iteration(0, SynSet(real, args, DATA), real)
    net, initial = made
    changed = [not torch.equal(a, b) for a, b in zip(net.parameters(), initial.parameters()) if a.dim() > 1]
    assert all(changed) if outer_loop == 2 else not any(changed)  # (conv biases before a norm get no gradient)


def test_batchnorm_statistics_are_measured_on_real_images_then_frozen():
    torch.manual_seed(0)
    real, args = tiny(), step_args(model='ConvNetBN')
    net = get_network('ConvNetBN', 1, 3, (12, 12), 'cpu')
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    main.freeze_batchnorm(net, real, 3)
    assert not bn.training and bn.num_batches_tracked == 1 and not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    stats = bn.running_mean.clone()
    net(torch.randn(4, 1, 12, 12) * 10)  # frozen: a synthetic batch no longer changes them
    assert torch.equal(bn.running_mean, stats)


def test_a_batchnorm_model_matches_with_the_statistics_of_real_images_frozen(monkeypatch):
    """One outer step of DC with ConvNetBN against a hand computation of the protocol: the BN statistics of 16
    real images per class (here the whole class), then BN frozen while the real and the synthetic gradients
    are matched; one SGD step of the images (lr 0.1, the momentum buffer starts at the gradient)."""
    torch.manual_seed(0)
    real, args = tiny(), step_args(model='ConvNetBN', batch_real=8)  # 8 = the class size
    fixed = get_network('ConvNetBN', 1, 3, (12, 12), 'cpu')
    used = []
    monkeypatch.setattr(main.GradientMatching, 'network', lambda self, *a, **k: used.append(copy.deepcopy(fixed)) or used[-1])
    syn = SynSet(real, args, DATA)
    before = syn.images.detach().clone()
    loss = gradient_matching(args, outer_loop=1).iteration(0, syn, real)

    def matching(net, images):
        total = 0
        for c in range(3):
            x = real.images[real.indices_class[c]]
            gw_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(x), torch.full((8,), c)),
                                                                list(net.parameters()))]
            gw_syn = torch.autograd.grad(F.cross_entropy(net(images[2 * c:2 * c + 2]), torch.full((2,), c)),
                                         list(net.parameters()), create_graph=True)
            total = total + match_loss(gw_syn, gw_real, args)
        return total

    net = copy.deepcopy(fixed).train()
    with torch.no_grad():
        net(real.images)  # the statistics of the real images (every class)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.eval()
    images = before.clone().requires_grad_()
    expected = matching(net, images)
    (grad,) = torch.autograd.grad(expected, images)
    assert loss == pytest.approx(expected.item() / 3, rel=1e-4)
    assert torch.allclose(syn.images.detach(), before - 0.1 * grad, atol=1e-6, rtol=1e-4)  # moved down the gradient
    # the network of the iteration: BN frozen on the real images' statistics; no synthetic batch changed them
    (used_net,) = used
    for a, b in zip([m for m in used_net.modules() if isinstance(m, torch.nn.BatchNorm2d)], bns):
        assert not a.training and a.num_batches_tracked == 1
        assert torch.allclose(a.running_mean, b.running_mean, atol=1e-5) and torch.allclose(a.running_var, b.running_var, atol=1e-4)
    # the path matters: with BN in train mode (each batch's own statistics) the loss is another
    net_train = copy.deepcopy(fixed).train()
    assert abs(matching(net_train, before.clone().requires_grad_()).item() / 3 - loss) > 1e-3


def test_every_evaluation_pool_trains_and_tests_each_of_its_models(monkeypatch):
    """(Every model on every input shape: test_networks.py.)"""
    torch.manual_seed(0)
    channel, size = 1, 28
    images, labels = torch.randn(20, channel, size, size), torch.arange(10).repeat(2)
    testloader = tensor_loader(torch.randn(10, channel, size, size), torch.arange(10), 256)
    args = argparse.Namespace(seed=0, device='cpu', num_eval=1, dsa=False, dataset='FashionMNIST', model='ConvNet', ipc=2,
                              epoch_eval_train=1, lr_net=0.01, batch_train=256, dsa_strategy='none')
    data = DataInfo('FashionMNIST', channel, (size, size), 10, tuple(map(str, range(10))), (0.,), (1.,), 'x')
    built, trained = [], []
    network, train = utils.get_network, utils.train_and_test
    monkeypatch.setattr(utils, 'get_network', lambda *a, **k: built.append(a) or network(*a, **k))
    monkeypatch.setattr(utils, 'train_and_test', lambda *a, **k: trained.append(a[1]) or train(*a, **k))
    for mode in ['S', 'SS', *EVAL_POOLS]:
        pool = get_eval_pool(mode, 'ConvNet', 'ConvNet')
        built.clear()
        trained.clear()
        accs = utils.evaluate_models(images, labels, pool, args, testloader, data)
        assert list(accs) == pool and all(len(a) == 1 for a in accs.values()), (mode, accs)
        # a fresh model of every architecture, built for the data's shape, trained once
        assert [a[0] for a in built] == pool and all(a[1:4] == (channel, 10, (size, size)) for a in built)
        assert len(trained) == len(pool) and len(set(map(id, trained))) == len(pool)
        for a in accs.values():  # accuracies on the 10 test images: whole tenths
            assert abs(10 * a[0] - round(10 * a[0])) < 1e-6, (mode, accs)


def test_evaluation_iterations(tmp_path):
    data = DataInfo('MNIST', 1, (28, 28), 10, tuple(map(str, range(10))), (0.,), (1.,), 'x')

    def eval_its(*flags):  # DC's evaluations (every 500 iterations in modes S/SS)
        args = main.configure(main.parser().parse_args([*flags, '--save_path', str(tmp_path)]))
        assert main.GradientMatching.eval_interval == 500
        return runs.Run(args, data, main.GradientMatching(args, data), Group(0, 1), None).eval_its

    assert eval_its('--Iteration', '1200', '--eval_mode', 'S') == [0, 500, 1000, 1200]  # the last one always
    assert eval_its('--Iteration', '1000', '--eval_mode', 'S') == [0, 500, 1000]
    assert eval_its('--Iteration', '1200', '--eval_mode', 'M') == [1200]


@pytest.mark.e2e
def test_dc_summary_lists_every_model_of_the_pool(tmp_path, data):
    p = run('main.py', '--dataset', 'MNIST', '--ipc', 1, '--Iteration', 1, '--num_exp', 1, '--num_eval', 1,
            '--epoch_eval_train', 1, '--batch_real', 4, '--eval_mode', 'M', '--data_path', data,
            '--save_path', tmp_path / 'res', timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    for m in EVAL_POOLS['M']:
        assert f'evaluate 1 random {m},' in p.stdout
    accs = load_result(tmp_path / 'res' / 'res_DC_MNIST_ConvNet_1ipc.pt')['accs_all_exps']
    assert list(accs) == EVAL_POOLS['M'] and all(len(a) == 1 for a in accs.values())  # one model each, at the end only


# ConvNetW32: the ConvNet family at a quarter of the width, so that testing on the 10,000 real test images is quick
FAST = ['--dataset', 'FashionMNIST', '--model', 'ConvNetW32', '--ipc', 2, '--Iteration', 2, '--num_exp', 1, '--num_eval', 1,
        '--epoch_eval_train', 60, '--batch_real', 32, '--eval_mode', 'SS', '--init', 'real']


@pytest.mark.e2e
@needs_fashion
@pytest.mark.parametrize('method', ['DC', 'DSA'])
def test_end_to_end_on_real_fashion_mnist(tmp_path, method):
    p = run('main.py', '--method', method, *FAST, '--data_path', tmp_path / 'data', '--save_path', tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    images, labels = load_result(tmp_path / f'res_{method}_FashionMNIST_ConvNetW32_2ipc.pt')['data'][0]
    assert images.shape == (20, 1, 28, 28) and torch.isfinite(images).all()
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert (tmp_path / f'vis_{method}_FashionMNIST_ConvNetW32_2ipc_exp0_iter2.png').exists()
    assert load_result(tmp_path / f'res_{method}_FashionMNIST_ConvNetW32_2ipc.pt')['accs_all_exps']['ConvNetW32'][0] > 0.35
    if method == 'DSA':
        assert "'dsa_strategy': 'color_crop_cutout_flip_scale_rotate'" in p.stdout  # the DSA paper's default
