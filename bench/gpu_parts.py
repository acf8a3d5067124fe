"""Measurements behind `bench/bench_gpu.py` (issue 19): one architecture trained under one recipe with its per-run
costs, a plain PyTorch loop, the data path alone, several runs sharing one device, the fidelity of a recipe, the
profiler's top operators and the cost of starting a worker process. Each returns plain rows; the driver decides
what to run within its time budget and writes the tables.

A *recipe* is a name as in `mugshotrace.train.archs.parse_recipe`: `fp32` (fastai's default), `tf32`, `bf16`, each
optionally with `+cl` (channels_last) and `+compile`; it is applied exactly as the runner applies it
(`mugshotrace.train.recipe.recipe_applied`).
"""
import contextlib, os, subprocess, sys, time
from pathlib import Path
import numpy as np, pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench_data (the data path alone)


def sync(device):
    import torch
    if device.type == 'cuda': torch.cuda.synchronize(device)


def reset_peak(device):
    import torch
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device)->float:
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else float('nan')


def device_dls(n, size, mean, std, bs, device, seed=0, n_valid=None, aug=False, x=None, y=None, xv=None, yv=None):
    "fastai DataLoaders over uint8 images that live on `device` (random unless given; no decoding, no host-to-device copies)."
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
    def dl(k, shuffle, xx, yy):
        if xx is None:
            xx = torch.randint(0, 256, (k, 3, size, size), generator=g, dtype=torch.uint8)
            yy = torch.randint(0, 2, (k,), generator=g)
        tf = [IntToFloatTensor()] + (aug_transforms(size=None, **FACE_AUG) if aug else []) + [Normalize.from_stats(mean, std, cuda=device.type == 'cuda')]
        return DeviceDL(list(range(len(xx))), x=xx.to(device), y=yy.to(device), bs=bs, shuffle=shuffle, drop_last=shuffle, after_batch=tf, device=device, num_workers=0)
    dls = DataLoaders(dl(n, True, x, y), dl(n_valid or bs, False, xv, yv), device=device); dls.c = 2; dls.vocab = ['Black', 'White']
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


def steady_range(epoch_s:list, n:int)->dict:
    "Slowest and fastest steady epoch as images/s (the spread a ratio between recipes must exceed to mean anything)."
    st = epoch_s[1:] or epoch_s
    return {'train_img_s_low': n / max(st), 'train_img_s_high': n / min(st)}


def recipe_for(recipe:str, device)->dict:
    "The runner's settings for a recipe name; on the CPU autocast is inactive, so the precision is fp32 there."
    from mugshotrace.train.archs import parse_recipe
    r = parse_recipe(recipe)
    if device.type != 'cuda': r['precision'] = 'fp32'
    return r


def train_row(arch, recipe, a, device, work, tag='')->dict:
    "One arch under one recipe through fastai, as a run does it: build, `fit_one_cycle`, save, predictions."
    from mugshotrace.core import seed_everything
    from mugshotrace.train.models import face_learner, get_arch, save_bundle
    from mugshotrace.train.recipe import recipe_applied
    spec = get_arch(arch); size = a.size or max(spec.input_size, spec.min_size)
    dls = device_dls(a.n_train, size, spec.mean, spec.std, a.bs, device, aug=a.aug, n_valid=a.n_valid)
    reset_peak(device); seed_everything(0); sync(device); t = time.perf_counter()
    learn = face_learner(dls, spec, init='random', seed=0); learn.model.to(device)
    sync(device); build = time.perf_counter() - t
    timer = epoch_timer(device)
    with recipe_applied(learn, recipe_for(recipe, device)), learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(a.epochs, 1e-3, cbs=[timer])
    peak = peak_gib(device)
    ep = timer.times; steady = float(np.median(ep[1:])) if len(ep) > 1 else ep[0]
    t = time.perf_counter(); save_bundle(learn, work / f'{arch}-{recipe}{tag}', {'arch': spec.name, 'classes': ['Black', 'White'], 'input_size': size})
    save = time.perf_counter() - t
    test = dls.valid.new(shuffle=False); n_pred = len(test.x)
    sync(device); t = time.perf_counter()
    with learn.no_bar(): learn.get_preds(dl=test)     # fp32, eager: what the runner predicts with after training
    sync(device); pred = time.perf_counter() - t
    return {'arch': arch, 'mode': recipe + tag, 'recipe': recipe, 'input': size, 'bs': a.bs, 'device': str(device),
            'train_img_s': (a.n_train // a.bs) * a.bs / steady, **steady_range(ep, (a.n_train // a.bs) * a.bs),
            'first_epoch_s': ep[0], 'steady_epoch_s': steady,
            'warmup_s': ep[0] - steady, 'build_s': build, 'save_s': save, 'predict_img_s': n_pred / pred,
            'peak_gib': peak, 'epochs': len(ep)}


def plain_row(arch, recipe, a, device)->dict:
    "A plain PyTorch loop under the recipe's precision and memory format (no fastai callbacks): steady training images/s."
    import torch
    from mugshotrace.train.models import build_model, get_arch
    r = recipe_for(recipe, device)
    spec = get_arch(arch); size = a.size or max(spec.input_size, spec.min_size)
    fmt = torch.channels_last if r['channels_last'] else torch.contiguous_format
    model = build_model(spec, 2, 'random', seed=0).to(device).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), 1e-3); lossf = torch.nn.CrossEntropyLoss()
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1); std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    x = torch.randint(0, 256, (a.n_train, 3, size, size), dtype=torch.uint8, device=device); y = torch.randint(0, 2, (a.n_train,), device=device)
    ac = torch.autocast(device.type, dtype=torch.bfloat16) if r['precision'] == 'bf16' else contextlib.nullcontext()
    times = []
    for _ in range(a.epochs):
        sync(device); t = time.perf_counter()
        for s in range(0, a.n_train - a.bs + 1, a.bs):
            xb = ((x[s:s + a.bs].float() / 255 - mean) / std).contiguous(memory_format=fmt)
            with ac: loss = lossf(model(xb), y[s:s + a.bs])
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        sync(device); times.append(time.perf_counter() - t)
    steady = float(np.median(times[1:])) if len(times) > 1 else times[0]
    return {'arch': arch, 'mode': 'plain:' + recipe, 'recipe': recipe, 'input': size, 'bs': a.bs, 'device': str(device),
            'train_img_s': (a.n_train // a.bs) * a.bs / steady, **steady_range(times, (a.n_train // a.bs) * a.bs),
            'first_epoch_s': times[0], 'steady_epoch_s': steady,
            'warmup_s': times[0] - steady, 'epochs': len(times)}


def profile_table(arch, recipe, a, device)->str:
    "The PyTorch profiler's top operators over one epoch of 13 batches under `recipe` (after a warm-up epoch)."
    from torch.profiler import profile as tprofile, ProfilerActivity
    from mugshotrace.train.models import face_learner, get_arch
    from mugshotrace.train.recipe import recipe_applied
    spec = get_arch(arch); size = a.size or max(spec.input_size, spec.min_size)
    dls = device_dls(a.bs * 13, size, spec.mean, spec.std, a.bs, device)
    learn = face_learner(dls, spec, init='random', seed=0); learn.model.to(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with recipe_applied(learn, recipe_for(recipe, device)), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
        with tprofile(activities=acts) as prof: learn.fit(1, 1e-3)
    key = 'cuda_time_total' if device.type == 'cuda' else 'cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=15)


def data_path(a, device, work)->pd.DataFrame:
    "Images/s of today's loader and of the cache (augmentation on, after_batch on `device`), same invocation."
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


def process_start_s(device)->float:
    "Wall seconds for a fresh worker process to import torch, fastai and the runner and touch the device."
    code = ("import time; t = time.perf_counter(); import torch, fastai.vision.all, mugshotrace.study.runner; "
            f"torch.zeros(1, device='{device.type}').sum().item(); print(time.perf_counter() - t)")
    t = time.perf_counter()
    subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, env={**os.environ, 'PYTHONPATH': os.pathsep.join(sys.path)})
    return time.perf_counter() - t


def _share_child(arch, recipe, a, device_str, barrier, q):
    "One of several concurrent runs on one device: a warm-up epoch, then (all together) timed epochs."
    import torch
    device = torch.device(device_str)
    if device.type == 'cpu': torch.set_num_threads(1)
    from mugshotrace.train.models import face_learner, get_arch
    from mugshotrace.train.recipe import recipe_applied
    spec = get_arch(arch); size = a.size or max(spec.input_size, spec.min_size)
    dls = device_dls(a.n_train, size, spec.mean, spec.std, a.bs, device)
    learn = face_learner(dls, spec, init='random', seed=0); learn.model.to(device)
    timer = epoch_timer(device)
    with recipe_applied(learn, recipe_for(recipe, device)), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)                                  # warm-up, alone in time
        barrier.wait(); t = time.perf_counter()
        learn.fit(a.epochs, 1e-3, cbs=[timer])
    q.put({'img_s': (a.n_train // a.bs) * a.bs * a.epochs / sum(timer.times), 'wall_s': time.perf_counter() - t, 'peak_gib': peak_gib(device)})


def share_row(arch, recipe, k, a, device)->dict:
    "k runs of `arch` training at the same time on one device (separate processes): their summed images/s."
    import multiprocessing as mp
    ctx = mp.get_context('spawn'); barrier = ctx.Barrier(k); q = ctx.Queue()
    procs = [ctx.Process(target=_share_child, args=(arch, recipe, a, str(device), barrier, q)) for _ in range(k)]
    for p in procs: p.start()
    res = []
    while len(res) < k:
        try: res.append(q.get(timeout=5))
        except Exception:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs: p.kill()
                raise RuntimeError(f'a shared run died (exit codes {[p.exitcode for p in procs]})') from None
    for p in procs: p.join()
    return {'arch': arch, 'recipe': recipe, 'concurrent': k, 'img_s_total': sum(r['img_s'] for r in res),
            'img_s_each': float(np.mean([r['img_s'] for r in res])), 'peak_gib_each': float(np.mean([r['peak_gib'] for r in res])), 'device': str(device)}


def fidelity_data(folder, size, device_type):
    "uint8 image tensors and 0/1 labels of a prepared folder (`images/*.jpg`, `labels.csv`: image_id, person_id, label), split by person."
    import torch
    from PIL import Image
    from mugshotrace.labels.sampling import keyed_uniform   # the package's person split
    lab = pd.read_csv(Path(folder) / 'labels.csv')
    valid = lab.person_id.map(lambda p: keyed_uniform(0, str(p), 'fidelity') < 0.25).to_numpy()
    x = np.stack([np.asarray(Image.open(Path(folder) / 'images' / f'{i}.jpg').convert('RGB').resize((size, size), Image.BILINEAR)) for i in lab.image_id])
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(); y = torch.as_tensor((lab.label == sorted(lab.label.unique())[0]).to_numpy().astype(np.int64))
    v = torch.from_numpy(valid)
    return x[~v], y[~v], x[v], y[v]


def colour_task(n, size, seed=0):
    "A learnable stand-in when no prepared folder is given: class 1 images are slightly redder (noise otherwise)."
    import torch
    g = torch.Generator().manual_seed(seed); y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 200, (n, 3, size, size), generator=g).float()
    x[:, 0] += 40 * y.view(-1, 1, 1).float()
    x = x.clamp(0, 255).to(torch.uint8); k = int(n * 0.75)
    return x[:k], y[:k], x[k:], y[k:]


def fidelity_rows(arch, recipes, a, device, data)->list:
    "Held-out accuracy of `arch` trained under each recipe, for each seed (random init, same data and schedule)."
    import torch
    from mugshotrace.core import seed_everything
    from mugshotrace.train.models import face_learner, get_arch
    from mugshotrace.train.recipe import recipe_applied
    spec = get_arch(arch); xt, yt, xv, yv = data; rows = []
    for seed in range(a.fid_seeds):
        for recipe in recipes:
            dls = device_dls(len(xt), xt.shape[-1], spec.mean, spec.std, a.fid_bs, device, x=xt, y=yt, xv=xv, yv=yv)
            seed_everything(seed); learn = face_learner(dls, spec, init='random', seed=seed); learn.model.to(device)
            with recipe_applied(learn, recipe_for(recipe, device)), learn.no_bar(), learn.no_logging():
                learn.fit_one_cycle(a.fid_epochs, a.fid_lr)
            with learn.no_bar(): p, t = learn.get_preds(dl=dls.valid.new(shuffle=False))
            rows.append({'arch': arch, 'recipe': recipe, 'seed': seed, 'correct': int((p.argmax(1) == t).sum()), 'n': len(t),
                         'accuracy': float((p.argmax(1) == t).float().mean()), 'size': xt.shape[-1], 'epochs': a.fid_epochs})
    return rows


def fidelity_summary(df:pd.DataFrame)->pd.DataFrame:
    "Per arch and recipe: pooled accuracy with a Wilson 95% interval; the difference to fp32 with Newcombe's interval."
    from statsmodels.stats.proportion import proportion_confint, confint_proportions_2indep
    out = []
    for arch, d in df.groupby('arch', sort=False):
        base = d[d.recipe == 'fp32']; cb, nb = base.correct.sum(), base.n.sum()
        for recipe, r in d.groupby('recipe', sort=False):
            c, n = r.correct.sum(), r.n.sum(); lo, hi = proportion_confint(c, n, method='wilson')
            row = {'arch': arch, 'recipe': recipe, 'accuracy': c / n, 'ci_low': lo, 'ci_high': hi, 'n': n,
                   'seed_spread': r.accuracy.max() - r.accuracy.min()}
            if recipe != 'fp32' and nb:
                dl, dh = confint_proportions_2indep(c, n, cb, nb, method='newcomb')
                row.update(diff_vs_fp32=c / n - cb / nb, diff_low=dl, diff_high=dh, within_noise=bool(dl <= 0 <= dh))
            out.append(row)
    return pd.DataFrame(out)
