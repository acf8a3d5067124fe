"The benchmarks of bench/ at toy size on the CPU, so that they keep working (no timing is asserted)."
import importlib.util, math, sys
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
    out = _load('bench_gpu').main(['--toy', '--out', str(tmp_path / 'out'), '--work', str(tmp_path / 'w'), '--archs', 'tiny_cnn', '--epochs', '2'])
    res = pd.read_csv(out / 'results.csv')
    assert list(res['mode']) == ['recipe', 'fastai_fp32', 'plain_recipe'] and (res.arch == 'tiny_cnn').all()
    fx = res[res['mode'] != 'plain_recipe']
    for c in ('train_img_s', 'predict_img_s', 'first_epoch_s', 'steady_epoch_s', 'build_s', 'save_s'):
        assert fx[c].map(math.isfinite).all() and (fx[c] > 0).all(), c
    assert (res.epochs == 2).all() and (fx.input == 32).all()
    data = pd.read_csv(out / 'data_path.csv')
    assert set(data.path) == {'fastai', 'cache'} and data.identical_batches.all() and (data.images == 16).all()
    proj = pd.read_csv(out / 'projection.csv')
    assert set(proj['mode']) == {'recipe', 'fastai_fp32'} and (proj.runs == 6).all()
    # the projection is the per-run arithmetic of bench/phase2_plan.md §2 on the measured numbers
    r = fx.set_index('mode').loc['recipe']
    want = 6 * (16000 / r.train_img_s + 8000 / r.predict_img_s + r.build_s + max(r.warmup_s, 0) + r.save_s) / 60
    assert abs(proj.set_index('mode').loc['recipe', 'total_min'] - want) < 1e-6 * want
    md = (out / 'results.md').read_text()
    assert 'ratio recipe/fp32' in md and 'toy size' in md and 'Balanced Phase 2 grid' in md
