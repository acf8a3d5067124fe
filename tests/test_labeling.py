"Integration tests of bulk labelling: completeness, exactness against fastai get_preds, resumption after a kill, CLI."
import os, signal, subprocess, sys, time, json
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image

from mugshotrace.bulk.label import Labeler, label_images, list_images, label_agreement, coverage_gain
from mugshotrace.bulk import label as LB
from mugshotrace.train.models import build_model, save_bundle
from mugshotrace.cli import main
from mugshotrace.core import sample_face_photos

CLASSES = ['Black', 'White']


def make_images(folder, n, size=(48, 60), seed=0, quality=90):
    "Face-like synthetic images: a skin-toned ellipse on a background, varied per image (non-square to exercise Resize)."
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size; yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        tone = rng.uniform(40, 230); bg = rng.uniform(0, 255, 3)
        m = ((xx - w / 2) / (w * .3)) ** 2 + ((yy - h / 2) / (h * .38)) ** 2 < 1
        a = np.where(m[..., None], np.array([tone, tone * .8, tone * .65]), bg) + rng.normal(0, 12, (h, w, 3))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f'img{i:05d}.jpg', quality=quality)
    return folder


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp('bundle')
    model = build_model('tiny_cnn', 2, 'random', seed=1)
    with torch.no_grad():  # make BatchNorm statistics non-trivial so the two classes are both predicted
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d): m.running_mean.uniform_(-.2, .2); m.running_var.uniform_(.5, 2)
    meta = {'arch': 'tiny_cnn', 'classes': CLASSES, 'input_size': 32, 'variant': 'resized'}
    # centre the decision boundary on face-like images so that both classes are predicted
    imgs = make_images(d / 'calib', 60, seed=99)
    lab = Labeler(model, {**meta, 'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225]}, preprocessed=True)
    P = lab.predict([lab.prepare(pd.DataFrame({'image_id': ['x'], 'file': [str(f)]}), d / 'w')[1][0] for f in sorted(imgs.iterdir())])
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)][-1]  # feeds the bias-free last Linear
    w = (last.weight[0] - last.weight[1]).detach()
    with torch.no_grad(): bn.bias -= float(np.median(np.log(P[:, 0] / P[:, 1]))) * w / (w @ w)
    save_bundle(model, d, meta)
    return d


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    d = make_images(tmp_path_factory.mktemp('imgs') / 'images', 300)
    (d / 'truncated.jpg').write_bytes((d / 'img00000.jpg').read_bytes()[:200])
    (d / 'empty.png').write_bytes(b'')
    return d


def fastai_get_preds(bundle, files):
    "The independent baseline: the runner's own pipeline (data.face_dataloaders + data.test_dl) and Learner.get_preds."
    from fastai.vision.all import Learner, CrossEntropyLossFlat
    from mugshotrace.train.data import face_dataloaders, test_dl
    from mugshotrace.train.models import load_bundle
    model, meta = load_bundle(bundle)
    files = [str(f) for f in files]
    items = pd.DataFrame({'image_id': [Path(f).stem for f in files[:4]], 'file': files[:4],
                          'label': meta['classes'] * 2, 'is_valid': [False, True] * 2})
    dls = face_dataloaders(items, meta['input_size'], meta['mean'], meta['std'], bs=16, aug=False, classes=meta['classes'])
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat())
    preds, _ = learn.get_preds(dl=test_dl(dls, pd.DataFrame({'image_id': [Path(f).stem for f in files], 'file': files})))
    return preds.numpy()


def test_one_row_per_image_and_equal_to_fastai_get_preds(bundle, images, tmp_path):
    out = tmp_path / 'labels.csv'
    s = label_images(Labeler.from_dir(bundle, preprocessed=True), images, out, id_col='Jail_ID', chunk=64, progress=False)
    df = pd.read_csv(out, dtype={'Jail_ID': str})
    assert list(df.columns) == ['Jail_ID', 'Black_Prob', 'White_Prob', 'Prediction', 'status', 'reason']
    assert len(df) == 302 and df.Jail_ID.is_unique and set(df.Jail_ID) == set(list_images(images).image_id)
    bad = df.set_index('Jail_ID').loc[['truncated', 'empty']]
    assert (bad.status == 'decode_error').all() and bad.Black_Prob.isna().all() and bad.reason.str.len().gt(0).all()
    assert s['status_counts'] == {'ok': 300, 'decode_error': 2}
    ok = df[df.status == 'ok'].sort_values('Jail_ID')
    ref = fastai_get_preds(bundle, [images / f'{i}.jpg' for i in ok.Jail_ID])
    np.testing.assert_allclose(ok[['Black_Prob', 'White_Prob']].to_numpy(), ref, atol=2e-6, rtol=0)
    assert (ok.Prediction.to_numpy() == np.array(CLASSES)[ref.argmax(1)]).all()
    assert ok.Prediction.nunique() == 2  # the check is not vacuous: both classes occur
    sc = json.loads((tmp_path / 'labels.csv.json').read_text())
    assert sc['settings']['model_sha256'] == json.loads((bundle / 'model.json').read_text())['weights_sha256']


def test_resume_after_kill(bundle, tmp_path):
    imgs = make_images(tmp_path / 'big', 200, size=(240, 300), seed=3)
    out = tmp_path / 'kill.csv'; parts = tmp_path / 'kill.csv.parts'
    cmd = [sys.executable, '-c', 'import sys; from mugshotrace.cli import main; sys.exit(main(sys.argv[1:]))',
           'label', str(bundle), '--images', str(imgs), '--out', str(out), '--chunk', '8', '--workers', '1', '--preprocessed']
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 120 and p.poll() is None and len(list(parts.glob('part-*.csv'))) < 3: time.sleep(0.005)
    p.send_signal(signal.SIGKILL); p.wait()
    n_parts = len(list(parts.glob('part-*.csv')))
    assert not out.exists() and 3 <= n_parts < 25, f'the job was not killed mid-way ({n_parts} parts)'
    assert main(['label', str(bundle), '--images', str(imgs), '--out', str(out), '--chunk', '8', '--preprocessed']) == 0
    df = pd.read_csv(out, dtype={'image_id': str})
    assert len(df) == 200 and df.image_id.is_unique and (df.status == 'ok').all() and not parts.exists()
    fresh = tmp_path / 'fresh.csv'
    label_images(Labeler.from_dir(bundle, preprocessed=True), imgs, fresh, chunk=100, progress=False)
    f = pd.read_csv(fresh, dtype={'image_id': str}).set_index('image_id').loc[df.image_id]
    np.testing.assert_allclose(df[['Black_Prob', 'White_Prob']].to_numpy(), f[['Black_Prob', 'White_Prob']].to_numpy(), atol=1e-7)


def test_cli_agreement_coverage_and_bad_input(bundle, images, tmp_path, capsys):
    first = tmp_path / 'first.csv'
    label_images(Labeler.from_dir(bundle, preprocessed=True), images, first, progress=False)
    p = pd.read_csv(first, dtype={'image_id': str})
    # existing labels: the model's own predictions for 200 images, flipped for 20 of them, missing for the rest
    lab = p[['image_id', 'Prediction']].rename(columns={'Prediction': 'race'}).copy()
    idx = lab.index[p.status == 'ok']
    lab.loc[idx[200:], 'race'] = ''
    flip = idx[:20]; lab.loc[flip, 'race'] = lab.loc[flip, 'race'].map({'Black': 'White', 'White': 'Black'})
    lab['group'] = np.where(np.arange(len(lab)) % 2, 'H', 'nH')
    lab.to_csv(tmp_path / 'court.csv', index=False)
    out = tmp_path / 'cli.csv'
    rc = main(['label', str(bundle), '--images', str(images), '--out', str(out), '--preprocessed', '--tta',
               '--labels', str(tmp_path / 'court.csv'), '--label-col', 'race', '--group-col', 'group'])
    assert rc == 0
    ag = json.loads((tmp_path / 'cli.csv.agreement.json').read_text())
    assert ag['n'] == 200
    # TTA changes a few predictions at most; agreement is close to the injected 90 %
    assert 0.8 <= ag['accuracy'] <= 0.92 and ag['kappa']['ci_low'] < ag['kappa']['value'] < ag['kappa']['ci_high']
    conf = pd.read_csv(tmp_path / 'cli.csv.confusion.csv')
    assert set(conf.group) == {'H', 'nH'} and conf.n.sum() == 200
    cov = pd.read_csv(tmp_path / 'cli.csv.coverage.csv')
    assert (cov.n_missing == 102).all() and cov.n_filled.iloc[0] == 100  # 2 missing are the broken files (no prediction)
    # exact agreement when the labels are the predictions themselves (no TTA)
    lab2 = p[['image_id', 'Prediction']].rename(columns={'Prediction': 'label'})
    res, _ = label_agreement(first, lab2, CLASSES)
    assert res['accuracy'] == 1 and abs(res['kappa']['value'] - 1) < 1e-12
    assert main(['label', str(tmp_path / 'nope'), '--images', str(images), '--out', str(out)]) == 2
    assert 'not a model bundle' in capsys.readouterr().err
    assert main(['label', str(bundle), '--images', str(tmp_path / 'missing.csv'), '--out', str(out)]) == 2


def test_calibrate_from_validation_predictions(bundle, images, tmp_path):
    "--calibrate fits T on a Predictions CSV; the fitted T is written to the provenance sidecar."
    rng = np.random.default_rng(0); n = 3000
    z = rng.normal(0, 2, n); pb = 1 / (1 + np.exp(-z))
    y = np.where(rng.random(n) < 1 / (1 + np.exp(-z / 3)), 'Black', 'White')  # labels follow softmax(z / 3)
    pd.DataFrame({'image_id': range(n), 'Black_Prob': pb, 'White_Prob': 1 - pb, 'label': y}).to_csv(tmp_path / 'valid.csv', index=False)
    out = tmp_path / 'cal.csv'
    assert main(['label', str(bundle), '--images', str(images), '--out', str(out), '--preprocessed', '--calibrate', str(tmp_path / 'valid.csv')]) == 0
    T = json.loads((tmp_path / 'cal.csv.json').read_text())['settings']['temperature']
    assert 2.2 < T < 4.0


@pytest.mark.slow
def test_label_5000_images(bundle, tmp_path):
    imgs = make_images(tmp_path / 'many', 5000, seed=5)
    out = tmp_path / 'many.csv'
    s = label_images(Labeler.from_dir(bundle, preprocessed=True), imgs, out, chunk=500, progress=False)
    df = pd.read_csv(out, dtype={'image_id': str})
    assert s['n'] == 5000 and len(df) == 5000 and df.image_id.is_unique and (df.status == 'ok').all()
    ok = df.sort_values('image_id').iloc[::50]
    ref = fastai_get_preds(bundle, [imgs / f'{i}.jpg' for i in ok.image_id])
    np.testing.assert_allclose(ok[['Black_Prob', 'White_Prob']].to_numpy(), ref, atol=2e-6, rtol=0)


def _toy_study(root, n_people=32, size=40, seed=0):
    "A tiny labelled data set (brightness depends on race) and a one-run study file for the experiments runner."
    import yaml
    root = Path(root); (root / 'images').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed); rows = []
    for p in range(n_people):
        race, eth = ('Black', 'White')[p % 2], ('Hispanic', 'NonHispanic')[(p // 2) % 2]
        for k in range(2):
            iid = f'p{p:03d}_{k}'
            a = np.clip(rng.normal(70 if race == 'Black' else 180, 25, (size, size + 8, 3)), 0, 255)
            Image.fromarray(a.astype(np.uint8)).save(root / 'images' / f'{iid}.png')
            rows.append(dict(image_id=iid, path=f'images/{iid}.png', person_id=f'P{p}', race_court=race, ethnicity_court=eth,
                             race_student=race, ethnicity_student=eth))
    pd.DataFrame(rows).to_csv(root / 'labels.csv', index=False)
    cols = {s: {'race': f'race_{s}', 'ethnicity': f'ethnicity_{s}'} for s in ('court', 'student')}
    d = {'name': 'toy', 'data': {'labels': {'table': 'labels.csv', 'columns': cols}, 'images': '.', 'preprocessed': 'faces',
                                 'preprocess': {'progress': False}},
         'train': {'epochs': 1, 'size': 32, 'bs': 8, 'n_per_class': 8, 'init': 'random', 'lr': 3e-2, 'aug': False},
         'grid': {'arch': ['tiny_cnn'], 'variant': ['original'], 'label_source': ['court']}, 'runs': 'runs'}
    (root / 'study.yaml').write_text(yaml.safe_dump(d))
    return root


def test_reproduces_the_runners_test_set_predictions(tmp_path):
    "A bundle from the experiments runner labels each test set exactly as the runner predicted it, from the raw images too."
    experiments = pytest.importorskip('mugshotrace.study.grid')
    from mugshotrace.faces.preprocess import load_manifest
    root = _toy_study(tmp_path / 'toy')
    df = experiments.run_grid(root / 'study.yaml', progress=False)
    assert (df.state == 'done').all(), df
    run = next((root / 'runs').iterdir())
    tests = [p for p in sorted((run / 'preds').glob('*.csv')) if p.stem != 'valid']
    assert tests
    man = load_manifest(root / 'faces', 'original').set_index('image_id')
    for t in tests:
        ref = pd.read_csv(t, dtype={'image_id': str}).set_index('image_id')
        ids = list(ref.index)
        table = pd.DataFrame({'image_id': ids, 'path': [man.loc[i, 'file'] for i in ids]})
        table.to_csv(tmp_path / f'{t.stem}.csv', index=False)
        out = tmp_path / f'{t.stem}_labels.csv'
        assert main(['label', str(run), '--images', str(tmp_path / f'{t.stem}.csv'), '--out', str(out), '--preprocessed']) == 0
        got = pd.read_csv(out, dtype={'image_id': str}).set_index('image_id').loc[ids]
        cols = ['Black_Prob', 'White_Prob']
        np.testing.assert_allclose(got[cols].to_numpy(), ref[cols].to_numpy(), atol=1e-6, rtol=0)
        assert (got.Prediction == ref.Prediction).all()
        # from the raw images: the bundle's variant is applied through faces.preprocess, as for training
        raw = pd.DataFrame({'image_id': ids, 'path': [str(root / 'images' / f'{i}.png') for i in ids]})
        raw.to_csv(tmp_path / f'{t.stem}_raw.csv', index=False)
        out2 = tmp_path / f'{t.stem}_raw_labels.csv'
        assert main(['label', str(run), '--images', str(tmp_path / f'{t.stem}_raw.csv'), '--out', str(out2)]) == 0
        got2 = pd.read_csv(out2, dtype={'image_id': str}).set_index('image_id').loc[ids]
        np.testing.assert_allclose(got2[cols].to_numpy(), ref[cols].to_numpy(), atol=1e-6, rtol=0)


def test_face_variant_from_raw_images_gives_typed_statuses(tmp_path):
    "An openface bundle labels raw photos through faces.preprocess: a face gets a prediction, a faceless image `no_face`."
    pytest.importorskip('mugshotrace.faces.preprocess')
    d = tmp_path / 'b'
    save_bundle(build_model('tiny_cnn', 2, 'random', seed=0), d, {'arch': 'tiny_cnn', 'classes': CLASSES, 'input_size': 32, 'variant': 'openface'})
    imgs = tmp_path / 'raw'; imgs.mkdir()
    Image.open(sample_face_photos()['grace_hopper']).convert('RGB').save(imgs / 'hopper.jpg')
    Image.fromarray(np.full((200, 160, 3), 128, np.uint8)).save(imgs / 'blank.png')
    (imgs / 'notes.txt').write_text('not an image')
    out = tmp_path / 'faces.csv'
    s = label_images(Labeler.from_dir(d), imgs, out, progress=False)
    df = pd.read_csv(out).set_index('image_id')
    assert s['n'] == 3 and df.loc['hopper', 'status'] == 'ok' and df.loc['hopper', 'Prediction'] in CLASSES
    assert df.loc['blank', 'status'] == 'no_face' and np.isnan(df.loc['blank', 'Black_Prob'])
    assert df.loc['notes', 'status'] in ('decode_error', 'unsupported') and isinstance(df.loc['notes', 'reason'], str)


def test_kappa_interval_stays_in_range():
    "Near-perfect agreement: the large-sample interval would pass 1; it is clipped to kappa's range."
    from mugshotrace.labels.agreement import cohen_kappa_ci
    k, lo, hi = cohen_kappa_ci(['a'] * 50 + ['b'] * 49 + ['a'], ['a'] * 50 + ['b'] * 50)
    assert 0.9 < k < 1 and lo < k and hi == 1.0


def test_bulk_labels_use_the_one_kappa():
    "Bulk labels use `labels.agreement.cohen_kappa_ci` (one definition): an undefined kappa is NaN, not 1 or a crash."
    from mugshotrace.labels import agreement
    assert LB.cohen_kappa_ci is agreement.cohen_kappa_ci
    pr = pd.DataFrame({'image_id': [f'i{i}' for i in range(5)], 'Black_Prob': 1., 'White_Prob': 0., 'Prediction': 'Black',
                       'status': 'ok', 'reason': ''})
    res, _ = label_agreement(pr, pr[['image_id']].assign(label='Black'), ['Black', 'White'])
    assert res['accuracy'] == 1 and all(np.isnan(res['kappa'][k]) for k in ('value', 'ci_low', 'ci_high'))


def test_label_front_door_and_flags(bundle, images, tmp_path):
    "`label(source, out, cfg, images=…)` returns a `BulkResult`; the subcommand's defaults are `BulkConfig`'s."
    import argparse
    from mugshotrace.bulk.label import label, BulkConfig, BulkResult, add_label_parser
    from mugshotrace.config import config_from_args
    r = label(bundle, tmp_path / 'fd.csv', BulkConfig(preprocessed=True, chunk=64), images=images, progress=False)
    assert isinstance(r, BulkResult) and r.out == tmp_path / 'fd.csv' and r.n == len(pd.read_csv(r.out)) and r.agreement is None
    assert r.to_dict()['out'] == str(tmp_path / 'fd.csv') and r.temperature == 1.0
    p = add_label_parser(argparse.ArgumentParser().add_subparsers())
    a = p.parse_args([str(bundle), '--images', 'x', '--out', 'y'])
    assert config_from_args(BulkConfig, a) == BulkConfig() and a.progress is True
    assert p.parse_args([str(bundle), '--images', 'x', '--out', 'y', '--no-progress']).progress is False


# ---- resume state: inputs and settings hashed, one row per input after a kill at any stage, one writer ----
from mugshotrace.core import UserError


def _ids(out, id_col='image_id'): return list(pd.read_csv(out, dtype={id_col: str})[id_col])


def _one_row_per_input(out, folder):
    ids = _ids(out)
    assert len(ids) == len(set(ids)), 'duplicated rows'
    assert set(ids) == set(list_images(folder).image_id), 'rows differ from the current inputs'


def test_other_images_same_out_is_not_a_union(bundle, tmp_path):
    a = make_images(tmp_path / 'a', 6, seed=1); b = make_images(tmp_path / 'b', 4, seed=2)
    for f in sorted(b.iterdir()): f.rename(b / f.name.replace('img', 'other'))
    lab = Labeler.from_dir(bundle, preprocessed=True); out = tmp_path / 'o.csv'
    label_images(lab, a, out, chunk=2, progress=False)
    s = label_images(lab, b, out, chunk=2, progress=False)
    _one_row_per_input(out, b)
    assert s['n'] == 4 and s['n_new'] == 4


def test_changed_file_under_same_id_is_relabelled(bundle, tmp_path):
    a = make_images(tmp_path / 'a', 5, seed=1)
    lab = Labeler.from_dir(bundle, preprocessed=True); out = tmp_path / 'o.csv'
    label_images(lab, a, out, chunk=2, progress=False)
    before = pd.read_csv(out, dtype={'image_id': str}).set_index('image_id')
    make_images(tmp_path / 'c', 1, seed=42); (tmp_path / 'c' / 'img00000.jpg').replace(a / 'img00002.jpg')
    s = label_images(lab, a, out, chunk=2, progress=False)
    after = pd.read_csv(out, dtype={'image_id': str}).set_index('image_id')
    assert s['n_new'] == 1 and after.index.is_unique and len(after) == 5
    ref = label_images(lab, [a / 'img00002.jpg'], tmp_path / 'ref.csv', progress=False)
    r = pd.read_csv(tmp_path / 'ref.csv', dtype={'image_id': str}).set_index('image_id')
    assert after.loc['img00002', 'Black_Prob'] == r.loc['img00002', 'Black_Prob'] != before.loc['img00002', 'Black_Prob']


def test_other_settings_refused_in_one_line(bundle, tmp_path):
    a = make_images(tmp_path / 'a', 3, seed=1); out = tmp_path / 'o.csv'
    label_images(Labeler.from_dir(bundle, preprocessed=True), a, out, progress=False)
    for kw in ({'bs': 7}, {'tta': True}):
        with pytest.raises(UserError, match='other settings') as e:
            label_images(Labeler.from_dir(bundle, preprocessed=True, **kw), a, out, progress=False)
        assert '\n' not in str(e.value)


class Killed(BaseException): "Stands in for SIGKILL: not an Exception, so nothing in the job catches it."


def _kill_labelling(monkeypatch, lab, **_):
    calls = {'n': 0}; real = lab.rows
    def rows(*a, **k):
        calls['n'] += 1
        if calls['n'] == 3: raise Killed
        return real(*a, **k)
    monkeypatch.setattr(lab, 'rows', rows)


def _kill_merge(monkeypatch, lab, out, **_):
    real = LB.atomic_write
    import contextlib
    @contextlib.contextmanager
    def half(path, *a, **k):
        with real(path, *a, **k) as f:
            yield f
            if Path(path) == out: f.write('img00001,0.5,'); raise Killed   # mid-file
    monkeypatch.setattr(LB, 'atomic_write', half)


def _kill_before_sidecars(monkeypatch, lab, out, **_):
    real = LB.write_csv
    def w(path, *a, **k):
        if Path(path).name.endswith('.inputs.csv'): raise Killed
        return real(path, *a, **k)
    monkeypatch.setattr(LB, 'write_csv', w)


def _kill_cleanup(monkeypatch, lab, out, **_):
    "The clean-up is cut short after it deleted the state file and one part, but not the others."
    real = LB.shutil.rmtree
    def rm(path, *a, **k):
        p = Path(path)
        if p.name.startswith(f'{out.name}.parts') or p.name.startswith(f'.{out.name}.parts'):
            if not k.get('ignore_errors'):
                (p / 'state.json').unlink(missing_ok=True)
                next(iter(sorted(p.glob('part-*.csv')))).unlink()
                raise Killed
        return real(path, *a, **k)
    monkeypatch.setattr(LB.shutil, 'rmtree', rm)


@pytest.mark.parametrize('stage', [_kill_labelling, _kill_merge, _kill_before_sidecars, _kill_cleanup])
def test_kill_and_resume_at_every_stage(bundle, tmp_path, monkeypatch, stage):
    "A finished output of an earlier input set, then another input set killed at `stage`, then the same command again."
    old = make_images(tmp_path / 'old', 9, seed=1)
    new = make_images(tmp_path / 'new', 12, seed=2)
    for f in sorted(new.iterdir())[:4]: f.replace(new / f.name.replace('img', 'fresh'))   # 8 ids shared, 4 new
    (old / 'img00008.jpg').replace(old / 'gone.jpg')                                      # an id only the old set has
    out = tmp_path / 'o.csv'
    label_images(Labeler.from_dir(bundle, preprocessed=True), old, out, chunk=3, progress=False)
    lab = Labeler.from_dir(bundle, preprocessed=True)
    with monkeypatch.context() as m:
        stage(m, lab, out=out)
        with pytest.raises(Killed): label_images(lab, new, out, chunk=3, progress=False)
    s = label_images(Labeler.from_dir(bundle, preprocessed=True), new, out, chunk=3, progress=False)
    _one_row_per_input(out, new)
    assert 'gone' not in _ids(out) and s['n'] == 12
    assert not (tmp_path / 'o.csv.parts').exists() and not (tmp_path / '.o.csv.parts.trash').exists()
    # the same numbers as a clean run
    label_images(Labeler.from_dir(bundle, preprocessed=True), new, tmp_path / 'clean.csv', progress=False)
    a = pd.read_csv(out, dtype={'image_id': str}).set_index('image_id').sort_index()
    b = pd.read_csv(tmp_path / 'clean.csv', dtype={'image_id': str}).set_index('image_id').sort_index()
    pd.testing.assert_frame_equal(a, b)


HOLD = 'import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); print("held", flush=True); time.sleep(60)'


def test_second_concurrent_label_is_refused(bundle, tmp_path, capsys):
    a = make_images(tmp_path / 'a', 3, seed=1); out = tmp_path / 'o.csv'
    p = subprocess.Popen([sys.executable, '-c', HOLD, str(tmp_path / '.o.csv.lock')], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == 'held'
        assert main(['label', str(bundle), '--images', str(a), '--out', str(out), '--preprocessed']) == 2
        assert 'another label job' in capsys.readouterr().err and not out.exists()
    finally: p.kill(); p.wait()
    assert main(['label', str(bundle), '--images', str(a), '--out', str(out), '--preprocessed']) == 0
    _one_row_per_input(out, a)


def test_hostile_bundle_for_labeler_one_line(bundle, tmp_path):
    "The labeller reads bundles through models.load_bundle's validation: a bad model.json is a one-line UserError."
    import shutil as sh
    b = tmp_path / 'b'; sh.copytree(bundle, b)
    meta = json.loads((b / 'model.json').read_text())
    for bad, msg in (({**meta, 'std': [0, 1, 1]}, 'std'), ({**meta, 'weights_file': '../x.safetensors'}, 'inside the bundle folder'),
                     ({**meta, 'classes': ['Black', 'White', 'Other'], 'n_out': 3}, 'the head has 2 outputs')):
        (b / 'model.json').write_text(json.dumps(bad))
        with pytest.raises(UserError, match=msg): Labeler.from_dir(b)
    with pytest.raises(UserError, match='input_size'): Labeler(build_model('tiny_cnn', 2), {**meta, 'input_size': 'x'})
