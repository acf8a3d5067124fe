"""Benchmark: the disparity stage on 200,000 synthetic predictions with 1,000 bootstrap replicates.

Candidate: `disparity.estimators.estimate_all` (naive, weighted, corrected and bounds; every replicate resamples the
outcome population and the labelled set, the estimators computed from weighted sufficient statistics as matrix
products) plus `impute.impute_means` (20 imputations); then `estimate_all` on a continuous (log-normal) outcome, whose
trimming bounds use weighted quantiles of each replicate (people sorted once, block sums of the counts), its first
replicates checked against `bound_means` on the same draws. Baseline, in the same invocation: the textbook loop — per
replicate, resample the rows with fancy indexing and call the direct estimators (`naive_means`, `weighted_means`,
`corrected_means`, `bound_means`) — timed on a few replicates and extrapolated (printed as such). The two agree
on the point estimates (checked). Then the whole front door, `disparity()`, on a 200,000-row bulk-label file with a
binary and a log-normal outcome (files written in the package's formats, one labelling, one label source), timed
untraced after a warm-up call (imports), then rerun under tracemalloc for its peak memory (the peak of Python/numpy
allocations; and the process's peak RSS).

    python bench/bench_disparity.py                 # n = 200,000, n_boot = 1000, imputations = 20
    python bench/bench_disparity.py --n 20000 --n-boot 200 --baseline-reps 5
"""
import argparse, os, resource, tempfile, time, tracemalloc
from pathlib import Path
import numpy as np
import pandas as pd
from mugshotrace.core import write_csv, write_json, write_bytes, sha256_file, RunPaths
from mugshotrace.disparity.estimators import (estimate_all, error_matrix, naive_means, weighted_means, corrected_means, bound_means)
from mugshotrace.disparity.impute import impute_means
from mugshotrace.disparity.simulate import simulate_population

def baseline(s, reps, seed=0):
    "The textbook bootstrap: resample rows, call the direct estimators, once per replicate."
    rng = np.random.default_rng(seed); n, nl = len(s['y']), len(s['lab_true']); out = []
    for _ in range(reps):
        i, j = rng.integers(0, n, n), rng.integers(0, nl, nl)
        y, p, P = s['y'][i], s['pred'][i], s['P'][i]; M = error_matrix(s['lab_true'][j], s['lab_pred'][j], 2)[0]
        out.append((naive_means(y, p, 2), weighted_means(y, P), corrected_means(y, p, M)[0], bound_means(y, p, M)))
    return out

def write_inputs(d, s, n_lab):
    "A bulk-label file, an outcome table and an audited run for the simulated population, in the package's formats."
    from safetensors.numpy import save as st_save
    n = len(s['y']); ids = [f'i{k:07d}' for k in range(n)]; cl = ['Black', 'White']
    rp = RunPaths(d/'runs'/'sim'); write_json(rp.config, {'run_id': 'sim', 'label_source': 'court'})
    write_bytes(rp.weights, st_save({'w': np.zeros(4, np.float32)})); sha = sha256_file(rp.weights)
    write_json(rp.model_json, {'classes': cl, 'weights_sha256': sha, 'weights_file': 'model.safetensors', 'run_id': 'sim'})
    write_json(rp.state, {'state': 'done'})
    lab = pd.DataFrame({'image_id': [f'l{k}' for k in range(n_lab)], 'Black_Prob': 0.5, 'White_Prob': 0.5,
                        'Prediction': np.array(cl)[s['lab_pred']], 'label': np.array(cl)[s['lab_true']]})
    write_csv(rp.preds('court__all'), lab); write_json(rp.preds('court__all').with_suffix('.json'), {'dataset': 'court/all', 'label_source': 'court', 'model_sha256': sha})
    b = pd.DataFrame({'image_id': ids, 'Black_Prob': s['P'][:, 0], 'White_Prob': s['P'][:, 1], 'Prediction': np.array(cl)[s['pred']], 'status': 'ok', 'reason': ''})
    write_csv(d/'bulk.csv', b); write_json(d/'bulk.csv.json', {'settings': {'model_sha256': sha, 'classes': cl}})
    rng = np.random.default_rng(1)
    write_csv(d/'cases.csv', pd.DataFrame({'image_id': ids, 'detained': s['y'].astype(int), 'bail': np.round(np.exp(8.5 + 0.3 * s['g'] + rng.normal(0, 1, n)), 2)}))
    return rp.root

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=200_000); ap.add_argument('--n-lab', type=int, default=5000)
    ap.add_argument('--n-boot', type=int, default=1000); ap.add_argument('--imputations', type=int, default=20)
    ap.add_argument('--baseline-reps', type=int, default=20, help='replicates the baseline loop is timed on (extrapolated)')
    a = ap.parse_args(argv)
    print(f'load average {tuple(round(x, 2) for x in os.getloadavg())} on {os.cpu_count()} CPUs (shared machine: other jobs may be running)')
    s = simulate_population(n=a.n, n_lab=a.n_lab, seed=0)
    print(f'{a.n:,} predictions, labelled set {a.n_lab:,}, {a.n_boot} bootstrap replicates')
    tracemalloc.start()
    c = time.process_time(); t = time.perf_counter(); pt, bs = estimate_all(s['y'], s['pred'], s['P'], s['lab_true'], s['lab_pred'], n_boot=a.n_boot, seed=0); t_ours = time.perf_counter() - t; c_ours = time.process_time() - c
    peak_boot = tracemalloc.get_traced_memory()[1]; tracemalloc.reset_peak()
    c = time.process_time(); t = time.perf_counter(); impute_means(s['y'], s['P'], s['pred'], s['lab_true'], s['lab_pred'], True, m=a.imputations); t_mi = time.perf_counter() - t; c_mi = time.process_time() - c
    peak_mi = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    t = time.perf_counter(); base = baseline(s, a.baseline_reps); t_base = (time.perf_counter() - t) / a.baseline_reps * a.n_boot
    M = error_matrix(s['lab_true'], s['lab_pred'], 2)[0]
    assert np.allclose(pt['corrected'], corrected_means(s['y'], s['pred'], M)[0]) and np.allclose(pt['bounds_low'], bound_means(s['y'], s['pred'], M)[0])
    print(f'bootstrap, all four estimators: ours {t_ours:.2f} s wall, {c_ours:.2f} s CPU (tracemalloc peak {peak_boot / 2**20:.0f} MiB); '
          f'baseline loop {t_base:.1f} s (timed on {a.baseline_reps} replicates, extrapolated): ratio {t_base / t_ours:.1f}x')
    print(f'multiple imputation, {a.imputations} imputations: {t_mi:.2f} s wall, {c_mi:.2f} s CPU (tracemalloc peak {peak_mi / 2**20:.0f} MiB)')
    # a continuous outcome (log bail): its trimming bounds need each replicate's weighted quantiles
    yc = 8.5 + 0.3 * s['g'] + np.random.default_rng(1).normal(0, 1, a.n)
    tracemalloc.start(); c = time.process_time(); t = time.perf_counter()
    pc, bc = estimate_all(yc, s['pred'], s['P'], s['lab_true'], s['lab_pred'], n_boot=a.n_boot, seed=0)
    t_c = time.perf_counter() - t; c_c = time.process_time() - c; peak_c = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    # check: the first replicates equal the direct estimators on the same draws (resample, `bound_means` with the counts as weights)
    rng = np.random.default_rng(0); n, nl = a.n, a.n_lab; ok = True
    ws = [np.bincount(rng.integers(0, n, n), minlength=n).astype(float) for _ in range(min(50, a.n_boot))]
    Ms = [error_matrix(s['lab_true'][j], s['lab_pred'][j], 2)[0] for j in [rng.integers(0, nl, nl) for _ in range(len(ws))]]
    for b in range(min(3, len(ws))):
        lo, hi = bound_means(yc, s['pred'], Ms[b], w=ws[b]); ok &= np.allclose(bc['bounds_low'][b], lo, rtol=1e-10) and np.allclose(bc['bounds_high'][b], hi, rtol=1e-10)
    assert ok and np.allclose(pc['bounds_low'], bound_means(yc, s['pred'], M)[0], rtol=1e-12)
    print(f'bootstrap, continuous outcome (trimming bounds by weighted quantiles): {t_c:.2f} s wall, {c_c:.2f} s CPU (tracemalloc peak {peak_c / 2**20:.0f} MiB); '
          f'first replicates equal the direct bounds on the same draws')
    from mugshotrace.disparity.stage import disparity, DisparityConfig
    with tempfile.TemporaryDirectory() as d:
        d = Path(d); run = write_inputs(d, s, a.n_lab)
        cfg = DisparityConfig(n_boot=a.n_boot, imputations=a.imputations)
        disparity(d/'bulk.csv', d/'warm', DisparityConfig(n_boot=2, imputations=2), outcomes=d/'cases.csv', audit=run, progress=False)  # imports (matplotlib) out of the timing
        t = time.perf_counter(); c = time.process_time()    # timed without tracemalloc (it slows numpy's many allocations)
        disparity(d/'bulk.csv', d/'out', cfg, outcomes=d/'cases.csv', audit=run, progress=False)
        t_stage = time.perf_counter() - t; c_stage = time.process_time() - c
        tracemalloc.start(); disparity(d/'bulk.csv', d/'out2', cfg, outcomes=d/'cases.csv', audit=run, progress=False)
        peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
        assert pd.read_csv(d/'out'/'disparity.csv').equals(pd.read_csv(d/'out2'/'disparity.csv'))   # the same seed, the same table
    print(f'load average at the end {tuple(round(x, 2) for x in os.getloadavg())}')
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f'front door disparity(): 2 outcomes x 5 estimators in {t_stage:.1f} s wall, {c_stage:.1f} s CPU; tracemalloc peak {peak / 2**20:.0f} MiB; process peak RSS {rss:.0f} MiB')

if __name__ == '__main__': main()
