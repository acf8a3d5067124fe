"""The disparity stage: estimators cross-checked against independent computations, attenuation as predicted,
bias and coverage by simulation (slow), outcome-dependent errors flagged and bounded, face vs surname vs both
against the benchmark's truth, the front door, the CLI and bad input."""
import json, re
import numpy as np
import pandas as pd
import pytest
from mugshotrace.core import UserError, registered_figures
from mugshotrace.synth.benchmark import make_benchmark, SynthConfig
from mugshotrace.synth.outcomes import write_outcomes, OutcomeConfig, load_cases
from mugshotrace.disparity.estimators import (error_matrix, naive_means, weighted_means, corrected_means, bound_means,
                                              estimate_all, contrast_table)
from mugshotrace.disparity.impute import impute_means, rubin
from mugshotrace.disparity.checks import error_rate_checks, check_verdict
from mugshotrace.disparity.simulate import simulate_population, fabricate_inputs
from mugshotrace.disparity.stage import disparity, DisparityConfig
from mugshotrace.disparity.report import disparity_report_html, disparity_card_note

FAST = DisparityConfig(surnames='surname', n_boot=40, imputations=4)

@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    d = tmp_path_factory.mktemp('disp')
    make_benchmark(d/'b', SynthConfig(people=300, seed=4, width=64, height=80), progress=False)
    return d

@pytest.fixture(scope='module')
def inputs(bench): return fabricate_inputs(bench/'b', bench/'in', attribute='race', sep=2.0)

@pytest.fixture(scope='module')
def result(bench, inputs):
    return disparity(inputs['bulk'], bench/'out', FAST, outcomes=bench/'b'/'cases.csv', audit=inputs['run'], progress=False)

# --- cross-checks against independent computations ---------------------------------------------------------------

def test_weighted_estimator_equals_statsmodels_wls():
    import statsmodels.api as sm
    rng = np.random.default_rng(0); n, K = 500, 3
    P = rng.dirichlet(np.ones(K), n); y = rng.normal(size=n) + P @ np.array([0., 1., 3.])
    ours = weighted_means(y, P)
    for k in range(K):
        fit = sm.WLS(y, np.ones((n, 1)), weights=P[:, k]).fit()
        assert abs(fit.params[0] - ours[k]) < 1e-10

def test_confusion_correction_equals_a_direct_linear_solve():
    rng = np.random.default_rng(1); K, n = 3, 4000
    M = rng.dirichlet(np.ones(K) * .5, K) * .4 + np.eye(K) * .6                  # random, diagonally dominant error rates
    pred = rng.integers(0, K, n); y = rng.random(n) * (1 + pred)
    # the full system, built entry by entry: unknowns (pi_1..pi_K, pi_1 mu_1..pi_K mu_K)
    A = np.zeros((2 * K, 2 * K)); b = np.zeros(2 * K)
    for l in range(K):
        for k in range(K): A[l, k] = M[k, l]; A[K + l, K + k] = M[k, l]
        b[l] = np.mean(pred == l); b[K + l] = np.mean(y * (pred == l))
    import scipy.linalg
    x = scipy.linalg.solve(A, b)
    mu, pi = corrected_means(y, pred, M)
    np.testing.assert_allclose(pi, x[:K], atol=1e-10); np.testing.assert_allclose(mu, x[K:] / x[:K], atol=1e-10)

def test_bootstrap_point_estimates_equal_the_direct_estimators():
    s = simulate_population(n=3000, n_lab=400, seed=3)
    pt, bs = estimate_all(s['y'], s['pred'], s['P'], s['lab_true'], s['lab_pred'], n_boot=20, seed=0)
    M = error_matrix(s['lab_true'], s['lab_pred'], 2)[0]
    np.testing.assert_allclose(pt['naive'], naive_means(s['y'], s['pred'], 2)); np.testing.assert_allclose(pt['weighted'], weighted_means(s['y'], s['P']))
    np.testing.assert_allclose(pt['corrected'], corrected_means(s['y'], s['pred'], M)[0])
    np.testing.assert_allclose(pt['bounds_low'], bound_means(s['y'], s['pred'], M)[0]); np.testing.assert_allclose(pt['bounds_high'], bound_means(s['y'], s['pred'], M)[1])
    assert bs['corrected'].shape == (20, 2) and (bs['bounds_low'] <= bs['bounds_high'] + 1e-12).all()
    c = simulate_population(n=3000, n_lab=400, means=(0., 1.), seed=4)                # a continuous outcome: the cumulative-sum path
    pc, _ = estimate_all(c['y'], c['pred'], c['P'], c['lab_true'], c['lab_pred'], n_boot=0)
    Mc = error_matrix(c['lab_true'], c['lab_pred'], 2)[0]
    np.testing.assert_allclose(pc['bounds_low'], bound_means(c['y'], c['pred'], Mc)[0]); np.testing.assert_allclose(pc['bounds_high'], bound_means(c['y'], c['pred'], Mc)[1])

def _direct_bounds(y, p, w, M):
    "The obvious trimming bounds of one weighted replicate: expand each person into w copies, sort each predicted cell, trim."
    K = len(M); shares = np.linalg.solve(M.T, np.bincount(p, w, K) / w.sum()); s = np.clip(shares, 0, None); s = s / s.sum()
    lo, hi = np.zeros(K), np.zeros(K)
    for l in range(K):
        ys = np.sort(np.repeat(y[p == l], w[p == l].astype(int))); tot = len(ys)
        def low(m):   # the sum of the lowest mass m: floor(m) whole copies and a fraction of the next one
            f = int(np.floor(m)); return ys[:f].sum() + ((m - f) * ys[f] if f < tot else 0.)
        for k in range(K):
            q = min(s[k] * M[k, l] / (s * M[:, l]).sum(), 1); m = q * tot
            if m <= 0 or M[k, l] == 0: continue
            lo[k] += M[k, l] * low(m) / m; hi[k] += M[k, l] * (ys.sum() - low(tot - m)) / m
    return lo, hi

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_fast_bootstrap_bounds_equal_the_direct_expand_and_sort(seed):
    "The replicates' bounds (columns sorted once, block sums of the weights, one block searched) equal expanding and sorting each replicate."
    from mugshotrace.disparity.estimators import _layout, _estimates, _low_sums
    rng = np.random.default_rng(seed); n, K, c = 90, 3, 7
    y = np.round(rng.lognormal(0, 1, n), 1); p = rng.integers(0, K, n)                # ties in y; cells of unequal size
    P = rng.dirichlet(np.ones(K), n); onehot = np.eye(K)[p]
    F = np.hstack([onehot, onehot * y[:, None], P, P * y[:, None]])
    lay = _layout(y, p, K); o = lay['order']
    W = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(c)]).astype(float)   # multinomial counts, zeros included
    Ms = np.stack([np.eye(K) * .7 + rng.dirichlet(np.ones(K), K) * .3 for _ in range(c)])
    out = _estimates(F[o], W[:, o], Ms, K, lay)
    for b in range(c):
        lo, hi = _direct_bounds(y, p, W[b], Ms[b])
        np.testing.assert_allclose(out['bounds_low'][b], lo, rtol=1e-10); np.testing.assert_allclose(out['bounds_high'][b], hi, rtol=1e-10)
        np.testing.assert_allclose(out['bounds_low'][b], bound_means(y, p, Ms[b], w=W[b])[0], rtol=1e-10)
    ys = np.sort(y); Wl = W[:, np.argsort(y, kind='stable')]                          # many small blocks, every mass from 0 to the total
    low, tot, _ = _low_sums(Wl, ys, B=4)
    for m in np.linspace(0, n, 37):
        direct = [np.sort(np.repeat(y, W[b].astype(int)))[:int(m)].sum() + (m - int(m)) * np.sort(np.repeat(y, W[b].astype(int)))[min(int(m), n - 1)] * (m < n) for b in range(c)]
        np.testing.assert_allclose(low(np.full(c, m)), direct, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(tot, n)

def test_bootstrap_replicates_of_a_continuous_outcome_are_those_of_the_resample_loop():
    "`estimate_all`'s replicates equal re-drawing its resamples and calling the direct estimators (same draws, same order)."
    s = simulate_population(n=2000, n_lab=300, means=(0., 1.), seed=5); n, nl = 2000, 300
    pt, bs = estimate_all(s['y'], s['pred'], s['P'], s['lab_true'], s['lab_pred'], n_boot=6, seed=7, chunk=3)
    rng = np.random.default_rng(7); M0 = error_matrix(s['lab_true'], s['lab_pred'], 2)[0]; b = 0
    for _ in range(2):
        ws = [np.bincount(rng.integers(0, n, n), minlength=n).astype(float) for _ in range(3)]
        Ms = [error_matrix(s['lab_true'][j], s['lab_pred'][j], 2)[0] for j in [rng.integers(0, nl, nl) for _ in range(3)]]
        for w, M in zip(ws, Ms):
            np.testing.assert_allclose(bs['corrected'][b], corrected_means(np.repeat(s['y'], w.astype(int)), np.repeat(s['pred'], w.astype(int)), M)[0], rtol=1e-10)
            lo, hi = bound_means(s['y'], s['pred'], M, w=w)
            np.testing.assert_allclose(bs['bounds_low'][b], lo, rtol=1e-10); np.testing.assert_allclose(bs['bounds_high'][b], hi, rtol=1e-10); b += 1

def test_naive_attenuation_matches_the_misclassification_prediction():
    s = simulate_population(n=200_000, n_lab=10, sep=2.0, rates=(.2, .5), seed=5)
    g, pred, y = s['g'], s['pred'], s['y']
    ppv = np.array([[np.mean(g[pred == l] == k) for l in range(2)] for k in range(2)])   # P(G=k | Ghat=l)
    predicted = ppv.T @ np.array([.2, .5])
    naive = naive_means(y, pred, 2)
    se = np.sqrt(naive * (1 - naive) / np.bincount(pred))
    assert (np.abs(naive - predicted) < 4 * se).all(), (naive, predicted)
    assert (naive[1] - naive[0]) < .8 * .3                                                 # a large share of the gap is hidden

# --- the front door ------------------------------------------------------------------------------------------------

def test_stage_writes_the_tidy_table_checks_exclusions_and_a_face_free_figure(result, bench):
    t = pd.read_csv(result.table)
    assert {'estimator', 'outcome', 'group', 'estimate', 'ci_low', 'ci_high', 'check'} <= set(t.columns)
    assert set(t.estimator) == {'naive', 'weighted', 'corrected', 'imputation', 'bounds'}
    assert set(t.source) == {'face', 'surname', 'face+surname'} and {'court', 'student', 'truth'} <= set(t.label_source)
    assert set(t.outcome) == {'detained', 'log_bail'}
    b = t[t.estimator == 'bounds']; assert b.estimate.isna().all() and (b.identified == False).all()   # noqa: E712
    ok = t[t.estimator != 'bounds']; assert (ok.ci_low <= ok.estimate + 1e-12).all() and (ok.estimate <= ok.ci_high + 1e-12).all()
    figs = registered_figures(result.out); assert len(figs) == 1 and not figs.may_show_face.iloc[0] and figs.status.iloc[0] == 'ok'
    ex = pd.read_csv(result.exclusions)
    assert ex.set_index('reason').n['outcome id has no usable label row'] > 0            # the audited people: recorded, not dropped silently
    html = disparity_report_html(result.out); note = disparity_card_note(result.out)
    assert html.startswith('<section') and 'data:image/png;base64' in html and note['estimates'] and note['model_sha256']

def test_report_escapes_user_strings(bench, inputs, tmp_path):
    oc = pd.read_csv(bench/'b'/'cases.csv').rename(columns={'detained': '<script>x</script>'})
    oc.to_csv(tmp_path/'c.csv', index=False)
    r = disparity(inputs['bulk'], tmp_path/'o', DisparityConfig(n_boot=10, imputations=2, outcomes=('<script>x</script>',)),
                  outcomes=tmp_path/'c.csv', audit=inputs['run'], progress=False)
    h = disparity_report_html(r.out); assert '<script>' not in h and '&lt;script&gt;' in h

def test_bad_input_is_one_line_or_recorded(bench, inputs, tmp_path):
    oc = pd.read_csv(bench/'b'/'cases.csv', dtype={'image_id': str})
    bad = pd.concat([oc, pd.DataFrame({'image_id': ['nobody_1', 'nobody_2'], 'detained': [1, 0]})])
    bad.loc[bad.index[:7], 'bail'] = np.nan; bad.to_csv(tmp_path/'bad.csv', index=False)
    r = disparity(inputs['bulk'], tmp_path/'o', DisparityConfig(n_boot=10, imputations=2), outcomes=tmp_path/'bad.csv', audit=inputs['run'], progress=False)
    ex = pd.read_csv(r.exclusions, keep_default_na=False)
    n_unknown = ex[ex.reason == 'outcome id has no usable label row'].n.iloc[0]
    assert n_unknown == 2 + pd.read_csv(bench/'b'/'cases.csv').image_id.isin(pd.read_csv(inputs['bulk']).image_id).eq(False).sum()
    miss = ex[(ex.reason == 'missing or non-numeric outcome value') & (ex.outcome == 'bail')].n.iloc[0]
    in_bulk = set(pd.read_csv(inputs['bulk']).image_id); assert miss == sum(i in in_bulk for i in oc.image_id.iloc[:7])
    # a bulk file from another model than the audited one
    other = fabricate_inputs(bench/'b', tmp_path/'other', model_tag='other', seed=9)
    with pytest.raises(UserError, match='bulk labels come from model'):
        disparity(other['bulk'], tmp_path/'o2', FAST, outcomes=bench/'b'/'cases.csv', audit=inputs['run'], progress=False)
    pd.DataFrame({'image_id': ['x'], 'detained': [1]}).to_csv(tmp_path/'none.csv', index=False)
    with pytest.raises(UserError, match='no id of'):
        disparity(inputs['bulk'], tmp_path/'o3', FAST, outcomes=tmp_path/'none.csv', audit=inputs['run'], progress=False)
    pd.concat([oc, oc.iloc[:1]]).to_csv(tmp_path/'dup.csv', index=False)
    with pytest.raises(UserError, match='duplicate ids'):
        disparity(inputs['bulk'], tmp_path/'o4', FAST, outcomes=tmp_path/'dup.csv', audit=inputs['run'], progress=False)

def test_cli(bench, inputs, tmp_path, capsys):
    import argparse
    from mugshotrace.disparity.stage import add_disparity_parser
    ap = argparse.ArgumentParser(prog='mugshotrace'); sp = ap.add_subparsers(); add_disparity_parser(sp)
    a = ap.parse_args(['disparity', '--labels', str(inputs['bulk']), '--outcomes', str(bench/'b'/'cases.csv'), '--audit', str(inputs['run']),
                       '--surnames', 'surname', '--out', str(tmp_path/'cli'), '--n-boot', '10', '--imputations', '2', '--no-progress'])
    assert a.func(a) == 0 and (tmp_path/'cli'/'disparity.csv').exists()
    assert 'people analysed' in capsys.readouterr().out
    d = ap.parse_args(['disparity', '--labels', 'x', '--outcomes', 'y', '--audit', 'z'])
    assert d.n_boot == DisparityConfig().n_boot and d.outcomes == () and d.surnames is None

# --- assumption checks and bounds ------------------------------------------------------------------------------------

def test_outcome_dependent_errors_are_flagged_and_bounded():
    s = simulate_population(n=20_000, n_lab=3000, differential=2.0, seed=11)
    c = error_rate_checks(s['lab_true'], s['lab_pred'], ['A', 'B'], s['lab_y'])
    assert check_verdict(c)['outcome'].startswith('FAILS')
    lo, hi = bound_means(s['y'], s['pred'], error_matrix(s['lab_true'], s['lab_pred'], 2)[0])
    assert (lo <= s['truth']).all() and (s['truth'] <= hi).all()

# --- face vs surname vs both on the benchmark ------------------------------------------------------------------------

def _sources_vs_truth(bdir, inputs, attribute='race'):
    "Per labelling: accuracy and Brier score of its labels against the true class, on the analysed population."
    from mugshotrace.disparity.surnames import surname_probabilities, combine_face_surname
    b = pd.read_csv(inputs['bulk']); cases, _ = load_cases(bdir)
    tr = json.load(open(bdir/'truth.json'))['images']
    d = b.merge(cases, on='image_id'); cl = inputs['classes']
    true = np.array([cl.index(tr[i][attribute]) for i in d.image_id])
    F = d[[f'{c}_Prob' for c in cl]].to_numpy(); S = surname_probabilities(d.surname, cl)[0]
    out = {}
    for name, P in (('face', F), ('surname', S), ('face+surname', combine_face_surname(F, S))):
        out[name] = {'accuracy': float((P.argmax(1) == true).mean()), 'brier': float(((P - np.eye(2)[true]) ** 2).sum(1).mean())}
    return out

def test_face_surname_combined_against_truth(result, bench, inputs):
    "The combined labels are at least as accurate as the better of face and surname alone; every labelling gets estimates."
    acc = _sources_vs_truth(bench/'b', inputs)
    best = max(acc['face']['accuracy'], acc['surname']['accuracy'])
    assert acc['face+surname']['accuracy'] >= best - 0.01, acc
    assert acc['face+surname']['brier'] <= min(acc['face']['brier'], acc['surname']['brier']) + 0.005, acc
    t = pd.read_csv(result.table)
    d = t[(t.quantity == 'difference') & (t.label_source == 'truth') & (t.estimator == 'corrected') & (t.outcome == 'detained')]
    assert len(d) == 3 and d.ci_low.notna().all()

# --- slow: simulations over many seeds (run once; numbers in the report) --------------------------------------------

def _coverage(n_seeds, differential=0.0, n=4000, n_lab=800, n_boot=200, m=20):
    rows = []
    for seed in range(n_seeds):
        s = simulate_population(n=n, n_lab=n_lab, rates=(.2, .4), differential=differential, seed=seed)
        pt, bs = estimate_all(s['y'], s['pred'], s['P'], s['lab_true'], s['lab_pred'], n_boot=n_boot, seed=seed)
        td = .4 - .2                                    # the injected (superpopulation) difference the intervals are for
        real = s['truth'][1] - s['truth'][0]            # the realised difference in this population (for the identified set)
        g, pred = s['g'], s['pred']
        ppv = np.array([[np.mean(g[pred == l] == k) for l in range(2)] for k in range(2)])
        pred_naive = ppv.T @ s['truth']
        e, v = impute_means(s['y'], s['P'], pred, s['lab_true'], s['lab_pred'], True, None, m=m, seed=seed)
        r = rubin(e[:, 1] - e[:, 0], v[:, 1] + v[:, 0])
        cd = bs['corrected'][:, 1] - bs['corrected'][:, 0]; lo, hi = np.quantile(cd, [.025, .975])
        blo = np.quantile(bs['bounds_low'][:, 1] - bs['bounds_high'][:, 0], .025); bhi = np.quantile(bs['bounds_high'][:, 1] - bs['bounds_low'][:, 0], .975)
        chk = check_verdict(error_rate_checks(s['lab_true'], s['lab_pred'], ['A', 'B'], s['lab_y']))['outcome']
        rows.append(dict(truth=td, real=real, naive=pt['naive'][1] - pt['naive'][0], naive_pred=pred_naive[1] - pred_naive[0],
                         corrected=pt['corrected'][1] - pt['corrected'][0], cov_corrected=lo <= td <= hi,
                         mi=r['estimate'], cov_mi=r['ci_low'] <= td <= r['ci_high'],
                         bounds_contain=pt['bounds_low'][1] - pt['bounds_high'][0] <= real <= pt['bounds_high'][1] - pt['bounds_low'][0],
                         bounds_ci_contain=blo <= td <= bhi, flagged=chk.startswith('FAILS')))
    return pd.DataFrame(rows)

@pytest.mark.slow
def test_simulation_bias_and_coverage_200_seeds():
    d = _coverage(200)
    mc = lambda x: x.std(ddof=1) / np.sqrt(len(x))
    err = {k: d[k] - d.truth for k in ('naive', 'corrected', 'mi')}
    summary = {k: (float(err[k].mean()), float(mc(err[k]))) for k in err}
    summary['naive_minus_predicted'] = (float((d.naive - d.naive_pred).mean()), float(mc(d.naive - d.naive_pred)))
    summary['naive_mean'], summary['naive_predicted_mean'], summary['truth'] = float(d.naive.mean()), float(d.naive_pred.mean()), .2
    summary['coverage'] = {'corrected': float(d.cov_corrected.mean()), 'imputation': float(d.cov_mi.mean())}
    summary['false_flags'] = float(d.flagged.mean())
    print('SIMULATION', json.dumps(summary))
    assert abs(summary['naive_minus_predicted'][0]) < 3 * summary['naive_minus_predicted'][1] + 1e-3
    assert summary['naive'][0] < -0.03                                              # attenuated
    for k in ('corrected', 'mi'): assert abs(summary[k][0]) < 3 * summary[k][1], (k, summary)
    for k in ('corrected', 'imputation'): assert .93 <= summary['coverage'][k] <= .97, summary

@pytest.mark.slow
def test_simulation_outcome_dependent_errors_200_seeds():
    d = _coverage(200, differential=1.5, n_lab=1500, m=5, n_boot=100)
    out = {'flagged': float(d.flagged.mean()), 'bounds_contain': float(d.bounds_contain.mean()), 'bounds_ci_contain': float(d.bounds_ci_contain.mean()),
           'corrected_bias': float((d.corrected - d.truth).mean()), 'corrected_coverage': float(d.cov_corrected.mean())}
    print('DIFFERENTIAL', json.dumps(out))
    assert out['flagged'] >= .9 and out['bounds_contain'] >= .99 and out['bounds_ci_contain'] >= .99

@pytest.mark.slow
def test_face_surname_combined_on_a_larger_benchmark(tmp_path):
    make_benchmark(tmp_path/'b', SynthConfig(people=2000, seed=8, width=64, height=80), progress=False)
    for attribute, sep in (('race', 1.5), ('ethnicity', 1.0)):
        inp = fabricate_inputs(tmp_path/'b', tmp_path/attribute, attribute=attribute, sep=sep)
        r = disparity(inp['bulk'], tmp_path/f'o_{attribute}', DisparityConfig(surnames='surname', n_boot=200, imputations=10, label_sources=('truth',)),
                      outcomes=tmp_path/'b'/'cases.csv', audit=inp['run'], progress=False)
        truth = json.load(open(tmp_path/'b'/'outcomes_truth.json'))['realised_means'][attribute]
        t = pd.read_csv(r.table); d = t[t.quantity == 'difference'].copy()
        ref = 'White' if attribute == 'race' else 'NonHispanic'; other = [c for c in inp['classes'] if c != ref][0]
        d['truth'] = [truth[o if o == 'detained' else 'log_bail'][other] - truth[o if o == 'detained' else 'log_bail'][ref] for o in d.outcome]
        d['abs_error'] = (d.estimate - d.truth).abs(); d['covers'] = (d.ci_low <= d.truth) & (d.truth <= d.ci_high)
        print('BENCH', attribute, json.dumps(_sources_vs_truth(tmp_path/'b', inp, attribute)))
        print(d[['source', 'outcome', 'estimator', 'estimate', 'ci_low', 'ci_high', 'bound_low', 'bound_high', 'truth', 'abs_error', 'covers']].round(4).to_string())


def test_report_section_and_model_card_note(bench, inputs):
    "The study report shows the disparity section; the card of the model that made the labels carries the note (matched by hash)."
    from mugshotrace.audit.selfaudit import audit
    from mugshotrace.audit.frame import AuditConfig
    from mugshotrace.report.html import study_report
    root = bench/'in'
    disparity(inputs['bulk'], root/'disparity', FAST, outcomes=bench/'b'/'cases.csv', audit=inputs['run'], progress=False)
    audit(root, root/'audit', AuditConfig(n_boot=50), progress=False)
    h = study_report(root, synthetic=True).read_text()
    assert "id='disparity-0'" in h or 'id="disparity-0"' in h, h[:2000]
    assert 'Outcome disparities from the labels' in h and 'corrected' in h
    card = json.loads((inputs['run']/'model_card.json').read_text())
    notes = [t['description'] for t in card['considerations']['tradeoffs'] if t['description'].startswith('Outcome disparities estimated')]
    assert len(notes) == 1 and '(corrected)' in notes[0] and '[' in notes[0], notes
