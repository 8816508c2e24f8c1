import argparse

import torch

from utils import ParamDiffAug, TensorDataset, evaluate_synset, get_eval_pool, get_network, tensor_loader


def separable(n_per_class, seed):
    """10 classes of 1x12x12 images: class c has a bright 3x3 square at a class-specific place, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    x = torch.randn(len(labels), 1, 12, 12, generator=g) * 0.3
    for c in range(10):
        r, s = divmod(c, 4)
        x[labels == c, 0, 3 * r:3 * r + 3, 3 * s:3 * s + 3] += 2.0
    return x, labels


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


def test_eval_pools():
    assert get_eval_pool('S', 'ConvNetBN', 'ConvNetBN') == ['ConvNet']
    assert get_eval_pool('S', 'ResNet18BN_AP', 'ResNet18BN_AP') == ['ResNet18']
    assert get_eval_pool('SS', 'ConvNetBN', 'ConvNetBN') == ['ConvNetBN']
    assert get_eval_pool('M', 'ConvNet', 'ConvNet') == ['MLP', 'ConvNet', 'LeNet', 'AlexNet', 'VGG11', 'ResNet18']
    assert get_eval_pool('N', 'ConvNet', 'ConvNet')[1] == 'ConvNetBN'
    assert len(get_eval_pool('A', 'ConvNet', 'ConvNet')) == 4


def test_models_trained_together_learn_each_on_its_own_stream(monkeypatch):
    import utils
    x, y = separable(5, 0)
    xt, yt = separable(20, 1)
    a = args(epoch_eval_train=40, num_eval=3, seed=0, channel=1, num_classes=10, im_size=(12, 12), dataset='X',
             epoch_eval_noaug=300, eval_together=True, model='ConvNetW32', ipc=5)
    loader = tensor_loader(xt, yt, 256)
    together = utils.evaluate_models(x, y, ['ConvNetW32'], a, loader)['ConvNetW32']
    assert len(together) == 3 and min(together) > 0.8
    assert utils.evaluate_models(x, y, ['ConvNetW32'], a, loader)['ConvNetW32'] == together  # seeded
    monkeypatch.setattr(utils, 'TEST_ONE_BY_ONE', ())  # the test pass through vmap (as on a GPU): the same accuracies
    assert utils.evaluate_models(x, y, ['ConvNetW32'], a, loader)['ConvNetW32'] == together
    monkeypatch.undo()
    a.amp = True  # bfloat16 (autocast does not reach inside vmap: the models run on bfloat16 copies)
    in_bf16 = utils.evaluate_models(x, y, ['ConvNetW32'], a, loader)['ConvNetW32']
    assert len(in_bf16) == 3 and min(in_bf16) > 0.8
    a.amp = False
    keys = [(0, 'eval', 'ConvNetW32', k) for k in range(2)]
    inits = []
    for k in keys:  # each model starts from its own initialisation, as when trained alone
        utils.set_seed(*k)
        inits.append(get_network('ConvNetW32', 1, 10, (12, 12), 'cpu').classifier.weight)
    assert not torch.equal(*inits)
    a.num_eval = 1
    bn = utils.evaluate_models(x, y, ['ConvNetBN'], a, loader)['ConvNetBN']  # BatchNorm: one at a time
    assert len(bn) == 1 and 0 <= bn[0] <= 1
