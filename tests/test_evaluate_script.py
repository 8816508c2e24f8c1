"""evaluate.py: any synthetic set (a papers'-format .pt, ours with its record, an image folder) under the
common protocol; the random baseline; determinism; one-line errors for bad input."""
import argparse
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import utils
from helpers import (assert_one_line_error, needs_fashion, patterns, run, run_in_process, stopped_at_call, write_mnist,
                     write_patterns)
from runs import Record, settings, signature
from utils import default_strategy, get_dataset

FAST = ['--epoch_eval_train', 2, '--num_eval', 1]
FASHION_FOLDERS = ['T-shirt_top', 'trouser', 'Pullover', 'dress', 'Coat', 'sandal', 'Shirt', 'sneaker', 'Bag', 'ankle boot']


def papers_file(path, n_exp=2, ipc=2, shape=(1, 28, 28), num_classes=10, accs=True):
    """A result file in the papers' format; the recorded accuracies are numpy scalars, as in theirs."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat_interleave(ipc)
    data = [[torch.randn(len(labels), *shape, generator=g), labels] for _ in range(n_exp)]
    torch.save({'data': data, 'accs_all_exps': {'ConvNet': [np.float64(0.5 + 0.1 * k) for k in range(n_exp)]} if accs else {}},
               path)
    return data


def report_of(path):
    return json.loads(open(path).read())


def write_png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


# ----------------------------------------------------------------------------------------------------
# Where the settings come from
# ----------------------------------------------------------------------------------------------------

def test_the_file_name_gives_method_dataset_and_model_even_with_underscores():
    assert evaluate.parse_name('released/res_DSA_CIFAR10_ConvNet_10ipc.pt') == \
        dict(method='DSA', dataset='CIFAR10', model='ConvNet')
    assert evaluate.parse_name('res_CAFE_DSA_FashionMNIST_ResNet18BN_AP_1ipc.pt') == \
        dict(method='CAFE_DSA', dataset='FashionMNIST', model='ResNet18BN_AP')
    assert evaluate.parse_name('res_DM_CIFAR11_ConvNet_10ipc.pt') == {}  # no known dataset in it
    assert evaluate.parse_name('syn.pt') == {} and evaluate.parse_name('res_DM_MNIST_ConvNet.pt') == {}


DIGITS_STRATEGY = default_strategy('MNIST')  # the DSA paper's strategy for MNIST: no flip


@pytest.mark.parametrize('name,flags,dsa,strategy,noaug', [
    ('res_DSA_MNIST_ConvNet_1ipc.pt', [], True, DIGITS_STRATEGY, 300),
    ('res_DM_MNIST_ConvNet_1ipc.pt', [], True, DIGITS_STRATEGY, 300),
    ('res_CAFE_DSA_MNIST_ConvNet_1ipc.pt', [], True, DIGITS_STRATEGY, 600),
    ('res_DC_MNIST_ConvNet_1ipc.pt', [], False, 'none', 300),
    ('res_CAFE_MNIST_ConvNet_1ipc.pt', [], False, 'none', 600),
    ('res_herding_MNIST_ConvNet_1ipc.pt', [], False, 'none', 300),
    ('res_MTT_MNIST_ConvNet_1ipc.pt', [], True, DIGITS_STRATEGY, 300),  # an unknown method: the default, DSA
    ('syn.pt', ['--dataset', 'MNIST'], True, DIGITS_STRATEGY, 300),  # nothing says: the default
    ('syn.pt', ['--dataset', 'MNIST', '--method', 'DC'], False, 'none', 300),
    ('res_DC_MNIST_ConvNet_1ipc.pt', ['--dsa_strategy', 'crop_flip'], True, 'crop_flip', 300),
    ('res_DM_MNIST_ConvNet_1ipc.pt', ['--dsa_strategy', 'none'], False, 'none', 300),
    ('res_DM_MNIST_ConvNet_1ipc.pt', ['--method', 'CAFE'], False, 'none', 600),  # a flag wins over the name
])
def test_the_augmentation_follows_the_method_that_made_the_set(tmp_path, name, flags, dsa, strategy, noaug):
    (tmp_path / name).write_bytes(b'')
    args = evaluate.get_parser().parse_args([str(tmp_path / name), *flags])
    evaluate.resolve(args)
    assert (args.dataset, args.dsa, args.dsa_strategy, args.epoch_eval_noaug) == ('MNIST', dsa, strategy, noaug)


def test_folder_labels_by_name_or_in_sorted_order():
    args = argparse.Namespace(input='set', dataset='X', sources={})
    names = ['T-shirt/top', 'Trouser', 'Pullover']
    assert evaluate.folder_labels(['pullover', 'T-shirt_top', 'TROUSER'], names, 3, args) == [2, 0, 1]
    assert evaluate.folder_labels(['trouser'], names, 3, args) == [1]  # some classes only: still by name
    assert evaluate.folder_labels(['b', 'c', 'a'], names, 3, args) == [1, 2, 0]
    assert evaluate.folder_labels([str(c) for c in (0, 1, 10, 2, 3, 4, 5, 6, 7, 8, 9)], [f'n{c}' for c in range(11)], 11,
                                  args) == [0, 1, 10, 2, 3, 4, 5, 6, 7, 8, 9]  # numbers in numerical order


# ----------------------------------------------------------------------------------------------------
# End to end on small fixtures
# ----------------------------------------------------------------------------------------------------

def train_losses(stdout):
    """The final training loss of every evaluation model, as evaluate_synset logs it."""
    return re.findall(r'train loss = ([0-9.]+)', stdout)


@pytest.mark.e2e
def test_a_papers_file_with_numpy_scalars_every_experiment_and_the_same_seed(tmp_path, data, monkeypatch, capsys):
    path = tmp_path / 'res_DSA_MNIST_ConvNet_2ipc.pt'
    papers_file(path)
    p = run('evaluate.py', path, *FAST, '--data_path', data)
    assert p.returncode == 0, p.stderr[-2000:]
    report = report_of(tmp_path / 'res_DSA_MNIST_ConvNet_2ipc_eval.json')
    assert report['finished'] and report['baseline'] is None
    s = report['settings']
    assert (s['dataset'], s['method'], s['model'], s['models'], s['dsa'], s['dsa_strategy']) == \
        ('MNIST', 'DSA', 'ConvNet', ['ConvNet'], True, DIGITS_STRATEGY)
    assert s['sources']['dataset'] == 'the file name'
    r = report['results']['ConvNet']
    assert r['n'] == 2 and list(r['per_exp']) == ['0', '1'] and all(len(a) == 1 for a in r['per_exp'].values())
    assert r['accs'] == r['per_exp']['0'] + r['per_exp']['1']
    assert all(float(40 * a).is_integer() for a in r['accs']), r['accs']  # tested on the 40 real test images
    assert r['mean'] == pytest.approx(np.mean(r['accs'])) and r['std'] == pytest.approx(np.std(r['accs']))
    assert (r['epochs'], r['augmentation']) == (2, 'DSA ' + DIGITS_STRATEGY)
    assert report['recorded']['ConvNet'] == pytest.approx(dict(mean=0.55, std=0.05, n=2, accs=[0.5, 0.6]))
    assert 'augmentation DSA color_crop_cutout_scale_rotate' in p.stdout  # MNIST: no flip
    assert 'ConvNet' in p.stdout.splitlines()[-3] and '(n=2)' in p.stdout and '55.00 ± 5.00 %' in p.stdout
    losses = train_losses(p.stdout)
    assert len(losses) == 2

    # the same seed gives the same models (the same accuracies, here in this process); another seed other
    # models; one experiment alone gets that experiment's accuracies
    p = run_in_process(monkeypatch, capsys, 'evaluate.py', path, *FAST, '--data_path', data, '--save_path', tmp_path / 'again',
                       main=evaluate.main)
    assert p.returncode == 0, p.stderr[-2000:]
    assert report_of(tmp_path / 'again' / 'res_DSA_MNIST_ConvNet_2ipc_eval.json')['results'] == report['results']
    assert train_losses(p.stdout) == losses
    p = run_in_process(monkeypatch, capsys, 'evaluate.py', path, *FAST, '--data_path', data, '--save_path', tmp_path / 'one',
                       '--exp', 1, '--seed', 1, main=evaluate.main)
    assert p.returncode == 0, p.stderr[-2000:]
    assert train_losses(p.stdout)[0] != losses[1]
    p = run_in_process(monkeypatch, capsys, 'evaluate.py', path, *FAST, '--data_path', data, '--save_path', tmp_path / 'one',
                       '--exp', 1, main=evaluate.main)
    assert p.returncode == 0, p.stderr[-2000:]
    one = report_of(tmp_path / 'one' / 'res_DSA_MNIST_ConvNet_2ipc_eval.json')['results']['ConvNet']
    assert one['per_exp'] == {'1': r['per_exp']['1']} and one['n'] == 1 and train_losses(p.stdout) == losses[1:]


@pytest.mark.e2e
def test_our_result_file_takes_its_settings_from_the_record_beside_it(tmp_path, data):
    """A record as runs.Record writes it; the file name (renamed) says nothing."""
    made = argparse.Namespace(method='DM', dataset='MNIST', model='ConvNetD1', ipc=2, num_exp=1, save_path=str(tmp_path),
                              dsa=True, dsa_strategy='crop', epoch_eval_noaug=300, Iteration=3, im_size=(28, 28))
    Record(made, settings(made), signature(made)).finish({'ConvNetD1': [0.25]})
    papers_file(tmp_path / 'res_DM_MNIST_ConvNetD1_2ipc.pt', n_exp=1)
    for ext in ('pt', 'json'):
        os.rename(tmp_path / f'res_DM_MNIST_ConvNetD1_2ipc.{ext}', tmp_path / f'res_mine.{ext}')
    p = run('evaluate.py', tmp_path / 'res_mine.pt', *FAST, '--data_path', data)
    assert p.returncode == 0, p.stderr[-2000:]
    report = report_of(tmp_path / 'res_mine_eval.json')
    assert list(report['results']) == ['ConvNetD1']  # eval mode S: the training model of the record
    assert report['results']['ConvNetD1']['augmentation'] == 'DSA crop'
    assert (report['settings']['dataset'], report['settings']['method']) == ('MNIST', 'DM')
    assert f'(from the record {tmp_path / "res_mine.json"})' in p.stdout


@pytest.mark.e2e
def test_an_image_folder_matched_to_class_names_learns_its_classes(tmp_path):
    """The set's folders are named after Fashion-MNIST's classes in another order than sorted; a model
    trained on it classifies the test images correctly only when the labels follow the names."""
    write_patterns(tmp_path / 'data', 'FashionMNIST')
    rng = np.random.default_rng(1)
    for c, folder in enumerate(FASHION_FOLDERS):
        for k, image in enumerate(patterns([c, c], rng)):
            write_png(tmp_path / 'my_set' / folder / f'{k}.png', image, 'L')
    p = run('evaluate.py', tmp_path / 'my_set', '--dataset', 'FashionMNIST', '--data_path', tmp_path / 'data',
            '--num_eval', 1, '--epoch_eval_train', 40, '--models', 'ConvNetD1', '--lr_net', 0.05, '--dsa_strategy', 'none')
    assert p.returncode == 0, p.stderr[-2000:]
    assert 'folder names matched to class names' in p.stdout
    report = report_of(tmp_path / 'my_set_eval.json')
    assert report['results']['ConvNetD1']['mean'] > 0.9  # sorted order would get at most 3 of 10 classes right
    assert report['settings']['ipc'] == 2 and report['results']['ConvNetD1']['augmentation'] == 'none'


@pytest.mark.e2e
def test_an_image_folder_for_a_users_image_folder_dataset(tmp_path):
    """--dataset ImageFolder: the real tree (24x24) is read at the set's size (16x16) and normalised with its
    own mean/std."""
    rng = np.random.default_rng(0)
    colours = {'blue': [0, 0, 200], 'red': [200, 0, 0]}
    train = []
    for split, n in (('train', 6), ('test', 4)):
        for name, colour in colours.items():
            for k in range(n):
                image = (np.array(colour) + rng.integers(0, 50, (24, 24, 3))).astype(np.uint8)
                write_png(tmp_path / 'tree' / split / name / f'{k}.png', image, 'RGB')
                train += [image] * (split == 'train')
    for name, colour in colours.items():
        write_png(tmp_path / 'syn' / name / '0.jpg', np.full((16, 16, 3), colour, np.uint8), 'RGB')
    p = run('evaluate.py', tmp_path / 'syn', '--dataset', 'ImageFolder', '--data_path', tmp_path / 'tree', '--num_eval', 1,
            '--epoch_eval_train', 30, '--lr_net', 0.05, '--models', 'ConvNetD1', '--save_path', tmp_path / 'out')
    assert p.returncode == 0, p.stderr[-2000:]
    report = report_of(tmp_path / 'out' / 'syn_eval.json')
    s = report['settings']
    assert (s['im_size'], s['num_classes'], s['channel']) == ([16, 16], 2, 3)
    assert s['mean'] == pytest.approx((np.stack(train) / 255).mean((0, 1, 2)), abs=0.01)  # of the images at 16x16
    assert s['sources']['labels'] == 'folder names matched to class names'
    assert report['results']['ConvNetD1']['mean'] == 1  # one pure colour per class: every test image (blue or red) right


@pytest.mark.e2e
def test_the_random_baseline_draws_as_many_real_images_per_class_as_the_set_has(tmp_path, data):
    labels = torch.tensor([0, 0, 0] + [c for c in range(1, 10) for _ in range(2)])  # class 0 has 3 images
    torch.save({'data': [[torch.randn(len(labels), 1, 28, 28), labels]] * 2, 'accs_all_exps': {}}, tmp_path / 'set.pt')
    p = run('evaluate.py', tmp_path / 'set.pt', '--dataset', 'MNIST', '--baseline', 'random', *FAST, '--data_path', data)
    assert p.returncode == 0, p.stderr[-2000:]
    report = report_of(tmp_path / 'set_eval.json')
    assert report['baseline']['kind'] == 'random' and report['baseline']['results']['ConvNet']['n'] == 2
    assert 'random real images' in p.stdout
    real_labels = get_dataset('MNIST', str(data))[6].labels
    indices = report['baseline']['indices']
    for k in ('0', '1'):
        assert len(set(indices[k])) == len(indices[k])  # without replacement
        assert torch.bincount(real_labels[indices[k]], minlength=10).tolist() == [3] + [2] * 9
    assert indices['0'] != indices['1']  # a fresh draw per experiment


def test_a_stopped_evaluation_continues_with_resume_and_gives_the_uninterrupted_accuracies(tmp_path, data, monkeypatch,
                                                                                           capsys):
    def evaluate_in_process(*args):  # evaluate.py's main as run_script runs it (a stop: a saved state, an exit status)
        return run_in_process(monkeypatch, capsys, 'evaluate.py', *args, main=evaluate.main)

    path = tmp_path / 'res_DSA_MNIST_ConvNet_2ipc.pt'
    papers_file(path)  # 2 experiments; per experiment 2 models on the set, then 2 on random real images
    flags = ['--epoch_eval_train', 2, '--num_eval', 2, '--baseline', 'random', '--data_path', data]
    assert evaluate_in_process(path, *flags, '--save_path', tmp_path / 'whole').returncode == 0
    whole = report_of(tmp_path / 'whole' / 'res_DSA_MNIST_ConvNet_2ipc_eval.json')

    train = utils.train_and_test
    out = tmp_path / 'cut' / 'res_DSA_MNIST_ConvNet_2ipc_eval.json'
    # stopped in the second model of the second experiment's set: its first model is done
    monkeypatch.setattr(utils, 'train_and_test', stopped_at_call(6, train, []))
    p = evaluate_in_process(path, *flags, '--save_path', out.parent)
    assert p.returncode == 130 and f'the 5 model(s) finished are in {out}; continue with --resume' in p.stderr, p.stderr
    cut = report_of(out)
    assert not cut['finished']
    # the summary at the top is that of the models finished (3 of the set's, 2 of the baseline's), not n = 0
    w = whole['results']['ConvNet']['per_exp']
    r = cut['results']['ConvNet']
    assert r['per_exp'] == {'0': w['0'], '1': w['1'][:1]} and r['n'] == 3 and r['mean'] == pytest.approx(np.mean(w['0'] + w['1'][:1]))
    assert cut['baseline']['results']['ConvNet']['per_exp'] == {'0': whole['baseline']['results']['ConvNet']['per_exp']['0']}
    assert sorted((d['set'], d['exp'], d['numbers'][0]) for d in cut['done']) == \
        [('random', 0, 0), ('random', 0, 1), ('synthetic', 0, 0), ('synthetic', 0, 1), ('synthetic', 1, 0)]

    calls = []
    monkeypatch.setattr(utils, 'train_and_test', stopped_at_call(0, train, calls))  # counts, never stops
    p = evaluate_in_process(path, *flags, '--save_path', out.parent, '--resume')
    assert p.returncode == 0, p.stderr
    assert len(calls) == 3  # the set's second model of experiment 1 and its 2 random-image models
    resumed = report_of(out)
    assert resumed['finished'] and resumed['results'] == whole['results'] and resumed['baseline'] == whole['baseline']
    assert 'continuing the evaluation' in p.stdout

    # refused: other settings, or nothing to continue
    assert_one_line_error(evaluate_in_process(path, *flags, '--save_path', out.parent, '--resume', '--lr_net', 0.02),
                          'was made with other settings (lr_net 0.01, now 0.02)')
    assert_one_line_error(evaluate_in_process(path, *flags, '--save_path', tmp_path / 'none', '--resume'),
                          'there is no evaluation to continue')
    (tmp_path / 'other').mkdir()
    papers_file(tmp_path / 'other' / path.name, n_exp=1)  # another set of the same name
    assert_one_line_error(evaluate_in_process(tmp_path / 'other' / path.name, *flags, '--save_path', out.parent, '--resume'),
                          'was made with other settings (another synthetic set under the same name)')


@pytest.mark.parametrize('together', [False, True])
def test_test_every_records_accuracy_against_epochs_and_leaves_the_models_as_they_were(tmp_path, data, monkeypatch,
                                                                                     capsys, together):
    def evaluate_in_process(*args):
        return run_in_process(monkeypatch, capsys, 'evaluate.py', *args, main=evaluate.main)

    path = tmp_path / 'res_DSA_MNIST_ConvNet_2ipc.pt'
    papers_file(path, n_exp=1)
    flags = ['--epoch_eval_train', 5, '--num_eval', 2, '--data_path', data] + (['--eval_together'] if together else [])
    assert evaluate_in_process(path, *flags, '--save_path', tmp_path / 'plain').returncode == 0
    p = evaluate_in_process(path, *flags, '--test_every', 2, '--save_path', tmp_path / 'curve')
    assert p.returncode == 0, p.stderr
    plain = report_of(tmp_path / 'plain' / 'res_DSA_MNIST_ConvNet_2ipc_eval.json')
    report = report_of(tmp_path / 'curve' / 'res_DSA_MNIST_ConvNet_2ipc_eval.json')
    r = report['results']['ConvNet']
    assert r['accs'] == plain['results']['ConvNet']['accs']  # testing on the way draws nothing: the same models
    assert 'curve' not in plain['results']['ConvNet'] and all('curves' not in d for d in plain['done'])
    c = r['curve']
    assert c['epochs'] == [2, 4, 5] and c['n'] == 2 and c['mean'][-1] == pytest.approx(r['mean'])
    per_model = [acc for d in report['done'] for acc in d['curves']]
    assert [m[-1] for m in per_model] == r['accs'] and all(len(m) == 3 for m in per_model)
    assert all(40 * a == pytest.approx(round(40 * a), abs=1e-4) for m in per_model for a in m)  # tests on the 40 test images
    assert c['mean'] == pytest.approx(np.mean(per_model, 0).tolist()) and c['std'] == pytest.approx(np.std(per_model, 0).tolist())
    assert 'ConvNet, accuracy against epochs (mean over 2 models): 2: ' in p.stdout
    if not together:  # stopped in the second model and resumed: the curves of one uninterrupted run
        out = tmp_path / 'cut' / 'res_DSA_MNIST_ConvNet_2ipc_eval.json'
        monkeypatch.setattr(utils, 'train_and_test', stopped_at_call(2, utils.train_and_test, []))
        assert evaluate_in_process(path, *flags, '--test_every', 2, '--save_path', out.parent).returncode == 130
        monkeypatch.undo()
        assert evaluate_in_process(path, *flags, '--test_every', 2, '--save_path', out.parent, '--resume').returncode == 0
        assert report_of(out)['results'] == report['results']
        assert_one_line_error(evaluate_in_process(path, *flags, '--save_path', out.parent, '--resume'),
                              'was made with other settings (test_every 2, now 0)')


def test_a_killed_evaluation_keeps_every_model_it_finished(tmp_path, data, monkeypatch, capsys):
    path = tmp_path / 'res_DSA_MNIST_ConvNet_2ipc.pt'
    papers_file(path)
    flags = ['--epoch_eval_train', 2, '--num_eval', 2, '--data_path', data, '--save_path', tmp_path / 'out']
    train, calls = utils.train_and_test, []

    class Killed(Exception):
        pass

    def killed_at_the_fourth(*a, **k):  # (as SIGKILL: no handler runs, nothing is saved at the end)
        calls.append(1)
        if len(calls) == 4:
            raise Killed
        return train(*a, **k)

    monkeypatch.setattr(utils, 'train_and_test', killed_at_the_fourth)
    with pytest.raises(Killed):
        run_in_process(monkeypatch, capsys, 'evaluate.py', path, *flags, main=evaluate.main)
    saved = report_of(tmp_path / 'out' / 'res_DSA_MNIST_ConvNet_2ipc_eval.json')
    assert sorted((d['exp'], d['numbers'][0]) for d in saved['done']) == [(0, 0), (0, 1), (1, 0)]
    calls.clear()
    monkeypatch.setattr(utils, 'train_and_test', stopped_at_call(0, train, calls))
    p = run_in_process(monkeypatch, capsys, 'evaluate.py', path, *flags, '--resume', main=evaluate.main)
    assert p.returncode == 0 and len(calls) == 1, p.stderr  # only the model that was in training


@pytest.mark.e2e
@needs_fashion
def test_random_real_images_of_fashion_mnist_are_clearly_above_chance(tmp_path):
    dst_train = get_dataset('FashionMNIST', str(tmp_path / 'data'))[6]
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.nonzero(dst_train.labels == c).flatten()[torch.randperm(6000, generator=g)[:10]]
                     for c in range(10)])
    torch.save({'data': [[dst_train.images[idx], dst_train.labels[idx]]], 'accs_all_exps': {}},
               tmp_path / 'res_random_FashionMNIST_ConvNetW32_10ipc.pt')  # (a narrow ConvNet: testing is quick)
    p = run('evaluate.py', tmp_path / 'res_random_FashionMNIST_ConvNetW32_10ipc.pt', '--epoch_eval_train', 20, '--num_eval', 1,
            '--baseline', 'random', '--data_path', tmp_path / 'data')
    assert p.returncode == 0, p.stderr[-2000:]
    report = report_of(tmp_path / 'res_random_FashionMNIST_ConvNetW32_10ipc_eval.json')
    assert report['results']['ConvNetW32']['augmentation'] == 'none'  # a coreset: DC's augmentation, none here
    assert report['results']['ConvNetW32']['mean'] > 0.5 and report['baseline']['results']['ConvNetW32']['mean'] > 0.5


# ----------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2
# ----------------------------------------------------------------------------------------------------

GOOD = '{tmp}/res_DSA_MNIST_ConvNet_2ipc.pt'
BAD = [  # (arguments, a part of the expected message)
    (['{tmp}/nope.pt'], 'does not exist'),
    (['{tmp}/garbage.pt'], 'garbage.pt is not a file that torch.save wrote'),
    (['{tmp}/truncated.pt'], 'cannot load {tmp}/truncated.pt'),
    (['{tmp}/unsafe.pt'], 'cannot load {tmp}/unsafe.pt safely'),
    (['{tmp}/a_list.pt', '--dataset', 'MNIST'], 'must hold a dict'),
    (['{tmp}/no_data.pt', '--dataset', 'MNIST'], "lacks the key 'data'"),
    (['{tmp}/not_pairs.pt', '--dataset', 'MNIST'], 'must be a pair [images, labels]'),
    (['{tmp}/float_labels.pt', '--dataset', 'MNIST'], 'integer labels'),
    (['{tmp}/no_exps.pt', '--dataset', 'MNIST'], 'holds no experiments'),
    (['{tmp}/nan.pt', '--dataset', 'MNIST'], 'data[0] holds non-finite pixel values'),
    (['{tmp}/no_images.pt', '--dataset', 'MNIST'], 'data[0] holds no images'),
    (['{tmp}/rgb.pt', '--dataset', 'MNIST'], 'images are 3x32x32, but MNIST images are 1x28x28'),
    (['{tmp}/labels.pt', '--dataset', 'MNIST'], 'labels go up to 11, but MNIST has 10 classes'),
    (['{tmp}/empty_dir', '--dataset', 'MNIST'], 'holds no class folders'),
    (['{tmp}/empty_class', '--dataset', 'MNIST'], 'empty_class/3 holds no images'),
    (['{tmp}/not_images', '--dataset', 'MNIST'], 'notes.txt is not an image'),
    (['{tmp}/stray', '--dataset', 'MNIST'], 'the images go in class folders'),
    (['{tmp}/large', '--dataset', 'MNIST'], 'is 32x32 pixels, but MNIST images are 28x28'),
    (['{tmp}/colour', '--dataset', 'MNIST'], 'has colour, but MNIST images have 1 channel'),
    (['{tmp}/gray', '--dataset', 'SVHN'], 'is a one-channel image, but SVHN images have 3 channels'),
    (['{tmp}/eleven', '--dataset', 'MNIST'], 'has 11 class folders, but MNIST has 10 classes'),
    (['{tmp}/nine_named', '--dataset', 'MNIST'], 'named after MNIST classes but not nine'),
    (['{tmp}/colour', '--dataset', 'MNIST', '--exp', '1'], 'a folder is one experiment'),
    ([GOOD, '--models', 'ConvNet', 'ConvNetX'], "invalid choice: 'ConvNetX'"),
    ([GOOD, '--exp', '2'], '--exp 2 is out of range'),
    ([GOOD, '--exp', '-1'], 'not an experiment number'),
    ([GOOD, '--exp', 'last'], 'not an experiment number'),
    ([GOOD, '--dataset', 'CIFAR11'], "invalid choice: 'CIFAR11'"),
    (['{tmp}/plain.pt'], 'which dataset made'),
    (['{tmp}/res_odd.pt'], "unknown dataset 'CIFAR11' (from the record"),
    (['{tmp}/res_DM_MNIST_ConvNetX_2ipc.pt'], "unknown model 'ConvNetX' (from the file name)"),
    ([GOOD, '--num_eval', '0'], '--num_eval must be at least 1'),
    ([GOOD, '--num_eval', 'two'], "argument --num_eval: 'two' is not a whole number"),
    ([GOOD, '--epoch_eval_train', '0'], 'argument --epoch_eval_train: must be at least 1, got 0'),
    ([GOOD, '--batch_train', '0'], 'argument --batch_train: must be at least 1, got 0'),
    ([GOOD, '--lr_net', '-1'], 'argument --lr_net: must be a positive number, got -1'),
    ([GOOD, '--lr_net', 'nan'], 'argument --lr_net: must be a positive number, got nan'),
    ([GOOD, '--seed', '-1'], 'argument --seed: must be at least 0, got -1'),
    ([GOOD, '--dsa_strategy', 'color_blur'], "unknown augmentation 'blur'"),
    ([GOOD, '--method', 'KIP'], "invalid choice: 'KIP'"),
    ([GOOD, '--eval_mode', 'Q'], "invalid choice: 'Q'"),
    ([GOOD, '--eval_mode', 'M', '--models', 'MLP'], 'not allowed with argument'),
    ([GOOD, '--baseline', 'herding'], "invalid choice: 'herding'"),
    (['{tmp}/big.pt', '--dataset', 'MNIST', '--baseline', 'random'], 'needs 11 real images of class 0'),
    ([GOOD, '--save_path', '{tmp}/a_file'], 'is a file, not a folder'),
    ([GOOD, '--save_path', '/proc/forbidden'], 'cannot write to --save_path'),
    ([GOOD, '--device', 'tpu'], 'unknown device'),
    ([GOOD, '--resume', '--save_path', '{tmp}/empty_dir'], 'there is no evaluation to continue in'),
    ([GOOD, '--resume', '--save_path', '{tmp}/../reports/garbage'], 'is not a report of evaluate.py (JSONDecodeError'),
    ([GOOD, '--resume', '--save_path', '{tmp}/../reports/other'], "other real data, eval_schedule 'toolkit-0.1', now 'papers', seed 1, now 0); give the same ones"),  # (a report from before
    # 0.2.0 used the old schedule)
    ([GOOD, '--no_such_flag'], 'unrecognized arguments'),
]


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('bad')
    write_mnist(tmp / 'data', n_train=100, n_test=10)
    papers_file(tmp / 'res_DSA_MNIST_ConvNet_2ipc.pt')
    papers_file(tmp / 'plain.pt', n_exp=1)
    papers_file(tmp / 'res_DM_MNIST_ConvNetX_2ipc.pt', n_exp=1)
    papers_file(tmp / 'res_odd.pt', n_exp=1)
    (tmp / 'res_odd.json').write_text(json.dumps({'results': {}, 'protocol': {'dataset': 'CIFAR11', 'method': 'DM'}}))
    papers_file(tmp / 'rgb.pt', n_exp=1, shape=(3, 32, 32))
    papers_file(tmp / 'big.pt', n_exp=1, ipc=11)
    (tmp / 'garbage.pt').write_text('not a torch file')
    torch.save({'data': [], 'settings': argparse.Namespace(a=1)}, tmp / 'unsafe.pt')  # needs pickled code
    torch.save([1, 2], tmp / 'a_list.pt')
    torch.save({'accs_all_exps': {}}, tmp / 'no_data.pt')
    torch.save({'data': [torch.zeros(2, 1, 28, 28)]}, tmp / 'not_pairs.pt')
    torch.save({'data': [[torch.zeros(2, 1, 28, 28), torch.zeros(2)]]}, tmp / 'float_labels.pt')
    torch.save({'data': []}, tmp / 'no_exps.pt')
    torch.save({'data': [[torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)]]}, tmp / 'no_images.pt')
    (tmp / 'truncated.pt').write_bytes((tmp / 'res_DSA_MNIST_ConvNet_2ipc.pt').read_bytes()[:3000])
    torch.save({'data': [[torch.full((2, 1, 28, 28), float('nan')), torch.zeros(2, dtype=torch.long)]]}, tmp / 'nan.pt')
    torch.save({'data': [[torch.zeros(2, 1, 28, 28), torch.tensor([0, 11])]]}, tmp / 'labels.pt')
    (tmp / 'a_file').write_text('x')
    (tmp / 'empty_dir').mkdir()
    gray, rgb = np.zeros((28, 28), np.uint8), np.zeros((28, 28, 3), np.uint8)
    for c in range(10):
        for folder in ('empty_class', 'not_images', 'nine_named', 'stray', 'large'):
            write_png(tmp / folder / ('nine' if folder == 'nine_named' and c == 9 else str(c)) / '0.png',
                      np.zeros((32, 32), np.uint8) if folder == 'large' else gray, 'L')
        write_png(tmp / 'colour' / str(c) / '0.png', rgb + np.array([0, 0, 200], np.uint8) * (c == 4), 'RGB')
        write_png(tmp / 'gray' / str(c) / '0.png', np.zeros((32, 32), np.uint8), 'L')
    for f in (tmp / 'empty_class' / '3').iterdir():
        f.unlink()
    (tmp / 'not_images' / '5' / 'notes.txt').write_text('not an image')
    for name in 'abcdefghijk':  # not class names: in sorted order, one too many
        write_png(tmp / 'eleven' / name / '0.png', gray, 'L')
    (tmp / 'stray' / 'readme.txt').write_text('x')
    reports = tmp.parent / 'reports'  # (outside tmp, where the tests look for reports written by mistake)
    for name, text in (('garbage', 'not json'), ('other', json.dumps({'settings': {
            'dataset': 'MNIST', 'method': 'DSA', 'model': 'ConvNet', 'models': ['ConvNet'], 'dsa': True,
            'dsa_strategy': DIGITS_STRATEGY, 'epoch_eval_train': None, 'lr_net': 0.01, 'batch_train': 256, 'seed': 1,
            'amp': False, 'eval_together': False, 'num_eval': 20, 'baseline': 'none', 'data_id': None, 'factor': 1}}))):
        (reports / name).mkdir(parents=True)
        (reports / name / 'res_DSA_MNIST_ConvNet_2ipc_eval.json').write_text(text)
    return tmp


def arguments(tmp, args):
    args = [a.replace('{tmp}', str(tmp)) for a in args]
    return args if '--data_path' in args else args + ['--data_path', str(tmp / 'data')]


@pytest.mark.parametrize('args,expected', BAD, ids=[' '.join(a).replace('{tmp}/', '') for a, _ in BAD])
def test_bad_input(bad_inputs, capsys, monkeypatch, args, expected):
    """Runs evaluate.py's entry point in this process (as `python evaluate.py ...` would)."""
    p = run_in_process(monkeypatch, capsys, 'evaluate.py', *arguments(bad_inputs, args))
    assert_one_line_error(p, expected.replace('{tmp}', str(bad_inputs)))
    assert not list(bad_inputs.rglob('*_eval.json'))  # nothing written


def test_bad_input_in_a_real_process(bad_inputs):
    """(The cases above in this process, as its entry point runs them; here one in a process of its own.)"""
    assert_one_line_error(run('evaluate.py', *arguments(bad_inputs, ['{tmp}/unsafe.pt']), timeout=120), 'safely')
