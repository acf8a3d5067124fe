"""The seed-shaped study tables (`audit.study`): known answers on a fabricated 42-run study, per label source, and
the coverage of the selection-aware intervals of the ten-most/least means and their Black−White difference."""
import numpy as np
import pandas as pd
import pytest
from mugshotrace.audit.study import study_tables, fabricate_study_audit, top_means_table, SEED_ARCHS

V = ('resized', 'openface', 'mtcnn')

def known(a, v, s, tv, r):
    "Distinct accuracies (multiples of 1/1000); the student source reverses the architecture order, so sources must not mix."
    i = SEED_ARCHS.index(a); i = 6 - i if s == 'student' else i
    return round(0.15 + 0.8*(i*9 + V.index(v)*3 + V.index(tv))/63 + (0.03 if r == 'Black' else 0), 3)

def expected_cases():
    return pd.DataFrame([dict(arch=a, variant=v, label_source=s, test_variant=tv, race=r, acc=known(a, v, s, tv, r),
                              no=1 + 6*('court', 'student').index(s) + 2*V.index(tv) + ('Black', 'White').index(r))
                         for a in SEED_ARCHS for v in V for s in ('court', 'student') for tv in V for r in ('Black', 'White')])

@pytest.fixture(scope='module')
def tables(): return study_tables(fabricate_study_audit(known), n_boot=200)

def test_cases_and_numbering(tables):
    c = tables['cases']; assert len(c) == 252 and c.run_id.nunique() == 42
    e = expected_cases(); m = c.merge(e, on=['arch', 'variant', 'label_source', 'test_variant', 'race'])
    assert len(m) == 252 and (m.test_set_no == m.no).all() and np.allclose(m.accuracy, m.acc)
    assert (c.cross_variant == (c.variant != c.test_variant)).all() and c.cross_variant.sum() == 168

@pytest.mark.parametrize('src', ['court', 'student'])
def test_extremes_known(tables, src):
    e, x = tables['extremes'], expected_cases()
    for race in ('Black', 'White'):
        xs = x[(x.label_source == src) & (x.race == race)]
        for end, asc in (('highest', False), ('lowest', True)):
            want = xs.sort_values('acc', ascending=asc).head(5)
            got = e[(e.label_source == src) & (e.race == race) & (e.end == end)]
            assert list(got['rank']) == [1, 2, 3, 4, 5]
            assert list(got.arch) == list(want.arch) and list(got.variant) == list(want.variant)
            assert list(got.test_set_no) == list(want.no) and np.allclose(got.accuracy, want.acc)
            assert ((got.ci_low <= got.accuracy) & (got.accuracy <= got.ci_high)).all()
    # the two sources differ: court's best Black case is vgg19's, student's alexnet's
    top = e[(e.label_source == src) & (e.race == 'Black') & (e.end == 'highest')].arch.iloc[0]
    assert top == ('vgg19' if src == 'court' else 'alexnet')

@pytest.mark.parametrize('src', ['court', 'student'])
def test_top_means_known(tables, src):
    t, x = tables['top_means'], expected_cases()
    for which, asc in (('most', False), ('least', True)):
        means = {r: x[(x.label_source == src) & (x.race == r)].acc.sort_values(ascending=asc).head(10).mean() for r in ('Black', 'White')}
        got = t[(t.label_source == src) & (t.which == which)].set_index('race')['mean']
        assert np.isclose(got['Black'], means['Black']) and np.isclose(got['White'], means['White'])
        assert np.isclose(got['Black − White'], means['Black'] - means['White'])
        d = t[(t.label_source == src) & (t.which == which) & (t.race == 'Black − White')].iloc[0]
        assert d.sel_low < 0.03 < d.sel_high and bool(d.survives)     # the planted 3-point gap, found

@pytest.mark.parametrize('src', ['court', 'student'])
def test_design_and_impactful_known(tables, src):
    d, x = tables['design'], expected_cases()
    own = x[(x.label_source == src) & (x.variant == x.test_variant)].groupby(['arch', 'variant']).acc.mean()
    got = d[d.label_source == src].set_index(['arch', 'variant']).accuracy
    assert len(got) == 21 and np.allclose(got.loc[own.index], own)
    assert tables['design_wide'].shape == (7, 6)
    imp, s = tables['impactful'], tables['impactful_summary'].set_index('label_source').loc[src]
    xs = x[x.label_source == src]
    want = pd.concat([xs[xs.race == r].sort_values('acc', ascending=a).head(10) for r in ('Black', 'White') for a in (False, True)])
    cross = int((want.variant != want.test_variant).sum())
    assert s.cases == 40 and s.cross_variant == cross and np.isclose(s.share, cross/40) and np.isclose(s.base_rate, 2/3)
    assert len(imp[imp.label_source == src]) == 40 and int(imp[imp.label_source == src].cross_variant.sum()) == cross

def _coverage(reps, m=63, n=200, seed=0):
    "Coverage of the selection-aware (split) and naive (fixed-selection bootstrap) intervals of the top-10 means and difference."
    rng = np.random.default_rng(seed)
    truth = {'Black': np.full(m, .85), 'White': np.linspace(.6, .95, m)}   # ties among Black: a strong winner's curse
    hit = {'sel': np.zeros(6), 'naive': np.zeros(6)}
    for rep in range(reps):
        rows = [dict(run_id=f'r{i:03d}', test_set=f'court/{r}', label_source='court', task='race2', race=r, n=n,
                     correct=x, p=p) for r, ps in truth.items() for i, (p, x) in enumerate(zip(ps, rng.binomial(n, ps)))]
        cases = pd.DataFrame(rows); p = cases.set_index(['run_id', 'test_set']).p
        t = top_means_table(cases, top=10, n_boot=200, seed=rep).set_index(['which', 'race'])
        for j, (which, race) in enumerate((w, r) for w in ('most', 'least') for r in ('Black', 'White', 'Black − White')):
            row = t.loc[(which, race)]
            if race == 'Black − White':
                b, w = t.loc[(which, 'Black')], t.loc[(which, 'White')]
                ts, tn = p[list(b.split_picked)].mean() - p[list(w.split_picked)].mean(), p[list(b.picked)].mean() - p[list(w.picked)].mean()
            else: ts, tn = p[list(row.split_picked)].mean(), p[list(row.picked)].mean()
            hit['sel'][j] += row.sel_low <= ts <= row.sel_high; hit['naive'][j] += row.naive_low <= tn <= row.naive_high
    return hit['sel']/reps, hit['naive']/reps

def test_selection_aware_coverage_fast():
    # 300 replicates: Monte-Carlo SE of a 95 % coverage is 1.3 points; we allow 2 points + 2 SE = 4.5 points
    sel, naive = _coverage(300)
    assert (np.abs(sel - .95) <= .045).all(), sel
    # the naive interval undercovers the top-10 means of the tied race and the difference (selection bias)
    assert naive[0] < .5 and naive[2] < .8 and naive[3] < .5 and naive[5] < .8, naive

@pytest.mark.slow
def test_selection_aware_coverage_slow():
    # 3000 replicates: Monte-Carlo SE 0.4 points; within 2 points of 95 %
    sel, naive = _coverage(3000, seed=1)
    print('selection-aware coverage (most B, W, B−W; least B, W, B−W):', np.round(sel, 4), 'naive:', np.round(naive, 4))
    assert (np.abs(sel - .95) <= .02).all(), sel
    assert naive[0] < .5 and naive[2] < .8, naive
