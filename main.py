"""DC: Dataset Condensation with Gradient Matching (Zhao, Mopuri & Bilen, ICLR 2021), and DSA: with
Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021). Also the coreset baselines of their
tables (--method random, herding, kcenter, forgetting), evaluated with the same protocol.

Each iteration samples a fresh network. For outer_loop steps the synthetic images of every class move
so that the network's gradients on them match its gradients on a batch of real images of that class
(DSA: both batches through one random transformation); between steps the network trains inner_loop
epochs on the synthetic set.
"""
import torch

from runs import STRATEGY_RULE, Method, condense, get_parser, positive, refuse, resolve_dsa, run_script, setup
from utils import (CORESETS, FORGETTING, HERDING, batchnorm_layers, class_gradients, get_loops, has_batchnorm,
                   match_loss, run_epoch, select_coreset, siamese_augment, tensor_loader)

BN_IMAGES_PER_CLASS = 16


def freeze_batchnorm(net, real, num_classes):
    """Measure the BatchNorm statistics on 16 real images per class, then freeze them (eval mode): a
    synthetic batch, e.g. one image, is too small to estimate them."""
    net.train()
    with torch.no_grad():  # (every process draws the same images: from streams of their own)
        net(torch.cat([real.get_images(c, BN_IMAGES_PER_CLASS, 'batchnorm') for c in range(num_classes)]))
    for m in batchnorm_layers(net):
        m.eval()


class GradientMatching(Method):
    """DC (--method DC) and DSA (--method DSA)."""

    def __init__(self, args, data):
        super().__init__(args, data)
        self.outer_loop, self.inner_loop = get_loops(args.ipc)

    @staticmethod
    def defaults(dataset, ipc):
        """The papers' settings: 1000 iterations, lr_img 0.1, from noise."""
        return dict(Iteration=1000, lr_img=0.1, init='noise')

    def iteration(self, it, syn, real):
        args = self.args
        net = self.network()
        optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
        syn_loader = tensor_loader(syn.images.detach(), syn.labels, args.batch_train, shuffle=True)  # sees each update
        loss_sum = 0
        for ol in range(self.outer_loop):
            if has_batchnorm(net):
                freeze_batchnorm(net, real, self.data.num_classes)
            loss = 0
            for c in syn.classes:  # (under torchrun: this process's share)
                img_real, img_syn = real.get_images(c, args.batch_real), syn.of_class(c)
                if args.dsa:  # the same transformation for the real and the synthetic batch of a class
                    img_real, img_syn = siamese_augment([img_real, img_syn], args, real.rng(c))
                gw_real = class_gradients(net, img_real, c)  # constants
                gw_syn = class_gradients(net, img_syn, c, create_graph=True)
                loss = loss + match_loss(gw_syn, gw_real, args)
            syn.step(loss)
            loss_sum += loss.detach()
            if ol == self.outer_loop - 1:
                break
            syn.sync()  # every process trains the network on the whole set
            for il in range(self.inner_loop):  # train the network on the current synthetic set
                run_epoch('train', syn_loader, net, optimizer_net, torch.nn.functional.cross_entropy, args, aug=args.dsa)
        return loss_sum.item() / (self.data.num_classes * self.outer_loop)


class Coreset(Method):
    """--method random|herding|kcenter|forgetting: --ipc real images per class, selected once; nothing to iterate."""
    eval_interval = 1

    def init_images(self, real):
        return real.images[torch.cat(select_coreset(self.args.method, real, self.args, self.data, self.args.ipc))]


def parser():
    p = get_parser('DC/DSA: dataset condensation with gradient matching', methods=['DC', 'DSA', *CORESETS], method='DC',
                   omit=['compile'], num_exp=5, num_eval=20, **GradientMatching.defaults(None, None),
                   rules={'dsa_strategy': f'default: None; with --method DSA {STRATEGY_RULE}'})
    p.add_argument('--coreset_epochs', type=positive, default=10,
                   help='herding/kcenter/forgetting: epochs of training the network on the real data')
    p.add_argument('--herding', choices=list(HERDING), default='nearest',
                   help="herding's rule: nearest (the ipc images nearest the class mean: the DC paper's herding row) "
                        "or greedy (each pick keeps the picks' mean nearest the class mean; Welling, 2009; iCaRL's)")
    p.add_argument('--forgetting_score', choices=FORGETTING, default='events',
                   help='forgetting: how an image the network never got right ranks: events (by its forgetting '
                        'events: none, as DeepCore counts them; the papers\' figures) or toneva (first, as forgotten '
                        'every time; with more such images than --ipc, all picks are never-learned images)')
    return p


def configure(args):
    """Resolve the flags: DSA's augmentation (DC matches and evaluates without it; the coresets evaluate with it
    when a strategy is named), the coreset methods' settings (nothing to iterate)."""
    resolve_dsa(args, augments=args.method == 'DSA', required={'DC': False, 'DSA': True}.get(args.method))
    if args.method in CORESETS:  # real images, selected once: nothing to iterate
        refuse(args, ['Iteration', 'init', 'lr_img', 'batch_real', 'dis_metric', 'checkpoint_every'],
               f'does not apply to --method {args.method}: a coreset is selected from real images, not optimised')
        if args.method == 'random':
            refuse(args, ['coreset_epochs'], 'does not apply to --method random: it trains no network')
        args.Iteration, args.init = 0, 'real'
    else:
        refuse(args, ['coreset_epochs'], f'is for the coreset methods ({", ".join(CORESETS[1:])}), not {args.method}')
    if args.method != 'herding':
        refuse(args, ['herding'], f'is for --method herding, not {args.method}')
    if args.method != 'forgetting':
        refuse(args, ['forgetting_score'], f'is for --method forgetting, not {args.method}')
    return args


def main():
    args = configure(setup(parser().parse_args()))
    condense(Coreset if args.method in CORESETS else GradientMatching, args)


if __name__ == '__main__':
    run_script(main)
