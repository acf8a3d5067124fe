"""Tasks as data through every stage (issue 17): `mugshotrace run` → `audit` → `report` for the 4-class task, a gender
task, imbalanced sampling with weighted loading, a study-file task with merge/drop, and the one-line errors of an
unknown task, a class absent from the data and a missing attribute.

The data are fabricated so that every class is visible: grey level follows race, a green left stripe follows
ethnicity, a red or blue bottom band follows gender (a quarter of the people are Female, so imbalanced sampling
has something to balance). Tiny images (40 px, trained at 32), tiny_cnn from random init, 4 epochs."""
import json
from dataclasses import replace
from pathlib import Path
import numpy as np, pandas as pd, pytest, yaml
from PIL import Image
from mugshotrace.core import UserError, read_json
from mugshotrace.cli import main

COLUMNS = {'court': {'race': 'race_court', 'ethnicity': 'ethnicity_court', 'gender': 'gender_court'},
           'student': {'race': 'race_student', 'ethnicity': 'ethnicity_student'}}

def make_data(out, n_people=96, per_person=2, size=40, seed=0):
    "Labelled images whose race, ethnicity and gender are all visible; Female is a quarter of the people."
    out = Path(out); (out/'images').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed); rows = []
    for p in range(n_people):
        race, eth = ('Black', 'White')[p % 2], ('Hispanic', 'NonHispanic')[(p // 2) % 2]
        gender = 'Female' if (p // 4) % 4 == 0 else 'Male'
        for k in range(per_person):
            iid = f'p{p:03d}_{k}'
            a = np.clip(rng.normal(70 if race == 'Black' else 180, 20, (size, size, 3)), 0, 255)
            if eth == 'Hispanic': a[:, :size // 4] = (0, 255, 0)        # a green stripe
            a[-size // 4:, size // 4:] = (255, 0, 0) if gender == 'Female' else (0, 0, 255)   # a red or blue band
            Image.fromarray(a.astype(np.uint8)).save(out/'images'/f'{iid}.png')
            rows.append(dict(image_id=iid, path=f'images/{iid}.png', person_id=f'P{p}', race_court=race, ethnicity_court=eth,
                             gender_court=gender, race_student=race, ethnicity_student=eth))
    pd.DataFrame(rows).to_csv(out/'labels.csv', index=False)
    return out

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp('tasks'))

def write_study(data, name, grid, tasks=None, **train):
    "A study folder `data/<name>/` (its own runs, audit and report) over the shared images and preprocessed faces."
    d = {'name': name, 'data': {'labels': {'table': str(data/'labels.csv'), 'columns': COLUMNS}, 'images': str(data),
                                'preprocessed': str(data/'faces'), 'preprocess': {'progress': False}},
         'train': {'epochs': 4, 'size': 32, 'bs': 8, 'n_per_class': 16, 'init': 'random', 'lr': 1e-2, 'aug': False, **train},
         'grid': {'arch': ['tiny_cnn'], 'variant': ['original'], 'label_source': ['court'], **grid}, 'runs': 'runs'}
    if tasks is not None: d['tasks'] = tasks
    (data/name).mkdir(exist_ok=True); p = data/name/'study.yaml'; p.write_text(yaml.safe_dump(d, sort_keys=False)); return p

def run_folders(study_dir): return sorted(p.parent for p in (Path(study_dir)/'runs').glob('*/config.json'))

def own_test_preds(run):
    "The run's own-variant test-set predictions, pooled (person-disjoint from training)."
    fs = [f for f in sorted((run/'preds').glob('*.csv')) if f.stem != 'valid']
    return pd.concat([pd.read_csv(f) for f in fs], ignore_index=True)

def run_audit_report(study_dir, *audit_args):
    assert main(['audit', str(study_dir), '--n-boot', '50', '--no-progress', *audit_args]) == 0
    assert main(['report', str(study_dir), '--no-progress']) == 0
    return pd.read_csv(study_dir/'audit'/'audit.csv', keep_default_na=False, na_values=[''])

# ---- (a) the 4-class task ----

def test_race_eth4_end_to_end(data):
    p = write_study(data, 's_eth4', {'task': ['race_eth4']})
    assert main(['run', str(p), '--no-progress']) == 0
    [run] = run_folders(p.parent)
    classes = read_json(run/'model.json')['classes']                # the model's output order
    assert sorted(classes) == sorted(['BH', 'WH', 'BnH', 'WnH'])
    tests = sorted(f.stem for f in (run/'preds').glob('court__*.csv'))
    assert tests == sorted(f'court__{c}' for c in classes)          # one disaggregated test set per class
    pr = own_test_preds(run)
    assert [c for c in pr.columns if c.endswith('_Prob')] == [f'{c}_Prob' for c in classes]
    assert np.allclose(pr[[f'{c}_Prob' for c in classes]].sum(axis=1), 1, atol=1e-4)
    assert (pr.group == pr.label).all()                             # the subgroup code is the 4-class label
    for c in classes:   # each probability column belongs to its class: highest on the images of that class
        mine, rest = pr.loc[pr.label == c, f'{c}_Prob'].mean(), pr.loc[pr.label != c, f'{c}_Prob'].mean()
        assert mine > rest + 0.3, (c, mine, rest)
    acc = float((pr.Prediction == pr.label).mean())
    print('race_eth4 test accuracy', acc, len(pr)); assert acc > 0.8, acc                                           # chance is 0.25: brightness and stripe are visible
    aud = run_audit_report(p.parent)
    assert set(aud.task) == {'race_eth4'}
    g = aud[(aud.metric == 'accuracy') & (aud.attribute == 'group')]
    assert set(g.group) == set(classes)
    card = read_json(run/'model_card.json')
    assert f"({', '.join(classes)})" in card['model_details']['overview']
    assert card['model_parameters']['output_format'].startswith('class probabilities ' + ', '.join(f'{c}_Prob' for c in classes))
    html = (p.parent/'report.html').read_text() if (p.parent/'report.html').exists() else next(p.parent.rglob('report*.html')).read_text()
    assert 'race_eth4' in html and 'WnH' in html

# ---- (b) a gender task, audited by gender ----

def test_gender_task_end_to_end(data):
    p = write_study(data, 's_gender', {'task': ['gender2']})
    assert main(['run', str(p), '--no-progress']) == 0
    [run] = run_folders(p.parent)
    assert read_json(run/'model.json')['task'] == {'name': 'gender2', 'source': 'court', 'attributes': ['gender'], 'classes': ['Male', 'Female']}
    pr = own_test_preds(run)
    assert {'Male_Prob', 'Female_Prob', 'race', 'ethnicity', 'gender'} <= set(pr.columns)
    assert (pr.gender == pr.label).all()                            # the attribute column is the task's label
    assert set(pr.group) <= {'BH', 'WH', 'BnH', 'WnH'}              # group stays the seed's subgroup code
    acc = float((pr.Prediction == pr.label).mean())
    print('gender2 test accuracy', acc, len(pr)); assert acc > 0.9, acc                                          # the band is unmistakable
    aud = run_audit_report(p.parent, '--attribute', 'gender')
    g = aud[(aud.metric == 'accuracy') & (aud.attribute == 'gender') & ~aud.test_set.str.endswith('pooled')]
    assert set(g.group) == {'Male', 'Female'}
    assert ((aud.attribute == 'gender') & (aud.metric == 'gap:accuracy')).any()
    # the seed's tables run per gender here (the audit's attribute) and say so
    top = pd.read_csv(p.parent/'audit'/'study'/'court'/'top_means.csv')
    assert set(top.attribute) == {'gender'} and {'Male', 'Female'} <= set(top.race)
    card = read_json(run/'model_card.json')
    assert f"({', '.join(read_json(run/'model.json')['classes'])})" in card['model_details']['overview']
    assert 'gender' in card['model_parameters']['data'][1]['sensitive']['sensitive_data']
    html = next(p.parent.rglob('report*.html')).read_text()
    assert 'gender2' in html and 'Female' in html and 'per gender' in html

def test_gender_audit_default_attribute_keeps_seed_tables_per_race(data):
    "Audited with the default attribute, a gender model gets the seed's per-race tables (the Gender Shades question)."
    study = data/'s_gender'   # trained by test_gender_task_end_to_end when it ran first; else here (`run` resumes, never repeats)
    assert main(['run', str(write_study(data, 's_gender', {'task': ['gender2']})), '--no-progress']) == 0
    assert main(['audit', str(study), '--n-boot', '0', '--no-progress', '--out', str(study/'audit_race'), '--no-figures']) == 0
    top = pd.read_csv(study/'audit_race'/'study'/'court'/'top_means.csv')
    assert 'attribute' not in top and {'Black', 'White'} <= set(top.race)
    with pytest.raises(UserError, match="no predictions column 'skin_tone'"):
        from mugshotrace.audit.selfaudit import audit
        from mugshotrace.audit.frame import AuditConfig
        audit(study, study/'audit_skin', AuditConfig(attribute='skin_tone', n_boot=0, figures=False), progress=False)

# ---- (c) imbalanced sampling with weighted loading ----

def _train_label_counts(items, weighted, epochs=20):
    "Classes of the training items the run's loader draws, over `epochs` epochs (the indices its batches are made of)."
    from mugshotrace.train import data as D
    dls = D.face_dataloaders(items, 32, (0.5,) * 3, (0.25,) * 3, bs=8, aug=False, seed=0, weighted=weighted, classes=['Male', 'Female'])
    dl = dls.train; lab = dls.items[~dls.items.is_valid.astype(bool)].label.reset_index(drop=True)
    assert len(lab) == len(dl.dataset) and [dl.dataset.vocab[int(dl.dataset[i][1])] for i in range(3)] == list(lab[:3])
    n = pd.Series(dtype=float)
    for _ in range(epochs): n = n.add(lab.iloc[list(dl.get_idxs())].value_counts(), fill_value=0)
    return {k: int(v) for k, v in n.items()}

def test_imbalanced_weighted_sampling(data):
    p = write_study(data, 's_weighted', {'task': ['gender2']}, sampling='imbalanced', weighted=True, epochs=1)   # the sampler is the point
    assert main(['run', str(p), '--no-progress']) == 0
    [run] = run_folders(p.parent)
    cfg = read_json(run/'config.json'); assert cfg['sampling'] == 'imbalanced' and cfg['weighted'] is True
    counts = read_json(run/'metrics.json')['train']['train_counts']
    assert counts['Male'] > 2 * counts['Female'] > 0, counts     # the sample keeps the population's 3:1
    # the classes the training loop really sees, batch by batch, from the run's own sample
    from mugshotrace.labels import tables as L
    from mugshotrace.labels.sampling import Sample
    from mugshotrace.faces.manifest import load_manifest
    from mugshotrace.train import data as D
    s = Sample.load(run/'sample.json')
    items = D.items_from(load_manifest(data/'faces', 'original'), L.task_labels(pd.read_csv(data/'labels.csv'), L.gender2('court')),
                         s.train + s.valid, s.valid)
    tr = items[~items.is_valid].label
    share_pop = (tr == 'Female').mean()
    w, u = _train_label_counts(items, True), _train_label_counts(items, False)
    fw, fu = w['Female'] / sum(w.values()), u['Female'] / sum(u.values())
    print('Female share seen in training: weighted', w, round(fw, 3), 'unweighted', u, round(fu, 3), 'in the sample', round(share_pop, 3))
    sd = lambda p, n: 4 * np.sqrt(p * (1 - p) / n)                  # 4 binomial standard deviations
    assert abs(fu - share_pop) < sd(share_pop, sum(u.values())) and fu < 0.3, (u, fu)   # unweighted: the sample's own imbalance
    assert abs(fw - 0.5) < sd(0.5, sum(w.values())), (w, fw)   # weighted: the training rows' classes drawn equally often
    assert fw > 2 * share_pop                                       # weighted: both classes about equally often
    aud = run_audit_report(p.parent, '--attribute', 'gender')
    assert set(aud[aud.attribute == 'gender'].group) >= {'Male', 'Female'}

# ---- (d) a study-file task with merge and drop ----

HISP = {'hisp': {'attributes': ['race', 'ethnicity'], 'classes': ['Hispanic', 'BnH'], 'merge': {'Hispanic': ['BH', 'WH']}, 'drop': ['WnH']}}

def _check_hisp_run(run):
    meta = read_json(run/'model.json')
    assert sorted(meta['classes']) == ['BnH', 'Hispanic'] and meta['task']['merge'] == {'Hispanic': ['BH', 'WH']} and meta['task']['drop'] == ['WnH']
    pr = own_test_preds(run)
    assert set(pr.label) == {'Hispanic', 'BnH'} and 'WnH' not in set(pr.group)   # WnH images left out
    assert set(pr[pr.label == 'Hispanic'].group) == {'BH', 'WH'}                 # both Hispanic subgroups merged
    acc = float((pr.Prediction == pr.label).mean()); print('hisp test accuracy', acc, len(pr)); assert acc > 0.8                       # the stripe is visible

def test_custom_task_merge_drop_api(data):
    "Through the Python API: `run_grid(configs, data=...)` with the task in `StudyData.tasks`."
    from mugshotrace.study.config import load_study
    from mugshotrace.study.grid import run_grid
    p = write_study(data, 's_hisp_api', {'task': ['hisp']}, tasks=HISP)
    st = load_study(p); assert st.data.tasks == HISP
    df = run_grid(list(st.runs), data=st.data, runs_root=p.parent/'runs', progress=False)
    assert list(df.state) == ['done'], df
    [run] = run_folders(p.parent); _check_hisp_run(run)
    assert main(['audit', str(p.parent/'runs'), '--n-boot', '0', '--no-progress', '--no-figures']) == 0

def test_custom_task_from_study_file(data):
    "The same task declared in the study file's `tasks:` section, through the CLI (needs load_study to accept `tasks:`)."
    from mugshotrace.study.config import load_study
    p = write_study(data, 's_hisp_file', {'task': ['hisp']}, tasks=HISP)
    st = load_study(p)
    assert set(st.data.tasks) == {'hisp'}
    assert main(['run', str(p), '--no-progress']) == 0
    [run] = run_folders(p.parent); _check_hisp_run(run)
    run_audit_report(p.parent)
    bad = write_study(data, 's_hisp_bad', {'task': ['hisp']}, tasks={'hisp': {**HISP['hisp'], 'clases': ['x']}})
    from mugshotrace.labels.tables import get_task
    with pytest.raises(UserError, match=r"unknown key\(s\) \['clases'\]"): get_task('hisp', 'court', load_study(bad).data.tasks)

# ---- (e) one-line errors ----

@pytest.mark.parametrize('task,message', [
    ('nope', "unknown task 'nope'; presets: gender2, race2, race5, race7, race_eth4, skin2"),
    ('race5', "task race5: class(es) ['Asian', 'Indian', 'Others'] absent from the data under label source 'court'"),
    ('skin2', "task skin2 needs attribute(s) ['skin_tone'] that label source 'court' does not label")])
def test_task_errors_are_one_line(data, capsys, task, message):
    "From `mugshotrace run`: a non-zero exit and the reason on one line (a failed run's line, or a pre-flight error), nothing trained."
    p = write_study(data, f's_err_{task}', {'task': [task]})
    rc = main(['run', str(p), '--no-progress'])
    err = capsys.readouterr().err
    assert rc == 2 and 'Traceback' not in err, err   # checked before anything trains (load_study, run_grid)
    assert len([l for l in err.splitlines() if message in l]) == 1, err
    assert not any((run/'model.safetensors').exists() for run in run_folders(p.parent))


def test_decode_once_cache_changes_nothing(data):
    "`data.cache` (the runs' decode-once image cache, on by default) gives bit-identical weights and predictions."
    a = write_study(data, 's_cache_on', {'task': ['race2']}, epochs=2, aug=True)
    b = write_study(data, 's_cache_off', {'task': ['race2']}, epochs=2, aug=True)
    d = yaml.safe_load(b.read_text()); d['data']['cache'] = False; b.write_text(yaml.safe_dump(d, sort_keys=False))
    for p in (a, b): assert main(['run', str(p), '--no-progress']) == 0
    [ra], [rb] = run_folders(a.parent), run_folders(b.parent)
    assert ra.name == rb.name                                                  # the cache is not part of the run id
    assert any((data/'faces'/'.cache').rglob('*.npy'))                         # the cached run really read the cache
    assert read_json(ra/'model.json')['weights_sha256'] == read_json(rb/'model.json')['weights_sha256']
    for f in sorted((ra/'preds').rglob('*.csv')): assert f.read_bytes() == (rb/f.relative_to(ra)).read_bytes(), f
