"Label tables, adapters, consensus and agreement: cross-checks against independent implementations and known noise."
import numpy as np, pandas as pd, pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from mugshotrace.core import UserError
from mugshotrace.labels import (LabelSpec, load_labels, fairface_labels, utkface_labels, consensus, task_labels, race2,
                                race_eth4, Task, subgroup_code)
from mugshotrace.agreement import (fleiss_kappa, krippendorff_alpha, cohen_kappa, vote_counts, rater_agreement,
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
    from mugshotrace.sampling import imbalanced_sample
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
