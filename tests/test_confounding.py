"""Integration tests of the xGEMs confounding probe (`confounding.xgems`, `.oracle`, `.probe`, `.experiment`).

The fast tests reproduce the seed's experiment on procedural images (target = ellipse shape, protected = lightness):
a black box trained where the two are confounded must have a clearly higher confounding metric than one trained on
unconfounded data. The synth-benchmark version of the same experiment is marked slow."""
import json
import numpy as np
import pandas as pd
import pytest
import torch

from mugshotrace.core import UserError, read_json, torch_device
from mugshotrace.confounding.xgems import ConfoundConfig, train_classifier, fit_tensors, predict_probs
from mugshotrace.confounding.oracle import fit_equalized_odds, equalized_odds_gap, oracle_error_table, confounding_table
from mugshotrace.confounding.probe import confound, confound_run, BlackBox, plot_counterfactual_paths
from mugshotrace.confounding.experiment import procedural_shapes, confounding_experiment
from mugshotrace.core import save_figure

@pytest.fixture(autouse=True, scope='module')
def _one_torch_thread():
    "One torch thread for this module (shared CPUs: oversubscription is many times slower), restored afterwards so\n    other modules' bit-for-bit comparisons with subprocesses see the default."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

FAST = ConfoundConfig(ae_epochs=6, ae_width=16, clf_epochs=8, bs=32, n_images=120, n_boot=1000, steps=100)


@pytest.fixture(scope='module')
def shapes_result():
    x, t, p = procedural_shapes(1600, seed=0)
    return confounding_experiment(x, t, p, ('wide', 'tall'), ('dark', 'light'), {0: 0, 1: 1}, FAST)


def _overall(res, bb, metric='confounding'):
    t = res.table
    return t[(t.black_box == bb) & (t.metric == metric) & (t.target_label == 'all')].iloc[0]


def test_confounded_black_box_has_clearly_higher_confounding(shapes_result):
    a, b = _overall(shapes_result, 'confounded'), _overall(shapes_result, 'unconfounded')
    assert a.ci_low > b.ci_high, (a, b)
    assert shapes_result.summary['clearly_higher']
    # Table 6.2 pattern: the confounded model is less accurate on unconfounded images
    s = shapes_result.summary['black_boxes']
    assert s['unconfounded']['accuracy'] > 0.9 and s['confounded']['accuracy'] < s['unconfounded']['accuracy'] - 0.2
    # the per-group table shows where: the confounded model's worst target label × group cell is far above the other's
    t = shapes_result.table
    cells = t[(t.metric == 'confounding') & (t.group != 'all')]
    assert cells[cells.black_box == 'confounded'].value.max() > cells[cells.black_box == 'unconfounded'].value.max() + 0.3
    assert set(cells.group) == {'dark', 'light'} and set(cells.target_label) == {'wide', 'tall'}


def test_every_reported_counterfactual_crosses(shapes_result):
    for name, pr in shapes_result.probes.items():
        bb, cf, df = shapes_result.black_boxes[name], pr.counterfactuals, pr.images
        assert df.used.sum() >= 0.8 * len(df), name
        with torch.no_grad():   # independent re-check: decode the final codes, classify again in eval mode
            pred = bb(shapes_result.ae.eval().decode(cf.z)).argmax(1).numpy()
        cls = np.array(bb.classes)
        used = df.used.to_numpy()
        assert (cls[pred[used]] == df.target[used]).all()
        assert (df.target[used] != df.pred_orig[used]).all()
        assert pr.summary['all_used_cross_verified']


def test_oracle_equalized_odds_and_reconstruction(shapes_result):
    o = shapes_result.summary['oracle']
    assert o['eo_gap_calibration'] < 1e-6 and o['eo_ok'] and o['eo_gap_heldout'] <= FAST.eo_tol
    assert o['accuracy_heldout'] > 0.9
    t = shapes_result.oracle_table
    assert set(t.oracle) == {'original', 'recalibrated'} and {'accuracy', 'fpr', 'fnr', 'n'} <= set(t.columns)
    r = shapes_result.summary['reconstruction']
    assert r['mse_ratio'] < 0.6 and r['psnr'] > 18


def test_paths_figure(shapes_result, tmp_path):
    r = shapes_result
    fig = plot_counterfactual_paths(r.ae, r.probes['confounded'], r.black_boxes['confounded'], r.oracle, r.x_probe)
    p = save_figure(fig, tmp_path/'paths.png')
    assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b'\x89PNG'


def test_equalized_odds_three_target_labels():
    g = np.random.default_rng(0); n = 9000
    y = g.integers(0, 3, n); a = g.random(n) < 0.5
    s = 1 / (1 + np.exp(-(np.where(a, 1.2, -1.2) + g.normal(0, np.array([0.5, 1.0, 2.0])[y]))))
    eo = fit_equalized_odds(s, a, y)
    assert len(eo.labels) == 3
    assert equalized_odds_gap(oracle_error_table(s, a, y, eo)) < 1e-6
    assert equalized_odds_gap(oracle_error_table(s, a, y, eo), 'original') > 0.1


def test_degenerate_inputs_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match='same attribute'):
        fit_equalized_odds([0.1, 0.9, 0.2, 0.8], [1, 1, 0, 1], [0, 0, 1, 1])
    with pytest.raises(UserError, match='no verified'):
        confounding_table([], [], [])
    with pytest.raises(UserError, match='not a run folder'):
        confound_run(tmp_path)


def _make_run(root, n=640, size=32):
    "A finished run folder: tiny_cnn bundle trained on procedural images, preds/ with race/ethnicity columns."
    from PIL import Image
    from mugshotrace.train.models import build_model, save_bundle, get_arch
    from mugshotrace.core import write_csv, write_json
    x, t, p = procedural_shapes(n, size, seed=3)
    spec = get_arch('tiny_cnn')
    m, s = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    xin = (x - m) / s   # the bundle's input size is 32: BlackBox only normalises
    model = build_model('tiny_cnn', 2, 'random', seed=0)
    fit_tensors(model, xin[:400], torch.as_tensor(t[:400]).long(), torch.nn.CrossEntropyLoss(), 4, 3e-3, 32)
    run = root/'runs'/'r1'; run.mkdir(parents=True)
    save_bundle(model, run, {'arch': 'tiny_cnn', 'classes': ['Black', 'White'], 'input_size': size})
    write_json(run/'config.json', {'run_id': 'r1', 'task': 'race2', 'variant': 'original', 'arch': 'tiny_cnn'})
    img = root/'images'; img.mkdir()
    ids = [f'im{i:04d}' for i in range(400, n)]
    for i, iid in zip(range(400, n), ids):
        Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(img/f'{iid}.png')
    race, eth = np.array(['Black', 'White']), np.array(['Hispanic', 'NonHispanic'])
    preds = pd.DataFrame({'image_id': ids, 'label': race[t[400:]], 'race': race[t[400:]], 'ethnicity': eth[p[400:]]})
    write_csv(run/'preds'/'valid.csv', preds)
    items = pd.DataFrame({'image_id': ids, 'file': [str(img/f'{i}.png') for i in ids]})
    write_csv(root/'items.csv', items)
    return run, root/'items.csv'


def test_confound_run_folder_resumes(tmp_path):
    run, items = _make_run(tmp_path)
    cfg = ConfoundConfig(ae_epochs=4, ae_width=16, clf_epochs=6, bs=32, n_images=60, n_boot=200, steps=60)  # = the CLI call below
    s = confound_run(run, cfg=cfg, items=items, figures=True)
    out = run/'confound'
    for f in ('confounding.csv', 'counterfactuals.csv', 'oracle.csv', 'summary.json', 'paths.png',
              'autoencoder.safetensors', 'oracle.safetensors'):
        assert (out/f).exists(), f
    tab = pd.read_csv(out/'confounding.csv')
    assert list(tab.columns) == ['run_id', 'attribute', 'target_label', 'group', 'metric', 'value', 'ci_low', 'ci_high', 'n']
    assert set(tab.attribute) == {'ethnicity'} and set(tab.run_id) == {'r1'}
    assert (tab.ci_low <= tab.value + 1e-12).all() and (tab.value <= tab.ci_high + 1e-12).all()
    cfs = pd.read_csv(out/'counterfactuals.csv')
    assert len(cfs) == 60 and cfs.image_id.str.startswith('im').all()
    assert s['probe']['all_used_cross_verified'] and s['probe']['n_used'] > 0
    assert not list(out.glob('.*.tmp'))
    # a finished probe is not redone
    mtime = (out/'confounding.csv').stat().st_mtime_ns
    r = confound(run, cfg=cfg, items=items, figures=True)
    assert r.key == s['key'] and r.to_dict()['out'] == str(out) and r.n_used == s['probe']['n_used']
    assert (out/'confounding.csv').stat().st_mtime_ns == mtime
    # interrupted after the slow training: the cached models give the same results
    (out/'summary.json').unlink(); before = tab.copy()
    confound_run(run, cfg=cfg, items=items)
    pd.testing.assert_frame_equal(pd.read_csv(out/'confounding.csv'), before)
    assert not (out/'paths.png').exists()   # the key covers figures: a probe without them cleared the old figure
    # asking for figures after a probe without them redoes the probe (not the training) and draws them
    confound_run(run, cfg=cfg, items=items, figures=True)
    assert (out/'paths.png').exists()
    pd.testing.assert_frame_equal(pd.read_csv(out/'confounding.csv'), before)
    # the CLI: finished probe → exit 0; bad input → exit 2 with one line
    from mugshotrace.cli import main
    assert main(['confound', str(run), '--items', str(items), '--n-images', '60', '--steps', '60', '--n-boot', '200',
                 '--ae-epochs', '4', '--ae-width', '16', '--clf-epochs', '6', '--bs', '32']) == 0
    assert main(['confound', str(tmp_path/'nope')]) == 2
    assert s['device'] == str(torch_device())


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without a GPU')
def test_asking_for_a_missing_gpu_is_a_user_error(tmp_path, capsys):
    run, items = _make_run(tmp_path, n=480)
    with pytest.raises(UserError, match='GPU'):
        confound_run(run, cfg=ConfoundConfig(n_images=20), items=items, device='cuda')
    assert not (run/'confound').exists()   # checked before any work
    from mugshotrace.cli import main
    assert main(['confound', str(run), '--items', str(items), '--device', 'cuda']) == 2
    assert 'GPU' in capsys.readouterr().err


def test_search_creates_no_tensor_without_a_device():
    """A CPU stand-in for the GPU path: under `torch.device('meta')` every tensor created without an explicit device
    lands on 'meta' and cannot mix with the CPU ones, so the search, prediction and reconstruction metrics would fail
    here exactly where they would put a tensor on the CPU while the networks sit on a GPU."""
    from mugshotrace.confounding.xgems import ConvAutoencoder, latent_counterfactuals, reconstruction_quality, SmallCNN
    torch.manual_seed(0)
    ae = ConvAutoencoder(32, 16, 16).eval(); bb = BlackBox(SmallCNN(2), ('a', 'b'), 32, (0.5,) * 3, (0.25,) * 3)
    x = torch.rand(12, 3, 32, 32)
    ref = latent_counterfactuals(ae, bb, x, steps=5, bs=8, device='cpu')
    with torch.device('meta'):
        cf = latent_counterfactuals(ae, bb, x, steps=5, bs=8, device='cpu')
        probs = predict_probs(bb, x); q = reconstruction_quality(ae, x, x.mean(0))
    assert np.array_equal(cf.pred_cf, ref.pred_cf) and np.array_equal(cf.first_cross, ref.first_cross)
    assert cf.z.device.type == 'cpu' and probs.shape == (12, 2) and np.isfinite(q['mse'])
    with torch.device('meta'), pytest.raises(RuntimeError):   # the check has teeth: a device-less tensor fails
        torch.ones(3, dtype=torch.bool) & torch.ones(3, dtype=torch.bool, device='cpu')


@pytest.mark.cuda
def test_experiment_on_gpu_matches_cpu(shapes_result):
    """The whole experiment on the GPU: the networks train and search there, everything returned is on the CPU, every
    counterfactual is re-verified, and the verdict and the overall metrics agree with the CPU run."""
    x, t, p = procedural_shapes(1600, seed=0)
    res = confounding_experiment(x, t, p, ('wide', 'tall'), ('dark', 'light'), {0: 0, 1: 1}, FAST, device='cuda')
    assert res.summary['device'].startswith('cuda') and res.summary['clearly_higher']
    for m in (res.ae, res.oracle.model, *(bb.model for bb in res.black_boxes.values())):
        assert next(m.parameters()).is_cuda
    for name, pr in res.probes.items():
        cf = pr.counterfactuals
        assert not any(v.is_cuda for v in (cf.z0, cf.z, cf.path_z)) and pr.summary['all_used_cross_verified']
        with torch.no_grad():
            pred = res.black_boxes[name](res.ae.decode(cf.z.cuda())).argmax(1).cpu().numpy()
        used = pr.images.used.to_numpy()
        assert (np.array(res.black_boxes[name].classes)[pred[used]] == pr.images.target[used]).all()
        a, b = _overall(res, name), _overall(shapes_result, name)
        assert abs(a.value - b.value) < 0.15, (name, a.value, b.value)
    plot_counterfactual_paths(res.ae, res.probes['confounded'], res.black_boxes['confounded'], res.oracle, res.x_probe)


@pytest.mark.cuda
def test_confound_run_on_gpu(tmp_path):
    """`confound_run` on a GPU: the bundle moves there, the saved networks are CPU safetensors, and a re-run on the CPU
    reuses them (the cache key does not depend on the device)."""
    from safetensors.torch import load_file
    run, items = _make_run(tmp_path)
    cfg = ConfoundConfig(ae_epochs=4, ae_width=16, clf_epochs=6, bs=32, n_images=60, n_boot=200, steps=60)
    s = confound_run(run, cfg=cfg, items=items, figures=True, device='cuda')
    assert s['device'].startswith('cuda') and s['probe']['all_used_cross_verified'] and s['probe']['n_used'] > 0
    assert all(v.device.type == 'cpu' for v in load_file(str(run/'confound'/'autoencoder.safetensors')).values())
    (run/'confound'/'summary.json').unlink()
    c = confound_run(run, cfg=cfg, items=items, device='cpu')
    assert c['key'] == s['key'] and c['device'] == 'cpu' and c['reconstruction']['mse'] == pytest.approx(s['reconstruction']['mse'], rel=1e-3)


@pytest.mark.slow
def test_synth_benchmark_confounded_higher(tmp_path):
    """The seed's experiment on the synth benchmark: target ethnicity (face geometry), protected race (skin lightness);
    A trained where every Hispanic face is Black and every NonHispanic face is White, B on unconfounded data."""
    synth = pytest.importorskip('mugshotrace.synth.benchmark', reason='the synth module has not landed')
    from mugshotrace.confounding.experiment import synth_experiment
    bench = tmp_path/'bench'
    synth.make_benchmark(bench, synth.SynthConfig(people=900, width=160, height=200,
                                                  shares={'BH': .25, 'WH': .25, 'BnH': .25, 'WnH': .25}))
    cfg = ConfoundConfig(size=32, ae_epochs=8, ae_width=16, clf_epochs=10, bs=32, n_images=150, n_boot=1000, steps=150)
    res = synth_experiment(bench, cfg, crop=0.7, centre_y=0.45)
    a, b = _overall(res, 'confounded'), _overall(res, 'unconfounded')
    assert a.ci_low > b.ci_high and a.value > 2 * b.value, (a, b)
    s = res.summary
    assert s['black_boxes']['unconfounded']['accuracy'] > 0.9
    assert s['oracle']['eo_gap_calibration'] < 1e-6
    assert s['oracle']['eo_gap_heldout'] <= 0.1   # ~70 held-out images per label: one error moves a rate by ~0.03
    t = res.table
    cells = t[(t.metric == 'confounding') & (t.black_box == 'confounded') & (t.group != 'all') & (t.target_label != 'all')]
    assert {'Black', 'White'} == set(cells.group) and {'Hispanic', 'NonHispanic'} == set(cells.target_label)
    for pr in res.probes.values(): assert pr.summary['all_used_cross_verified']
