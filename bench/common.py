"""What the benchmarks share: their data (CIFAR-10 extracted from its archive once), the machine's matrix
rates, a script's arguments, real images and synthetic set built as the script itself builds them, and
the JSON lines they print and read.

A benchmark imports this module from bench/ (its own folder, first on sys.path when it runs as a script);
the project's scripts and utils are imported from ROOT, or from another checkout put first on sys.path
with `use_code` (bench/speed.py cafe --baseline). Such a checkout must have runs.py and the scripts'
configure() and the method classes of the harness redesign (commit ea91562 on).
"""
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ['FashionMNIST', 'CIFAR10']
CIFAR10_TAR = os.path.join(ROOT, '..', 'shared', 'datasets', 'cifar10.tar')
SAVE_PATH = '/tmp/bench_out'


def use_code(code=ROOT):
    """Import the project's scripts, utils and runs from the checkout `code` (default: this one)."""
    code = os.path.abspath(code)
    if code not in sys.path[:1]:
        sys.path.insert(0, code)


def add_arguments(p, rates=True):
    """The options every benchmark has: the datasets and where they are, extra flags for the scripts' command
    lines, and for those that time float32 against --amp and state the matrix rates (`rates`), whether to
    time float32 only and the size of the matrix product."""
    p.add_argument('--datasets', nargs='+', default=DATASETS,
                   help="any of the scripts' --dataset names (e.g. MNIST: a tiny copy in --data_path for a quick check)")
    p.add_argument('--cifar10', default=CIFAR10_TAR, help='the CIFAR-10 image-folder archive')
    p.add_argument('--data_path', type=os.path.abspath, default='/tmp/bench_data',
                   help='where the data is (and CIFAR-10 is extracted)')
    p.add_argument('--save_path', type=os.path.abspath, default=SAVE_PATH,
                   help="where the scripts' runs write (nothing there is kept)")
    p.add_argument('--script_flags', default='',
                   help='more flags for every script command line the benchmark builds, as one string, e.g. '
                        '"--batch_real 32" for a quick check (the figures then measure that, not the defaults)')
    if rates:
        p.add_argument('--float32_only', '--no_amp', action='store_true', help='no --amp rows')
        p.add_argument('--matrix_size', type=int, default=2048,
                       help='side of the square matrix product whose float32 and bfloat16 rates every row states '
                            '(smaller: quicker and rougher)')


def prepare_data(a):
    """Make the data path; extract CIFAR-10 (an image-folder tree) into <data_path>/CIFAR10 once, if wanted.
    The archive is extracted beside it first and moved into place whole, so an interrupted extraction
    leaves no half tree that a later run would take for the data."""
    os.makedirs(a.data_path, exist_ok=True)
    target = os.path.join(a.data_path, 'CIFAR10')
    if 'CIFAR10' not in a.datasets or os.path.isdir(os.path.join(target, 'train')):
        return
    if not os.path.isfile(a.cifar10):
        sys.exit(f'no CIFAR-10 archive at {a.cifar10} (give --cifar10, or --datasets FashionMNIST)')
    partial = tempfile.mkdtemp(prefix='.CIFAR10_', dir=a.data_path)
    try:
        with tarfile.open(a.cifar10) as tar:
            tar.extractall(partial, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
        os.makedirs(target, exist_ok=True)
        for name in os.listdir(partial):
            os.replace(os.path.join(partial, name), os.path.join(target, name))
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def matrix_rates(size=2048, repeats=5):
    """GFLOP/s of a size^3 matrix product in float32 and in bfloat16 (the median of `repeats`, after one
    untimed product)."""
    import torch
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        rates[str(dtype).split('.')[-1]] = 2 * size ** 3 / sorted(times)[repeats // 2] / 1e9
    return rates


def rate_fields(rates):
    """The matrix rates as a row's fields."""
    return dict(fp32_GFLOPs=round(rates['float32'], 1), bf16_GFLOPs=round(rates['bfloat16'], 1))


def fractions(gflop, seconds, rates):
    """`gflop` of work done in `seconds` as fractions of the float32 and bfloat16 matrix rates."""
    return {dtype: round(gflop / seconds / rates[dtype], 3) for dtype in ('float32', 'bfloat16')}


def script_module(script):
    """A script's module, from the module itself or its name ('main_DM' or 'main_DM.py')."""
    if isinstance(script, str):
        return importlib.import_module(script[:-3] if script.endswith('.py') else script)
    return script


def script_args(script, dataset, ipc, a, *flags):
    """The args of `script` for `--dataset dataset --ipc ipc *flags` (and --script_flags), as the script's
    main() resolves them: its parser, runs.setup, then its own configure()."""
    import runs
    script = script_module(script)
    argv = ['--dataset', dataset, '--ipc', str(ipc), '--data_path', a.data_path,
            '--save_path', a.save_path, *flags, *shlex.split(a.script_flags or '')]
    return script.configure(runs.setup(script.parser().parse_args(argv)))


# each script's method class (main.py: gradient matching, or the coresets for their --method)
METHODS = {'main': 'GradientMatching', 'main_DM': 'DM', 'distill': 'CAFE', 'main_IDM': 'IDM', 'main_MTT': 'MTT'}


def method_class(script, args):
    """The method class `script` condenses with for `args` (as its __main__ block picks it)."""
    module = script_module(script)
    name = module.__name__
    if name == 'main' and args.method in getattr(module, 'CORESETS', ()):
        return module.Coreset
    return getattr(module, METHODS[name])


def condense(script, argv):
    """A whole run of our `script` for the command line `argv`, as its __main__ block runs it (without
    run_script's exit): its parser, runs.setup, its configure(), runs.condense with its method class."""
    import runs
    script = script_module(script)
    args = script.configure(runs.setup(script.parser().parse_args(argv)))
    return runs.condense(method_class(script, args), args)


def setup(dataset, ipc, a, *flags, script=None):
    """What a condensation run of `script` (main, main_DM, distill or main_IDM, as a module or a name; default
    main.py) starts its first experiment with: its args (see script_args), frozen as runs.condense freezes them,
    the real images by class, the test loader, the data's DataInfo, the method (the script's method class built
    with them) and the synthetic set from the random streams of (--seed, 0); under torchrun, holding this
    process's share of the classes (every class for a joint-BatchNorm method on a BatchNorm model, as runs.Run
    does)."""
    import runs
    import utils
    script = script_module(script or 'main')
    args = runs.Flags.freeze(script_args(script, dataset, ipc, a, *flags))
    real, testloader, data = runs.load_real(args)
    method = method_class(script, args)(args, data)
    joint = method.joint_batchnorm and utils.has_batchnorm(
        utils.get_network(args.model, data.channel, 2, data.im_size, 'cpu'))
    classes = None if joint else utils.shard(data.num_classes)
    syn = runs.new_synset(real, method, (args.seed, 0), classes=classes)
    return args, real, testloader, data, method, syn


def test_batches(testloader, n=None):
    """The test set's batches, or (`n`) its first n images as one batch."""
    if not n:
        return testloader
    import torch
    xs, ys, have = [], [], 0
    for x, y in testloader:
        xs.append(x[:n - have])
        ys.append(y[:n - have])
        have += len(xs[-1])
        if have >= n:
            break
    return [(torch.cat(xs), torch.cat(ys))]


def emit(row):
    """A result row: one JSON line on the real stdout (a script under test may have replaced sys.stdout)."""
    print(json.dumps(row), file=sys.__stdout__, flush=True)


def run_json(cmd, **kw):
    """Run `cmd` (a benchmark's worker in a fresh process) and read the JSON line it printed last.
    Returns (that object, None), or (None, the end of its stderr) when it failed."""
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode:
        return None, p.stderr.strip()[-2000:] or f'exit status {p.returncode}'
    return json.loads(p.stdout.strip().splitlines()[-1]), None
