"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

Each iteration embeds real and synthetic images of every class with a freshly initialised, frozen
network and moves the synthetic images so that the mean embeddings of each class match.
"""
import torch

from runs import STRATEGY_RULE, Method, condense, get_parser, resolve_dsa, run_script, setup
from utils import embed, has_batchnorm, siamese_augment


class DM(Method):
    eval_interval = 2000
    joint_batchnorm = True  # a BatchNorm network sees all classes as one batch

    @staticmethod
    def defaults(dataset, ipc):
        """The papers' settings for a dataset and ipc: 20000 iterations, lr_img 1 (10 for CIFAR-10 from ipc 100)."""
        return dict(Iteration=20000, lr_img=10.0 if dataset == 'CIFAR10' and ipc >= 100 else 1.0, init='real')

    def iteration(self, it, syn, real):
        args = self.args
        net = self.network()
        net.train().requires_grad_(False)
        classes = syn.classes  # (under torchrun: this process's share)
        joint = has_batchnorm(net)  # BatchNorm: all classes go through the network as one batch, so that
        n = min([args.batch_real, *map(len, real.indices_class)]) if joint else args.batch_real  # equally many each
        real_means, real_all, syn_means = [], [], []
        for c in classes:
            img_real, img_syn = real.get_images(c, n), syn.of_class(c)
            if args.dsa:  # the same transformation for the real and the synthetic batch of a class
                img_real, img_syn = siamese_augment([img_real, img_syn], args, real.rng(c))
            if joint:
                real_all.append(img_real)
                syn_means.append(img_syn)
            else:
                real_means.append(embed(net, img_real, compiled=args.compile).mean(0))
                syn_means.append(net.embed(img_syn).float().mean(0))
        if joint:
            real_means = embed(net, torch.cat(real_all), None, compiled=args.compile).unflatten(0, (len(classes), n)).mean(1)
            syn_means = net.embed(torch.cat(syn_means)).float().unflatten(0, (len(classes), args.ipc)).mean(1)
        else:
            real_means, syn_means = torch.stack(real_means), torch.stack(syn_means)
        loss = torch.sum((real_means - syn_means) ** 2)
        syn.step(loss)
        return loss.item() / self.data.num_classes


def parser():
    return get_parser('DM: dataset condensation with distribution matching', methods=['DM'], method='DM', ipc=50,
                      num_exp=5, num_eval=20, eval_mode='SS', Iteration=20000, lr_img=None, init='real',
                      dsa_strategy=None, unused={'dis_metric': 'does not apply to DM: it matches embeddings, not gradients'},
                      rules={'lr_img': 'default: 1, or 10 for CIFAR10 with ipc >= 100', 'dsa_strategy': STRATEGY_RULE})


def configure(args):
    """Resolve the flags: the learning rate's rule, DSA's augmentation (always on)."""
    if args.lr_img is None:
        args.lr_img = DM.defaults(args.dataset, args.ipc)['lr_img']
    return resolve_dsa(args, augments=True)


if __name__ == '__main__':
    run_script(lambda: condense(DM, configure(setup(parser().parse_args()))))
