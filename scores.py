"""DD-Ranking's scores, the soft-label losses of DD-Ranking and DATM, and readers for MTT's and DATM's released sets.

Self-contained science for issue 40 (docs/scores.md has the formulas, their sources and the findings):

- hlr, ior, lrs, ars, mean_lrs: DD-Ranking's hard-label recovery, improvement over random, label-robust score and
  augmentation-robust score (NUS-HPC-AI-Lab/DD-Ranking, ddranking 0.2.0). Accuracies and the differences HLR and
  IOR are in percentage points, as DD-Ranking reports them. LRS and ARS put a weighted sum through
  (e^x - e^-1) / (e - e^-1); `scale` says whether x is formed from fractions (the published formula, which maps
  x in [-1, 1] to [0, 1]) or from percentage points (what DD-Ranking's released code does).
- soft_cross_entropy, kl_divergence: the soft-label losses of ddranking/loss/sce.py and kl.py (DATM's
  SoftCrossEntropy is the first at temperature 1).
- read_released: a set saved in MTT's or DATM's layout (images_best.pt, labels_best.pt, lr_best.pt), loaded
  without running pickled code.
"""
import math
import os
import re

import torch
import torch.nn.functional as F

from utils import UsageError, load_pt

__all__ = ['DEFAULT_WEIGHT', 'hlr', 'ior', 'lrs', 'ars', 'lrs_both', 'ars_both', 'mean_lrs', 'soft_cross_entropy',
           'kl_divergence', 'SOFT_LOSSES', 'SoftLabels', 'teacher_logits', 'read_released', 'released_layout']

DEFAULT_WEIGHT = 0.5  # DD-Ranking's default lrs_lambda and ars_lambda ("w = 0.5 on the leaderboard")
SCALES = ('fraction', 'percent')


# ----------------------------------------------------------------------------------------------------------------
# Scores

def _finite(name, value):
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f'{name} must be a finite number, not {value}')
    return value


def hlr(real_acc, hard_acc):
    """Hard-label recovery: the accuracy of models trained on the whole real training set minus that of models
    trained on the set with hard labels (both in percent, under the same model and test set). Lower is better;
    0 means the set recovers the real data's accuracy."""
    return _finite('real_acc', real_acc) - _finite('hard_acc', hard_acc)


def ior(set_acc, random_acc):
    """Improvement over random: the set's accuracy minus that of random real images of the same size per class,
    both under the same protocol (same labels rule, loss, augmentation, epochs), in percent. Higher is better."""
    return _finite('set_acc', set_acc) - _finite('random_acc', random_acc)


def _weight(weight):
    weight = _finite('weight', weight)
    if not 0 <= weight <= 1:
        raise ValueError(f'the weight must be in [0, 1], not {weight}')
    return weight


def _normalised_exp(x, scale):
    """(e^x - e^-1) / (e - e^-1), with x (given in percentage points) divided by 100 first when scale='fraction'."""
    if scale not in SCALES:
        raise ValueError(f'scale must be one of {", ".join(SCALES)}, not {scale!r}')
    if scale == 'fraction':
        x = x / 100
    return (math.exp(x) - math.exp(-1)) / (math.exp(1) - math.exp(-1))


def lrs(hlr, ior, weight=DEFAULT_WEIGHT, scale='fraction'):
    """Label-robust score: alpha = weight * IOR - (1 - weight) * HLR, LRS = (e^alpha - e^-1) / (e - e^-1).

    `hlr` and `ior` are in percentage points. scale='fraction' forms alpha from fractions (HLR/100, IOR/100), as the
    formula is published (README and paper: alpha in [-1, 1] maps LRS to [0, 1]); the result is then a fraction
    (the leaderboard prints it times 100). scale='percent' forms alpha from the percentage points themselves, as
    DD-Ranking's released code does (ddranking/metrics/hard_label.py and soft_label.py, compute_metrics: the
    accuracies come from validate(), which returns percent); the result is then not bounded by 1."""
    w = _weight(weight)
    alpha = w * _finite('ior', ior) - (1 - w) * _finite('hlr', hlr)
    return _normalised_exp(alpha, scale)


def ars(set_aug_acc, random_aug_acc, set_noaug_acc, random_noaug_acc, weight=DEFAULT_WEIGHT, scale='fraction'):
    """Augmentation-robust score: with the set and random real images of its size each evaluated with and without
    the augmentation (the same labels rule throughout), beta = weight * (set_aug - random_aug)
    + (1 - weight) * (set_noaug - random_noaug), ARS = (e^beta - e^-1) / (e - e^-1). Accuracies in percent;
    `scale` as in lrs (the released code, ddranking/metrics/aug_robust.py, uses percent)."""
    with_aug = ior(set_aug_acc, random_aug_acc)
    without_aug = ior(set_noaug_acc, random_noaug_acc)
    w = _weight(weight)
    beta = w * with_aug + (1 - w) * without_aug
    return _normalised_exp(beta, scale)


def lrs_both(hlr, ior, weight=DEFAULT_WEIGHT):
    """{'fraction': lrs(...), 'percent': lrs(...)}: both readings, for a report that shows where they differ."""
    return {scale: lrs(hlr, ior, weight, scale) for scale in SCALES}


def ars_both(set_aug_acc, random_aug_acc, set_noaug_acc, random_noaug_acc, weight=DEFAULT_WEIGHT):
    """{'fraction': ars(...), 'percent': ars(...)}."""
    return {scale: ars(set_aug_acc, random_aug_acc, set_noaug_acc, random_noaug_acc, weight, scale)
            for scale in SCALES}


def mean_lrs(hlrs, iors, weight=DEFAULT_WEIGHT, scale='fraction'):
    """DD-Ranking's aggregation over evaluation rounds: one (HLR, IOR) pair per round, the LRS of each round, and
    the mean and (population, numpy's default) std of those LRS, as compute_metrics does. This is not the LRS of
    the mean HLR and IOR (the exponential is convex). Returns (mean, std)."""
    hlrs, iors = list(hlrs), list(iors)
    if not hlrs or len(hlrs) != len(iors):
        raise ValueError(f'need as many HLR as IOR values, at least one (got {len(hlrs)} and {len(iors)})')
    values = [lrs(h, i, weight, scale) for h, i in zip(hlrs, iors)]
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


# ----------------------------------------------------------------------------------------------------------------
# Soft-label losses

def _check_pair(logits, target):
    if logits.dim() != 2 or target.shape != logits.shape:
        raise ValueError(f'logits and targets must both be [N, C], got {tuple(logits.shape)} and {tuple(target.shape)}')


def _temperature(temperature):
    temperature = _finite('temperature', temperature)
    if temperature <= 0:
        raise ValueError(f'the temperature must be positive, not {temperature}')
    return temperature


def soft_cross_entropy(logits, target, temperature, target_kind='logits', scale_loss=False):
    """Soft cross-entropy at a temperature T: sum over the batch of -log_softmax(logits / T) . q, divided by the
    batch size, where q = softmax(target / T) for target_kind='logits' (DD-Ranking's SoftCrossEntropyLoss, and
    DATM's SoftCrossEntropy with T = 1), or q = the given probabilities sharpened or flattened by T
    (softmax(log p / T); at T = 1 simply p) for target_kind='probs'. scale_loss multiplies by T^2 (DD-Ranking's
    option, off by default there). The target is not detached, as in both sources: DATM learns its labels
    through this loss."""
    temperature = _temperature(temperature)
    _check_pair(logits, target)
    if target_kind == 'logits':
        q = F.softmax(target / temperature, dim=1)
    elif target_kind == 'probs':
        if (target < 0).any() or not torch.allclose(target.sum(1), torch.ones_like(target[:, 0]), atol=1e-4):
            raise ValueError('probabilities must be non-negative and sum to 1 over each row')
        q = target if temperature == 1 else F.softmax(torch.log(target) / temperature, dim=1)
    else:
        raise ValueError(f"target_kind must be 'logits' or 'probs', not {target_kind!r}")
    loss = torch.sum(-F.log_softmax(logits / temperature, dim=1) * q) / logits.shape[0]
    return loss * temperature ** 2 if scale_loss else loss


def kl_divergence(logits, teacher_logits, temperature, scale_loss=False):
    """KL(teacher || student) at a temperature T, as DD-Ranking's KLDivergenceLoss: F.kl_div of the student's
    log_softmax(logits / T) against the teacher's softmax(teacher_logits / T) (computed without gradient),
    reduction 'batchmean' (the sum divided by the batch size), times T^2 only if scale_loss (off by default there).
    It differs from soft_cross_entropy at the same T by the teacher's entropy, a constant for the student."""
    temperature = _temperature(temperature)
    _check_pair(logits, teacher_logits)
    with torch.no_grad():
        q = F.softmax(teacher_logits / temperature, dim=1)
    loss = F.kl_div(F.log_softmax(logits / temperature, dim=1), q, reduction='batchmean')
    return loss * temperature ** 2 if scale_loss else loss


SOFT_LOSSES = {'kl': kl_divergence, 'sce': soft_cross_entropy}


class SoftLabels:
    """The training loss of evaluation models on soft labels (utils.train_and_test's train_criterion): KL or soft
    cross-entropy (SOFT_LOSSES) at a temperature against target logits, either those that travel with each batch
    (labels that come with the set, or a teacher's computed once) or, with a `teacher`, the teacher's logits of
    every augmented batch (relabel, which utils.run_epoch calls after augmenting)."""

    def __init__(self, loss='kl', temperature=1.0, teacher=None):
        if loss not in SOFT_LOSSES:
            raise ValueError(f'the soft-label loss must be one of {", ".join(SOFT_LOSSES)}, not {loss!r}')
        self.loss, self.temperature, self.teacher = SOFT_LOSSES[loss], _temperature(temperature), teacher

    def relabel(self, images, labels):
        if self.teacher is None:
            return labels
        with torch.no_grad():
            return self.teacher(images).float()

    def __call__(self, logits, target):
        return self.loss(logits.float(), target, self.temperature)


@torch.no_grad()
def teacher_logits(teacher, images, chunk=256):
    """The teacher's logits of `images` (no augmentation), computed once: soft labels [N, classes]."""
    return torch.cat([teacher(x).float() for x in images.split(chunk)])


# ----------------------------------------------------------------------------------------------------------------
# Released sets: MTT's and DATM's layouts

_IMAGES = re.compile(r'^images_(best|\d+)\.pt$')


def _find_images(folder, which):
    """The images file in `folder` (or in its Normal/ subfolder, DATM's layout) for `which` ('best', an
    iteration, or None: best if there, else the latest iteration)."""
    for place in (folder, os.path.join(folder, 'Normal')):
        if not os.path.isdir(place):
            continue
        tags = [m.group(1) for m in map(_IMAGES.match, sorted(os.listdir(place))) if m]
        if not tags:
            continue
        if which is None:
            which = 'best' if 'best' in tags else max(int(t) for t in tags if t != 'best')
        if str(which) not in tags:
            raise UsageError(f'{place} has no images_{which}.pt (it has {", ".join(f"images_{t}.pt" for t in tags)})')
        return os.path.join(place, f'images_{which}.pt')
    raise UsageError(f'{folder} holds no images_best.pt or images_<iteration>.pt (MTT and DATM layouts), '
                     f'nor a Normal/ folder with them')


def _tensor(path, what):
    obj = load_pt(path)
    if not isinstance(obj, torch.Tensor):
        raise UsageError(f'{path} must hold a tensor of {what}, not a {type(obj).__name__}')
    return obj.detach()


def released_layout(path):
    """Whether `path` is a set in MTT's or DATM's layout: an images_<best|it>.pt file, or a folder holding them
    (or a Normal/ folder with them)."""
    if os.path.isfile(path):
        return bool(_IMAGES.match(os.path.basename(path)))
    return any(os.path.isdir(p) and any(map(_IMAGES.match, os.listdir(p))) for p in (path, os.path.join(path, 'Normal')))


def read_released(path, which=None):
    """(images, labels, lr) from a set released in MTT's or DATM's layout, loaded with weights_only.

    `path` is a run folder or an images file. A folder holds images_best.pt, labels_best.pt and (DATM only)
    lr_best.pt, or the same per iteration (images_<it>.pt, ...); DATM writes them into a Normal/ subfolder, which
    is looked into too. `which` picks 'best' or an iteration; by default best, else the latest iteration. An
    images file is read with the labels_ and lr_ files of the same tag beside it. MTT's images_zca_<it>.pt are
    display copies (ZCA undone) and are never read: with --zca the images files are ZCA-whitened and must be
    evaluated with the same whitening.

    Returns float images [N, C, H, W]; labels either hard (int64 [N], MTT) or soft (float [N, C], DATM's learned
    per-image logits, returned as saved: logits, not probabilities); lr a float (DATM's learned step size) or None
    (MTT saves none). Bad input raises a one-line UsageError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f'{path} does not exist')
    if os.path.isdir(path):
        images_path = _find_images(path, which)
    else:
        if which is not None:
            raise UsageError(f'give `which` only with a folder ({path} is a file)')
        images_path = path
    folder, name = os.path.split(images_path)
    match = _IMAGES.match(name)
    if not match:
        raise UsageError(f'{images_path}: expected a file named images_best.pt or images_<iteration>.pt')
    tag = match.group(1)
    images = _tensor(images_path, 'images')
    if images.dim() != 4 or not images.is_floating_point() or images.shape[0] == 0:
        raise UsageError(f'{images_path} must hold float images [N, C, H, W], not {images.dtype} {tuple(images.shape)}')
    if not torch.isfinite(images).all():
        raise UsageError(f'{images_path} holds non-finite pixels')
    n = images.shape[0]

    labels_path = os.path.join(folder, f'labels_{tag}.pt')
    if not os.path.exists(labels_path):
        raise UsageError(f'{images_path} has no labels_{tag}.pt beside it')
    labels = _tensor(labels_path, 'labels')
    if labels.dim() == 1 and not labels.is_floating_point() and labels.dtype != torch.bool:
        labels = labels.long()
        if labels.shape[0] != n or (labels < 0).any():
            raise UsageError(f'{labels_path} must hold {n} class indices >= 0 (one per image), '
                             f'not {tuple(labels.shape)} with minimum {int(labels.min()) if len(labels) else "-"}')
    elif labels.dim() == 2 and labels.is_floating_point():
        if labels.shape[0] != n or labels.shape[1] < 2:
            raise UsageError(f'{labels_path} must hold soft labels [{n}, classes], not {tuple(labels.shape)}')
        if not torch.isfinite(labels).all():
            raise UsageError(f'{labels_path} holds non-finite soft labels')
        labels = labels.float()
    else:
        raise UsageError(f'{labels_path} must hold hard labels (integers [N]) or soft labels (floats [N, C]), '
                         f'not {labels.dtype} {tuple(labels.shape)}')

    lr = None
    lr_path = os.path.join(folder, f'lr_{tag}.pt')
    if os.path.exists(lr_path):
        value = load_pt(lr_path)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or not value.is_floating_point():
                raise UsageError(f'{lr_path} must hold one learning rate, not {value.dtype} {tuple(value.shape)}')
            value = value.item()
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise UsageError(f'{lr_path} must hold one positive finite learning rate, not {value!r}')
        lr = float(value)
    return images.float(), labels, lr
