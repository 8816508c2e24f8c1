"""IDM (main_IDM.py): the factor-2 mosaics and their expansion, the model queue, the class-by-class image
steps, the shared forward, resume and torchrun identity."""
import argparse
import glob
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import main_IDM
import runs
import utils
from helpers import crash_and_resume, one_thread, run, torchrun
from utils import ClassImages, DataInfo, TensorDataset, load_result


def authors_expand(x):
    """The IDM authors' number_sign_augment, written out: quadrants TL, BL, TR, BR, each upsampled x2."""
    h = x.shape[2] // 2
    quads = [x[:, :, :h, :h], x[:, :, h:, :h], x[:, :, :h, h:], x[:, :, h:, h:]]
    return torch.cat([F.interpolate(q, scale_factor=2, mode='bilinear', align_corners=False) for q in quads])


def test_expand_is_the_authors_quadrant_split():
    x, labels = torch.randn(3, 2, 32, 32), torch.tensor([4, 5, 6])
    images, expanded = utils.expand(x, labels)
    assert torch.equal(images, authors_expand(x)) and expanded.tolist() == [4, 5, 6] * 4
    assert utils.expand(x, labels, factor=1)[0] is x


def test_mosaic_init_puts_four_distinct_real_images_in_quadrant_order():
    """Real images whose every pixel is their own index: each quadrant of a stored image is one real image of
    its class, shrunk; four different ones per stored image, none used twice, in expand's order."""
    per_class, C = 12, 3
    labels = torch.arange(C).repeat_interleave(per_class)
    index = torch.arange(len(labels)).float()
    real = ClassImages(TensorDataset(index.view(-1, 1, 1, 1).expand(-1, 1, 16, 16).clone(), labels), C)
    real.start(0, 'init')
    stored = main_IDM.mosaic_init(real, 2, 2)  # ipc 2, factor 2
    assert stored.shape == (C * 2, 1, 16, 16)
    tiles, _ = utils.expand(stored, None)  # [TL of every image, BL, TR, BR], each constant
    ids = tiles.view(4, C * 2, -1)
    assert torch.equal(ids.amin(-1), ids.amax(-1))  # every tile is exactly one image, upsampled
    ids = ids[..., 0].long().t()  # [stored image, quadrant] -> real index
    for k, row in enumerate(ids.tolist()):
        assert len(set(row)) == 4 and all(labels[i] == k // 2 for i in row)
    assert len(set(ids.flatten().tolist())) == C * 2 * 4  # no real image twice
    top_left = stored[:, :, :8, :8].flatten(1)[:, 0].long()
    assert torch.equal(top_left, ids[:, 0])  # quadrant 0 of expand is the top-left one


def tiny_args(**kw):
    a = dict(model='ConvNet', device='cpu', lr_net=0.01, net_num=5, net_generate_interval=2, reset_every=3,
             fetch_net_num=2, model_train_steps=1, trained_bs=4)
    return argparse.Namespace(**{**a, **kw})


TINY = DataInfo('toy', 1, (8, 8), 3, ('0', '1', '2'), (0.,), (1.,), 'toy-data')  # tiny_real()'s


def tiny_real(C=3, n=8):
    labels = torch.arange(C).repeat_interleave(n)
    return ClassImages(TensorDataset(torch.randn(len(labels), 1, 8, 8) + labels.view(-1, 1, 1, 1), labels), C)


def test_the_queue_grows_every_interval_up_to_its_cap_and_resets_its_meters(monkeypatch):
    args, real = tiny_args(), tiny_real()
    torch.manual_seed(0)
    idm = main_IDM.IDM(args, TINY)
    idm.start(real)
    queue = idm.queue
    resets, sizes = [], []
    monkeypatch.setattr(main_IDM, 'match', lambda *a: 0.0)
    reset = queue.reset_meters
    for it in range(12):
        monkeypatch.setattr(queue, 'reset_meters', lambda: resets.append(it) or reset())
        idm.iteration(it, None, real)
        sizes.append(len(queue))
    assert sizes == [4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]  # 3, one more at 0, 2, 4, ...: at most net_num 5
    assert resets == [3, 6, 9]
    assert sum(queue.seen) == 2 * 4 * (12 - 9)  # since the last reset: 2 models x 4 images x 3 iterations
    oldest = queue.models[0]
    queue.push()
    assert len(queue) == 5 and queue.models[0] is not oldest  # the oldest dropped


def test_queue_accuracy_is_the_percent_right_since_the_reset():
    queue = main_IDM.ModelQueue(lambda: utils.get_network('ConvNet', 1, 3, (8, 8), 'cpu'), 3,
                                lambda p: torch.optim.SGD(p, lr=0.0))
    torch.manual_seed(0)
    queue.push()
    images, labels = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        right = (queue.models[0](images).argmax(1) == labels).sum().item()
    queue.train_step(0, images, labels)  # (lr 0: the weights stay)
    assert queue.accuracy(0).item() == pytest.approx(100 * right / 6)
    queue.reset_meters()
    assert queue.accuracy(0).item() == 0 and queue.seen == [0]


def test_class_steps_are_the_authors_sequential_sgd_steps():
    """One SGD step of the whole set per class, in turn (momentum leaking into the other classes' images),
    with a loss of each class's own images: bit for bit the authors' loop."""
    C, ipc = 4, 3
    x0 = torch.randn(C * ipc, 2, 4, 4)
    weights = torch.randn(C, 2, 4, 4)

    def class_loss(c, images):
        return (weights[c] * images).square().sum() + images.sin().sum()

    theirs = x0.clone().requires_grad_(True)
    opt = torch.optim.SGD([theirs], lr=0.2, momentum=0.5)
    syn = argparse.Namespace(images=x0.clone().requires_grad_(True), ipc=ipc, num_classes=C, classes=list(range(C)))
    syn.optimizer = torch.optim.SGD([syn.images], lr=0.2, momentum=0.5)
    syn.of_classes = lambda: slice(0, C * ipc)
    for _ in range(3):  # (the momentum buffer carries over between iterations)
        for c in range(C):
            opt.zero_grad()
            class_loss(c, theirs[c * ipc:(c + 1) * ipc]).backward()
            opt.step()
        main_IDM.class_steps(syn, class_loss)
        assert torch.equal(syn.images, theirs)
    assert torch.equal(syn.optimizer.state[syn.images]['momentum_buffer'], opt.state[theirs]['momentum_buffer'])


@pytest.mark.parametrize('model', ['ConvNet', 'ConvNetBN'])
def test_the_class_loss_with_one_forward_is_the_authors_with_two(model, monkeypatch):
    """IDM's loss of a class from one forward (features, then the classifier on them) equals the authors'
    formula with its separate forwards: embed for the DM distance, net(x) for the cross-entropy weighted by
    ce_weight x the model's accuracy in percent, on the expanded images under one shared DSA draw."""
    real = tiny_real(C=3, n=12)
    args = argparse.Namespace(batch_real=6, factor=2, ce_weight=0.5, dsa_strategy='color_crop_scale')
    syn = argparse.Namespace(num_classes=3)  # (class_steps is patched: the loss's mean over the classes)
    torch.manual_seed(0)
    net = utils.get_network(model, 1, 3, (8, 8), 'cpu')
    images = torch.randn(2, 1, 8, 8)
    accuracy = torch.tensor(37.5)
    ours = []
    monkeypatch.setattr(main_IDM, 'class_steps', lambda syn, class_loss: ours.append(class_loss(1, images)))
    real.start(0, 1)
    main_IDM.match(net, accuracy, syn, real, args)
    real.start(0, 1)  # the same draws again: the real batch and the DSA parameters of class 1
    img_real = real.get_images(1, args.batch_real)
    img_real, img_syn = utils.siamese_augment([img_real, authors_expand(images)], args, real.rng(1))
    distance = ((net.embed(img_real).mean(0) - net.embed(img_syn).mean(0)) ** 2).sum()
    theirs = distance + 0.5 * 37.5 * F.cross_entropy(net(img_syn), torch.ones(8, dtype=torch.long))
    assert ours[0].item() == pytest.approx(theirs.item(), rel=1e-5)
    assert not any(p.requires_grad is False for p in net.parameters())  # the queue's model trains again after
    monkeypatch.setattr(main_IDM, 'class_steps', lambda syn, class_loss: ours.append(class_loss(1, images)))
    real.start(0, 1)
    main_IDM.match(net, torch.tensor(0.0), syn, real, args)  # an untrained model's weight 0: DM's distance alone
    assert ours[1].item() == pytest.approx(distance.item(), rel=1e-5)


def test_authors_defaults_by_dataset_and_ipc():
    d = main_IDM.authors_defaults
    assert d('CIFAR10', 1) == dict(ce_weight=0.5, eval_interval=100, model_train_steps=10, batch_real=5000,
                                   net_generate_interval=5)
    assert d('CIFAR10', 10)['ce_weight'] == 0.5 and d('CIFAR10', 10)['batch_real'] == 256
    assert d('CIFAR10', 50)['ce_weight'] == 0.1 and d('CIFAR10', 50)['eval_interval'] == 500
    assert d('CIFAR100', 10)['ce_weight'] == 0.1 and d('CIFAR100', 10)['model_train_steps'] == 50
    assert d('TinyImageNet', 50) == dict(ce_weight=0.8, eval_interval=1000, model_train_steps=50, batch_real=256,
                                         net_generate_interval=30)


ARGS = ['--dataset', 'MNIST', '--ipc', '2', '--num_eval', '1', '--epoch_eval_train', '1', '--batch_real', '4',
        '--eval_interval', '2', '--net_generate_interval', '2', '--model_train_steps', '1', '--trained_bs', '8']


@pytest.mark.e2e
def test_a_crashed_run_resumes_bit_identically_queue_and_all(data, tmp_path, monkeypatch):
    args = [*ARGS, '--Iteration', '4', '--num_exp', '2', '--checkpoint_every', '1', '--data_path', str(data)]

    def run_main(save_path, *extra):
        monkeypatch.setattr(sys, 'argv', ['main_IDM.py', *args, '--save_path', str(save_path), *extra])
        runs.condense(main_IDM.IDM, main_IDM.configure(runs.setup(main_IDM.parser().parse_args())))
        return load_result(glob.glob(str(save_path / 'res_*.pt'))[0])

    whole = run_main(tmp_path / 'whole')
    # cut in iteration 3 of experiment 1 (the 8th iteration): the queue has trained for 7 iterations
    resumed = crash_and_resume(monkeypatch, run_main, main_IDM.IDM, 'iteration', 4 + 3 + 1, tmp_path / 'cut')
    for (a, la), (b, lb) in zip(resumed['data'], whole['data']):
        assert a.shape == (20, 1, 28, 28) and torch.equal(a, b) and torch.equal(la, lb)  # stored unexpanded
    assert resumed['accs_all_exps'] == whole['accs_all_exps'] and len(resumed['data']) == 2
    assert resumed['settings']['factor'] == 2


@pytest.mark.e2e
@pytest.mark.torchrun
def test_two_processes_give_the_single_process_result_bit_for_bit(data, tmp_path):
    args = [*ARGS, '--Iteration', '3', '--num_exp', '1', '--data_path', data]
    p = run('main_IDM.py', *args, '--save_path', tmp_path / 'one', timeout=600, env=one_thread())
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun('main_IDM.py', *args, '--save_path', tmp_path / 'two')
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    one, two = (load_result(glob.glob(os.path.join(tmp_path / d, 'res_*.pt'))[0]) for d in ('one', 'two'))
    assert torch.equal(one['data'][0][0], two['data'][0][0]) and one['accs_all_exps'] == two['accs_all_exps']


@pytest.mark.parametrize('name,flags,factor', [('res_IDM_MNIST_ConvNet_1ipc.pt', [], 2),  # by the method's name
                                               ('set.pt', ['--factor', '2', '--dataset', 'MNIST'], 2),  # made elsewhere
                                               ('res_DM_MNIST_ConvNet_1ipc.pt', [], 1)])
def test_evaluate_py_expands_mosaic_sets(data, tmp_path, monkeypatch, capsys, name, flags, factor):
    from helpers import run_in_process
    stored = torch.randn(10, 1, 28, 28)
    torch.save({'data': [[stored, torch.arange(10)]]}, tmp_path / name)
    seen = []
    evaluate = utils.evaluate_models
    monkeypatch.setattr(utils, 'evaluate_models', lambda images, labels, *a, **k: seen.append((images, labels))
                        or evaluate(images, labels, *a, **k))
    p = run_in_process(monkeypatch, capsys, 'evaluate.py', tmp_path / name, *flags, '--data_path', data, '--num_eval', 1,
                       '--epoch_eval_train', 1)
    assert p.returncode == 0, p.stderr[-2000:]
    (images, labels), = seen
    assert torch.equal(images.cpu(), utils.expand(stored, None, factor)[0])
    assert labels.tolist() == list(range(10)) * factor ** 2
