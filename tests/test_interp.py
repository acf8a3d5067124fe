"Integration and cross-check tests of `mugshotrace.interp.gradcam`, `mugshotrace.interp.regions` and `mugshotrace.interp.explain`."
import hashlib, json, os
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch

from mugshotrace.core import load_rgb, sample_face_photos, write_csv, write_json
from mugshotrace.interp.gradcam import Explainer, guided_copy, load_inputs, FunctionalReLUError
from mugshotrace.interp.explain import best_worst
from mugshotrace.interp.regions import REGIONS, frame_landmarks, region_map, region_shares, region_differences
from mugshotrace.train.models import ARCHS, build_model, save_bundle

FAST_ARCHS = ('tiny_cnn', 'resnet18')

def _model(name, seed=0):
    return build_model(name, 2, 'random', seed=seed).eval()

def _size(name): return max(ARCHS[name].min_size, 64)

def _corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))

# ---------------------------------------------------------------- Grad-CAM vs pytorch-grad-cam
def _gradcam_crosscheck(name, n=3):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    torch.manual_seed(1)
    m, spec = _model(name), ARCHS[name]
    x = torch.randn(n, 3, _size(name), _size(name))
    ours = Explainer(m, spec.cam_layer)(x, methods=('gradcam',))
    with GradCAM(m, [spec.cam_layer(m)]) as cam:
        ref = cam(x, targets=[ClassifierOutputTarget(int(t)) for t in ours.target])
    assert ref.shape == ours.gradcam.shape
    checked = 0
    for a, b in zip(ours.gradcam, ref):
        if a.std() == 0 or b.std() == 0:          # a random-init CAM can be zero everywhere: both must agree
            assert a.std() == 0 and b.max() - b.min() < 1e-6; continue
        assert _corr(a, b) > 0.99; checked += 1
    assert checked >= 1

@pytest.mark.parametrize('name', FAST_ARCHS)
def test_gradcam_matches_pytorch_grad_cam_fast(name): _gradcam_crosscheck(name)

@pytest.mark.slow
@pytest.mark.parametrize('name', ('resnet50', 'vgg19_bn', 'densenet161'))
def test_gradcam_matches_pytorch_grad_cam(name): _gradcam_crosscheck(name)

# ---------------------------------------------------------------- batched == per image, every architecture
def _batched_equals_single(name):
    torch.manual_seed(2)
    m = _model(name); s = _size(name); x = torch.randn(3, 3, s, s)
    ex = Explainer(m, ARCHS[name].cam_layer)
    a = ex(x)
    for i in range(3):
        o = ex(x[i:i + 1], int(a.target[i]))
        for k in ('gradcam', 'guided_backprop', 'guided_gradcam'):
            np.testing.assert_allclose(getattr(a, k)[i], getattr(o, k)[0], rtol=1e-4, atol=1e-6 * max(1e-12, np.abs(getattr(a, k)).max()) + 1e-9)
    # guidance is really applied: guided backprop differs from the plain input gradient
    xx = x.clone().requires_grad_(True); ex.model(xx)[torch.arange(3), torch.as_tensor(a.target)].sum().backward()
    g = xx.grad.numpy(); assert np.abs(a.guided_backprop - g).max() > 1e-2 * np.abs(g).max() > 0   # scale-free: random-init grads can be ~1e-14
    assert a.gradcam.shape == (3, s, s) and a.guided_backprop.shape == (3, 3, s, s)

@pytest.mark.parametrize('name', FAST_ARCHS)
def test_guided_backprop_batched_fast(name): _batched_equals_single(name)

@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(set(ARCHS) - set(FAST_ARCHS)))
def test_guided_backprop_batched_every_arch(name): _batched_equals_single(name)

def test_every_registered_arch_is_guidable():
    "No registered architecture calls a functional ReLU that guided backprop would silently skip."
    for name in FAST_ARCHS: guided_copy(_model(name), torch.randn(1, 3, _size(name), _size(name)))

def test_autocast_and_low_precision_are_ignored():
    "A bfloat16 model explained under autocast gives the float32 maps of the same weights."
    torch.manual_seed(3)
    m = _model('tiny_cnn').to(torch.bfloat16); x = torch.randn(2, 3, 64, 64)
    ref = Explainer(m.float(), ARCHS['tiny_cnn'].cam_layer)(x)
    m = m.to(torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        got = Explainer(m, ARCHS['tiny_cnn'].cam_layer)(x)
    assert got.gradcam.dtype == np.float32
    np.testing.assert_allclose(got.gradcam, ref.gradcam, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.guided_backprop, ref.guided_backprop, rtol=1e-4, atol=1e-7)

def test_functional_relu_is_named():
    class Block(torch.nn.Module):
        def __init__(self): super().__init__(); self.conv = torch.nn.Conv2d(3, 4, 3)
        def forward(self, x): return torch.relu(self.conv(x))
    m = torch.nn.Sequential(Block(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(FunctionalReLUError, match="'0'.*Block"):
        Explainer(m, '0.conv', example=torch.randn(1, 3, 16, 16))

# ---------------------------------------------------------------- region shares: properties
@pytest.mark.parametrize('seed', range(5))
def test_region_shares_partition_under_similarity(seed):
    "Masks partition any image; indicator maps give share 1 to their own region, after any similarity transform."
    rng = np.random.default_rng(seed)
    ang, sc, t = rng.uniform(-0.3, 0.3), rng.uniform(0.6, 1.2), rng.uniform(-10, 10, 2)
    R = sc * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    lm = (frame_landmarks(96) - 48) @ R.T + 48 + t
    rm = region_map(lm, (96, 96))
    for i, r in enumerate(REGIONS):
        if (rm == i).any():
            assert region_shares((rm == i).astype(float), lm)[r].iloc[0] == pytest.approx(1.0)
    s = region_shares(rng.random((3, 96, 96)), np.stack([lm] * 3))
    np.testing.assert_allclose(s.sum(axis=1), 1.0)

@pytest.mark.parametrize('seed', range(5))
def test_fine_regions_partition_the_face(seed):
    """The nine regions partition the image; the eight facial ones partition exactly the face hull (nothing of the face
    is left as background, nothing outside it is facial); each is non-empty and keeps its anatomy after a similarity
    transform; the coarse regions are sums of the fine ones."""
    import cv2
    from mugshotrace.faces.landmarks import face_hull
    from mugshotrace.interp.regions import COARSE_REGIONS, coarse_shares
    rng = np.random.default_rng(seed)
    ang, sc, t = rng.uniform(-0.3, 0.3), rng.uniform(0.6, 1.2), rng.uniform(-10, 10, 2)
    R = sc * np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    lm = (frame_landmarks(128) - 64) @ R.T + 64 + t
    rm = region_map(lm, (128, 128))
    assert set(np.unique(rm)) == set(range(len(REGIONS)))                            # every region is there
    hull = np.zeros((128, 128), np.uint8)
    cv2.fillPoly(hull, [np.round(face_hull(lm) * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    face = rm != REGIONS.index('hair_background')
    assert (face == hull.astype(bool)).mean() > 0.999                                 # facial regions = the face hull (up to edge pixels)
    at = lambda p: REGIONS[rm[int(round(p[1])), int(round(p[0]))]]
    assert at(lm[30]) == 'lower_nose' and at(lm[28]) == 'mid_nose' and at(lm[[62, 66]].mean(0)) == 'mouth'
    assert at(lm[[1, 40]].mean(0)) == 'upper_cheekbone' and at(lm[[5, 57]].mean(0)) == 'jaw'
    s = region_shares(rng.random((2, 128, 128)), np.stack([lm, lm]))
    np.testing.assert_allclose(s.sum(axis=1), 1.0)
    np.testing.assert_allclose(coarse_shares(s)[list(COARSE_REGIONS)].sum(axis=1), 1.0)
    assert sorted(r for parts in COARSE_REGIONS.values() for r in parts) == sorted(REGIONS)   # the coarse map covers each fine region once

# ---------------------------------------------------------------- best / worst
def test_best_worst_against_bruteforce():
    rng = np.random.default_rng(0); n = 200
    p = rng.random(n); lab = rng.choice(['Black', 'White'], n)
    preds = pd.DataFrame({'image_id': [f'i{i:03d}' for i in range(n)], 'Black_Prob': p, 'White_Prob': 1 - p, 'label': lab})
    preds['Prediction'] = np.where(p > 0.5, 'Black', 'White')
    bw = best_worst(preds, k=5)
    conf = np.maximum(p, 1 - p); ok = preds['Prediction'] == lab
    assert list(bw[bw.kind == 'best'].image_id) == list(preds.image_id[ok].iloc[np.argsort(-conf[ok], kind='stable')][:5])
    assert list(bw[bw.kind == 'worst'].image_id) == list(preds.image_id[~ok].iloc[np.argsort(-conf[~ok], kind='stable')][:5])

# ---------------------------------------------------------------- `mugshotrace explain` on a CPU-scale run
def _toy_run(tmp: Path, n_per=5, size=96):
    "A real (untrained tiny_cnn) run folder over OpenFace-aligned versions of the two bundled face photos."
    from mugshotrace.faces.align import align_openface
    faces = tmp/'faces'; vdir = faces/'openface'; (vdir/'images').mkdir(parents=True)
    rng = np.random.default_rng(0); man, lms, meta = [], [], []
    for g, (k, p) in zip(('A', 'B'), sample_face_photos().items()):
        fc = align_openface(load_rgb(p)[0], size)
        for j in range(n_per):
            iid = f'{g}{j}'
            im = np.clip(fc.image.astype(float) * rng.uniform(0.7, 1.3) + rng.normal(0, 8, fc.image.shape), 0, 255).astype(np.uint8)
            from PIL import Image; Image.fromarray(im).save(vdir/'images'/f'{iid}.png')
            man.append(dict(image_id=iid, variant='openface', status='ok', reason='', out_path=f'images/{iid}.png'))
            lms += [dict(image_id=iid, point=q, x=a[0], y=a[1], out_x=b[0], out_y=b[1]) for q, (a, b) in enumerate(zip(fc.landmarks, fc.landmarks_out))]
            meta.append((iid, g))
    write_csv(vdir/'manifest.csv', pd.DataFrame(man)); write_csv(vdir/'landmarks.csv', pd.DataFrame(lms))
    run = tmp/'runs'/'toy'; model = _model('tiny_cnn')
    save_bundle(model, run, dict(arch='tiny_cnn', classes=['Black', 'White'], input_size=64, variant='openface'))
    write_json(run/'config.json', dict(run_id='toy', arch='tiny_cnn', variant='openface', label_source='student', faces=str(faces)))
    spec = ARCHS['tiny_cnn']
    x, _ = load_inputs([vdir/'images'/f'{i}.png' for i, _ in meta], 64, spec.mean, spec.std)
    inv = torch.tensor([g == 'B' for _, g in meta])          # scenario B was evaluated upside down (the `invert` axis)
    x = torch.where(inv[:, None, None, None], x.flip(-2, -1), x)
    with torch.no_grad(): pr = model(x).softmax(1).numpy()
    df = pd.DataFrame({'image_id': [i for i, _ in meta], 'Black_Prob': pr[:, 0], 'White_Prob': pr[:, 1]})
    df['Prediction'] = np.where(pr[:, 0] >= pr[:, 1], 'Black', 'White')
    df['group'] = [g for _, g in meta]; df['race'] = df['group'].map({'A': 'White', 'B': 'Black'})
    df['label'] = np.where(np.arange(len(df)) % 3 == 0, df['Prediction'], np.where(df['Prediction'] == 'Black', 'White', 'Black'))
    for g, d in df.groupby('group'):
        write_csv(run/'preds'/f'student__{g}.csv', d); write_json(run/'preds'/f'student__{g}.json', {'inverted': g == 'B'})
    return run, df

def test_explain_cli_end_to_end(tmp_path):
    from mugshotrace.cli import main
    run, df = _toy_run(tmp_path)
    out = tmp_path/'ex'
    faces = ['--faces', str(tmp_path/'faces')]   # a run outside a study: the preprocessing root is given
    assert main(['explain', str(run), '--out', str(out), '--k', '2', '--bs', '4'] + faces) == 0
    for ds in ('student__A', 'student__B'):
        assert (out/'figures'/'best_worst'/f'{ds}.png').stat().st_size > 1000
    bw = pd.read_csv(out/'best_worst.csv', dtype={'image_id': str})
    want = pd.concat([best_worst(d, 2) for _, d in df.groupby('group')])
    assert list(bw.image_id) == list(want.image_id) and set(bw.kind) == {'best', 'worst'}
    sh = pd.read_csv(out/'region_shares.csv', dtype={'image_id': str})
    assert len(sh) == len(df) and sh['has_landmarks'].all()
    np.testing.assert_allclose(sh[list(REGIONS)].sum(axis=1), 1.0, atol=1e-6)
    rd = pd.read_csv(out/'region_differences.csv')
    assert set(rd.attribute) == {'group', 'race'} and len(rd) == 2 * len(REGIONS)
    assert ((rd.ci_low <= rd['diff']) & (rd['diff'] <= rd.ci_high)).all()
    fa = pd.read_csv(out/'faithfulness.csv'); assert set(fa.group) >= {'A', 'B'} and fa['n'].eq(5).all()
    for attr in ('group', 'race'): assert (out/'figures'/f'regions_by_{attr}.png').exists()
    info = json.loads((out/'explain.json').read_text())
    assert info['show_faces'] is False and info['synthetic'] is False and info['images_without_landmarks'] == 0
    # resumable: a second run redoes nothing that is finished
    stamp = {p: p.stat().st_mtime_ns for p in (out/'figures'/'best_worst').glob('*.png')} | {p: p.stat().st_mtime_ns for p in (out/'regions').glob('*.csv')}
    assert main(['explain', str(run), '--out', str(out), '--k', '2', '--bs', '4'] + faces) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())

def _sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()

def test_explain_cache_is_keyed_on_settings_and_privacy_fails_closed(tmp_path, monkeypatch):
    """Changed --show-faces, --k, --seed or package version recompute (an unblurred figure never survives a rerun without
    --show-faces); synthetic only by the study record (not truth files or config guesses); opt-in real faces owner-only."""
    import stat
    import mugshotrace
    from PIL import Image
    from mugshotrace.cli import main
    from mugshotrace.core import registered_figures, mark_synthetic, write_study_record, PRIVATE_FILE_MODE
    run, _ = _toy_run(tmp_path)
    cfg = json.loads((run/'config.json').read_text()); cfg['synthetic'] = True; write_json(run/'config.json', cfg)  # a guess: ignored
    (tmp_path/'truth.json').write_text('{}'); (run.parent/'truth.json').write_text('{}')                           # means nothing
    out, fig = tmp_path/'ex', tmp_path/'ex'/'figures'/'best_worst'/'student__A.png'
    base = ['explain', str(run), '--out', str(out), '--bs', '4', '--no-faithfulness', '--max-images', '3', '--faces', str(tmp_path/'faces')]
    assert main(base) == 0
    info = json.loads((out/'explain.json').read_text()); blurred = _sha(fig)
    assert info['synthetic'] is False and info['show_faces'] is False
    figs = registered_figures(out).set_index('file')
    assert figs.loc[str(fig), 'may_show_face'] and not figs.loc[str(out/'figures'/'regions_by_group.png'), 'may_show_face']
    assert main(base + ['--show-faces']) == 0                         # opt-in: another figure, owner-only
    shown = _sha(fig); assert shown != blurred and stat.S_IMODE(fig.stat().st_mode) == PRIVATE_FILE_MODE
    assert json.loads((out/'explain.json').read_text())['show_faces'] is True
    assert main(base) == 0                                            # back to the default: the unblurred figure is gone
    assert _sha(fig) == blurred and json.loads((out/'explain.json').read_text())['show_faces'] is False
    assert (registered_figures(out).status == 'ok').all()
    h1, reg = Image.open(fig).size[1], out/'regions'/'student__A.csv'; t = reg.stat().st_mtime_ns
    assert main(base + ['--k', '2', '--seed', '3']) == 0              # more rows per figure, another sample
    assert Image.open(fig).size[1] > h1 and reg.stat().st_mtime_ns != t
    # the key covers the package version (and the weights, predictions and images)
    from mugshotrace.interp.explain import explain_inputs, ExplainConfig
    from mugshotrace.config import StageCache
    from mugshotrace.study.folder import Run
    cache, inputs = StageCache(out, 'explain'), explain_inputs(Run.open(run), {'weights_sha256': 'a'}, {'x': 'y'})
    k0 = cache.key(ExplainConfig(k=1), **inputs)
    assert cache.key(ExplainConfig(k=2), **inputs) != k0
    monkeypatch.setattr(mugshotrace, '__version__', '999.0')
    assert cache.key(ExplainConfig(k=1), **inputs) != k0
    monkeypatch.undo()
    # the study record of a marked benchmark makes it synthetic: faces shown, figures not owner-only
    bench = tmp_path/'bench'; (bench/'images').mkdir(parents=True); mark_synthetic(bench); mark_synthetic(bench/'images')
    write_study_record(tmp_path, 'toy', bench/'labels.csv', bench/'images', tmp_path/'faces')
    assert main(base) == 0
    info = json.loads((out/'explain.json').read_text())
    assert info['synthetic'] is True and info['show_faces'] is True and stat.S_IMODE(fig.stat().st_mode) != PRIVATE_FILE_MODE

def test_explain_bad_input(tmp_path, capsys):
    from mugshotrace.cli import main
    assert main(['explain', str(tmp_path/'nope')]) == 2
    assert 'not a run folder' in capsys.readouterr().err

# ---------------------------------------------------------------- spurious cue on the synth benchmark
def _train_tiny(x, y, seed, epochs=8, lr=2e-3):
    "Plain full-batch-shuffled Adam training of `tiny_cnn` from random init (CPU, seconds)."
    import torch.nn.functional as F
    m = build_model('tiny_cnn', 2, 'random', seed=seed)
    opt = torch.optim.Adam(m.parameters(), lr); g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        m.train()
        for idx in torch.randperm(len(x), generator=g).split(32):
            loss = F.cross_entropy(m(x[idx]), y[idx]); opt.zero_grad(); loss.backward(); opt.step()
    return m.eval()

@pytest.mark.slow
def test_spurious_cue_gets_more_saliency(tmp_path):
    """A model trained with a placard cue that always marks 'White' puts significantly more Grad-CAM mass on the
    placard than the same model trained on the same images without the cue (person-disjoint held-out images)."""
    from scipy import stats
    from mugshotrace.interp.regions import mask_share
    synth = pytest.importorskip('mugshotrace.synth.benchmark')
    base = dict(people=150, seed=5, width=96, height=120)
    b = synth.make_benchmark(tmp_path/'biased', synth.SynthConfig(cue_class='White', cue_rate=1.0, cue_rate_other=0.0, cue_kind='placard', **base), progress=False)
    c = synth.make_benchmark(tmp_path/'clean', synth.SynthConfig(**base), progress=False)
    truth = synth.load_truth(b).set_index('image_id')
    labels = pd.read_csv(b/'labels.csv', dtype={'image_id': str, 'person_id': str})
    ids = list(labels.image_id)
    people = labels.person_id.unique(); rng = np.random.default_rng(0)
    held = labels.person_id.isin(rng.choice(people, len(people) // 3, replace=False)).to_numpy()
    spec, S = ARCHS['tiny_cnn'], 64
    xb, ib = load_inputs([b/p for p in labels.path], S, spec.mean, spec.std)
    xc, ic = load_inputs([c/p for p in labels.path], S, spec.mean, spec.std)
    y = torch.as_tensor((truth.loc[ids, 'race'] == 'White').to_numpy().astype(int))
    cue = truth.loc[ids, 'cue'].to_numpy(bool)
    assert (cue == (y.numpy() == 1)).all()
    # the cue region of each image: where the cue render differs from the same render without the cue
    masks = np.abs(ib.astype(int) - ic.astype(int)).sum(-1) > 60
    assert not masks[~cue].any() and masks[cue].mean() < 0.25
    biased, clean = _train_tiny(xb[~held], y[~held], 0), _train_tiny(xc[~held], y[~held], 0)
    sel = held & cue
    sb = Explainer(biased, spec.cam_layer)(xb[sel], target=1, methods=('gradcam',)).gradcam
    sc = Explainer(clean, spec.cam_layer)(xb[sel], target=1, methods=('gradcam',)).gradcam
    share_b, share_c = mask_share(sb, masks[sel]), mask_share(sc, masks[sel])
    ok = ~np.isnan(share_b) & ~np.isnan(share_c); d = share_b[ok] - share_c[ok]
    print(f'cue area {masks[sel].mean():.3f}; share on cue: biased {share_b[ok].mean():.3f}, clean {share_c[ok].mean():.3f}, n={ok.sum()}')
    assert ok.sum() >= 20
    assert d.mean() > 0 and stats.wilcoxon(d, alternative='greater').pvalue < 0.01
    boot = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(2000)])
    assert np.quantile(boot, 0.025) > 0

# ---------------------------------------------------------------- a real run of the grid runner on the synth benchmark
@pytest.mark.slow
def test_explain_on_a_synth_study_run(tmp_path):
    "synth → openface preprocessing → one tiny_cnn run of `run_grid` → `mugshotrace explain --study`: figures and charts."
    import yaml
    from mugshotrace.cli import main
    from mugshotrace.study.grid import run_grid, load_study
    synth = pytest.importorskip('mugshotrace.synth.benchmark')
    bench = synth.make_benchmark(tmp_path/'bench', synth.SynthConfig(people=40, seed=2, width=240, height=300), progress=False)
    cols = {'court': {'race': 'race_court', 'ethnicity': 'ethnicity_court'}, 'student': {'race': 'race_student', 'ethnicity': 'ethnicity_student'}}
    study = {'name': 'mini', 'data': {'labels': {'table': str(bench/'labels.csv'), 'columns': cols}, 'images': str(bench),
                                      'preprocessed': str(tmp_path/'faces'), 'preprocess': {'size': 96, 'progress': False}, 'truth': str(bench)},
             'train': {'epochs': 1, 'size': 64, 'bs': 8, 'n_per_class': 6, 'init': 'random', 'aug': False},
             'grid': {'arch': ['tiny_cnn'], 'variant': ['openface'], 'label_source': ['student']}, 'runs': str(tmp_path/'runs')}
    sp = tmp_path/'study.yaml'; sp.write_text(yaml.safe_dump(study))
    df = run_grid(sp, progress=False); assert (df.state == 'done').all(), df
    run = Path(load_study(sp).runs_root)/df.run_id[0]
    assert main(['explain', str(run), '--study', str(sp), '--max-images', '8']) == 0
    out = run/'explain'; tests = [p.stem for p in (run/'preds').glob('*.csv') if p.stem != 'valid']
    bw = pd.read_csv(out/'best_worst.csv')
    assert len(tests) >= 2 and set(bw.dataset) <= set(tests)
    assert all((out/'figures'/'best_worst'/f'{t}.png').exists() for t in set(bw.dataset))
    assert (out/'figures'/'regions_by_group.png').exists() and (out/'region_differences.csv').exists()
    info = json.loads((out/'explain.json').read_text())
    assert info['synthetic'] is True and info['show_faces'] is True            # synthetic faces may be shown
    sh = pd.read_csv(out/'region_shares.csv'); assert sh['has_landmarks'].mean() > 0.9
