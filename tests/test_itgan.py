"""IT-GAN (main_ITGAN.py) with a tiny randomly initialised generator: rendered images, gradients reaching the
latents only, every latent batch optimised (the authors dropped the last partial one), inversion lowering its
loss, each latent paired with its own source, resume identity, the saved latents, and bad generator files."""
import glob
import sys

import pytest
import torch

import main_ITGAN
import runs
import gan
import utils
from helpers import assert_one_line_error, crash_and_resume, run_in_process
from utils import load_result


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generator_file(path, num_classes=10, channel=1, im_size=(28, 28), dim_z=16):
    torch.manual_seed(0)  # (the same file every time: its hash names it)
    G = gan.build_generator('small', num_classes, channel, im_size, G_ch=4, dim_z=dim_z)
    G.mean, G.std = [0.1307] * channel, [0.3081] * channel
    utils.atomic_save(gan.generator_record(G, 'small', 'MNIST', 5, {'seed': 0}), path)
    return str(path)


def flags(data, tmp_path, *extra, method='GANInversion'):
    return ['--method', method, '--dataset', 'MNIST', '--data_path', str(data), '--generator',
            generator_file(tmp_path / 'G.pt'), '--ipc', '5', '--batch_z', '2', '--feature_epochs', '1', '--num_eval', '1',
            '--epoch_eval_train', '1', '--batch_real', '8', *map(str, extra)]


def prepared(data, tmp_path, *extra, method='GANInversion'):
    """main_ITGAN's args, real images, synthetic latents and method (started), as condense's experiment makes them."""
    args = main_ITGAN.configure(runs.setup(main_ITGAN.parser().parse_args(
        [*flags(data, tmp_path, *extra, method=method), '--save_path', str(tmp_path / 'res')])))
    real, _, info = runs.load_real(args)
    gen = main_ITGAN.LatentsOfAGenerator(args, info)
    syn = runs.new_synset(real, gen, (0, 0))
    gen.start(real)
    return args, real, syn, gen


def test_rendered_images_have_the_datas_shape_and_normalisation(data, tmp_path):
    args, real, syn, gen = prepared(data, tmp_path)
    images = gen.render(syn.images.detach(), syn.labels)
    assert images.shape == (50, 1, 28, 28) and syn.images.shape == (50, 16)
    pixels = images * 0.3081 + 0.1307  # back to [0, 1]: G's tanh output mapped by (x + 1) / 2
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    raw = (gen.G(syn.images.detach()[:3], syn.labels[:3]) + 1) / 2
    assert torch.allclose(pixels[:3], raw, atol=1e-6)


@pytest.mark.parametrize('method', ['GANInversion', 'ITGAN'])
def test_one_iteration_moves_every_latent_and_nothing_of_the_generator(data, tmp_path, monkeypatch, method):
    extra = ['--lambda_div', 0.5] if method == 'ITGAN' else []
    if method == 'ITGAN':  # (an ITGAN run starts from a GANInversion result: fake one from fresh latents)
        args, real, syn, gen = prepared(data, tmp_path)
        path = tmp_path / 'inv.pt'
        utils.atomic_save({'data': [], 'learned': [dict(learned=syn.images.detach(), labels=syn.labels,
                                                        source=gen.source, generator_sha256=args.generator_sha256)]}, path)
        extra += ['--latents', path]
    args, real, syn, gen = prepared(data, tmp_path, *extra, method=method)
    G_before = {k: v.clone() for k, v in gen.G.state_dict().items()}
    z_before = syn.images.detach().clone()
    steps = []
    step = syn.optimizer.step
    monkeypatch.setattr(syn.optimizer, 'step', lambda *a: steps.append(syn.images.grad.clone()) or step(*a))
    runs.step(gen, 0, syn, real, (0, 0))
    # 5 latents per class in batches of 2: three steps, the last of one latent per class (the authors' loop
    # range(5 // 2) would have taken two and left every class's fifth latent unchanged)
    assert len(steps) == 3
    assert [sorted(set(g.abs().sum(1).nonzero().flatten().remainder(5).tolist())) for g in steps] == [[0, 1], [2, 3], [4]]
    assert (syn.images.detach() != z_before).all(dim=1).all()  # every latent moved
    assert all(torch.equal(v, G_before[k]) for k, v in gen.G.state_dict().items())  # the generator did not
    assert all(p.grad is None for p in gen.G.parameters())


def test_inversion_lowers_its_loss(data, tmp_path):
    args, real, syn, gen = prepared(data, tmp_path, '--batch_z', 5)
    losses = [runs.step(gen, it, syn, real, (0, 0)) for it in range(15)]  # (--method GANInversion: inversion_iteration)
    # (a random tiny generator can only come so close to real digits: the loss falls steadily, not far)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.97 * losses[0], losses


def test_the_diversity_term_pairs_each_latent_with_its_own_source(data, tmp_path, monkeypatch):
    args, real, syn, gen = prepared(data, tmp_path)
    args.lambda_div, args.dsa_strategy = 1.0, 'none'  # the loss is the diversity term alone
    monkeypatch.setattr(gen, 'render', lambda z, labels: gen.source_images[gen.index[:len(z)]] + 0 * z.sum())

    def loss(order):
        gen.index = order
        losses = []
        monkeypatch.setattr(main_ITGAN, 'adam_steps', lambda syn, fn, size: losses.append(fn(torch.arange(0, 50, 5))))
        main_ITGAN.itgan_iteration(syn, real, args, gen)
        return losses[0]

    # the rendered images of the first latent of each class equal their own sources: no distance
    assert loss(torch.arange(0, 50, 5)).item() == 0
    assert loss(torch.arange(0, 50, 5).roll(1)).item() > 0  # paired with another class's image


def test_a_crashed_run_resumes_bit_identically_and_saves_its_latents(data, tmp_path, monkeypatch):
    args = flags(data, tmp_path, '--Iteration', 4, '--checkpoint_every', 1)

    def run_main(save_path, *extra):
        monkeypatch.setattr(sys, 'argv', ['main_ITGAN.py', *args, '--save_path', str(save_path), *extra])
        main_ITGAN.main()
        return load_result(glob.glob(str(save_path / 'res_*.pt'))[0])

    whole = run_main(tmp_path / 'whole')
    resumed = crash_and_resume(monkeypatch, run_main, main_ITGAN.LatentsOfAGenerator, 'iteration', 3, tmp_path / 'cut')
    assert torch.equal(resumed['data'][0][0], whole['data'][0][0]) and resumed['data'][0][0].shape == (50, 1, 28, 28)
    learned = resumed['learned'][0]
    assert torch.equal(learned['learned'], whole['learned'][0]['learned']) and learned['learned'].shape == (50, 16)
    assert learned['labels'].tolist() == torch.arange(10).repeat_interleave(5).tolist()
    assert len(set(learned['source'].tolist())) == 50 and learned['generator_sha256'] == resumed['settings']['generator_sha256']


@pytest.mark.parametrize('make,message', [
    (lambda p: generator_file(p, num_classes=3), 'holds a generator for other data (num_classes 3 there, 10 here)'),
    (lambda p: generator_file(p, im_size=(32, 32)), 'im_size [32, 32] there, [28, 28] here'),
    (lambda p: p.write_bytes(b'not a checkpoint'), 'bad.pt'),
    (lambda p: None, '--generator'),  # no such file
])
def test_a_generator_that_does_not_fit_ends_with_one_line(data, tmp_path, monkeypatch, capsys, make, message):
    make(tmp_path / 'bad.pt')
    argv = flags(data, tmp_path, '--save_path', tmp_path / 'res')
    argv[argv.index('--generator') + 1] = str(tmp_path / 'bad.pt')
    p = run_in_process(monkeypatch, capsys, 'main_ITGAN.py', *argv, main=main_ITGAN.main)
    assert_one_line_error(p, message)


def test_latents_of_another_generator_are_refused(data, tmp_path, monkeypatch, capsys):
    args, real, syn, gen = prepared(data, tmp_path)
    path = tmp_path / 'inv.pt'
    utils.atomic_save({'data': [], 'learned': [dict(learned=syn.images.detach(), labels=syn.labels, source=gen.source,
                                                    generator_sha256='0' * 64)]}, path)
    capsys.readouterr()
    argv = flags(data, tmp_path, '--latents', path, '--save_path', tmp_path / 'res', method='ITGAN')
    p = run_in_process(monkeypatch, capsys, 'main_ITGAN.py', *argv, main=main_ITGAN.main)
    assert_one_line_error(p, 'were learned with another generator')
