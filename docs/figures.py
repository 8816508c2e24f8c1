"""The figures of docs/results.md, made from the runs' own files, so anyone can redo them.

    python docs/figures.py RUN_FOLDER [RUN_FOLDER ...] --out docs/img [--evals EVAL_JSON ...]

For every run folder (a --save_path): its synthetic images at the last evaluation (the run's own
vis_*.png, copied, shrunk when large) as docs/img/<run>.png, and a summary docs/img/runs.json of each
run's record (accuracies at every evaluation, the final mean +- std, the settings). With matplotlib
installed (optional, for this script only), also docs/img/curves.png: accuracy against iterations for
every run that was evaluated more than once (or those named with `--curves`). A run of an older version
without the history in its record is read from its log (`--logs`, the run's stdout saved as <folder>.out).
With `--update`, the runs already in docs/img/runs.json and not given here are kept (their records from
runs.json, their grids as they are), so one new run can be added without the others' folders.
evaluate.py's outputs given with `--evals` (<set>_eval.json, e.g. a cross-architecture evaluation) become
one table, a row per file and a column per model: docs/img/evaluations.md, with their results in
docs/img/evaluations.json.
"""
import argparse
import glob
import json
import os
import re

from PIL import Image

MAX_SIDE = 640  # pixels: grids larger than this are shrunk


def run_name(folder):
    """A run's name: its folder's."""
    return os.path.basename(os.path.normpath(folder))


def record(folder, logs):
    """The run's record (res_*.json), with its history (from the record, else parsed from its log)."""
    paths = glob.glob(os.path.join(folder, 'res_*.json'))
    if not paths:
        return None
    with open(paths[0]) as f:
        rec = json.load(f)
    if not rec.get('history') and logs:
        log = os.path.join(logs, run_name(folder) + '.out')
        if os.path.exists(log):
            rec['history'] = parse_log(open(log).read())
    rec['name'] = os.path.basename(paths[0])[4:-5]
    return rec


def parse_log(text):
    """[{exp, it, accs: {model: [mean]}}] from a run's stdout: the evaluation iterations it printed and each
    evaluation's 'Evaluate N random MODEL, mean = x std = y' lines."""
    its = json.loads(re.search(r'at iterations (\[[0-9, ]*\])', text).group(1))
    means = re.findall(r'Evaluate \d+ random (\S+), mean = ([0-9.]+) std = ([0-9.]+)', text)
    models = list(dict.fromkeys(m for m, _, _ in means))
    history = []
    for k in range(len(means) // len(models)):
        chunk = means[k * len(models):(k + 1) * len(models)]
        history.append(dict(exp=k // len(its), it=its[k % len(its)], mean={m: float(x) for m, x, _ in chunk},
                            std={m: float(s) for m, _, s in chunk}))
    return history


def point(entry, model):
    """(mean, std) of one evaluation."""
    if 'accs' in entry:
        accs = entry['accs'][model]
        mean = sum(accs) / len(accs)
        return mean, (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
    return entry['mean'][model], entry['std'][model]


def grid(folder, out, name):
    """The run's images at its last evaluation, shrunk to at most MAX_SIDE pixels a side."""
    vis = sorted(glob.glob(os.path.join(folder, 'vis_*.png')), key=lambda p: [int(n) for n in re.findall(r'\d+', p)[-2:]])
    if not vis:
        return None
    img = Image.open(vis[-1])
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.NEAREST)
    img.save(os.path.join(out, name + '.png'), optimize=True)
    return name + '.png'


def curves(records, out):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no curves.png (pip install matplotlib)')
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 20 distinct colours: the default 10 repeat from the 11th run
    for rec in records:
        hist = [h for h in rec.get('history', []) if h['exp'] == 0]
        if len(hist) < 2:
            continue
        model = rec['protocol']['model'] if rec['protocol']['model'] in (hist[0].get('accs') or hist[0]['mean']) \
            else next(iter(hist[0].get('accs') or hist[0]['mean']))
        pts = [(h['it'], *point(h, model)) for h in hist]
        its, means, stds = zip(*pts)
        ax.errorbar(its, [100 * m for m in means], yerr=[100 * s for s in stds], marker='o', capsize=3,
                    label=f"{rec['run']} ({rec['protocol']['method']}, {rec['protocol']['dataset']}, ipc {rec['protocol']['ipc']})")
    ax.set_xlabel('iteration')
    ax.set_ylabel('test accuracy (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))  # beside the axes: it hides no point
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'curves.png'), dpi=120, bbox_inches='tight')


def evaluations(paths, out):
    """A markdown table of evaluate.py's results (mean +- std (n) in %), a row per file, a column per model."""
    evals = []
    for path in paths:
        with open(path) as f:
            rec = json.load(f)
        st = rec['settings']
        evals.append(dict(file=os.path.basename(path), finished=rec.get('finished'), results=rec['results'],
                          settings={k: st.get(k) for k in ('input', 'dataset', 'method', 'model', 'ipc', 'eval_mode',
                                                           'dsa_strategy', 'num_eval', 'epoch_eval_train', 'seed')}))
    models = list(dict.fromkeys(m for e in evals for m in e['results']))
    cell = lambda r: f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} (n={r['n']})" if r else '—'
    lines = ['| set | ' + ' | '.join(models) + ' |', '|---|' + '---|' * len(models)]
    for e in evals:
        st = e['settings']
        name = f"{st['method']}, {st['dataset']}, ipc {st['ipc']}" + ('' if e['finished'] else ' (unfinished)')
        lines.append(f'| {name} | ' + ' | '.join(cell(e['results'].get(m)) for m in models) + ' |')
    table = '\n'.join(lines) + '\n'
    print(table, end='')
    with open(os.path.join(out, 'evaluations.md'), 'w') as f:
        f.write(table)
    with open(os.path.join(out, 'evaluations.json'), 'w') as f:
        json.dump(evals, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('runs', nargs='*', help='run folders (--save_path of each run)')
    p.add_argument('--evals', nargs='+', default=[], help="evaluate.py's outputs (<set>_eval.json) for one table")
    p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'img'))
    p.add_argument('--curves', nargs='+', help='the run folders whose curves to draw (default: every run evaluated more than once)')
    p.add_argument('--logs', help='a folder of the runs\' stdout, <run folder name>.out (for older records)')
    p.add_argument('--update', action='store_true', help='keep the runs of <out>/runs.json that are not given')
    a = p.parse_args()
    if not a.runs and not a.evals and not a.update:
        p.error('give run folders, --evals files, or --update')
    os.makedirs(a.out, exist_ok=True)
    records = []
    for folder in a.runs:
        rec = record(folder, a.logs)
        if rec is None:
            print(f'{folder}: no record (res_*.json): skipped')
            continue
        rec['run'] = run_name(folder)
        rec['grid'] = grid(folder, a.out, rec['run'])
        records.append(rec)
    summary = os.path.join(a.out, 'runs.json')
    if a.update and os.path.exists(summary):
        given = {r['run'] for r in records}
        with open(summary) as f:
            kept = [r | {'run': r.get('run') or os.path.splitext(r['grid'])[0]} for r in json.load(f)]
        records = [r for r in kept if r['run'] not in given] + records
    if a.runs or a.update:
        with open(summary, 'w') as f:
            json.dump([{k: r.get(k) for k in ('run', 'name', 'status', 'results', 'history', 'grid')} |
                       {'protocol': {k: r['protocol'].get(k) for k in ('method', 'dataset', 'model', 'ipc', 'Iteration',
                                                                       'num_eval', 'num_exp', 'eval_mode', 'dsa_strategy',
                                                                       'epoch_eval_train', 'seed', 'amp')}}
                       for r in records], f, indent=1)
        drawn = {run_name(c) for c in a.curves} if a.curves else None
        missing = sorted(drawn - {r['run'] for r in records}) if drawn else []
        if missing:
            p.error(f"--curves names runs not given (with a record): {' '.join(missing)}")
        curves([r for r in records if drawn is None or r['run'] in drawn], a.out)
    if a.evals:
        evaluations(a.evals, a.out)


if __name__ == '__main__':
    main()
