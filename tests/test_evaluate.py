"""The evaluation protocol: evaluate_synset learns, the model pools of every --eval_mode, models trained
together (--eval_together) as each would be alone."""
import argparse
import copy

import pytest
import torch

import together as batched
import utils
from helpers import separable
from utils import DataInfo, ParamDiffAug, TensorDataset, evaluate_synset, get_eval_pool, get_network, tensor_loader


def args(**kw):
    a = dict(device='cpu', lr_net=0.01, epoch_eval_train=30, batch_train=256, dsa=False, dsa_strategy='none',
             dsa_param=ParamDiffAug(), dc_aug_param=None)
    a.update(kw)
    return argparse.Namespace(**a)


def test_evaluate_synset_learns_a_separable_problem():
    torch.manual_seed(0)
    x, y = separable(5, 0)
    xt, yt = separable(30, 1)
    testloader = tensor_loader(xt, yt, 256)
    net = get_network('ConvNetW32', 1, 10, (12, 12), 'cpu')
    net, acc_train, acc_test = evaluate_synset(0, net, x, y, testloader, args())
    assert acc_train > 0.9 and acc_test > 0.9
    # an untrained network is at chance level on the same data
    net0 = get_network('ConvNetW32', 1, 10, (12, 12), 'cpu')
    _, _, acc0 = evaluate_synset(0, net0, x, y, testloader, args(epoch_eval_train=0))
    assert acc0 < 0.5


def test_evaluate_synset_with_dsa_and_a_plain_dataloader():
    torch.manual_seed(0)
    x, y = separable(5, 0)
    xt, yt = separable(20, 1)
    testloader = torch.utils.data.DataLoader(TensorDataset(xt, yt), batch_size=64)  # the papers' kind of loader
    net = get_network('ConvNetW32', 1, 10, (12, 12), 'cpu')
    _, _, acc = evaluate_synset(0, net, x, y, testloader, args(dsa=True, dsa_strategy='flip_crop', epoch_eval_train=60))
    assert acc > 0.6


SPEC_POOLS = {  # the specification's model pools, in its order
    'M': ['MLP', 'ConvNet', 'LeNet', 'AlexNet', 'VGG11', 'ResNet18'],
    'B': ['ConvNetBN', 'ConvNetASwishBN', 'AlexNetBN', 'VGG11BN', 'ResNet18BN'],
    'W': ['ConvNetW32', 'ConvNetW64', 'ConvNetW128', 'ConvNetW256'],
    'D': ['ConvNetD1', 'ConvNetD2', 'ConvNetD3', 'ConvNetD4'],
    'A': ['ConvNetAS', 'ConvNetAR', 'ConvNetAL', 'ConvNetASwish'],
    'P': ['ConvNetNP', 'ConvNetMP', 'ConvNetAP'],
    'N': ['ConvNetNN', 'ConvNetBN', 'ConvNetLN', 'ConvNetIN', 'ConvNetGN'],
}


@pytest.mark.parametrize('mode', SPEC_POOLS)
def test_eval_pools_are_the_specifications(mode):
    assert get_eval_pool(mode, 'ConvNet', 'ConvNet') == SPEC_POOLS[mode]
    assert get_eval_pool(mode, 'ConvNetBN', 'ConvNetBN') == SPEC_POOLS[mode]  # whatever the training model


def test_eval_pools_s_and_ss():
    assert get_eval_pool('S', 'ConvNetBN', 'ConvNetBN') == ['ConvNet']  # a BN model as its non-BN twin
    assert get_eval_pool('S', 'ResNet18BN_AP', 'ResNet18BN_AP') == ['ResNet18']
    assert get_eval_pool('S', 'VGG11BN', 'VGG11BN') == ['VGG11'] and get_eval_pool('S', 'LeNet', 'LeNet') == ['LeNet']
    assert get_eval_pool('SS', 'ConvNetBN', 'ConvNetBN') == ['ConvNetBN']  # the model itself
    assert set(utils.EVAL_MODES) == {'S', 'SS', *SPEC_POOLS}


def test_models_trained_together_learn_each_on_its_own_stream(monkeypatch):
    x, y = separable(5, 0)
    xt, yt = separable(20, 1)
    a = args(epoch_eval_train=20, lr_net=0.03, num_eval=3, seed=0, dataset='X', eval_together=True, model='ConvNetW32',
             ipc=5)
    data = DataInfo('X', 1, (12, 12), 10, tuple(map(str, range(10))), (0.0,), (1.0,), 'x')
    loader = tensor_loader(xt, yt, 256)
    together = utils.evaluate_models(x, y, ['ConvNetW32'], a, loader, data)['ConvNetW32']
    assert len(together) == 3 and min(together) > 0.8
    assert utils.evaluate_models(x, y, ['ConvNetW32'], a, loader, data)['ConvNetW32'] == together  # seeded
    monkeypatch.setattr(batched, "TEST_ONE_BY_ONE", ())  # the test pass through vmap (as on a GPU): the same accuracies
    assert utils.evaluate_models(x, y, ['ConvNetW32'], a, loader, data)['ConvNetW32'] == together
    monkeypatch.undo()
    a.amp = True  # bfloat16 (autocast does not reach inside vmap: the models run on bfloat16 copies)
    in_bf16 = utils.evaluate_models(x, y, ['ConvNetW32'], a, loader, data)['ConvNetW32']
    assert len(in_bf16) == 3 and min(in_bf16) > 0.8
    a.amp = False
    keys = [(0, 'eval', 'ConvNetW32', k) for k in range(2)]
    inits = []
    for k in keys:  # each model starts from its own initialisation, as when trained alone
        utils.set_seed(*k)
        inits.append(get_network('ConvNetW32', 1, 10, (12, 12), 'cpu').classifier.weight)
    assert not torch.equal(*inits)
    a.num_eval = 1
    bn = utils.evaluate_models(x, y, ['ConvNetBN'], a, loader, data)['ConvNetBN']  # BatchNorm: one at a time
    a.eval_together = False
    assert utils.evaluate_models(x, y, ['ConvNetBN'], a, loader, data)['ConvNetBN'] == bn  # as without --eval_together
    assert len(bn) == 1 and bn[0] > 0.5  # (chance: 0.1)


def papers_evaluate_synset(net, images_train, labels_train, testloader, args):
    """The papers' evaluate_synset (DC/DSA/DM utils.py, MTT's alike), transcribed: Epoch + 1 epochs, and after
    epoch index Epoch // 2 + 1 a new SGD optimiser at the rate x0.1 (the momentum restarts)."""
    lr = float(args.lr_net)
    Epoch = int(args.epoch_eval_train)
    lr_schedule = [Epoch // 2 + 1]
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    criterion = torch.nn.CrossEntropyLoss()
    trainloader = torch.utils.data.DataLoader(TensorDataset(images_train, labels_train), batch_size=args.batch_train,
                                              shuffle=True, num_workers=0)
    for ep in range(Epoch + 1):
        utils.epoch('train', trainloader, net, optimizer, criterion, args, aug=True)
        if ep in lr_schedule:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    return utils.epoch('test', testloader, net, optimizer, criterion, args, aug=False)[1]


def toolkit_01_train(net, images_train, labels_train, args):
    """This toolkit's schedule before 0.2.0, transcribed: Epoch epochs, the rate x0.1 in place after Epoch // 2."""
    lr, Epoch = float(args.lr_net), int(args.epoch_eval_train)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    trainloader = tensor_loader(images_train, labels_train, args.batch_train, shuffle=True)
    for ep in range(Epoch):
        utils.epoch('train', trainloader, net, optimizer, torch.nn.CrossEntropyLoss(), args, aug=True)
        if ep + 1 == Epoch // 2:
            for group in optimizer.param_groups:
                group['lr'] = lr * 0.1


def trained(schedule_run, init, seed=1):
    net = get_network('ConvNetW32', 1, 10, (12, 12), 'cpu')
    net.load_state_dict(init)
    torch.manual_seed(seed)
    out = schedule_run(net)
    return net, out


@pytest.mark.parametrize('epochs', [6, 7])
def test_the_default_schedule_is_the_papers_evaluate_synset_bit_for_bit(epochs):
    x, y = separable(3, 0)
    xt, yt = separable(5, 1)
    a = args(epoch_eval_train=epochs, lr_net=0.05, batch_train=8)  # (several batches per epoch)
    init = copy.deepcopy(get_network('ConvNetW32', 1, 10, (12, 12), 'cpu').state_dict())
    theirs, acc = trained(lambda n: papers_evaluate_synset(n, x, y, tensor_loader(xt, yt, 256), a), init)
    ours, out = trained(lambda n: evaluate_synset(0, n, x, y, tensor_loader(xt, yt, 256), a), init)
    assert out[2] == acc and all(torch.equal(p, q) for p, q in zip(theirs.parameters(), ours.parameters()))
    # --eval_schedule toolkit-0.1: this toolkit's schedule before 0.2.0, for rows measured with it
    old, _ = trained(lambda n: toolkit_01_train(n, x, y, a), init)
    a.eval_schedule = 'toolkit-0.1'
    mine, _ = trained(lambda n: evaluate_synset(0, n, x, y, tensor_loader(xt, yt, 256), a), init)
    assert all(torch.equal(p, q) for p, q in zip(old.parameters(), mine.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(old.parameters(), ours.parameters()))  # (the two differ)


@pytest.mark.parametrize('schedule,epochs,drop_after,fresh', [('papers', 9, 6, True), ('toolkit-0.1', 8, 4, False)])
def test_models_trained_together_follow_the_schedule(monkeypatch, schedule, epochs, drop_after, fresh):
    """--eval_together: Epoch 8 trains 9 epochs and drops the rate with a new optimiser after the 6th (papers), or
    8 epochs with the rate dropped in place after the 4th (toolkit-0.1); one SGD step per epoch here."""
    steps, drops = [0], []
    step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, 'step', lambda self, *k, **kw: (steps.__setitem__(0, steps[0] + 1), step(self, *k, **kw))[1])
    decayed = utils.decayed
    monkeypatch.setattr(batched, 'decayed', lambda opt, params, lr, new: (drops.append((steps[0], lr, new)), decayed(opt, params, lr, new))[1])
    x, y = separable(2, 0)
    a = args(epoch_eval_train=8, lr_net=0.05, seed=0, eval_schedule=schedule)
    data = DataInfo('X', 1, (12, 12), 10, tuple(map(str, range(10))), (0.0,), (1.0,), 'x')
    batched.train_together('ConvNetW32', [(0, k) for k in range(2)], x, y, tensor_loader(x, y, 256), a, data)
    assert steps[0] == epochs and drops == [(drop_after, pytest.approx(0.005), fresh)]
