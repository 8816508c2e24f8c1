import pytest
import torch

from utils import AUGMENT_FNS, DiffAugment, ParamDiffAug, UsageError, augment, check_strategy, get_daparam

ALL = list(AUGMENT_FNS)


def images(n=6, c=3, size=16, seed=0):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('strategy', ALL + ['_'.join(ALL)])
@pytest.mark.parametrize('seed', [-1, 7])
def test_shape_and_gradient(strategy, seed):
    x = images().requires_grad_()
    y = DiffAugment(x, strategy, seed=seed, param=ParamDiffAug())
    assert y.shape == x.shape and y.dtype == x.dtype
    (g,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0  # the gradient reaches the input


@pytest.mark.parametrize('strategy', ALL)
def test_siamese_draw_is_shared_by_two_batches(strategy):
    # two different batches (one of them containing the first one's images) get the same transformation
    a, b = images(4), images(9, seed=1)
    b[:4] = a
    ya = DiffAugment(a, strategy, seed=123, param=ParamDiffAug())
    yb = DiffAugment(b, strategy, seed=123, param=ParamDiffAug())
    if strategy != 'color':  # colour statistics are per image, so only spatial transforms compare pixelwise
        assert torch.allclose(ya, yb[:4], atol=1e-6)
    # and within one batch every image got the same parameters: equal inputs give equal outputs
    same = images(1).expand(5, -1, -1, -1).contiguous()
    y = DiffAugment(same, strategy, seed=5, param=ParamDiffAug())
    assert torch.allclose(y, y[:1].expand_as(y), atol=1e-6)
    # a different seed eventually gives a different transformation
    outs = {tuple(DiffAugment(same[:1], strategy, seed=s, param=ParamDiffAug()).flatten().tolist()) for s in range(20)}
    assert len(outs) > 1


def test_siamese_strategy_choice_is_reproducible():
    x = images()
    full = '_'.join(ALL)
    for seed in range(10):
        assert torch.equal(DiffAugment(x, full, seed=seed), DiffAugment(x, full, seed=seed))


@pytest.mark.parametrize('strategy', ALL)
def test_per_image_draws_vary(strategy):
    torch.manual_seed(0)
    same = images(1).expand(32, -1, -1, -1).contiguous()
    y = DiffAugment(same, strategy, seed=-1, param=ParamDiffAug())
    distinct = {tuple(r.flatten()[:64].tolist()) for r in y.round(decimals=4)}
    assert len(distinct) == 2 if strategy == 'flip' else len(distinct) > 2


def test_per_image_mode_uses_the_global_generator():
    x = images()
    torch.manual_seed(3)
    a = DiffAugment(x, '_'.join(ALL))
    torch.manual_seed(3)
    assert torch.equal(a, DiffAugment(x, '_'.join(ALL)))


def test_crop_translates_with_zero_padding():
    x = torch.arange(64.).view(1, 1, 8, 8) + 1
    y = DiffAugment(x, 'crop', seed=0)
    nz = y[y != 0]
    assert set(nz.tolist()) <= set(x.flatten().tolist())
    rows = (y[0, 0] != 0).any(1).sum()
    assert rows >= 8 - 1  # at most int(8 * 0.125 + 0.5) = 1 row shifted out


def test_cutout_zeroes_a_half_size_square():
    x = torch.ones(1, 1, 16, 16)
    y = DiffAugment(x, 'cutout', seed=1)
    zeros = (y == 0).sum().item()
    assert 0 < zeros <= 64 and (y == 0).any(1).sum() > 0


def test_flip_mirrors():
    x = images(1)
    outs = [DiffAugment(x, 'flip', seed=s) for s in range(10)]
    assert any(torch.equal(o, x.flip(3)) for o in outs) and any(torch.equal(o, x) for o in outs)


def test_none_is_identity_and_bad_names_are_errors():
    x = images()
    assert DiffAugment(x, 'none') is x and DiffAugment(x, 'None') is x
    with pytest.raises(UsageError, match='unknown augmentation'):
        check_strategy('color_blur')


def test_dc_augmentation():
    torch.manual_seed(0)
    x = images(40, c=1, size=28)
    p = get_daparam('MNIST', 'ConvNet', 'ConvNet', 1)
    assert p['strategy'] == 'crop_scale_rotate'
    y = augment(x.clone(), p)
    assert y.shape == x.shape and not torch.equal(y, x)
    assert get_daparam('CIFAR10', 'ConvNet', 'ConvNetBN', 10)['strategy'] == 'crop_noise'
    none = get_daparam('CIFAR10', 'ConvNet', 'ConvNet', 10)
    assert augment(x, none) is x
    noise = augment(x, dict(none, strategy='noise'))
    assert 0 < (noise - x).abs().max() < 0.01


def test_siamese_augment_shares_one_fresh_draw_between_batches():
    import argparse
    from utils import siamese_augment
    args = argparse.Namespace(dsa_strategy='crop_flip_scale_rotate_cutout', dsa_param=ParamDiffAug())
    real = images(8)
    syn = real[:3].clone()
    torch.manual_seed(0)
    draws = [siamese_augment([real, syn], args) for _ in range(6)]
    for r, s in draws:
        assert torch.allclose(r[:3], s, atol=1e-6)  # the synthetic batch got the real batch's transformation
    assert len({tuple(r.flatten()[:50].tolist()) for r, _ in draws}) > 1  # a fresh draw per call
