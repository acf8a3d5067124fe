"Integration, cross-check, coverage and known-bias tests of the audit modules."
import argparse, os, time
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from mugshotrace.core import UserError, write_csv
from mugshotrace.audit.metrics import (disaggregate, wilson_interval, clopper_pearson_interval, _boot_cm, _boot_ece_sums,
                               expected_calibration_error, percentile_interval)
from mugshotrace.audit.stats import (audit_predictions, add_qvalues, simulate_predictions, known_bias_check, flag_rate,
                                     newcombe_interval, mcnemar_test, paired_comparison)
from mugshotrace.audit.selfaudit import fabricate_runs, audit_runs, add_audit_parser, find_runs, AuditFrame, AUDIT_COLUMNS
from mugshotrace.audit.factors import design_factor_effects


def _data(seed, classes, n=2000):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({'race': rng.choice(['Black', 'White'], n, p=[.6, .4]),
                       'ethnicity': rng.choice(['Hispanic', 'NonHispanic'], n, p=[.25, .75])})
    df['y'] = rng.choice(classes, n); df['yhat'] = np.where(rng.random(n) < .65, df.y, rng.choice(classes, n))
    return df

# ---------------------------------------------------------------- point estimates vs fairlearn / sklearn
@pytest.mark.parametrize('classes', [('Black', 'White'), ('BH', 'BnH', 'WH', 'WnH')])
@pytest.mark.parametrize('seed', [0, 1])
def test_point_estimates_equal_fairlearn_and_sklearn(classes, seed):
    from fairlearn.metrics import MetricFrame, selection_rate, false_positive_rate, false_negative_rate
    from sklearn.metrics import accuracy_score, recall_score, precision_score, confusion_matrix
    df = _data(seed, list(classes)); cls = list(classes)
    res = disaggregate(df.y, df.yhat, df[['race', 'ethnicity']], classes=cls, n_boot=0)
    ours = res.table.set_index(['group', 'metric']).value
    metrics = {'accuracy': accuracy_score}
    for i, c in enumerate(cls):
        metrics[f'recall:{c}'] = lambda a, b, i=i: recall_score(a, b, labels=cls, average=None, zero_division=np.nan)[i]
        metrics[f'precision:{c}'] = lambda a, b, i=i: precision_score(a, b, labels=cls, average=None, zero_division=np.nan)[i]
        metrics[f'selection_rate:{c}'] = lambda a, b, c=c: selection_rate(a, b, pos_label=c)
        metrics[f'fpr:{c}'] = lambda a, b, c=c: false_positive_rate(np.asarray(a) == c, np.asarray(b) == c)
        metrics[f'fnr:{c}'] = lambda a, b, c=c: false_negative_rate(np.asarray(a) == c, np.asarray(b) == c)
    for sf in (['race'], ['ethnicity']):
        mf = MetricFrame(metrics=metrics, y_true=df.y, y_pred=df.yhat, sensitive_features=df[sf])
        for g, row in mf.by_group.iterrows():
            for m, v in row.items(): np.testing.assert_allclose(ours[(g, m)], v, rtol=0, atol=1e-12, err_msg=f'{g} {m}')
        for m, v in mf.overall.items(): np.testing.assert_allclose(ours[('all', m)], v, atol=1e-12)
    # intersectional groups: sklearn on each race × ethnicity cell
    names = res.groups.name.tolist()
    for (r, e), sub in df.groupby(['race', 'ethnicity']):
        res2 = disaggregate(sub.y, sub.yhat, sub[['race']], classes=cls, n_boot=0)
        np.testing.assert_array_equal(res2.cm[0], confusion_matrix(sub.y, sub.yhat, labels=cls))
    for g in ('Black', 'White', 'Hispanic', 'NonHispanic'):
        col = 'race' if g in ('Black', 'White') else 'ethnicity'; sub = df[df[col] == g]
        np.testing.assert_array_equal(res.cm[names.index(g)], confusion_matrix(sub.y, sub.yhat, labels=cls))

def test_intersectional_group_column_matches_sklearn_per_cell():
    from sklearn.metrics import accuracy_score
    sim = simulate_predictions({'BH': 70, 'BnH': 300, 'WH': 25, 'WnH': 300}, task='race_eth4', seed=5)
    t = audit_predictions(sim, n_boot=0).set_index(['group', 'metric'])
    for g, sub in sim.groupby('group'):
        assert t.loc[(g, 'accuracy'), 'value'] == pytest.approx(accuracy_score(sub.label, sub.Prediction), abs=1e-12)
    assert bool(t.loc[('WH', 'accuracy'), 'small']) and not bool(t.loc[('BnH', 'accuracy'), 'small'])

def test_ece_matches_loop():
    rng = np.random.default_rng(3); conf = rng.uniform(.5, 1, 999); ok = rng.random(999) < conf - .1
    loop = sum(abs(ok[m].mean() - conf[m].mean())*m.mean() for b in range(10)
               for m in [(np.minimum((conf*10).astype(int), 9) == b)] if m.any())
    assert expected_calibration_error(conf, ok) == pytest.approx(loop, abs=1e-12)

# ---------------------------------------------------------------- the stratified bootstrap is the real bootstrap
def test_multinomial_bootstrap_equals_item_resampling_in_distribution():
    rng = np.random.default_rng(0); n = 400
    t = rng.integers(0, 3, n); p = np.where(rng.random(n) < .7, t, rng.integers(0, 3, n))
    cm = np.bincount(t*3 + p, minlength=9).reshape(1, 3, 3)
    fast = np.trace(_boot_cm(cm, 4000, rng)[:, 0], axis1=1, axis2=2)/n
    idx = rng.integers(0, n, (4000, n)); slow_ = (t[idx] == p[idx]).mean(1)
    assert abs(fast.mean() - slow_.mean()) < 0.002 and abs(fast.std()/slow_.std() - 1) < 0.06
    conf = rng.uniform(.4, 1, n); ok = (t == p).astype(float); cells = (np.arange(n) % 2).astype(np.int64)
    s = _boot_ece_sums(conf, ok, cells, 2, 10, 3000, rng)
    ece_fast = np.abs(s.sum(1)).sum(-1)/n
    ece_slow = np.array([expected_calibration_error(conf[i], ok[i]) for i in rng.integers(0, n, (3000, n))])
    assert abs(ece_fast.mean() - ece_slow.mean()) < 0.003 and abs(ece_fast.std()/ece_slow.std() - 1) < 0.08

def test_stratified_bootstrap_keeps_tiny_groups():
    rng = np.random.default_rng(1); n = 1000
    g = pd.DataFrame({'race': np.where(np.arange(n) < 2, 'Other', rng.choice(['Black', 'White'], n))})
    y = rng.choice(['a', 'b'], n); yhat = np.where(rng.random(n) < .8, y, rng.choice(['a', 'b'], n))
    res = disaggregate(y, yhat, g, classes=['a', 'b'], conf=rng.uniform(.5, 1, n), n_boot=500, interval='bootstrap')
    i = res.groups.name.tolist().index('Other')
    assert not np.isnan(res.boot['accuracy'][:, i]).any() and not np.isnan(res.boot['ece'][:, i]).any()
    assert res.groups.small[i]

# ---------------------------------------------------------------- coverage (vectorised simulation)
def _coverage(n, R, B, seed):
    "Coverage of Wilson / Clopper-Pearson (accuracy) and bootstrap / Newcombe (gap), p drawn per replicate."
    rng = np.random.default_rng(seed)
    pa, pb = rng.uniform(.6, .95, R), rng.uniform(.6, .95, R)
    ka, kb = rng.binomial(n, pa), rng.binomial(n, pb)
    out = {}
    lo, hi = wilson_interval(ka, n); out['wilson'] = np.mean((lo <= pa) & (pa <= hi))
    lo, hi = clopper_pearson_interval(ka, n); out['clopper-pearson'] = np.mean((lo <= pa) & (pa <= hi))
    lo, hi = newcombe_interval(ka, n, kb, n); out['newcombe'] = np.mean((lo <= pa - pb) & (pa - pb <= hi))
    # the audit's own bootstrap path: binary confusion counts per (replicate, group) cell, resampled within cells
    hits = []
    for r0 in range(0, R, 250):
        sl = slice(r0, min(R, r0 + 250)); m = sl.stop - sl.start
        cm = np.zeros((2*m, 2, 2), np.int64)
        cm[:m, 0, 0], cm[:m, 0, 1], cm[m:, 0, 0], cm[m:, 0, 1] = ka[sl], n - ka[sl], kb[sl], n - kb[sl]
        acc = np.trace(_boot_cm(cm, B, rng), axis1=2, axis2=3)/n
        lo, hi = percentile_interval(acc[:, :m] - acc[:, m:])
        d = pa[sl] - pb[sl]; hits.append((lo <= d) & (d <= hi))
    out['bootstrap-gap'] = np.concatenate(hits).mean()
    return out

@pytest.mark.parametrize('n', [30, 300])
def test_interval_coverage_near_nominal(n):
    cov = _coverage(n, R=1500, B=400, seed=n)
    for k in ('wilson', 'newcombe'): assert abs(cov[k] - .95) <= .02, (k, cov)
    assert cov['clopper-pearson'] >= .95 - 3*np.sqrt(.95*.05/1500)  # exact: never below nominal, up to Monte-Carlo error
    # the percentile bootstrap of a gap is only used by request: near nominal from 300 on, known to under-cover at 30
    assert abs(cov['bootstrap-gap'] - .95) <= (.02 if n >= 300 else .04), cov

@pytest.mark.slow
@pytest.mark.parametrize('n', [30, 300, 3000])
def test_interval_coverage_near_nominal_slow(n):
    cov = _coverage(n, R=5000, B=1000, seed=10 + n)
    for k in ('wilson', 'newcombe'): assert abs(cov[k] - .95) <= .02, (k, cov)
    assert abs(cov['bootstrap-gap'] - .95) <= (.02 if n >= 300 else .04), cov
    assert cov['clopper-pearson'] >= .95 - 3*np.sqrt(.95*.05/5000)

# ---------------------------------------------------------------- known-bias recovery and null control
SPEC = [{'name': 'label noise', 'metric': 'accuracy', 'low': 'BH', 'high': 'BnH'},
        {'name': 'spurious cue', 'metric': 'fpr:Black', 'low': 'WnH', 'high': 'WH'},
        {'name': 'under-representation', 'metric': 'accuracy', 'low': 'WnH', 'high': 'BnH'},
        {'name': 'over-confidence', 'metric': 'ece', 'low': 'BnH', 'high': 'WnH'}]
BIASES = [dict(label_noise={'BH': .15}),
          dict(cue_rate={'WH': .25}, cue_class='Black'),
          dict(n_per_group={'BH': 1000, 'BnH': 1000, 'WH': 1000, 'WnH': 300}, accuracy={'WnH': .65}),
          dict(overconfidence={'WnH': .12})]

@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('which', range(4))
def test_known_biases_are_recovered(which, seed):
    kw = {'n_per_group': {'BH': 1000, 'BnH': 1000, 'WH': 1000, 'WnH': 1000}, **BIASES[which]}
    sim = simulate_predictions(seed=seed, **kw)
    tab = add_qvalues(audit_predictions(sim, n_boot=400, seed=seed, n_perm=2000 if which == 3 else 0))   # ECE p >= 1/(1 + n_perm): enough permutations for one error family over all metrics
    chk = known_bias_check(tab, [SPEC[which]])
    assert chk.found.all() and chk.significant.all(), chk
    # the other gaps of the same family are not flagged (no bias there); recovery is specific
    fam = tab[(tab.metric == chk.metric.iloc[0]) & (tab.attribute == 'group')]
    assert (fam.q_value <= .05).sum() <= 3          # only pairs involving the biased group can be flagged
    assert fam[(fam.q_value <= .05)].group.str.contains(['BH', 'WH', 'WnH', 'WnH'][which]).all()

def test_all_biases_at_once_are_recovered():
    sim = simulate_predictions({'BH': 1000, 'BnH': 1000, 'WH': 1000, 'WnH': 1000}, label_noise={'BH': .15},
                               cue_rate={'WH': .3}, cue_class='Black', overconfidence={'BnH': .12}, seed=7)
    spec = [SPEC[0], SPEC[1], {'name': 'over-confidence', 'metric': 'ece', 'low': 'WnH', 'high': 'BnH'}]
    assert known_bias_check(add_qvalues(audit_predictions(sim, n_boot=300)), spec).found.all()

def test_no_bias_flag_rate_at_most_nominal():
    alpha, flags, any_flag = .05, [], []
    for seed in range(40):
        sim = simulate_predictions({'BH': 300, 'BnH': 300, 'WH': 300, 'WnH': 300}, seed=100 + seed)
        tab = audit_predictions(sim, n_boot=0)
        for method in ('holm', 'fdr_bh'):
            t = add_qvalues(tab, method); fr = flag_rate(t, alpha)
            flags.append(fr); any_flag.append(fr > 0)
    assert np.mean(flags) <= alpha
    assert np.mean(any_flag) <= alpha + 2*np.sqrt(alpha*(1 - alpha)/len(any_flag))     # FWER, with Monte-Carlo slack

def test_known_bias_on_a_runs_folder(tmp_path):
    fabricate_runs(tmp_path, n_per_group={'BH': 300, 'BnH': 300, 'WH': 300, 'WnH': 300},
                   bias=lambda c: {'label_noise': {'BH': .2}} if c['label_source'] == 'court' else {})
    af = audit_runs(tmp_path, n_boot=300)
    pooled = af.df[af.df.test_set == 'court/pooled']
    chk = known_bias_check(pooled, [SPEC[0]])
    assert len(chk) == 4 and chk.found.all()
    clean = af.df[af.df.test_set == 'student/pooled']
    assert not known_bias_check(clean, [SPEC[0]]).significant.any()

# ---------------------------------------------------------------- paired tests and the design-factor model
def test_mcnemar_and_paired_comparison():
    from scipy import stats
    rng = np.random.default_rng(2); a = rng.random(600) < .8; b = np.where(rng.random(600) < .1, ~a, a)
    r = mcnemar_test(a, b); nd = r['a_only'] + r['b_only']
    assert r['p_value'] == pytest.approx(stats.binomtest(r['a_only'], nd, .5).pvalue)
    pc = paired_comparison(a, b, pd.DataFrame({'race': np.where(np.arange(600) < 300, 'Black', 'White')}))
    assert list(pc.group) == ['all', 'Black', 'White'] and pc.n.tolist() == [600, 300, 300]

def test_design_factor_glm_equals_per_image_logit(tmp_path):
    import statsmodels.api as sm
    fabricate_runs(tmp_path, label_sources=('court',), n_per_group={'BH': 40, 'BnH': 40, 'WH': 40, 'WnH': 40},
                   bias=lambda c: {'accuracy': {'WH': .7, 'WnH': .7}} if c['arch'] == 'tiny_cnn' else {})
    af = audit_runs(tmp_path, n_boot=0)
    eff = design_factor_effects(af, factors=('arch',))
    # per-image logistic regression written out independently
    rows = []
    for r in find_runs(tmp_path):
        arch = r.name.split('-')[0]
        for f in (r/'preds').glob('*.csv'):
            d = pd.read_csv(f); rows.append(pd.DataFrame({'correct': (d.Prediction == d.label).astype(float), 'race': d.race,
                                                          'tiny': float(arch == 'tiny_cnn')}))
    d = pd.concat(rows); w = (d.race == 'White').astype(float)
    X = np.column_stack([np.ones(len(d)), w, d.tiny, d.tiny*w])
    fit = sm.Logit(d.correct.to_numpy(), X).fit(disp=0)
    ref = eff.set_index(['group', 'term']).log_odds
    lvl = eff.level.iloc[0]; sign = 1 if lvl == 'tiny_cnn' else -1
    assert ref[('Black', 'effect')] == pytest.approx(sign*fit.params[2], abs=1e-6)
    assert ref[('White', 'effect')] == pytest.approx(sign*(fit.params[2] + fit.params[3]), abs=1e-6)
    assert ref[('White vs Black', 'interaction')] == pytest.approx(sign*fit.params[3], abs=1e-6)

# ---------------------------------------------------------------- the CLI: outputs, resumability, bad input
def _cli(argv):
    ap = argparse.ArgumentParser(prog='mugshotrace'); sub = ap.add_subparsers(dest='cmd'); add_audit_parser(sub)
    a = ap.parse_args(argv); return a.func(a)

def test_cli_writes_everything_and_resumes(tmp_path):
    fabricate_runs(tmp_path/'study', n_per_group={'BH': 30, 'BnH': 30, 'WH': 30, 'WnH': 30})
    out = tmp_path/'audit'
    assert _cli(['audit', str(tmp_path/'study'), '--out', str(out), '--n-boot', '50', '--seed', '1']) == 0
    t = pd.read_csv(out/'audit.csv')
    assert list(t.columns[:14]) == AUDIT_COLUMNS and t.run_id.nunique() == 8
    for f in ('runs.csv', 'study/court/extremes.csv', 'study/student/top_means.csv', 'study/court/posthoc.csv', 'design_factors.csv',
              'flip_rates.csv', 'figures/heatmap_accuracy_race.png', 'figures/calibration_race.png'):
        assert (out/f).exists(), f
    reg = registered_figures(out/'figures')                                 # registered as figures of numbers: no face
    assert len(reg) == 4 and (reg.status == 'ok').all() and not reg.may_show_face.any()
    assert pd.read_csv(out/'excluded_runs.csv').empty
    m0 = (out/'audit.csv').stat().st_mtime_ns
    assert _cli(['audit', str(tmp_path/'study'), '--out', str(out), '--n-boot', '50', '--seed', '1']) == 0
    assert (out/'audit.csv').stat().st_mtime_ns == m0                      # unchanged inputs: skipped
    # change one run's predictions: only that run is recomputed (the others come from the cache)
    f = sorted((tmp_path/'study'/'runs').glob('*/preds/court__Black.csv'))[0]; d = pd.read_csv(f)
    d['Prediction'] = d['label']; write_csv(f, d)
    caches = {p.name: p.stat().st_mtime_ns for p in (out/'cache').glob('*.csv')}
    assert _cli(['audit', str(tmp_path/'study'), '--out', str(out), '--n-boot', '50', '--seed', '1']) == 0
    changed = [p.name for p in (out/'cache').glob('*.csv') if p.stat().st_mtime_ns != caches[p.name]]
    assert changed == [f"{f.parent.parent.name}.csv"]
    t2 = pd.read_csv(out/'audit.csv')
    acc = t2[(t2.run_id == f.parent.parent.name) & (t2.test_set == 'court/Black') & (t2.group == 'Black') & (t2.metric == 'accuracy')]
    assert acc.value.iloc[0] == 1.0
    # drop rates from manifests + labels
    lab = pd.DataFrame({'image_id': [f'i{i}' for i in range(100)], 'race': ['Black', 'White']*50, 'ethnicity': ['Hispanic']*50 + ['NonHispanic']*50})
    write_csv(tmp_path/'labels.csv', lab)
    write_csv(tmp_path/'faces'/'openface'/'manifest.csv', lab[['image_id']].assign(variant='openface', status=['no_face', 'ok']*50))
    assert _cli(['audit', str(tmp_path/'study'), '--out', str(out), '--n-boot', '50', '--seed', '1', '--faces', str(tmp_path/'faces'),
                 '--labels', str(tmp_path/'labels.csv'), '--no-figures']) == 0
    dr = pd.read_csv(out/'drop_rates.csv').set_index(['group', 'metric'])
    assert dr.loc[('Black', 'drop_rate'), 'value'] == 1.0 and dr.loc[('White', 'drop_rate'), 'value'] == 0.0
    assert dr.loc[('Black vs White', 'gap:drop_rate'), 'q_value'] < 1e-6
    # same results as a fresh audit (no cache)
    fresh = audit_runs(tmp_path/'study', n_boot=50, seed=1).df
    pd.testing.assert_frame_equal(t2.reset_index(drop=True)[AUDIT_COLUMNS], fresh[AUDIT_COLUMNS].reset_index(drop=True),
                                  check_dtype=False, atol=1e-12)

def test_cli_bad_input(tmp_path):
    with pytest.raises(UserError, match='no run folders'): _cli(['audit', str(tmp_path)])
    with pytest.raises(UserError, match='does not exist'): _cli(['audit', str(tmp_path/'missing')])
    with pytest.raises(UserError, match='go together'): _cli(['audit', str(tmp_path), '--faces', str(tmp_path)])

def test_proportion_intervals_contain_the_estimate_exactly():
    "Wilson and Clopper–Pearson contain k/n for every k, n (no rounding escapes at k = 0 or k = n)."
    from mugshotrace.audit.metrics import wilson_interval, clopper_pearson_interval
    n = np.repeat(np.arange(1, 301), np.arange(1, 301) + 1); k = np.concatenate([np.arange(m + 1) for m in range(1, 301)])
    for f in (wilson_interval, clopper_pearson_interval):
        lo, hi = f(k, n); p = k / n
        assert ((lo <= p) & (p <= hi)).all(), f.__name__

# ---------------------------------------------------------------- which runs count, missing groups, malformed files (issue 13)
import json, hashlib
from mugshotrace.core import RunPaths, write_json, write_bytes, registered_figures
from mugshotrace.audit.metrics import MISSING_LEVEL


def _small_study(root, **kw):
    kw = {'archs': ('resnet18', 'tiny_cnn', 'alexnet'), 'variants': ('resized', 'openface'), 'label_sources': ('court',),
          'n_per_group': {'BH': 20, 'BnH': 20, 'WH': 20, 'WnH': 20}, **kw}
    fabricate_runs(root, **kw)
    return {r.name: r for r in find_runs(root)}


def test_audit_counts_only_done_runs_whose_predictions_match_the_model(tmp_path, capsys):
    runs = _small_study(tmp_path/'study')
    bad = {}
    r = runs['resnet18-resized-court']              # failed after writing some predictions
    write_json(RunPaths(r).state, {'run_id': r.name, 'state': 'failed', 'error': 'RuntimeError: CUDA out of memory'})
    next(r.glob('preds/*.csv')).unlink(); bad[r.name] = ('state', "'failed'")
    r = runs['resnet18-openface-court']             # killed while running: state stays 'running', partial predictions
    write_json(RunPaths(r).state, {'run_id': r.name, 'state': 'running'}); bad[r.name] = ('state', "'running'")
    r = runs['tiny_cnn-resized-court']              # retrained: a new model, the predictions are the old model's
    write_bytes(r/'model.safetensors', b'new weights'); m = json.loads((r/'model.json').read_text())
    m['weights_sha256'] = hashlib.sha256(b'new weights').hexdigest(); write_json(r/'model.json', m)
    bad[r.name] = ('predictions', 'stale predictions')
    r = runs['tiny_cnn-openface-court']             # weights swapped after bundling
    write_bytes(r/'model.safetensors', b'swapped'); bad[r.name] = ('model', 'does not hash')
    r = runs['alexnet-resized-court']               # model.json points outside the run folder
    m = json.loads((r/'model.json').read_text()); m['weights_file'] = '../../../model.safetensors'; write_json(r/'model.json', m)
    bad[r.name] = ('model', 'outside the run folder')
    out = tmp_path/'audit'
    assert _cli(['audit', str(tmp_path/'study'), '--out', str(out), '--n-boot', '0', '--no-figures']) == 0
    t = pd.read_csv(out/'audit.csv')
    assert set(t.run_id) == {'alexnet-openface-court'}
    assert set(pd.read_csv(out/'runs.csv').run_id) == {'alexnet-openface-court'}
    ex = pd.read_csv(out/'excluded_runs.csv').set_index('run_id')
    assert set(ex.index) == set(bad)
    for rid, (check, why) in bad.items():
        assert ex.loc[rid, 'check'] == check and why in ex.loc[rid, 'reason'], (rid, ex.loc[rid].to_dict())
    assert 'out of memory' in ex.loc['resnet18-resized-court', 'reason']
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith('audit: ') and 'excluded' in l]
    assert err == ['audit: 5 of 6 runs excluded (model: 2, predictions: 1, state: 2); see excluded_runs.csv']
    # the Python API agrees and says what it left out; nothing finished at all is a one-line error
    af = audit_runs(tmp_path/'study', n_boot=0)
    assert set(af.df.run_id) == {'alexnet-openface-court'} and set(af.excluded.run_id) == set(bad)
    write_json(RunPaths(runs['alexnet-openface-court']).state, {'state': 'pending'})
    with pytest.raises(UserError, match='no finished runs to audit.*6 of 6 runs excluded'):
        _cli(['audit', str(tmp_path/'study'), '--out', str(out), '--n-boot', '0', '--no-figures'])


def _csv_roundtrip(df):
    "What read_csv gives back (pandas 3: str dtype with NaN; pandas 2: object)."
    import io
    buf = io.StringIO(); df.to_csv(buf, index=False); buf.seek(0)
    return pd.read_csv(buf, dtype={'image_id': str})


def test_missing_group_values_are_an_explicit_level_in_no_gap():
    sim = simulate_predictions({'BH': 80, 'BnH': 80, 'WH': 80, 'WnH': 80}, seed=4)
    sim['ethnicity'] = sim.ethnicity.astype(object); sim.loc[sim.index % 10 == 0, 'ethnicity'] = np.nan   # unknown ethnicity
    sim = _csv_roundtrip(sim)
    t = audit_predictions(sim, n_boot=50)
    acc = t[(t.metric == 'accuracy') & (t.attribute == 'ethnicity')].set_index('group')
    assert list(acc.index) == ['Hispanic', 'NonHispanic', MISSING_LEVEL]
    assert acc.loc[MISSING_LEVEL, 'n'] == 32 and acc.n.sum() == 320 and 'nan' not in set(t.group)
    gaps = t[t.metric.str.startswith('gap:')]
    assert len(gaps) and not gaps.group.str.contains(MISSING_LEVEL, regex=False).any()
    assert set(gaps[gaps.attribute == 'ethnicity'].group) == {'Hispanic vs NonHispanic'}


def test_missing_group_values_through_the_whole_audit(tmp_path):
    runs = _small_study(tmp_path/'study', archs=('tiny_cnn',))
    for r in runs.values():
        for f in r.glob('preds/*.csv'):
            d = pd.read_csv(f); d['ethnicity'] = d.ethnicity.astype(object); d.loc[::7, 'ethnicity'] = np.nan; write_csv(f, d)
    out = tmp_path/'audit'
    for attr in ('race', 'ethnicity'):
        assert _cli(['audit', str(tmp_path/'study'), '--out', str(out), '--n-boot', '20', '--attribute', attr]) == 0
    t = pd.read_csv(out/'audit.csv', keep_default_na=False, na_values=[''])
    assert (t[(t.metric == 'accuracy') & (t.group == MISSING_LEVEL)].n > 0).all() and (t.group == MISSING_LEVEL).any()
    assert not t[t.metric.str.startswith('gap:')].group.str.contains(MISSING_LEVEL, regex=False).any()
    fl = pd.read_csv(out/'flip_rates.csv', keep_default_na=False, na_values=[''])
    assert (fl.group == MISSING_LEVEL).any() and not fl[fl.metric.str.startswith('gap:')].group.str.contains(MISSING_LEVEL, regex=False).any()
    cases = pd.read_csv(out/'study'/'court'/'cases.csv')
    assert len(cases) and MISSING_LEVEL not in set(cases.race)


MALFORMED = {
    'probability above 1': (lambda d: d.assign(Black_Prob=d.Black_Prob + 1), "'Black_Prob'"),
    'probability not a number': (lambda d: d.assign(White_Prob=['x'] + d.White_Prob.astype(str).tolist()[1:]), "'White_Prob'"),
    'probability missing': (lambda d: d.assign(White_Prob=[np.nan] + d.White_Prob.tolist()[1:]), "'White_Prob'"),
    'no Prediction column': (lambda d: d.drop(columns='Prediction'), "'Prediction'"),
    'prediction not a class': (lambda d: d.assign(Prediction=['Asian'] + d.Prediction.tolist()[1:]), "'Prediction'"),
    'label missing': (lambda d: d.assign(label=[np.nan] + d.label.tolist()[1:]), "'label'"),
    'label not a class': (lambda d: d.assign(label='Other'), "'label'"),
    'duplicate image ids': (lambda d: d.assign(image_id=['img0'] * len(d)), "'image_id'"),
    'no probability columns': (lambda d: d.drop(columns=['Black_Prob', 'White_Prob']), '_Prob'),
    'empty file': (None, 'not a readable predictions CSV'),
}

@pytest.mark.parametrize('case', list(MALFORMED))
def test_malformed_predictions_are_one_line_errors_naming_file_and_column(tmp_path, case):
    runs = _small_study(tmp_path/'study', archs=('tiny_cnn',), variants=('resized',))
    f = next(iter(runs.values()))/'preds'/'court__White.csv'
    change, col = MALFORMED[case]
    if change is None: f.write_bytes(b'')
    else: write_csv(f, change(pd.read_csv(f, dtype={'image_id': str})))
    with pytest.raises(UserError) as e:
        _cli(['audit', str(tmp_path/'study'), '--out', str(tmp_path/'audit'), '--n-boot', '0', '--no-figures'])
    msg = str(e.value)
    assert '\n' not in msg and str(f) in msg and col in msg, msg


def test_audit_cache_key_includes_the_package_version(tmp_path, monkeypatch):
    import mugshotrace
    _small_study(tmp_path/'study', archs=('tiny_cnn',), variants=('resized',))
    out = tmp_path/'audit'; argv = ['audit', str(tmp_path/'study'), '--out', str(out), '--n-boot', '0', '--no-figures']
    assert _cli(argv) == 0
    m0 = (out/'audit.csv').stat().st_mtime_ns; c0 = {p.name: p.stat().st_mtime_ns for p in (out/'cache').glob('.stage-run-*.json')}
    assert len(c0) == 1
    time.sleep(0.01); assert _cli(argv) == 0 and (out/'audit.csv').stat().st_mtime_ns == m0       # same version: reused
    monkeypatch.setattr(mugshotrace, '__version__', '999.0.0')
    assert _cli(argv) == 0 and (out/'audit.csv').stat().st_mtime_ns != m0                            # new version: recomputed
    assert all(p.stat().st_mtime_ns != c0[p.name] for p in (out/'cache').glob('.stage-run-*.json'))


# ---------------------------------------------------------------- issue 14: AuditFrame, the front door, flags from AuditConfig, Study/Run
from dataclasses import fields
from mugshotrace.audit.frame import AuditConfig
from mugshotrace.audit.selfaudit import audit, AuditResult
from mugshotrace.audit.factors import drop_rates
from mugshotrace.study.folder import Study, Run
from mugshotrace.core import write_study_record


@pytest.mark.parametrize('classes', [('Black', 'White'), ('BH', 'BnH', 'WH', 'WnH')])
def test_auditframe_from_predictions_equals_fairlearn_metricframe(classes):
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import accuracy_score, recall_score
    df = _data(3, list(classes)); cls = list(classes)
    af = AuditFrame.from_predictions(y_true=df.y, y_pred=df.yhat, groups=df[['race', 'ethnicity']], cfg=AuditConfig(n_boot=0))
    for t in (af.by_group, af.overall, af.gaps(), af.flagged(), af.wide('accuracy', attribute='race')): assert isinstance(t, pd.DataFrame)
    assert list(af.df.columns[:14]) == AUDIT_COLUMNS and af.df.q_value.notna().any()
    metrics = {'accuracy': accuracy_score, **{f'recall:{c}': (lambda a, b, i=i: recall_score(a, b, labels=cls, average=None, zero_division=np.nan)[i])
                                             for i, c in enumerate(cls)}}
    for sf in ('race', 'ethnicity'):
        mf = MetricFrame(metrics=metrics, y_true=df.y, y_pred=df.yhat, sensitive_features=df[sf])
        ours = af.by_group[af.by_group.attribute == sf].set_index(['group', 'metric']).value
        for g, row in mf.by_group.iterrows():
            for m, v in row.items(): np.testing.assert_allclose(ours[(g, m)], v, rtol=0, atol=1e-12, err_msg=f'{g} {m}')
        for m, v in mf.overall.items(): np.testing.assert_allclose(af.overall.set_index('metric').value[m], v, atol=1e-12)
    w = af.wide('accuracy', attribute='race')
    assert w.shape == (1, 2) and w.iloc[0]['Black'] == pytest.approx(accuracy_score(df.y[df.race == 'Black'], df.yhat[df.race == 'Black']))
    g = af.gaps('accuracy'); assert set(g.metric) == {'gap:accuracy'} and (g.attribute != 'all').all()


def test_auditframe_from_runs_study_run_and_path_agree(tmp_path):
    fabricate_runs(tmp_path/'s', archs=('tiny_cnn',), variants=('resized',), n_per_group={'BH': 20, 'BnH': 20, 'WH': 20, 'WnH': 20})
    write_study_record(tmp_path/'s', 's', tmp_path/'labels.csv', tmp_path/'images', tmp_path/'faces')
    cfg = AuditConfig(n_boot=20, seed=2)
    by_path = AuditFrame.from_runs(tmp_path/'s', cfg).df
    pd.testing.assert_frame_equal(AuditFrame.from_runs(Study.open(tmp_path/'s'), cfg).df, by_path)
    one = Run.open(tmp_path/'s'/'runs'/'tiny_cnn-resized-court')
    pd.testing.assert_frame_equal(AuditFrame.from_runs(one, cfg).df.drop(columns='q_value'),
                                  by_path[by_path.run_id == one.run_id].reset_index(drop=True).drop(columns='q_value'))
    pd.testing.assert_frame_equal(audit_runs(tmp_path/'s', n_boot=20, seed=2).df, by_path)


def test_drop_rates_from_a_study_equal_the_folder_form(tmp_path):
    lab = pd.DataFrame({'image_id': [f'i{i}' for i in range(60)], 'race': ['Black', 'White']*30, 'ethnicity': ['Hispanic']*30 + ['NonHispanic']*30})
    write_csv(tmp_path/'labels.csv', lab)
    st = ['no_face', 'ok', 'ok']*20
    man = pd.DataFrame({'image_id': lab.image_id, 'variant': 'openface', 'status': st, 'reason': '',
                        'out_path': [f'{i}.png' if s == 'ok' else '' for i, s in zip(lab.image_id, st)]})
    write_csv(tmp_path/'faces'/'openface'/'manifest.csv', man)
    write_study_record(tmp_path, 's', tmp_path/'labels.csv', tmp_path/'images', tmp_path/'faces')
    pd.testing.assert_frame_equal(drop_rates(Study.open(tmp_path)), drop_rates(tmp_path/'faces', tmp_path/'labels.csv'))
    with pytest.raises(UserError, match='needs a label table'): drop_rates(tmp_path/'faces')


def test_cli_flags_are_the_config_fields_with_its_defaults():
    ap = argparse.ArgumentParser(prog='mugshotrace'); sub = ap.add_subparsers(dest='cmd'); p = add_audit_parser(sub)
    a = ap.parse_args(['audit', 'x'])
    for f in fields(AuditConfig): assert getattr(a, f.name) == f.default, f.name
    assert a.out is None and a.progress is True
    flags = {s for act in p._actions for s in act.option_strings}
    assert {'--n-boot', '--seed', '--alpha', '--interval', '--gap-interval', '--correction', '--min-n', '--target', '--groups',
            '--n-perm', '--attribute', '--faces', '--labels', '--no-figures', '--out', '--no-progress'} <= flags
    with pytest.raises(UserError, match='interval must be one of'): _cli(['audit', 'x', '--interval', 'normal'])
    with pytest.raises(UserError, match='n-boot must be'): _cli(['audit', 'x', '--n-boot', '-1'])


def test_front_door_result_and_stage_cache(tmp_path):
    fabricate_runs(tmp_path/'s', archs=('tiny_cnn',), variants=('resized',), bias=lambda c: {'accuracy': {'WH': .6, 'WnH': .6}})
    cfg = AuditConfig(n_boot=0, figures=False)
    r = audit(tmp_path/'s', cfg=cfg, progress=False)
    assert isinstance(r, AuditResult) and r.out == tmp_path/'s'/'audit' and (r.runs, r.excluded, r.reused) == (2, 0, False)
    assert r.rows == len(pd.read_csv(r.out/'audit.csv')) and r.flagged > 0 and r.to_dict()['out'] == str(r.out)
    again = audit(tmp_path/'s', cfg=cfg, progress=False)
    assert again.reused and (again.runs, again.rows, again.flagged) == (r.runs, r.rows, r.flagged)
    write_csv(r.out/'drop_rates.csv', pd.DataFrame({'x': [1]}))          # a stale output of an earlier setting
    assert not audit(tmp_path/'s', cfg=AuditConfig(n_boot=0, figures=False, seed=1), progress=False).reused
    assert not (r.out/'drop_rates.csv').exists()                          # removed when the settings changed


def test_invert_reaches_the_runs_table_and_the_cell_count_factor_model(tmp_path):
    "A run trained/tested upside down (config `invert`) is a design axis of `AuditFrame.runs`; the factor model finds its effect."
    import json
    fabricate_runs(tmp_path, archs=('tiny_cnn',), variants=('resized', 'openface'), label_sources=('court',),
                   n_per_group={'BH': 150, 'BnH': 150, 'WH': 150, 'WnH': 150},
                   bias=lambda c: {'accuracy': .6} if c['variant'] == 'openface' else {'accuracy': .9})
    cfg = tmp_path/'runs'/'tiny_cnn-openface-court'/'config.json'
    c = json.loads(cfg.read_text()); c['invert'] = 'test'; cfg.write_text(json.dumps(c))
    af = audit_runs(tmp_path, n_boot=0)
    assert dict(zip(af.runs.run_id, af.runs.invert)) == {'tiny_cnn-openface-court': 'test', 'tiny_cnn-resized-court': 'none'}
    eff = design_factor_effects(af, factors=('invert',))       # no outcomes: the cell-count path
    e = eff[(eff.factor == 'invert') & (eff.term == 'effect')]
    assert len(e) == 2 and set(e.level) == {'test'} and (e.ci_high < 0).all()   # inverted: less often correct, for both races
