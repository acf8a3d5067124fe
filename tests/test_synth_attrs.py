"""The benchmark's gender and skin-tone attributes (mugshotrace.synth.attributes): a default config makes the files
it made before (hashes from the code before the attributes existed), the shares and label error rates are the
configured ones, the cues are rendered and measurable with dlib, race and skin tone come apart with
race_cue='geometry', and a gender task trains through the study runner."""
import hashlib, json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from mugshotrace.core import UserError, load_rgb, read_json, write_csv, write_json
from mugshotrace.labels.tables import consensus
from mugshotrace.vocab import SUBGROUPS, GENDERS, SKIN_TONES
from mugshotrace.synth.attributes import NEW_ATTRS, ALL_ATTRS, ATTRIBUTE_DEFAULTS
from mugshotrace.synth.benchmark import (SynthConfig, make_benchmark, load_truth, plan_benchmark, simulate_labels, majority_error,
                                         add_synth_parser, config_from_args)

def _se(p, n): return np.sqrt(max(p * (1 - p), 1e-4) / n)

# --- a default config is the benchmark of before ---------------------------------------------------------------------

# sha256 of the files made by main at 935af18 (before gender/skin tone existed), computed there with these configs
BEFORE = {
    'A': (dict(people=6, seed=5, width=64, height=80), {
        'labels.csv': '9bc446bc6291db3561a0e799e497baab1a8947157c0e2b4da461a3d801bec11d',
        'votes.csv': '50968017bd3aea5145909248db92a292445a7b4a2ca9e532bf2fcedbd96cae24',
        'truth.json': '248f781416cd1edde76908c3b739decb6dd47e5f7ded657118fd90c3de7fdf72',
        'cases.csv': '9f8ac2dfc7b7dab8fb741a1a3484773d012d3d748d2e64a1f16b406a79c4bc7e',
        'outcomes_truth.json': 'ee2137f0166fef5c385def881e18bdfafbd61bfd76e2916128904b23579572e0',
        '.synth.json': '67d18c77c8c6f09de3c1f6a743bb518774c068d9776ba48a5011f614d9ac0c9d',
        'images': '53fce1a4aff44f8f74feaa544c7ed4fd6bea5eeba10c6e313a4aab101d0ae2e9'}),
    'B': (dict(people=8, seed=11, width=96, height=120, cue_class='BH', cue_rate=1.0, cue_kind='placard', court_noise={'BH': 0.3},
               race_strength=0.7, shares={g: .25 for g in SUBGROUPS}), {
        'labels.csv': '0e3750441abf7ce5311d8e039400af21c27dcab57df656f183a121f394ac602d',
        'votes.csv': '993647245defdddc4355bd21fc45a3a8575b716f71a1a03dd94d014699c14bd7',
        'truth.json': '53eea4e04370cd717e0eaf91a9523b7554cc19c9a1256375d0b5945b98a87e21',
        'cases.csv': '1c7a8c306edae61f109b86d8d9e4335174e9b874a1d219ba7d6703dfac0ca47b',
        'outcomes_truth.json': '9ee5486c18dcbcf73d3d9e41c52f2b21b15f4305f1d933ed346da566d95a07aa',
        '.synth.json': '52c067b2102f8beb02849da68323fce9021972a645f27e82ba51bc72ac4cfc39',
        'images': '0fc26b38788e1096b4f0c5ec2d0d9d1adf02d1ab2379fb1d1dbe970a546e205f'}),
}
NEW_COLUMNS = ['gender_court', 'skin_tone_court', 'gender_student', 'skin_tone_student']

def _sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()

def _as_before(out, tmp):
    "labels.csv and truth.json with the new columns/keys removed, written by the same writers."
    lab = pd.read_csv(out/'labels.csv', dtype=str, keep_default_na=False)
    assert list(lab.columns[-4:]) == NEW_COLUMNS
    write_csv(tmp/'labels.csv', lab.drop(columns=NEW_COLUMNS))
    t = read_json(out/'truth.json')
    for v in t['images'].values():
        assert v.pop('gender') in GENDERS and v.pop('skin_tone') in SKIN_TONES
        assert v['render'].pop('gender_geometry') == 0 and v['render'].pop('race_geometry') == 0
    write_json(tmp/'truth.json', t)
    return tmp

@pytest.mark.parametrize('key', list(BEFORE))
def test_default_config_makes_the_files_of_before(key, tmp_path):
    "New attributes off: images, votes, outcomes, marker byte-identical; labels and truth identical once the new columns/keys go."
    kw, want = BEFORE[key]
    cfg = SynthConfig(**kw)
    assert not set(cfg.to_dict()) & set(ATTRIBUTE_DEFAULTS)          # the config (and its hash) of before
    out = make_benchmark(tmp_path/'b', cfg, progress=False)
    im = hashlib.sha256()
    for p in sorted((out/'images').glob('*.jpg')): im.update(p.name.encode()); im.update(p.read_bytes())
    assert im.hexdigest() == want['images']
    for f in ('votes.csv', 'cases.csv', 'outcomes_truth.json', '.synth.json'): assert _sha(out/f) == want[f], f
    (tmp_path/'old').mkdir(); old = _as_before(out, tmp_path/'old')
    for f in ('labels.csv', 'truth.json'): assert _sha(old/f) == want[f], f
    # and the new attributes are there: in the truth and the labels of both sources
    t, lab = load_truth(out), pd.read_csv(out/'labels.csv')
    assert set(t.gender) <= set(GENDERS) and set(t.skin_tone) <= set(SKIN_TONES)
    assert ((t.skin_tone == 'Darker') == (t.race == 'Black')).all()   # the default association: skin tone is rendered race

def test_new_settings_change_only_what_they_should():
    "Own random streams: shares, association and cue strengths leave the race/ethnicity plan and labels of before alone."
    base = SynthConfig(people=60, seed=3)
    a = plan_benchmark(base)
    b = plan_benchmark(SynthConfig(people=60, seed=3, female_share=0.9, darker_if_black=0.6, darker_if_white=0.3, gender_strength=1.0))
    keep = ['image_id', 'person_id', 'booking', 'race', 'ethnicity', 'group', 'cue', 'source']
    pd.testing.assert_frame_equal(a[keep], b[keep])
    strip = lambda s: [{k: v for k, v in r.items() if k != 'gender_geometry'} for r in s]
    assert strip(a.render) == strip(b.render)                            # tone included: race_cue is still 'tone'
    la, _ = simulate_labels(a, base); lb, _ = simulate_labels(b, base)
    cols = ['race_court', 'ethnicity_court', 'race_student', 'ethnicity_student']
    pd.testing.assert_frame_equal(la[cols], lb[cols])
    # raising a share only flips people one way (coupled draws)
    assert not ((a.gender == 'Female') & (b.gender == 'Male')).any() and (b.gender == 'Female').sum() > (a.gender == 'Female').sum()

# --- shares and label error rates (no pixels) --------------------------------------------------------------------------

FEMALE = {'BH': 0.2, 'WH': 0.5, 'BnH': 0.35, 'WnH': 0.8}

@pytest.fixture(scope='module')
def big():
    cfg = SynthConfig(people=6000, seed=8, shares={g: .25 for g in SUBGROUPS}, bookings=(0.7, 0.3), female_share=FEMALE,
                      darker_if_black=0.75, darker_if_white=0.15, court_noise={'BH': 0.3, 'WH': 0.1, 'BnH': 0.0, 'WnH': 0.2},
                      student_noise={'BH': 0.25, 'WH': 0.05, 'BnH': 0.15, 'WnH': 0.0}, vote_attributes=('gender', 'race', 'skin_tone'))
    plan = plan_benchmark(cfg)
    return cfg, plan, *simulate_labels(plan, cfg)

def test_attribute_shares_are_the_configured_ones(big):
    cfg, plan, _, _ = big
    ppl = plan.drop_duplicates('person_id')
    for g in SUBGROUPS:
        m = ppl.group == g; got = (ppl.gender[m] == 'Female').mean()
        assert abs(got - FEMALE[g]) < 4 * _se(FEMALE[g], m.sum()), (g, got)
    for race, p in (('Black', 0.75), ('White', 0.15)):
        m = ppl.race == race; got = (ppl.skin_tone[m] == 'Darker').mean()
        assert abs(got - p) < 4 * _se(p, m.sum()), (race, got)
    # gender is independent of skin tone given the subgroup (own uniforms): within BH, P(Female | Darker) = P(Female | Lighter)
    bh = ppl[ppl.group == 'BH']; f = bh.groupby('skin_tone').gender.apply(lambda s: (s == 'Female').mean())
    assert abs(f['Darker'] - f['Lighter']) < 4 * np.sqrt(0.16 / (bh.skin_tone == 'Lighter').sum())
    for pid, g in plan.groupby('person_id'): assert g.gender.nunique() == g.skin_tone.nunique() == 1   # bookings share them

def test_gender_and_skin_tone_label_errors_are_the_configured_rates(big):
    cfg, plan, labels, votes = big
    for g in SUBGROUPS:
        m = (plan.group == g).values
        for a in NEW_ATTRS:
            court = (labels[f'{a}_court'].values[m] != plan[a].values[m]).mean()
            p = cfg.court_noise[g]; assert abs(court - p) < 4 * _se(p, m.sum()), (g, a, court, p)
            stud = (labels[f'{a}_student'].values[m] != plan[a].values[m]).mean()
            q = majority_error(cfg.student_noise[g], cfg.student_raters); assert abs(stud - q) < 4 * _se(q, m.sum()), (g, a, stud, q)
        both = ((labels.gender_court.values[m] != plan.gender.values[m]) & (labels.race_court.values[m] != plan.race.values[m])).mean()
        assert abs(both - cfg.court_noise[g] ** 2) < 4 * _se(cfg.court_noise[g] ** 2, m.sum())     # independent of race flips
    # votes: the configured attributes, in the fixed order; each rater's error rate; the consensus gives the student columns
    assert cfg.vote_attributes == ('race', 'gender', 'skin_tone') and set(votes.attribute) == set(cfg.vote_attributes)
    v = votes.join(plan.set_index('image_id')[['group', 'gender', 'skin_tone']], on='image_id')
    for a in NEW_ATTRS:
        w = v[v.attribute == a]; wrong = (w.value != w[a]).groupby(w.group).mean()
        for g in SUBGROUPS: p = cfg.student_noise[g]; assert abs(wrong[g] - p) < 4 * _se(p, (w.group == g).sum()), (a, g)
    c = consensus(votes, source='student').set_index('image_id').loc[labels.image_id]
    for a in ('race', 'gender', 'skin_tone'): assert (c[f'{a}_student'].values == labels[f'{a}_student'].values).all()

@pytest.mark.parametrize('kw,msg', [(dict(skin_tone_strength=1.0), "race_cue='geometry'"), (dict(race_cue='hair'), 'race_cue'),
                                    (dict(darker_if_white=1.5), r'within \[0, 1\]'), (dict(female_share={'XX': .3}), 'unknown subgroup'),
                                    (dict(gender_strength=-1.0), '>= 0'), (dict(vote_attributes=('age',)), 'vote_attributes')])
def test_bad_attribute_settings_are_user_errors(kw, msg):
    with pytest.raises(UserError, match=msg): SynthConfig(**kw)

def test_cli_flags_map_to_the_config():
    import argparse
    ap = argparse.ArgumentParser(prog='mugshotrace'); add_synth_parser(ap.add_subparsers(dest='command'))
    a = ap.parse_args(['synth', '--out', 'x', '--race-cue', 'geometry', '--gender-strength', '1', '--skin-tone-strength', '0.8',
                       '--darker-if-black', '0.7', '--darker-if-white', '0.3', '--female-share', 'BH=0.2', '--vote-attributes', 'skin_tone', 'race'])
    c = config_from_args(a)
    assert (c.race_cue, c.gender_strength, c.skin_tone_strength, c.darker_if_black, c.darker_if_white) == ('geometry', 1.0, 0.8, 0.7, 0.3)
    assert c.female_share == {'BH': 0.2, 'WH': 0.5, 'BnH': 0.5, 'WnH': 0.5} and c.vote_attributes == ('race', 'skin_tone')
    assert SynthConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c and set(ATTRIBUTE_DEFAULTS) <= set(c.to_dict())
    with pytest.raises(SystemExit): ap.parse_args(['synth', '--out', 'x', '--race-cue', 'hair'])
    assert config_from_args(ap.parse_args(['synth', '--out', 'x'])) == SynthConfig()

# --- the cues are rendered: measured with dlib on the images ---------------------------------------------------------

ON = SynthConfig(people=40, seed=0, width=240, height=300, shares={g: .25 for g in SUBGROUPS}, bookings=(1.0,), race_cue='geometry',
                 gender_strength=1.0, skin_tone_strength=1.0, darker_if_black=0.5, darker_if_white=0.5)

@pytest.fixture(scope='module')
def measured(tmp_path_factory):
    "dlib on every image of a benchmark with all cues on: cheek lightness, brow-to-eye gap and lip height (per IOD)."
    import cv2
    from mugshotrace.faces.landmarks import detect_faces, landmarks68
    out = make_benchmark(tmp_path_factory.mktemp('on')/'b', ON, workers=2, progress=False)
    rows = []
    for r in load_truth(out).itertuples():
        img, _ = load_rgb(out/'images'/f'{r.image_id}.jpg'); b = detect_faces(img, upsample=1)
        if not b: continue
        lm = landmarks68(img, b[0]); iod = np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0))
        L = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)[..., 0].astype(float)
        cheeks = [L[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4].mean() for x, y in (lm[[1, 2, 31]].mean(0), lm[[15, 14, 35]].mean(0))]
        rows.append(dict(race=r.race, gender=r.gender, skin_tone=r.skin_tone, source=r.source, L=np.mean(cheeks),
                         gap=(lm[36:48, 1].mean() - lm[17:27, 1].mean()) / iod, lips=(lm[57, 1] - lm[51, 1]) / iod))
    return pd.DataFrame(rows)

def test_all_faces_found_with_every_cue_on(measured):
    assert len(measured) >= 0.95 * ON.people, len(measured)          # the cues do not hide faces from dlib
    assert measured.groupby('gender').size().min() >= 10

def test_skin_lightness_follows_skin_tone_not_race(measured):
    "race_cue='geometry': L ~ darker + black + source; the skin-tone effect is large, the race effect small; a lightness-only race model fails on the discordant."
    d = measured
    import statsmodels.api as sm
    X = np.c_[np.ones(len(d)), d.skin_tone == 'Darker', d.race == 'Black', d.source == d.source.iloc[0]].astype(float)
    fit = sm.OLS(d.L.values, X).fit()                                   # + source: the two photos differ in lightness
    (_, b_dark, b_black, _), ci = fit.params, fit.conf_int(0.01)
    print(f'L: Darker {b_dark:+.1f} (99% CI {ci[1, 0]:.1f}, {ci[1, 1]:.1f}), Black {b_black:+.1f} (99% CI {ci[2, 0]:.1f}, {ci[2, 1]:.1f})')
    assert ci[1, 1] < -35 and ci[2, 0] < 0 < ci[2, 1] and abs(b_black) < 0.25 * abs(b_dark)
    disc = ((d.race == 'Black') & (d.skin_tone == 'Lighter')) | ((d.race == 'White') & (d.skin_tone == 'Darker'))
    assert disc.sum() >= 8 and (~disc).sum() >= 8
    mid = lambda g: (g.L[g.skin_tone == 'Darker'].mean() + g.L[g.skin_tone == 'Lighter'].mean()) / 2
    cut = d.source.map({s: mid(g) for s, g in d.groupby('source')})   # a threshold per source photo
    says_black = d.L < cut                                              # a race model that reads only skin lightness
    acc = lambda m: (says_black[m] == (d.race[m] == 'Black')).mean()
    print(f'lightness-only race model: concordant {acc(~disc):.2f}, discordant {acc(disc):.2f}')
    assert acc(~disc) >= 0.9 and acc(disc) <= 0.1
    # … while the race cue (lips) still tells race apart on the discordant persons
    dd = d[disc]; assert dd.lips[dd.race == 'Black'].mean() > dd.lips[dd.race == 'White'].mean()

def test_gender_and_race_geometry_are_measurable(measured):
    "Within source photo: brows nearer the eyes for Male, fuller lips for Black (one-sided Welch t-tests on the residuals)."
    d = measured.copy()
    for v in ('gap', 'lips'): d[v] = d[v] - d.groupby('source')[v].transform('mean')
    g = stats.ttest_ind(d.gap[d.gender == 'Female'], d.gap[d.gender == 'Male'], equal_var=False, alternative='greater')
    r = stats.ttest_ind(d.lips[d.race == 'Black'], d.lips[d.race == 'White'], equal_var=False, alternative='greater')
    diff_g = d.gap[d.gender == 'Female'].mean() - d.gap[d.gender == 'Male'].mean()
    diff_r = d.lips[d.race == 'Black'].mean() - d.lips[d.race == 'White'].mean()
    print(f'brow gap F-M {diff_g:.3f} IOD (p={g.pvalue:.1e}); lips Black-White {diff_r:.3f} IOD (p={r.pvalue:.1e})')
    assert g.pvalue < 1e-3 and diff_g > 0.04 and r.pvalue < 0.01 and diff_r > 0.05
    # and neither cue moves with skin tone
    assert abs(d.gap[d.skin_tone == 'Darker'].mean() - d.gap[d.skin_tone == 'Lighter'].mean()) < diff_g / 2

# --- a gender task through the study runner ---------------------------------------------------------------------------

@pytest.mark.slow
def test_gender_task_trains_through_the_runner(tmp_path):
    """tiny_cnn from random init on the gender attribute (a custom task `gender2` of `StudyData.tasks`), court labels,
    through `run_grid`: person-disjoint validation accuracy well above chance, and the same on the test sets."""
    from mugshotrace.study.config import RunConfig, StudyData
    from mugshotrace.study.grid import run_grid
    cfg = SynthConfig(people=GENDER_RUN['people'], seed=4, width=200, height=250, bookings=(0.6, 0.4), gender_strength=GENDER_RUN['strength'],
                      court_noise=0.0)
    bench = make_benchmark(tmp_path/'bench', cfg, workers=2, progress=False)
    cols = {'court': {'race': 'race_court', 'ethnicity': 'ethnicity_court', 'gender': 'gender_court'}}
    data = StudyData(labels_table=str(bench/'labels.csv'), label_spec={'columns': cols}, images=str(bench),
                     preprocessed=str(tmp_path/'faces'), preprocess={'progress': False}, truth=str(bench),
                     tasks={'gender2': {'attributes': ['gender'], 'classes': GENDER_RUN['classes']}})
    rc = RunConfig('tiny_cnn', variant='original', label_source='court', task='gender2', init='random', epochs=GENDER_RUN['epochs'],
                   size=64, bs=16, lr=3e-3, n_per_class=None, sampling='imbalanced', aug=False)
    df = run_grid([rc], data=data, runs_root=tmp_path/'runs', progress=False)
    assert (df.state == 'done').all(), df
    m = read_json(tmp_path/'runs'/df.run_id[0]/'metrics.json')['datasets']
    v = m['valid']; lo = stats.binomtest(round(v['accuracy'] * v['n']), v['n']).proportion_ci().low
    print({k: (d['n'], round(d['accuracy'], 3)) for k, d in m.items()}, f'valid 95% CI low {lo:.3f}')
    assert lo > 0.5 and v['accuracy'] > 0.75
    assert {'court/Male', 'court/Female'} <= set(m)

# classes in sorted order: train.data's CategoryBlock sorts the vocab while the runner maps the outputs in task order,
# so ['Male', 'Female'] comes out exactly inverted (valid accuracy 0.0 at 240 people, 15 epochs) — reported, not ours to fix
GENDER_RUN = dict(people=200, strength=2.0, epochs=12, classes=['Female', 'Male'])
