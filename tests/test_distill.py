"""CAFE (distill.py): the loss by hand, gradients of every term, the dynamic loops, end-to-end runs."""
import argparse
import itertools
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import distill
import runs
import utils
from helpers import needs_fashion, run, tiny
from utils import DataInfo, get_network, load_result


class Toy(nn.Module):
    """A fixed 'network' with hand-made stages: 2x the image, then its sum (the embedding)."""
    taps = (0, 1)

    def stages(self, x):
        return [2 * x, x.sum((1, 2, 3), keepdim=True)], None


def test_losses_equal_a_hand_computation():
    real = torch.tensor([[[1., 2.], [3., 4.]], [[0., 1.], [1., 1.]]]).view(2, 2, 1, 1, 2)  # 2 classes x 2 images
    syn = torch.tensor([[2., 2.], [0., 0.]]).view(2, 1, 1, 1, 2).requires_grad_()  # 1 image per class
    args = argparse.Namespace(layer_weights=[0.5, 3.0])
    alignment, centre_loss, centres, embeddings = distill.cafe_losses(Toy(), real, syn, args)
    # class means of the real images: (2, 3) and (0.5, 1); stage 1 doubles them, stage 2 sums them
    stage1 = (4 - 4) ** 2 + (6 - 4) ** 2 + (1 - 0) ** 2 + (2 - 0) ** 2
    stage2 = (5 - 4) ** 2 + (1.5 - 0) ** 2
    assert alignment.item() == pytest.approx(0.5 * stage1 + 3.0 * stage2)
    assert centre_loss.item() == pytest.approx(stage2)  # the final stage is the embedding
    assert centres.flatten().tolist() == [4, 0] and embeddings.flatten().tolist() == [3, 7, 1, 2]
    # real embeddings 3, 7 (class 0) and 1, 2 (class 1) against synthetic centres 4 and 0
    ce = 0
    for e, label in [(3, 0), (7, 0), (1, 1), (2, 1)]:
        logits = [e * 4, e * 0]
        ce += -logits[label] + math.log(sum(math.exp(v) for v in logits))
    surrogate, value = distill.discrimination(centres, embeddings, [0, 1], 2, sharded=False)
    assert value == pytest.approx(ce, rel=1e-5)
    # d ce / d centre_k = sum over real embeddings e of (softmax_k - [label = k]) e, by hand
    grad = [0.0, 0.0]
    for e, label in [(3, 0), (7, 0), (1, 1), (2, 1)]:
        p0 = 1 / (1 + math.exp(e * 0 - e * 4))
        grad[0] += (p0 - (label == 0)) * e
        grad[1] += (1 - p0 - (label == 1)) * e
    (g,) = torch.autograd.grad(surrogate, centres)
    assert g.flatten().tolist() == pytest.approx(grad, rel=1e-5)


def test_the_discrimination_gradient_is_the_cross_entropys_summed_over_classes():
    torch.manual_seed(0)
    embeddings, centres = torch.randn(3, 5, 4), torch.randn(3, 4, requires_grad=True)
    logits = embeddings.flatten(0, 1) @ centres.t()
    ce = F.cross_entropy(logits, torch.arange(3).repeat_interleave(5), reduction='sum')
    (expected,) = torch.autograd.grad(ce, centres)
    surrogate, value = distill.discrimination(centres, embeddings, [0, 1, 2], 3, sharded=False)
    assert value == pytest.approx(ce.item(), rel=1e-5)
    (g,) = torch.autograd.grad(surrogate, centres)
    assert torch.allclose(g, expected, atol=1e-5)  # the surrogate's gradient: autograd's of the summed cross-entropy
    # the hand-derived per-class terms, summed exactly (distill.exact_sum): the same sum whichever way the
    # terms are grouped (as in processes), bit for bit; it is what the surrogate's gradient holds
    parts = []
    for c, e in enumerate(embeddings.detach()):
        p = torch.softmax(e @ centres.detach().t(), dim=1)
        p[:, c] -= 1
        parts.append(p.t() @ e)
    exact = distill.exact_sum(parts, centres)
    assert torch.allclose(exact, g, atol=1e-6)
    for order in itertools.permutations(range(3)):
        assert torch.equal(distill.exact_sum([parts[k] for k in order], centres), exact)


def test_gradients_reach_the_synthetic_images_from_every_term():
    torch.manual_seed(0)
    net = get_network('ConvNetW32', 1, 3, (12, 12), 'cpu').requires_grad_(False)
    real, syn = torch.randn(3, 8, 1, 12, 12), torch.randn(3, 2, 1, 12, 12, requires_grad=True)
    args = distill.configure(distill.parser().parse_args(['--model', 'ConvNetW32']))  # the default layer weights
    alignment, centre_loss, centres, embeddings = distill.cafe_losses(net, real, syn, args)
    surrogate, _ = distill.discrimination(centres, embeddings, [0, 1, 2], 3, sharded=False)
    for term in (alignment, centre_loss, surrogate):
        (g,) = torch.autograd.grad(term, syn, retain_graph=True)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_default_layer_weights_generalise_the_public_ones():
    assert distill.default_layer_weights(4) == [0.1, 0.1, 1.0, 1.0]  # depth 3: the public code's
    assert distill.default_layer_weights(5) == [0.1, 0.1, 0.1, 1.0, 1.0]
    assert distill.default_layer_weights(1) == [1.0]


def loops(query, **kw):
    """Run the dynamic loops with scripted query accuracies (a sequence, or a function of the steps taken
    so far: 'o' outer, 'i' inner); returns (outer steps, inner steps, the steps in order)."""
    a = argparse.Namespace(window=3, lambda_1=0.04, lambda_2=0.03, max_outer=50, max_inner=50)
    vars(a).update(kw)
    steps, feed = [], iter(query) if not callable(query) else None
    n_outer, n_inner = distill.dynamic_loops(lambda: steps.append('o'), lambda: steps.append('i'),
                                             lambda: next(feed) if feed else query(steps), a)
    return n_outer, n_inner, ''.join(steps)


def test_loops_stop_by_their_criteria():
    # outer 1 (0.5); inner until three accuracies spread > 0.03: 0.50 0.51 0.60 -> 3 epochs
    # outer 2 (0.6); inner: 0.6 0.6 0.6 0.7 -> the window (0.6, 0.6, 0.7) spreads -> 4 epochs
    # outer 3 (0.61): the last three outer accuracies 0.5, 0.6, 0.61 spread 0.11: go on; inner 3 epochs
    # outer 4 (0.62): 0.6, 0.61, 0.62 spread 0.02 < 0.04: stop
    q = [0.5, 0.50, 0.51, 0.60, 0.6, 0.6, 0.6, 0.6, 0.7, 0.61, 0.0, 0.5, 0.9, 0.62]
    assert loops(q) == (4, 10, 'oiiioiiiioiiio')


def test_loops_stop_by_their_caps():
    # after an outer step the accuracy alternates (never settles); after an inner one it stays (never spreads)
    def query(steps):
        return (0.1 if steps.count('o') % 2 else 0.9) if steps[-1] == 'o' else 0.5

    assert loops(query, max_outer=4, max_inner=7) == (4, 21, 'oiiiiiii' * 3 + 'o')


def cafe_args(**kw):
    a = dict(model='ConvNetW32', device='cpu', ipc=1, batch_real=8, batch_train=256, lr_img=0.1, lr_net=0.01,
             init='noise', dsa=False, dsa_strategy='none', inner_weight=0.01, lambda_1=0.04, lambda_2=0.03, window=3,
             query=8, max_outer=4, max_inner=4, Iteration=10, layer_weights=[0.1, 0.1, 1.0, 1.0])
    a.update(kw)
    return argparse.Namespace(**a)


def test_an_iteration_moves_the_images_and_follows_the_learning_rate_schedule():
    torch.manual_seed(0)
    real, args = tiny(), cafe_args()
    data = DataInfo('X', 1, (12, 12), 3, ('0', '1', '2'), (0.0,), (1.0,), 'x')
    cafe = distill.CAFE(args, data)
    assert cafe.milestones == [6, 8, 9]  # 0.6, 0.8 and 0.9 of --Iteration 10
    syn = runs.SynSet(real, args, data)
    before = syn.images.detach().clone()
    out = cafe.iteration(0, syn, real)
    assert not torch.equal(syn.images, before) and math.isfinite(out['loss'])
    assert 1 <= out['outer'] <= 4 and out['inner'] <= 4 * 3
    cafe.iteration(8, syn, real)
    assert syn.optimizer.param_groups[0]['lr'] == pytest.approx(0.1 * 0.25)  # halved at 6 and at 8


@pytest.mark.e2e
@needs_fashion
def test_end_to_end_on_real_fashion_mnist(tmp_path):
    # one channel: the public code only runs on 3x32x32
    # ConvNetW32: the ConvNet family at a quarter of the width, so that testing on the 10,000 real test images is quick
    p = run('distill.py', '--dataset', 'FashionMNIST', '--model', 'ConvNetW32', '--ipc', 1, '--Iteration', 1, '--num_exp', 1, '--num_eval', 1,
            '--epoch_eval_train', 2, '--batch_real', 16, '--query', 8, '--window', 3, '--max_outer', 3, '--max_inner', 3,
            '--eval_mode', 'SS', '--data_path', tmp_path / 'data', '--save_path', tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    images, labels = load_result(tmp_path / 'res_CAFE_FashionMNIST_ConvNetW32_1ipc.pt')['data'][0]
    assert images.shape == (10, 1, 28, 28) and labels.tolist() == list(range(10)) and torch.isfinite(images).all()


@pytest.mark.e2e
def test_end_to_end_on_a_100_class_three_channel_fixture(tmp_path):
    import pickle
    import numpy as np
    d = tmp_path / 'cifar-100-python'
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [('train', 300), ('test', 100)]:
        pickle.dump({'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8), 'fine_labels': list(np.arange(n) % 100)},
                    open(d / name, 'wb'))
    p = run('distill.py', '--method', 'DSA', '--dataset', 'CIFAR100', '--model', 'ConvNetD4', '--ipc', 2,
            '--Iteration', 1, '--num_exp', 1, '--num_eval', 1, '--epoch_eval_train', 1, '--batch_real', 3, '--query', 1,
            '--window', 2, '--max_outer', 2, '--max_inner', 2, '--eval_mode', 'SS', '--data_path', tmp_path,
            '--save_path', tmp_path / 'res')
    assert p.returncode == 0, p.stderr[-2000:]
    images, labels = load_result(tmp_path / 'res' / 'res_CAFE_DSA_CIFAR100_ConvNetD4_2ipc.pt')['data'][0]
    assert images.shape == (200, 3, 32, 32) and labels.tolist() == [c for c in range(100) for _ in range(2)]
    pace = json.loads((tmp_path / 'res' / 'res_CAFE_DSA_CIFAR100_ConvNetD4_2ipc.json').read_text())['pace']
    # the iteration's outer and inner steps within their caps (an inner loop after each outer step but the last)
    assert pace['iterations'] == 1 and pace['seconds'] > 0 and 1 <= pace['outer'] <= 2 and pace['inner'] <= 2
    assert f"per iteration: seconds {pace['seconds']:.4g}" in p.stdout and f"outer {pace['outer']:.4g}" in p.stdout
