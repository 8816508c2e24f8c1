"""Coreset selection: random, herding, k-center and forgetting, on problems whose answer is known."""
import argparse

import pytest
import torch

from helpers import needs_fashion, run
from utils import (ClassImages, DataInfo, TensorDataset, forgetting_counts, get_dataset, get_network, herding, k_center,
                   load_result, nearest_to_mean, select_coreset, train_classifier)

POINTS = torch.tensor([[0., 0.], [10., 0.], [1., 1.], [-1., -1.], [4., 0.]])  # mean (2.8, 0)


def test_herding_picks_the_point_nearest_the_mean_first_then_keeps_the_running_mean_close():
    picks = herding(POINTS, 5).tolist()
    assert picks[0] == 4  # (4, 0) is nearest the mean (2.8, 0)
    # second: the mean of (4,0) and x closest to (2.8,0), i.e. x closest to (1.6, 0): (1, 1)
    assert picks[1] == 2
    assert sorted(picks) == [0, 1, 2, 3, 4]  # every point once
    assert herding(POINTS, 2).tolist() == picks[:2] and len(herding(POINTS, 99)) == 5


def test_k_center_second_pick_is_the_farthest_point():
    picks = k_center(POINTS, 3).tolist()
    assert picks[0] == 4  # nearest the mean
    # squared distances from (4,0): 16, 36, 10, 26: the farthest is (10,0); then the point farthest from
    # both picks is (-1,-1) (26, against 16 for (0,0) and 10 for (1,1))
    assert picks[1:] == [1, 3]
    assert sorted(k_center(POINTS, 5).tolist()) == [0, 1, 2, 3, 4]


def test_herding_and_k_center_pick_differently_on_points():
    # herding's third pick: 3 * mean - (4,0) - (1,1) = (3.4, -1) is nearest (0, 0); k-center's second is the
    # farthest point (10, 0)
    assert herding(POINTS, 3).tolist() == [4, 2, 0] and k_center(POINTS, 3).tolist() == [4, 1, 3]


def test_nearest_to_mean_differs_from_greedy_herding_after_the_first_pick():
    # squared distances to the mean (2.8, 0): 7.84, 51.84, 4.24, 15.44, 1.44
    assert nearest_to_mean(POINTS, 3).tolist() == [4, 2, 0]  # (the same three as greedy herding here)
    assert nearest_to_mean(POINTS, 4).tolist() == [4, 2, 0, 3] and herding(POINTS, 4).tolist()[3] == 1
    # greedy herding's fourth pick: 4 * mean - (4,0) - (1,1) - (0,0) = (6.2, -1): nearest (10, 0), far from the mean


@pytest.mark.parametrize('method,rule,expected', [('herding', 'greedy', [8, 4, 0, 2]), ('herding', 'nearest', [8, 4, 0, 6]),
                                                  ('herding', None, [8, 4, 0, 6]), ('kcenter', None, [8, 2, 6, 4])])
def test_select_coreset_dispatches_to_each_rule(monkeypatch, method, rule, expected):
    """With the images' pixels as their features (embed patched), select_coreset picks what herding and
    k_center pick on POINTS, as indices into the real images (class 0 holds images 0, 2, 4, 6, 8)."""
    import utils
    images = torch.zeros(10, 1, 12, 12)
    images[0::2, 0, 0, :2] = POINTS  # class 0: POINTS in two pixels
    images[1::2, 0, 5, :2] = -POINTS  # class 1
    real = ClassImages(TensorDataset(images, torch.tensor([0, 1] * 5)), 2)
    monkeypatch.setattr(utils, 'embed', lambda net, x: x.flatten(1))
    rule = {} if rule is None else dict(herding=rule)  # none given: nearest (main.py's default)
    picks = select_coreset(method, real, args(coreset_epochs=1, **rule), info(num_classes=2), 4)
    assert picks[0].tolist() == expected and len(picks[1]) == 4


def test_forgetting_counts_on_a_scripted_sequence():
    correct = torch.tensor([
        # example: 0  1  2  3
        [1, 0, 1, 0],
        [0, 0, 1, 1],
        [1, 0, 1, 0],
        [0, 0, 1, 1],
        [1, 0, 0, 1],
    ], dtype=torch.bool)
    # 0: forgotten at presentations 2 and 4; 1: never learned (counts T = 5); 2: forgotten once at the
    # end; 3: forgotten once (after presentation 2)
    assert forgetting_counts(correct, 'toneva').tolist() == [2, 5, 1, 1]
    assert forgetting_counts(correct).tolist() == [2, 0, 1, 1]  # the default, events: never learned, never forgotten


@pytest.mark.parametrize('rule,expected', [(None, {0, 2}), ('events', {0, 2}), ('toneva', {6, 8})])
def test_forgetting_picks_forgotten_images_by_default_not_never_learned_ones(monkeypatch, rule, expected):
    """Class 0 (images 0, 2, 4, 6, 8): 0 was forgotten twice, 2 once, 4 was always right, 6 and 8 were never
    right. The default (events, the papers' row) picks 0 and 2; toneva picks the never-learned 6 and 8."""
    import utils
    record = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool).T
    correct = torch.ones(4, 10, dtype=torch.bool)  # [epochs, images of class 0 then of class 1]
    correct[:, :5] = record  # class 1: always right
    monkeypatch.setattr(utils, 'trained_classifier', lambda real, classes, args, data, epochs: (None, correct))
    real = ClassImages(TensorDataset(torch.zeros(10, 1, 12, 12), torch.tensor([0, 1] * 5)), 2)
    a = args() if rule is None else args(forgetting_score=rule)
    assert set(select_coreset('forgetting', real, a, info(num_classes=2), 2)[0].tolist()) == expected


def test_the_coreset_rules_main_py_and_continual_learning_use_by_default():
    import CL_DM
    import main
    a = main.parser().parse_args([])
    assert (a.forgetting_score, a.herding) == ('events', 'nearest')  # the rules that reproduce the DC paper's rows
    assert CL_DM.parser().parse_args([]).herding == 'greedy'  # iCaRL's herding, which the DM paper's CL follows


def clustered(num_classes=3, per_class=30, seed=0):
    """Classes of 1x12x12 images around class-specific patterns, plus a few far outliers per class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    patterns = torch.randn(num_classes, 1, 12, 12, generator=g) * 2
    images = patterns[labels] + 0.3 * torch.randn(len(labels), 1, 12, 12, generator=g)
    return ClassImages(TensorDataset(images, labels), num_classes)


def args(**kw):
    a = dict(model='ConvNetW32', device='cpu', lr_net=0.01, batch_train=32, coreset_epochs=3)
    a.update(kw)
    return argparse.Namespace(**a)


def info(num_classes=3, dataset='toy'):
    """The DataInfo of 1x12x12 images of num_classes classes."""
    return DataInfo(dataset, 1, (12, 12), num_classes, tuple(map(str, range(num_classes))), (0.,), (1.,), 'toy-data')


@pytest.mark.parametrize('method', ['random', 'herding', 'kcenter', 'forgetting'])
def test_select_coreset_returns_distinct_images_of_each_class(method):
    torch.manual_seed(0)
    real = clustered()
    picks = select_coreset(method, real, args(), info(), 5)
    assert len(picks) == 3
    for c, idx in enumerate(picks):
        assert len(idx) == 5 and len(set(idx.tolist())) == 5
        assert set(idx.tolist()) <= set(real.indices_class[c].tolist())
    sub = select_coreset(method, real, args(), info(), 4, classes=[2, 0])  # a subset of the classes (continual learning)
    assert len(sub) == 2  # one selection per class asked for, in their order
    for idx, c in zip(sub, [2, 0]):
        assert len(idx) == 4 and len(set(idx.tolist())) == 4
        assert set(idx.tolist()) <= set(real.indices_class[c].tolist())


def test_train_classifier_learns_and_records_every_presentation():
    torch.manual_seed(0)
    real = clustered()
    net = get_network('ConvNetW32', 1, 2, (12, 12), 'cpu')
    correct = train_classifier(net, real, [1, 2], args(), 4)
    assert correct.shape == (4, 60) and correct.dtype == torch.bool
    assert correct[-1].float().mean() > 0.9  # two well separated classes are learned


class Stop(Exception):
    pass


class StopsAfter(torch.nn.Module):
    """A network that raises Stop at its n-th forward pass (a stopped training)."""

    def __init__(self, net, n=None):
        super().__init__()
        self.net, self.n = net, n

    def forward(self, x):
        if self.n is not None:
            self.n -= 1
            if self.n < 0:
                raise Stop
        return self.net(x)


def test_a_stopped_training_of_the_network_continues_from_its_last_epoch_bit_for_bit(tmp_path):
    """train_classifier with a checkpoint: stopped in its third epoch (of 4, the rate dropped after 2) and run
    again, it gives the network, the record and the random stream of one uninterrupted training."""
    real, a, path = clustered(), args(), str(tmp_path / 'partial.pt')

    def train(n=None, checkpoint=None):
        net = StopsAfter(get_network('ConvNetW32', 1, 2, (12, 12), 'cpu'), n)
        return net, train_classifier(net, real, [1, 2], a, 4, checkpoint=checkpoint), torch.rand(2)

    torch.manual_seed(0)
    net, correct, after = train()
    torch.manual_seed(0)
    with pytest.raises(Stop):
        train(n=2 * 2 + 1, checkpoint=path)  # (2 batches of 32 per epoch: stopped in the third epoch)
    assert torch.load(path)['epoch'] == 2
    torch.manual_seed(123)  # (the stream comes from the checkpoint)
    again, correct_again, after_again = train(checkpoint=path)
    assert torch.equal(correct, correct_again) and torch.equal(after, after_again)
    for (k, x), (_, y) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(x, y), k


def test_the_trained_network_is_kept_and_read_back_as_it_was_trained(tmp_path, monkeypatch):
    """Herding, k-center and forgetting from one seed share one network, trained once and kept in --save_path:
    reading it gives the picks and the later random draws of training it (and of a run without the file)."""
    import utils
    real, kept = clustered(), args(save_path=str(tmp_path))

    def picks_then_draw(method, a, n=4, seed=1):
        torch.manual_seed(seed)
        return [p.tolist() for p in select_coreset(method, real, a, info(), n)], torch.rand(3).tolist()

    uncached = {m: picks_then_draw(m, args()) for m in ('herding', 'kcenter', 'forgetting')}
    assert picks_then_draw('herding', kept) == uncached['herding']  # trains and keeps the network
    files = list(tmp_path.glob('classifier_toy_ConvNetW32_3ep_*.pt'))
    assert len(files) == 1
    monkeypatch.setattr(utils, 'train_classifier', lambda *a: pytest.fail('trained again'))
    for method in ('herding', 'kcenter', 'forgetting'):
        assert picks_then_draw(method, kept) == uncached[method]
    assert len(picks_then_draw('kcenter', kept, n=2)[0][0]) == 2  # another ipc: the same network
    monkeypatch.undo()
    picks_then_draw('herding', kept, seed=2)  # another seed, other epochs: other networks
    picks_then_draw('herding', args(save_path=str(tmp_path), coreset_epochs=2))
    assert len(list(tmp_path.glob('classifier_*.pt'))) == 3
    files[0].write_bytes(b'PK\x03\x04 damaged')  # a damaged file is trained again, and replaced
    assert picks_then_draw('forgetting', kept) == uncached['forgetting']
    assert utils.load_pt(str(files[0]))['key']['epochs'] == 3


@pytest.mark.e2e
def test_coreset_baseline_end_to_end(tmp_path, data):
    """main.py --method herding: real training images of their class, selected once (no iterations), evaluated.
    (The other coreset methods take the same path in main.py; their selection is tested above.)"""
    p = run('main.py', '--method', 'herding', '--dataset', 'MNIST', '--ipc', 2, '--num_exp', 1, '--num_eval', 2,
            '--epoch_eval_train', 2, '--coreset_epochs', 2, '--data_path', data, '--save_path', tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    saved = load_result(tmp_path / 'res_herding_MNIST_ConvNet_2ipc.pt')
    images, labels = saved['data'][0]
    assert images.shape == (20, 1, 28, 28) and labels.tolist() == [c for c in range(10) for _ in range(2)]
    real = get_dataset('MNIST', str(data))[6]
    for image, label in zip(images, labels):  # real training images of their class
        match = (real.images == image).flatten(1).all(1)
        assert match.any() and real.labels[match][0] == label
    assert len(saved['accs_all_exps']['ConvNet']) == 2
    assert 'at iterations [0]' in p.stdout and (tmp_path / 'vis_herding_MNIST_ConvNet_2ipc_exp0_iter0.png').exists()


@pytest.mark.e2e
@needs_fashion
def test_random_baseline_on_real_fashion_mnist_is_above_chance(tmp_path):
    # ConvNetW32: the ConvNet family at a quarter of the width, so that testing on the 10,000 real test images is quick
    p = run('main.py', '--method', 'random', '--dataset', 'FashionMNIST', '--model', 'ConvNetW32', '--ipc', 10, '--num_exp', 1, '--num_eval', 1,
            '--epoch_eval_train', 30, '--data_path', tmp_path / 'data', '--save_path', tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert load_result(tmp_path / 'res_random_FashionMNIST_ConvNetW32_10ipc.pt')['accs_all_exps']['ConvNetW32'][0] > 0.5
