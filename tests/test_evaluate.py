"""The evaluation protocol: evaluate_synset learns, the model pools of every --eval_mode, models trained
together (--eval_together) as each would be alone."""
import argparse

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
