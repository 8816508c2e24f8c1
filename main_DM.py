"""DM: Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023).

Each iteration embeds real and synthetic images of every class with a freshly initialised, frozen
network and moves the synthetic images so that the mean embeddings of each class match.
"""
import torch

from utils import condense, embed, get_network, get_parser, has_batchnorm, run_script, setup, siamese_augment


def train_iteration(it, syn, real, args):
    net = get_network(args.model, args.channel, args.num_classes, args.im_size, args.device)
    net.train().requires_grad_(False)
    joint = has_batchnorm(net)  # BatchNorm: all classes go through the network as one batch
    real_means, real_all, syn_all = [], [], []
    for c in range(args.num_classes):
        img_real, img_syn = real.get_images(c, args.batch_real), syn.of_class(c)
        if args.dsa:  # the same transformation for the real and the synthetic batch of a class
            img_real, img_syn = siamese_augment([img_real, img_syn], args)
        if joint:
            real_all.append(img_real)
        else:
            real_means.append(embed(net, img_real, amp=args.amp, compiled=args.compile).mean(0))
        syn_all.append(img_syn)
    if joint:
        real_means = embed(net, torch.cat(real_all), None, args.amp, args.compile).unflatten(0, (args.num_classes, -1)).mean(1)
    else:
        real_means = torch.stack(real_means)
    syn_means = net.embed(torch.cat(syn_all)).view(args.num_classes, args.ipc, -1).mean(1)
    loss = torch.sum((real_means - syn_means) ** 2)
    syn.step(loss)
    return loss.item() / args.num_classes


def main():
    parser = get_parser('DM: dataset condensation with distribution matching', method='DM', ipc=50,
                        num_eval=20, Iteration=20000, lr_img=None, init='real',
                        dsa_strategy='color_crop_cutout_flip_scale_rotate')
    args = setup(parser.parse_args())
    if args.lr_img is None:  # the papers' choice: 10 for large CIFAR-10 sets
        args.lr_img = 10.0 if args.dataset == 'CIFAR10' and args.ipc >= 100 else 1.0
    args.dsa = args.dsa_strategy not in ('none', 'None', '')
    condense(args, train_iteration, eval_interval=2000)


if __name__ == '__main__':
    run_script(main)
