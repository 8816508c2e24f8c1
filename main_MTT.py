"""MTT: Dataset Distillation by Matching Training Trajectories (Cazenavette et al., CVPR 2022), as the authors'
distill.py (GeorgeCazenavette/mtt-distillation) runs, on the shared harness; --constant_memory: TESLA's gradient
(Cui et al., ICML 2023), whose memory does not grow with --syn_steps (a first-order approximation: docs/mtt.md).

Each iteration: a random expert of the buffer (buffer.py, or the authors' replay_buffer_<n>.pt files), a start
epoch in 0 .. max_start_epoch - 1, the student starts from that snapshot and takes --syn_steps plain SGD steps on
the synthetic images (chunks of --batch_syn, a fresh DSA draw per step) with the learned step size syn_lr; the
loss ||w_N - w*||^2 / ||w_0 - w*||^2 against the snapshot --expert_epochs later; one backward through the whole
unroll into the images and syn_lr, both moved by SGD with momentum 0.5 (--lr_img, --lr_lr). The science is
trajectory.py's (student_unroll/mtt_loss, tesla_grads).

The learned step size is the evaluation's learning rate (the authors' args.lr_net = syn_lr.item()): it is method
state (checkpoints keep it, outside the run's identity), every evaluation trains its models with it (evaluation()),
and the result file keeps it with every set ('learned' [{'syn_lr'}], saved()); evaluate.py uses it. With --zca the
data is whitened as the authors' (utils.get_dataset's zca: kornia's recipe, eps 0.1, refit from the data) and the
synthetic images live in the whitened space (pictures are shown un-whitened).
"""
import hashlib
import math
import os

import torch
import torch.nn.functional as F

import trajectory as T
from trajectory import IDENTITY, buffer_folder, differs, expert_files, read_expert
from runs import Method, available_memory, condense, get_parser, positive, positive_float, resolve_dsa, run_script, setup
from utils import DiffAugment, UsageError, say

SOURCES = ('settings', 'the repository\'s argparse defaults', 'chosen here')
# The repository's argparse defaults (distill.py), for datasets and ipc without a published row.
REPO_DEFAULTS = dict(syn_steps=20, expert_epochs=3, max_start_epoch=25, lr_img=1000.0, lr_lr=1e-05, lr_teacher=0.01,
                     batch_syn=None, zca=False, Iteration=5000)
# No settings were published for the digits: chosen here (untuned), for experts of --train_epochs >= 20 (buffer.py's
# default 50): short unrolls on the small 28x28 images, the CIFAR-10 step sizes, no whitening.
DIGITS = dict(syn_steps=20, expert_epochs=2, max_start_epoch=10, lr_img=100.0, lr_lr=1e-05, lr_teacher=0.01,
              batch_syn=None, zca=False, Iteration=5000)


class MTT(Method):
    stateful = True  # the learned step size and its optimiser: checkpoints keep them

    @staticmethod
    def defaults(dataset, ipc):
        """The authors' settings for a dataset and ipc (trajectory.AUTHORS_SETTINGS; the nearest published ipc at or
        below, else the smallest), the repository's defaults for other datasets; MNIST and Fashion-MNIST: chosen here
        (DIGITS). Also Iteration, lr_img and init (for CL_DM.py)."""
        key = 'Tiny' if dataset == 'TinyImageNet' else dataset
        rows = {ipc_: row for (d, ipc_), row in T.AUTHORS_SETTINGS.items() if d == key}
        if rows:
            row = rows[max([k for k in rows if k <= ipc], default=min(rows))]
            row = {k: v for k, v in row.items() if k != 'source'}
        else:
            row = dict(DIGITS if dataset in ('MNIST', 'FashionMNIST') else REPO_DEFAULTS)
        return dict(row, lr_img=float(row['lr_img']), init='real')

    def __init__(self, args, data):
        super().__init__(args, data)
        with torch.random.fork_rng(devices=[]):  # (building a network draws weights: not the run's streams)
            self.net = self.network().train()
        self.experts, self.buffer = load_experts(args, data, self.net)
        self.unroll_memory = check_memory(args, data, self.net)

    @property
    def eval_interval(self):
        return self.args.eval_it

    def start(self, real):
        args = self.args
        self.syn_lr = torch.tensor(float(args.lr_teacher), device=args.device).requires_grad_(True)
        self.optimizer_lr = torch.optim.SGD([self.syn_lr], lr=args.lr_lr, momentum=0.5)
        self.negative = 0  # iterations that ended with a negative step size

    def iteration(self, it, syn, real):
        args = self.args
        traj = self.experts[int(torch.randint(len(self.experts), ()))]
        start = int(torch.randint(args.max_start_epoch, ()))
        w0, w_target = traj[start].to(args.device), traj[start + args.expert_epochs].to(args.device)
        gen = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))  # the unroll's draws (chunks, DSA)
        augment = (lambda x, g: DiffAugment(x, args.dsa_strategy, generator=g)) if args.dsa else None
        syn.optimizer.zero_grad(set_to_none=True)
        self.optimizer_lr.zero_grad(set_to_none=True)
        if args.constant_memory:
            loss, g_img, g_lr = T.tesla_grads(self.net, w0, w_target, syn.images, syn.labels, self.syn_lr,
                                              args.syn_steps, args.batch_syn, augment, gen)
            syn.images.grad, self.syn_lr.grad = g_img, g_lr
        else:
            loss = T.mtt_loss(self.net, w0, w_target, syn.images, syn.labels, self.syn_lr, args.syn_steps,
                              args.batch_syn, augment, gen)
            loss.backward()
        syn.optimizer.step()
        self.optimizer_lr.step()
        lr = self.syn_lr.item()
        if lr < 0:  # the authors' code goes on with it (the student then climbs its loss): so do we, and say so
            if not self.negative:
                say(f'note: the learned step size became negative ({lr:.3g}) at iteration {it}; kept, as the authors do')
            self.negative += 1
        return dict(loss=loss.item(), syn_lr=lr, negative_lr=float(lr < 0))

    def evaluation(self):
        """The learned step size as the evaluation's learning rate (the authors' code would stop at a negative one:
        then --lr_teacher, with a warning)."""
        lr = self.syn_lr.item()
        if lr > 0:
            return dict(lr_net=lr)
        say(f'warning: the learned step size is {lr:.3g}, not a learning rate: this evaluation trains with '
            f'--lr_teacher {self.args.lr_teacher} instead (the authors\' code would stop here)')
        return dict(lr_net=self.args.lr_teacher)

    def saved(self, syn):
        return dict(syn_lr=self.syn_lr.item(), negative_lr_iterations=self.negative)

    def record(self):
        return dict(self.buffer, zca_eps=0.1 if self.args.zca else None, unroll_bytes=self.unroll_memory)

    def identity(self):
        return dict(buffer_id=self.buffer['buffer_id'])

    def state_dict(self):
        return dict(syn_lr=self.syn_lr.detach().cpu(), optimizer_lr=self.optimizer_lr.state_dict(), negative=self.negative)

    def load_state_dict(self, state):
        with torch.no_grad():
            self.syn_lr.copy_(state['syn_lr'])
        self.optimizer_lr.load_state_dict(state['optimizer_lr'])
        self.negative = state['negative']


# ----------------------------------------------------------------------------------------------------
# The buffer, and what the unroll needs
# ----------------------------------------------------------------------------------------------------

def load_experts(args, data, net):
    """The experts of --buffer_path/<dataset>/<model>[_zca]: our expert files (their record must match this data,
    model and whitening) or the authors' replay_buffer_<n>.pt; only the snapshots an iteration can use are kept
    (epochs 0 .. max_start_epoch - 1 + expert_epochs). Returns ([tensor [E, P]], what to record of the buffer)."""
    folder = buffer_folder(args.buffer_path, args.dataset, args.model, args.zca)
    keep = args.max_start_epoch - 1 + args.expert_epochs  # (the last target: start max_start_epoch - 1, as the authors draw it)
    ours = expert_files(folder)
    theirs = sorted((f for f in os.listdir(folder) if f.startswith('replay_buffer_') and f.endswith('.pt')),
                    key=lambda f: (len(f), f)) if os.path.isdir(folder) else []
    if not ours and not theirs:
        other = buffer_folder(args.buffer_path, args.dataset, args.model, not args.zca)
        hint = (f' ({other} holds experts {"without" if args.zca else "with"} ZCA: '
                f'{"--no-zca" if args.zca else "--zca"} uses them)' if os.path.isdir(other) and os.listdir(other) else '')
        raise UsageError(f'no experts in {folder}: make them with python buffer.py --dataset {args.dataset} --model '
                         f'{args.model}{" --zca" if args.zca else ""} --buffer_path {args.buffer_path}{hint}')
    shapes = [list(p.shape) for p in net.parameters()]
    want = dict(dataset=args.dataset, data_id=data.data_id, model=args.model, zca=bool(args.zca), param_shapes=shapes)
    experts, h, epochs = [], hashlib.sha1(), None
    for i, path in ours.items():
        record, traj = read_expert(path)
        changed = differs(record, want, IDENTITY)
        if changed:
            raise UsageError(f'{path} was made for other data or settings ({changed}); make experts for this run with '
                             'buffer.py, or use another --buffer_path')
        epochs = record['train_epochs'] if epochs is None else min(epochs, record['train_epochs'])
        experts.append(traj[:keep + 1].clone())
    for f in theirs:
        try:
            loaded = T.load_authors_buffer(os.path.join(folder, f), net)
        except (ValueError, RuntimeError, OSError) as e:
            raise UsageError(f'cannot use {os.path.join(folder, f)}: {str(e).splitlines()[0][:300]}') from None
        for traj in loaded:
            epochs = len(traj) - 1 if epochs is None else min(epochs, len(traj) - 1)
            experts.append(traj[:keep + 1].clone())
    if epochs < keep:
        raise UsageError(f'--max_start_epoch {args.max_start_epoch} + --expert_epochs {args.expert_epochs} needs experts '
                         f'of at least {keep} epochs; those in {folder} have {epochs}')
    for traj in experts:
        h.update(traj.numpy().tobytes())
    say(f'{len(experts)} experts from {folder}' + (f' ({len(theirs)} file(s) of the authors\' layout: their data '
                                                    'cannot be checked)' if theirs else ''))
    return experts, dict(buffer_experts=len(experts), buffer_epochs=epochs, buffer_id=h.hexdigest()[:16])


def saved_bytes(net, flat, shape, batch, device):
    """Bytes autograd keeps for one unrolled step (forward, and its gradient with create_graph) on `batch` images."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    w = flat.to(device).clone().requires_grad_(True)
    x = torch.zeros(batch, *shape, device=device, requires_grad=True)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        g = torch.autograd.grad(F.cross_entropy(T.functional_forward(net, w, x), y), w, create_graph=True)[0]
        (w - 0.01 * g).square().sum()
    return total[0]


def check_memory(args, data, net):
    """Refuse, before any work, an unroll that cannot fit: the graph of syn_steps steps on batch_syn images each
    (with --constant_memory: one step's). The estimate: the bytes autograd keeps for one step, measured on 1 and 2
    images, extrapolated. Returns the estimate in bytes."""
    n = data.num_classes * args.ipc
    batch = min(args.batch_syn or n, n)
    flat = T.flat_params(net)
    with torch.random.fork_rng(devices=[]):
        one, two = (saved_bytes(net, flat, (data.channel, *data.im_size), b, args.device) for b in (1, 2))
    per_image, fixed = max(two - one, 0), max(2 * one - two, 0)
    image = 4 * data.channel * math.prod(data.im_size)
    step = fixed + batch * (per_image + 4 * image) + 3 * 4 * flat.numel()  # (+ DSA's intermediates, the new weights)
    need = step * (1 if args.constant_memory else args.syn_steps)
    free = available_memory(args.device)
    if free is not None and need > free:
        if args.constant_memory:
            raise UsageError(f'one step on --batch_syn {batch} images needs about {need / 2 ** 30:.1f} GiB, more than '
                             f'the {free / 2 ** 30:.1f} GiB free on {args.device}, even with --constant_memory: reduce '
                             '--batch_syn')
        raise UsageError(f'the unroll of {args.syn_steps} steps on --batch_syn {batch} images needs about '
                         f'{need / 2 ** 30:.1f} GiB, more than the {free / 2 ** 30:.1f} GiB free on {args.device}: '
                         'reduce --batch_syn (or --syn_steps), or use --constant_memory (TESLA\'s gradient, memory '
                         'independent of --syn_steps; an approximation)')
    return need


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

RULE = 'default: the authors\' setting for the dataset and ipc (trajectory.AUTHORS_SETTINGS, docs/mtt.md)'


def parser():
    p = get_parser('MTT: dataset distillation by matching training trajectories', methods=['MTT'], method='MTT', ipc=1,
                   num_exp=1, num_eval=5, eval_mode='S', Iteration=5000, lr_img=None, dsa_strategy=None, omit=('init',),
                   unused={'dis_metric': 'does not apply to MTT: it matches parameters, not gradients',
                           'batch_real': 'does not apply to MTT: the experts saw the real images (buffer.py)',
                           'lr_net': 'does not apply to MTT: its sets are evaluated with the learned step size'},
                   rules={'lr_img': RULE, 'dsa_strategy': 'default: color_crop_cutout_flip_scale_rotate, without flip '
                                                          'for MNIST and SVHN (as buffer.py)'})
    add = p.add_argument
    add('--buffer_path', type=str, default='./buffers', help='experts in <buffer_path>/<dataset>/<model>[_zca]/ (buffer.py)')
    add('--syn_steps', type=positive, default=None, help=f'the student\'s SGD steps on the synthetic set ({RULE})')
    add('--expert_epochs', type=positive, default=None, help=f'the target: the expert this many epochs later ({RULE})')
    add('--max_start_epoch', type=positive, default=None, help=f'start epochs are drawn from 0 .. N - 1 ({RULE})')
    add('--lr_lr', type=positive_float, default=None, help=f'learning rate of the step size ({RULE})')
    add('--lr_teacher', type=positive_float, default=None, help=f'the step size\'s initial value ({RULE}: 0.01)')
    add('--batch_syn', type=positive, default=None, help=f'synthetic images per student step (default: all; {RULE})')
    add('--pix_init', type=str, default='real', choices=['real', 'noise'], help='initialise the images from real ones or noise')
    add('--zca', action=__import__('argparse').BooleanOptionalAction, default=None,
        help=f'ZCA-whiten the data, as the experts were (--no-zca: not; {RULE})')
    add('--eval_it', type=positive, default=100, help='evaluate every N iterations in modes S/SS')
    add('--constant_memory', action='store_true',
        help='TESLA\'s two-pass gradient: memory independent of --syn_steps; a first-order approximation of the '
             'exact gradient (docs/mtt.md)')
    return p


def configure(args):
    """The authors' settings by dataset and ipc for the flags not given; DSA (always on); --pix_init as --init."""
    for k, v in MTT.defaults(args.dataset, args.ipc).items():
        if k in ('Iteration', 'init'):
            continue
        if getattr(args, k, None) is None and k in vars(args):
            setattr(args, k, v)
    args.init = args.pix_init
    return resolve_dsa(args, augments=True)


if __name__ == '__main__':
    run_script(lambda: condense(MTT, configure(setup(parser().parse_args()))))
