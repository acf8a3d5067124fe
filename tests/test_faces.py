"""faces: the hostile corpus through every variant, cross-checks of openface against an independent AlignDlib and of
mtcnn against facenet-pytorch's own `detect`, EXIF invariance, resumability after a kill, shards, the pool and the
drop report."""
import json, os, signal, struct, subprocess, sys, time, zlib
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image, ImageFile
from mugshotrace.core import load_rgb, sample_face_photos, dlib_model_path, package_data, UserError
from mugshotrace.faces.manifest import load_manifest, load_landmarks, merge_shards, drop_report, VARIANTS, MANIFEST_COLUMNS
from mugshotrace.faces.variants import output_name
from mugshotrace.faces.preprocess import preprocess_table, preprocess, PreprocessConfig, PreprocessResult

HOPPER = sample_face_photos()['grace_hopper']; ASTRONAUT = sample_face_photos()['astronaut']
EXIF_INVERSE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}

def _bomb_png(path, w=30000, h=30000):
    "A valid tiny PNG whose IHDR claims w x h pixels (beyond Pillow's decompression-bomb limit)."
    raw = zlib.compress(b'\x00\x00')
    def chunk(t, d): return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0)) +
                     chunk(b'IDAT', raw) + chunk(b'IEND', b''))

def make_hostile_corpus(d:Path, large_side=800):
    "Write the hostile corpus into `d/images`; return (table, expected status per variant kind)."
    im = d/'images'; im.mkdir(parents=True, exist_ok=True)
    g = Image.open(HOPPER).convert('RGB').resize((256, 300), Image.LANCZOS)
    rows, exp = [], {}   # exp: image_id -> (status for original/resized, status for openface/mtcnn)
    def add(iid, name, cpu, face): rows.append((iid, name)); exp[iid] = (cpu, face)
    g.save(im/'full.jpg', quality=92); data = (im/'full.jpg').read_bytes()
    (im/'truncated.jpg').write_bytes(data[:len(data) // 2]); add('truncated', 'truncated.jpg', 'decode_error', 'decode_error')
    (im/'empty.jpg').write_bytes(b''); add('empty', 'empty.jpg', 'decode_error', 'decode_error')
    (im/'text.jpg').write_text('this is not an image\n' * 20); add('text', 'text.jpg', 'decode_error', 'decode_error')
    g.save(im/'png_named.jpg', format='PNG'); add('png_named', 'png_named.jpg', 'ok', 'ok')
    g.convert('CMYK').save(im/'cmyk.jpg', quality=95); add('cmyk', 'cmyk.jpg', 'ok', 'ok')
    a16 = (np.asarray(g.convert('L'), np.uint16) * 257)
    Image.fromarray(a16).save(im/'gray16.png'); add('gray16', 'gray16.png', 'ok', 'ok')
    g.quantize(256).save(im/'palette.png'); add('palette', 'palette.png', 'ok', 'ok')
    rgba = g.convert('RGBA'); rgba.putalpha(200); rgba.save(im/'rgba.png'); add('rgba', 'rgba.png', 'ok', 'ok')
    g.convert('L').save(im/'gray.jpg', quality=95); add('gray', 'gray.jpg', 'ok', 'ok')
    for o, t in EXIF_INVERSE.items():
        s = g if t is None else g.transpose(t); ex = Image.Exif(); ex[0x0112] = o
        s.save(im/f'exif{o}.jpg', quality=98, subsampling=0, exif=ex.tobytes()); add(f'exif{o}', f'exif{o}.jpg', 'ok', 'ok')
    Image.new('RGB', (1, 1), (128, 128, 128)).save(im/'tiny.png'); add('tiny', 'tiny.png', 'too_small', 'too_small')
    _bomb_png(im/'bomb.png'); add('bomb', 'bomb.png', 'unsupported', 'unsupported')
    g.save(im/'ñandú 顔 face.jpg', quality=92); add('unicode', 'ñandú 顔 face.jpg', 'ok', 'ok')
    Image.new('RGB', (256, 300), (180, 180, 180)).save(im/'blank.png'); add('blank', 'blank.png', 'ok', 'no_face')
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 256, 3), dtype=np.uint8)).save(im/'noise.png'); add('noise', 'noise.png', 'ok', 'no_face')
    big = Image.open(HOPPER).convert('RGB'); big = big.resize((large_side * 512 // 600, large_side), Image.BICUBIC)
    big.save(im/'large.jpg', quality=90); add('large', 'large.jpg', 'ok', 'ok')
    add('missing', 'not_there.jpg', 'missing', 'missing')
    Image.open(ASTRONAUT).convert('RGB').save(im/'astronaut.png'); add('astronaut', 'astronaut.png', 'ok', 'ok')
    tab = pd.DataFrame(rows, columns=['image_id', 'path'])
    tab['group'] = ['A' if i % 2 else 'B' for i in range(len(tab))]
    tab.to_csv(d/'table.csv', index=False)
    return tab, exp

@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp('hostile'); tab, exp = make_hostile_corpus(d)
    return d, tab, exp

@pytest.fixture(scope='module')
def runs(corpus):
    "Every variant over the hostile corpus (small size to stay quick)."
    d, tab, _ = corpus
    bomb, trunc = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    out = {v: preprocess_table(d/'table.csv', d/'images', v, d/'out', size=64, batch_size=4, progress=False) for v in VARIANTS}
    assert Image.MAX_IMAGE_PIXELS == bomb and ImageFile.LOAD_TRUNCATED_IMAGES is trunc is False
    return out

@pytest.mark.parametrize('variant', VARIANTS)
def test_hostile_corpus_every_row_typed(corpus, runs, variant):
    d, tab, exp = corpus
    m = runs[variant]
    assert list(m.columns) == list(MANIFEST_COLUMNS) and list(m.image_id) == list(tab.image_id)
    want = {i: e[0 if variant in ('original', 'resized') else 1] for i, e in exp.items()}
    assert dict(zip(m.image_id, m.status)) == want
    assert (m.reason[m.status != 'ok'].str.len() > 5).all() and (m.reason[m.status == 'ok'] == '').all()
    lm = load_manifest(d/'out', variant)
    assert lm.drop(columns='file').astype(str).equals(m.astype(str).replace({'None': 'nan'}))
    for _, r in lm[lm.status == 'ok'].iterrows():
        w, h = Image.open(r.file).size
        assert (w, h) == ((r.src_width, r.src_height) if variant == 'original' else (64, 64))
    assert sorted(os.listdir(d/'out'/variant/'images')) == sorted(Path(f).name for f in lm.file.dropna())
    ok = m.set_index('image_id')
    if variant == 'openface':
        assert ok.loc['astronaut', 'n_faces'] == 2 and ok.loc['astronaut', 'runner_up_score'] < ok.loc['astronaut', 'det_score']
        assert ok.loc['astronaut', 'box_x2'] - ok.loc['astronaut', 'box_x1'] > 60
        assert ok.loc['cmyk', 'orig_mode'] == 'CMYK' and ok.loc['gray16', 'orig_mode'].startswith('I')
    if variant in ('openface', 'mtcnn'):
        k = 68 if variant == 'openface' else 5
        lms = load_landmarks(d/'out', variant)
        assert (lms.groupby('image_id').size() == k).all() and set(lms.image_id) == set(m.image_id[m.status == 'ok'])
        assert ((lms.out_x > -5) & (lms.out_x < 69) & (lms.out_y > -5) & (lms.out_y < 69)).all()

def test_eight_exif_orientations_jpeg(corpus, runs):
    "JPEG files (lossy, re-encoded per orientation): same frame, same landmarks up to JPEG noise."
    d, tab, _ = corpus
    for variant, tol in (('original', 1.5), ('mtcnn', 4.0)):
        m = load_manifest(d/'out', variant).set_index('image_id')
        ref = np.asarray(Image.open(m.loc['exif1', 'file']), float)
        for o in range(2, 9):
            assert m.loc[f'exif{o}', 'exif_orientation'] == o and m.loc[f'exif{o}', 'status'] == 'ok'
            a = np.asarray(Image.open(m.loc[f'exif{o}', 'file']), float)
            assert a.shape == ref.shape and np.abs(a - ref).mean() < tol, (variant, o, np.abs(a - ref).mean())
    for variant, tol in (('openface', 1.0), ('mtcnn', 0.5)):
        lm = load_landmarks(d/'out', variant).set_index('image_id')
        for o in range(2, 9):   # dlib landmarks are integers: JPEG noise moves some by one pixel
            assert np.abs(lm.loc[f'exif{o}', ['x', 'y']].to_numpy() - lm.loc['exif1', ['x', 'y']].to_numpy()).mean() < tol

def test_eight_exif_orientations_give_the_same_aligned_face(tmp_path):
    "Lossless files with the EXIF tag: every orientation gives bit-identical outputs in every variant."
    im = tmp_path/'img'; im.mkdir(); rows = []
    g = Image.open(HOPPER).convert('RGB').resize((200, 234), Image.LANCZOS)
    for o, t in EXIF_INVERSE.items():
        s = g if t is None else g.transpose(t); ex = Image.Exif(); ex[0x0112] = o
        s.save(im/f'o{o}.png', exif=ex.tobytes()); rows.append((f'o{o}', f'o{o}.png'))
    tab = pd.DataFrame(rows, columns=['image_id', 'path'])
    for v in VARIANTS:
        m = preprocess_table(tab, im, v, tmp_path/'out', size=48, batch_size=8, progress=False)
        assert (m.status == 'ok').all() and m.exif_orientation.tolist() == list(range(1, 9))
        assert m.src_width.nunique() == 1 and m.src_height.nunique() == 1
        outs = {f.read_bytes() for f in load_manifest(tmp_path/'out', v).file.map(Path)}
        if v != 'mtcnn': assert len(outs) == 1, v
        else:   # batched float convolutions: identical up to float noise
            arrs = [np.asarray(Image.open(f), float) for f in load_manifest(tmp_path/'out', v).file]
            assert max(np.abs(a - arrs[0]).max() for a in arrs) <= 2
    lm = load_landmarks(tmp_path/'out', 'openface')
    assert lm.groupby('point')[['x', 'y', 'out_x', 'out_y']].nunique().max().max() == 1

# ---------------------------------------------------------------- cross-checks
def independent_aligndlib(img, size, idx=(36, 45, 33)):
    "AlignDlib re-written from its description: dlib directly, the template CSV, skimage's affine and warp."
    import dlib
    from skimage.transform import AffineTransform, warp
    rects = dlib.get_frontal_face_detector()(img, 1)
    if len(rects) == 0: return None, None
    r = max(rects, key=lambda r: r.width() * r.height())
    pts = np.array([(p.x, p.y) for p in dlib.shape_predictor(str(dlib_model_path()))(img, r).parts()], float)
    t = pd.read_csv(package_data('openface_template.csv'), comment='#')[['x', 'y']].to_numpy(float)
    t = (t - t.min(0)) / (t.max(0) - t.min(0))
    if hasattr(AffineTransform, 'from_estimate'): tf = AffineTransform.from_estimate(pts[list(idx)], size * t[list(idx)])
    else: tf = AffineTransform(); assert tf.estimate(pts[list(idx)], size * t[list(idx)])
    return warp(img, tf.inverse, output_shape=(size, size), order=1, mode='constant', cval=0, preserve_range=True), pts

def _transformed_photos(d:Path, n=4):
    "Real photos (downscaled) under rotations and scalings (and synth images when the synth module exists)."
    import cv2
    d.mkdir(parents=True, exist_ok=True); rows = []
    for name, p in (('hopper', HOPPER), ('astronaut', ASTRONAUT)):
        a = Image.open(p).convert('RGB'); a = np.asarray(a.resize((a.width * 3 // 5, a.height * 3 // 5), Image.LANCZOS))
        for k, (ang, sc) in enumerate([(0, 1.0), (12, 0.8), (-9, 1.3), (20, 0.9)][:n]):
            h, w = a.shape[:2]; M = cv2.getRotationMatrix2D((w / 2, h / 2), ang, sc)
            Image.fromarray(cv2.warpAffine(a, M, (w, h), borderMode=cv2.BORDER_REFLECT)).save(d/f'{name}{k}.png')
            rows.append((f'{name}{k}', f'{name}{k}.png'))
    try:
        from mugshotrace.synth.benchmark import make_benchmark, SynthConfig
        sb = make_benchmark(d.parent/'synth', SynthConfig(people=2, seed=1), progress=False)
        lab = pd.read_csv(Path(sb)/'labels.csv', dtype={'image_id': str}).head(n)
        rows += [(f's_{i}', str((Path(sb)/p).resolve())) for i, p in zip(lab.image_id, lab.path)]
    except ImportError: pass
    return pd.DataFrame(rows, columns=['image_id', 'path'])

@pytest.mark.parametrize('anchors,idx,n', [('outer_eyes_and_nose', (36, 45, 33), 4), ('inner_eyes_and_bottom_lip', (39, 42, 57), 2)])
def test_openface_matches_independent_aligndlib(tmp_path, anchors, idx, n):
    tab = _transformed_photos(tmp_path/'img', n)
    m = preprocess_table(tab, tmp_path/'img', 'openface', tmp_path/'out', size=96, anchors=anchors, progress=False)
    man = load_manifest(tmp_path/'out', 'openface').set_index('image_id')
    lms = load_landmarks(tmp_path/'out', 'openface')
    n_ok = 0
    for iid, p in zip(tab.image_id, tab.path):
        src = Path(p) if Path(p).is_absolute() else tmp_path/'img'/p
        ref, pts = independent_aligndlib(load_rgb(src)[0], 96, idx)
        if ref is None: assert man.loc[iid, 'status'] == 'no_face'; continue
        n_ok += 1
        assert man.loc[iid, 'status'] == 'ok'
        np.testing.assert_allclose(lms[lms.image_id == iid][['x', 'y']].to_numpy(), pts)
        out = np.asarray(Image.open(man.loc[iid, 'file']), float)
        diff = np.abs(out - ref)
        assert diff.mean() < 0.6 and np.percentile(diff, 99) < 5, (iid, diff.mean(), np.percentile(diff, 99))
    assert n_ok >= 2 * n - 1

def test_mtcnn_boxes_equal_facenet_detect(corpus, runs):
    from facenet_pytorch import MTCNN
    d, tab, _ = corpus
    mt = MTCNN(select_largest=True, keep_all=True, device='cpu')
    m = load_manifest(d/'out', 'mtcnn').set_index('image_id'); lms = load_landmarks(d/'out', 'mtcnn')
    checked = 0
    for iid in m.index[m.status.isin(['ok', 'no_face']) & (m.index != 'large')]:   # 'large' only to save time
        img = Image.fromarray(load_rgb(d/'images'/tab.set_index('image_id').loc[iid, 'path'])[0])
        boxes, probs, points = mt.detect(img, landmarks=True)
        if boxes is None: assert m.loc[iid, 'status'] == 'no_face'; continue
        r = m.loc[iid]; checked += 1
        np.testing.assert_allclose([r.box_x1, r.box_y1, r.box_x2, r.box_y2], np.asarray(boxes[0], float), atol=0.05)
        assert abs(r.det_score - float(probs[0])) < 1e-4 and r.n_faces == len(boxes)
        np.testing.assert_allclose(lms[lms.image_id == iid][['x', 'y']].to_numpy(), np.asarray(points[0], float), atol=0.05)
    assert checked >= 15

# ---------------------------------------------------------------- scale: resume, shards, pool
def _small_set(d:Path, n=8):
    import cv2
    d.mkdir(parents=True, exist_ok=True); a = np.asarray(Image.open(HOPPER).convert('RGB').resize((200, 234))); rows = []
    for k in range(n):
        M = cv2.getRotationMatrix2D((100, 117), 4 * k - 14, 0.9 + 0.03 * k)
        Image.fromarray(cv2.warpAffine(a, M, (200, 234), borderMode=cv2.BORDER_REFLECT)).save(d/f'p{k}.png'); rows.append((f'p{k}', f'p{k}.png'))
    Image.new('RGB', (200, 234)).save(d/'black.png'); rows.append(('black', 'black.png'))
    return pd.DataFrame(rows, columns=['image_id', 'path'])

def _outputs(vdir):
    return {f.name: f.read_bytes() for f in sorted((vdir/'images').iterdir())}

def test_killed_run_resumes_to_the_same_result(tmp_path):
    tab = _small_set(tmp_path/'img', 10); tab.to_csv(tmp_path/'t.csv', index=False)
    ref = preprocess_table(tab, tmp_path/'img', 'openface', tmp_path/'ref', size=64, progress=False)
    cmd = [sys.executable, '-m', 'mugshotrace.cli', 'preprocess', '--images', str(tmp_path/'img'), '--table',
           str(tmp_path/'t.csv'), '--variant', 'openface', '--out', str(tmp_path/'run'), '--size', '64', '--quiet']
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    jr = tmp_path/'run'/'openface'/'.journal'/'shard-00000-of-00001.jsonl'
    t0 = time.time()
    while time.time() - t0 < 120 and p.poll() is None:
        if jr.exists() and len(jr.read_text().splitlines()) >= 3: break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    done = [json.loads(l)['image_id'] for l in jr.read_text().splitlines() if l.strip().endswith('}')]
    assert 3 <= len(done) < len(tab), 'the kill did not land midway'
    assert not (tmp_path/'run'/'openface'/'manifest.csv').exists()
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path/'run'/'openface'/'images').iterdir()}
    r = subprocess.run(cmd, capture_output=True, text=True); assert r.returncode == 0, r.stderr
    man = pd.read_csv(tmp_path/'run'/'openface'/'manifest.csv', dtype={'image_id': str})
    pd.testing.assert_frame_equal(man, pd.read_csv(tmp_path/'ref'/'openface'/'manifest.csv', dtype={'image_id': str}))
    assert _outputs(tmp_path/'run'/'openface') == _outputs(tmp_path/'ref'/'openface')
    assert (tmp_path/'run'/'openface'/'landmarks.csv').read_bytes() == (tmp_path/'ref'/'openface'/'landmarks.csv').read_bytes()
    after = {f.name: f.stat().st_mtime_ns for f in (tmp_path/'run'/'openface'/'images').iterdir()}
    for iid in done:                                   # finished images were skipped, not redone
        n = output_name(iid)
        if n in before: assert after[n] == before[n]
    assert not list((tmp_path/'run'/'openface'/'images').glob('.*.tmp'))

def test_changed_source_is_redone_and_stale_output_removed(tmp_path):
    tab = _small_set(tmp_path/'img', 2)
    m1 = preprocess_table(tab, tmp_path/'img', 'openface', tmp_path/'o', size=48, progress=False)
    assert m1.status.tolist() == ['ok', 'ok', 'no_face']
    Image.new('RGB', (200, 234), (90, 90, 90)).save(tmp_path/'img'/'p0.png')     # the face is gone
    m2 = preprocess_table(tab, tmp_path/'img', 'openface', tmp_path/'o', size=48, progress=False)
    assert m2.status.tolist() == ['no_face', 'ok', 'no_face'] and m2.attrs['counts']['resumed'] == 2
    assert not (tmp_path/'o'/'openface'/'images'/'p0.png').exists() and m2.src_sha256[0] != m1.src_sha256[0]
    with pytest.raises(UserError, match='other options'):
        preprocess_table(tab, tmp_path/'img', 'openface', tmp_path/'o', size=48, anchors='inner_eyes_and_bottom_lip', progress=False)

def test_shards_merge_to_the_single_run(tmp_path):
    tab = _small_set(tmp_path/'img', 6); tab.loc[len(tab)] = ['nope', 'nope.png']
    single = preprocess_table(tab, tmp_path/'img', 'resized', tmp_path/'a', size=32, progress=False)
    parts = [preprocess_table(tab, tmp_path/'img', 'resized', tmp_path/'b', size=32, shard=f'{i}/3', progress=False) for i in range(3)]
    assert sorted(sum((p.image_id.tolist() for p in parts), [])) == sorted(tab.image_id) and all(len(p) for p in parts)
    merged = load_manifest(tmp_path/'b', 'resized')            # the last shard merged automatically
    pd.testing.assert_frame_equal(merged.drop(columns='file'), load_manifest(tmp_path/'a', 'resized').drop(columns='file'))
    assert _outputs(tmp_path/'a'/'resized') == _outputs(tmp_path/'b'/'resized')
    (tmp_path/'b'/'resized'/'manifest.shard-00001-of-00003.csv').unlink()
    with pytest.raises(UserError, match='shards missing'): merge_shards(tmp_path/'b', 'resized', tab)

def test_pool_gives_the_same_outputs_as_one_process(tmp_path):
    tab = _small_set(tmp_path/'img', 6)
    one = preprocess_table(tab, tmp_path/'img', 'openface', tmp_path/'a', size=48, progress=False)
    two = preprocess_table(tab, tmp_path/'img', 'openface', tmp_path/'b', size=48, workers=2, progress=False)
    pd.testing.assert_frame_equal(one, two)
    assert _outputs(tmp_path/'a'/'openface') == _outputs(tmp_path/'b'/'openface')

def test_mtcnn_batches_equal_single_images(tmp_path):
    tab = _small_set(tmp_path/'img', 5)
    Image.open(HOPPER).convert('RGB').resize((150, 175)).save(tmp_path/'img'/'other_size.png'); tab.loc[len(tab)] = ['other', 'other_size.png']
    a = preprocess_table(tab, tmp_path/'img', 'mtcnn', tmp_path/'a', size=48, batch_size=1, margin=10, progress=False)
    b = preprocess_table(tab, tmp_path/'img', 'mtcnn', tmp_path/'b', size=48, batch_size=4, margin=10, progress=False)
    assert a.status.tolist() == ['ok'] * 5 + ['no_face', 'ok']
    pd.testing.assert_frame_equal(a.drop(columns=['det_score', 'runner_up_score', 'box_x1', 'box_y1', 'box_x2', 'box_y2']),
                                  b.drop(columns=['det_score', 'runner_up_score', 'box_x1', 'box_y1', 'box_x2', 'box_y2']))
    np.testing.assert_allclose(a[['box_x1', 'box_y1', 'box_x2', 'box_y2']].to_numpy(float), b[['box_x1', 'box_y1', 'box_x2', 'box_y2']].to_numpy(float), atol=0.05)

# ---------------------------------------------------------------- drop report and CLI
def test_drop_report_recovers_injected_drop_rates():
    rng = np.random.default_rng(3); n = 400
    tab = pd.DataFrame({'image_id': [f'i{k}' for k in range(n)], 'path': 'x', 'race': rng.choice(['Black', 'White'], n)})
    p_drop = np.where(tab.race == 'Black', 0.30, 0.05)          # injected: more faces of one group dropped
    st = np.where(rng.random(n) < p_drop, 'no_face', 'ok')
    man = pd.DataFrame({'image_id': tab.image_id, 'variant': 'openface', 'status': st})
    man2 = man.assign(variant='resized', status='ok')
    rep = drop_report([man, man2], tab, ['race'])
    of = rep[(rep.variant == 'openface') & (rep.status == 'no_face')].set_index('group')
    for g in ('Black', 'White'):
        sub = st[tab.race == g]
        assert of.loc[g, 'count'] == (sub == 'no_face').sum() and of.loc[g, 'n'] == len(sub)
        assert of.loc[g, 'ci_low'] < of.loc[g, 'share'] < of.loc[g, 'ci_high']
    assert of.loc['Black', 'ci_low'] > of.loc['White', 'ci_high'] and of.p_value_drop_vs_group.iloc[0] < 1e-6
    rs = rep[rep.variant == 'resized']
    assert set(rs.status) == {'ok'} and (rs.share == 1).all() and rs.p_value_drop_vs_group.isna().all()
    with pytest.raises(UserError, match='group column'): drop_report(man, tab, 'nope')

def test_cli_help_and_bad_input(tmp_path, corpus):
    r = subprocess.run([sys.executable, '-m', 'mugshotrace.cli', 'preprocess', '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and 'aspect ratio' in r.stdout.lower() and '--shard' in r.stdout
    d, tab, _ = corpus
    for extra, msg in ((['--shard', '3/3'], '0 <= I < N'), (['--size', '2'], 'size'), (['--images', str(tmp_path/'no')], 'images folder')):
        args = ['--images', str(d/'images'), '--table', str(d/'table.csv'), '--variant', 'resized', '--out', str(tmp_path/'o'), *extra]
        r = subprocess.run([sys.executable, '-m', 'mugshotrace.cli', 'preprocess', *args], capture_output=True, text=True)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and last.startswith('mugshotrace: error:') and msg in last and 'Traceback' not in r.stderr, r.stderr
    bad = tmp_path/'bad.csv'; pd.DataFrame({'id': [1]}).to_csv(bad, index=False)
    r = subprocess.run([sys.executable, '-m', 'mugshotrace.cli', 'preprocess', '--images', str(d/'images'), '--table', str(bad),
                        '--variant', 'original', '--out', str(tmp_path/'o')], capture_output=True, text=True)
    assert r.returncode == 2 and 'image_id' in r.stderr.strip().splitlines()[-1]

def test_cli_runs_and_writes_drop_report(tmp_path, corpus):
    d, tab, _ = corpus
    sub = tab[tab.image_id.isin(['cmyk', 'blank', 'text', 'missing', 'exif6'])]; sub.to_csv(tmp_path/'t.csv', index=False)
    r = subprocess.run([sys.executable, '-m', 'mugshotrace.cli', 'preprocess', '--images', str(d/'images'), '--table', str(tmp_path/'t.csv'),
                        '--variant', 'resized', '--out', str(tmp_path/'o'), '--size', '40', '--resize-method', 'pad',
                        '--group-cols', 'group', '--quiet'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path/'o', 'resized'); assert len(m) == 5 and (m.status == 'ok').sum() == 3
    rep = pd.read_csv(tmp_path/'o'/'resized'/'drop_report.csv')
    assert set(rep.group) == {'A', 'B'} and np.isclose(rep.groupby('group').share.sum(), 1).all()

@pytest.mark.slow
def test_very_large_photo_every_variant(tmp_path):
    im = tmp_path/'img'; im.mkdir()
    Image.open(HOPPER).convert('RGB').resize((3413, 4000), Image.BICUBIC).save(im/'huge.jpg', quality=90)
    tab = pd.DataFrame({'image_id': ['huge'], 'path': ['huge.jpg']})
    for v in VARIANTS:
        m = preprocess_table(tab, im, v, tmp_path/'o', size=64, progress=False)
        assert m.status.tolist() == ['ok'], (v, m.reason.tolist())


def test_pool_workers_inherit_dlib_models():
    """Workers of the package's process pools fork from a server that has loaded dlib's models (`pool_preload`), so
    none spends a second loading its own 100 MB copy."""
    from mugshotrace.core import process_pool_context
    from mugshotrace.faces.landmarks import dlib_models_loaded
    ctx = process_pool_context()
    if ctx.get_start_method() != 'forkserver': pytest.skip('no fork server on this platform: workers load the models themselves')
    with ctx.Pool(2) as pool:
        assert [pool.apply(dlib_models_loaded) for _ in range(4)] == [True] * 4


# ---------------------------------------------------------------- a dying pool worker; owner-only crops
KILL_ENV = 'MUGSHOTRACE_TEST_KILL_WORKER_ON'   # read only in pool workers (faces.pool._pool_row); set only here

def _journal(vdir):
    return [json.loads(l) for l in (vdir/'.journal'/'shard-00000-of-00001.jsonl').read_text().splitlines() if l.strip()]

@pytest.mark.parametrize('once', [False, True])
def test_dead_worker_is_recorded_retried_and_never_hangs(tmp_path, once):
    "A pool worker SIGKILLed on one image: the job ends (bounded), the image is journaled, retried once, never dropped."
    tab = _small_set(tmp_path/'img', 5); tab.to_csv(tmp_path/'t.csv', index=False)
    ref = preprocess_table(tab, tmp_path/'img', 'resized', tmp_path/'ref', size=32, progress=False)
    flag = tmp_path/'killed-once'
    env = dict(os.environ, **{KILL_ENV: 'p3' + (f'@{flag}' if once else '')})
    cmd = [sys.executable, '-m', 'mugshotrace.cli', 'preprocess', '--images', str(tmp_path/'img'), '--table', str(tmp_path/'t.csv'),
           '--variant', 'resized', '--out', str(tmp_path/'run'), '--size', '32', '--workers', '2', '--quiet']
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)   # a hang fails here
    assert r.returncode == 0, r.stderr
    vdir = tmp_path/'run'/'resized'; man = load_manifest(tmp_path/'run', 'resized').set_index('image_id')
    assert list(man.index) == list(tab.image_id)                        # one row per table row, nothing dropped
    interim = [j for j in _journal(vdir) if j.get('retry_pending')]
    assert [j['image_id'] for j in interim] and 'p3' in [j['image_id'] for j in interim]
    assert all(j['status'] == 'error' and 'worker process died' in j['reason'] for j in interim)
    others = load_manifest(tmp_path/'ref', 'resized').set_index('image_id').drop(index='p3', columns='file')
    pd.testing.assert_frame_equal(man.drop(columns='file').drop(index='p3'), others, check_dtype=False)   # innocent suspects redone
    if once:                                                            # the retry in a fresh worker succeeded
        assert flag.exists() and man.loc['p3', 'status'] == 'ok'
        assert _outputs(vdir) == _outputs(tmp_path/'ref'/'resized')
    else:
        assert man.loc['p3', 'status'] == 'error' and 'died' in man.loc['p3', 'reason'] and 'twice' in man.loc['p3', 'reason']
        assert not (vdir/'images'/'p3.png').exists()
    assert not list((vdir/'images').glob('.*.tmp'))                    # no write cut by the killed pool is left
    n = len(_journal(vdir))                                             # a rerun redoes nothing
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180); assert r.returncode == 0, r.stderr
    assert len(_journal(vdir)) == n
    pd.testing.assert_frame_equal(load_manifest(tmp_path/'run', 'resized').set_index('image_id'), man)

def test_run_pool_finishes_and_a_pending_retry_is_not_resumed(tmp_path):
    "`run_pool` returns every record; an interim record (killed between a worker's death and the retry) is redone."
    from mugshotrace.faces.pool import run_pool, _pool_row
    from mugshotrace.faces.variants import FaceOptions
    tab = _small_set(tmp_path/'img', 3)
    tasks = [dict(image_id=i, src=str(tmp_path/'img'/p), dst=str(tmp_path/'o'/f'{i}.png'), opts=FaceOptions('resized', size=16),
                  prior=None, private=True) for i, p in zip(tab.image_id, tab.path)]
    got, notes = [], []
    run_pool(tasks, 2, got.append, notes.append)
    assert sorted(r['image_id'] for r in got) == sorted(tab.image_id) and not notes and all(r['status'] in ('ok', 'no_face') for r in got)
    pending = dict(got[0], status='error', retry_pending=True)           # a kill between the death and the retry
    t = dict(tasks[[x['image_id'] for x in tasks].index(got[0]['image_id'])], prior=pending)
    assert _pool_row(t).get('_resumed') is None                         # redone, not resumed

def _mode(f): return os.stat(f).st_mode & 0o777

def test_face_crops_are_owner_only_unless_synthetic_or_shareable(tmp_path):
    from mugshotrace.core import mark_synthetic, _UMASK
    shareable = 0o666 & ~_UMASK
    if shareable == 0o600: pytest.skip('the umask already makes every file owner-only')
    tab = _small_set(tmp_path/'real', 2)
    for variant in ('resized', 'mtcnn'):
        preprocess_table(tab, tmp_path/'real', variant, tmp_path/'o', size=32, progress=False)
        files = load_manifest(tmp_path/'o', variant).file.dropna().tolist(); assert files
        assert {_mode(f) for f in files} == {0o600}, variant               # real data: owner-only by default
    preprocess_table(tab, tmp_path/'real', 'resized', tmp_path/'o', size=32, private=False, progress=False)   # resumed, widened
    assert {_mode(f) for f in load_manifest(tmp_path/'o', 'resized').file.dropna()} == {shareable}
    syn = _small_set(tmp_path/'bench'/'images', 2); mark_synthetic(tmp_path/'bench'/'images')
    preprocess_table(syn, tmp_path/'bench'/'images', 'resized', tmp_path/'so', size=32, progress=False)
    assert {_mode(f) for f in load_manifest(tmp_path/'so', 'resized').file.dropna()} == {shareable}   # the marked benchmark
    tab.to_csv(tmp_path/'t.csv', index=False)
    base = [sys.executable, '-m', 'mugshotrace.cli', 'preprocess', '--images', str(tmp_path/'real'), '--table', str(tmp_path/'t.csv'),
            '--variant', 'resized', '--size', '32', '--quiet']
    for extra, want in ((['--workers', '2'], 0o600), (['--shareable-permissions'], shareable)):   # pool workers too
        out = tmp_path/('cli' + str(len(extra)))
        r = subprocess.run(base + ['--out', str(out), *extra], capture_output=True, text=True, timeout=180); assert r.returncode == 0, r.stderr
        assert {_mode(f) for f in load_manifest(out, 'resized').file.dropna()} == {want}, extra


def test_front_door_and_the_older_call_agree(tmp_path):
    "`preprocess(table, out, PreprocessConfig(...))` makes the same manifest as `preprocess_table`, and returns a `PreprocessResult`."
    tab = _small_set(tmp_path/'img', 3); tab.to_csv(tmp_path/'img'/'t.csv', index=False)
    ref = preprocess_table(tab, tmp_path/'img', 'resized', tmp_path/'a', size=32, progress=False)
    res = preprocess(tmp_path/'img'/'t.csv', tmp_path/'b', PreprocessConfig(variant='resized', size=32), progress=False)
    assert isinstance(res, PreprocessResult) and res.path == tmp_path/'b'/'resized' and res.n == len(tab)
    pd.testing.assert_frame_equal(load_manifest(tmp_path/'b', 'resized').drop(columns='file'), load_manifest(tmp_path/'a', 'resized').drop(columns='file'))
    assert res.to_dict()['manifest'] == str(tmp_path/'b'/'resized'/'manifest.csv')
    old = preprocess(tab, tmp_path/'img', 'resized', tmp_path/'c', size=32, progress=False)   # the older signature still works
    pd.testing.assert_frame_equal(old, ref)

def test_cli_takes_the_common_options(tmp_path):
    "`preprocess` accepts --no-progress (and still --quiet); its flags' defaults are `PreprocessConfig`'s."
    tab = _small_set(tmp_path/'img', 2); tab.to_csv(tmp_path/'t.csv', index=False)
    for flag in ('--no-progress', '--quiet'):
        r = subprocess.run([sys.executable, '-m', 'mugshotrace.cli', 'preprocess', '--images', str(tmp_path/'img'), '--table', str(tmp_path/'t.csv'),
                            '--variant', 'resized', '--size', '24', '--out', str(tmp_path/'o'), flag], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        assert 'resized: 3 rows' in r.stdout and 'preprocess resized' not in r.stderr   # no progress bar
