"DataLoaders per run: four preprocessing variants × two architectures with different statistics."
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from mugshotrace.core import sample_face_photos, UserError
from mugshotrace.train.data import items_from, face_dataloaders, arch_stats
from mugshotrace.train import data as mdata  # (test_dl imported bare would be collected by pytest)
from mugshotrace.labels.tables import race2
from mugshotrace.labels.sampling import balanced_sample, restrict_sample

VARIANTS = ('original', 'resized', 'openface', 'mtcnn')

@pytest.fixture(scope='module')
def stats():
    import timm
    out = {}
    for name in ('resnet50', 'inception_v4'):
        cfg = timm.create_model(name, pretrained=False).pretrained_cfg  # no download
        out[name] = {'mean': tuple(cfg['mean']), 'std': tuple(cfg['std']), 'input_size': cfg['input_size'][-1]}
        assert arch_stats(name) == out[name]
    assert out['resnet50']['mean'] != out['inception_v4']['mean'] and out['inception_v4']['input_size'] == 299
    return out

def _expected(file, size, mean, std):
    "Independent computation: PIL bilinear squish to size×size, /255, normalise (what the valid pipeline must do)."
    a = np.asarray(Image.open(file).convert('RGB').resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    return torch.tensor(((a - np.array(mean)) / np.array(std)).transpose(2, 0, 1), dtype=torch.float32)

def _fake_variants(root, ids, rng):
    "Four manifests as faces.load_manifest returns them: originals 240×300, crops 299×299, some images dropped."
    mans = {}
    for v in VARIANTS:
        d = root / v; d.mkdir(); rows = []
        for k, i in enumerate(ids):
            w, h = (240, 300) if v == 'original' else (299, 299)
            f = d / f'{i}.jpg'
            Image.fromarray(rng.integers(0, 255, (h // 20, w // 20, 3), dtype=np.uint8)).resize((w, h)).save(f, quality=90)
            dropped = (v == 'openface' and k % 7 == 0) or (v == 'mtcnn' and k % 11 == 0)
            rows.append({'image_id': i, 'variant': v, 'status': 'no_face' if dropped else 'ok',
                         'reason': 'no face detected' if dropped else '', 'file': str(f)})
        mans[v] = pd.DataFrame(rows)
    return mans

def test_four_variants_two_architectures(tmp_path, stats):
    rng = np.random.default_rng(0)
    lab = pd.DataFrame({'image_id': [f'im{k}' for k in range(44)], 'person_id': [f'p{k // 2}' for k in range(44)],
                        'race_court': ['Black' if k % 3 else 'White' for k in range(44)]})
    sample = balanced_sample(lab, race2('court'), n=10, seed=0, valid_share=0.3, test_share=0.25)
    y = lab.set_index('image_id').race_court
    mans = _fake_variants(tmp_path, list(lab.image_id), rng)
    for v, man in mans.items():
        s = restrict_sample(sample, man.image_id[man.status == 'ok'], v)
        items = items_from(man, y, sample.train + sample.valid, sample.valid)  # the variant's losses are recorded
        lost = set(sample.train + sample.valid) - set(s.train + s.valid)
        assert set(items.attrs['dropped']) == lost and all(r.startswith('no_face') for r in items.attrs['dropped'].values())
        assert lost == set(sum((ids for k, ids in s.meta['dropped'].get(v, {}).items() if k in ('train', 'valid')), []))
        assert set(items.image_id) == set(s.train + s.valid) and set(items.image_id[items.is_valid]) == set(s.valid)
        assert (v in ('openface', 'mtcnn')) == bool(lost)
        for arch, st in stats.items():
            size = st['input_size']
            dls = face_dataloaders(items, size, st['mean'], st['std'], bs=4, aug=True, seed=1, classes=('Black', 'White'))
            xb, yb = dls.train.one_batch()
            assert xb.shape == (4, 3, size, size) and yb.shape == (4,)
            test = items_from(man, y, s.tests['court/Black'])
            t = mdata.test_dl(dls, test); tx, ty = t.one_batch()
            assert tx.shape[1:] == (3, size, size) and (ty == dls.vocab.o2i['Black']).all()
            for j in range(len(tx)):  # no augmentation at test time, exact normalisation of this architecture
                torch.testing.assert_close(tx[j].cpu(), _expected(test.file.iloc[j], size, st['mean'], st['std']), atol=2e-2, rtol=0)
            # the batch statistics follow the architecture (0.5/0.5 puts inception_v4 inputs in [-1, 1])
            lo, hi = tx.min().item(), tx.max().item()
            if arch == 'inception_v4': assert -1.0001 <= lo and hi <= 1.0001
            else: assert hi > 1.5 or lo < -1.5

def test_fresh_normalize_per_call(tmp_path, stats):
    rows = []
    for k in range(8):
        f = tmp_path / f'{k}.png'; Image.new('RGB', (20, 20), (k * 30, 100, 200)).save(f); rows.append((f'{k}', str(f), 'ab'[k % 2], k >= 6))
    items = pd.DataFrame(rows, columns=['image_id', 'file', 'label', 'is_valid'])
    means = []
    for arch in ('resnet50', 'inception_v4', 'resnet50'):
        st = stats[arch]; dls = face_dataloaders(items, 32, st['mean'], st['std'], bs=2, aug=False)
        norm = [t for t in dls.after_batch.fs if type(t).__name__ == 'Normalize']
        assert len(norm) == 1; means.append(tuple(np.round(norm[0].mean.flatten().cpu().numpy(), 3)))
    assert means[0] == means[2] == (0.485, 0.456, 0.406) and means[1] == (0.5, 0.5, 0.5)

def test_workers_are_seeded_and_agree_with_the_main_process(tmp_path):
    rng = np.random.default_rng(0); rows = []
    for k in range(12):
        f = tmp_path / f'{k}.png'; Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(f)
        rows.append((f'{k}', str(f), 'ab'[k % 2], k >= 8))
    items = pd.DataFrame(rows, columns=['image_id', 'file', 'label', 'is_valid'])
    b = lambda w: face_dataloaders(items, 24, (0.5,) * 3, (0.5,) * 3, bs=4, seed=5, num_workers=w).train.one_batch()
    (x0, y0), (x2, y2) = b(0), b(2)
    torch.testing.assert_close(x0, x2); assert (y0 == y2).all()

def test_bad_items_are_user_errors(tmp_path):
    with pytest.raises(UserError, match='is_valid'): face_dataloaders(pd.DataFrame({'image_id': [], 'file': [], 'label': []}), 32, (0,) * 3, (1,) * 3)
    with pytest.raises(UserError, match='manifest lacks'): items_from(pd.DataFrame({'image_id': ['a']}), pd.Series({'a': 'x'}), ['a'])

@pytest.mark.slow
def test_real_preprocessing_variants(tmp_path, stats):
    "With the faces module: all four real variants of two real face photos feed a DataLoaders for both archs."
    faces = pytest.importorskip('mugshotrace.faces.preprocess')
    if not all(hasattr(faces, n) for n in ('preprocess', 'load_manifest')): pytest.skip('faces.preprocess not available yet')
    ph = sample_face_photos(); root = tmp_path / 'src'; root.mkdir(); rows = []
    for k, (name, p) in enumerate(ph.items()):
        for c in range(2):
            Image.open(p).convert('RGB').save(root / f'{name}{c}.jpg', quality=95 - 10 * c)
            rows.append({'image_id': f'{name}{c}', 'path': f'{name}{c}.jpg'})
    table = pd.DataFrame(rows); y = pd.Series(['Black', 'Black', 'White', 'White'], index=table.image_id)
    built = []
    for v in VARIANTS:
        faces.preprocess(table, root, v, tmp_path / 'out', size=299, progress=False)
        man = faces.load_manifest(tmp_path / 'out', v)
        items = items_from(man, y, list(table.image_id), valid_ids=['grace_hopper1', 'astronaut1'])
        assert len(items) + len(items.attrs['dropped']) == 4
        if items.is_valid.all() or not items.is_valid.any(): continue
        built.append(v)
        for arch, st in stats.items():
            dls = face_dataloaders(items, st['input_size'], st['mean'], st['std'], bs=2, aug=False)
            xb, _ = dls.valid.one_batch()
            assert xb.shape[1:] == (3, st['input_size'], st['input_size'])
            torch.testing.assert_close(xb[0].cpu(), _expected(dls.valid.items.file.iloc[0], st['input_size'], st['mean'], st['std']), atol=2e-2, rtol=0)
    assert built == list(VARIANTS)  # both photos are clear frontal faces: every variant keeps them
