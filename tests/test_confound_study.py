"""`mugshotrace confound STUDY`: every done model of a study probed with shared networks, ranked by confounding net of
the reconstruction-only noise floor (`confounding.ranking`, `confounding.shared`).

The study is fabricated: procedural images (target = ellipse shape, read as race; protected = lightness, read as
ethnicity), one black box trained where shape and lightness are confounded and one trained where they are not, written
as run folders (model bundle, predictions, sample) of a study folder with a preprocessing manifest."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch

from mugshotrace.core import UserError, read_json, write_csv, write_json, write_study_record
from mugshotrace.train.bundle import ModelBundle
from mugshotrace.train.archs import build_model, get_arch
from mugshotrace.confounding.xgems import ConfoundConfig, fit_tensors
from mugshotrace.confounding.experiment import procedural_shapes, confounded_subsample
from mugshotrace.confounding.probe import confound
from mugshotrace.confounding.ranking import RANKING_COLUMNS, ranking_lines, StudyConfoundResult, net_rows, unit_weights
from mugshotrace.confounding.xgems import ConvAutoencoder, SmallCNN
from mugshotrace.confounding.oracle import fit_oracle
from mugshotrace.confounding.blackbox import BlackBox, probe, load_image_tensor
from mugshotrace.study.folder import Run
import mugshotrace.confounding.shared as shared


@pytest.fixture(autouse=True, scope='module')
def _one_torch_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

CFG = ConfoundConfig(ae_epochs=6, ae_width=16, clf_epochs=8, bs=32, n_images=100, n_boot=400, steps=100)
RACE, ETH = np.array(['Black', 'White']), np.array(['Hispanic', 'NonHispanic'])


def _train_bb(x, t, idx, seed=0, epochs=6):
    "A tiny_cnn black box (input 32: the bundle only normalises) trained on images `idx`."
    spec = get_arch('tiny_cnn')
    m, s = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    model = build_model('tiny_cnn', 2, 'random', seed=seed)
    fit_tensors(model, (x[idx] - m) / s, torch.as_tensor(t[idx]).long(), torch.nn.CrossEntropyLoss(), epochs, 3e-3, 32, seed=seed)
    return model.eval()


def _save_images(root, variant, x, ids):
    from PIL import Image
    d = root/'faces'/variant; (d/'img').mkdir(parents=True, exist_ok=True)
    for i, iid in zip(range(len(ids)), ids):
        Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(d/'img'/f'{iid}.png')
    write_csv(d/'manifest.csv', pd.DataFrame({'image_id': ids, 'variant': variant, 'status': 'ok', 'reason': '',
                                             'out_path': [f'img/{i}.png' for i in ids]}))


def _add_run(root, rid, model, variant, ids, t, p, train_ids=()):
    "A done run folder: bundle, config, state, sample and predictions (court labels) on `ids`."
    run = root/'runs'/rid; run.mkdir(parents=True)
    ModelBundle(arch='tiny_cnn', classes=('Black', 'White'), input_size=32, variant=variant, run_id=rid, label_source='court',
                preprocessing={'variant': variant, 'size': 32}).save(model, run)
    write_json(run/'config.json', {'run_id': rid, 'task': 'race2', 'variant': variant, 'arch': 'tiny_cnn', 'label_source': 'court'})
    write_json(run/'state.json', {'state': 'done'})
    write_json(run/'sample.json', {'train': list(train_ids), 'valid': [], 'tests': {'court/all': list(ids)}, 'meta': {}})
    preds = pd.DataFrame({'image_id': ids, 'label': RACE[t], 'race': RACE[t], 'ethnicity': ETH[p]})
    write_csv(run/'preds'/'court__all.csv', preds)
    write_json(run/'preds'/'court__all.json', {'run_id': rid, 'dataset': 'court/all', 'label_source': 'court', 'variant': variant})


def make_study(root, n_pool=900, n_small=0, seed=0, models=None):
    """A study with a confounded and an unconfounded black box on variant `original` (pool of `n_pool` images);
    with `n_small`, a third run (the unconfounded model again) on variant `resized` with a pool of `n_small` images.
    `models`: the (confounded, unconfounded) networks of an earlier call, not trained again."""
    n_bb = 800
    x, t, p = procedural_shapes(n_bb + n_pool + n_small, 32, seed=seed)
    bi = np.arange(n_bb)
    ia = bi[confounded_subsample(t[bi], p[bi], {0: 0, 1: 1})]
    ib = np.sort(np.random.default_rng(seed + 5).choice(bi, len(ia), replace=False))
    conf, unconf = models or (_train_bb(x, t, ia), _train_bb(x, t, ib))
    pi = np.arange(n_bb, n_bb + n_pool); ids = [f'im{i:05d}' for i in pi]
    _save_images(root, 'original', x[pi], ids)
    _add_run(root, 'confounded', conf, 'original', ids, t[pi], p[pi], [f'bb{i}' for i in ia])
    _add_run(root, 'unconfounded', unconf, 'original', ids, t[pi], p[pi], [f'bb{i}' for i in ib])
    all_ids = list(ids)
    if n_small:
        si = np.arange(n_bb + n_pool, n_bb + n_pool + n_small); sids = [f'im{i:05d}' for i in si]
        _save_images(root, 'resized', x[si], sids); all_ids += sids
        _add_run(root, 'unconfounded_resized', unconf, 'resized', sids, t[si], p[si])
    lab = pd.DataFrame({'image_id': all_ids, 'person_id': [f'p{i // 2}' for i in range(len(all_ids))]})   # two images per person
    write_csv(root/'labels.csv', lab)
    write_study_record(root, 'toy', root/'labels.csv', root/'faces', root/'faces')
    return root, (x, t, p), (conf, unconf)


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    "The study, probed once, with the trainings of the shared autoencoders counted."
    root, data, models = make_study(tmp_path_factory.mktemp('study'), n_small=150)
    with _count_trainings() as count: res = confound(root, cfg=CFG, progress=False)
    return {'root': root, 'res': res, 'trainings': len(count), 'data': data, 'models': models,
            'table': pd.read_csv(root/'confound'/'confounding_ranking.csv')}


from contextlib import contextmanager
@contextmanager
def _count_trainings():
    count = []
    with pytest.MonkeyPatch.context() as mp:
        orig = shared.train_autoencoder
        mp.setattr(shared, 'train_autoencoder', lambda *a, **k: count.append(1) or orig(*a, **k))
        yield count


def _row(tab, rid, metric='confounding'):
    return tab[(tab.run_id == rid) & (tab.metric == metric)].iloc[0]


def test_ranking_contract_and_order(study):
    tab, res = study['table'], study['res']
    assert isinstance(res, StudyConfoundResult) and res.out == study['root']/'confound'
    assert list(tab.columns) == list(RANKING_COLUMNS)
    assert set(tab.metric) == {'confounding', 'confounding_recon'} and len(tab) == 6   # one row per (run, metric)
    a, b = _row(tab, 'confounded'), _row(tab, 'unconfounded')
    assert a.verdict == 'ok' and b.verdict == 'ok', (a.note, b.note)
    assert a['rank'] == 1 and b['rank'] == 2
    assert a.net_ci_low > b.net_ci_high, (a, b)                         # non-overlapping intervals of the net metric
    assert a.net > 0.3 and abs(b.net) < 0.2
    for r in tab[tab.verdict == 'ok'].itertuples():
        assert r.ci_low <= r.value <= r.ci_high and r.noise_ci_low <= r.noise_floor <= r.noise_ci_high
        assert r.net_ci_low <= r.net <= r.net_ci_high and r.net == pytest.approx(r.value - r.noise_floor)
        assert 30 <= r.n_images <= 100
    # the two are distinguishable after Holm, and the note says so
    pw = pd.read_csv(study['root']/'confound'/'pairwise.csv')
    p = pw[(pw.metric == 'confounding') & (pw.run_a == 'confounded') & (pw.run_b == 'unconfounded')].iloc[0]
    assert p.distinguishable and p.p_holm <= 0.05 and p.ci_low > 0
    assert 'distinguishable (Holm, alpha 0.05) from unconfounded' in a.note and 'rank interval 1–1' in a.note


def test_noise_floor_matches_the_probe(study):
    "The noise floor and value are the per-image rates of the probe's counterfactuals (an independent recount)."
    root, tab = study['root'], study['table']
    for rid in ('confounded', 'unconfounded'):
        cf = pd.read_csv(root/'confound'/'runs'/rid/'counterfactuals.csv'); u = cf[cf.used]
        r, rr = _row(tab, rid), _row(tab, rid, 'confounding_recon')
        assert r.n_images == len(u)
        assert r.value == pytest.approx(u.flip.mean()) and r.noise_floor == pytest.approx(u.recon_attribute_flip.mean())
        assert rr.value == pytest.approx(u.flip_recon.mean()) and rr.noise_floor == pytest.approx(r.noise_floor)
        per = pd.read_csv(root/'confound'/'runs'/rid/'confounding.csv')
        assert per[(per.metric == 'confounding') & (per.target_label == 'all')].value.iloc[0] == pytest.approx(r.value)


class _ReconTrickOracle(torch.nn.Module):
    "The trained oracle's call on images with pixel noise (the originals); the opposite call on smooth (decoded) images."
    def __init__(self, base, thr):
        super().__init__(); self.base, self.thr = base, thr
    def forward(self, x):
        hf = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)); l = self.base(x)
        return torch.where((hf > self.thr)[:, None], l, l.flip(1))


def test_reconstruction_only_flips_net_to_zero(study):
    """An oracle that calls every decoded image's attribute wrongly: the unconfounded model's raw confounding is ≈ 1, all
    of it reconstruction-only (noise floor ≈ 1), and its net is ≈ 0 — the floor is subtracted image by image."""
    from safetensors.torch import load_file
    root = study['root']; mdir = root/'confound'/'models'/'original-32'
    ae = ConvAutoencoder(32, CFG.latent_dim, CFG.ae_width); ae.load_state_dict(load_file(str(mdir/'autoencoder.safetensors'))); ae.eval()
    base = SmallCNN(2); base.load_state_dict(load_file(str(mdir/'oracle.safetensors'))); base.eval()
    man = pd.read_csv(root/'faces'/'original'/'manifest.csv', dtype={'image_id': str})
    preds = pd.read_csv(root/'runs'/'unconfounded'/'preds'/'court__all.csv', dtype={'image_id': str}).set_index('image_id').reindex(man.image_id)
    probed = pd.read_csv(root/'confound'/'runs'/'unconfounded'/'counterfactuals.csv', dtype={'image_id': str}).image_id
    x, _ = load_image_tensor([root/'faces'/'original'/o for o in man.out_path], 32)
    pr = man.image_id.isin(probed).to_numpy(); n = int(pr.sum())
    aclasses = ('Hispanic', 'NonHispanic')
    attr = (preds.ethnicity == 'NonHispanic').astype(int).to_numpy(); tl = (preds.label == 'White').astype(int).to_numpy()
    hf = lambda v: (v[..., 1:, :] - v[..., :-1, :]).abs().mean((1, 2, 3))
    with torch.no_grad(): rec = ae(x[pr])
    assert hf(rec).max() < hf(x[pr]).min()   # decoded images are smoother than the originals
    orc = fit_oracle(x[~pr], attr[~pr], tl[~pr], aclasses, CFG, model=_ReconTrickOracle(base, float((hf(rec).max() + hf(x[pr]).min()) / 2)),
                     device='cpu')
    res = probe(ae, BlackBox.from_bundle(Run.open(root/'runs'/'unconfounded')), orc, x[pr], tl[pr], np.array(aclasses)[attr[pr]], CFG, device='cpu')
    rows, _ = net_rows(res.images, unit_weights(n, 400, 0), np.arange(n))
    r = rows[0]; assert r['metric'] == 'confounding'
    assert r['value'] > 0.9 and r['noise_floor'] > 0.9 and abs(r['net']) < 0.05, r
    assert r['net_ci_low'] <= 0 <= r['net_ci_high'] and r['net_ci_high'] - r['net_ci_low'] < 0.1
    # with the study's own oracle the same model had no floor and its net was its raw value
    t = _row(study['table'], 'unconfounded'); assert t.noise_floor < 0.05 and t.net == pytest.approx(t.value - t.noise_floor)


def test_autoencoder_trained_once_per_variant(study):
    assert study['trainings'] == 2      # two variants (original, resized), three models
    s = study['res'].summary
    assert sorted(g['group'] for g in s['groups']) == ['original-32', 'resized-32']
    assert all(g.get('autoencoder') == 'trained' and g.get('oracle') == 'trained' for g in s['groups'])
    assert [g['runs_probed'] for g in s['groups']] == [['confounded', 'unconfounded'], ['unconfounded_resized']]
    assert s['oracle']['source'].startswith('trained') and s['seeds']['seed'] == 0
    # a finished ranking is not redone
    mtime = (study['root']/'confound'/'confounding_ranking.csv').stat().st_mtime_ns
    with _count_trainings() as count: r = confound(study['root'], cfg=CFG, progress=False)
    assert not count and r.key == study['res'].key and (study['root']/'confound'/'confounding_ranking.csv').stat().st_mtime_ns == mtime
    for g in s['groups']:
        assert {'mse', 'psnr', 'mse_ratio'} <= set(g['reconstruction']) and 0 <= g['oracle_accuracy_reconstruction'] <= 1


def test_small_group_is_too_small_and_printed_as_such(study):
    tab = study['table']
    r = _row(tab, 'unconfounded_resized')
    assert r.verdict == 'too_small' and pd.isna(r['rank']) and r.note
    lines = ranking_lines(study['res'])
    text = '\n'.join(lines)
    assert 'too small for a meaningful probe (numbers are not findings)' in text and 'unconfounded_resized' in text
    assert lines[1 + 2].lstrip().startswith('1. confounded')   # header, two group lines, then the ranking


def test_tiny_study_is_too_small(study, tmp_path):
    root, _, _ = make_study(tmp_path, n_pool=60, models=study['models'])
    res = confound(root, cfg=CFG, progress=False)
    tab = res.table
    assert (tab.verdict == 'too_small').all() and tab['rank'].isna().all() and tab.value.isna().all()
    assert tab.note.str.contains('too few to train the autoencoder').all()
    assert res.n_ranked == 0 and not (root/'confound'/'models').exists()
    from mugshotrace.cli import main
    assert main(['confound', str(root), '--n-boot', '50']) == 0
    # the only variant's manifest is missing: its runs are skipped with the reason, and nothing is left to probe
    shutil.rmtree(root/'faces'/'original'); (root/'confound'/'.stage-confound-study.json').unlink()
    with pytest.raises(UserError, match='no model could be probed .*no manifest'):
        confound(root, cfg=CFG, progress=False)


@pytest.mark.slow
def test_external_oracle_is_used(study, tmp_path):
    root, (x, t, p) = study['root'], study['data']
    # the regulator's g*: a tiny_cnn reading lightness, classes in the other order than the probe's
    g = _train_bb(x, 1 - p, np.arange(400), seed=1, epochs=4)
    ModelBundle(arch='tiny_cnn', classes=('NonHispanic', 'Hispanic'), input_size=32).save(g, tmp_path/'gstar')
    out = tmp_path/'ext'; shutil.copytree(root/'confound'/'models', out/'models')   # the autoencoders are shared: reused
    with _count_trainings() as count: res = confound(root, out, CFG, oracle=tmp_path/'gstar', progress=False)
    assert not count
    s = res.summary
    assert s['oracle']['source'] == 'external bundle' and s['oracle']['classes'] == ['NonHispanic', 'Hispanic']
    assert s['oracle']['weights_sha256'] == ModelBundle.load(tmp_path/'gstar').weights_sha256
    assert all(gr.get('oracle') == 'external' for gr in s['groups'] if 'oracle' in gr)
    assert all(gr['autoencoder'] == 'cached' for gr in s['groups'] if 'autoencoder' in gr)
    assert s['groups'][0]['oracle_accuracy_original'] > 0.9
    tab = res.table; a, b = _row(tab, 'confounded'), _row(tab, 'unconfounded')
    assert a['rank'] == 1 and a.net_ci_low > b.net_ci_high
    # one run with the same external oracle: only the autoencoder is trained and saved
    small = ConfoundConfig(ae_epochs=2, ae_width=16, bs=32, n_images=40, n_boot=100, steps=60)
    r = confound(root/'runs'/'confounded', tmp_path/'run_ext', small, oracle=tmp_path/'gstar', progress=False).summary
    assert r['oracle_source']['source'] == 'external bundle' and r['oracle']['accuracy_heldout'] > 0.9
    assert (tmp_path/'run_ext'/'autoencoder.safetensors').exists() and not (tmp_path/'run_ext'/'oracle.safetensors').exists()


def test_wrong_oracle_is_a_one_line_error(study, tmp_path, capsys):
    root = study['root']
    # a wrong oracle (the race model) is a one-line error before any work, in Python and on the command line
    with pytest.raises(UserError, match='not the 2 classes of ethnicity'):
        confound(root, tmp_path/'wrong', CFG, oracle=root/'runs'/'confounded')
    assert not (tmp_path/'wrong').exists()
    with pytest.raises(UserError, match='not the 2 classes of ethnicity'):   # probing one run: the same check
        confound(root/'runs'/'unconfounded', tmp_path/'wrong_run', CFG, oracle=root/'runs'/'confounded')
    from mugshotrace.cli import main
    assert main(['confound', str(root), '--oracle', str(root/'runs'/'confounded'), '--out', str(tmp_path/'wrong')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'oracle predicts' in err[0]
    (tmp_path/'bad').mkdir(); (tmp_path/'bad'/'model.json').write_text('{"arch": 3}')
    with pytest.raises(UserError, match='not a valid model bundle'):
        confound(root, tmp_path/'wrong', CFG, oracle=tmp_path/'bad')


def test_run_options_refused_for_a_study(study):
    with pytest.raises(UserError, match='apply to one run'):
        confound(study['root'], cfg=CFG, figures=True)


_REPRO = '''
import sys, torch
torch.set_num_threads(1)
import numpy as np, random
torch.rand(int(sys.argv[3])); np.random.rand(int(sys.argv[3])); random.random()
from mugshotrace.confounding.xgems import ConfoundConfig
from mugshotrace.confounding.probe import confound
cfg = ConfoundConfig(ae_epochs=6, ae_width=16, clf_epochs=8, bs=32, n_images=100, n_boot=400, steps=100)
confound(sys.argv[1], sys.argv[2], cfg, progress=False)
'''


@pytest.mark.slow
def test_same_seed_same_numbers_in_another_process(study, tmp_path):
    "A separate process, after other draws from the global generators, probing the same study from scratch: identical table."
    script = tmp_path/'repro.py'; script.write_text(_REPRO)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get('PYTHONPATH')]))}
    r = subprocess.run([sys.executable, str(script), str(study['root']), str(tmp_path/'o'), '7'], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path/'o'/'confounding_ranking.csv'), study['table'])


# --- the statistics, by simulation ----------------------------------------------------------------------------------

def test_net_interval_covers():
    """400 simulated probes of 150 images: attribute flips from the reconstruction (rate 0.1) plus flips of the move
    (0.3 of the rest), so the true net is 0.27. The paired bootstrap interval of the net covers at about 95 % (SE ≈ 1.1)."""
    g = np.random.default_rng(0); n, hit, width = 150, 0, []
    unit = np.arange(n)
    for i in range(400):
        rec = g.random(n) < 0.1; flip = rec | (g.random(n) < 0.3)
        img = pd.DataFrame({'used': True, 'flip': flip, 'flip_recon': flip, 'recon_attribute_flip': rec})
        r = net_rows(img, unit_weights(n, 400, i), unit)[0][0]
        hit += r['net_ci_low'] <= 0.27 <= r['net_ci_high']; width.append(r['net_ci_high'] - r['net_ci_low'])
    assert 0.92 <= hit / 400 <= 0.98, hit / 400
    # pairing: the width is that of the paired difference (var = 0.233 + 0.09 − 2·0.063), not of independent rates
    paired, indep = 2 * 1.96 * np.sqrt((0.37 * 0.63 + 0.1 * 0.9 - 2 * 0.1 * 0.63) / n), 2 * 1.96 * np.sqrt((0.37 * 0.63 + 0.1 * 0.9) / n)
    assert abs(np.mean(width) / paired - 1) < 0.1 and np.mean(width) < 0.85 * indep, (np.mean(width), paired, indep)


def test_pairwise_distinguishability_holds_its_level():
    """Three models with the same true net on the same 150 images (paired replicates): over 300 simulated studies, some
    pair is called distinguishable after Holm in at most the nominal 5 % (plus Monte-Carlo error); a real gap is found."""
    from mugshotrace.confounding.ranking import rank_models
    g = np.random.default_rng(1); n, false_pos, found = 150, 0, 0
    unit = np.arange(n)
    for i in range(300):
        W = unit_weights(n, 400, i); net, reps = {}, {}
        for m, rate in (('a', 0.3), ('b', 0.3), ('c', 0.3), ('d', 0.6)):
            f = g.random(n) < rate
            rows, rp = net_rows(pd.DataFrame({'used': True, 'flip': f, 'flip_recon': f, 'recon_attribute_flip': False}), W, unit)
            net[m], reps[m] = rows[0]['net'], rp['confounding']
        _, pw = rank_models({k: net[k] for k in 'abc'}, {k: reps[k] for k in 'abc'})
        false_pos += pw.distinguishable.any()
        _, pw = rank_models({k: net[k] for k in 'ad'}, {k: reps[k] for k in 'ad'})
        found += pw.distinguishable.all()
    assert false_pos / 300 <= 0.08, false_pos / 300
    assert found / 300 > 0.95, found / 300
