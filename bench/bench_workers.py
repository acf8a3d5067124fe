"""Per-run fixed cost of the local executor: runs in a fresh process each (the old executor) against long-lived
workers that keep their architecture's warm state (`study.local.run_local`), on the same grid, printed as a ratio.

Both sides run the same N tiny runs with 2 workers; the baseline calls `run_local` on one pair of runs at a time, so
every run starts in a fresh process (imports, thread pools, allocator, first-epoch warm-up paid again), as before.
Per-run fixed cost = (wall time - the work itself) / runs is estimated as the difference of the two sides per run.

    python bench/bench_workers.py [--runs 8] [--people 48]
"""
import argparse, os, shutil, tempfile, time
from pathlib import Path
import yaml


def make_study(work, people):
    from mugshotrace.synth.benchmark import SynthConfig, make_benchmark
    bench = make_benchmark(work/'bench', SynthConfig(people=people, width=80, height=100), progress=False)
    cols = {s: {'race': f'race_{s}', 'ethnicity': f'ethnicity_{s}'} for s in ('court', 'student')}
    d = {'name': 'w', 'data': {'labels': {'table': str(bench/'labels.csv'), 'columns': cols}, 'images': str(bench),
                               'preprocessed': str(work/'faces'), 'preprocess': {'progress': False, 'size': 48}},
         'train': {'epochs': 1, 'size': 32, 'bs': 16, 'n_per_class': 16, 'init': 'random', 'lr': 1e-2, 'aug': False},
         'grid': {'arch': ['tiny_cnn'], 'variant': ['original'], 'label_source': ['court', 'student'], 'seed': list(range(4))},
         'runs': 'runs'}
    p = work/'study.yaml'; p.write_text(yaml.safe_dump(d)); return p


def timed(study, runs_root, todo_fn):
    from mugshotrace.study.config import load_study
    from mugshotrace.study.grid import fingerprint_configs
    st = load_study(study); todo = fingerprint_configs(st.runs, st.data)
    shutil.rmtree(runs_root, ignore_errors=True)
    t = time.perf_counter(); todo_fn(todo, st.data, runs_root); return time.perf_counter() - t, len(todo)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--people', type=int, default=48); ap.add_argument('--work', default=None)
    a = ap.parse_args()
    from mugshotrace.study.local import run_local
    work = Path(a.work or tempfile.mkdtemp(prefix='bench_workers_'))
    study = make_study(work, a.people)
    def fresh(todo, data, root):   # the old executor: a fresh process per run, two at a time
        for k in range(0, len(todo), 2): run_local(todo[k:k + 2], data, root, workers=2)
    def warm(todo, data, root): run_local(todo, data, root, workers=2)
    print(f'load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores')
    tf, n = timed(study, work/'runs_fresh', fresh)
    tw, _ = timed(study, work/'runs_warm', warm)
    tf2, _ = timed(study, work/'runs_fresh', fresh)   # alternate, so that drift in load hits both sides
    tw2, _ = timed(study, work/'runs_warm', warm)
    f, w = (tf + tf2) / 2, (tw + tw2) / 2
    print(f'load average after: {os.getloadavg()[0]:.2f}')
    print(f'{n} tiny runs, 2 workers: fresh process per run {f:.1f} s ({tf:.1f}, {tf2:.1f}), long-lived workers {w:.1f} s '
          f'({tw:.1f}, {tw2:.1f}); speed-up {f / w:.2f}x; fixed cost saved per run {2 * (f - w) / n:.2f} s of worker time')


if __name__ == '__main__':
    main()
