"""The science of trajectory matching, as pure functions: MTT (Cazenavette et al., CVPR 2022,
GeorgeCazenavette/mtt-distillation) and TESLA's constant-memory gradient (Cui et al., ICML 2023, justincui03/tesla).

No argparse, no args objects: plain parameters, tensors, and a torch.Generator for every random draw, so that the
scripts (buffer.py, main_MTT.py) can call these on any harness. docs/mtt.md has the notes, the measurements and
the authors' settings; AUTHORS_SETTINGS below is the same table as a dict.

What is here
  (ZCA whitening as the authors run it is utils.zca_fit, zca_apply, zca_inverse: the papers' get_dataset uses it)
  one flat parameter vector for a model ...... flat_params, unflatten, functional_forward
  the student unroll and MTT's loss .......... chunk_schedule, student_unroll, trajectory_loss, mtt_loss
  TESLA's constant-memory gradient ........... tesla_grads
  the images' and step size's update ......... make_optimizers (SGD momentum 0.5, as distill.py)
  expert trajectories (buffer.py) ............ train_expert, load_authors_buffer, to_authors_layout

The outer iteration of the authors' distill.py, written with these functions (the caller draws the expert and the
start epoch; the authors use Python's `random.shuffle` for the experts and numpy's global RNG for the start epoch):

    w0, w_target = expert[start], expert[start + expert_epochs]         # flat vectors (load_authors_buffer)
    loss = mtt_loss(net, w0, w_target, images, labels, syn_lr, syn_steps, batch_syn, augment, generator)
    opt_img.zero_grad(); opt_lr.zero_grad(); loss.backward(); opt_img.step(); opt_lr.step()

or, with TESLA's gradient (memory independent of syn_steps; an approximation, see tesla_grads):

    loss, g_img, g_lr = tesla_grads(net, w0, w_target, images, labels, syn_lr, syn_steps, batch_syn, augment, generator)
    images.grad, syn_lr.grad = g_img, g_lr; opt_img.step(); opt_lr.step()
"""
import os
import re

import torch
import torch.nn.functional as F
from torch.func import functional_call

from utils import UsageError, load_pt

FULL_STRATEGY = 'color_crop_cutout_flip_scale_rotate'  # the authors' --dsa_strategy default (buffer.py, distill.py)

# The authors' distillation settings by dataset and images per class. Model: ConvNet (depth 3) for CIFAR, ConvNetD4
# for Tiny ImageNet. lr_teacher is the *initial* synthetic step size (syn_lr starts there; it is learned).
# batch_syn None = all images in one batch (their default: num_classes * ipc). Iteration: their argparse default 5000.
# 'source' says where each row comes from; docs/mtt.md explains the sources and their disagreements.
_COMMON = dict(lr_teacher=0.01, Iteration=5000)
AUTHORS_SETTINGS = {
    ('CIFAR10', 1): dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_img=1000, lr_lr=1e-07, batch_syn=None,
                         zca=True, source='paper table / README table (image); 3rd-party repro uses lr_img=100', **_COMMON),
    ('CIFAR10', 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_img=100, lr_lr=1e-05, batch_syn=None,
                          zca=True, source='paper/README table, whose lr_img is a typo (mtt-distillation issue #31): '
                                           'the reporter is stable with 100 or 1000; 100 taken here', **_COMMON),
    ('CIFAR10', 50): dict(syn_steps=30, expert_epochs=2, max_start_epoch=40, lr_img=1000, lr_lr=1e-05, batch_syn=None,
                          zca=False, source='paper table / README table (image)', **_COMMON),
    ('CIFAR100', 1): dict(syn_steps=20, expert_epochs=3, max_start_epoch=20, lr_img=1000, lr_lr=1e-05, batch_syn=None,
                          zca=True, source="README's command (text), same as the table", **_COMMON),
    ('CIFAR100', 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=20, lr_img=1000, lr_lr=1e-05, batch_syn=None,
                           zca=False, source='paper table / README table (image)', **_COMMON),
    ('CIFAR100', 50): dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, lr_img=1000, lr_lr=1e-05, batch_syn=125,
                           zca=True, source='paper table / README table (image); TESLA README command agrees', **_COMMON),
    ('Tiny', 1): dict(syn_steps=10, expert_epochs=2, max_start_epoch=10, lr_img=10000, lr_lr=1e-04, batch_syn=None,
                      zca=False, source='paper table / README table (image)', **_COMMON),
    ('Tiny', 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=40, lr_img=10000, lr_lr=1e-04, batch_syn=200,
                       zca=False, source='paper table / README table (image)', **_COMMON),
    ('Tiny', 50): dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, lr_img=10000, lr_lr=1e-04, batch_syn=300,
                       zca=False, source='paper table (as recalled; a 3rd-party repro uses syn_steps=20)', **_COMMON),
    ('ImageNet-subset', 1): dict(syn_steps=20, expert_epochs=2, max_start_epoch=10, lr_img=1000, lr_lr=1e-06,
                                 batch_syn=None, zca=False, source="README's command (text), ConvNetD5, res 128",
                                 **_COMMON),
}
# Rows marked 'paper table / README table (image)' could not be read from a text source here: the README's
# hyper-parameter list is a picture (and so is the table in mtt-distillation issue #7); they are the paper's
# appendix table as recalled, to be checked against the paper before a run is reported (docs/mtt.md).
AUTHORS_EXPERTS = dict(train_epochs=50, num_experts=100, lr_teacher=0.01, batch_train=256, mom=0.0, l2=0.0,
                       decay=False, dsa_strategy=FULL_STRATEGY, save_interval=10)  # buffer.py's defaults / README
AUTHORS_EVAL = dict(epoch_eval_train=1000, num_eval=5, eval_it=100, batch_train=256, momentum=0.9,
                    weight_decay=0.0005, lr_net='learned syn_lr', decay_at='epochs // 2 + 1, x0.1', dsa=True)


# ----------------------------------------------------------------------------------------------------
# ZCA whitening (kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True), fitted on the whole training set)
# ----------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------
# One flat parameter vector (the authors' ReparamModule, without reparametrising the module)
# ----------------------------------------------------------------------------------------------------

def flat_params(net):
    """The model's parameters as one detached vector, in net.parameters() order (the order of the authors'
    ReparamModule and of their buffer files: named_modules pre-order, each module's own parameters)."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def unflatten(net, flat):
    """{name: view of `flat` shaped like the parameter}: what functional_call takes. Views keep the graph."""
    total = sum(p.numel() for p in net.parameters())
    if flat.numel() != total:
        raise ValueError(f'flat vector has {flat.numel()} entries, the model {total}')
    named = list(net.named_parameters())  # one split (as the authors' ReparamModule): its backward is one cat,
    parts = flat.split([p.numel() for _, p in named])  # where slices would each scatter into a zeroed full vector
    return {name: t.view_as(p) for (name, p), t in zip(named, parts)}


def functional_forward(net, flat, x):
    """net(x) with its parameters taken from the flat vector (differentiable w.r.t. flat). Buffers (BatchNorm's
    running statistics) are the module's own and are updated in train mode, as with the authors' ReparamModule."""
    return functional_call(net, unflatten(net, flat), (x,))


# ----------------------------------------------------------------------------------------------------
# The student unroll and MTT's loss (the authors' distill.py, the loop over args.syn_steps)
# ----------------------------------------------------------------------------------------------------

def chunk_schedule(n, batch_syn, generator=None):
    """The images of each step, drawn lazily as the authors do: when the list of chunks is empty, draw
    torch.randperm(n) and split it into chunks of batch_syn; each step pops the LAST chunk (list.pop()), so the
    first step uses the tail of the permutation (the smaller chunk when batch_syn does not divide n). The list
    is refilled when empty (a fresh permutation), and starts empty at every outer iteration. Lazy, so the
    permutation draws interleave with the augmentation draws of the same generator as in the authors' code
    (there both come from torch's global RNG)."""
    batch_syn = batch_syn or n
    chunks = []
    while True:
        if not chunks:
            chunks = list(torch.randperm(n, generator=generator).split(batch_syn))
        yield chunks.pop()


def _ce_grad(net, w, x, y, create_graph):
    return torch.autograd.grad(F.cross_entropy(functional_forward(net, w, x), y), w, create_graph=create_graph)[0]


def student_unroll(net, w0, images, labels, syn_lr, syn_steps, batch_syn=None, augment=None, generator=None):
    """Train the student from the flat vector w0 for syn_steps SGD steps on the synthetic set, keeping the graph:
    w_{k+1} = w_k - syn_lr * grad_w CE(net(augment(x_k); w_k), y_k), create_graph=True, x_k = images[chunk k]
    (chunk_schedule). `augment(x, generator)` is called once per step with a fresh draw (seed -1 in the authors'
    DiffAugment: every image its own transformation, not Siamese), e.g.
    lambda x, g: utils.DiffAugment(x, FULL_STRATEGY, generator=g); None: no augmentation.
    labels: class indices (or probabilities: F.cross_entropy takes both). Returns w_N, differentiable w.r.t.
    images and syn_lr. Memory grows with syn_steps (every step's graph is kept)."""
    w = w0.detach().clone().requires_grad_(True)  # the authors' student_params[0].requires_grad_(True)
    chunks = chunk_schedule(len(images), batch_syn, generator)
    for _ in range(syn_steps):
        idx = next(chunks)
        x = images[idx]
        if augment is not None:
            x = augment(x, generator)
        w = w - syn_lr * _ce_grad(net, w, x, labels[idx], create_graph=True)
    return w


def trajectory_loss(w_end, w0, w_target):
    """MTT's normalised parameter distance ||w_N - w*||^2 / ||w_0 - w*||^2, sums over all parameters. (The
    authors divide both sums by num_params before the ratio, which cancels.)"""
    return (w_end - w_target).pow(2).sum() / (w0 - w_target).pow(2).sum()


def mtt_loss(net, w0, w_target, images, labels, syn_lr, syn_steps, batch_syn=None, augment=None, generator=None):
    """One outer iteration's loss: unroll from the expert's snapshot w0 (epoch start_epoch) and compare with the
    snapshot expert_epochs later, w_target. loss.backward() gives images.grad and syn_lr.grad (exact: through the
    whole unroll)."""
    w_end = student_unroll(net, w0, images, labels, syn_lr, syn_steps, batch_syn, augment, generator)
    return trajectory_loss(w_end, w0.detach(), w_target.detach())


def make_optimizers(images, syn_lr, lr_img, lr_lr):
    """The authors' optimisers of the synthetic set: SGD with momentum 0.5 on the images (lr_img) and on the
    step size (lr_lr); no weight decay. images and syn_lr must be leaf tensors requiring grad. The authors
    evaluate with the learned step size as the networks' learning rate (args.lr_net = syn_lr.item())."""
    return (torch.optim.SGD([images], lr=lr_img, momentum=0.5), torch.optim.SGD([syn_lr], lr=lr_lr, momentum=0.5))


# ----------------------------------------------------------------------------------------------------
# TESLA's constant-memory gradient (justincui03/tesla distill.py)
# ----------------------------------------------------------------------------------------------------

def tesla_grads(net, w0, w_target, images, labels, syn_lr, syn_steps, batch_syn=None, augment=None, generator=None):
    """TESLA's gradient of MTT's loss, in two passes, memory independent of syn_steps.

    Pass 1 (no graph): run the same unroll as student_unroll (same chunks, same augmentation draws from the same
    generator), summing the step gradients G = sum_k g_k, and record per step only its indices and the
    generator's state before its augmentation. The loss is ||w0 - a G - w*||^2 / D, D = ||w0 - w*||^2 (TESLA's
    form; equal to the unroll's w_N up to rounding).
    Pass 2: replay each step k (indices, augmentation state; w_k recomputed by the same updates instead of being
    stored, so memory is one step's graph plus O(params)), and take
        dL/dx_k = -2 a / D * d/dx_k [ (w_N - w*) . g_k(x_k; w_k) ],   w_k held constant,
        dL/da  = -2 / D * (w_N - w*) . G.
    This is what TESLA's code computes (its single_term + square_term = -a (w_N - w*)). It is NOT the exact
    gradient: it drops every path through w_k, i.e. the dependence of later steps' gradients on earlier images
    (and on a) through the Hessian-vector products a * H_j (I - a H) ... ; exact when those vanish. docs/mtt.md
    has the measured difference. Returns (loss, grad_images, grad_lr), detached; the caller sets .grad and steps.
    """
    if augment is not None and generator is None:
        raise ValueError('tesla_grads replays each step\'s augmentation from the generator\'s saved state: pass one')
    a = float(syn_lr.detach()) if torch.is_tensor(syn_lr) else float(syn_lr)
    w0 = w0.detach()
    w_target = w_target.detach()
    images = images.detach()
    # pass 1
    chunks = chunk_schedule(len(images), batch_syn, generator)
    steps, w, G = [], w0.clone(), torch.zeros_like(w0)
    for _ in range(syn_steps):
        idx = next(chunks)
        state = generator.get_state() if generator is not None else None
        x = images[idx]
        if augment is not None:
            x = augment(x, generator)
        g = _ce_grad(net, w.requires_grad_(True), x, labels[idx], create_graph=False)
        steps.append((idx, state))
        G += g
        w = (w - a * g).detach()
    r = w0 - a * G - w_target  # w_N - w*
    D = (w0 - w_target).pow(2).sum()
    loss = r.pow(2).sum() / D
    grad_lr = -2 / D * r.dot(G)
    if torch.is_tensor(syn_lr):
        grad_lr = grad_lr.reshape(syn_lr.shape).to(syn_lr.dtype)
    # pass 2
    v = (-2 * a / D) * r
    grad_images = torch.zeros_like(images)
    replay = torch.Generator(device=generator.device) if generator is not None else None
    w = w0.clone()
    for idx, state in steps:
        x_leaf = images[idx].clone().requires_grad_(True)
        x = x_leaf
        if augment is not None:
            if replay is not None:
                replay.set_state(state)
            x = augment(x, replay)
        wk = w.requires_grad_(True)
        g = _ce_grad(net, wk, x, labels[idx], create_graph=True)
        grad_images.index_add_(0, idx, torch.autograd.grad(g, x_leaf, grad_outputs=v)[0])
        w = (wk - a * g).detach()
    return loss.detach(), grad_images, grad_lr


# ----------------------------------------------------------------------------------------------------
# Expert trajectories (the authors' buffer.py)
# ----------------------------------------------------------------------------------------------------

def train_expert(net, images, labels, epochs, lr=0.01, batch=256, augment=None, generator=None, on_epoch=None,
                 start_epoch=0, decay=False, momentum=0.0, weight_decay=0.0, optimizer=None):
    """Train an expert as the authors' buffer.py: plain SGD (momentum 0, weight decay 0: their --mom and --l2
    defaults), cross-entropy, batches of `batch` from a fresh permutation every epoch (their DataLoader with
    shuffle=True; the last batch may be smaller), each batch through augment(x, generator) (their DiffAugment
    with the full strategy, a fresh draw per batch; None: no augmentation). decay: their --decay (off by
    default): the learning rate x0.1 for the epochs after epoch epochs // 2 + 1.

    Returns the flat parameter snapshots: at the start (initialisation when start_epoch = 0) and after every
    epoch. on_epoch(e, snapshot, net, generator) is called after epoch e (1-based count of epochs done): to test,
    log or save a resumable state. Resuming: the net's state_dict (parameters and buffers) and
    generator.get_state() after epoch k, then train_expert(..., start_epoch=k) with the same `epochs` continues
    bit for bit (no optimiser state exists with momentum 0). momentum, weight_decay: their --mom and --l2 (one SGD
    optimiser for the whole expert, as theirs); with momentum, pass `optimizer` (an SGD over net.parameters() whose
    state the caller saves and restores) to resume bit for bit."""
    net.train()
    snapshots = [flat_params(net).cpu()]
    opt = optimizer or torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for e in range(start_epoch, epochs):
        for group in opt.param_groups:
            group['lr'] = lr * (0.1 if decay and e > epochs // 2 + 1 else 1.0)
        for idx in torch.randperm(len(images), generator=generator).split(batch):
            x = images[idx]
            if augment is not None:
                x = augment(x, generator)
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        snapshots.append(flat_params(net).cpu())
        if on_epoch is not None:
            on_epoch(e + 1, snapshots[-1], net, generator)
    return snapshots


def param_shapes(net):
    return [tuple(p.shape) for p in net.parameters()]


def load_authors_buffer(path, net=None):
    """Read the authors' replay_buffer_<n>.pt: a list (experts) of lists (epochs 0..train_epochs) of lists of
    parameter tensors (net.parameters() order). Loaded with weights_only=True (plain tensors and lists only: no
    code runs). Returns a list of tensors [epochs+1, P], one per expert. With `net`, every snapshot's shapes must
    be the model's (ValueError otherwise)."""
    raw = torch.load(path, map_location='cpu', weights_only=True)
    shapes = param_shapes(net) if net is not None else None
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f'{path}: not a list of expert trajectories')
    experts = []
    for i, traj in enumerate(raw):
        flat = []
        for e, snap in enumerate(traj):
            if not isinstance(snap, (list, tuple)) or not all(isinstance(p, torch.Tensor) for p in snap):
                raise ValueError(f'{path}: expert {i} epoch {e} is not a list of tensors')
            if shapes is not None and [tuple(p.shape) for p in snap] != shapes:
                raise ValueError(f'{path}: expert {i} epoch {e} has parameter shapes '
                                 f'{[tuple(p.shape) for p in snap]}, the model {shapes}')
            flat.append(torch.cat([p.reshape(-1) for p in snap]))
        experts.append(torch.stack(flat))
    return experts


def to_authors_layout(snapshots, net):
    """Flat snapshots of one expert (a list or a [E, P] tensor) -> the authors' layout for that expert: a list of
    lists of parameter tensors shaped like net's. A replay buffer file is a list of these (torch.save)."""
    return [[t.detach().cpu().clone() for t in unflatten(net, s).values()] for s in snapshots]


# ----------------------------------------------------------------------------------------------------
# The buffer's files (buffer.py writes them, main_MTT.py reads them)
# ----------------------------------------------------------------------------------------------------

FORMAT = 'mtt-expert-1'
# what must agree between a buffer and a run that reads it (or another run that adds experts to it)
IDENTITY = ('format', 'dataset', 'data_id', 'model', 'zca', 'seed', 'train_epochs', 'lr_teacher', 'batch_train', 'mom',
            'l2', 'decay', 'dsa_strategy', 'param_shapes')
EXPERT_FILE = re.compile(r'expert_(\d+)\.pt')


def buffer_folder(buffer_path, dataset, model, zca):
    """Where the experts of a dataset, model and whitening live (the authors' layout: <path>/<dataset>/<model>[_zca])."""
    return os.path.join(buffer_path, dataset, model + ('_zca' if zca else ''))


def expert_path(folder, i):
    return os.path.join(folder, f'expert_{i:04d}.pt')


def expert_files(folder):
    """{expert index: path} of our expert files in a folder."""
    if not os.path.isdir(folder):
        return {}
    found = {int(m.group(1)): os.path.join(folder, f) for f in os.listdir(folder) if (m := EXPERT_FILE.fullmatch(f))}
    return dict(sorted(found.items()))


def differs(theirs, ours, keys=IDENTITY):
    """What differs between two records, for a one-line message ('' when nothing does)."""
    said = ['other data' if k == 'data_id' else f'{k} {theirs.get(k)!r} there, {ours.get(k)!r} here'
            for k in keys if k in ours and theirs.get(k) != ours[k]]
    return ', '.join(said[:4] + ['...'] * (len(said) > 4))


def read_expert(path):
    """An expert file: (record, trajectory [epochs + 1, P]); a file that is not one is refused in one line."""
    obj = load_pt(path, {'record': dict, 'trajectory': torch.Tensor})
    traj = obj['trajectory']
    if obj['record'].get('format') != FORMAT or traj.dim() != 2:
        raise UsageError(f'{path} is not an expert file of buffer.py ({FORMAT})')
    return obj['record'], traj
