"""Every script's defaults, flag by flag, against the papers' public code (their argument parsers and READMEs,
as the specification quotes them); the rules each script's configure() applies to pick a default (DSA strategy,
evaluation epochs, DM's learning rate, CAFE's layer weights, the continual-learning methods' own settings);
DM's loss and its BatchNorm path."""
import argparse

import pytest
import torch
import torch.nn as nn

import CL_DM
import distill
import main
import main_DM
import utils
from helpers import run_in_process
from runs import SynSet
from utils import ClassImages, DataInfo, TensorDataset, default_strategy, evaluation_args

COMMON = dict(dataset='CIFAR10', model='ConvNet', lr_net=0.01, batch_train=256, data_path='data', seed=0)
CONDENSE = dict(COMMON, batch_real=256, save_path='result', eval_mode='S', num_eval=20, dsa_strategy='None')
PAPERS = {  # the papers' public code, flag by flag (epoch_eval_train: None = SPEC's rule 1000 / 300 / 600)
    main: dict(CONDENSE, method='DC', ipc=1, num_exp=5, epoch_eval_train=None, Iteration=1000, lr_img=0.1,
               init='noise', dis_metric='ours'),
    main_DM: dict(CONDENSE, method='DM', ipc=50, eval_mode='SS', num_exp=5, epoch_eval_train=None, Iteration=20000,
                  lr_img=None, init='real', dsa_strategy=None),  # lr_img 1 and the full strategy by rule, below
    distill: dict(CONDENSE, method='DC', ipc=1, num_exp=1, epoch_eval_train=None, Iteration=2000, lr_img=0.1,
                  init='noise', inner_weight=0.01, lambda_1=0.04, lambda_2=0.03, first_weight=None, second_weight=None,
                  third_weight=None, fourth_weight=None, layer_weights=None),  # the weights' rule: below
    CL_DM: dict(COMMON, method='random', dataset='CIFAR100', ipc=20, steps=5, num_eval=3, epoch_eval_train=1000),
}


@pytest.mark.parametrize('script', PAPERS, ids=lambda m: m.__name__)
def test_every_default_is_the_papers(script):
    args = script.parser().parse_args([])
    for flag, value in PAPERS[script].items():
        assert getattr(args, flag) == value, f'{script.__name__} --{flag}'
    assert args.given == set()


def configured(script, *argv):
    """The script's args for this command line, as its configure() resolves them."""
    return script.configure(script.parser().parse_args(list(argv)))


CIFAR10 = DataInfo('CIFAR10', 3, (32, 32), 10, tuple(map(str, range(10))), (0.5,) * 3, (0.25,) * 3, 'x')


def test_rule_based_defaults():
    args = configured(main_DM)
    assert args.dsa and args.dsa_strategy == 'color_crop_cutout_flip_scale_rotate' and args.eval_mode == 'SS'
    assert args.lr_img == 1.0 and configured(main_DM, '--ipc', '100').lr_img == 10.0  # CIFAR10 at ipc >= 100
    assert configured(main_DM, '--ipc', '100', '--dataset', 'CIFAR100').lr_img == 1.0
    cafe = configured(distill)
    assert cafe.layer_weights == [0.1, 0.1, 1.0, 1.0]  # the public code's, for a depth-3 ConvNet
    assert distill.CAFE(cafe, CIFAR10).milestones == [1200, 1600, 1800] and cafe.method == 'CAFE' and not cafe.dsa
    assert configured(distill, '--method', 'DSA').method == 'CAFE_DSA'
    assert configured(distill, '--model', 'ConvNetD4').layer_weights == [0.1, 0.1, 0.1, 1.0, 1.0]
    assert configured(distill, '--first_weight', '0.5', '--fourth_weight', '2').layer_weights == [2.0, 0.1, 1.0, 0.5]
    dc, dc10 = (main.GradientMatching(configured(main, *argv), CIFAR10) for argv in ([], ['--ipc', '10']))
    assert (dc.outer_loop, dc.inner_loop) == (1, 1) and (dc10.outer_loop, dc10.inner_loop) == (10, 50)
    assert main_DM.DM.noaug_epochs == 300 and distill.CAFE.noaug_epochs == 600


@pytest.mark.parametrize('method,expected', [('random', (0, 0.1, 'real')), ('herding', (0, 0.1, 'real')),
                                             ('DSA', (1000, 0.1, 'noise')), ('DM', (20000, 1.0, 'real'))])
def test_continual_learning_takes_each_methods_own_defaults(method, expected):
    args = configured(CL_DM, '--method', method)
    assert (args.Iteration, args.lr_img, args.init) == expected
    assert args.dsa and args.dsa_strategy == 'color_crop_cutout_flip_scale_rotate'  # CIFAR100: every transformation
    if method in ('DSA', 'DM'):  # given flags win over the method's own
        args = configured(CL_DM, '--method', method, '--Iteration', '7', '--lr_img', '0.3', '--init', 'noise')
        assert (args.Iteration, args.lr_img, args.init) == (7, 0.3, 'noise')


def test_dm_evaluates_the_training_model_itself_by_default():
    args = configured(main_DM, '--model', 'ConvNetBN')
    assert utils.get_eval_pool(args.eval_mode, args.model, args.model) == ['ConvNetBN']  # not its non-BN twin


@pytest.mark.parametrize('dataset,expected', [('MNIST', 'color_crop_cutout_scale_rotate'),
                                              ('SVHN', 'color_crop_cutout_scale_rotate'),
                                              ('FashionMNIST', 'color_crop_cutout_flip_scale_rotate'),
                                              ('CIFAR10', 'color_crop_cutout_flip_scale_rotate'),
                                              ('CIFAR100', 'color_crop_cutout_flip_scale_rotate')])
def test_a_script_that_picks_the_dsa_strategy_leaves_flip_out_for_digits(dataset, expected):
    assert default_strategy(dataset) == expected
    for script, argv in [(main, ['--method', 'DSA']), (main_DM, []), (CL_DM, ['--method', 'DM']),
                         (distill, ['--method', 'DSA'])]:
        args = configured(script, '--dataset', dataset, *argv)
        assert args.dsa and args.dsa_strategy == expected, script.__name__
        # an explicit strategy always wins, flip included
        assert configured(script, '--dataset', dataset, *argv, '--dsa_strategy', 'flip_crop').dsa_strategy == 'flip_crop'
    assert not configured(main, '--dataset', dataset).dsa  # DC: no augmentation
    assert not configured(distill, '--dataset', dataset).dsa  # CAFE: none either
    args = configured(main, '--dataset', dataset, '--method', 'herding', '--dsa_strategy', 'crop_flip')
    assert args.dsa and args.dsa_strategy == 'crop_flip'  # a coreset evaluated with the DSA augmentation it names


def test_dm_without_augmentation_when_asked():
    assert not configured(main_DM, '--dsa_strategy', 'none').dsa


def eval_namespace(**kw):
    a = dict(dsa=False, dataset='CIFAR10', model='ConvNet', ipc=10, epoch_eval_train=None)
    a.update(kw)
    return argparse.Namespace(**a)


def test_evaluation_epochs_follow_the_rule():
    assert evaluation_args(eval_namespace(dsa=True), 'ConvNet').epoch_eval_train == 1000  # DSA augmentation
    assert evaluation_args(eval_namespace(), 'ConvNet').epoch_eval_train == 300  # DC, no augmentation
    assert evaluation_args(eval_namespace(dataset='MNIST'), 'ConvNet').epoch_eval_train == 1000  # DC's classic augmentation
    assert evaluation_args(eval_namespace(), 'ConvNetBN').epoch_eval_train == 1000  # crop/noise for ConvNetBN
    assert evaluation_args(eval_namespace(), 'ConvNet', 600).epoch_eval_train == 600  # CAFE
    assert evaluation_args(eval_namespace(dsa=True), 'ConvNet', 600).epoch_eval_train == 1000  # CAFE+DSA
    assert evaluation_args(eval_namespace(epoch_eval_train=7, dsa=True), 'ConvNet').epoch_eval_train == 7  # explicit wins
    given = eval_namespace()
    assert evaluation_args(given, 'ConvNet') is not given and given.epoch_eval_train is None  # a new namespace


def test_dm_learning_rate_rule():
    def lr_img(dataset, ipc):
        return main_DM.DM.defaults(dataset, ipc)['lr_img']

    assert lr_img('CIFAR10', 10) == 1.0 and lr_img('CIFAR10', 100) == 10.0
    assert lr_img('CIFAR100', 100) == 1.0 and lr_img('FashionMNIST', 50) == 1.0
    assert configured(main_DM, '--ipc', '100', '--lr_img', '0.5').lr_img == 0.5  # a given rate wins


@pytest.mark.parametrize('script', ['main.py', 'main_DM.py', 'distill.py', 'CL_DM.py'])
def test_help_shows_every_default(script, monkeypatch, capsys):
    p = run_in_process(monkeypatch, capsys, script, '--help')
    assert p.returncode == 0, p.stderr
    out = p.stdout
    parser = __import__(script[:-3]).parser()
    text = ' '.join(out.split())
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest == 'help':
            continue
        assert action.option_strings[0] in out
        help_text = ' '.join(parser._get_formatter()._expand_help(action).split())
        assert 'default:' in help_text and help_text in text, (script, action.dest)


# ---- DM's loss, and its BatchNorm path ----

class Stub(nn.Module):
    """A 'network' whose embedding is the flattened image; with a BatchNorm layer it counts as a BN model."""

    def __init__(self, bn):
        super().__init__()
        self.bn = nn.BatchNorm2d(1) if bn else nn.Identity()
        self.seen = []

    def embed(self, x):
        self.seen.append(x.shape[0])
        return x.flatten(1)


def class_valued(counts, size=2):
    """Real images of class c are all equal to c (counts: images per class)."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return ClassImages(TensorDataset(labels.float().view(-1, 1, 1, 1).expand(-1, 1, size, size).clone(), labels), len(counts))


def dm_args(**kw):
    a = dict(model='ConvNet', device='cpu', ipc=2, batch_real=5, lr_img=1.0, init='noise', dsa=False,
             dsa_strategy='none', amp=False, compile=False)
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.mark.parametrize('bn', [False, True])
def test_dm_loss_is_the_squared_distance_of_class_mean_embeddings(monkeypatch, bn):
    real = class_valued([7, 3, 9])  # class 1 has fewer than --batch_real (5) images
    args, data = dm_args(), DataInfo('X', 1, (2, 2), 3, ('0', '1', '2'), (0.0,), (1.0,), 'x')
    stub = Stub(bn)
    dm = main_DM.DM(args, data)
    monkeypatch.setattr(dm, 'network', lambda *a, **k: stub)
    syn = SynSet(real, args, data, images=torch.zeros(6, 1, 2, 2))
    with torch.no_grad():
        syn.images[2:4] = 0.5  # class 1's synthetic images
    loss = dm.iteration(0, syn, real)
    # per class: 4 pixels x (c - synthetic mean)^2, summed, then divided by the number of classes
    assert loss == pytest.approx(4 * ((0 - 0) ** 2 + (1 - 0.5) ** 2 + (2 - 0) ** 2) / 3)
    if bn:  # all classes as one batch, equally many of each: min(batch_real, smallest class) = 3
        assert stub.seen[0] == 3 * 3
    else:  # one class at a time: its real batch, then its synthetic images
        assert stub.seen == [5, 2, 3, 2, 5, 2]
    # the gradient step moved every synthetic image towards its class's real mean
    assert (syn.images[4:] > 0).all() and (syn.images[2:4] > 0.5).all()
