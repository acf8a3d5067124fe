"""Benchmark: the full self-audit (stratified bootstrap, 1,000 replicates) vs fairlearn MetricFrame(n_boot=1000).

Both compute, for every scenario (run × test set) and every group (race, ethnicity, race × ethnicity, all), the point
estimate and the 95 % percentile-bootstrap interval of accuracy and of per-class recall, FNR, precision, FPR and
selection rate. Ours additionally computes ECE with a bootstrap interval, all pairwise gaps with Newcombe intervals
and Fisher tests, and Holm q-values across everything. fairlearn needs one MetricFrame per group attribute, and is
so slow that it is timed on a few scenarios and extrapolated per scenario (printed as such). Prints the time ratio
and checks that the point estimates are equal.

    python bench/bench_audit.py            # 252 scenarios × 6,000 predictions, n_boot = 1000
    python bench/bench_audit.py --small    # 6 scenarios × 1,000 predictions, n_boot = 100

The full run is long because of the baseline: fairlearn needs about 10-35 minutes for ONE scenario at 6,000
predictions and 1,000 replicates (measured 2,036 s on a loaded 2-core machine; ours: 1.0 s per scenario).
"""
import argparse, time, warnings
import numpy as np
import pandas as pd
from mugshotrace.audit.stats import audit_predictions, add_qvalues, simulate_predictions

def fairlearn_audit(df, classes, n_boot, seed):
    "The same per-group point estimates and bootstrap intervals with fairlearn MetricFrame (one per attribute)."
    from fairlearn.metrics import MetricFrame
    def prop(num, den):
        def f(y, p):
            y, p = np.asarray(y), np.asarray(p); d = den(y, p).sum()
            return num(y, p).sum()/d if d else np.nan
        return f
    m = {'accuracy': prop(lambda y, p: y == p, lambda y, p: np.ones(len(y), bool))}
    for c in classes:
        m[f'recall:{c}'] = prop(lambda y, p, c=c: (y == c) & (p == c), lambda y, p, c=c: y == c)
        m[f'fnr:{c}'] = prop(lambda y, p, c=c: (y == c) & (p != c), lambda y, p, c=c: y == c)
        m[f'precision:{c}'] = prop(lambda y, p, c=c: (y == c) & (p == c), lambda y, p, c=c: p == c)
        m[f'fpr:{c}'] = prop(lambda y, p, c=c: (y != c) & (p == c), lambda y, p, c=c: y != c)
        m[f'selection_rate:{c}'] = prop(lambda y, p, c=c: p == c, lambda y, p: np.ones(len(y), bool))
    out = {}
    for attr in ('race', 'ethnicity', 'group'):
        mf = MetricFrame(metrics=m, y_true=df.label, y_pred=df.Prediction, sensitive_features=df[attr],
                         n_boot=n_boot, ci_quantiles=[.025, .975], random_state=seed)
        lo, hi = mf.by_group_ci
        for g in mf.by_group.index:
            for k in m: out[(g, k)] = (mf.by_group.loc[g, k], lo.loc[g, k], hi.loc[g, k])
        for k in m: out[('all', k)] = (mf.overall[k], mf.overall_ci[0][k], mf.overall_ci[1][k])
    return out

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--small', action='store_true', help='6 scenarios × 1,000 predictions, 100 replicates')
    ap.add_argument('--scenarios', type=int, default=None); ap.add_argument('--n', type=int, default=None)
    ap.add_argument('--n-boot', type=int, default=None)
    ap.add_argument('--fairlearn-scenarios', type=int, default=None, help='scenarios timed with fairlearn (extrapolated)')
    a = ap.parse_args(argv)
    S = a.scenarios or (6 if a.small else 252); n = a.n or (1000 if a.small else 6000)
    B = a.n_boot or (100 if a.small else 1000); K = a.fairlearn_scenarios or 1
    per = n//4
    tables = [simulate_predictions({'BH': per, 'BnH': per, 'WH': per, 'WnH': per}, accuracy={'WH': .8}, seed=i) for i in range(S)]
    print(f'{S} scenarios × {4*per} predictions, {B} bootstrap replicates')

    t0 = time.perf_counter()
    parts = [audit_predictions(t, n_boot=B, seed=i, interval='bootstrap').assign(test_set=f's{i}') for i, t in enumerate(tables)]
    audit = add_qvalues(pd.concat(parts, ignore_index=True))
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, t in enumerate(tables[:K]): audit_predictions(t, n_boot=B, seed=i, interval='bootstrap', gaps=False)
    ours_intervals = (time.perf_counter() - t0)/K
    print(f'mugshotrace full audit: {ours:.1f} s for {S} scenarios ({ours/S:.3f} s per scenario); '
          f'per-group intervals only: {ours_intervals:.3f} s per scenario')

    t0 = time.perf_counter(); fl = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for i, t in enumerate(tables[:K]): fl.append(fairlearn_audit(t, ('Black', 'White'), B, i))
    fair = (time.perf_counter() - t0)/K
    print(f'fairlearn MetricFrame(n_boot={B}): {fair:.1f} s per scenario (timed on {K}, extrapolated: {fair*S:.0f} s for {S})')

    equal, maxdiff = True, 0.
    for i in range(K):
        t = parts[i].set_index(['group', 'metric'])
        for (g, m), (v, lo, hi) in fl[i].items():
            o = t.loc[(g, m)]
            if not ((np.isnan(v) and np.isnan(o.value)) or abs(o.value - v) < 1e-12): equal = False
            if not np.isnan(lo): maxdiff = max(maxdiff, abs(o.ci_low - lo), abs(o.ci_high - hi))
    print(f'point estimates equal: {equal}; largest interval-endpoint difference (Monte-Carlo noise, unstratified vs '
          f'stratified): {maxdiff:.4f}')
    print(f'speed-up vs fairlearn, full audit: {fair*S/ours:.0f}x (target >= 20x); per-group intervals only: {fair/ours_intervals:.0f}x')
    return 0 if equal else 1

if __name__ == '__main__': raise SystemExit(main())
