"""The Thatcher axis (issue 17): the transform's known answer on real faces (dlib landmarks), determinism, statuses,
the cached folder (reuse, resume, refusal of other options), and a tiny study through run → audit → report → explain
with the `thatcher` and `invert` axes."""
import json, os
from pathlib import Path
import numpy as np, pandas as pd, pytest, yaml
from PIL import Image
from scipy.ndimage import map_coordinates
from mugshotrace.core import UserError, load_rgb, sample_face_photos, read_json, sha256_file, write_json
from mugshotrace.faces.landmarks import detect_faces, landmarks68
from mugshotrace.faces.manifest import MANIFEST_COLUMNS
from mugshotrace.faces import thatcher as T
from mugshotrace.faces.thatcher import (THATCHER_REGIONS, ThatcherOptions, thatcherize, thatcher_landmarks, interocular,
                                        thatcher_manifest, thatcher_dir)

OUTSIDE_TOL = 0.15   # dlib's jaw and nose points on the Thatcherised face: within 0.15 inter-ocular distances of the original
JAW, NOSE = list(range(0, 17)), list(range(27, 36))

def _iou(a, b):
    w = max(0, min(a.x2, b.x2) - max(a.x1, b.x1)); h = max(0, min(a.y2, b.y2) - max(a.y1, b.y1))
    return w * h / (a.area + b.area - w * h)

@pytest.fixture(scope='module')
def faces():
    "Each sample photo, its dlib box and landmarks, the Thatcherised face and its analytic landmarks."
    out = {}
    for name, f in sample_face_photos().items():
        img = load_rgb(f)[0]; box = detect_faces(img)[0]; lm = landmarks68(img, box)
        out[name] = (img, box, lm, thatcherize(img, lm), thatcher_landmarks(lm))
    return out

def _patch(img, centre, half, flip=False, angle=0.0):
    "A (2·half+1)² grey patch around `centre` in a frame rotated by `angle` (bilinear); `flip` samples it upside down."
    g = img.astype(np.float64).mean(-1); d = np.arange(-half, half + 1, dtype=np.float64)
    dy, dx = np.meshgrid(-d if flip else d, d, indexing='ij')
    c, s = np.cos(angle), np.sin(angle)
    return map_coordinates(g, [centre[1] + s * dx + c * dy, centre[0] + c * dx - s * dy], order=1, mode='reflect')

def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean(); return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-12))

@pytest.mark.parametrize('name', ['grace_hopper', 'astronaut'])
def test_known_answer_on_real_faces(faces, name):
    """Outside the regions dlib finds the landmarks of the Thatcherised face where they were (jaw, nose within
    OUTSIDE_TOL·IOD); inside, the transformed landmarks are the region's points mirrored about its centre line (brows
    below eyes, upper lip below lower lip) and the pixels moved with them: the patch around each transformed landmark
    is the vertically flipped patch around the original one."""
    img, box, lm, t, tl = faces[name]; iod = interocular(lm)
    tb = max(detect_faces(t), key=lambda b: _iou(b, box))            # dlib still finds the face, in the same place
    assert _iou(tb, box) > 0.6
    found = landmarks68(t, tb); err = np.linalg.norm(found - lm, axis=1) / iod
    print(f'{name}: IOD {iod:.1f} px; dlib on the Thatcherised face vs the original, max |Δ|/IOD: jaw {err[JAW].max():.3f}, '
          f'nose {err[NOSE].max():.3f}')
    assert err[JAW].max() < OUTSIDE_TOL and err[NOSE].max() < OUTSIDE_TOL
    # what dlib reports inside the regions (printed, not asserted: its shape prior keeps brows above the eyes)
    for r, idx in THATCHER_REGIONS.items():
        idx = list(idx); d = tl[idx, 1] - lm[idx, 1]; big = np.abs(d) > 0.05 * iod
        print(f'  {r}: dlib moves its points by {np.median((found[idx, 1] - lm[idx, 1])[big] / d[big]):+.2f} of the flip (median)')
    # the analytic landmarks: flipped inside the regions, unchanged outside
    assert tl[17:27, 1].mean() > tl[36:48, 1].mean() and (tl[17:22, 1].min() > tl[36:42, 1].max() - 0.05 * iod)
    assert tl[50:53, 1].min() > tl[56:59, 1].max()                   # the upper lip's top below the lower lip's bottom
    for r, idx in THATCHER_REGIONS.items():
        # mirrored about the region's centre line in the face's frame (rotated by the eye line's angle: the two faces are
        # tilted by a few degrees, so the reflection is about the face's horizontal, not the image's)
        e = lm[42:48].mean(0) - lm[36:42].mean(0); a = np.arctan2(e[1], e[0])
        idx = list(idx); rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])       # image -> face frame
        p, q = lm[idx] @ rot.T, tl[idx] @ rot.T; c = (p[:, 1].min() + p[:, 1].max()) / 2
        assert np.abs(q[:, 1] - (2 * c - p[:, 1])).max() < 0.01 * iod and np.abs(q[:, 0] - p[:, 0]).max() < 0.01 * iod
    assert np.array_equal(np.delete(tl, sum(map(list, THATCHER_REGIONS.values()), []), 0),
                          np.delete(lm, sum(map(list, THATCHER_REGIONS.values()), []), 0))
    # the pixels moved with the landmarks: flipped patches match, unflipped ones much less
    half = max(3, int(0.1 * iod)); same, other = [], []
    for k in sum(map(list, THATCHER_REGIONS.values()), []):
        same.append(_ncc(_patch(t, tl[k], half, angle=a), _patch(img, lm[k], half, flip=True, angle=a)))
        other.append(_ncc(_patch(t, tl[k], half, angle=a), _patch(img, tl[k], half, angle=a)))
    print(f'  patch NCC with the flipped original: median {np.median(same):.3f} (min {np.min(same):.3f}); '
          f'with the original at the same place: median {np.median(other):.3f}')
    assert np.median(same) > 0.95 and np.quantile(same, 0.1) > 0.75 and np.median(other) < np.median(same) - 0.2

def test_involution_and_determinism(faces):
    "Applying the transform twice gives the face back (away from the feathered edges); the same input gives the same bytes."
    img, _, lm, t, tl = faces['grace_hopper']
    tt = thatcherize(t, tl)                                          # the flipped regions flipped back
    core = np.zeros(img.shape[:2], bool)
    for r in THATCHER_REGIONS: core |= T.region_mask(img.shape, lm, r, 0.0) > 0
    diff = np.abs(tt.astype(int) - img.astype(int))[core]
    once = np.abs(t.astype(int) - img.astype(int))[core]          # the tilted face is resampled (bilinear) twice
    print(f'mean |twice - original| {diff.mean():.2f}, mean |once - original| {once.mean():.2f} (grey levels, in the regions)')
    assert diff.mean() < 0.25 * once.mean() and np.median(diff) <= 4
    assert np.array_equal(thatcherize(img, lm), t)
    with pytest.raises(ValueError): thatcherize(img, lm[:5])

def _variant(root, names=('grace_hopper', 'astronaut', 'blank'), side=256, squish=True):
    "A `resized` variant folder with the sample photos (and a blank image) squished to side × side."
    vdir = Path(root)/'resized'; (vdir/'images').mkdir(parents=True, exist_ok=True); rows = []
    write_json(vdir/'config.json', {'options': {'variant': 'resized', 'size': side, 'resize_method': 'squish' if squish else 'crop'}})
    photos = sample_face_photos()
    for n in names:
        f = photos.get(n)
        a = np.asarray(Image.open(f).convert('RGB').resize((side, side))) if f else np.full((side, side, 3), 128, np.uint8)
        Image.fromarray(a).save(vdir/'images'/f'{n}.png')
        sw, sh = Image.open(f).size if f else (side, side)
        rows.append(dict(image_id=n, variant='resized', status='ok', reason='', out_path=f'images/{n}.png', src_sha256=f'sha-{n}',
                         src_width=sw, src_height=sh))
    rows.append(dict(image_id='gone', variant='resized', status='decode_error', reason='truncated file', src_sha256='sha-gone'))
    pd.DataFrame(rows).reindex(columns=list(MANIFEST_COLUMNS)).to_csv(vdir/'manifest.csv', index=False)
    return Path(root)

def test_manifest_statuses_cache_and_refusal(tmp_path, monkeypatch):
    root = _variant(tmp_path)
    m = thatcher_manifest(root, 'resized')
    assert list(m.image_id) == ['grace_hopper', 'astronaut', 'blank', 'gone']                    # nothing dropped
    assert list(m.status) == ['ok', 'ok', 'no_face', 'decode_error'] and m.thatcher.all()
    assert 'no face' in m.reason[2] and m.reason[3] == 'truncated file' and m.file[2:].isna().all()
    tdir = thatcher_dir(root, 'resized'); assert all(Path(f).parent == tdir/'images' and Path(f).is_file() for f in m.file[:2])
    lms = pd.read_csv(tdir/'landmarks.csv', dtype={'image_id': str})
    assert sorted(lms.image_id.unique()) == ['astronaut', 'grace_hopper'] and (lms.groupby('image_id').size() == 68).all()
    cfg = read_json(tdir/'config.json'); assert cfg['thatcher']['version'] == T.THATCHER_VERSION and cfg['variant'] == 'resized'
    # train.data.items_from drops the non-ok rows and says why
    from mugshotrace.train.data import items_from
    it = items_from(m, pd.Series('White', index=list(m.image_id)), list(m.image_id))
    assert list(it.image_id) == ['grace_hopper', 'astronaut'] and it.attrs['dropped']['blank'].startswith('no_face: thatcher')
    # a second call makes nothing
    made = []; orig = T._thatcher_row
    monkeypatch.setattr(T, '_thatcher_row', lambda task: made.append(task['row']['image_id']) or orig(task))
    stamps = {f: os.stat(f).st_mtime_ns for f in m.file[:2]}
    m2 = thatcher_manifest(root, 'resized')
    assert made == [] and m2.equals(m) and all(os.stat(f).st_mtime_ns == s for f, s in stamps.items())
    # interrupted: the manifest never written, one crop lost -> only that crop (and the cheap non-ok rows) made again
    (tdir/'manifest.csv').unlink(); Path(m.file[1]).unlink()
    m3 = thatcher_manifest(root, 'resized')
    assert 'grace_hopper' not in made and 'astronaut' in made and m3.drop(columns='file').equals(m.drop(columns='file'))
    assert sha256_file(m3.file[1]) == sha256_file(m3.file[1])
    # a changed source image is made again
    man = pd.read_csv(root/'resized'/'manifest.csv', dtype=str); man.loc[0, 'src_sha256'] = 'sha-new'
    man.to_csv(root/'resized'/'manifest.csv', index=False); made.clear()
    thatcher_manifest(root, 'resized'); assert 'grace_hopper' in made
    # other transform options, or a variant remade with other options: refused, never mixed
    with pytest.raises(UserError, match='other options.*margin'): thatcher_manifest(root, 'resized', opts=ThatcherOptions(margin=0.2))
    write_json(root/'resized'/'config.json', {'options': {'variant': 'resized', 'size': 128}})
    with pytest.raises(UserError, match='other options'): thatcher_manifest(root, 'resized')
    with pytest.raises(UserError, match='regions'): ThatcherOptions(regions=('nose',))

def test_same_bytes_in_a_pool_and_from_the_side_file(tmp_path):
    "The pool makes the same bytes as one process; 68-point side-file landmarks are used instead of dlib."
    a = thatcher_manifest(_variant(tmp_path/'a'), 'resized')
    b = thatcher_manifest(_variant(tmp_path/'b'), 'resized', workers=2, pool_min=1)
    assert [sha256_file(f) for f in a.file[:2]] == [sha256_file(f) for f in b.file[:2]]
    # a side file (as the openface variant writes): its landmarks, not dlib's, drive the transform
    root = _variant(tmp_path/'c', names=('grace_hopper',))
    img = load_rgb(root/'resized'/'images'/'grace_hopper.png')[0]
    lm = landmarks68(img, detect_faces(img, 1)[0]) + [3.0, 0.0]       # shifted: a different, known input
    pd.DataFrame([('grace_hopper', k, x, y, x, y) for k, (x, y) in enumerate(lm)],
                 columns=['image_id', 'point', 'x', 'y', 'out_x', 'out_y']).to_csv(root/'resized'/'landmarks.csv', index=False)
    os.chmod(root/'resized'/'images'/'grace_hopper.png', 0o600)      # an owner-only crop (real faces)
    c = thatcher_manifest(root, 'resized')
    assert np.array_equal(load_rgb(c.file[0])[0], thatcherize(img, lm))
    assert os.stat(c.file[0]).st_mode & 0o777 == 0o600 and os.stat(a.file[0]).st_mode & 0o077   # as private as its crop
    got = pd.read_csv(thatcher_dir(root, 'resized')/'landmarks.csv').sort_values('point')
    assert np.allclose(got[['out_x', 'out_y']], thatcher_landmarks(lm), atol=1e-3)


def test_a_bare_manifest(tmp_path):
    "A manifest with only `image_id` and `file` (no status, no hashes): its rows count as usable and are made."
    (tmp_path/'resized').mkdir(); f = tmp_path/'resized'/'g.png'
    Image.open(sample_face_photos()['grace_hopper']).convert('RGB').save(f)
    m = thatcher_manifest(tmp_path, 'resized', pd.DataFrame({'image_id': ['g'], 'file': [str(f)]}))
    assert list(m.status) == ['ok'] and Path(m.file[0]).is_file() and m.variant[0] == 'resized'


# ---- end to end: run → audit → report → explain with the thatcher and invert axes ----

def test_study_with_thatcher_and_invert_axes(tmp_path, monkeypatch):
    from mugshotrace.cli import main
    from mugshotrace.interp import explain as E
    from mugshotrace.study.folder import Run
    bench, out = tmp_path/'bench', tmp_path/'study'
    assert main(['synth', '--out', str(bench), '--people', '24', '--width', '240', '--height', '300', '--no-progress']) == 0
    cols = {s: {'race': f'race_{s}', 'ethnicity': f'ethnicity_{s}'} for s in ('court', 'student')}
    study = {'name': 'thatcher-tiny',
             'data': {'labels': {'table': str(bench/'labels.csv'), 'columns': cols, 'id': 'image_id', 'path': 'path', 'person': 'person_id'},
                      'images': str(bench), 'preprocessed': str(out/'faces'), 'truth': str(bench),
                      'preprocess': {'size': 128, 'progress': False}},
             'grid': {'arch': ['tiny_cnn'], 'variant': ['resized'], 'label_source': ['court'],
                      'thatcher': ['none', 'test'], 'invert': ['none', 'test']},
             'train': {'task': 'race2', 'sampling': 'balanced', 'init': 'random', 'epochs': 1, 'size': 32, 'bs': 8,
                       'n_per_class': 6, 'lr': 1e-2, 'aug': False, 'seed': 0},
             'runs': str(out/'runs'), 'executor': {'name': 'local', 'workers': 1}}
    out.mkdir(); (out/'study.yaml').write_text(yaml.safe_dump(study))
    assert main(['run', str(out/'study.yaml'), '--no-progress']) == 0
    runs = sorted(p for p in (out/'runs').iterdir() if (p/'config.json').exists())
    th = [p for p in runs if read_json(p/'config.json').get('thatcher') == 'test']
    assert len(runs) == 4 and len(th) == 2 and all(Run.open(p).name.endswith('-thtest') for p in th)
    tdir = thatcher_dir(out/'faces', 'resized'); tman = pd.read_csv(tdir/'manifest.csv', dtype={'image_id': str})
    files = {i: f for i, f in zip(tman.image_id, tman.out_path) if isinstance(f, str)}
    assert len(files) >= 0.8 * len(tman)                              # dlib finds most benchmark faces on the crops
    for p in runs:
        on = p in th
        for side in sorted((p/'preds').glob('*.json')):
            sc = read_json(side)
            if sc['dataset'] == 'valid': assert sc['thatcher'] is False; continue
            assert sc['thatcher'] is on
            ids = pd.read_csv(side.with_suffix('.csv'), dtype={'image_id': str}).image_id
            if on: assert set(ids) <= set(files)                        # predicted on Thatcherised crops only
        assert read_json(p/'model.json')['thatcher'] == read_json(p/'config.json').get('thatcher', 'none')
    assert main(['audit', str(out), '--n-boot', '50', '--no-progress']) == 0
    audit = pd.concat([pd.read_csv(f) for f in out.rglob('audit.csv')])
    assert {Run.open(p).run_id for p in runs} <= set(audit.run_id)
    assert main(['report', str(out), '--out', str(out/'report.html')]) == 0
    html = (out/'report.html').read_text(encoding='utf-8')
    assert all(Run.open(p).run_id in html for p in runs)
    both = [p for p in th if read_json(p/'config.json').get('invert') == 'test'][0]   # Thatcherised and rotated
    loaded, sides = [], []                                             # what explain feeds the model, and its landmarks
    load_inputs, input_landmarks = E.load_inputs, E.R.input_landmarks
    monkeypatch.setattr(E, 'load_inputs', lambda fs, *a, **k: loaded.extend(fs) or load_inputs(fs, *a, **k))
    monkeypatch.setattr(E.R, 'input_landmarks', lambda ids, fs, size, side=None: sides.append(side) or input_landmarks(ids, fs, size, side))
    assert main(['explain', str(both), '--max-images', '4', '--bs', '8', '--no-faithfulness', '--no-progress']) == 0
    assert loaded and all(Path(f).parent == tdir/'images' for f in loaded)           # the Thatcherised crops
    tl = pd.read_csv(tdir/'landmarks.csv', dtype={'image_id': str})
    assert sides and all(sd is not None and sd.equals(tl) for sd in sides)           # with the landmarks of those crops
    one = tl[tl.image_id == tl.image_id.iloc[0]].set_index('point')
    assert one.loc[17:26, 'out_y'].mean() > one.loc[36:47, 'out_y'].mean()          # brows below the eyes, as shown
    ex = read_json(both/'explain'/'explain.json')
    assert ex['thatcher_scenarios'] and set(ex['thatcher_scenarios']) == set(ex['inverted_scenarios'])
    reg = pd.read_csv(both/'explain'/'region_shares.csv', dtype={'image_id': str})
    assert len(reg) and set(reg.image_id) <= set(files) and reg.has_landmarks.all()

@pytest.mark.slow
def test_outside_regions_unchanged_across_the_benchmark(tmp_path):
    """On every openface crop of a benchmark of 60 people (crops padded by a grey border: dlib's detector misses faces
    that fill the image): dlib's jaw and nose points on the Thatcherised crop vs on the crop, in the same box."""
    from mugshotrace.synth.benchmark import SynthConfig, make_benchmark
    from mugshotrace.faces.preprocess import preprocess_table
    bench = tmp_path/'bench'; make_benchmark(bench, SynthConfig(people=60, width=240, height=300), progress=False)
    preprocess_table(bench/'labels.csv', bench, 'openface', tmp_path/'faces', size=160, progress=False)
    m = thatcher_manifest(tmp_path/'faces', 'openface')
    crops = dict(zip(m.image_id, pd.read_csv(tmp_path/'faces'/'openface'/'manifest.csv', dtype={'image_id': str}).out_path))
    pad = lambda a: np.pad(a, ((40, 40), (40, 40), (0, 0)), constant_values=128)
    errs, undetected, lost = [], 0, 0
    for i, f in zip(m.image_id[m.status == 'ok'], m.file[m.status == 'ok']):
        img = pad(load_rgb(tmp_path/'faces'/'openface'/crops[i])[0]); t = pad(load_rgb(f)[0])
        b = detect_faces(img, 1)
        if not b: undetected += 1; continue
        lost += not any(_iou(x, b[0]) > 0.5 for x in detect_faces(t, 1))
        lm, found = landmarks68(img, b[0]), landmarks68(t, b[0])
        sh = landmarks68(np.roll(img, (1, 1), (0, 1)), b[0]) - 1          # dlib's own jitter: the crop moved by one pixel
        e, j = (np.linalg.norm(x - lm, axis=1) / interocular(lm) for x in (found, sh))
        errs.append((e[JAW].max(), e[NOSE].max(), j[JAW].max(), j[NOSE].max()))
    errs = np.array(errs)
    print('one-pixel shift (dlib jitter): jaw median %.3f p95 %.3f, nose median %.3f p95 %.3f' % (
          np.median(errs[:, 2]), np.quantile(errs[:, 2], 0.95), np.median(errs[:, 3]), np.quantile(errs[:, 3], 0.95)))
    print(f'{len(errs)} crops ({undetected} padded crops without a dlib face; the face lost after the transform in {lost}); '
          f'max |Δ|/IOD: jaw median {np.median(errs[:, 0]):.3f} p95 {np.quantile(errs[:, 0], 0.95):.3f}, '
          f'nose median {np.median(errs[:, 1]):.3f} p95 {np.quantile(errs[:, 1], 0.95):.3f}')
    assert (m.status == 'ok').mean() > 0.95 and len(errs) > 0.8 * len(m)
    assert np.median(errs[:, :2], axis=0).max() < OUTSIDE_TOL
