"""gan.py and train_gan.py: IT-GAN's generator. The authors' BigGAN-32 state dicts load strictly, files that do not fit
are refused in one line, rendered images are in the dataset's normalisation, training moves D, G and the
moving average as it should, and a resumed run ends with the weights of an uninterrupted one."""
import argparse
import os

import pytest
import torch
from PIL import Image

import gan
import train_gan as tg
import utils
from helpers import assert_one_line_error, run_in_process, stopped_at_call
from utils import DATASETS, UsageError


@pytest.fixture(autouse=True)
def one_thread():
    """These tests compute on tiny tensors, where a second thread only adds synchronisation: on a loaded 2-core
    machine, two threads made this module about ten times slower (2 minutes instead of 13 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def authors_biggan32_keys(num_classes=10, channel=3):
    """The keys and shapes of the authors' generator state dict (G_Pretrained_<dataset>_exp<e>.pth), in its
    order, as read from VICO-UoE/IT-GAN: BigGAN.Generator(G_ch=64, dim_z=128, bottom_width=4, resolution=32,
    G_attn='0', G_shared=False, ...) with layers.SNLinear/SNConv2d (weight, bias, buffers u0 [1, out] and sv0
    [1]), layers.ccbn without shared embeddings (buffers stored_mean, stored_var; nn.Embedding gain and bias
    of [num_classes, channels]), layers.GBlock (conv1, conv2, conv_sc, bn1, bn2) and an output layer of
    layers.bn (gain, bias, stored_mean, stored_var), ReLU and SNConv2d. G.shared is an identity: no keys."""
    def sn(name, *shape):
        return {f'{name}.weight': shape, f'{name}.bias': shape[:1], f'{name}.u0': (1, shape[0]), f'{name}.sv0': (1,)}

    keys = sn('linear', 256 * 4 * 4, 128)
    for b in range(3):
        p = f'blocks.{b}.0.'
        keys.update({**sn(p + 'conv1', 256, 256, 3, 3), **sn(p + 'conv2', 256, 256, 3, 3),
                     **sn(p + 'conv_sc', 256, 256, 1, 1)})
        for bn in ('bn1', 'bn2'):
            keys.update({p + bn + '.stored_mean': (256,), p + bn + '.stored_var': (256,),
                         p + bn + '.gain.weight': (num_classes, 256), p + bn + '.bias.weight': (num_classes, 256)})
    keys.update({'output_layer.0.gain': (256,), 'output_layer.0.bias': (256,), 'output_layer.0.stored_mean': (256,),
                 'output_layer.0.stored_var': (256,), **sn('output_layer.2', channel, 256, 3, 3)})
    return keys


def authors_file(path, num_classes=10, drop=None, add=None, reshape=None):
    """A bare state dict in the authors' layout (random values), saved as torch.save does; optionally with a
    key dropped, one added, or one of another shape."""
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*shape, generator=g) * 0.05 for k, shape in authors_biggan32_keys(num_classes).items()}
    state = {k: v.abs() + 0.5 if k.endswith(('stored_var', 'sv0')) else v for k, v in state.items()}
    state.pop(drop, None)
    if add:
        state[add] = torch.zeros(1)
    if reshape:
        state[reshape] = torch.zeros(7)
    torch.save(state, path)
    return state


def namespace(**kw):
    """Training args for a tiny problem (TINY_DATA), the small arch."""
    a = dict(seed=0, arch='small', device='cpu', lr_G=2e-4, lr_D=2e-4, batch_size=6, num_D_steps=1, mirror=True,
             dsa_strategy=tg.STRATEGY, ema_start=0, ema_decay=0.9, amp=False, samples_per_class=2)
    a.update(kw)
    return argparse.Namespace(**a)


TINY_DATA = utils.DataInfo('X', 1, (12, 12), 3, ('0', '1', '2'), (0.2861,), (0.3530,), 'x')  # 3 classes of 1x12x12


def tiny_real(n=24, num_classes=3, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    return (torch.rand(n, 1, size, size, generator=g) * 2 - 1 + labels.view(-1, 1, 1, 1) * 0.1).clamp(-1, 1), labels


# ----------------------------------------------------------------------------------------------------
# The authors' generator and our files
# ----------------------------------------------------------------------------------------------------

def test_biggan32_has_the_authors_keys_and_shapes_in_their_order():
    G = gan.build_generator('biggan', 10, 3, (32, 32))
    expected = authors_biggan32_keys(10)
    assert [(k, tuple(v.shape)) for k, v in G.state_dict().items()] == list(expected.items())
    assert len(expected) == 72 and sum(p.numel() for p in G.parameters()) == 4_304_387  # BigGAN-CIFAR's G


def test_the_authors_state_dict_loads_strict_and_renders(tmp_path):
    state = authors_file(tmp_path / 'G_Pretrained_CIFAR10_exp0.pth')
    gan.build_generator('biggan', 10, 3, (32, 32)).load_state_dict(state, strict=True)
    _, _, _, mean, std = DATASETS['CIFAR10']
    G = gan.load_generator(tmp_path / 'G_Pretrained_CIFAR10_exp0.pth', 10, 3, (32, 32), mean, std)
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    assert all(torch.equal(v, state[k]) for k, v in G.state_dict().items())
    z = torch.randn(2, 128, requires_grad=True)
    x = gan.render(G, z, torch.tensor([0, 9]))
    assert x.shape == (2, 3, 32, 32)
    x.sum().backward()
    assert z.grad is not None and G.state_dict()['linear.u0'].equal(state['linear.u0'])  # eval: u0 not updated


@pytest.mark.parametrize('damage, message', [
    (dict(drop='blocks.1.0.conv2.u0'), "lacks 'blocks.1.0.conv2.u0'"),
    (dict(add='shared.weight'), "unknown key 'shared.weight'"),
    (dict(reshape='output_layer.2.bias'), 'output_layer.2.bias has shape (7,), expected (3,)'),
    (dict(num_classes=100), 'a generator of 100 classes; the data have 10'),
])
def test_an_authors_file_that_does_not_fit_is_refused_in_one_line(tmp_path, damage, message):
    authors_file(tmp_path / 'G.pth', **damage)
    with pytest.raises(UsageError) as e:
        gan.load_generator(tmp_path / 'G.pth', 10, 3, (32, 32), [0.5] * 3, [0.5] * 3)
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


@pytest.mark.parametrize('data_shape, message', [
    ((1, (32, 32)), 'a generator of 3-channel images; the data have 1 channel(s)'),
    ((3, (28, 28)), 'makes 32x32 images; the data are 28x28'),
])
def test_an_authors_file_for_other_images_is_refused_in_one_line(tmp_path, data_shape, message):
    authors_file(tmp_path / 'G.pth')
    with pytest.raises(UsageError) as e:
        gan.load_generator(tmp_path / 'G.pth', 10, *data_shape, [0.5], [0.5])
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


def our_file(path, arch='small', num_classes=3, channel=1, im_size=(12, 12)):
    G = gan.build_generator(arch, num_classes, channel, im_size)
    G.mean, G.std = [0.2861] * channel, [0.3530] * channel
    utils.atomic_save(gan.generator_record(G, arch, 'X', 5, {'seed': 0}), path)
    return G


def test_our_generator_file_loads_back_frozen_with_its_normalisation(tmp_path):
    G = our_file(tmp_path / 'G.pt')
    H = gan.load_generator(tmp_path / 'G.pt', 3, 1, (12, 12))
    assert (H.mean, H.std) == (G.mean, G.std) and not H.training
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in H.state_dict().items())
    assert set(utils.load_pt(tmp_path / 'G.pt')) >= {'arch', 'num_classes', 'channel', 'im_size', 'dim_z', 'state_dict'}


@pytest.mark.parametrize('wanted, message', [
    ((4, 1, (12, 12)), 'num_classes 3 there, 4 here'),
    ((3, 3, (12, 12)), 'channel 1 there, 3 here'),
    ((3, 1, (28, 28)), 'im_size [12, 12] there, [28, 28] here'),
])
def test_our_file_for_other_data_is_refused_in_one_line(tmp_path, wanted, message):
    our_file(tmp_path / 'G.pt')
    with pytest.raises(UsageError) as e:
        gan.load_generator(tmp_path / 'G.pt', *wanted)
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


class Evil:
    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        return self.fn, ('echo unsafe',)


@pytest.mark.parametrize('content, message', [
    ({'arch': 'small', 'num_classes': 3, 'channel': 1, 'im_size': [12, 12], 'state_dict': {'x': torch.zeros(1)}},
     "lacks 'linear.weight'"),
    ({'a': Evil(print)}, 'not plain data'),
    ({'a': Evil(os.system)}, 'cannot load'),
    (['not', 'a', 'dict'], 'neither a generator of train_gan.py nor a state dict'),
])
def test_a_file_that_is_no_generator_is_refused_without_running_it(tmp_path, capfd, content, message):
    torch.save(content, tmp_path / 'G.pt')
    with pytest.raises(UsageError) as e:
        gan.load_generator(tmp_path / 'G.pt', 3, 1, (12, 12))
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
    assert 'unsafe' not in ''.join(capfd.readouterr())


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('dataset', ['FashionMNIST', 'CIFAR10'])
@pytest.mark.parametrize('arch', ['small', 'biggan'])
def test_rendered_images_have_the_datasets_shape_and_normalised_range(dataset, arch):
    channel, im_size, num_classes, mean, std = DATASETS[dataset]
    G = gan.build_generator(arch, num_classes, channel, im_size).eval()
    x = gan.render(G, torch.randn(3, G.dim_z), torch.tensor([0, 1, 9]), mean, std)
    low, high = [(torch.tensor(v) - torch.tensor(mean)) / torch.tensor(std) for v in (0.0, 1.0)]
    assert x.shape == (3, channel, *im_size)
    assert (x >= low.view(1, -1, 1, 1) - 1e-6).all() and (x <= high.view(1, -1, 1, 1) + 1e-6).all()


def test_render_maps_minus_one_and_one_to_the_normalised_black_and_white():
    mean, std = DATASETS['FashionMNIST'][3:]

    class Extremes(torch.nn.Module):  # a generator whose images are -1 in the left half, +1 in the right
        def forward(self, z, labels):
            return torch.cat([-torch.ones(len(z), 1, 28, 14), torch.ones(len(z), 1, 28, 14)], 3)

    G = Extremes()
    G.mean, G.std = mean, std
    x = gan.render(G, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    black, white = torch.tensor(-mean[0] / std[0]), torch.tensor((1 - mean[0]) / std[0])
    assert torch.allclose(x[..., :14], black) and torch.allclose(x[..., 14:], white)
    assert torch.allclose(gan.to_gan_range(x, mean, std), G(torch.zeros(2, 4), None))


def test_render_without_a_normalisation_says_so_in_one_line():
    G = gan.build_generator('small', 3, 1, (12, 12))
    with pytest.raises(UsageError, match="needs the dataset's mean and std"):
        gan.render(G, torch.zeros(1, G.dim_z), torch.zeros(1, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

def test_spectral_norm_brings_the_largest_singular_value_to_one_and_keeps_u_in_eval_mode():
    torch.manual_seed(0)
    conv = gan.SNConv2d(4, 8)
    with torch.no_grad():
        conv.weight.mul_(10)
        for _ in range(200):
            w = conv.normalised_weight()
    assert torch.linalg.matrix_norm(w.flatten(1), ord=2).item() == pytest.approx(1, abs=1e-3)
    assert conv.sv0.item() == pytest.approx(torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item(), rel=1e-3)
    u = conv.u0.clone()
    conv.eval()(torch.randn(1, 4, 5, 5))
    assert torch.equal(conv.u0, u)


def hinge_D(gan, x, y, z, y_fake):
    with torch.no_grad():
        gan.D.eval()  # (no power-iteration update while measuring)
        out = gan.D(torch.cat([gan.G.eval()(z, y_fake), x]), torch.cat([y_fake, y]))
        gan.D.train(), gan.G.train()
    return (torch.relu(1 + out[:len(z)]).mean() + torch.relu(1 - out[len(z):]).mean()).item()


def test_d_steps_lower_ds_loss_on_a_fixed_batch():
    args = namespace(lr_D=1e-3, dsa_strategy='None', mirror=False)
    gan, (x, y) = tg.GAN(args, TINY_DATA), tiny_real(6)
    z, y_fake = torch.randn(6, gan.G.dim_z), torch.arange(6) % 3
    before = hinge_D(gan, x, y, z, y_fake)
    for s in range(5):
        tg.d_step(gan, x, y, args, torch.Generator().manual_seed(s))
    assert hinge_D(gan, x, y, z, y_fake) < before - 0.05


def test_g_steps_raise_ds_score_of_generated_images():
    args = namespace(lr_G=1e-3, dsa_strategy='None')
    gan = tg.GAN(args, TINY_DATA)
    z, y = torch.randn(6, gan.G.dim_z), torch.arange(6) % 3

    def score():
        gan.D.eval()
        with torch.no_grad():
            s = gan.D(gan.G(z, y), y).mean().item()
        gan.D.train()
        return s

    before, D = score(), {k: v.clone() for k, v in gan.D.state_dict().items() if not k.endswith(('u0', 'sv0'))}
    for s in range(5):
        tg.g_step(gan, args, torch.Generator().manual_seed(0))  # the same latents each time
    assert score() > before
    assert all(torch.equal(v, gan.D.state_dict()[k]) for k, v in D.items())  # D's weights untouched


def distance(a, b):
    return sum((v - b.state_dict()[k]).square().sum() for k, v in a.state_dict().items()).sqrt().item()


def test_the_moving_average_copies_g_before_ema_start_then_lags_and_moves_toward_it():
    args = namespace(ema_start=2, ema_decay=0.9)
    gan, real = tg.GAN(args, TINY_DATA), tiny_real()
    tg.train_iteration(0, gan, real, args)  # iteration 1 of the recipe: before ema_start, a copy
    assert distance(gan.G_ema, gan.G) == 0
    tg.train_iteration(1, gan, real, args)
    lag = distance(gan.G_ema, gan.G)
    assert lag > 0
    tg.ema_update(gan.G_ema, gan.G, 0.9)
    assert distance(gan.G_ema, gan.G) == pytest.approx(0.9 * lag, rel=1e-4)


def test_an_iteration_under_amp_keeps_weights_and_losses_float32():
    args = namespace(amp=True)
    gan = tg.GAN(args, TINY_DATA)
    before = gan.G.linear.weight.clone()
    stats = tg.train_iteration(0, gan, tiny_real(), args)
    assert all(isinstance(v, float) and v == v for v in stats.values())
    assert gan.G.linear.weight.dtype == torch.float32 and not torch.equal(gan.G.linear.weight, before)
    assert gan.opt_G.state[gan.G.linear.weight]['exp_avg'].dtype == torch.float32


def test_real_batches_walk_through_shuffled_epochs():
    args = namespace(mirror=False)
    images, labels = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    seen = [tg.real_batch((images, labels), s * 4, 4, args, None)[1] for s in range(5)]
    assert sorted(torch.cat(seen[:2] + [seen[2][:2]]).tolist()) == list(range(10))  # epoch 0: each image once
    assert torch.equal(tg.real_batch((images, labels), 8, 4, args, None)[1], seen[2])  # a function of the position


def test_the_sample_grid_has_one_row_per_class(tmp_path):
    args = namespace(save_path=str(tmp_path), dataset='X', arch='small', samples_per_class=4)
    G = gan.build_generator('small', 3, 1, (12, 12)).eval()
    G.mean, G.std = TINY_DATA.mean, TINY_DATA.std
    tg.save_samples(G, args, TINY_DATA)
    with Image.open(tg.vis_path(args)) as im:
        assert im.size == (4 * 14 + 2, 3 * 14 + 2)  # save_image's 2-pixel padding


# ----------------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------------

TINY = ['--dataset', 'MNIST', '--arch', 'small', '--batch_size', 4, '--num_D_steps', 1, '--samples_per_class', 1]


@pytest.fixture
def train_gan(monkeypatch, capsys):
    """train_gan.py's main run in this process (as run_script runs it): its exit status and output."""
    return lambda *args: run_in_process(monkeypatch, capsys, 'train_gan.py', *args, main=tg.main)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(data, tmp_path, train_gan, monkeypatch):
    args = [*TINY, '--data_path', data, '--Iteration', 4, '--checkpoint_every', 1]
    p = train_gan(*args, '--save_path', tmp_path / 'whole')
    assert p.returncode == 0, p.stderr[-2000:]
    calls = []
    with monkeypatch.context() as m:
        m.setattr(tg, 'train_iteration', stopped_at_call(3, tg.train_iteration, calls))
        p = train_gan(*args, '--save_path', tmp_path / 'cut')
    assert p.returncode == 130 and len(calls) == 3, p.stderr[-2000:]
    # the newest two checkpoints are kept, named by their iteration: the newest is the state after iteration 2
    assert sorted(p.name for p in (tmp_path / 'cut').glob('checkpoint_*')) == [
        'checkpoint_GAN_MNIST_small_0000000001.pt', 'checkpoint_GAN_MNIST_small_0000000002.pt']
    assert utils.load_pt(tmp_path / 'cut' / 'checkpoint_GAN_MNIST_small_0000000002.pt')['it'] == 2
    assert_one_line_error(train_gan(*args, '--save_path', tmp_path / 'cut'), 'an unfinished run left', '--resume auto')
    p = train_gan(*args, '--save_path', tmp_path / 'cut', '--resume', 'auto')
    assert p.returncode == 0 and 'resuming from' in p.stdout, p.stderr[-2000:]
    whole, cut = (utils.load_pt(tmp_path / d / 'checkpoint_GAN_MNIST_small_0000000004.pt') for d in ('whole', 'cut'))
    assert whole['it'] == cut['it'] == 4
    for part in ('G', 'D', 'G_ema'):
        assert all(torch.equal(v, cut['gan'][part][k]) for k, v in whole['gan'][part].items()), part
    G = gan.load_generator(tmp_path / 'cut' / 'G_MNIST_small.pt', 10, 1, (28, 28))
    assert all(torch.equal(v, whole['gan']['G_ema'][k]) for k, v in G.state_dict().items())
    assert (G.mean, G.std) == ([0.1307], [0.3081])
    with Image.open(tmp_path / 'cut' / 'vis_GAN_MNIST_small.png') as im:
        assert im.size == (1 * 30 + 2, 10 * 30 + 2)


@pytest.mark.parametrize('flags, parts', [
    (['--batch_size', 0], ['argument --batch_size: must be at least 1']),
    (['--ema_decay', 1], ['--ema_decay must lie in [0, 1)']),
    (['--lr_G', 'nan'], ['argument --lr_G: must be a positive number']),
    (['--dsa_strategy', 'color_blur'], ['blur']),
    (['--resume', 'nowhere.pt'], ['--resume nowhere.pt: no such checkpoint file']),
    (['--im_size', 16], ['--im_size is for --dataset ImageFolder']),
])
def test_bad_flags_end_in_one_line(data, tmp_path, train_gan, flags, parts):
    p = train_gan(*TINY, '--data_path', data, '--save_path', tmp_path, *flags)
    assert_one_line_error(p, *parts)


def test_torchrun_is_refused_in_one_line(data, tmp_path, train_gan, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert_one_line_error(train_gan(*TINY, '--data_path', data, '--save_path', tmp_path), 'without torchrun')


def test_files_of_a_run_with_other_settings_are_not_replaced(data, tmp_path, train_gan):
    p = train_gan(*TINY, '--data_path', data, '--save_path', tmp_path, '--Iteration', 1)
    assert p.returncode == 0, p.stderr[-2000:]
    p = train_gan(*TINY, '--data_path', data, '--save_path', tmp_path, '--Iteration', 1, '--seed', 1)
    assert_one_line_error(p, 'other settings', '--seed 0 there, 1 here', '--overwrite')
    p = train_gan(*TINY, '--data_path', data, '--save_path', tmp_path, '--Iteration', 2, '--seed', 1, '--resume', 'auto')
    assert_one_line_error(p, 'other settings', '--seed 0 there, 1 here')
    p = train_gan(*TINY, '--data_path', data, '--save_path', tmp_path, '--Iteration', 1, '--seed', 1, '--overwrite')
    assert p.returncode == 0 and gan.load_generator(tmp_path / 'G_MNIST_small.pt', 10, 1, (28, 28)) is not None
