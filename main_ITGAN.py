"""IT-GAN: informative training samples from a generator's learned latents (Zhao & Bilen, "Synthesizing
Informative Training Samples with GAN", NeurIPS 2022 workshop), as the authors' scripts run it
(ITGAN_GANInversion.py, ITGAN_main_CIFAR10.py).

A frozen class-conditional generator (--generator: train_gan.py's file, or the authors' G_Pretrained_*.pth)
renders one image per latent; each latent is tied to a real training image of its class (its source). What
is learned is the latents, one Adam per class (the same arithmetic as one Adam over all of them, stepped
after every class has taken its batch):

- --method GANInversion: latents from N(0, I) learn to reproduce their sources: for each batch of
  --batch_z latents of every class, the mean squared distance between the embeddings (a ConvNet trained on
  the real data, frozen) of the rendered and the source images, plus the pixels' mean squared distance;
  no augmentation (Adam lr 0.1, 5000 iterations).
- --method ITGAN: from the inverted latents (--latents, a GANInversion result; or an inversion run first,
  --stage both): for each class a fresh random ConvNet (frozen) per iteration, and per batch one DSA draw
  shared by the rendered images, their sources and --batch_real real images of the class; the loss is
  (1 - λ) x DM's distance between the mean embeddings of the rendered and the real images + λ x the mean
  squared embedding distance of each rendered image to its own source (λ = --lambda_div; Adam lr 0.001,
  10000 iterations). Every batch takes its step: the authors' loop dropped a last partial batch.
- --method GAN: random latents, rendered as they are (the generator's own samples; nothing learned).

The result file holds the rendered images in the papers' format (evaluate.py evaluates them) and, beside
them, the latents, their labels and source indices, and the generator's SHA-256 ('learned').

    python train_gan.py --dataset FashionMNIST --arch small
    python main_ITGAN.py --dataset FashionMNIST --generator result/G_FashionMNIST_small.pt --ipc 10
"""
import hashlib
import os

import torch

import utils
from gan import load_generator, render
from runs import Flags, Method, condense, get_parser, positive, resolve_dsa, result_path, run_script, setup
from utils import UsageError, embed, say, siamese_augment

STAGE_DEFAULTS = {  # the authors' settings of each stage
    'GANInversion': dict(Iteration=5000, lr_img=0.1, batch_z=100),
    'ITGAN': dict(Iteration=10000, lr_img=0.001, batch_z=1250),
    'GAN': dict(Iteration=0, lr_img=0.001, batch_z=100),
}


# ----------------------------------------------------------------------------------------------------
# The latents, their sources and the generator
# ----------------------------------------------------------------------------------------------------

class LatentsOfAGenerator(Method):
    """What IT-GAN learns: latents of a frozen generator, one per image (--method GANInversion, ITGAN; GAN renders
    random ones). It holds the generator (loaded on first use), the latents' source images, and for
    GANInversion the frozen feature network and the sources' embeddings."""

    def __init__(self, args, data):
        super().__init__(args, data)
        self.G = self.latents = None

    @property
    def eval_interval(self):
        return self.args.eval_interval

    def optimizer(self, params):
        return torch.optim.Adam(params, lr=self.args.lr_img, betas=(0.9, 0.999))

    def prepare(self):
        """The frozen generator (loaded once, after the data: its classes, channels and size must fit) and
        --latents, checked against it."""
        if self.G is not None:
            return
        args, data = self.args, self.data
        self.G = load_generator(args.generator, data.num_classes, data.channel, data.im_size).to(args.device)
        if args.latents:
            self.latents = read_latents(args, data, self.G.dim_z)
        n = data.num_classes * args.ipc
        generator = sum(t.numel() * t.element_size() for t in self.G.state_dict().values())
        pixels = n * data.channel * data.im_size[0] * data.im_size[1]
        self.bytes = dict(latents=n * self.G.dim_z * 4, generator=generator, images_float32=pixels * 4,
                          images_uint8=pixels)
        say('bytes stored: latents %(latents)d, generator %(generator)d; the images they stand for: '
            '%(images_float32)d as float32, %(images_uint8)d as 8-bit pixels' % self.bytes)

    def init_images(self, real):
        """N(0, I) latents (GAN, GANInversion), or the inverted ones of --latents (ITGAN)."""
        self.prepare()
        if self.args.latents:
            return self.latents['learned'].to(self.args.device)
        g = utils.generator(*real.keys, 'latents')
        return torch.randn(self.data.num_classes * self.args.ipc, self.G.dim_z, generator=g).to(self.args.device)

    def start(self, real):
        self.prepare()
        self.source = self.sources(real)
        self.source_images = real.images[self.source]
        self.net = self.source_features = None
        if self.args.method == 'GANInversion':  # GAN inversion's embedding: a --model trained on the real images
            # (--feature_epochs, the evaluation protocol's optimiser, no augmentation), frozen; one per experiment,
            # from its random stream, kept in --save_path (utils.trained_classifier)
            self.net = utils.trained_classifier(real, range(self.data.num_classes), self.args, self.data,
                                                self.args.feature_epochs)[0].requires_grad_(False)
            self.source_features = embed(self.net, self.source_images).float()

    def sources(self, real):
        """The real training images the latents stand for, class by class ([ipc] per class, an index into
        real.images): the first --ipc of the class in an order drawn from (--seed, experiment); --ipc as large
        as the classes takes every image (Fashion-MNIST: 6000). A GANInversion result given by --latents fixes
        them."""
        if self.args.latents:
            return self.latents['source'].to(real.images.device)
        picked = []
        for c, idx in enumerate(real.indices_class):
            order = torch.randperm(len(idx), generator=utils.generator(*real.keys, 'sources', c)).to(idx.device)
            picked.append(idx[order[:self.args.ipc]])
        return torch.cat(picked)

    def iteration(self, it, syn, real):
        step = {'GANInversion': inversion_iteration, 'ITGAN': itgan_iteration}.get(self.args.method)
        return step(syn, real, self.args, self) if step else 0.0

    def render(self, z, labels, chunk=500):
        """The images of latents z (in chunks of 500, as the authors' generate())."""
        mean, std = self.data.mean, self.data.std
        parts = [render(self.G, zs, ls, mean, std) for zs, ls in zip(z.split(chunk), labels.split(chunk))]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def saved(self, syn):
        return dict(source=self.source.cpu(), generator=self.args.generator,
                    generator_sha256=self.args.generator_sha256, bytes=self.bytes)


def read_latents(args, data, dim_z):
    res = utils.load_result(args.latents)
    learned = (res.get('learned') or [None])[0]
    if not isinstance(learned, dict) or not all(torch.is_tensor(learned.get(k)) for k in ('learned', 'source')):
        raise UsageError(f'--latents {args.latents} holds no latents of main_ITGAN.py (a GANInversion result)')
    if learned.get('generator_sha256') != args.generator_sha256:
        raise UsageError(f'--latents {args.latents} were learned with another generator than {args.generator}')
    if tuple(learned['learned'].shape) != (data.num_classes * args.ipc, dim_z):
        raise UsageError(f'--latents {args.latents} holds {tuple(learned["learned"].shape)} latents, not '
                         f'{args.ipc} per class of {data.num_classes} classes of {dim_z} numbers')
    return learned


def batches(syn, size):
    """Row indices of the b-th batch of --batch_z latents of every class of this process, for each b (the
    last batch may be partial: every latent takes its step)."""
    ipc, rows = syn.ipc, []
    for start in range(0, ipc, size):
        rows.append(torch.cat([torch.arange(c * ipc + start, c * ipc + min(start + size, ipc)) for c in syn.classes]))
    return rows


def adam_steps(syn, loss_of_batch, size):
    """For each batch: every class's loss on its rows, one Adam step of all latents (a class's other rows
    take it without a gradient, as in the authors' per-class Adam). Returns the mean loss over the steps."""
    z, losses = syn.images, []
    for rows in batches(syn, size):
        rows = rows.to(z.device)
        loss = loss_of_batch(rows)
        syn.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        syn.optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean().item() / len(syn.classes)


# ----------------------------------------------------------------------------------------------------
# The two stages
# ----------------------------------------------------------------------------------------------------

def inversion_iteration(syn, real, args, gen):
    """GAN inversion: rendered images close to their sources in embedding and in pixels."""
    def loss_of_batch(rows):
        images = gen.render(syn.images[rows], syn.labels[rows])
        per_image = (gen.net.embed(images).float() - gen.source_features[rows]).square().flatten(1).mean(1) \
            + (images.float() - gen.source_images[rows]).square().flatten(1).mean(1)
        return per_image.view(len(syn.classes), -1).mean(1).sum()  # each class's mean, as its own Adam sees it

    return adam_steps(syn, loss_of_batch, args.batch_z)


def itgan_iteration(syn, real, args, gen):
    """IT-GAN: condense each class's real images into the rendered ones (DM's distance under a fresh random
    network), kept near their sources (λ)."""
    nets = {c: gen.network().train().requires_grad_(False) for c in syn.classes}  # (the authors' .train(): instance norm alike)
    lam = args.lambda_div

    def loss_of_batch(rows):
        images = gen.render(syn.images[rows], syn.labels[rows])
        loss = 0
        for c, mine in zip(syn.classes, torch.arange(len(rows), device=rows.device).view(len(syn.classes), -1)):
            batch = [images[mine], real.get_images(c, args.batch_real)] + ([gen.source_images[rows[mine]]] if lam else [])
            feats = [nets[c].embed(x).float() for x in siamese_augment(batch, args, real.rng(c))]
            cond = (feats[0].mean(0) - feats[1].mean(0)).square().sum()
            div = (feats[0] - feats[2]).square().sum(1).mean() if lam else 0
            loss = loss + lam * div + (1 - lam) * cond
        return loss

    return adam_steps(syn, loss_of_batch, args.batch_z)


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

def parser():
    p = get_parser('IT-GAN: learned latents of a frozen generator', methods=['ITGAN', 'GANInversion', 'GAN'],
                   method='ITGAN', ipc=10, num_exp=1, num_eval=3, eval_mode='S', Iteration=None, lr_img=None,
                   init='real', dsa_strategy=None, batch_real=500, epoch_eval_train=200, generator_sha256=None,
                   unused={'dis_metric': 'does not apply to IT-GAN: it matches embeddings, not gradients',
                           'init': 'does not apply to IT-GAN: latents start from N(0, I) or from --latents'},
                   rules={'Iteration': 'default: ITGAN 10000, GANInversion 5000',
                          'lr_img': "the latents' Adam learning rate (default: ITGAN 0.001, GANInversion 0.1)",
                          'dsa_strategy': 'default: color_crop_cutout_flip_scale_rotate, without flip for MNIST and SVHN'})
    add = p.add_argument
    add('--generator', required=True, help="the frozen generator: a G_<dataset>_<arch>.pt of train_gan.py, or the "
                                            "authors' G_Pretrained_<dataset>_exp<e>.pth")
    add('--stage', choices=['both', 'itgan'], default=None,
        help='ITGAN: invert first (both: a GANInversion run with the same flags, then ITGAN from its latents), '
             'or only IT-GAN from --latents (default: itgan with --latents, else both)')
    add('--latents', default=None, help="ITGAN: a GANInversion result file (res_GANInversion_<...>.pt) to start from")
    add('--lambda_div', type=float, default=0.001, help="ITGAN: the weight λ of each image's distance to its source")
    add('--batch_z', type=positive, default=None, help='latents of a class per Adam step (default: ITGAN 1250, '
                                                   'GANInversion 100); the last batch may be smaller')
    add('--inversion_iterations', type=positive, default=5000, help='ITGAN --stage both: iterations of the inversion run')
    add('--eval_interval', type=positive, default=5000, help="evaluate every N iterations in modes S/SS (the authors')")
    add('--feature_epochs', type=positive, default=20,
        help="GANInversion: epochs of training the feature network on the real images (the authors' pretrained "
             'ConvNet trained 200)')
    return p


def configure(args):
    """Resolve the flags: the stage's defaults, the generator file (its SHA-256 joins the run's identity),
    DSA (always on)."""
    for k, v in STAGE_DEFAULTS[args.method].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.method != 'ITGAN' and (args.latents or args.stage):
        raise UsageError(f'--latents and --stage are for --method ITGAN, not {args.method}')
    if args.method == 'GAN' and args.Iteration:
        raise UsageError('--method GAN renders random latents as they are: it has no --Iteration')
    if not 0 <= args.lambda_div <= 1:
        raise UsageError(f'--lambda_div must be between 0 and 1, got {args.lambda_div}')
    if args.method == 'ITGAN':
        args.stage = args.stage or ('itgan' if args.latents else 'both')
        if args.stage == 'itgan' and not args.latents:
            raise UsageError('--stage itgan starts from inverted latents: name a GANInversion result with --latents')
    for path, flag in ((args.generator, '--generator'), (args.latents, '--latents')):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f'{flag} {path}: no such file')
    digest = hashlib.sha256()
    with open(args.generator, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    args.generator_sha256 = digest.hexdigest()  # (a flag of the run's identity: see parser)
    return resolve_dsa(args, augments=True)


def inversion_of(args):
    """The GANInversion run that --stage both makes first: this run's flags, the inversion's own settings."""
    inversion = STAGE_DEFAULTS['GANInversion']
    return args.replace(method='GANInversion', latents=None, stage=None, Iteration=args.inversion_iterations,
                        lr_img=inversion['lr_img'], batch_z=inversion['batch_z'])


def main():
    args = Flags.freeze(configure(setup(parser().parse_args())))
    if args.method == 'ITGAN' and args.stage == 'both':
        inversion = inversion_of(args)
        condense(LatentsOfAGenerator, inversion)
        args = args.replace(latents=result_path(inversion), stage='itgan')
    condense(LatentsOfAGenerator, args)


if __name__ == '__main__':
    run_script(main)
