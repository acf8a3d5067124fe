"The benchmarks of bench/ at toy size on the CPU, so that they keep working (no timing is asserted)."
import importlib.util, json, math, sys
from pathlib import Path
import pandas as pd, pytest

BENCH = Path(__file__).resolve().parents[1] / 'bench'

@pytest.fixture(autouse=True)
def _keep_torch_threads():
    "The benches pin torch to one thread per path; later tests (bit-identical resume) need the process's setting back."
    import torch
    n = torch.get_num_threads(); yield; torch.set_num_threads(n)

def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f'{name}.py'); m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m); return m

def test_bench_data_toy(tmp_path):
    r = _load('bench_data').main(['--n', '40', '--size', '48', '--bs', '8', '--blocks', '1', '--work', str(tmp_path), '--out', str(tmp_path / 't.csv')])
    assert r['identical_aug_off'] and r['identical_aug_on']
    df = pd.read_csv(tmp_path / 't.csv')
    assert set(df.path) == {'fastai', 'cache'} and set(df.what) == {'loader', 'epoch'}
    assert (df.images == 32).all() and (df.img_per_s > 0).all()   # 32 training images, drop_last batches of 8

def test_bench_gpu_toy(tmp_path):
    out = _load('bench_gpu').main(['--toy', '--out', str(tmp_path / 'out'), '--work', str(tmp_path / 'w'), '--archs', 'tiny_cnn', '--epochs', '2',
                                   '--parts', 'table,data,variants,warm,fidelity', '--variants', 'bf16', '--fid-seeds', '1'])
    res = pd.read_csv(out / 'results.csv')
    modes = list(res['mode']); main = res[res['mode'] == res.recipe]
    assert modes[:3] == ['fp32', 'bf16+cl', 'plain:bf16+cl'] and modes[4] == 'bf16' and len(modes) == 5   # parts in order
    first = main[main.recipe.isin(['fp32', 'bf16+cl'])]
    assert modes[3] == first.loc[first.train_img_s.idxmax(), 'recipe'] + ':again'   # the second run uses the fastest recipe so far
    assert (res.arch == 'tiny_cnn').all()
    fx = res[~res['mode'].str.startswith('plain:')]
    for c in ('train_img_s', 'predict_img_s', 'first_epoch_s', 'steady_epoch_s', 'build_s', 'save_s'):
        assert fx[c].map(math.isfinite).all() and (fx[c] > 0).all(), c
    assert (res.epochs == 2).all() and (fx.input == 32).all()
    data = pd.read_csv(out / 'data_path.csv')
    assert set(data.path) == {'fastai', 'cache'} and data.identical_batches.all() and (data.images == 16).all()
    proj = pd.read_csv(out / 'projection.csv').set_index('plan')
    assert len(proj) == 3 and (proj.runs == 6).all() and proj.missing.isna().all()
    # "before" is the per-run arithmetic of bench/phase2_plan.md §2 on the measured numbers, a fresh process per run
    r = fx.set_index('mode').loc['fp32']; start = proj.process_start_s.iloc[0]
    assert start > 0
    want = 6 * (16000 / r.train_img_s + 8000 / r.predict_img_s + r.build_s + max(r.warmup_s, 0) + r.save_s + start) / 60
    assert abs(proj.total_min.iloc[0] - want) < 1e-6 * want
    # "after" uses the fastest measured recipe and pays the process start and the first warm-up once per arch
    best = fx[fx['mode'] == fx.recipe].set_index('recipe').train_img_s.idxmax()
    b, again = fx.set_index('mode').loc[best], fx[fx['mode'].str.endswith(':again')].warmup_s.iloc[0]
    want = (6 * (16000 / b.train_img_s + 8000 / b.predict_img_s + b.build_s + b.save_s) + start + max(b.warmup_s, 0) + 5 * max(again, 0)) / 60
    assert abs(proj.total_min.iloc[2] - want) < 1e-6 * want
    fid = pd.read_csv(out / 'fidelity.csv')
    assert set(fid.recipe) >= {'fp32', 'bf16+cl'} and ((fid.ci_low <= fid.accuracy) & (fid.accuracy <= fid.ci_high)).all()
    assert fid.accuracy.min() > 0.5   # the colour task is learnt (a fidelity check on an unlearnt task would mean nothing)
    md = (out / 'results.md').read_text()
    assert 'toy size' in md and 'Balanced Phase 2 grid' in md and 'fastest/fp32' in md and 'Fidelity' in md
    txt = (out / 'gpu_measured.txt').read_text(); ns = {}; exec(txt, ns)
    assert set(ns['GPU_MEASURED']['tiny_cnn']) == {'fp32', 'bf16+cl', 'bf16'}
    assert (fx.train_img_s_low <= fx.train_img_s + 1e-9).all() and (fx.train_img_s <= fx.train_img_s_high + 1e-9).all()
    assert 'fastest vs fp32' in md


def test_bench_gpu_budget(tmp_path):
    "A spent time budget skips every remaining unit and says so (a budget of 1 ns: deterministic, every unit skipped)."
    out = _load('bench_gpu').main(['--toy', '--out', str(tmp_path / 'out'), '--work', str(tmp_path / 'w'), '--archs', 'tiny_cnn,resnet18',
                                   '--epochs', '2', '--parts', 'table,data', '--budget-s', '1e-9', '--plain-archs', 'none'])
    env = json.loads((out / 'env.json').read_text())
    assert env['skipped'] == [f'table {a} {r}' for a in ('tiny_cnn', 'resnet18') for r in ('fp32', 'bf16+cl')] + ['data path']
    assert not (out / 'results.csv').exists() and 'skipped: table tiny_cnn fp32' in (out / 'results.md').read_text()


def test_bench_gpu_failing_unit(tmp_path):
    "A unit that fails (here an unknown architecture) is recorded with its error and the benchmark goes on."
    out = _load('bench_gpu').main(['--toy', '--out', str(tmp_path / 'out'), '--work', str(tmp_path / 'w'), '--archs', 'no_such_arch,tiny_cnn',
                                   '--epochs', '2', '--parts', 'table', '--plain-archs', 'none'])
    res = pd.read_csv(out / 'results.csv'); env = json.loads((out / 'env.json').read_text())
    assert list(res['mode']) == ['fp32', 'bf16+cl'] and (res.arch == 'tiny_cnn').all()
    assert len(env['errors']) == 2 and all(e.startswith('table no_such_arch') and 'unknown architecture' in e for e in env['errors'])
