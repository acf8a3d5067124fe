"Label tables, adapters, consensus and agreement: cross-checks against independent implementations and known noise."
import numpy as np, pandas as pd, pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from mugshotrace.core import UserError
from mugshotrace.labels.tables import (LabelSpec, load_labels, fairface_labels, utkface_labels, consensus, task_labels, race2,
                                race_eth4, Task, subgroup_code)
from mugshotrace.labels.agreement import (fleiss_kappa, fleiss_kappa_ci, label_quality, krippendorff_alpha, cohen_kappa, vote_counts, rater_agreement,
                                   source_agreement, source_confusion, expected_fleiss_kappa, expected_cohen_kappa,
                                   flip_matrix, majority_accuracy)

def test_study_file_mapping_and_validation(tmp_path):
    (tmp_path / 'study.yaml').write_text(
        'labels:\n  id: Jail_ID\n  path: file\n  person: PID\n'
        '  columns: {court: {race: Race, ethnicity: Eth}, student: {race: SRace}}\n'
        '  values: {race: {B: Black, W: White}, ethnicity: {H: Hispanic, N: NonHispanic}}\n')
    spec = LabelSpec.from_yaml(tmp_path / 'study.yaml')
    img = tmp_path / 'img'; img.mkdir()
    for i in range(4): Image.new('RGB', (8, 8)).save(img / f'j{i}.png')
    csv = tmp_path / 'labels.csv'
    pd.DataFrame({'Jail_ID': [f'j{i}' for i in range(4)], 'file': [f'j{i}.png' for i in range(4)], 'PID': ['a', 'a', 'b', 'c'],
                  'Race': ['B', 'W', 'B', 'W'], 'Eth': ['H', 'N', 'N', 'H'], 'SRace': ['B', 'B', None, 'W']}).to_csv(csv, index=False)
    lab = load_labels(csv, spec, images_root=img)
    assert list(lab.columns) == ['image_id', 'path', 'person_id', 'race_court', 'ethnicity_court', 'race_student']
    assert task_labels(lab, race_eth4('court')).tolist() == ['BH', 'WnH', 'BnH', 'WH']
    assert task_labels(lab, race2('student')).to_dict() == {'j0': 'Black', 'j1': 'Black', 'j3': 'White'}
    bad = pd.read_csv(csv); bad.loc[2, 'Race'] = 'Asian'; bad.to_csv(csv, index=False)
    with pytest.raises(UserError, match=r"race_court: unknown value\(s\) \['Asian'\] in 1 row\(s\) \(j2\)"): load_labels(csv, spec)
    with pytest.raises(UserError, match='unknown keys'): LabelSpec.from_dict({'columns': {'a': {'race': 'r'}}, 'colums': 1})

def test_public_adapters_run_through_the_pipeline(tmp_path):
    from mugshotrace.labels.sampling import imbalanced_sample
    rng = np.random.default_rng(0); utk = tmp_path / 'UTKFace'; utk.mkdir()
    for k in range(24):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(utk / f'{20 + k}_{k % 2}_{k % 3}_2017011{k:02d}1745251.jpg.chip.jpg')
    lab = utkface_labels(utk)
    assert len(lab) == 24 and set(lab.race_utkface) == {'White', 'Black', 'Asian'}
    y = task_labels(lab, race2('utkface')); assert len(y) == 16 and set(y) == {'White', 'Black'}
    files = pd.Series([str(utk / p) for p in lab.path], index=lab.image_id)
    s = imbalanced_sample(lab, race2('utkface'), seed=0, files=files)
    assert sorted(s.train + s.valid + sum(s.tests.values(), ())) == sorted(y.index)
    ff = tmp_path / 'fairface_label_train.csv'
    ff.write_text('file,age,gender,race,service_test\ntrain/1.jpg,20-29,Male,Black,True\ntrain/2.jpg,30-39,Female,White,False\n'
                  'train/3.jpg,30-39,Female,Latino_Hispanic,False\n')
    f = fairface_labels(ff)
    assert task_labels(f, race2('fairface')).to_dict() == {'train_1': 'Black', 'train_2': 'White'}
    assert task_labels(f, Task('gender', 'fairface', ('gender',), ('Male', 'Female'))).tolist() == ['Male', 'Female', 'Female']

def _naive_majority(votes, min_agreement):
    out = {}
    for (i, a), g in votes.groupby(['image_id', 'attribute']):
        c = g.value.value_counts(); top = c[c == c.max()]
        out[(i, a)] = (top.index[0] if len(top) == 1 and c.max() / c.sum() >= min_agreement else None, c.max() / c.sum())
    return out

@settings(max_examples=30, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4), st.sampled_from(['race', 'ethnicity']), st.sampled_from('ABC')),
                     min_size=1, max_size=60, unique_by=lambda t: t[:3]),
       m=st.sampled_from([0.0, 0.5, 0.6, 0.75]))
def test_consensus_matches_a_naive_majority(data, m):
    v = pd.DataFrame(data, columns=['image_id', 'rater_id', 'attribute', 'value']).astype({'image_id': str})
    got = consensus(v, min_agreement=m).set_index('image_id')
    for (i, a), (val, share) in _naive_majority(v, m).items():
        assert got.loc[i, a] == val or (val is None and pd.isna(got.loc[i, a]))
        assert got.loc[i, f'{a}_share'] == pytest.approx(share)

@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.integers(2, 5), st.integers(2, 9))
def test_fleiss_matches_statsmodels(seed, k, r):
    from statsmodels.stats.inter_rater import fleiss_kappa as sm
    rng = np.random.default_rng(seed); x = rng.multinomial(r, rng.dirichlet(np.ones(k)), size=30)
    if (x.sum(0) > 0).sum() < 2: return  # one category only: kappa undefined
    assert fleiss_kappa(x) == pytest.approx(sm(x), abs=1e-10)

def _alpha_nominal(votes):
    "Independent Krippendorff alpha (nominal) from the coincidence matrix."
    o = {}
    for _, g in votes.groupby('image_id'):
        vals = list(g.value); m = len(vals)
        if m < 2: continue
        for i in range(m):
            for j in range(m):
                if i != j: o[(vals[i], vals[j])] = o.get((vals[i], vals[j]), 0) + 1 / (m - 1)
    cats = sorted({a for a, _ in o}); n_c = {c: sum(v for (a, _), v in o.items() if a == c) for c in cats}; n = sum(n_c.values())
    do = sum(v for (a, b), v in o.items() if a != b); de = sum(n_c[a] * n_c[b] for a in cats for b in cats if a != b) / (n - 1)
    return 1 - do / de

@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10**6))
def test_krippendorff_matches_an_independent_implementation(seed):
    rng = np.random.default_rng(seed); rows = []
    for i in range(25):
        t = rng.integers(3)
        for r in range(5):
            if rng.random() < 0.3: continue  # raters skip images
            rows.append((f'i{i}', r, 'x', str(t if rng.random() < 0.7 else rng.integers(3))))
    v = pd.DataFrame(rows, columns=['image_id', 'rater_id', 'attribute', 'value'])
    assert krippendorff_alpha(v, 'x') == pytest.approx(_alpha_nominal(v), abs=1e-9)

def test_fleiss_interval_covers_the_population_value():
    "Over 60 simulated panels, the 95 % bootstrap interval covers the noise model's kappa about 95 % of the time."
    rng = np.random.default_rng(5); e, R, N = 0.2, 4, 80
    want = expected_fleiss_kappa([0.5, 0.5], flip_matrix(2, e)); hits = 0
    for _ in range(60):
        t = rng.random(N) < 0.5; wrong = rng.random((N, R)) < e
        black = (t[:, None] ^ wrong).sum(1); x = np.c_[black, R - black]
        lo, hi = fleiss_kappa_ci(x, n_boot=300, seed=int(rng.integers(1 << 30)))
        hits += lo <= want <= hi
    assert 50 <= hits <= 60  # binomial(60, .95): P(< 50) ≈ 0.001

def test_cohen_matches_sklearn():
    from sklearn.metrics import cohen_kappa_score
    rng = np.random.default_rng(1); a = rng.choice(list('xyz'), 500); b = np.where(rng.random(500) < 0.6, a, rng.choice(list('xyz'), 500))
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)

def test_per_subgroup_agreement_recovers_injected_noise():
    "Raters are noisier on Hispanic images; per-subgroup kappas land on the values the noise model predicts."
    rng = np.random.default_rng(0); N, R = 3000, 9; err = {'Hispanic': 0.25, 'NonHispanic': 0.05}
    race = np.where(rng.random(N) < 0.5, 'Black', 'White'); eth = np.where(rng.random(N) < 0.4, 'Hispanic', 'NonHispanic')
    other = {'Black': 'White', 'White': 'Black'}; rows = []
    for i in range(N):
        for r in range(R): rows.append((f'i{i}', r, 'race', other[race[i]] if rng.random() < err[eth[i]] else race[i]))
    votes = pd.DataFrame(rows, columns=['image_id', 'rater_id', 'attribute', 'value'])
    groups = pd.Series(eth, index=[f'i{i}' for i in range(N)])
    ra = rater_agreement(votes, groups=groups).set_index('group')
    for g, e in err.items():
        p = (race[eth == g] == 'Black').mean()
        want = expected_fleiss_kappa([p, 1 - p], flip_matrix(2, e))
        assert ra.loc[g, 'fleiss_kappa'] == pytest.approx(want, abs=0.03)
        assert ra.loc[g, 'krippendorff_alpha'] == pytest.approx(want, abs=0.03)
    assert ra.loc['Hispanic', 'fleiss_kappa'] < ra.loc['NonHispanic', 'fleiss_kappa'] - 0.3
    cons = consensus(votes, source='student'); cons['race_court'] = [other[x] if rng.random() < 0.1 else x for x in
                                                                     pd.Series(race, index=groups.index)[cons.image_id]]
    sa = source_agreement(cons, 'race', 'court', 'student', groups=groups).set_index('group')
    for g, e in err.items():
        p = (race[eth == g] == 'Black').mean()
        want = expected_cohen_kappa([p, 1 - p], flip_matrix(2, 0.1), flip_matrix(2, 1 - majority_accuracy(R, e)))
        assert sa.loc[g, 'cohen_kappa'] == pytest.approx(want, abs=0.04)
    conf = source_confusion(cons, 'race', 'court', 'student', groups=groups)
    assert conf.query("group == 'all'").n.sum() == N and set(conf.group) == {'all', 'Hispanic', 'NonHispanic'}

# --- on the semi-synthetic benchmark ------------------------------------------------------------------------------

def _binary_confusions(groups, attr, values, noise):
    "Rows per true subgroup: P(reported value | subgroup) for one attribute under flip noise `noise[g]`."
    from mugshotrace.vocab import CATEGORIES
    cats = CATEGORIES[attr]
    return np.array([[1 - noise[g] if values[g] == c else noise[g] for c in cats] for g in groups])

def test_synth_consensus_beats_single_rater_and_kappas_match_the_injected_noise(tmp_path):
    synth = pytest.importorskip('mugshotrace.synth.benchmark')
    court = {'BH': 0.35, 'WH': 0.05, 'BnH': 0.05, 'WnH': 0.05}; e_s, R = 0.15, 5
    cfg = synth.SynthConfig(people=300, seed=11, width=64, height=80, court_noise=court, student_noise=e_s, student_raters=R)
    out = synth.make_benchmark(tmp_path / 'bench', cfg, progress=False)
    lab = load_labels(out / 'labels.csv', images_root=out)          # ids and image files match one-to-one
    truth = synth.load_truth(out).set_index('image_id').loc[lab.image_id]
    votes = pd.read_csv(out / 'votes.csv', dtype=str)
    cons = consensus(votes, source='student').set_index('image_id').loc[lab.image_id]
    for a in ('race', 'ethnicity'):                                  # our consensus reproduces the panel majority
        assert (cons[f'{a}_student'].values == lab[f'{a}_student'].values).all()
    n = len(lab); groups = ['BH', 'WH', 'BnH', 'WnH']
    pi = truth.group.value_counts(normalize=True).reindex(groups).values
    g_attr = {'race': {'BH': 'Black', 'BnH': 'Black', 'WH': 'White', 'WnH': 'White'},
              'ethnicity': {'BH': 'Hispanic', 'WH': 'Hispanic', 'BnH': 'NonHispanic', 'WnH': 'NonHispanic'}}
    maj = {g: majority_accuracy(R, e_s) for g in groups}
    for a in ('race', 'ethnicity'):
        # 1. consensus labels agree with the truth better than the single (court) rater, by the predicted margin
        acc_c = (lab[f'{a}_court'].values == truth[a].values).mean(); acc_s = (lab[f'{a}_student'].values == truth[a].values).mean()
        exp_c = float(pi @ np.array([1 - court[g] for g in groups])); exp_s = majority_accuracy(R, e_s)
        tol = lambda p: 4 * np.sqrt(p * (1 - p) / n) + 0.01
        assert acc_s > acc_c and abs(acc_c - exp_c) < tol(exp_c) and abs(acc_s - exp_s) < tol(exp_s)
        # 2. inter-rater agreement of the panel where the noise model puts it
        C_s = _binary_confusions(groups, a, g_attr[a], {g: e_s for g in groups})
        want = expected_fleiss_kappa(pi, C_s)
        assert fleiss_kappa(vote_counts(votes, a)) == pytest.approx(want, abs=0.08)
        assert krippendorff_alpha(votes, a) == pytest.approx(want, abs=0.08)
        # 3. court vs student: Cohen's kappa from the two sources' confusions
        C_c = _binary_confusions(groups, a, g_attr[a], court); C_m = _binary_confusions(groups, a, g_attr[a], {g: 1 - maj[g] for g in groups})
        sa = source_agreement(lab, a, 'court', 'student', groups=truth.group).set_index('group')
        assert sa.loc['all', 'cohen_kappa'] == pytest.approx(expected_cohen_kappa(pi, C_c, C_m), abs=0.1)
        # 4. per subgroup: the injected court noise in BH shows up as lower court–student agreement there only
        for g in groups:
            p = (1 - court[g]) * maj[g] + court[g] * (1 - maj[g]); k = sa.loc[g, 'n']
            assert abs(sa.loc[g, 'agreement'] - p) < 4 * np.sqrt(p * (1 - p) / k) + 0.02, (a, g)
        assert sa.loc['BH', 'agreement'] < min(sa.loc[g, 'agreement'] for g in ('WH', 'BnH', 'WnH')) - 0.15
    # 5. the sampler on the benchmark: repeat bookings of one person never straddle training and test
    from mugshotrace.labels.sampling import balanced_sample
    s = balanced_sample(lab, race_eth4('student'), n=15, seed=2, holdout_seed=0)
    pid = lab.set_index('image_id').person_id
    test_p = set(pid[list(sum(s.tests.values(), ()))]); dev_p = set(pid[list(s.train + s.valid)])
    assert not test_p & dev_p and not set(pid[list(s.train)]) & set(pid[list(s.valid)])
    assert sorted(s.tests) == sorted(f'{src}/{g}' for src in ('court', 'student') for g in groups)


def test_cohen_kappa_one_definition_matches_sklearn_and_is_nan_when_undefined():
    "`cohen_kappa` and `cohen_kappa_ci` agree with scikit-learn where kappa is defined; expected agreement 1 gives NaN."
    import warnings
    from sklearn.metrics import cohen_kappa_score
    from mugshotrace.labels.agreement import cohen_kappa_ci
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.choice(list('abc'), 60); b = np.where(rng.random(60) < .7, a, rng.choice(list('abc'), 60))
        k, lo, hi = cohen_kappa_ci(a, b)
        assert abs(k - cohen_kappa_score(a, b)) < 1e-12 and abs(cohen_kappa(a, b) - k) < 1e-15 and -1 <= lo <= k <= hi <= 1
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); assert np.isnan(cohen_kappa_score(['x'] * 4, ['x'] * 4))
    assert np.isnan(cohen_kappa(['x'] * 4, ['x'] * 4)) and all(np.isnan(cohen_kappa_ci(['x'] * 4, ['x'] * 4)))
    assert np.isnan(cohen_kappa([], [])) and all(np.isnan(cohen_kappa_ci([None], ['x'])))
