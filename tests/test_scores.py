"""scores.py: DD-Ranking's HLR, IOR, LRS and ARS; the soft-label losses of DD-Ranking and DATM; MTT's and DATM's
released layouts. Sources: NUS-HPC-AI-Lab/DD-Ranking at b8b09664 (= the released wheel ddranking 0.2.0),
NUS-HPC-AI-Lab/DATM and GeorgeCazenavette/mtt-distillation (docs/scores.md)."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scores
from utils import UsageError


# ---------------------------------------------------------------------------------------------------------------
# Scores

def released_lrs(hlr, ior, lrs_lambda=0.5):
    """Transcription of DD-Ranking's compute_metrics (ddranking/metrics/soft_label.py lines 561-564 and
    hard_label.py lines 380-383 at b8b09664 and in the 0.2.0 wheel): hlr and ior are differences of validate()'s
    accuracies, which are percentages (utils/meter.py accuracy: correct_k * (100.0 / batch_size))."""
    alpha = lrs_lambda * ior - (1 - lrs_lambda) * hlr
    return (np.exp(alpha) - np.exp(-1)) / (np.exp(1) - np.exp(-1))


def released_ars(with_aug_score, without_aug_score, ars_lambda=0.5):
    """Transcription of ddranking/metrics/aug_robust.py lines 577-580 (b8b09664, 0.2.0 wheel)."""
    beta = ars_lambda * with_aug_score + (1 - ars_lambda) * without_aug_score
    return (np.exp(beta) - np.exp(-1)) / (np.exp(1) - np.exp(-1))


def test_hlr_and_ior_are_differences_in_points():
    assert scores.hlr(84.5, 48.9) == pytest.approx(35.6)
    assert scores.ior(48.9, 32.8) == pytest.approx(16.1)
    with pytest.raises(ValueError):
        scores.hlr(float('nan'), 10)


@pytest.mark.parametrize('hlr, ior', [(0, 0), (35.6, 16.1), (60.2, -3.5), (10, 40), (0.4, 0.2)])
@pytest.mark.parametrize('weight', [0.5, 0.0, 1.0, 0.3])
def test_percent_scale_is_the_released_code(hlr, ior, weight):
    assert scores.lrs(hlr, ior, weight, scale='percent') == pytest.approx(released_lrs(hlr, ior, weight), rel=1e-12)


@pytest.mark.parametrize('hlr, ior', [(0, 0), (35.6, 16.1), (60.2, -3.5), (10, 40)])
def test_fraction_scale_is_the_published_formula_on_fractions(hlr, ior):
    assert scores.lrs(hlr, ior) == pytest.approx(released_lrs(hlr / 100, ior / 100), rel=1e-12)
    assert 0 <= scores.lrs(hlr, ior) <= 1  # alpha in [-1, 1] for points in [-100, 100] at w = 0.5


def test_the_two_scales_agree_only_at_alpha_zero():
    both = scores.lrs_both(0, 0)
    assert both['fraction'] == both['percent'] == pytest.approx((1 - math.exp(-1)) / (math.exp(1) - math.exp(-1)))
    both = scores.lrs_both(35.6, 16.1)  # alpha = -9.75 points: percent saturates at its floor, fraction does not
    assert both['percent'] == pytest.approx(-math.exp(-1) / (math.exp(1) - math.exp(-1)), abs=1e-4)  # < 0
    assert both['fraction'] == pytest.approx(released_lrs(0.356, 0.161))
    assert scores.lrs_both(0, 30)['percent'] > 1e5  # e^15: unbounded
    assert scores.lrs(35.6, 16.1) < scores.lrs(30.0, 16.1)  # both rank the same way (monotone in alpha)


def test_weights():
    assert scores.DEFAULT_WEIGHT == 0.5
    assert scores.lrs(99, 20, weight=1.0) == scores.lrs(0, 20, weight=1.0)  # only IOR counts
    assert scores.lrs(20, 99, weight=0.0) == scores.lrs(20, 0, weight=0.0)  # only HLR counts
    with pytest.raises(ValueError):
        scores.lrs(1, 1, weight=1.5)
    with pytest.raises(ValueError):
        scores.lrs(1, 1, scale='percentage')


def test_ars_is_the_released_code_in_percent_and_the_formula_in_fractions():
    acc = dict(set_aug_acc=61.0, random_aug_acc=55.5, set_noaug_acc=50.2, random_noaug_acc=47.0)
    assert scores.ars(**acc, scale='percent') == pytest.approx(released_ars(5.5, 3.2))
    assert scores.ars(**acc) == pytest.approx(released_ars(0.055, 0.032))
    assert scores.ars(**acc, weight=0.2) == pytest.approx(released_ars(0.055, 0.032, 0.2))
    assert scores.ars_both(**acc)['percent'] == scores.ars(**acc, scale='percent')


def test_mean_lrs_averages_the_rounds_scores_as_compute_metrics_does():
    hlrs, iors = [30.0, 34.0, 38.0], [12.0, 16.0, 20.0]
    per_round = [released_lrs(h / 100, i / 100) for h, i in zip(hlrs, iors)]
    mean, std = scores.mean_lrs(hlrs, iors)
    assert mean == pytest.approx(np.mean(per_round)) and std == pytest.approx(np.std(per_round))
    # in percent the exponential is far from linear: the mean of the rounds' LRS is not the LRS of the means
    mean_p, _ = scores.mean_lrs([0, 0], [0, 40], scale='percent')
    assert mean_p != pytest.approx(scores.lrs(0, 20, scale='percent'))
    with pytest.raises(ValueError):
        scores.mean_lrs([1], [1, 2])


# DD-Ranking's public leaderboard (huggingface.co/spaces/logits/DD-Ranking, its data.csv) could not be read from
# this machine: the search tools store only that Space's file listing and constants.py, and the paper's tables
# (arxiv.org/html/2505.13300v1) only from the page's beginning; the repository (all branches) holds no results.
# A row is (method, dataset, ipc, HLR, IOR, LRS as printed, source URL). Add rows here to check them: the test
# reports which reading (fraction x 100, fraction, percent) reproduces each printed LRS.
LEADERBOARD_ROWS = []


@pytest.mark.skipif(not LEADERBOARD_ROWS, reason='no DD-Ranking leaderboard rows available offline (see the comment)')
@pytest.mark.parametrize('row', LEADERBOARD_ROWS or [None])
def test_leaderboard_rows(row):
    method, dataset, ipc, hlr, ior, printed, source = row
    readings = {'fraction x 100': 100 * scores.lrs(hlr, ior), 'fraction': scores.lrs(hlr, ior),
                'percent': scores.lrs(hlr, ior, scale='percent')}
    decimals = len(str(printed).partition('.')[2])
    assert any(round(v, decimals) == printed for v in readings.values()), (method, dataset, ipc, source, readings)


# ---------------------------------------------------------------------------------------------------------------
# Soft-label losses

def ddranking_sce(stu, tea, temperature, scale_loss=False):
    """Transcription of ddranking/loss/sce.py SoftCrossEntropyLoss.forward, lines 12-19 (b8b09664, 0.2.0 wheel).
    DATM's SoftCrossEntropy (distill/DATM.py lines 255-260, distill/evaluation.py) is this at temperature 1."""
    input_log_likelihood = -F.log_softmax(stu / temperature, dim=1)
    target_log_likelihood = F.softmax(tea / temperature, dim=1)
    loss = torch.sum(torch.mul(input_log_likelihood, target_log_likelihood)) / stu.size(0)
    return loss * temperature ** 2 if scale_loss else loss


def ddranking_kl(stu, tea, temperature, scale_loss=False):
    """Transcription of ddranking/loss/kl.py KLDivergenceLoss.forward, lines 12-19 (b8b09664, 0.2.0 wheel)."""
    stu_probs = F.log_softmax(stu / temperature, dim=1)
    with torch.no_grad():
        tea_probs = F.softmax(tea / temperature, dim=1)
    loss = F.kl_div(stu_probs, tea_probs, reduction='batchmean')
    return loss * temperature ** 2 if scale_loss else loss


STUDENT = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, -3.0], [-1.0, 4.0, 0.0, 1.5]])
TEACHER = torch.tensor([[3.0, 0.0, 1.0, -2.0], [0.0, 0.0, 2.0, 0.0], [-2.0, 5.0, -1.0, 0.5]])


@pytest.mark.parametrize('temperature', [1.0, 1.2, 4.0, 30.0])
@pytest.mark.parametrize('scale_loss', [False, True])
def test_losses_match_ddranking_transcriptions(temperature, scale_loss):
    got = scores.soft_cross_entropy(STUDENT, TEACHER, temperature, scale_loss=scale_loss)
    assert got.item() == pytest.approx(ddranking_sce(STUDENT, TEACHER, temperature, scale_loss).item(), rel=1e-6)
    got = scores.kl_divergence(STUDENT, TEACHER, temperature, scale_loss=scale_loss)
    assert got.item() == pytest.approx(ddranking_kl(STUDENT, TEACHER, temperature, scale_loss).item(), rel=1e-6)


def test_losses_by_hand():
    """One row worked out without torch.nn.functional: the definitions, not just the same code twice."""
    s, t, T = [1.0, 0.0], [0.0, 1.0], 2.0
    q = [math.exp(x / T) / sum(math.exp(y / T) for y in t) for x in t]
    log_p = [x / T - math.log(sum(math.exp(y / T) for y in s)) for x in s]
    sce = -sum(qi * lp for qi, lp in zip(q, log_p))
    kl = sum(qi * (math.log(qi) - lp) for qi, lp in zip(q, log_p))
    s_, t_ = torch.tensor([s]), torch.tensor([t])
    assert scores.soft_cross_entropy(s_, t_, T).item() == pytest.approx(sce, rel=1e-6)
    assert scores.kl_divergence(s_, t_, T).item() == pytest.approx(kl, rel=1e-6)
    assert scores.kl_divergence(s_, t_, T, scale_loss=True).item() == pytest.approx(kl * T * T, rel=1e-6)


def test_probabilities_as_targets():
    probs = F.softmax(TEACHER, dim=1)
    for temperature in (1.0, 2.5):  # softmax(log softmax(z) / T) = softmax(z / T)
        assert scores.soft_cross_entropy(STUDENT, probs, temperature, target_kind='probs').item() == pytest.approx(
            scores.soft_cross_entropy(STUDENT, TEACHER, temperature).item(), rel=1e-5)
    one_hot = F.one_hot(torch.tensor([0, 2, 1]), 4).float()  # hard labels as probabilities: plain cross-entropy
    assert scores.soft_cross_entropy(STUDENT, one_hot, 1.0, target_kind='probs').item() == pytest.approx(
        F.cross_entropy(STUDENT, torch.tensor([0, 2, 1])).item(), rel=1e-6)
    with pytest.raises(ValueError):
        scores.soft_cross_entropy(STUDENT, TEACHER, 1.0, target_kind='probs')  # logits are not probabilities


def test_kl_is_sce_minus_the_teachers_entropy_and_gradients():
    T = 1.5
    q = F.softmax(TEACHER / T, dim=1)
    entropy = -(q * q.log()).sum() / len(q)
    assert (scores.soft_cross_entropy(STUDENT, TEACHER, T) - scores.kl_divergence(STUDENT, TEACHER, T)).item() \
        == pytest.approx(entropy.item(), rel=1e-5)
    labels = TEACHER.clone().requires_grad_(True)  # DATM learns its labels through the soft cross-entropy
    scores.soft_cross_entropy(STUDENT, labels, 1.0).backward()
    assert labels.grad is not None and labels.grad.abs().sum() > 0
    teacher = TEACHER.clone().requires_grad_(True)  # KL detaches the teacher, as DD-Ranking does
    student = STUDENT.clone().requires_grad_(True)
    scores.kl_divergence(student, teacher, 1.0).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_loss_input_checks():
    with pytest.raises(ValueError):
        scores.kl_divergence(STUDENT, TEACHER[:, :3], 1.0)
    with pytest.raises(ValueError):
        scores.soft_cross_entropy(STUDENT, TEACHER, 0.0)


def ddranking_file(name):
    """A file of the installed ddranking package (e.g. 'loss/kl.py') loaded on its own: the package's __init__
    imports timm, pandas and scipy, which these files do not need (.ci/run installs ddranking with --no-deps)."""
    import importlib.util
    package = importlib.util.find_spec('ddranking')
    if package is None:
        pytest.skip('ddranking is not installed (pip install --no-deps ddranking)')
    spec = importlib.util.spec_from_file_location(f'ddranking_{name[:-3].replace("/", "_")}',
                                                  os.path.join(package.submodule_search_locations[0], name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddranking_oracle():
    """DD-Ranking's own loss classes, as released (ddranking 0.2.0 on PyPI)."""
    sce, kl = ddranking_file('loss/sce.py'), ddranking_file('loss/kl.py')
    for T in (1.0, 1.2, 4.0):
        for scale in (False, True):
            assert scores.soft_cross_entropy(STUDENT, TEACHER, T, scale_loss=scale).item() == pytest.approx(
                sce.SoftCrossEntropyLoss(temperature=T, scale_loss=scale)(STUDENT, TEACHER).item(), rel=1e-6)
            assert scores.kl_divergence(STUDENT, TEACHER, T, scale_loss=scale).item() == pytest.approx(
                kl.KLDivergenceLoss(temperature=T, scale_loss=scale)(STUDENT, TEACHER).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Released layouts

N, C, CLASSES = 20, 3, 10  # ipc 2, CIFAR-10-like


def images():
    return torch.randn(N, C, 8, 8)


def hard_labels():  # MTT's label_syn: [0, 0, 1, 1, ..., 9, 9], int64
    return torch.arange(CLASSES).repeat_interleave(N // CLASSES)


@pytest.fixture
def mtt_run(tmp_path):
    """MTT (distill.py): logged_files/<dataset>/<wandb run>/images_<it>.pt, labels_<it>.pt, images_best.pt,
    labels_best.pt, and with --zca the display copies images_zca_<it>.pt; no learning rate file."""
    run = tmp_path / 'logged_files' / 'CIFAR10' / 'smooth-sun-7'
    run.mkdir(parents=True)
    best = images()
    for it in (0, 1000):
        torch.save(images(), run / f'images_{it}.pt')
        torch.save(hard_labels(), run / f'labels_{it}.pt')
        torch.save(images(), run / f'images_zca_{it}.pt')
    torch.save(best, run / 'images_best.pt')
    torch.save(hard_labels(), run / 'labels_best.pt')
    return run, best


@pytest.fixture
def datm_run(tmp_path):
    """DATM (distill/DATM.py): logged_files/<dataset>/<ipc>/<model>/<wandb run>/Normal/ with images_, labels_
    (learned per-image logits [N, classes], float) and lr_ (the learned step size, a 0-d tensor) for each saved
    iteration and for best."""
    run = tmp_path / 'logged_files' / 'CIFAR10' / '2' / 'ConvNet' / 'fluent-moon-3'
    (run / 'Normal').mkdir(parents=True)
    logits = torch.randn(N, CLASSES)
    for tag in ('0', '500', 'best'):
        torch.save(images(), run / 'Normal' / f'images_{tag}.pt')
        torch.save(logits if tag == 'best' else torch.randn(N, CLASSES), run / 'Normal' / f'labels_{tag}.pt')
        torch.save(torch.tensor(0.01 if tag == 'best' else 0.02), run / 'Normal' / f'lr_{tag}.pt')
    return run, logits


def test_mtt_layout(mtt_run):
    run, best = mtt_run
    x, y, lr = scores.read_released(run)
    assert torch.equal(x, best) and torch.equal(y, hard_labels()) and y.dtype == torch.int64 and lr is None
    x, y, lr = scores.read_released(run, which=1000)
    assert torch.equal(x, torch.load(run / 'images_1000.pt'))
    x2, _, _ = scores.read_released(run / 'images_best.pt')
    assert torch.equal(x2, best)
    os.remove(run / 'images_best.pt')  # no best: the latest iteration, never an images_zca_ copy
    x, _, _ = scores.read_released(run)
    assert torch.equal(x, torch.load(run / 'images_1000.pt'))


def test_datm_layout(datm_run):
    run, logits = datm_run
    for where in (run, run / 'Normal', run / 'Normal' / 'images_best.pt'):
        x, y, lr = scores.read_released(where)
        assert x.shape == (N, C, 8, 8) and torch.equal(y, logits) and y.dtype == torch.float32
        assert lr == pytest.approx(0.01)
    _, _, lr = scores.read_released(run, which=500)
    assert lr == pytest.approx(0.02)


def test_bad_input(tmp_path, mtt_run, datm_run):
    def fails(path, match, **kw):
        with pytest.raises(UsageError, match=match) as e:
            scores.read_released(path, **kw)
        assert '\n' not in str(e.value)

    fails(tmp_path / 'nowhere', 'does not exist')
    (tmp_path / 'empty').mkdir()
    fails(tmp_path / 'empty', 'no images_best.pt')
    run, _ = mtt_run
    fails(run, 'no images_7.pt', which=7)
    fails(run / 'images_zca_0.pt', 'expected a file named')
    fails(run / 'images_best.pt', 'only with a folder', which='best')

    bad = tmp_path / 'bad'
    bad.mkdir()

    def layout(images_obj, labels_obj=None, lr_obj=None):
        for name in os.listdir(bad):
            os.remove(bad / name)
        torch.save(images_obj, bad / 'images_best.pt')
        if labels_obj is not None:
            torch.save(labels_obj, bad / 'labels_best.pt')
        if lr_obj is not None:
            torch.save(lr_obj, bad / 'lr_best.pt')

    layout(images())
    fails(bad, 'no labels_best.pt')
    layout(images(), hard_labels()[:-1])
    fails(bad, 'class indices')
    layout(images(), torch.randn(N, CLASSES, 2))
    fails(bad, 'hard labels .* or soft labels')
    layout(images(), torch.randn(N + 1, CLASSES))
    fails(bad, 'soft labels')
    layout(images().long(), hard_labels())
    fails(bad, 'float images')
    layout({'images': images()}, hard_labels())
    fails(bad, 'must hold a tensor')
    layout(images(), hard_labels(), torch.tensor([0.01, 0.02]))
    fails(bad, 'one learning rate')
    layout(images(), hard_labels(), torch.tensor(-0.01))
    fails(bad, 'positive finite')
    torch.save(torch.nn.Linear(2, 2), bad / 'images_best.pt')  # a pickled module: weights_only refuses it
    fails(bad, 'safely')
    (bad / 'images_best.pt').write_bytes(b'not a tensor file')
    fails(bad, 'torch.save')
