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


# --- the decode-once cache (train.cache) against today's path ---------------------------------------------------

def _cache_items(root, n=22, rng=None):
    "JPEGs of varied shapes (all need resizing), 3 classes of unequal size, 6 validation images."
    rng = rng or np.random.default_rng(0); rows = []
    for k in range(n):
        f = root / f'c{k}.jpg'
        Image.fromarray(rng.integers(0, 255, (40 + 3 * k, 30 + (k % 5) * 7, 3), dtype=np.uint8)).save(f, quality=90)
        rows.append((f'c{k}', str(f), 'abc'[0 if k % 4 == 0 else 1 + (k % 2)], k >= n - 6))
    return pd.DataFrame(rows, columns=['image_id', 'file', 'label', 'is_valid'])

def _all_batches(items, cache_dir, aug, weighted=False, num_workers=0, epochs=2):
    "Build, then iterate (train for `epochs`, valid, test without and with labels): one path at a time."
    dls = face_dataloaders(items, 28, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), bs=4, aug=aug, seed=7, weighted=weighted,
                           num_workers=num_workers, cache_dir=cache_dir)
    test = items.iloc[::-1].reset_index(drop=True)
    return dls, ([b for _ in range(epochs) for b in dls.train] + list(dls.valid)
                 + list(mdata.test_dl(dls, test.drop(columns='label'))) + list(mdata.test_dl(dls, test)))

def _same(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert len(p) == len(q)
        for u, v in zip(p, q): assert type(u) is type(v) and u.dtype == v.dtype and torch.equal(u, v)

@pytest.mark.parametrize('aug,weighted,workers', [(False, False, 0), (True, False, 0), (True, True, 0), (True, True, 2)])
def test_cache_gives_identical_batches(tmp_path, aug, weighted, workers):
    "Bit-identical batches (values, dtype, fastai type) for a fixed seed: train epochs, valid, test_dl with/without labels."
    items = _cache_items(tmp_path)
    d0, old = _all_batches(items, None, aug, weighted, workers)
    d1, new = _all_batches(items, tmp_path / 'cache', aug, weighted, workers)
    _same(old, new)
    assert type(d1.train).__name__ == ('CachedWeightedDL' if weighted else 'CachedDL') and type(d0.train).__name__ != type(d1.train).__name__
    assert list(d1.vocab) == list(d0.vocab) == ['a', 'b', 'c'] and d1.c == 3
    # the uint8 rows are what an independent PIL bilinear squish gives (no fastai involved)
    from mugshotrace.train.cache import ImageCache
    c = ImageCache(tmp_path / 'cache', 28); f = items.file[3]
    want = np.asarray(Image.open(f).convert('RGB').resize((28, 28), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(c.gather(c.ensure([f])), want[None])

def test_weighted_sampling_through_the_cache_balances_classes(tmp_path):
    items = _cache_items(tmp_path, n=30)
    dls = face_dataloaders(items, 16, (0.5,) * 3, (0.5,) * 3, bs=8, aug=False, weighted=True, seed=0, cache_dir=tmp_path / 'c')
    ys = np.concatenate([y.numpy() for _ in range(200) for _, y in dls.train])
    tr = items[~items.is_valid].label.value_counts().sort_index()
    assert tr.max() / tr.min() >= 2 and list(dls.vocab) == list(tr.index)
    # each image weighs 1 / (its class's count among all items, as `class_weights` is called on train + valid)
    w = tr / items.label.value_counts().sort_index(); want = (w / w.sum()).to_numpy()
    sd = np.sqrt(want * (1 - want) / len(ys))
    assert (np.abs(np.bincount(ys, minlength=3) / len(ys) - want) < 4 * sd).all()
    assert abs(want - tr.to_numpy() / tr.sum()).max() > 10 * sd.max()   # far from unweighted sampling

def test_cache_is_invalidated_by_a_changed_file_or_size(tmp_path):
    from mugshotrace.train.cache import ImageCache, decode_resized
    items = _cache_items(tmp_path, n=6); files = list(items.file)
    c = ImageCache(tmp_path / 'c', 20); r = c.ensure(files)
    assert ImageCache(tmp_path / 'c', 20).ensure(files) == r and len(list(c.dir.glob('*.npy'))) == 1   # reused, not re-decoded
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in [*c.dir.glob('*.npy'), *c.dir.glob('[!s]*.json')])   # faces: owner-only
    Image.new('RGB', (33, 41), (9, 200, 30)).save(files[2])   # rewritten in place: new size and mtime
    c2 = ImageCache(tmp_path / 'c', 20); r2 = c2.ensure(files)
    assert r2[2] != r[2] and [x for i, x in enumerate(r2) if i != 2] == [x for i, x in enumerate(r) if i != 2]
    np.testing.assert_array_equal(c2.gather(r2[2:3])[0], decode_resized(files[2], 20))
    assert (c2.gather(r2[2:3])[0, 1] > 150).all()
    c3 = ImageCache(tmp_path / 'c', 24)
    assert c3.dir != c.dir and c3.gather(c3.ensure(files)).shape == (6, 3, 24, 24)
    # and through face_dataloaders: the changed image reaches the batch
    it = items.assign(is_valid=[False] * 4 + [True] * 2)
    x1 = face_dataloaders(it, 20, (0,) * 3, (1,) * 3, bs=6, aug=False, cache_dir=tmp_path / 'c').test_dl(it.iloc[[2]], with_labels=False).one_batch()[0]
    np.testing.assert_allclose(x1[0].numpy() * 255, decode_resized(files[2], 20).astype(np.float32), atol=1e-3)

_WRITER = '''
import sys, json
from mugshotrace.train.cache import ImageCache
c = ImageCache(sys.argv[1], 40, workers=1); files = sys.argv[2:]
refs = c.ensure(files); print(json.dumps({"refs": refs, "sum": int(c.gather(refs).astype("int64").sum())}))
'''

def test_concurrent_writers_share_one_decode(tmp_path):
    "Three processes fill the same cache at once: one shard is written, all three read the same rows; no debris."
    import json, os, subprocess, sys
    from mugshotrace.train.cache import ImageCache, decode_resized
    files = list(_cache_items(tmp_path, n=40).file)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path)}
    ps = [subprocess.Popen([sys.executable, '-c', _WRITER, str(tmp_path / 'c'), *files], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
          for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in ps]
    assert all(p.returncode == 0 for p in ps), [o[1][-500:] for o in outs]
    got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert got[0] == got[1] == got[2]
    c = ImageCache(tmp_path / 'c', 40)
    assert len(list(c.dir.glob('*.npy'))) == 1 and not list(c.dir.glob('.*.tmp'))
    assert got[0]['sum'] == sum(int(decode_resized(f, 40).astype(np.int64).sum()) for f in files)

def test_training_through_the_cache_gives_the_same_weights(tmp_path):
    "A tiny CPU training run (augmentation on, weighted sampling) ends with bit-identical weights on both paths."
    from mugshotrace.core import seed_everything
    from mugshotrace.train.models import face_learner, get_arch
    items = _cache_items(tmp_path, n=26); spec = get_arch('tiny_cnn')
    def train(cache_dir):
        dls = face_dataloaders(items, 32, spec.mean, spec.std, bs=4, aug=True, seed=3, weighted=True, cache_dir=cache_dir)
        learn = face_learner(dls, 'tiny_cnn', seed=3); seed_everything(3)
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-2)
        with learn.no_bar(): p, _ = learn.get_preds(dl=mdata.test_dl(dls, items))
        return {k: v.clone() for k, v in learn.model.state_dict().items()}, p
    (w0, p0), (w1, p1) = train(None), train(tmp_path / 'cache')
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert torch.equal(p0, p1)
    init = face_learner(face_dataloaders(items, 32, spec.mean, spec.std, bs=4, aug=False), 'tiny_cnn', seed=3).model.state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in w0 if w0[k].is_floating_point())   # training moved the weights
