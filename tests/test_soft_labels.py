"""Soft labels in the evaluation: DATM's training on a set's logits, bit for bit; a teacher's labels of every
augmented batch or once; evaluate.py with MTT's and DATM's layouts, the labels rule and the teacher's card."""
import argparse
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import evaluate
import together
import utils
from helpers import assert_one_line_error, run_in_process, separable
from scores import SoftLabels, teacher_logits
from utils import ParamDiffAug, TensorDataset, evaluate_synset, get_network, tensor_loader


def args(**kw):
    a = dict(device='cpu', lr_net=0.05, epoch_eval_train=5, batch_train=8, dsa=False, dsa_strategy='none',
             dsa_param=ParamDiffAug(), dc_aug_param=None)
    a.update(kw)
    return argparse.Namespace(**a)


def datm_soft_cross_entropy(inputs, target):  # DATM's SoftCrossEntropy, transcribed
    input_log_likelihood = -F.log_softmax(inputs, dim=1)
    target_log_likelihood = F.softmax(target, dim=1)
    return torch.sum(torch.mul(input_log_likelihood, target_log_likelihood)) / inputs.shape[0]


def datm_evaluate_synset(net, images_train, labels_train, args):
    """DATM's evaluate_synset with train_criterion (its SGD path), transcribed: the papers' schedule, float labels."""
    lr, Epoch = float(args.lr_net), int(args.epoch_eval_train)
    lr_schedule = [Epoch // 2 + 1]
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    trainloader = torch.utils.data.DataLoader(TensorDataset(images_train, labels_train), batch_size=args.batch_train,
                                              shuffle=True, num_workers=0)
    for ep in range(Epoch + 1):
        net.train()
        for img, lab in trainloader:
            output = net(img.float())
            loss = datm_soft_cross_entropy(output, lab.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if ep in lr_schedule:
            lr *= 0.1
            optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)


def net_from(state):
    net = get_network('ConvNetW32', 1, 10, (12, 12), 'cpu')
    net.load_state_dict(state)
    return net


def test_training_on_a_sets_logits_is_datms_evaluate_synset_bit_for_bit():
    x, _ = separable(3, 0)
    logits = torch.randn(len(x), 10, generator=torch.Generator().manual_seed(0)) * 3
    xt, yt = separable(5, 1)
    state = copy.deepcopy(get_network('ConvNetW32', 1, 10, (12, 12), 'cpu').state_dict())
    theirs, ours = net_from(state), net_from(state)
    torch.manual_seed(1)
    datm_evaluate_synset(theirs, x, logits, args())
    torch.manual_seed(1)
    evaluate_synset(0, ours, x, logits, tensor_loader(xt, yt, 256), args(), train_criterion=SoftLabels('sce'))
    assert all(torch.equal(p, q) for p, q in zip(theirs.parameters(), ours.parameters()))


def test_a_teachers_labels_of_every_augmented_batch_teach_a_student():
    x, y = separable(20, 0)
    xt, yt = separable(20, 1)
    a = args(epoch_eval_train=30, lr_net=0.03, batch_train=256, dsa=True, dsa_strategy='crop')
    torch.manual_seed(0)
    teacher, _, acc = evaluate_synset(0, get_network('ConvNetW32', 1, 10, (12, 12), 'cpu'), x, y, tensor_loader(xt, yt, 256), a)
    teacher.eval()
    assert acc > 0.9
    seen = []
    criterion = SoftLabels('kl', 1.0, teacher)
    relabel = criterion.relabel
    criterion.relabel = lambda images, labels: (seen.append(images.clone()), relabel(images, labels))[1]
    shuffled = y[torch.randperm(len(y))]  # wrong hard labels: only the teacher's can teach
    torch.manual_seed(2)
    a = args(epoch_eval_train=60, lr_net=0.05, batch_train=256, dsa=True, dsa_strategy='crop', seed=0)
    _, _, acc = evaluate_synset(0, get_network('ConvNetW32', 1, 10, (12, 12), 'cpu'), x, shuffled, tensor_loader(xt, yt, 256),
                                a, train_criterion=criterion)
    assert acc > 0.8
    assert not torch.equal(seen[0], x[:len(seen[0])]) and all(s.shape == x.shape for s in seen)  # augmented batches
    once = teacher_logits(teacher, x)
    assert once.shape == (len(x), 10) and (once.argmax(1) == y).float().mean() > 0.9
    # the batched models (--eval_together) take the same criterion
    data = utils.DataInfo('X', 1, (12, 12), 10, tuple(map(str, range(10))), (0.0,), (1.0,), 'x')
    accs, _ = together.train_together('ConvNetW32', [(0, k) for k in range(2)], x, shuffled, tensor_loader(xt, yt, 256),
                                      a, data, SoftLabels('kl', 1.0, teacher))
    assert min(accs) > 0.8


def released(folder, soft, lr=None, n=20, seed=0):
    """A set in DATM's layout (Normal/images_best.pt, labels_best.pt, lr_best.pt) or MTT's (hard labels, no lr)."""
    g = torch.Generator().manual_seed(seed)
    place = folder / 'Normal' if soft else folder
    place.mkdir(parents=True)
    torch.save(torch.randn(n, 1, 28, 28, generator=g), place / 'images_best.pt')
    labels = torch.arange(10).repeat_interleave(n // 10)
    torch.save(torch.randn(n, 10, generator=g) + 5 * F.one_hot(labels, 10) if soft else labels, place / 'labels_best.pt')
    if lr:
        torch.save(torch.tensor(lr), place / 'lr_best.pt')
    return folder


FAST = ['--dataset', 'MNIST', '--epoch_eval_train', 2, '--num_eval', 1, '--teacher_epochs', 1]


def test_evaluate_py_reads_datm_and_mtt_layouts_and_applies_one_labels_rule(tmp_path, data, monkeypatch, capsys):
    def evaluate_in_process(*a):
        return run_in_process(monkeypatch, capsys, 'evaluate.py', *a, '--data_path', data, main=evaluate.main)

    datm = released(tmp_path / 'datm', soft=True, lr=0.02)
    calls = []
    train = utils.train_and_test
    monkeypatch.setattr(utils, 'train_and_test', lambda *a, **k: (calls.append((a[3], a[5].lr_net, a[6])), train(*a, **k))[1])
    p = evaluate_in_process(datm, *FAST, '--labels', 'set', '--baseline', 'random')
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / 'datm_eval.json').read_text())
    (set_labels, set_lr, set_loss), (base_labels, base_lr, base_loss) = calls
    logits = torch.load(datm / 'Normal' / 'labels_best.pt')
    assert torch.equal(set_labels, logits) and set_loss.teacher is None and set_loss.loss.__name__ == 'soft_cross_entropy'
    assert set_lr == base_lr == pytest.approx(0.02)  # DATM's learned rate, for the set and the baseline
    assert base_labels.dim() == 1 and base_loss.teacher is not None  # the baseline: the teacher's labels of every batch
    card = report['teacher']
    assert card['architecture'] == 'ConvNet' and card['epochs'] == 1 and 0 <= card['test_acc'] <= 1 and len(card['weights_sha256']) == 64
    assert report['results']['ConvNet']['labels'].startswith("the set's soft labels (sce")
    assert report['baseline']['results']['ConvNet']['labels'].startswith("the ConvNet teacher's soft labels (every augmented batch")
    assert report['settings']['labels'] == 'set'

    calls.clear()  # hard labels by default: the argmax of the set's logits
    assert evaluate_in_process(datm, *FAST[:-2], '--save_path', tmp_path / 'hard').returncode == 0
    assert torch.equal(calls[0][0], logits.argmax(1)) and calls[0][2] is None

    mtt = released(tmp_path / 'mtt', soft=False)  # MTT's layout: hard labels, no rate
    calls.clear()
    p = evaluate_in_process(mtt, *FAST, '--labels', 'teacher', '--teacher_labels', 'once', '--soft_loss', 'sce',
                            '--temperature', 2)
    assert p.returncode == 0, p.stderr
    labels, lr, loss = calls[0]
    assert labels.shape == (20, 10) and loss.teacher is None and loss.temperature == 2.0 and lr == 0.01
    report = json.loads((tmp_path / 'mtt_eval.json').read_text())
    assert report['teacher']['weights_sha256'] == card['weights_sha256']  # the same teacher, read back from the folder

    assert_one_line_error(evaluate_in_process(mtt, *FAST[:-2], '--labels', 'set'), 'carries no soft labels')
    assert_one_line_error(evaluate_in_process(mtt, *FAST[:-2], '--teacher', 'ConvNet'), 'is for soft labels')


def test_scores_reuse_the_runs_they_have_and_follow_dd_rankings_formulas(tmp_path, data, monkeypatch, capsys):
    from scores import ars, hlr, ior, mean_lrs
    datm = released(tmp_path / 'datm', soft=True)
    trained, models = [], []
    train, classifier = utils.train_and_test, utils.train_classifier
    monkeypatch.setattr(utils, 'train_and_test', lambda *a, **k: (models.append(a[5].dsa_strategy), train(*a, **k))[1])
    monkeypatch.setattr(utils, 'train_classifier', lambda *a, **k: (trained.append(1), classifier(*a, **k))[1])
    p = run_in_process(monkeypatch, capsys, 'evaluate.py', datm, *FAST, '--num_eval', 2, '--labels', 'teacher', '--scores',
                       '--data_path', data, main=evaluate.main)
    assert p.returncode == 0, p.stderr
    # the set and the baseline under the teacher's labels, the set under hard labels, both without augmentation:
    # 2 models each, none twice; one network on the real data serves as the teacher and as the real-data accuracy
    assert len(models) == 10 and models.count('none') == 4 and len(trained) == 1
    report = json.loads((tmp_path / 'datm_eval.json').read_text())
    block = report['scores']['blocks'][0]
    assert block['accuracy'] == 'final'
    r = block['per_model']['ConvNet']
    acc = lambda results: [100 * a for a in results['ConvNet']['accs']]
    hard, soft, rnd = acc(report['more']['synthetic, hard labels']), acc(report['results']), acc(report['baseline']['results'])
    real = 100 * report['teacher']['test_acc']
    assert r['real_acc'] == pytest.approx(real) and report['scores']['real_acc']['ConvNet']['source'].startswith('measured here')
    assert r['HLR'] == pytest.approx(sum(hlr(real, h) for h in hard) / 2)
    assert r['IOR'] == pytest.approx(sum(ior(s, b) for s, b in zip(soft, rnd)) / 2)
    hlrs, iors = [hlr(real, h) for h in hard], [ior(s, b) for s, b in zip(soft, rnd)]
    assert r['LRS']['fraction']['mean'] == pytest.approx(mean_lrs(hlrs, iors)[0])
    assert r['LRS']['percent']['mean'] == pytest.approx(mean_lrs(hlrs, iors, scale='percent')[0])
    noaug = [sum(acc(report['more'][k])) / 2 for k in ('synthetic, no augmentation', 'random, no augmentation')]
    assert r['ARS']['fraction'] == pytest.approx(ars(sum(soft) / 2, sum(rnd) / 2, *noaug))
    assert "DD-Ranking's scores (final accuracies" in p.stdout

    models.clear()  # hard labels: the set's own run is the hard-label one; a given real-data accuracy and its source
    p = run_in_process(monkeypatch, capsys, 'evaluate.py', datm, *FAST[:-2], '--scores', '--real_acc', 90, '--real_acc_source',
                       'a table', '--data_path', data, '--save_path', tmp_path / 'given', main=evaluate.main)
    assert p.returncode == 0, p.stderr
    given = json.loads((tmp_path / 'given' / 'datm_eval.json').read_text())
    assert len(models) == 4 and set(given['more']) == {'synthetic, no augmentation', 'random, no augmentation'}
    assert given['scores']['real_acc']['ConvNet'] == dict(percent=90.0, source='a table')
    r = given['scores']['blocks'][0]['per_model']['ConvNet']
    assert r['HLR'] == pytest.approx(90 - 100 * given['results']['ConvNet']['mean'])
    assert_one_line_error(run_in_process(monkeypatch, capsys, 'evaluate.py', datm, *FAST[:-2], '--scores', '--real_acc', 90,
                                         '--data_path', data, main=evaluate.main), 'say where it comes from')
