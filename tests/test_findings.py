"""The findings-first report (`report.findings`, `report.html`) on a fabricated Phase-2-sized study (42 runs × 6
scenarios): every seed-shaped table equals the known answer per label source, the page is small, loads in headless
Chromium, leads with the findings and reaches every section from the top; and a simulation through the real
`AuditFrame` code: a bias injected into one race is named with the right sign and an interval excluding 0, and with
no bias the findings claim a difference no more often than the nominal rate."""
import re, time
import numpy as np, pandas as pd, pytest

from mugshotrace.core import write_json
from mugshotrace.audit.metrics import wilson_interval
from mugshotrace.audit.stats import newcombe_interval, fisher_gap_pvalue, add_qvalues, simulate_predictions
from mugshotrace.audit.frame import AuditFrame, AuditConfig
from mugshotrace.audit.study import fabricate_study_audit
from mugshotrace.audit.selfaudit import write_study_tables
from mugshotrace.report import findings as F
from mugshotrace.report.html import study_report
from test_study_tables import known, expected_cases, V
from test_report import _chromium, chromium_probe

PLANTED = 'vgg19-mtcnn-court'   # its pooled test set carries the study's one large accuracy gap (Black − White = +15 points)


def _phase2(root, run_folders:bool=False):
    "A study folder of the seed's Phase 2 size: the audit table (Wilson intervals, pooled gaps, Holm q), optionally 42 run folders."
    aud = fabricate_study_audit(known)
    k = np.rint(aud.value * aud.n); aud['ci_low'], aud['ci_high'] = wilson_interval(k, aud.n)
    own = aud[(aud.attribute == 'race') & ~aud.test_set.str.contains(':')]
    rows = []
    for rid, g in own.groupby('run_id'):
        b, w = g[g.group == 'Black'].iloc[0], g[g.group == 'White'].iloc[0]
        kb, kw = (950, 800) if rid == PLANTED else (round(b.value * b.n), round(w.value * w.n))
        lo, hi = newcombe_interval(kb, b.n, kw, w.n)
        rows.append(b.to_dict() | dict(test_set=f'{b.label_source}/pooled', group='Black vs White', attribute='race', metric='gap:accuracy',
                                       value=(kb - kw) / b.n, ci_low=float(lo), ci_high=float(hi), n=2 * b.n,
                                       p_value=float(fisher_gap_pvalue(kb, b.n, kw, w.n)[0])))
    aud = add_qvalues(pd.concat([aud, pd.DataFrame(rows)], ignore_index=True), 'holm')
    runs = aud[['run_id', 'arch', 'variant', 'label_source', 'task']].drop_duplicates()
    for r in (runs.itertuples() if run_folders else []):
        write_json(root / 'runs' / r.run_id / 'config.json', {'run_id': r.run_id, 'arch': r.arch, 'variant': r.variant,
                                                               'label_source': r.label_source, 'task': 'race2', 'init': 'imagenet', 'sampling': 'balanced'})
        write_json(root / 'runs' / r.run_id / 'state.json', {'run_id': r.run_id, 'state': 'done'})
    (root / 'audit').mkdir(parents=True, exist_ok=True); aud.to_csv(root / 'audit' / 'audit.csv', index=False)
    write_study_tables(AuditFrame(aud, runs.assign(sampling='balanced')), root / 'audit', n_boot=200)   # as `mugshotrace audit` writes them
    return root


@pytest.fixture(scope='module')
def phase2(tmp_path_factory):
    root = _phase2(tmp_path_factory.mktemp('phase2') / 'study')
    t0 = time.time(); p = study_report(root, synthetic=True); secs = time.time() - t0
    return root, p, secs


@pytest.mark.parametrize('src', ['court', 'student'])
def test_seed_tables_known_per_label_source(phase2, src):
    "The tables the report reads (the audit's CSVs) equal the known answer, per label source."
    root, _, _ = phase2
    tabs = F.load_study_tables(root)[src]; x = expected_cases(); xs = x[x.label_source == src]
    assert set(tabs) >= {'cases', 'extremes', 'top_means', 'design', 'design_wide', 'impactful', 'impactful_summary'}
    assert (tabs['cases'].label_source == src).all() and len(tabs['cases']) == 126
    e = tabs['extremes']
    for race in ('Black', 'White'):
        for end, asc in (('highest', False), ('lowest', True)):
            want = xs[xs.race == race].sort_values('acc', ascending=asc).head(5); got = e[(e.race == race) & (e.end == end)]
            assert list(got.arch) == list(want.arch) and list(got.variant) == list(want.variant)
            assert list(got.test_set_no) == list(want.no) and np.allclose(got.accuracy, want.acc)
    t = tabs['top_means'].set_index(['which', 'race'])
    for which, asc in (('most', False), ('least', True)):
        m = {r: xs[xs.race == r].acc.sort_values(ascending=asc).head(10).mean() for r in ('Black', 'White')}
        assert np.isclose(t.loc[(which, 'Black'), 'mean'], m['Black']) and np.isclose(t.loc[(which, 'White'), 'mean'], m['White'])
        assert np.isclose(t.loc[(which, 'Black − White'), 'mean'], m['Black'] - m['White'])
        assert t.loc[(which, 'Black − White'), 'sel_low'] < .03 < t.loc[(which, 'Black − White'), 'sel_high']
        assert isinstance(t.loc[(which, 'Black'), 'picked'], tuple) and len(t.loc[(which, 'Black'), 'picked']) == 10
    own = xs[xs.variant == xs.test_variant].groupby(['arch', 'variant']).acc.mean()
    d = tabs['design'].set_index(['arch', 'variant']).accuracy
    assert len(d) == 21 and np.allclose(d.loc[own.index], own) and tabs['design_wide'].shape == (7, 4)   # arch + 3 variants
    want = pd.concat([xs[xs.race == r].sort_values('acc', ascending=a).head(10) for r in ('Black', 'White') for a in (False, True)])
    s = tabs['impactful_summary'].iloc[0]
    assert s.cases == 40 and s.cross_variant == int((want.variant != want.test_variant).sum()) and np.isclose(s.base_rate, 2 / 3)


def _section(h, sid):
    i = h.index(f"<section id='{sid}'>"); return h[i:h.index('</section>', i)]


def test_report_shows_the_known_answers_and_leads_with_findings(phase2):
    root, p, secs = phase2
    h = p.read_text(); x = expected_cases()
    assert h.index("<section id='findings'>") == h.index('<section')
    sections = re.findall(r"<section id='([^']+)'>", h)
    assert sections[:3] == ['findings', 'seed-court', 'seed-student'], sections
    for src, top_arch in (('court', 'vgg19'), ('student', 'alexnet')):
        sec = _section(h, f'seed-{src}'); xs = x[(x.label_source == src) & (x.race == 'Black')]
        best = xs.sort_values('acc', ascending=False).iloc[0]
        ext = sec[sec.index(f"id='extremes-{src}'"):sec.index(f"id='top-means-{src}'")]
        assert f'<td>{top_arch}</td>' in ext and f'{100 * best.acc:.1f} [' in ext
        for sub in ('extremes', 'top-means', 'design', 'impactful'): assert f"id='{sub}-{src}'" in sec
    fnd = _section(h, 'findings')
    assert ('Largest accuracy gap with court labels: Black images are classified more accurately than White images by 15.0 points '
            f'(run {PLANTED}') in fnd
    claims = re.findall(r'<li class=claim>(.*?)</li>', fnd)
    assert sum('Black minus White is +' in c and 'selection-blind estimate is +3.0' in c for c in claims) == 4
    assert any(PLANTED in c for c in claims)
    print(f'phase-2 report: {p.stat().st_size / 1e6:.2f} MB, written in {secs:.1f} s')
    assert p.stat().st_size < 5e6


def _chromium_checks(p, tmp_path, sections):
    info, secs, err = chromium_probe(p, tmp_path, budget_ms=20000)
    print(f'phase-2 report ({p.stat().st_size / 1e6:.2f} MB) in headless Chromium: {secs:.1f} s, {info}')
    assert info['first'] == 'findings' and info['broken'] == 0 and info['unresolved'] == [] and info['links'] >= 20
    assert info['sections'] == sections and 'Uncaught' not in err and p.stat().st_size < 5e6


@pytest.mark.skipif(_chromium() is None, reason='headless Chromium is not installed')
def test_phase2_report_loads_in_chromium(phase2, tmp_path):
    _chromium_checks(phase2[1], tmp_path, 7)      # findings, seed-court, seed-student, runs, groups, tests, table


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason='headless Chromium is not installed')
def test_phase2_report_with_run_folders_and_cards(tmp_path):
    "The full Phase-2 layout: 42 run folders, so 42 model cards and the runs table (slow: a card figure per run)."
    root = _phase2(tmp_path / 'study', run_folders=True)
    t0 = time.time(); p = study_report(root, synthetic=True); secs = time.time() - t0
    print(f'phase-2 report with 42 cards written in {secs:.1f} s')
    assert len(list(root.glob('runs/*/model_card.html'))) == 42 and p.read_text().count("'>card</a>") == 42
    _chromium_checks(p, tmp_path, 7)


# ---------------------------------------------------------------- findings simulation through the real AuditFrame
SIM_ARCHS = ('alexnet', 'resnet50', 'vgg19')

def sim_audit(seed, black_shift=0.0, n=100, archs=SIM_ARCHS, test_variants=('resized', 'openface')):
    "An audit of simulated predictions (both races in each test set) passed through `AuditFrame.from_predictions`."
    rng = np.random.default_rng(seed); parts = []
    for i, a in enumerate(archs):
        for s in ('court', 'student'):
            for j, tv in enumerate(test_variants):
                base = .72 + .05 * i + .02 * j
                acc = {'BH': base + black_shift, 'BnH': base + black_shift, 'WH': base, 'WnH': base}
                d = simulate_predictions({'BH': n, 'BnH': n, 'WH': n, 'WnH': n}, accuracy=acc, seed=int(rng.integers(2**31)))
                af = AuditFrame.from_predictions(y_true=d.label, y_pred=d.Prediction, groups=d.race.rename('race'),
                                                 conf=d[['Black_Prob', 'White_Prob']].rename(columns=lambda c: c[:-5]), cfg=AuditConfig(n_boot=0))
                parts.append(af.df.assign(run_id=f'{a}-resized-{s}', arch=a, variant='resized', label_source=s, task='race2',
                                          test_set=f'{s}/both' if tv == 'resized' else f'{tv}:{s}/both'))
    return add_qvalues(pd.concat(parts, ignore_index=True), 'holm')


def _claims(aud, seed=0):
    per = F.load_study_tables('/nonexistent', aud, n_boot=50, seed=seed)
    return F.study_findings(aud, per)


@pytest.mark.parametrize('shift', [0.12, -0.12])
def test_injected_bias_is_named_with_its_sign(tmp_path, shift):
    "A bias injected into the Black group's accuracy: the report's findings name it, right sign, interval excluding 0."
    root = tmp_path / 'sim'; (root / 'audit').mkdir(parents=True)
    sim_audit(1, shift).to_csv(root / 'audit' / 'audit.csv', index=False)
    fnd = _section(study_report(root, synthetic=True).read_text(), 'findings')
    hi, lo = ('Black', 'White') if shift > 0 else ('White', 'Black')
    for src in ('court', 'student'):
        m = re.search(rf'<li class=claim>Largest accuracy gap with {src} labels: {hi} images are classified more accurately than {lo} '
                      r'images by [\d.]+ points \(run [^;]+; Black − White = ([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]', fnd)
        assert m, fnd
        v, l, h = map(float, m.groups()); assert np.sign(v) == np.sign(shift) and (l > 0 if shift > 0 else h < 0)
        ext = re.findall(rf'<li class=claim>With {src} labels, among the \d+ (?:most|least) accurate scenarios per race, Black minus White '
                         r'is ([+-][\d.]+) points \[([+-][\d.]+), ([+-][\d.]+)\]', fnd)
        assert len(ext) == 2 and all(np.sign(float(v)) == np.sign(shift) and (float(l) > 0 if shift > 0 else float(h) < 0) for v, l, h in ext)


def _null_rates(reps, seed0=0):
    gap = ext = anyc = 0
    for r in range(reps):
        c = [f for f in _claims(sim_audit(seed0 + r), seed=r) if f.claim]
        g, e = any(f.topic == 'gaps' for f in c), any(f.topic == 'extremes' for f in c)
        gap += g; ext += e; anyc += g or e
    return gap / reps, ext / reps, anyc / reps


def test_no_bias_few_claims_fast():
    "With no bias, 20 audits: at most 2 with any claim (P ≤ 0.08 at the nominal 5 %, so this rarely fails by chance)."
    g, e, a = _null_rates(20)
    assert a <= .1, (g, e, a)


@pytest.mark.slow
def test_no_bias_claims_at_most_nominal_slow():
    "With no bias over 400 seeds, the share of audits with any claim in the findings is at most 5 % + 2 Monte-Carlo SE (1.1 points)."
    reps = 400; g, e, a = _null_rates(reps, seed0=1000); se = np.sqrt(.05 * .95 / reps)
    print(f'null claim rates over {reps} audits: error gaps {g:.3f}, extremes {e:.3f}, either {a:.3f} (MC SE at 5 %: {se:.3f})')
    assert a <= .05 + 2 * se, (g, e, a)


def test_confounding_ranking_and_metric_column_in_the_report(tmp_path):
    "The ranking of `mugshotrace confound STUDY` leads the confounding findings; per-run tables keep their metric column."
    from mugshotrace.report.cards import example_study
    root = example_study(tmp_path / 'study', runs=('r1', 'r2'))
    (root / 'runs' / 'r1' / 'confounding').mkdir(parents=True)
    pd.DataFrame({'target_label': 'all', 'group': 'all', 'metric': ['confounding', 'reconstruction_flip', 'oracle_error'],
                  'value': [.4, .1, .05], 'ci_low': [.3, .05, .02], 'ci_high': [.5, .15, .08], 'n': 100}).to_csv(
        root / 'runs' / 'r1' / 'confounding' / 'confounding.csv', index=False)
    (root / 'confound').mkdir()
    pd.DataFrame({'run_id': ['r1', 'r2'], 'arch': 'tiny_cnn', 'variant': 'openface', 'label_source': 'court', 'metric': 'confounding',
                  'value': [.4, .9], 'ci_low': [.3, .2], 'ci_high': [.5, 1.], 'noise_floor': .1, 'noise_ci_low': .05, 'noise_ci_high': .15,
                  'net': [.3, .8], 'net_ci_low': [.18, -.1], 'net_ci_high': [.42, 1.], 'rank': [1, 2], 'n_images': [400, 8],
                  'verdict': ['ok', 'too_small'], 'note': ['', 'reconstructions poor']}).to_csv(root / 'confound' / 'confounding_ranking.csv', index=False)
    h = study_report(root).read_text(); fnd, conf = _section(h, 'findings'), _section(h, 'confounding')
    assert 'Confounded model #1: r1' in fnd and 'too small to measure 1 model' in fnd and '0.900' not in fnd
    assert '<th>metric</th>' in conf and 'reconstruction_flip' in conf and 'oracle_error' in conf and 'confounding_ranking.csv' in conf
