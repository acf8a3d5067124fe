"""Label sources as data and the study file's schema (issue 17): FairFace/UTKFace/votes sources merged into one tidy
table with known answers, consensus rules, conflicts as one-line errors, agreement stored with the study (cross-checked
with sklearn and krippendorff), every key documented, and `run` -> `audit` -> `report` on three kinds of source."""
import json, re
from pathlib import Path
import numpy as np, pandas as pd, pytest, yaml
from PIL import Image
from mugshotrace.core import UserError, write_study_record
from mugshotrace.study.config import load_study, study_labels, study_file_keys
from mugshotrace.study.sources import write_study_labels
from mugshotrace.study.folder import Study

ROOT = Path(__file__).resolve().parent.parent

def _img(p, race, rng, size=32):
    "A face-sized image whose brightness carries the race (a learnable signal)."
    p.parent.mkdir(parents=True, exist_ok=True)
    a = np.clip(rng.normal(70 if race == 'Black' else 180, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(p)

def make_sources(root:Path, n:int=40, raters:int=5, error:float=0.15, seed:int=0)->dict:
    """Under `root/images`: a FairFace-format CSV + images (`ff/`), a UTKFace-format folder (`utk/`), and `votes.csv` on
    the FairFace images (`raters` raters, each wrong with probability `error`, plus three hand-made images: a
    unanimous one, a 2:2 tie and a 3:2 majority below 0.7). Returns the truth per image."""
    rng = np.random.default_rng(seed); truth = {}; ff = []
    for i in range(n):
        race = ('Black', 'White')[i % 2]; f = f'train/{i}.jpg'
        _img(root/'images'/'ff'/f, race, rng); ff.append({'file': f, 'age': '20-29', 'gender': ('Male', 'Female')[(i // 2) % 2],
                                                          'race': race, 'service_test': 'True'})
        truth[f'train_{i}'] = race
    for i, race in enumerate(['East Asian', 'Indian']):      # other races: not in race2, still in the table
        f = f'train/x{i}.jpg'; _img(root/'images'/'ff'/f, 'White', rng)
        ff.append({'file': f, 'age': '30-39', 'gender': 'Male', 'race': race, 'service_test': 'False'})
    pd.DataFrame(ff).to_csv(root/'images'/'ff'/'fairface_label_train.csv', index=False)
    for i in range(n):
        race = ('Black', 'White')[i % 2]
        _img(root/'images'/'utk'/f'{20 + i}_{(i // 2) % 2}_{1 if race == "Black" else 0}_2017010{i:04d}.jpg.chip.jpg', race, rng)
    _img(root/'images'/'utk'/'33_0_2_20170101.jpg.chip.jpg', 'White', rng)   # Asian
    votes = []
    for i in range(3, n):
        t = truth[f'train_{i}']
        for r in range(raters):
            v = t if rng.random() > error else ('White' if t == 'Black' else 'Black')
            votes.append((f'train_{i}', f'r{r}', 'race', v))
    votes += [('train_0', f'r{r}', 'race', 'Black') for r in range(raters)]                                  # unanimous
    votes += [('train_1', f'r{r}', 'race', v) for r, v in enumerate(['White', 'White', 'Black', 'Black'])]   # 2:2 tie
    votes += [('train_2', f'r{r}', 'race', v) for r, v in enumerate(['Black', 'Black', 'Black', 'White', 'White'])]   # 0.6
    pd.DataFrame(votes, columns=['image_id', 'rater_id', 'attribute', 'value']).to_csv(root/'votes.csv', index=False)
    return truth

def study_dict(**over)->dict:
    d = {'name': 'sources', 'data': {'images': 'images', 'preprocessed': 'faces', 'preprocess': {'progress': False},
         'labels': {'fairface': {'path': 'images/ff/fairface_label_train.csv', 'one_image_per_person': True},
                    'utkface': {'path': 'images/utk', 'one_image_per_person': True},
                    'votes': {'path': 'votes.csv', 'source': 'consensus', 'min_agreement': 0.7, 'tie': 'missing'}}},
         'train': {'epochs': 1, 'freeze_epochs': 0, 'size': 32, 'bs': 8, 'n_per_class': 8, 'init': 'random', 'lr': 3e-2, 'aug': False},
         'grid': {'arch': ['tiny_cnn'], 'variant': ['original'], 'label_source': ['fairface', 'utkface', 'consensus'], 'task': ['race2']},
         'runs': 'study/runs'}
    d.update(over); return d

@pytest.fixture(scope='module')
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp('sources'); truth = make_sources(root)
    return root, truth

# ---- 1. one tidy table, known answers ----

def test_tidy_table_and_consensus_known_answers(src):
    root, truth = src
    st = load_study(study_dict(), base_dir=root)
    t = study_labels(st.data).set_index('image_id')
    assert len(t) == 42 + 41 and t.index.is_unique
    assert t.loc['train_4', 'path'] == 'ff/train/4.jpg' and t.loc['train_4', 'race_fairface'] == 'Black'
    assert t.loc['train_x0', 'race_fairface'] == 'East Asian' and t.loc['train_x0', 'ethnicity_fairface'] == 'NonHispanic'
    u = t.loc['33_0_2_20170101']
    assert u.path == 'utk/33_0_2_20170101.jpg.chip.jpg' and u.race_utkface == 'Asian' and u.gender_utkface == 'Male'
    assert t.loc['20_0_1_20170100000', 'race_utkface'] == 'Black' and pd.isna(t.loc['20_0_1_20170100000', 'race_fairface'])
    assert t.loc['train_5', 'person_id'] == 'fairface:train_5'
    # the consensus rule: unanimous kept, a 2:2 tie missing, 3 of 5 = 0.6 < 0.7 missing (share recorded), no votes missing
    assert t.loc['train_0', 'race_consensus'] == 'Black' and t.loc['train_0', 'race_consensus_share'] == 1.0
    assert pd.isna(t.loc['train_1', 'race_consensus']) and t.loc['train_1', 'race_consensus_share'] == 0.5
    assert pd.isna(t.loc['train_2', 'race_consensus']) and t.loc['train_2', 'race_consensus_share'] == pytest.approx(0.6)
    assert pd.isna(t.loc['train_x0', 'race_consensus']) and pd.isna(t.loc['20_0_1_20170100000', 'race_consensus'])
    # every other image: the majority of its votes where it reaches 0.7, else missing
    v = pd.read_csv(root/'votes.csv'); v = v[~v.image_id.isin(['train_0', 'train_1', 'train_2'])]
    share = v.groupby('image_id').value.agg(lambda s: s.value_counts().iloc[0] / len(s))
    major = v.groupby('image_id').value.agg(lambda s: s.value_counts().index[0])
    want = major.where(share >= 0.7)
    got = t.race_consensus.reindex(want.index)
    assert (got.fillna('-') == want.fillna('-')).all()
    assert want.notna().sum() > 20 and want.isna().any()
    # a preference order instead breaks the tie
    d = study_dict(); d['data']['labels']['votes'] = {'path': 'votes.csv', 'min_agreement': 0.5, 'tie': ['White', 'Black']}
    t2 = study_labels(load_study(d, base_dir=root).data).set_index('image_id')
    assert t2.loc['train_1', 'race_consensus'] == 'White' and t2.loc['train_2', 'race_consensus'] == 'Black'

def test_table_source_merges_on_image_id(src, tmp_path):
    root, _ = src
    pd.DataFrame({'id': ['train_3', 'train_4'], 'file': ['ff/train/3.jpg', 'ff/train/4.jpg'], 'pid': ['fairface:train_3', 'fairface:train_4'],
                  'r': ['W', 'W']}).to_csv(root/'court.csv', index=False)
    d = study_dict(); d['data']['labels'].update(table='court.csv', columns={'court': {'race': 'r'}}, id='id', path='file', person='pid',
                                                 values={'race': {'W': 'White'}})
    t = study_labels(load_study(d, base_dir=root).data).set_index('image_id')
    assert len(t) == 83 and t.loc['train_3', 'race_court'] == 'White' and t.loc['train_3', 'race_fairface'] == 'White'
    assert t.loc['train_4', 'race_court'] == 'White' and t.loc['train_4', 'race_fairface'] == 'Black'

@pytest.mark.parametrize('rows,msg', [
    ({'id': ['train_3'], 'file': ['ff/train/4.jpg'], 'pid': ['p']}, 'image id(s) with different files'),
    ({'id': ['court3'], 'file': ['ff/train/3.jpg'], 'pid': ['p']}, 'file(s) under different image ids'),
    ({'id': ['train_3'], 'file': ['ff/train/3.jpg'], 'pid': ['someone']}, 'different person ids'),
])
def test_conflicting_sources_are_one_line_errors(src, rows, msg):
    root, _ = src
    pd.DataFrame({**rows, 'r': ['W']}).to_csv(root/'bad.csv', index=False)
    d = study_dict(); d['data']['labels'].update(table='bad.csv', columns={'court': {'race': 'r'}}, id='id', path='file', person='pid',
                                                 values={'race': {'W': 'White'}})
    with pytest.raises(UserError, match=re.escape(msg)) as e: study_labels(load_study(d, base_dir=root).data)
    assert '\n' not in str(e.value)

def test_votes_for_unknown_images_are_an_error(src, tmp_path):
    root, _ = src
    pd.DataFrame([('nobody', 'r1', 'race', 'Black')], columns=['image_id', 'rater_id', 'attribute', 'value']).to_csv(tmp_path/'v.csv', index=False)
    d = study_dict(); d['data']['labels']['votes'] = str(tmp_path/'v.csv')
    with pytest.raises(UserError, match='votes for 1 image'): study_labels(load_study(d, base_dir=root).data)

# ---- 2. the schema: every key checked, every key documented ----

@pytest.mark.parametrize('where,patch,msg', [
    ('top', lambda d: d.update(grids=[]), "unknown key(s) ['grids'] in the study file (top level)"),
    ('data', lambda d: d['data'].update(image='x'), "unknown key(s) ['image'] in data;"),
    ('labels', lambda d: d['data']['labels'].update(vote='v.csv'), "unknown key(s) ['vote'] in data.labels;"),
    ('fairface', lambda d: d['data']['labels']['fairface'].update(root='x'), "unknown key(s) ['root'] in data.labels.fairface"),
    ('utkface', lambda d: d['data']['labels']['utkface'].update(stric=False), "unknown key(s) ['stric'] in data.labels.utkface"),
    ('votes', lambda d: d['data']['labels']['votes'].update(quorum=3), "unknown key(s) ['quorum'] in data.labels.votes"),
    ('preprocess', lambda d: d['data']['preprocess'].update(sizes=3), "unknown key(s) ['sizes'] in data.preprocess"),
    ('tasks', lambda d: d.update(tasks={'t': {'attributes': ['race'], 'classes': ['Black', 'White'], 'weight': 2}}), "unknown key(s) ['weight'] in tasks.t"),
    ('train', lambda d: d['train'].update(epoch=1), "unknown run field(s) ['epoch']"),
    ('executor', lambda d: d.update(executor={'name': 'local', 'wrokers': 2}), "executor option 'wrokers' is not allowed"),
    ('source name /', lambda d: d['data']['labels']['utkface'].update(source='utk/face'), 'label source name'),
    ('source name _', lambda d: d['data']['labels']['utkface'].update(source='utk_face'), 'label source name'),
    ('source name space', lambda d: d['data']['labels']['utkface'].update(source='utk face'), 'label source name'),
    ('class name /', lambda d: d.update(tasks={'t': {'attributes': ['race'], 'classes': ['Black/White', 'Other']}}), 'class name'),
    ('unknown task', lambda d: d['grid'].update(task=['race99']), "unknown task 'race99'"),
    ('label source not in study', lambda d: d['grid'].update(label_source=['court']), "label source 'court' is not a source of this study"),
    ('task attribute missing', lambda d: d['grid'].update(task=['race_eth4'], label_source=['utkface']), "needs attribute(s) ['ethnicity']"),
    ('second grid', lambda d: d.update(grid=[d['grid'], {'arch': ['tiny_cnn'], 'label_source': ['fairface'], 'variants': ['x']}]), 'grid 2 of 2'),
    ('two sources one name', lambda d: d['data']['labels']['utkface'].update(source='fairface'), "'fairface' is named twice"),
    ('min_agreement', lambda d: d['data']['labels']['votes'].update(min_agreement=1.5), 'min_agreement must be in (0, 1]'),
])
def test_unknown_keys_and_bad_names_are_one_line_errors(src, where, patch, msg):
    root, _ = src
    d = json.loads(json.dumps(study_dict())); patch(d)
    with pytest.raises(UserError, match=re.escape(msg)) as e: load_study(d, base_dir=root)
    assert '\n' not in str(e.value), where

def test_every_key_is_documented_and_every_documented_key_exists():
    nb = json.loads((ROOT/'nbs'/'explanations'/'study_file.ipynb').read_text())
    md = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    doc = set(re.findall(r'^\|\s*`([a-z_<>.]+)`\s*\|', md, re.M))
    acc = study_file_keys()
    assert doc == acc, f'undocumented: {sorted(acc - doc)}; documented but unknown: {sorted(doc - acc)}'
    rows = [l for l in md.splitlines() if re.match(r'^\|\s*`[a-z_<>.]+`\s*\|', l)]
    assert all(len([c for c in l.strip('|').split('|')]) == 5 and all(c.strip() for c in l.strip('|').split('|')) for l in rows)  # type, default, meaning, example

def test_a_list_of_grids_runs_shared_runs_once(src):
    root, _ = src
    d = study_dict(grid=[{'arch': ['tiny_cnn'], 'label_source': ['fairface', 'utkface']}, {'arch': ['tiny_cnn'], 'label_source': ['fairface'], 'seed': [0, 1]}])
    st = load_study(d, base_dir=root)
    assert len(st.runs) == 3 and sorted(r.name for r in st.runs).count('tiny_cnn-original-fairface-race2-balanced-random') == 1

# ---- 3. agreement stored with the study, cross-checked ----

def test_stored_agreement_matches_sklearn_and_krippendorff(src, tmp_path):
    from sklearn.metrics import cohen_kappa_score
    import krippendorff
    from mugshotrace.report.datafacts import label_agreement, agreement_sentences
    root, _ = src
    st = load_study(study_dict(), base_dir=root)
    write_study_record(tmp_path/'study', 'sources', st.data.labels_table, st.data.images, st.data.preprocessed)
    write_study_labels(tmp_path/'study', st.data, n_boot=100)
    S = Study.open(tmp_path/'study'); lab = S.labels()
    assert len(lab) == 83 and {'race_fairface', 'race_utkface', 'race_consensus'} <= set(lab.columns)
    ag = S.label_agreement()
    r = ag[(ag.attribute == 'race') & (ag.source_a == 'consensus') & (ag.source_b == 'fairface') & (ag.group == 'all')].iloc[0]
    both = lab[['race_consensus', 'race_fairface']].dropna()
    assert r.n == len(both) and r.agreement == pytest.approx((both.race_consensus == both.race_fairface).mean())
    assert r.cohen_kappa == pytest.approx(cohen_kappa_score(both.race_consensus, both.race_fairface), abs=1e-12)
    codes = {'Black': 0, 'White': 1}
    a = krippendorff.alpha(reliability_data=[both.race_consensus.map(codes), both.race_fairface.map(codes)], level_of_measurement='nominal')
    assert r.krippendorff_alpha == pytest.approx(a, abs=1e-12)
    assert r.ci_low <= r.cohen_kappa <= r.ci_high and r.alpha_low <= r.krippendorff_alpha <= r.alpha_high
    assert not ((ag.source_a == 'fairface') & (ag.source_b == 'utkface') & (ag.attribute == 'race')).any()   # no image in common
    ra = S.rater_agreement()
    v = pd.read_csv(root/'votes.csv')
    m = v.assign(c=v.value.map(codes)).pivot(index='rater_id', columns='image_id', values='c').to_numpy(float)
    top = ra[(ra.attribute == 'race') & (ra.group == 'all')].iloc[0]
    assert top.source == 'consensus' and top.n_images == v.image_id.nunique() and top.n_votes == len(v)
    assert top.krippendorff_alpha == pytest.approx(krippendorff.alpha(reliability_data=m, level_of_measurement='nominal'), abs=1e-12)
    assert top.alpha_low < top.krippendorff_alpha < top.alpha_high
    # per group of the other attribute (FairFace's ethnicity: all NonHispanic here) the same images, the same α
    assert set(ra.group) == {'all', 'NonHispanic'} and ra.group_by.iloc[0] == 'ethnicity_fairface'
    # the report's data facts state the raters' α with its interval
    t = label_agreement(lab)
    assert '(raters)' in set(t.source_b)
    s = [x for x in agreement_sentences(t) if x.startswith("Raters' agreement on race")]
    assert s and f'all: α = {top.krippendorff_alpha:.2f} [{top.alpha_low:.2f}, {top.alpha_high:.2f}]' in s[0]
    # written once: a second call with the same sources does not rewrite
    before = (tmp_path/'study'/'labels'/'agreement.csv').stat().st_mtime_ns
    write_study_labels(tmp_path/'study', st.data, n_boot=100)
    assert (tmp_path/'study'/'labels'/'agreement.csv').stat().st_mtime_ns == before

# ---- 4. end to end: run -> audit -> report on three kinds of source ----

def test_run_audit_report_with_fairface_utkface_and_consensus(src, capsys):
    from mugshotrace.cli import main
    root, _ = src
    p = root/'study.yaml'; p.write_text(yaml.safe_dump(study_dict()))
    assert main(['run', str(p)]) == 0
    sd = root/'study'
    runs = Study.open(sd).runs()
    assert len(runs) == 3 and all(r.is_done for r in runs)
    by = {r.label_source: r for r in runs}
    assert set(by) == {'fairface', 'utkface', 'consensus'}
    for s, r in by.items():
        tests = {sc.test_set for sc in r.scenarios()}
        assert tests == {f'{s}/Black', f'{s}/White'}, tests
    assert (sd/'labels'/'agreement.csv').is_file() and (sd/'labels'/'rater_agreement.csv').is_file()
    assert main(['audit', str(sd), '--n-boot', '20', '--no-figures']) == 0
    assert main(['report', str(sd)]) == 0
    html = (sd/'report.html').read_text()
    assert 'consensus' in html and '(raters)' in html
