"Experiment grids, the resumable runner and `mugshotrace run` (mugshotrace.study.grid / mugshotrace.study.runner)."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import numpy as np, pandas as pd, pytest, yaml
from PIL import Image
from mugshotrace.core import read_json, UserError
from mugshotrace.study.grid import load_study, run_grid, results_table, runs_frame, expand_grid, RunConfig
from mugshotrace.study.runner import read_state

LABEL_COLUMNS = {'court': {'race': 'race_court', 'ethnicity': 'ethnicity_court'},
                 'student': {'race': 'race_student', 'ethnicity': 'ethnicity_student'}}

def make_toy(out, n_people=48, per_person=2, size=40, seed=0):
    "Tiny labelled dataset whose brightness depends on race and a stripe on ethnicity (a learnable signal)."
    out = Path(out); (out/'images').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed); rows = []
    for p in range(n_people):
        race = ('Black', 'White')[p % 2]; eth = ('Hispanic', 'NonHispanic')[(p // 2) % 2]
        for k in range(per_person):
            iid = f'p{p:03d}_{k}'
            a = np.clip(rng.normal(70 if race == 'Black' else 180, 25, (size, size, 3)), 0, 255)
            if eth == 'Hispanic': a[:, :size // 4] = 255 - a[:, :size // 4]
            Image.fromarray(a.astype(np.uint8)).save(out/'images'/f'{iid}.png')
            flip = rng.random() < 0.1
            rows.append(dict(image_id=iid, path=f'images/{iid}.png', person_id=f'P{p}', race_court=race, ethnicity_court=eth,
                             race_student=('White' if race == 'Black' else 'Black') if flip else race, ethnicity_student=eth))
    pd.DataFrame(rows).to_csv(out/'labels.csv', index=False)
    return out

def toy_study(root, runs='runs', grid=None, **train):
    d = {'name': 'toy', 'data': {'labels': {'table': 'labels.csv', 'columns': LABEL_COLUMNS}, 'images': '.',
                                 'preprocessed': 'faces', 'preprocess': {'progress': False}},
         'train': {'epochs': 2, 'size': 32, 'bs': 8, 'n_per_class': 12, 'init': 'random', 'lr': 3e-2, 'aug': False, **train},
         'grid': grid or {'arch': ['tiny_cnn'], 'variant': ['original'], 'label_source': ['court', 'student']}, 'runs': runs}
    p = Path(root)/f'{runs}.yaml'; p.write_text(yaml.safe_dump(d)); return p

@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    "The toy data and an uninterrupted reference grid (2 runs), run in this process."
    root = make_toy(tmp_path_factory.mktemp('toy'))
    study = toy_study(root, 'ref')
    df = run_grid(study, progress=False)
    assert (df.state == 'done').all(), df
    return root, study, df

def _preds(runs_root, run_id):
    return {p.name: pd.read_csv(p) for p in sorted((Path(runs_root)/run_id/'preds').glob('*.csv'))}

def test_run_folder_contract(toy):
    root, study, df = toy
    st = load_study(study)
    for rid in df.run_id:
        d = Path(st.runs_root)/rid
        for f in ('config.json', 'state.json', 'metrics.json', 'model.safetensors', 'model.json', 'env.json', 'log.csv', 'heartbeat'):
            assert (d/f).exists(), f
        assert not (d/'lock').exists() and not list(d.glob('.*.tmp'))
        cfg = read_json(d/'config.json')
        for k in ('run_id', 'arch', 'variant', 'label_source', 'task', 'sampling', 'init'): assert k in cfg
        assert cfg['run_id'] == rid and RunConfig.from_dict(cfg).run_id == rid
        preds = _preds(st.runs_root, rid)
        assert set(preds) == {'valid.csv', 'court__Black.csv', 'court__White.csv', 'student__Black.csv', 'student__White.csv'}
        model = read_json(d/'model.json')
        for name, p in preds.items():
            assert list(p.columns) == ['image_id', 'Black_Prob', 'White_Prob', 'Prediction', 'label', 'race', 'ethnicity', 'group']
            assert np.allclose(p.Black_Prob + p.White_Prob, 1, atol=1e-5)
            assert (p.Prediction == np.where(p.Black_Prob > p.White_Prob, 'Black', 'White')).all()
            side = read_json(d/'preds'/name.replace('.csv', '.json'))
            assert side['run_id'] == rid and side['model_sha256'] == model['weights_sha256'] and side['variant'] == 'original'
            if name != 'valid.csv':
                src, grp = name[:-4].split('__')
                assert side['label_source'] == src and side['group'] == grp and (p.label == grp).all()
                assert (p.race == grp).all()   # race column = that source's label
                # group = the intersectional subgroup (BH, WH, BnH, WnH) under that source's labels
                assert (p.group == [{'Black': 'B', 'White': 'W'}[r] + {'Hispanic': 'H', 'NonHispanic': 'nH'}[e] for r, e in zip(p.race, p.ethnicity)]).all()
        # metrics agree with the prediction files
        m = read_json(d/'metrics.json')
        for name, p in preds.items():
            ds = 'valid' if name == 'valid.csv' else name[:-4].replace('__', '/')
            assert m['datasets'][ds]['n'] == len(p) and abs(m['datasets'][ds]['accuracy'] - (p.Prediction == p.label).mean()) < 1e-12
        # the held-out persons never appear in training or validation
        s = read_json(d/'sample.json')
        persons = pd.read_csv(root/'labels.csv').set_index('image_id').person_id
        dev = set(persons[s['train'] + s['valid']]); test = set(persons[[i for v in s['tests'].values() for i in v]])
        assert not dev & test
        log = pd.read_csv(d/'log.csv'); assert len(log) == 2 and {'train_loss', 'valid_loss', 'accuracy'} <= set(log.columns)

def test_model_learns_signal(toy):
    "The toy signal (brightness ↔ race) is learnable: court-label test accuracy well above chance."
    root, study, df = toy
    t = runs_frame(load_study(study).runs_root)
    acc = t[(t.label_source == 'court') & t.dataset.isin(['court/Black', 'court/White'])].accuracy.mean()
    assert acc > 0.7, t

def test_results_table_and_skip(toy, capsys):
    root, study, df = toy
    st = load_study(study)
    tab = results_table(st.runs_root)
    assert tab.shape == (1, 2) and list(tab.columns) == [('original', 'court'), ('original', 'student')]
    m = read_json(Path(st.runs_root)/df.run_id[0]/'metrics.json')
    assert tab.loc['tiny_cnn', ('original', 'court')] == m['datasets']['valid']['accuracy']
    # running the same grid again trains nothing (the CLI path)
    from mugshotrace.cli import main
    mtimes = {r: (Path(st.runs_root)/r/'model.safetensors').stat().st_mtime_ns for r in df.run_id}
    assert main(['run', str(study)]) == 0
    assert '0 to run' in capsys.readouterr().err
    assert mtimes == {r: (Path(st.runs_root)/r/'model.safetensors').stat().st_mtime_ns for r in df.run_id}
    # --only selects by run name or by run id
    sel = run_grid(study, only=df.run_id[1], progress=False); assert list(sel.run_id) == [df.run_id[1]]
    sel = run_grid(study, only='tiny_cnn-*-student-*', progress=False); assert list(sel.run_id) == [df.run_id[1]]
    # the front door: same runs, counted by state, nothing retrained
    from mugshotrace.study.grid import run, GridConfig
    res = run(study, cfg=GridConfig(only='tiny_cnn-*'), progress=False)
    assert (res.n_runs, res.n_done, res.n_failed, res.n_pending) == (2, 2, 0, 0) and res.out == Path(st.runs_root)
    assert list(res.frame.run_id) == list(df.run_id) and res.to_dict()['runs'][0]['state'] == 'done'
    assert mtimes == {r: (Path(st.runs_root)/r/'model.safetensors').stat().st_mtime_ns for r in df.run_id}
    # runs_frame reads the run folders through study.folder: the study folder itself works as the root
    assert runs_frame(Path(st.runs_root).parent).equals(runs_frame(st.runs_root))

def test_run_flags_come_from_grid_config():
    "`mugshotrace run`'s defaults are GridConfig's; old flag names and the common options still parse."
    from dataclasses import fields
    from mugshotrace.cli import build_parser
    from mugshotrace.config import config_from_args
    from mugshotrace.study.grid import GridConfig
    p = build_parser(only='run')
    a = p.parse_args(['run', 's.yaml'])
    assert a.config_cls is GridConfig and a.progress is True and a.out is None
    cfg = config_from_args(GridConfig, a, setup_commands=tuple(a.setup_command or ()))
    assert cfg == GridConfig(), cfg
    for f in fields(GridConfig):
        if f.name != 'setup_commands': assert getattr(a, f.name) == f.default, f.name
    a = p.parse_args(['run', 's.yaml', '--executor', 'submitit', '--workers', '3', '--only', 'x*', '--retry-failed', '--cluster', 'debug',
                      '--force-resume', '--runs', 'R', '--no-progress'])
    assert (a.executor, a.workers, a.only, a.retry_failed, a.cluster, a.force_resume, a.out, a.progress) == ('submitit', 3, 'x*', True, 'debug', True, 'R', False)
    assert p.parse_args(['run', 's.yaml', '--out', 'O']).out == 'O'
    with pytest.raises(SystemExit): p.parse_args(['run', 's.yaml', '--executor', 'ssh'])

def test_resume_after_kill(toy):
    "Kill `mugshotrace run` in the middle of training the second run, restart: each run done once, results identical."
    root, ref_study, ref = toy
    study = toy_study(root, 'killed')
    runs_root = load_study(study).runs_root
    second = ref.run_id[1]
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    proc = subprocess.Popen([sys.executable, '-m', 'mugshotrace.cli', 'run', str(study)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ckpt = Path(runs_root)/second/'.checkpoint'/'progress.json'
    t0 = time.time()
    while not ckpt.exists():   # the second run has checkpointed its first epoch: it is mid-training
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < 240; time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL); proc.wait()
    s = read_state(runs_root, second)
    assert s['state'] == 'running' and (Path(runs_root)/second/'lock').exists()
    assert read_state(runs_root, ref.run_id[0])['state'] == 'done'
    df = run_grid(study, progress=False)
    assert (df.state == 'done').all()
    for rid in ref.run_id:
        s = read_state(runs_root, rid)
        assert [h['state'] for h in s['history']].count('done') == 1
        a, b = _preds(runs_root, rid), _preds(load_study(ref_study).runs_root, rid)
        assert a.keys() == b.keys()
        for k in a: pd.testing.assert_frame_equal(a[k], b[k])
        assert read_json(Path(runs_root)/rid/'model.json')['weights_sha256'] == read_json(Path(load_study(ref_study).runs_root)/rid/'model.json')['weights_sha256']
    s = read_state(runs_root, second)
    assert s['attempts'] == 2 and [h['state'] for h in s['history']] == ['running', 'running', 'done']
    # the second attempt resumed from the epoch checkpoint instead of training from scratch, and still ended with the
    # uninterrupted run's weights (checked above); the checkpoint is gone and the log has each epoch once
    assert read_json(Path(runs_root)/second/'metrics.json')['train']['resumed_from']['epoch'] >= 1
    assert read_json(Path(runs_root)/ref.run_id[0]/'metrics.json')['train']['resumed_from'] is None
    assert not (Path(runs_root)/second/'.checkpoint').exists()
    assert pd.read_csv(Path(runs_root)/second/'log.csv').epoch.tolist() == [0, 1]

def test_failed_runs_retried_only_on_request(toy, tmp_path):
    root, _, _ = toy
    study = toy_study(root, 'fail', n_per_class=10_000)   # impossible balanced sample → the run fails
    df = run_grid(study, progress=False, only='*-court-*')
    assert list(df.state) == ['failed'] and 'n=10000' in df.error[0]
    rid = df.run_id[0]; runs_root = load_study(study).runs_root
    assert 'UserError' in read_state(runs_root, rid)['error']
    run_grid(study, progress=False, only='*-court-*')
    assert read_state(runs_root, rid)['attempts'] == 1              # not retried
    run_grid(study, progress=False, only='*-court-*', retry_failed=True)
    assert read_state(runs_root, rid)['attempts'] == 2
    with pytest.raises(UserError, match='no run matches'): run_grid(study, only='nothing-*')

def test_submitit_debug_executor(toy):
    "The submitit path, with submitit's in-process DebugExecutor; same results as the local executor."
    root, ref_study, ref = toy
    study = toy_study(root, 'sub')
    df = run_grid(study, executor='submitit', executor_opts={'cluster': 'debug'}, only='*-court-*', progress=False)
    assert list(df.state) == ['done']
    a = _preds(load_study(study).runs_root, df.run_id[0]); b = _preds(load_study(ref_study).runs_root, df.run_id[0])
    for k in a: pd.testing.assert_frame_equal(a[k], b[k])

def test_config_changes_give_new_runs(toy):
    root, study, ref = toy
    st = load_study(toy_study(root, 'other', epochs=3))
    from mugshotrace.study.grid import fingerprint_configs
    ids = {c.run_id for c in fingerprint_configs(st.runs, st.data)}
    assert not ids & set(ref.run_id)
    st0 = load_study(study)
    assert {c.run_id for c in fingerprint_configs(st0.runs, st0.data)} == set(ref.run_id)

# ---- slow: bigger grids, both executors, several workers, the synth benchmark ----

@pytest.mark.slow
def test_local_workers_and_submitit_local(toy):
    root, ref_study, ref = toy
    study = toy_study(root, 'workers', grid={'arch': ['tiny_cnn', 'resnet18'], 'variant': ['original', 'resized'],
                                             'label_source': ['court', 'student']})
    df = run_grid(study, workers=2, progress=False)
    assert (df.state == 'done').all() and len(df) == 8
    for rid in df.run_id:   # each run exactly once although two workers walked the whole list
        assert [h['state'] for h in read_state(load_study(study).runs_root, rid)['history']] == ['running', 'done']
    study2 = toy_study(root, 'sublocal', grid={'arch': ['tiny_cnn', 'resnet18'], 'variant': ['original'], 'label_source': ['court']})
    df2 = run_grid(study2, executor='submitit', executor_opts={'cluster': 'local', 'timeout_min': 30}, progress=False)
    assert (df2.state == 'done').all()
    a = results_table(load_study(study).runs_root); b = results_table(load_study(study2).runs_root)
    for arch in ('tiny_cnn', 'resnet18'): assert a.loc[arch, ('original', 'court')] == b.loc[arch, ('original', 'court')]

SYNTH_GRID = {'arch': ['tiny_cnn', 'resnet18', 'alexnet'], 'variant': ['original', 'resized'], 'label_source': ['court', 'student']}

@pytest.mark.slow
@pytest.mark.parametrize('executor', ['local', 'submitit'])
def test_cli_run_on_synth(tmp_path, executor):
    from mugshotrace.synth import benchmark as synth
    out = synth.make_benchmark(tmp_path/'synth', synth.SynthConfig(people=160, width=80, height=100), progress=False)
    d = {'name': 'synth', 'data': {'labels': {'table': 'labels.csv', 'columns': LABEL_COLUMNS}, 'images': '.',
                                   'preprocessed': 'faces', 'preprocess': {'progress': False, 'size': 48}, 'truth': '.'},
         'train': {'epochs': 1, 'size': 40, 'bs': 16, 'n_per_class': 40, 'lr': 1e-2, 'init': 'random'},
         'grid': SYNTH_GRID, 'runs': 'runs'}
    (Path(out)/'study.yaml').write_text(yaml.safe_dump(d))
    from mugshotrace.cli import main
    argv = ['run', str(Path(out)/'study.yaml'), '--executor', executor] + (['--cluster', 'local'] if executor == 'submitit' else [])
    assert main(argv) == 0
    t = results_table(Path(out)/'runs')
    assert t.shape == (3, 4) and t.notna().all().all()
    p = pd.read_csv(next((Path(out)/'runs').glob('*/preds/valid.csv')))
    assert 'truth' in p.columns

def test_models_are_tested_on_every_variant_of_the_study(tmp_path):
    "The seed's design: each model is also tested, on the same held-out people, as the other variants preprocessed them."
    from mugshotrace.audit.selfaudit import run_scenarios
    root = make_toy(tmp_path)
    study = toy_study(root, 'xv', grid={'arch': ['tiny_cnn'], 'variant': ['original', 'resized'], 'label_source': ['court']}, epochs=1)
    df = run_grid(study, progress=False)
    assert (df.state == 'done').all(), df
    runs_root = Path(load_study(study).runs_root)
    for rid in df.run_id:
        cfg = read_json(runs_root/rid/'config.json'); other = {'original': 'resized', 'resized': 'original'}[cfg['variant']]
        for grp in ('Black', 'White'):
            own = pd.read_csv(runs_root/rid/'preds'/f'court__{grp}.csv')
            xv = pd.read_csv(runs_root/rid/'preds'/'variants'/other/f'court__{grp}.csv')
            side = read_json(runs_root/rid/'preds'/'variants'/other/f'court__{grp}.json')
            assert side['variant'] == other and side['dataset'] == f'court/{grp}' and side['run_id'] == rid
            assert set(xv.image_id) == set(own.image_id) and len(xv) > 0     # same held-out people (nothing dropped here)
        m = read_json(runs_root/rid/'metrics.json')['datasets']
        assert {f'{other}:court/Black', f'{other}:court/White'} <= set(m)
        scen = {s['test_set'] for s in run_scenarios(runs_root/rid)}
        assert scen == {'court/Black', 'court/White', f'{other}:court/Black', f'{other}:court/White'}
