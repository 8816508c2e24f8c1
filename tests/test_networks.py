"""The model families: every model on every input shape, the papers' padding conventions, the variants."""
import pytest
import torch
import torch.nn.functional as F

from networks import MODELS, AvgPool2x2
from utils import UsageError, get_network

SHAPES = [(1, (28, 28), 10), (3, (32, 32), 100), (3, (64, 64), 200)]  # (MNIST, CIFAR-100, TinyImageNet)
RESNETS = ['ResNet18', 'ResNet18BN', 'ResNet18BN_AP']


@pytest.mark.parametrize('name', list(MODELS))
def test_every_model_on_every_input_size(name):
    torch.manual_seed(0)
    for channel, im_size, num_classes in SHAPES:
        net = get_network(name, channel, num_classes, im_size, device='cpu')
        x = torch.randn(2, channel, *im_size)
        out, emb = net(x), net.embed(x)
        assert out.shape == (2, num_classes)
        assert emb.shape == (2, net.classifier.in_features)  # the features before the last linear layer
        assert torch.allclose(net.classifier(emb), out, atol=1e-5)
        stages, logits = net.stages(x)
        assert len(stages) >= 1 and torch.allclose(logits, out, atol=1e-5)
        assert stages[-1].flatten(1).shape == emb.shape
        if name in RESNETS:  # as the papers' networks.py: the first convolution padded by 1 for every input, so
            # ResNet18BN_AP keeps a 3x3 map on 28x28 input (512 x 3 x 3 features)
            assert net.features[0].padding == (1, 1)
            side = im_size[0] // 8 if name == 'ResNet18BN_AP' else 1
            assert emb.shape == (2, 512 * side * side)


def test_28x28_inputs_give_the_feature_maps_of_32x32():
    # the papers' convention: padding the first convolution keeps 1x28x28 maps as large as 3x32x32 ones
    for name in ('ConvNet', 'VGG11', 'AlexNet', 'LeNet'):
        a = get_network(name, 1, 10, (28, 28), 'cpu').embed(torch.randn(1, 1, 28, 28))
        b = get_network(name, 3, 10, (32, 32), 'cpu').embed(torch.randn(1, 3, 32, 32))
        assert a.shape == b.shape, name


def test_convnet_stages_are_block_outputs_and_final_map():
    net = get_network('ConvNet', 3, 10, (32, 32), 'cpu')
    stages, _ = net.stages(torch.randn(2, 3, 32, 32))
    assert [tuple(s.shape[1:]) for s in stages] == [(128, 32, 32), (128, 16, 16), (128, 8, 8), (128, 4, 4)]
    assert (stages[0] >= 0).all()  # taken after the activation (ReLU)
    net = get_network('ConvNetD2', 1, 10, (28, 28), 'cpu')
    assert len(net.stages(torch.randn(1, 1, 28, 28))[0]) == 3


def test_variants_differ_as_named():
    net = get_network('ConvNetW64', 3, 10, (32, 32), 'cpu')
    assert net.features[0].out_channels == 64
    assert sum(isinstance(m, torch.nn.Conv2d) for m in get_network('ConvNetD4', 3, 10, (32, 32), 'cpu').modules()) == 4
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in get_network('ConvNetBN', 3, 10, (32, 32), 'cpu').modules())
    assert any(isinstance(m, torch.nn.LayerNorm) for m in get_network('ConvNetLN', 3, 10, (32, 32), 'cpu').modules())
    assert any(isinstance(m, torch.nn.SiLU) for m in get_network('ConvNetASwishBN', 3, 10, (32, 32), 'cpu').modules())
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in get_network('ConvNetMP', 3, 10, (32, 32), 'cpu').modules())
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in get_network('ConvNetNN', 3, 10, (32, 32), 'cpu').modules())
    gn = [m for m in get_network('ConvNetGN', 3, 10, (32, 32), 'cpu').modules() if isinstance(m, torch.nn.GroupNorm)]
    inorm = [m for m in get_network('ConvNet', 3, 10, (32, 32), 'cpu').modules() if isinstance(m, torch.nn.GroupNorm)]
    assert gn[0].num_groups == 4 and inorm[0].num_groups == 128  # instance norm: one group per channel


def test_matrix_average_pooling_matches_native_forward_and_backward():
    x = torch.randn(3, 5, 8, 6, requires_grad=True)
    y = AvgPool2x2()(x)
    ref = F.avg_pool2d(x, 2, 2)
    assert torch.allclose(y, ref, atol=1e-6)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gref,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(gx, gref, atol=1e-6)
    odd = torch.randn(1, 2, 5, 5)
    assert torch.equal(AvgPool2x2()(odd), F.avg_pool2d(odd, 2, 2))


def test_unknown_model_is_a_usage_error():
    with pytest.raises(UsageError, match='unknown model'):
        get_network('ConvNetX', 3, 10)


def test_fast_real_embeddings_match_float32():
    from utils import embed
    torch.manual_seed(0)
    net = get_network('ConvNetW32', 1, 10, (28, 28), 'cpu').requires_grad_(False)
    x = torch.randn(40, 1, 28, 28)
    ref = net.embed(x)
    assert torch.allclose(embed(net, x, chunk=16), ref, atol=1e-5)
    for compiled in (False, True):
        with torch.autocast('cpu', torch.bfloat16):
            out = embed(net, x, chunk=16, compiled=compiled)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert (out.mean(0) - ref.mean(0)).norm() / ref.mean(0).norm() < 0.01  # DM uses the class means
