"""docs/figures.py: from tiny run records (the schema of runs.summarise) and evaluate.py outputs in tmp_path, the
summary runs.json, the grids, the evaluations table and the accuracy-against-iterations figure (one panel per
dataset, a curve per run evaluated more than once). matplotlib is optional (for that script only): the
figure's tests skip without it, the rest runs everywhere."""
import importlib.util
import json
import os
import sys

import pytest
from PIL import Image

from helpers import ROOT

pytestmark = pytest.mark.tooling

spec = importlib.util.spec_from_file_location('figures', os.path.join(ROOT, 'docs', 'figures.py'))
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)


def write_run(folder, method, dataset, ipc, history, amp=False, grid_size=(40, 20)):
    """A run folder as a finished run leaves it: its record and the grid of every evaluation."""
    folder.mkdir(parents=True)
    name = f'{method}_{dataset}_ConvNet_{ipc}ipc'
    protocol = dict(method=method, dataset=dataset, model='ConvNet', ipc=ipc, Iteration=max(h[1] for h in history),
                    num_eval=2, num_exp=1 + max(h[0] for h in history), eval_mode='S', amp=amp, channel=1)
    history = [dict(exp=e, it=it, accs={'ConvNet': accs}) for e, it, accs in history]
    last = [a for h in history if h['it'] == protocol['Iteration'] for a in h['accs']['ConvNet']]
    record = dict(status='finished', signature=dict(method=method, dataset=dataset, ipc=ipc, data_id='abc'),
                  protocol=protocol, results={'ConvNet': dict(mean=sum(last) / len(last), std=0.0, n=len(last), accs=last)},
                  history=history, pace=dict(iterations=protocol['Iteration'], seconds=1.5, loss=0.2))
    (folder / f'res_{name}.json').write_text(json.dumps(record))
    for h in history:
        Image.new('L', grid_size, 128).save(folder / f"vis_{name}_exp{h['exp']}_iter{h['it']}.png")
    return name


def write_eval(path, method, accs):
    """evaluate.py's output for a set (settings, results per model, finished)."""
    results = {m: dict(mean=sum(a) / len(a), std=0.01, n=len(a), accs=a) for m, a in accs.items()}
    path.write_text(json.dumps(dict(settings=dict(input='res.pt', dataset='FashionMNIST', method=method, model='ConvNet',
                                                  ipc=1, num_eval=len(next(iter(accs.values())))),
                                    results=results, finished=True)))
    return path


@pytest.fixture
def runs(tmp_path):
    """Four run folders: two on Fashion-MNIST (DC over two experiments; DM under --amp), one on CIFAR-10 (DSA,
    evaluated three times), a coreset evaluated once; an evaluate.py output beside the DC record."""
    r = tmp_path / 'runs'
    write_run(r / 'dc', 'DC', 'FashionMNIST', 1, [(0, 0, [0.1, 0.2]), (0, 50, [0.6, 0.7]), (1, 0, [0.3, 0.4]),
                                                  (1, 50, [0.65, 0.75])], grid_size=(1000, 200))
    write_run(r / 'dm', 'DM', 'FashionMNIST', 10, [(0, 0, [0.70, 0.72]), (0, 200, [0.80, 0.82])], amp=True)
    write_run(r / 'dsa', 'DSA', 'CIFAR10', 1, [(0, 0, [0.08, 0.09]), (0, 500, [0.28, 0.27]), (0, 1000, [0.29, 0.28])])
    write_run(r / 'random', 'random', 'CIFAR10', 10, [(0, 0, [0.26, 0.27])])
    write_eval(r / 'dc' / 'res_DC_FashionMNIST_ConvNet_1ipc_eval.json', 'DC', {'ConvNet': [0.7, 0.71], 'MLP': [0.6, 0.62]})
    return r


def panels(fig):
    """{panel title: [legend labels]} of the curves figure."""
    return {ax.get_title(loc='left'): ax.get_legend_handles_labels()[1] for ax in fig.axes}


def test_runs_json_grids_and_evaluations_table(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # without matplotlib: everything but curves.png
    out = tmp_path / 'img'
    fig = figures.main([str(runs / f) for f in ('dc', 'dm', 'dsa', 'random')] +
                       ['--out', str(out), '--evals', str(runs / 'dc' / 'res_DC_FashionMNIST_ConvNet_1ipc_eval.json')])
    assert fig is None and not (out / 'curves.png').exists()
    summary = json.loads((out / 'runs.json').read_text())
    assert [(r['run'], r['name'], r['grid']) for r in summary] == [
        ('dc', 'DC_FashionMNIST_ConvNet_1ipc', 'dc.png'), ('dm', 'DM_FashionMNIST_ConvNet_10ipc', 'dm.png'),
        ('dsa', 'DSA_CIFAR10_ConvNet_1ipc', 'dsa.png'), ('random', 'random_CIFAR10_ConvNet_10ipc', 'random.png')]
    assert summary[0]['protocol'] == dict(method='DC', dataset='FashionMNIST', model='ConvNet', ipc=1, Iteration=50,
                                          num_eval=2, num_exp=2, eval_mode='S', dsa_strategy=None,
                                          epoch_eval_train=None, seed=None, amp=False)
    assert len(summary[0]['history']) == 4 and summary[0]['pace']['seconds'] == 1.5 and summary[0]['status'] == 'finished'
    assert Image.open(out / 'dc.png').size == (640, 128)  # shrunk to at most 640 pixels a side
    table = (out / 'evaluations.md').read_text().splitlines()
    assert table == ['| set | ConvNet | MLP |', '|---|---|---|',
                     '| DC, FashionMNIST, ipc 1 | 70.50 ± 1.00 (n=2) | 61.00 ± 1.00 (n=2) |']
    assert [e['file'] for e in json.loads((out / 'evaluations.json').read_text())] == [
        'res_DC_FashionMNIST_ConvNet_1ipc_eval.json']


def test_update_keeps_what_is_not_given_in_its_place(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    out = tmp_path / 'img'
    figures.main([str(runs / 'dc'), str(runs / 'dm'), '--out', str(out),
                  '--evals', str(runs / 'dc' / 'res_DC_FashionMNIST_ConvNet_1ipc_eval.json')])
    dm_again = tmp_path / 'again' / 'dm'
    write_run(dm_again, 'DM', 'FashionMNIST', 10, [(0, 0, [0.5, 0.5]), (0, 400, [0.9, 0.9])])
    other = write_eval(tmp_path / 'res_DM_eval.json', 'DM', {'ConvNet': [0.8, 0.8]})
    figures.main([str(dm_again), str(runs / 'dsa'), '--out', str(out), '--update', '--evals', str(other)])
    summary = json.loads((out / 'runs.json').read_text())
    assert [r['run'] for r in summary] == ['dc', 'dm', 'dsa'] and summary[1]['protocol']['Iteration'] == 400
    assert [e['file'] for e in json.loads((out / 'evaluations.json').read_text())] == [
        'res_DC_FashionMNIST_ConvNet_1ipc_eval.json', 'res_DM_eval.json']
    assert len((out / 'evaluations.md').read_text().splitlines()) == 4


def test_a_folder_of_several_records_names_each_run(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    write_run(tmp_path / 'both', 'DC', 'MNIST', 1, [(0, 0, [0.1, 0.1]), (0, 10, [0.5, 0.5])])
    write_run(tmp_path / 'second', 'DSA', 'MNIST', 1, [(0, 0, [0.1, 0.1]), (0, 10, [0.6, 0.6])])
    for f in os.listdir(tmp_path / 'second'):
        os.replace(tmp_path / 'second' / f, tmp_path / 'both' / f)
    figures.main([str(tmp_path / 'both'), str(tmp_path / 'empty'), '--out', str(tmp_path / 'img')])
    summary = json.loads((tmp_path / 'img' / 'runs.json').read_text())
    assert [(r['run'], r['grid']) for r in summary] == [('both_DC_MNIST_ConvNet_1ipc', 'both_DC_MNIST_ConvNet_1ipc.png'),
                                                        ('both_DSA_MNIST_ConvNet_1ipc', 'both_DSA_MNIST_ConvNet_1ipc.png')]


def test_curves_one_panel_per_dataset(runs, tmp_path):
    pytest.importorskip('matplotlib')
    out = tmp_path / 'img'
    fig = figures.main([str(runs / f) for f in ('dc', 'dm', 'dsa', 'random')] + ['--out', str(out)])
    assert (out / 'curves.png').exists()
    assert panels(fig) == {'FashionMNIST': ['dc (DC, ipc 1, 50 it)', 'dm (DM, ipc 10, 200 it, --amp)'],
                           'CIFAR10': ['dsa (DSA, ipc 1, 1000 it)']}  # the coreset, evaluated once, draws no curve
    fashion, cifar = fig.axes
    dc = fashion.containers[0]  # errorbar: the line, the caps, the bars
    its, accs = dc.lines[0].get_data()
    assert list(its) == [0, 50] and list(accs) == pytest.approx([25.0, 67.5])  # over both experiments' models
    assert dc.lines[0].get_linestyle() == '-' and fashion.containers[1].lines[0].get_linestyle() == '--'
    assert list(cifar.containers[0].lines[0].get_data()[0]) == [0, 500, 1000]
    assert [int(t) for t in fashion.get_xticks()] == [0, 50, 200] and fashion.get_xscale() == 'symlog'

    # redrawn from out alone, a chosen few; a name that is not a run is refused
    fig = figures.main(['--update', '--out', str(out), '--curves', 'dsa', 'dm'])
    assert panels(fig) == {'FashionMNIST': ['dm (DM, ipc 10, 200 it, --amp)'], 'CIFAR10': ['dsa (DSA, ipc 1, 1000 it)']}
    with pytest.raises(SystemExit):
        figures.main(['--update', '--out', str(out), '--curves', 'nothing'])


def test_accuracy_against_epochs_from_evaluations_tested_on_the_way(runs, tmp_path):
    pytest.importorskip('matplotlib')
    path = tmp_path / 'res_ITGAN_FashionMNIST_ConvNet_10ipc_eval.json'
    write_eval(path, 'ITGAN', {'ConvNet': [0.7, 0.8], 'ResNet18BN': [0.6, 0.7]})
    report = json.loads(path.read_text())
    report['results']['ConvNet']['curve'] = dict(epochs=[10, 20], mean=[0.5, 0.75], std=[0.1, 0.05], n=2)
    path.write_text(json.dumps(report))
    out = tmp_path / 'img'
    figures.main(['--out', str(out), '--evals', str(runs / 'dc' / 'res_DC_FashionMNIST_ConvNet_1ipc_eval.json'), str(path)])
    assert (out / 'epochs.png').exists()
    fig = figures.epoch_curves(json.loads((out / 'evaluations.json').read_text()))
    assert panels(fig) == {'ConvNet': [f'{path.name} (ITGAN, ipc 1, n=2)']}  # only the curve there is
    its, accs = fig.axes[0].containers[0].lines[0].get_data()
    assert list(its) == [10, 20] and list(accs) == pytest.approx([50.0, 75.0])


def test_a_baseline_of_real_images_draws_its_own_curve_once(tmp_path):
    """Two evaluations that carry one --baseline (the same draw): a curve for each set and one, with x markers,
    for the random real images, at their own accuracies."""
    pytest.importorskip('matplotlib')
    baseline = dict(kind='random', results={'ConvNet': dict(mean=0.8, std=0.0, n=2, accs=[0.8, 0.8], curve=dict(
        epochs=[10, 20], mean=[0.6, 0.8], std=[0.0, 0.0], n=2))})
    paths = []
    for name, method in (('gan_eval.json', 'GAN'), ('itgan_eval.json', 'ITGAN')):
        rec = json.loads(write_eval(tmp_path / name, method, {'ConvNet': [0.7, 0.7]}).read_text())
        rec['results']['ConvNet']['curve'] = dict(epochs=[10, 20], mean=[0.5, 0.7], std=[0.0, 0.0], n=2)
        rec['baseline'] = baseline
        (tmp_path / name).write_text(json.dumps(rec))
        paths.append(str(tmp_path / name))
    figures.main(['--out', str(tmp_path / 'img'), '--evals', *paths])
    fig = figures.epoch_curves(json.loads((tmp_path / 'img' / 'evaluations.json').read_text()))
    assert panels(fig) == {'ConvNet': ['gan_eval.json (GAN, ipc 1, n=2)', 'random real images (ipc 1, n=2)',
                                       'itgan_eval.json (ITGAN, ipc 1, n=2)']}  # (after the first that carries it)
    line = fig.axes[0].containers[1].lines[0]
    assert line.get_marker() == 'x' and list(line.get_data()[1]) == pytest.approx([60.0, 80.0])


def test_evaluations_of_one_set_share_a_row_and_a_baseline_has_its_own(tmp_path, monkeypatch):
    """Two evaluate.py runs of one set (one set_id) on other models fill one row; a second set under the same
    name is told apart by its file; the --baseline of random real images is a row of its own."""
    monkeypatch.setitem(sys.modules, 'matplotlib', None)

    def evaluation(name, set_id, accs, baseline=None):
        path = write_eval(tmp_path / name, 'ITGAN', accs)
        rec = json.loads(path.read_text())
        rec['settings']['set_id'] = set_id
        rec['baseline'] = baseline and dict(kind='random', indices={'0': [1, 2]},
                                            results={m: dict(mean=a, std=0.0, n=1) for m, a in baseline.items()})
        path.write_text(json.dumps(rec))
        return str(path)

    paths = [evaluation('a_eval.json', 'set1', {'ConvNet': [0.7]}, baseline={'ConvNet': 0.6}),
             evaluation('b_eval.json', 'set1', {'ResNet18BN': [0.5]}, baseline={'ResNet18BN': 0.4}),
             evaluation('c_eval.json', 'set2', {'ConvNet': [0.8]})]
    figures.main(['--out', str(tmp_path / 'img'), '--evals', *paths])
    assert (tmp_path / 'img' / 'evaluations.md').read_text().splitlines() == [
        '| set | ConvNet | ResNet18BN |', '|---|---|---|',
        '| ITGAN, FashionMNIST, ipc 1 (a_eval.json) | 70.00 ± 1.00 (n=1) | 50.00 ± 1.00 (n=1) |',
        '| random real images, FashionMNIST, ipc 1 | 60.00 ± 0.00 (n=1) | 40.00 ± 0.00 (n=1) |',
        '| ITGAN, FashionMNIST, ipc 1 (c_eval.json) | 80.00 ± 1.00 (n=1) | — |']
