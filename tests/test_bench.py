"""The benchmarks (bench/): what they share (bench/common.py), and a smoke test of each entry point on a tiny
budget: a tiny MNIST in torchvision's layout (10 training images per class, 20 test images) stands in for the
datasets, and every budget flag is as small as it goes, so each bench runs to its end in seconds and prints
its rows. What is timed is meaningless at that size; that the benches run, and say what they measured, is
the point. float32 only: bfloat16 (--amp) is emulated, 10-20x slower than float32, on CPUs without AVX-512.
bench/papers.py's rows of the papers' own code need a checkout of it (VICO-UoE/DatasetCondensation), which
CI does not have: that test runs when $DC_PAPERS names one, and skips otherwise. Nor does CI have the IDM
authors' code (uitrbn/IDM): only our side of the IDM row is smoke-tested.
"""
import json
import os
import subprocess
import sys
import tarfile
from argparse import Namespace

import pytest

from helpers import ROOT, write_mnist

BENCH = os.path.join(ROOT, 'bench')
sys.path.insert(0, BENCH)

import common  # noqa: E402

pytestmark = pytest.mark.tooling

TINY = ['--datasets', 'MNIST', '--float32_only', '--matrix_size', '32', '--script_flags=--batch_real 4']


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp('bench_data')
    write_mnist(path, n_train=100, n_test=20)
    return path


def bench(script, *args, save_path):
    """Run bench/<script> with `args` (one thread per process), to its end; its JSON rows."""
    p = subprocess.run([sys.executable, os.path.join(BENCH, script), *map(str, args), '--save_path', save_path],
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{')]


# ----------------------------------------------------------------------------------------------------
# bench/common.py
# ----------------------------------------------------------------------------------------------------

def test_setup_resolves_the_flags_with_each_scripts_own_configure(tiny_data, tmp_path):
    a = Namespace(data_path=str(tiny_data), save_path=str(tmp_path), script_flags='--seed 3')
    args, real, testloader, data, method, syn = common.setup('MNIST', 10, a, '--method', 'DSA')  # main.py by default
    assert args.dsa and 'flip' not in args.dsa_strategy  # the digits' strategy, as main.py's configure picks it
    assert type(method).__name__ == 'GradientMatching' and method.args is args and method.data is data
    assert (method.outer_loop, method.inner_loop) == (10, 50) and args.seed == 3  # the papers' loops; --script_flags
    with pytest.raises(AttributeError, match='frozen'):  # frozen, as runs.condense freezes them
        args.ipc = 1
    assert data.num_classes == 10 and data.channel == 1 and data.im_size == (28, 28)
    assert syn.images.shape == (100, 1, 28, 28) and syn.classes == list(range(10)) and len(real.indices_class) == 10
    assert common.script_args('main_DM', 'MNIST', 10, a).lr_img == 1.0  # main_DM.py's rule
    cafe = common.script_args('distill.py', 'MNIST', 1, a, '--Iteration', '100')
    assert cafe.method == 'CAFE' and cafe.layer_weights == [0.1, 0.1, 1.0, 1.0]
    import distill
    assert distill.CAFE(cafe, data).milestones == [60, 80, 90]


def changed(a, **kw):
    return Namespace(**{**vars(a), **kw})


def test_cifar10_is_extracted_once_and_whole(tmp_path):
    tree = tmp_path / 'tree'
    for split in ('train', 'test'):
        (tree / split / 'cat').mkdir(parents=True)
        (tree / split / 'cat' / '0.webp').write_bytes(b'image')
    archive = tmp_path / 'cifar10.tar'
    with tarfile.open(archive, 'w') as tar:
        for split in ('train', 'test'):
            tar.add(tree / split, arcname=split)
    a = Namespace(datasets=['CIFAR10'], data_path=str(tmp_path / 'data'), cifar10=str(archive))
    common.prepare_data(a)
    assert (tmp_path / 'data' / 'CIFAR10' / 'train' / 'cat' / '0.webp').read_bytes() == b'image'
    assert sorted(os.listdir(tmp_path / 'data')) == ['CIFAR10']  # no partial extraction left beside it
    common.prepare_data(changed(a, cifar10=str(tmp_path / 'gone.tar')))  # there already: not read again
    with pytest.raises(SystemExit, match='no CIFAR-10 archive'):
        common.prepare_data(changed(a, data_path=str(tmp_path / 'other'), cifar10=str(tmp_path / 'gone.tar')))
    common.prepare_data(changed(a, datasets=['FashionMNIST'], data_path=str(tmp_path / 'fashion')))
    assert os.listdir(tmp_path / 'fashion') == []


def test_matrix_rates_in_both_precisions():
    rates = common.matrix_rates(size=16, repeats=1)
    assert sorted(rates) == ['bfloat16', 'float32'] and min(rates.values()) > 0
    assert common.rate_fields(rates).keys() == {'fp32_GFLOPs', 'bf16_GFLOPs'}


# ----------------------------------------------------------------------------------------------------
# Each benchmark's entry point
# ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.slow
def test_speed_runs_every_part(tiny_data, tmp_path):
    rows = bench('speed.py', 'eval', 'dm', 'cafe', 'soft', 'mtt', *TINY, '--data_path', tiny_data, '--ipcs', 1,
                 '--epochs', 1, '--test_images', 8, '--alone', 1, '--num_evals', 2, '--repeats', 1, '--outer', 2,
                 '--inner', 1, '--baseline', ROOT, '--syn_steps', 2, save_path=tmp_path)
    evaluation, dm, baseline, cafe, soft, mtt = rows
    assert mtt['what'] == 'MTT iteration, ipc 1, 2 steps, DSA' and list(mtt['seconds']) == ['ours'] and mtt['seconds']['ours'] > 0
    ours = mtt['profile']['ours']
    assert 0 < ours['operators_share_of_wall'] and 0 < sum(ours['top_operators'].values()) <= 1.0001
    assert any('convolution' in op for op in ours['top_operators']) and mtt['peak_memory_mib']['ours'] > 0
    assert soft['what'] == 'evaluation model, ipc 10, hard vs soft labels' and soft['ratio_to_hard']['hard'] == 1.0
    assert set(soft['seconds']) == {'hard', 'fixed soft', 'teacher every batch'} and min(soft['seconds'].values()) > 0
    assert evaluation['what'] == 'evaluation, ipc 1, num_eval 2' and evaluation['test_images'] == 8
    assert evaluation['seconds_per_model_alone'] > 0 and evaluation['seconds_per_model_together'] > 0
    assert evaluation['GFLOP_per_model'] > 0 and len(evaluation['fraction_of_fp32_rate_alone_together']) == 2
    assert dm['what'] == 'DM iteration, ipc 10' and dm['seconds_float32'] > 0 and 'seconds_amp' not in dm
    assert baseline['code'] == ROOT and baseline['speedup'] == 1.0
    assert (cafe['outer'], cafe['inner'], cafe['queries']) == (2, 1, 3) and cafe['amp'] is False
    assert all(r['fp32_GFLOPs'] > 0 and r['dataset'] == 'MNIST' for r in rows)


@pytest.mark.e2e
@pytest.mark.slow
def test_papers_times_our_rows_without_the_papers_code(tiny_data, tmp_path):
    rows = bench('papers.py', '--only', 'dm_ipc10', '--iterations', 1, *TINY, '--data_path', tiny_data,
                 save_path=tmp_path)
    assert [(r['what'], r['who']) for r in rows] == [('dm_ipc10', 'ours, float32')]
    assert 'error' not in rows[0] and rows[0]['GFLOP'] > 0 and rows[0]['fraction_of_fp32_rate'] is not None


@pytest.mark.e2e
@pytest.mark.slow
def test_papers_times_our_idm_rows_without_the_authors_code(tmp_path):
    data = tmp_path / 'data'
    write_mnist(data, n_train=400, n_test=20)  # IDM's 2x2 mosaics start from 4 x ipc 10 real images per class
    rows = bench('papers.py', '--only', 'idm_ipc10', '--iterations', 1, *TINY, '--data_path', data,
                 '--script_flags=--batch_real 4 --trained_bs 8 --model_train_steps 1', save_path=tmp_path / 'out')
    assert [(r['what'], r['who']) for r in rows] == [('idm_ipc10', 'ours, float32')]  # (no --idm: no authors' row)
    assert 'error' not in rows[0] and rows[0]['GFLOP'] > 0 and rows[0]['fraction_of_fp32_rate'] is not None


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('DC_PAPERS'), reason="the papers' code is not here: set DC_PAPERS to a "
                    'checkout of VICO-UoE/DatasetCondensation to time it beside ours')
def test_papers_times_the_papers_code_beside_ours(tiny_data, tmp_path):
    rows = bench('papers.py', '--papers', os.environ['DC_PAPERS'], '--only', 'dm_ipc10', '--iterations', 1, *TINY,
                 '--data_path', tiny_data, save_path=tmp_path)
    assert [r['who'] for r in rows] == ['ours, float32', 'papers']
    assert not [r['error'] for r in rows if 'error' in r] and rows[1]['seconds'] is not None


@pytest.mark.e2e
@pytest.mark.torchrun
@pytest.mark.slow
def test_scaling_times_one_and_two_processes(tiny_data, tmp_path):
    rows = bench('scaling.py', '--what', 'dm', '--iterations', 1, '--warmup', 0, '--datasets', 'MNIST',
                 '--script_flags=--batch_real 4', '--data_path', tiny_data, save_path=tmp_path)
    assert [r['config'] for r in rows] == ['1 process, 1 thread', '2 processes, 1 thread each', '1 process, 2 threads']
    assert all(r['what'] == 'dm ipc 10' and r['seconds_per_iteration'] > 0 for r in rows)
    assert rows[0]['speedup'] == 1.0 and rows[0]['MB_exchanged_per_iteration'] == 0


def test_coresets_reports_per_class_on_the_network_main_py_then_reuses(tiny_data, tmp_path):
    def script(*argv):
        p = subprocess.run([sys.executable, *map(str, [*argv, '--dataset', 'MNIST', '--data_path', tiny_data,
                                                       '--save_path', tmp_path, '--coreset_epochs', 2])],
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        assert p.returncode == 0, p.stderr[-2000:]
        return p
    p = script(os.path.join(BENCH, 'coresets.py'), '--ipc', 1, 3)
    report = json.load(open(tmp_path / 'coresets_MNIST_2ep.json'))
    assert [r['images'] for r in report['classes']] == [10] * 10 and 0 <= report['test_accuracy'] <= 1
    for r in report['classes']:
        assert 0 <= r['never_learned'] <= 10 and r['never_learned'] + r['forgotten'] <= 10
        assert r['herding_rules_agree']['1'] == 1  # one pick: the image nearest the class mean, by both rules
        assert 1 <= r['herding_rules_agree']['3'] <= 3
    assert '| class | images | never learned |' in p.stdout and 'training a network' in p.stderr
    p = script('main.py', '--method', 'forgetting', '--ipc', 2, '--num_exp', 1, '--num_eval', 1, '--epoch_eval_train', 1)
    assert 'training a network' not in p.stderr  # the network the report was made on
