"""The figures of docs/results.md, made from the runs' own files, so anyone can redo them.

    python docs/figures.py RUN_FOLDER [RUN_FOLDER ...] --out docs/img [--evals EVAL_JSON ...]
    python docs/figures.py --update --curves full_dc_fmnist_1 dm_f32 ...   # redraw from docs/img alone

Everything is read from the runs' JSON records (res_<method>_<dataset>_<model>_<ipc>ipc.json, written by
runs.summarise: status, signature, protocol, results, history [{exp, it, accs}], pace), never from printed
output. For every run folder (a --save_path) and every record in it: its synthetic images at the last
evaluation (the run's own vis_*.png, copied, shrunk when large) as <out>/<run>.png, and a summary
<out>/runs.json of each run's record (accuracies at every evaluation, the final results, the pace, the
settings). A run is named after its folder (<folder>_<method>_<dataset>_<model>_<ipc>ipc when the folder
holds several records). With matplotlib installed (optional, for this script only), also <out>/curves.png:
accuracy against iterations, one panel per dataset, for every run evaluated at more than one iteration
(or those named with `--curves`); each point is the mean +- std over all the run's experiments and models
at that iteration.
With `--update`, the runs already in <out>/runs.json and not given here are kept (their records from
runs.json, their grids as they are), and so are the evaluations in <out>/evaluations.json: one new run can
be added without the others' folders, and the figures redrawn from <out> alone.
evaluate.py's outputs given with `--evals` (<set>_eval.json, e.g. a cross-architecture evaluation) become
one table, a row per evaluated set (files that evaluated one set on other models share it; a --baseline of
random real images has its own) and a column per model: <out>/evaluations.md, with their results in
<out>/evaluations.json. Those evaluated with `evaluate.py --test_every` also make <out>/epochs.png (with
matplotlib): test accuracy against the evaluation models' training epochs, one panel per model, a curve per
file and per --baseline (mean +- std over its models).
"""
import argparse
import glob
import json
import os
import re
import sys

MAX_SIDE = 640  # pixels: grids larger than this are shrunk
KEPT = ('method', 'dataset', 'model', 'ipc', 'Iteration', 'num_eval', 'num_exp', 'eval_mode', 'dsa_strategy',
        'epoch_eval_train', 'seed', 'amp')  # the settings runs.json keeps
MARKERS = {'DC': 'o', 'DSA': 's', 'DM': '^', 'CAFE': 'D', 'CAFE_DSA': 'P'}  # a marker per method (curves that
# lie on each other stay told apart); --amp runs are drawn dashed
EVAL_SETTINGS = ('input', 'set_id', 'dataset', 'method', 'model', 'ipc', 'eval_mode', 'dsa_strategy', 'num_eval',
                 'epoch_eval_train', 'seed')


def read(path):
    with open(path) as f:
        return json.load(f)


def is_record(obj):
    """Whether `obj` is a run's record (runs.summarise), not e.g. evaluate.py's <set>_eval.json beside it."""
    return isinstance(obj, dict) and isinstance(obj.get('protocol'), dict) and 'signature' in obj


def records(folder):
    """The run records in a run folder, each with its name (res_<name>.json) and its run name."""
    found = []
    for path in sorted(glob.glob(os.path.join(folder, 'res_*.json'))):
        rec = read(path)
        if is_record(rec):
            found.append(dict(rec, name=os.path.basename(path)[4:-5]))
    base = os.path.basename(os.path.normpath(folder))
    for rec in found:
        rec['run'] = base if len(found) == 1 else f"{base}_{rec['name']}"
    return found


def grid(folder, name, out, run):
    """The run's images at its last evaluation (vis_<name>_exp<e>_iter<it>.png), shrunk to at most MAX_SIDE
    pixels a side, as <out>/<run>.png; None when it drew none."""
    pattern = re.compile(re.escape(f'vis_{name}_exp') + r'(\d+)_iter(\d+)\.png')
    vis = sorted((tuple(map(int, m.groups())), f) for f in os.listdir(folder) for m in [pattern.fullmatch(f)] if m)
    if not vis:
        return None
    from PIL import Image
    img = Image.open(os.path.join(folder, vis[-1][1]))
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.NEAREST)
    img.save(os.path.join(out, run + '.png'), optimize=True)
    return run + '.png'


def summary(rec):
    """What runs.json keeps of a record."""
    return {k: rec.get(k) for k in ('run', 'name', 'status', 'results', 'history', 'grid')} | \
        ({'pace': rec['pace']} if rec.get('pace') else {}) | {'protocol': {k: rec['protocol'].get(k) for k in KEPT}}


def curve(rec):
    """[(iteration, mean, std)] of the run's training model (else the first model evaluated): at each
    evaluated iteration, over the accuracies of all its experiments' models."""
    history = rec.get('history') or []
    if not history:
        return []
    model = rec['protocol']['model'] if rec['protocol']['model'] in history[0]['accs'] else next(iter(history[0]['accs']))
    pooled = {}
    for h in history:
        pooled.setdefault(h['it'], []).extend(h['accs'].get(model, []))
    points = []
    for it, accs in sorted(pooled.items()):
        if accs:
            mean = sum(accs) / len(accs)
            points.append((it, mean, (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5))
    return points


def curves(recs):
    """Accuracy against iterations, one panel per dataset (in the order they first appear), a curve per run
    evaluated at more than one iteration. Returns the matplotlib figure (None without such runs); raises
    ImportError without matplotlib."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator
    panels = {}
    for rec in recs:
        points = curve(rec)
        if len(points) > 1:
            panels.setdefault(rec['protocol']['dataset'], []).append((rec, points))
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, (dataset, runs) in zip(axes[:, 0], panels.items()):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 20 distinct colours: the default 10 repeat from the 11th run
        for rec, points in runs:
            its, means, stds = zip(*points)
            p = rec['protocol']
            amp = ', --amp' if p.get('amp') else ''
            ax.errorbar(its, [100 * m for m in means], yerr=[100 * s for s in stds], capsize=3, markersize=5,
                        marker=MARKERS.get(p['method'], 'o'), linestyle='--' if amp else '-',
                        label=f"{rec['run']} ({p['method']}, ipc {p['ipc']}, {max(its)} it{amp})")
        # iterations on a symmetric log scale (linear up to 10): runs of 50 and of 2000 iterations both show
        ticks = sorted({it for _, points in runs for it, *_ in points})
        ax.set_xscale('symlog', linthresh=10, linscale=0.5)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlim(-1, max(ticks) * 1.3)
        ax.set_title(dataset, fontsize=10, loc='left')
        ax.set_ylabel('test accuracy (%)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))  # beside the axes: it hides no point
    axes[-1, 0].set_xlabel('iteration (symmetric log scale)')
    fig.tight_layout()
    return fig


def epoch_curves(evals):
    """Test accuracy against training epochs (evaluate.py --test_every), one panel per evaluation model, a
    curve per evaluation that has one, and one per --baseline of real images (x markers). Returns the
    matplotlib figure (None without such curves)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = {}
    for e in evals:
        st, base = e['settings'], e.get('baseline') or {}
        for results, name, marker in ((e['results'], f"{e['file']} ({st['method']}, ", MARKERS.get(st['method'], 'o')),
                                      (base.get('results', {}), f"{base.get('kind')} real images (", 'x')):
            for m, r in results.items():
                c = r.get('curve')
                drawn = c and c['n'] and (f"{name}ipc {st['ipc']}, n={c['n']})", marker, c)
                if drawn and drawn not in panels.get(m, []):  # (two evaluations of one baseline draw it once)
                    panels.setdefault(m, []).append(drawn)
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, (model, found) in zip(axes[:, 0], panels.items()):
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for label, marker, c in found:
            ax.errorbar(c['epochs'], [100 * m for m in c['mean']], yerr=[100 * s for s in c['std']], capsize=3,
                        marker=marker, markersize=4, label=label)
        ax.set_title(model, fontsize=10, loc='left')
        ax.set_ylabel('test accuracy (%)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1))
    axes[-1, 0].set_xlabel('epochs of training the evaluation model')
    fig.tight_layout()
    return fig


def evaluation_entry(path):
    """What evaluations.json keeps of one evaluate.py output."""
    rec = read(path)
    st = rec['settings']
    baseline = rec.get('baseline') and {k: rec['baseline'][k] for k in ('kind', 'results')}  # (not its indices)
    return dict(file=os.path.basename(path), finished=rec.get('finished'), results=rec['results'],
                settings={k: st.get(k) for k in EVAL_SETTINGS}, baseline=baseline)


def evaluations_table(evals):
    """A markdown table of evaluate.py's results (mean +- std (n) in %), a row per evaluated set and a column
    per model: evaluations of one set (the same images: set_id) on other models share its row, and a
    --baseline (random real images of the same number, the same draw for the same seed) has a row of its own."""
    rows = {}  # key -> dict(name, file, results: {model: result})
    for e in evals:
        st = e['settings']
        name = f"{st['method']}, {st['dataset']}, ipc {st['ipc']}" + ('' if e['finished'] else ' (unfinished)')
        row = rows.setdefault(st.get('set_id') or e['file'], dict(name=name, file=e['file'], results={}))
        row['results'].update(e['results'])
        if e.get('baseline'):
            name = f"{e['baseline']['kind']} real images, {st['dataset']}, ipc {st['ipc']}"
            row = rows.setdefault(('baseline', name, st.get('seed')), dict(name=name, file=None, results={}))
            row['results'].update(e['baseline']['results'])
    names = [r['name'] for r in rows.values()]
    models = list(dict.fromkeys(m for r in rows.values() for m in r['results']))
    cell = lambda r: f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} (n={r['n']})" if r else '—'
    lines = ['| set | ' + ' | '.join(models) + ' |', '|---|' + '---|' * len(models)]
    for r in rows.values():
        name = r['name'] + (f" ({r['file']})" if names.count(r['name']) > 1 and r['file'] else '')  # two sets of one name
        lines.append(f'| {name} | ' + ' | '.join(cell(r['results'].get(m)) for m in models) + ' |')
    return '\n'.join(lines) + '\n'


def merged(path, key, new):
    """The entries of the JSON list at `path` (if any), each replaced by the entry of `new` with the same `key`
    where there is one, in their order; then the other entries of `new`."""
    new_by_key = {e[key]: e for e in new}
    old = read(path) if os.path.exists(path) else []
    return [new_by_key.pop(e[key], e) for e in old] + list(new_by_key.values())


def main(argv=None):
    """Returns the curves figure (None when none was drawn)."""
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('runs', nargs='*', help='run folders (--save_path of each run)')
    p.add_argument('--evals', nargs='+', default=[], help="evaluate.py's outputs (<set>_eval.json) for one table")
    p.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'img'))
    p.add_argument('--curves', nargs='+', help='the runs whose curves to draw (default: every run evaluated more than once)')
    p.add_argument('--update', action='store_true',
                   help='keep the runs of <out>/runs.json and the evaluations of <out>/evaluations.json not given')
    a = p.parse_args(argv)
    if not a.runs and not a.evals and not a.update:
        p.error('give run folders, --evals files, or --update')
    os.makedirs(a.out, exist_ok=True)
    recs = []
    for folder in a.runs:
        found = records(folder)
        if not found:
            print(f'{folder}: no run record (res_*.json): skipped', file=sys.stderr)
        for rec in found:
            rec['grid'] = grid(folder, rec['name'], a.out, rec['run'])
            recs.append(rec)
    runs_json = os.path.join(a.out, 'runs.json')
    if a.update:
        recs = merged(runs_json, 'run', recs)
    fig = None
    if a.runs or a.update:
        with open(runs_json, 'w') as f:
            json.dump([summary(r) for r in recs], f, indent=1)
        drawn = {os.path.basename(os.path.normpath(c)) for c in a.curves} if a.curves else None
        missing = sorted(drawn - {r['run'] for r in recs}) if drawn else []
        if missing:
            p.error(f"--curves names runs not given (with a record): {' '.join(missing)}")
        try:
            fig = curves([r for r in recs if drawn is None or r['run'] in drawn])
        except ImportError:
            print('matplotlib is not installed: no curves.png (pip install matplotlib)', file=sys.stderr)
        if fig is not None:
            fig.savefig(os.path.join(a.out, 'curves.png'), dpi=120, bbox_inches='tight')
    evals_json = os.path.join(a.out, 'evaluations.json')
    evals = [evaluation_entry(path) for path in a.evals]
    if a.update:
        evals = merged(evals_json, 'file', evals)
    if a.evals or (a.update and evals):
        table = evaluations_table(evals)
        print(table, end='')
        with open(os.path.join(a.out, 'evaluations.md'), 'w') as f:
            f.write(table)
        with open(evals_json, 'w') as f:
            json.dump(evals, f, indent=1)
        try:
            against_epochs = epoch_curves(evals)
        except ImportError:
            against_epochs = None
        if against_epochs is not None:
            against_epochs.savefig(os.path.join(a.out, 'epochs.png'), dpi=120, bbox_inches='tight')
    return fig


if __name__ == '__main__':
    main()
