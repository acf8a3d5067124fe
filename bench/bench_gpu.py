"""The GPU benchmark of issue 19: per registered architecture, training images/s of the package's recipe (bf16
autocast + channels_last, as `study.runner.train_learner` sets it on a GPU) against fastai's fp32 defaults, compute-
bound (random uint8 images already on the device, `fit_one_cycle` through fastai, random init); a plain PyTorch
loop with the recipe (what fastai's per-batch callbacks cost); the per-run fixed costs (model build, first epoch minus
a steady epoch, saving the bundle, predictions); the data path alone (today's fastai loader vs the decode-once cache,
`bench/bench_data.py`, with augmentation on the device); and a projection of the balanced Phase 2 grid (42 runs)
from these measured per-run costs. Writes `results.csv`, `data_path.csv` and `results.md` into `--out`.

Full size wherever CUDA is present; `--toy` (the default without CUDA) runs tiny images, two small architectures
and a few batches on the CPU so that CI keeps the script working (`tests/test_bench.py`).

    python bench/bench_gpu.py                         # CUDA: every registered Phase 2 architecture, full size
    python bench/bench_gpu.py --archs resnet50,alexnet --n-train 4096 --epochs 3 --bs 128
    python bench/bench_gpu.py --toy --out /tmp/gpu_toy  # CPU smoke run
    python bench/bench_gpu.py --profile resnet50        # + PyTorch profiler table of 10 recipe steps
"""
import argparse, contextlib, os, sys, tempfile, time
from pathlib import Path
import numpy as np, pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_data (the data path alone)

# the balanced run of bench/phase2_plan.md §2: fine_tune = 1 frozen + 4 unfrozen epochs of 3,200 training images
# (the frozen epoch counted as a full training epoch: an upper bound), 5 × 800 validation + 4 × 1,000 test predictions
BALANCED_RUN = dict(train_images=5 * 3200, predict_images=5 * 800 + 4 * 1000, runs_per_arch=6)


def sync(device):
    import torch
    if device.type == 'cuda': torch.cuda.synchronize(device)


def device_dls(n, size, mean, std, bs, device, seed=0, n_valid=None, aug=False):
    "fastai DataLoaders over random uint8 images that live on `device` (no decoding, no host-to-device copies)."
    import torch
    from fastai.data.core import TfmdDL, DataLoaders
    from fastai.torch_core import TensorImage, TensorCategory
    from fastai.vision.all import IntToFloatTensor, Normalize, aug_transforms
    from fastcore.basics import chunked
    from mugshotrace.train.data import FACE_AUG

    class DeviceDL(TfmdDL):
        "Batches are slices of tensors already on the device."
        def __init__(self, dataset=None, x=None, y=None, **kw):
            self.x, self.y = x, y; super().__init__(dataset=dataset, **kw)
        def new(self, dataset=None, cls=None, **kw):
            r = super().new(dataset=dataset, cls=cls, **kw); r.x, r.y = self.x, self.y; return r
        def create_batches(self, samps):
            for b in chunked(samps, self.bs, self.drop_last):
                i = torch.as_tensor(b, device=self.x.device)
                yield TensorImage(self.x[i]), TensorCategory(self.y[i])

    g = torch.Generator().manual_seed(seed)
    def dl(k, shuffle):
        x = torch.randint(0, 256, (k, 3, size, size), generator=g, dtype=torch.uint8).to(device)
        y = torch.randint(0, 2, (k,), generator=g).to(device)
        tf = [IntToFloatTensor()] + (aug_transforms(size=None, **FACE_AUG) if aug else []) + [Normalize.from_stats(mean, std, cuda=device.type == 'cuda')]
        return DeviceDL(list(range(k)), x=x, y=y, bs=bs, shuffle=shuffle, drop_last=shuffle, after_batch=tf, device=device)
    dls = DataLoaders(dl(n, True), dl(n_valid or bs, False), device=device); dls.c = 2; dls.vocab = ['Black', 'White']
    return dls


def epoch_timer(device):
    from fastai.callback.core import Callback
    class EpochTimer(Callback):
        "Training seconds of every epoch (validation excluded), the device synchronised at both ends."
        order = 99
        def before_fit(self): self.times = []
        def before_train(self): sync(device); self.t = time.perf_counter()
        def after_train(self): sync(device); self.times.append(time.perf_counter() - self.t)
    return EpochTimer()


def bench_fastai(arch, mode, a, device, work):
    "One mode (`recipe` or `fastai_fp32`) of one arch through fastai: build, epochs, save, predictions."
    import torch
    from mugshotrace.core import seed_everything
    from mugshotrace.train.models import face_learner, get_arch, save_bundle
    spec = get_arch(arch); size = a.size or max(spec.input_size, spec.min_size)
    dls = device_dls(a.n_train, size, spec.mean, spec.std, a.bs, device, aug=a.aug)
    seed_everything(0); sync(device); t = time.perf_counter()
    learn = face_learner(dls, spec, init='random', seed=0); learn.model.to(device)
    if mode == 'recipe':
        learn.to_channelslast(); learn.to_bf16()
    sync(device); build = time.perf_counter() - t
    timer = epoch_timer(device)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(a.epochs, 1e-3, cbs=[timer])
    ep = timer.times; steady = float(np.median(ep[1:])) if len(ep) > 1 else ep[0]
    if mode == 'recipe': learn.to_fp32()
    t = time.perf_counter(); save_bundle(learn, work / f'{arch}-{mode}', {'arch': spec.name, 'classes': ['Black', 'White'], 'input_size': size}); save = time.perf_counter() - t
    test = dls.valid.new(shuffle=False); n_pred = len(test.x)
    if mode == 'recipe': learn.to_bf16()
    sync(device); t = time.perf_counter()
    with learn.no_bar(): learn.get_preds(dl=test)
    sync(device); pred = time.perf_counter() - t
    n_per_epoch = (a.n_train // a.bs) * a.bs
    prec = 'bf16+channels_last' if mode == 'recipe' else 'fp32'
    if mode == 'recipe' and device.type != 'cuda': prec += ' (autocast inactive: no CUDA)'
    return {'arch': arch, 'mode': mode, 'precision': prec, 'input': size, 'bs': a.bs, 'device': str(device),
            'train_img_s': n_per_epoch / steady, 'first_epoch_s': ep[0], 'steady_epoch_s': steady, 'warmup_s': ep[0] - steady,
            'build_s': build, 'save_s': save, 'predict_img_s': n_pred / pred, 'epochs': len(ep)}


def bench_plain(arch, a, device):
    "A plain PyTorch loop with the recipe's precision (no fastai callbacks): steady training images/s."
    import torch
    from mugshotrace.train.models import build_model, get_arch
    spec = get_arch(arch); size = a.size or max(spec.input_size, spec.min_size)
    model = build_model(spec, 2, 'random', seed=0).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3); lossf = torch.nn.CrossEntropyLoss()
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1); std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    x = torch.randint(0, 256, (a.n_train, 3, size, size), dtype=torch.uint8, device=device); y = torch.randint(0, 2, (a.n_train,), device=device)
    ac = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == 'cuda' else contextlib.nullcontext()
    times = []
    for _ in range(a.epochs):
        sync(device); t = time.perf_counter()
        for s in range(0, a.n_train - a.bs + 1, a.bs):
            xb = ((x[s:s + a.bs].float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
            with ac: loss = lossf(model(xb), y[s:s + a.bs])
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        sync(device); times.append(time.perf_counter() - t)
    steady = float(np.median(times[1:])) if len(times) > 1 else times[0]
    return {'arch': arch, 'mode': 'plain_recipe', 'precision': 'bf16+channels_last' if device.type == 'cuda' else 'fp32+channels_last',
            'input': size, 'bs': a.bs, 'device': str(device), 'train_img_s': (a.n_train // a.bs) * a.bs / steady,
            'first_epoch_s': times[0], 'steady_epoch_s': steady, 'warmup_s': times[0] - steady, 'epochs': len(times)}


def profile(arch, a, device):
    "The PyTorch profiler's top operators over 10 recipe training steps (after 3 warm-up steps)."
    import torch
    from torch.profiler import profile as tprofile, ProfilerActivity
    from mugshotrace.train.models import face_learner, get_arch
    spec = get_arch(arch); size = a.size or max(spec.input_size, spec.min_size)
    dls = device_dls(a.bs * 13, size, spec.mean, spec.std, a.bs, device)
    learn = face_learner(dls, spec, init='random', seed=0); learn.model.to(device); learn.to_channelslast(); learn.to_bf16()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)   # warm-up
    with tprofile(activities=acts) as prof, learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    key = 'cuda_time_total' if device.type == 'cuda' else 'cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=15)


def data_path(a, device, work):
    "Images/s of today's loader and of the cache (augmentation on, after_batch on `device`), same invocation."
    import torch
    import bench_data as B
    from mugshotrace.train.data import face_dataloaders
    files = B.make_images(work / f'imgs{a.data_size}', a.data_n, a.data_size); items = B.items_for(files); cache = work / 'cache'
    face_dataloaders(items, a.data_size, (0.5,) * 3, (0.5,) * 3, bs=a.data_bs, cache_dir=cache)   # the one-off decode
    rows = []
    for blk in range(a.blocks):
        for path, cd in (('fastai', None), ('cache', cache)):
            dls = face_dataloaders(items, a.data_size, (0.5,) * 3, (0.5,) * 3, bs=a.data_bs, aug=True, num_workers=a.workers, cache_dir=cd)
            dls.to(device); sync(device); t = time.perf_counter(); n = 0
            for xb, yb in dls.train: n += len(xb)
            sync(device); s = time.perf_counter() - t
            rows.append({'block': blk, 'path': path, 'workers': a.workers, 'size': a.data_size, 'images': n, 'seconds': s, 'img_per_s': n / s, 'device': str(device)})
    same, nb = B.identical(items, a.data_size, a.data_bs, cache, aug=False)
    df = pd.DataFrame(rows); df['identical_batches'] = same
    return df


def project(res:pd.DataFrame)->pd.DataFrame:
    "The balanced Phase 2 grid's wall time per mode from the measured per-run costs (bench/phase2_plan.md §2)."
    r = BALANCED_RUN; out = []
    for mode, d in res[res['mode'].isin(['recipe', 'fastai_fp32'])].groupby('mode'):
        per_run = r['train_images'] / d.train_img_s + r['predict_images'] / d.predict_img_s
        fixed = d.build_s + d.warmup_s.clip(lower=0) + d.save_s
        out.append({'mode': mode, 'archs': len(d), 'runs': len(d) * r['runs_per_arch'],
                    'compute_min': float((per_run * r['runs_per_arch']).sum() / 60),
                    'fixed_min': float((fixed * r['runs_per_arch']).sum() / 60),
                    'total_min': float(((per_run + fixed) * r['runs_per_arch']).sum() / 60)})
    return pd.DataFrame(out)


def markdown(res, data, proj, env)->str:
    def tab(df, fmt='.2f'):
        cols = list(df.columns)
        rows = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
        for _, r in df.iterrows():
            rows.append('| ' + ' | '.join(f'{v:{fmt}}' if isinstance(v, float) else str(v) for v in r) + ' |')
        return '\n'.join(rows)
    piv = res.pivot(index='arch', columns='mode', values='train_img_s')
    if {'recipe', 'fastai_fp32'} <= set(piv.columns): piv['ratio recipe/fp32'] = piv['recipe'] / piv['fastai_fp32']
    if {'recipe', 'plain_recipe'} <= set(piv.columns): piv['fastai overhead (plain/recipe)'] = piv['plain_recipe'] / piv['recipe']
    dp = data.groupby('path').img_per_s.median()
    return '\n\n'.join([
        f"# GPU benchmark ({env['device']}, {env['when']})",
        f"torch {env['torch']}, fastai {env['fastai']}; {env['note']}",
        '## Training images/s (steady epoch, data on the device)', tab(piv.reset_index()),
        '## Per-run costs', tab(res.drop(columns=['device'])),
        f"## Data path alone ({int(data.workers.iloc[0])} workers, {int(data['size'].iloc[0])} px, augmentation on the device; "
        f"identical batches: {bool(data.identical_batches.all())})",
        f"median img/s: fastai {dp.get('fastai', float('nan')):.0f}, cache {dp.get('cache', float('nan')):.0f}, "
        f"ratio {dp.get('cache', float('nan')) / dp.get('fastai', float('nan')):.2f}x",
        '## Balanced Phase 2 grid, projected from these per-run costs (minutes; one device, runs one after another)',
        tab(proj) if len(proj) else '(no recipe/fastai rows)'])


def main(argv=None):
    import torch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--archs', default=None, help='comma-separated (default: the Phase 2 seven; toy: tiny_cnn,resnet18)')
    ap.add_argument('--toy', action='store_true', help='tiny sizes on the CPU (the default without CUDA)')
    ap.add_argument('--device', default=None); ap.add_argument('--bs', type=int, default=None)
    ap.add_argument('--n-train', type=int, default=None); ap.add_argument('--epochs', type=int, default=None)
    ap.add_argument('--size', type=int, default=None, help='input side (default: each arch\'s own)')
    ap.add_argument('--aug', action='store_true', help='augmentation on the device during the training measurement')
    ap.add_argument('--no-plain', action='store_true'); ap.add_argument('--profile', default=None, metavar='ARCH')
    ap.add_argument('--workers', type=int, default=None); ap.add_argument('--blocks', type=int, default=None)
    ap.add_argument('--out', default=None); ap.add_argument('--work', default=None)
    a = ap.parse_args(argv)
    from mugshotrace.core import write_csv, write_text, write_json
    from mugshotrace.train.archs import PHASE2_ARCHS
    import fastai
    cuda = torch.cuda.is_available() and a.device != 'cpu'
    toy = a.toy or not cuda
    device = torch.device(a.device or ('cuda' if cuda else 'cpu'))
    d = dict(archs='tiny_cnn,resnet18', bs=8, n_train=16, epochs=2, size=32, workers=0, blocks=1, data_n=24, data_size=32, data_bs=8) if toy else \
        dict(archs=','.join(PHASE2_ARCHS), bs=128, n_train=4096, epochs=3, size=None, workers=min(15, (os.cpu_count() or 2) - 1), blocks=2,
             data_n=4096, data_size=299, data_bs=128)
    for k, v in d.items():
        if getattr(a, k, None) is None: setattr(a, k, v)
    if toy:
        torch.set_num_threads(1)
        import warnings; warnings.filterwarnings('ignore', message='.*CUDA is not available.*')   # to_bf16 on the CPU
    out = Path(a.out or f'bench/results/gpu-{time.strftime("%Y%m%d-%H%M%S")}'); work = Path(a.work or tempfile.mkdtemp(prefix='bench_gpu_'))
    env = {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({os.cpu_count()} cores)', 'when': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
           'torch': torch.__version__, 'fastai': fastai.__version__, 'toy': toy, 'load_average': os.getloadavg()[0],
           'note': 'toy size (CPU smoke run: the numbers are not a GPU measurement)' if toy else 'full size',
           'args': {k: v for k, v in vars(a).items()}}
    rows = []
    for arch in a.archs.split(','):
        for mode in ('recipe', 'fastai_fp32'):
            rows.append(bench_fastai(arch, mode, a, device, work)); print(f"{arch:28s} {mode:12s} {rows[-1]['train_img_s']:9.1f} img/s  warm-up {rows[-1]['warmup_s']:6.2f} s", flush=True)
        if not a.no_plain:
            rows.append(bench_plain(arch, a, device)); print(f"{arch:28s} {'plain_recipe':12s} {rows[-1]['train_img_s']:9.1f} img/s", flush=True)
    res = pd.DataFrame(rows)
    data = data_path(a, device, work)
    proj = project(res)
    env['load_average_after'] = os.getloadavg()[0]
    write_csv(out / 'results.csv', res); write_csv(out / 'data_path.csv', data); write_csv(out / 'projection.csv', proj)
    write_json(out / 'env.json', env)
    md = markdown(res, data, proj, env)
    if a.profile: md += '\n\n## Profiler: ' + a.profile + ' (recipe, 10 steps)\n\n```\n' + profile(a.profile, a, device) + '\n```'
    write_text(out / 'results.md', md + '\n')
    print(md); print(f'\nwritten: {out}')
    return out


if __name__ == '__main__':
    main()
