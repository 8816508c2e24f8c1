import pytest
import torch
import torch.nn.functional as F

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


# Each DSA transformation pinned by hand: its functions take (x, param, rand, randint), so scripted draws give
# known parameters (the ends of their ranges); and many per-image draws (seed -1, a batch of copies of one
# image) give the empirical range, which must reach both ends and never leave them.

def scripted(*uniform, ints=()):
    """rand and randint for one image, returning the given values in turn; `calls` records what was asked."""
    uniform, ints, calls = iter(uniform), iter(ints), []

    def rand(*shape):
        calls.append(('rand', shape))
        return torch.tensor(next(uniform), dtype=torch.float32).reshape(1, *shape)

    def randint(low, high):
        calls.append(('randint', low, high))
        return torch.tensor([next(ints)])
    return rand, randint, calls


def copies(x, n=2000):
    """n per-image draws of DSA's parameters on copies of x."""
    torch.manual_seed(0)
    return lambda strategy: DiffAugment(x.expand(n, -1, -1, -1).contiguous(), strategy, seed=-1, param=ParamDiffAug())


def spans(values, low, high, tol):
    """The values reach both ends of [low, high] (within tol) and never leave it."""
    return low - 1e-4 <= values.min() <= low + tol and high - tol <= values.max() <= high + 1e-4


def ramps(size=16):
    """Two channels: the column index, the row index (bilinear resampling reproduces them exactly inside)."""
    j = torch.arange(size, dtype=torch.float32)
    return torch.stack([j.expand(size, size), j.view(-1, 1).expand(size, size)])[None]


def test_flip_has_probability_one_half():
    x = images(1)
    for u, flipped in ((0.0, True), (0.499, True), (0.5, False), (0.999, False)):
        rand, randint, calls = scripted(u)
        assert torch.equal(AUGMENT_FNS['flip'](x, ParamDiffAug(), rand, randint), x.flip(3) if flipped else x)
        assert calls == [('rand', ())]
    y = copies(x)('flip')
    is_flipped = (y == x.flip(3)).flatten(1).all(1)
    assert (is_flipped | (y == x).flatten(1).all(1)).all()
    assert 0.46 < is_flipped.float().mean() < 0.54


def test_scale_draws_x_and_y_independently_in_1_over_1_2_to_1_2():
    x, c, inside = ramps(), 7.5, slice(4, 12)
    for u, (sx, sy) in (((0., 0.), (1 / 1.2, 1 / 1.2)), ((1., 1.), (1.2, 1.2)), ((0., 1.), (1 / 1.2, 1.2)),
                        ((0.5, 0.25), (1.0166667, 0.9250000))):  # 1/1.2 + u (1.2 - 1/1.2)
        rand, randint, calls = scripted(u)
        y = AUGMENT_FNS['scale'](x, ParamDiffAug(), rand, randint)[0]
        assert calls == [('rand', (2,))]
        assert torch.allclose(y[0, inside, inside], c + sx * (x[0, 0, inside, inside] - c), atol=1e-4)  # columns
        assert torch.allclose(y[1, inside, inside], c + sy * (x[0, 1, inside, inside] - c), atol=1e-4)  # rows
    y = copies(x)('scale')
    sx, sy = y[:, 0, 8, 8] - y[:, 0, 8, 7], y[:, 1, 8, 8] - y[:, 1, 7, 8]
    assert spans(sx, 1 / 1.2, 1.2, 0.005) and spans(sy, 1 / 1.2, 1.2, 0.005)
    assert abs(torch.corrcoef(torch.stack([sx, sy]))[0, 1]) < 0.1  # independent


def test_rotate_draws_an_angle_in_minus_15_to_15_degrees():
    x, c, inside = ramps(), 7.5, slice(5, 11)
    i, j = x[0, 1, inside, inside] - c, x[0, 0, inside, inside] - c
    cos15, sin15 = 0.9659258, 0.2588190
    for u, (cos, sin) in ((0., (cos15, -sin15)), (1., (cos15, sin15)), (0.5, (1., 0.)), (0.75, (0.9914449, 0.1305262))):
        rand, randint, calls = scripted(u)
        y = AUGMENT_FNS['rotate'](x, ParamDiffAug(), rand, randint)[0]
        assert calls == [('rand', ())]
        assert torch.allclose(y[0, inside, inside], c + cos * j - sin * i, atol=1e-4)  # the column ramp, rotated
    y = copies(x)('rotate')
    angle = torch.atan2(-(y[:, 0, 8, 8] - y[:, 0, 7, 8]), y[:, 0, 8, 8] - y[:, 0, 8, 7]).rad2deg()
    assert spans(angle, -15, 15, 0.1)


def test_crop_translates_by_up_to_an_eighth_of_the_size_with_zero_padding():
    x = torch.arange(1., 16 * 24 + 1).view(1, 1, 16, 24)  # int(16/8 + 0.5) = 2 rows, int(24/8 + 0.5) = 3 columns
    for (tx, ty), expected in (((2, -3), F.pad(x[..., 2:, :-3], (3, 0, 0, 2))), ((-2, 3), F.pad(x[..., :-2, 3:], (0, 3, 2, 0))),
                               ((0, 0), x)):
        rand, randint, calls = scripted(ints=(tx, ty))
        assert torch.equal(AUGMENT_FNS['crop'](x, ParamDiffAug(), rand, randint), expected)
        assert calls == [('randint', -2, 3), ('randint', -3, 4)]
    for size, shift in ((28, 4), (32, 4), (8, 1)):
        rand, randint, calls = scripted(ints=(0, 0))
        AUGMENT_FNS['crop'](torch.zeros(1, 1, size, size), ParamDiffAug(), rand, randint)
        assert calls == [('randint', -shift, shift + 1)] * 2
    dot = torch.zeros(1, 1, 16, 24)
    dot[..., 8, 12] = 1
    y = copies(dot)('crop')
    where = y.flatten(1).argmax(1)
    assert (y.flatten(1).sum(1) == 1).all()  # the dot is moved, never lost or blurred
    assert {(8 - int(k) // 24, 12 - int(k) % 24) for k in where} == {(a, b) for a in range(-2, 3) for b in range(-3, 4)}


def test_cutout_zeroes_a_half_size_square_at_a_random_centre():
    x = torch.ones(1, 1, 16, 16)  # the square: int(16/2 + 0.5) = 8; centres 0..16
    for (ox, oy), rows, cols in (((8, 8), range(4, 12), range(4, 12)), ((0, 16), range(0, 4), range(12, 16)),
                                 ((16, 3), range(12, 16), range(0, 7))):
        rand, randint, calls = scripted(ints=(ox, oy))
        expected = torch.ones(16, 16)
        expected[rows.start:rows.stop, cols.start:cols.stop] = 0
        assert torch.equal(AUGMENT_FNS['cutout'](x, ParamDiffAug(), rand, randint)[0, 0], expected)
        assert calls == [('randint', 0, 17)] * 2
    rand, randint, calls = scripted(ints=(0, 13))  # an odd square: int(14/2 + 0.5) = 7, centres 0..13
    y = AUGMENT_FNS['cutout'](torch.ones(1, 1, 14, 14), ParamDiffAug(), rand, randint)[0, 0]
    assert calls == [('randint', 0, 14)] * 2 and (y == 0).sum() == 16 and (y[:4, 10:] == 0).all()
    y = copies(x)('cutout')[:, 0]
    rows, cols = (y == 0).any(2).sum(1), (y == 0).any(1).sum(1)
    assert torch.equal((y == 0).flatten(1).sum(1), rows * cols)  # a rectangle: the square, clipped at the border
    assert rows.min() == cols.min() == 4 and rows.max() == cols.max() == 8 and (rows * cols == 64).float().mean() > 0.2
    assert (y == 0).any(0).all()  # every pixel gets cut out sometimes


COLOURS = torch.tensor([[1., 2.], [3., 4.], [5., 9.]]).view(1, 3, 1, 2)  # 3 channels, 2 pixels


@pytest.mark.parametrize('name,u,expected', [
    ('brightness', 0.0, [[0.5, 1.5], [2.5, 3.5], [4.5, 8.5]]),  # x + (u - 0.5)
    ('brightness', 0.9, [[1.4, 2.4], [3.4, 4.4], [5.4, 9.4]]),
    ('saturation', 0.0, [[3., 5.], [3., 5.], [3., 5.]]),  # (x - channel mean) 2u + channel mean; means 3 and 5
    ('saturation', 0.25, [[2., 3.5], [3., 4.5], [4., 7.]]),
    ('saturation', 1.0, [[-1., -1.], [3., 3.], [7., 13.]]),
    ('contrast', 0.0, [[2.5, 3.], [3.5, 4.], [4.5, 6.5]]),  # (x - image mean) (u + 0.5) + image mean; mean 4
    ('contrast', 1.0, [[-0.5, 1.], [2.5, 4.], [5.5, 11.5]]),
])
def test_colour_transformations_by_hand(name, u, expected):
    import utils
    rand, randint, calls = scripted(u)
    y = getattr(utils, f'rand_{name}')(COLOURS, ParamDiffAug(), rand, randint)
    assert torch.allclose(y.view(3, 2), torch.tensor(expected), atol=1e-6) and calls == [('rand', ())]


def test_color_is_brightness_then_saturation_then_contrast_each_with_its_own_draw():
    rand, randint, calls = scripted(0.9, 0.25, 1.0)
    y = AUGMENT_FNS['color'](COLOURS, ParamDiffAug(), rand, randint)
    assert torch.allclose(y.view(3, 2), torch.tensor([[1.4, 3.65], [2.9, 5.15], [4.4, 8.9]]), atol=1e-5)
    assert calls == [('rand', ())] * 3
    # many draws: pixel A grey (0,0,0), pixel B (1,2,3); overall mean 1. With brightness b, saturation s and
    # contrast k: mean(y) = 1 + b, y_B1 - y_A = 2k, y_B2 - y_B0 = 2sk
    y = copies(torch.tensor([[0., 1.], [0., 2.], [0., 3.]]).view(1, 3, 1, 2))('color')[:, :, 0]
    b, k = y.mean((1, 2)) - 1, (y[:, 1, 1] - y[:, 1, 0]) / 2
    s = (y[:, 2, 1] - y[:, 0, 1]) / (2 * k)
    assert spans(b, -0.5, 0.5, 0.01) and spans(s, 0, 2, 0.01) and spans(k, 0.5, 1.5, 0.01)


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
