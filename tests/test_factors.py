"Design-factor effects: new factors (task, inversion, test variant, train ≠ test), separation handled (Firth, identification)."
import warnings
import numpy as np
import pandas as pd
import pytest
from mugshotrace.audit.frame import AuditFrame
from mugshotrace.audit.factors import design_factor_effects, _firth, _unbounded

TRUE_MISMATCH = -1.0     # log-odds effect of testing on another preprocessing than the model was trained on


def _study(seed, G=100, pure=True, sd_u=0.5):
    """8 runs (arch × variant × invert), each tested on its own variant and the other one (`<variant>:court/test`);
    correctness logit = 1.2 + face difficulty + TRUE_MISMATCH·[train ≠ test]; with `pure`, arch b on White faces is
    all correct (a planted cell that maximum likelihood sends to +∞)."""
    g = np.random.default_rng(seed); u = g.normal(0, sd_u, 2 * G)
    grp, ids = np.repeat(['Black', 'White'], G), np.array([f'i{k}' for k in range(2 * G)])
    runs, rows = [], []
    for arch in ('a', 'b'):
        for var in ('v1', 'v2'):
            for inv in ('none', 'test'):
                rid = f'{arch}-{var}-{inv}'
                runs.append({'run_id': rid, 'arch': arch, 'variant': var, 'label_source': 'court', 'task': 'race', 'invert': inv})
                for tv in ('v1', 'v2'):
                    eta = 1.2 + u + TRUE_MISMATCH * (tv != var)
                    ok = g.random(2 * G) < 1 / (1 + np.exp(-eta))
                    if pure and arch == 'b': ok = ok | (grp == 'White')
                    rows.append(pd.DataFrame({'run_id': rid, 'test_set': 'court/test' if tv == var else f'{tv}:court/test',
                                              'test_variant': tv, 'invert': inv, 'image_id': ids, 'group': grp, 'correct': ok}))
    o = pd.concat(rows, ignore_index=True)
    cells = o.groupby(['run_id', 'test_set', 'group']).correct.agg(['mean', 'size']).reset_index()
    af = AuditFrame(cells.rename(columns={'mean': 'value', 'size': 'n'}).assign(metric='accuracy', attribute='race'),
                    pd.DataFrame(runs).drop(columns='invert'))
    return af, o


def _effects(seed, **kw):
    af, o = _study(seed, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return design_factor_effects(af, outcomes=o), design_factor_effects(af)


def test_planted_all_correct_cell_is_not_a_finding_and_real_effect_is_found():
    for eff in _effects(0):     # clustered by image, and from the cell counts
        assert set(eff.method) == {'firth'}
        cell = eff[(eff.factor == 'arch') & eff.group.isin(['White', 'White vs Black'])]
        assert len(cell) == 2 and not cell.identified.any() and set(cell.direction) == {'+inf'}
        assert cell.p_value.isna().all() and cell.log_odds.isna().all() and cell.q_value.isna().all()
        assert not (eff.p_value < 0.5)[eff.factor == 'arch'].loc[lambda s: eff.group.str.contains('White')].any()
        assert (cell.penalised_log_odds > 1).all()       # the labelled penalised estimate is finite and positive
        ok = eff[eff.identified]
        assert ok.log_odds.abs().max() < 5 and len(ok) == len(eff) - 2     # no log-odds of 23 anywhere
        # the injected effect of testing on another preprocessing: found in both groups, interval excluding 0
        mm = eff[(eff.factor == 'train_ne_test') & (eff.term == 'effect')].set_index('group')
        assert set(mm.level) == {'yes'} and set(mm.reference) == {'no'}
        assert (mm.ci_high < 0).all() and mm.identified.all()
        # the new factors are there
        assert {'test_variant', 'train_ne_test', 'arch', 'variant'} <= set(eff.factor)
    assert 'invert' in set(_effects(0)[0].factor)      # inversion comes with the per-prediction outcomes


def test_no_separation_keeps_maximum_likelihood():
    eff, _ = _effects(1, pure=False)
    assert set(eff.method) == {'ml'} and eff.identified.all() and eff.penalised_log_odds.isna().all()


def _coverage(seeds):
    hits = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for s in seeds:
            af, o = _study(s, sd_u=0.0)     # no face difficulty: the conditional effect is the marginal one
            eff = design_factor_effects(af, outcomes=o)
            r = eff[(eff.factor == 'train_ne_test') & (eff.group == 'Black') & (eff.term == 'effect')].iloc[0]
            hits.append(r.ci_low <= TRUE_MISMATCH <= r.ci_high)
    return np.mean(hits)


def test_injected_effect_interval_covers_with_a_planted_pure_cell():
    "40 simulated studies with a planted pure cell: the clustered Firth interval of the train ≠ test effect covers."
    cover = _coverage(range(100, 140))     # Monte-Carlo SE at 95 %: 3.4 points; 0.85 is 3 SE below
    assert cover >= 0.85, cover


@pytest.mark.slow
def test_injected_effect_interval_coverage_slow():
    cover = _coverage(range(1000, 1400))   # Monte-Carlo SE at 95 %: 1.1 points
    assert 0.92 <= cover <= 0.98, cover


def test_firth_matches_firthmodels_and_identification_matches_detect_separation():
    fm = pytest.importorskip('firthmodels')
    rng = np.random.default_rng(3)
    X = np.column_stack([np.ones(6), [0, 1, 0, 1, 0, 1], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1]]).astype(float)   # column 2: the pure cell's own
    n = rng.integers(5, 15, 6).astype(float); k = np.rint(n * rng.uniform(.2, .8, 6)); k[3] = n[3]    # one pure cell
    b = _firth(X, k, n)
    Xr = np.vstack([np.repeat(X, k.astype(int), 0), np.repeat(X, (n - k).astype(int), 0)])
    yr = np.r_[np.ones(int(k.sum())), np.zeros(int((n - k).sum()))]
    ref = fm.FirthLogisticRegression(fit_intercept=False, backend='numpy', max_iter=200, gtol=1e-10, xtol=1e-10).fit(Xr, yr)
    np.testing.assert_allclose(b, ref.coef_, atol=1e-5)
    A = np.vstack([X[k > 0], -X[n - k > 0]])
    mine = [_unbounded(np.eye(4)[j], A) for j in range(4)]
    sep = fm.detect_separation(Xr, yr, fit_intercept=False)
    assert sep.separation and [m == 0 for m in mine] == list(sep.is_finite)
    assert [int(m) for m in mine] == [int(x) for x in sep.directions]
