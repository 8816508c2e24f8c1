"""Expert trajectories for trajectory matching (MTT), as the authors' buffer.py (GeorgeCazenavette/mtt-distillation)
runs: a fresh --model per expert, trained with plain SGD (--lr_teacher, --mom 0, --l2 0, a constant rate) on
batches of --batch_train real images, each batch through DSA's augmentation (a fresh draw per batch), its
parameters saved at initialisation and after every one of --train_epochs epochs.

Our files: one per expert, <buffer_path>/<dataset>/<model>[_zca]/expert_<i>.pt, written atomically, loadable
with torch.load(weights_only=True):
    {'record': {format, dataset, data_id, model, zca, seed, train_epochs, lr_teacher, batch_train, mom, l2, decay,
                dsa_strategy, param_shapes, num_params, torch, expert, test_acc},
     'trajectory': float32 tensor [train_epochs + 1, num_params]}   (the flat parameters, net.parameters() order)
Expert i starts from the random streams of (--seed, 'expert', i): the same expert whichever process or run makes
it. Experts already written with the same settings are kept (a run adds the missing ones); with other settings
they are refused (--overwrite replaces them). An expert in progress is checkpointed every epoch (or every
--checkpoint_every epochs) and continues bit for bit with --resume auto. Under torchrun expert i is made by
process i % world: the files are the ones a single process writes.
main_MTT.py reads these files, and the authors' replay_buffer_<n>.pt files too (trajectory.load_authors_buffer).
"""
import os

import torch

import trajectory as T
from trajectory import (FORMAT, IDENTITY, buffer_folder, differs, expert_files, expert_path,  # noqa: F401
                        read_expert)  # (the buffer's files: trajectory.py, which main_MTT.py reads them with)
from runs import Checkpoints, get_parser, progress, run_script, setup
from utils import (DataInfo, DiffAugment, Group, UsageError, atomic_save, check_strategy, default_strategy,
                   get_dataset, get_network, say, set_seed, generator as stream)


def data_record(args, data, net):
    """The record every expert of this buffer shares (IDENTITY) plus the torch version."""
    shapes = [list(p.shape) for p in net.parameters()]
    return dict(format=FORMAT, dataset=args.dataset, data_id=data.data_id, model=args.model, zca=bool(args.zca),
                seed=args.seed, train_epochs=args.train_epochs, lr_teacher=args.lr_teacher, batch_train=args.batch_train,
                mom=args.mom, l2=args.l2, decay=args.decay, dsa_strategy=args.dsa_strategy, param_shapes=shapes,
                num_params=sum(p.numel() for p in net.parameters()), torch=str(torch.__version__))


def load_data(args):
    """The training images on the device (ZCA-whitened with --zca: utils.get_dataset), the test set and the DataInfo."""
    loaded = get_dataset(args.dataset, args.data_path, args.im_size, args.device, args.zca)
    return loaded[6], loaded[7], DataInfo.of(args.dataset, loaded)


@torch.no_grad()
def test_accuracy(net, test, chunk=512):
    net.eval()
    right = sum(int((net(x).argmax(1) == y).sum()) for x, y in zip(test.images.split(chunk), test.labels.split(chunk)))
    net.train()
    return right / max(1, len(test))


def make_expert(i, args, train, test, data, record, folder, group):
    """Train expert i (or continue it from its checkpoint) and write its file."""
    set_seed(args.seed, 'expert', i)
    net = get_network(args.model, data.channel, data.num_classes, data.im_size, args.device)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr_teacher, momentum=args.mom, weight_decay=args.l2)
    gen = stream(args.seed, 'expert', i, 'train')
    signature = {k: record[k] for k in IDENTITY} | {'expert': i}
    checkpoints = Checkpoints(os.path.join(folder, f'checkpoint_expert_{i:04d}_'), signature, Group(),
                              args.checkpoint_every or 1, expected={'epoch': int, 'net': dict, 'optimizer': dict,
                                                                    'generator': torch.Tensor, 'snapshots': torch.Tensor})
    state = checkpoints.load('auto') if args.resume != 'none' else None
    if args.resume == 'none' and checkpoints.paths():
        raise UsageError(f'expert {i} was interrupted: its checkpoints are in {folder}; continue it with --resume auto, '
                         'or start it afresh with --overwrite')
    start, done = 0, [T.flat_params(net).cpu()]
    if state:
        net.load_state_dict(state['net'])
        opt.load_state_dict(state['optimizer'])
        gen.set_state(state['generator'])
        start, done = state['epoch'], list(state['snapshots'])
        say(f'expert {i}: resuming after epoch {start} from {checkpoints.last_path}')

    def on_epoch(e, snapshot, net, generator):
        done.append(snapshot)
        checkpoints.tick()
        if checkpoints.due() and e < args.train_epochs:
            checkpoints.save(e, dict(epoch=e, net=net.state_dict(), optimizer=opt.state_dict(),
                                     generator=generator.get_state(), snapshots=torch.stack(done)))

    augment = (lambda x, g: DiffAugment(x, args.dsa_strategy, generator=g)) if args.dsa else None
    snapshots = T.train_expert(net, train.images, train.labels, args.train_epochs, lr=args.lr_teacher,
                               batch=args.batch_train, augment=augment, generator=gen, on_epoch=on_epoch,
                               start_epoch=start, decay=args.decay, optimizer=opt)
    assert len(done) == len(snapshots) + start == args.train_epochs + 1
    acc = test_accuracy(net, test)
    atomic_save({'record': dict(record, expert=i, test_acc=acc), 'trajectory': torch.stack(done)}, expert_path(folder, i))
    for p in checkpoints.paths():
        os.remove(p)
    return acc


def main(args):
    group = Group.current()
    train, test, data = load_data(args)
    folder = buffer_folder(args.buffer_path, args.dataset, args.model, args.zca)
    os.makedirs(folder, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        net = get_network(args.model, data.channel, data.num_classes, data.im_size, 'cpu')
    record = data_record(args, data, net)
    existing = expert_files(folder)
    if args.overwrite and group.main:
        for p in [*existing.values(), *(os.path.join(folder, f) for f in os.listdir(folder)
                                        if f.startswith('checkpoint_expert_'))]:
            os.remove(p)
        existing = {}
    for i, path in existing.items():  # the buffer must be this command's (one line when it is not)
        theirs, _ = read_expert(path)
        changed = differs(theirs, record)
        if changed:
            raise UsageError(f'{folder} holds experts made with other settings ({changed}); use another --buffer_path, '
                             'or --overwrite to replace them')
        break
    todo = [i for i in range(args.num_experts) if i not in existing]
    say(f'{len(existing)} expert(s) already in {folder}; making {len(todo)} ({args.train_epochs} epochs each, '
        f'{record["num_params"]} parameters, DSA {args.dsa_strategy if args.dsa else "off"}'
        f'{", ZCA" if args.zca else ""}){"; " + str(group.world) + " processes" if group.world > 1 else ""}')
    for i in progress([i for i in todo if i % group.world == group.rank], group, desc='experts'):
        acc = make_expert(i, args, train, test, data, record, folder, group)
        say(f'expert {i}: test accuracy {acc:.4f}')


def parser():
    p = get_parser("MTT's expert trajectories (the authors' buffer.py)", groups=('data', 'run'), omit=('save_path', 'amp', 'log'),
                   help={'resume': 'auto (also a bare --resume): continue an interrupted expert from its checkpoint (experts '
                                   'already written are always kept)',
                         'checkpoint_every': 'checkpoint an expert in progress every N epochs (default: every epoch)',
                         'overwrite': 'remove the experts in the buffer folder first (e.g. made with other settings)'})
    add = p.add_argument
    from networks import MODELS
    add('--model', type=str, default='ConvNet', choices=list(MODELS), metavar='MODEL', help='the experts\' model')
    add('--buffer_path', type=str, default='./buffers', help='experts go to <buffer_path>/<dataset>/<model>[_zca]/')
    add('--train_epochs', type=int, default=T.AUTHORS_EXPERTS['train_epochs'], help='epochs per expert')
    add('--num_experts', type=int, default=T.AUTHORS_EXPERTS['num_experts'], help='experts in the buffer')
    add('--lr_teacher', type=float, default=T.AUTHORS_EXPERTS['lr_teacher'], help='the experts\' SGD learning rate')
    add('--batch_train', type=int, default=T.AUTHORS_EXPERTS['batch_train'], help='real images per SGD step')
    add('--mom', type=float, default=0.0, help='SGD momentum (the authors\' --mom)')
    add('--l2', type=float, default=0.0, help='SGD weight decay (the authors\' --l2)')
    add('--decay', action='store_true', help='the authors\' --decay: the learning rate x0.1 after epoch train_epochs // 2 + 1')
    add('--zca', action='store_true', help='ZCA-whiten the data (kornia\'s ZCAWhitening(eps=0.1), fitted on the '
                                           'training set of [0,1] pixels), as the authors\' CIFAR experts')
    add('--dsa_strategy', type=str, default=None,
        help='DSA augmentation of every batch (default: color_crop_cutout_flip_scale_rotate, the authors\' full '
             'strategy; without flip for MNIST and SVHN, as every script here; the authors\' buffer.py also has a '
             'crop_scale_rotate line for some datasets that never takes effect: their argument default overrides it)')
    return p


def configure(args):
    for name in ('train_epochs', 'num_experts', 'batch_train'):
        if getattr(args, name) < 1:
            raise UsageError(f'--{name} must be at least 1, got {getattr(args, name)}')
    if not args.lr_teacher > 0 or args.mom < 0 or args.l2 < 0:
        raise UsageError('--lr_teacher must be positive, --mom and --l2 not negative')
    if args.dsa_strategy is None:
        args.dsa_strategy = default_strategy(args.dataset)
    check_strategy(args.dsa_strategy)
    args.dsa = args.dsa_strategy not in ('', 'none', 'None')
    return args


def prepare(args):
    args.save_path = args.buffer_path  # (setup checks that it is writable and sweeps our dead temporaries)
    return configure(setup(args))


if __name__ == '__main__':
    run_script(lambda: main(prepare(parser().parse_args())))
