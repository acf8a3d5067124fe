"""The training data path on the CPU: images per second per core of the decode-once cache (`train.cache`, through
`train.data.face_dataloaders(..., cache_dir=...)`) against today's path (fastai `DataBlock`: PIL decode + `Resize`
per item, every epoch), on 299-px JPEGs, in the same invocation, alternating A/B blocks so that a drifting machine
load hits both alike. One process, one torch thread (= one core) per path; the rate per core is also given from the
process's CPU time (images per CPU-second), which a shared machine's load inflates less than wall time. Checks that both paths give identical
batches for a fixed seed (augmentation off: every batch of an epoch, train and valid; augmentation on: the first
epoch's training batches), and prints the load average (the machine may be shared).

Two throughputs per path: `loader` = the uint8 batches the DataLoader's workers deliver (what the CPU must supply
while `after_batch` - int→float, augmentation, normalisation - runs on the GPU), and `epoch` = a full CPU epoch
through fastai's iterator with `after_batch` on the CPU (augmentation off).

    python bench/bench_data.py [--n 512] [--size 299] [--bs 64] [--blocks 3] [--out results.csv]
"""
import argparse, os, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np, pandas as pd
from PIL import Image


def make_images(folder, n, size=299, seed=0):
    "n face-like 299×299 JPEGs (an ellipse of skin tone on a random background, noise): the synth crops' size."
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed); yy, xx = np.mgrid[0:size, 0:size]
    m = ((xx - size / 2) / (size * .3)) ** 2 + ((yy - size / 2) / (size * .38)) ** 2 < 1
    files = []
    for i in range(n):
        f = folder / f'img{i:06d}.jpg'; files.append(str(f))
        if f.exists(): continue
        tone = rng.uniform(40, 230)
        a = np.where(m[..., None], np.array([tone, tone * .8, tone * .65]), rng.uniform(0, 255, 3)) + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(f, quality=90)
    return files


def items_for(files, valid_share=0.2):
    n = len(files); nv = max(1, int(n * valid_share))
    return pd.DataFrame({'image_id': [Path(f).stem for f in files], 'file': files,
                         'label': ['Black' if i % 2 else 'White' for i in range(n)], 'is_valid': [i >= n - nv for i in range(n)]})


def dls_for(items, size, bs, cache_dir, aug=False, seed=0):
    from mugshotrace.train.data import face_dataloaders
    return face_dataloaders(items, size, (0.5,) * 3, (0.5,) * 3, bs=bs, aug=aug, seed=seed, cache_dir=cache_dir)


def time_loader(dls):
    "Seconds to produce one epoch of uint8 training batches as the workers do (no after_batch)."
    dl = dls.train; idxs = dl.get_idxs(); t, c = time.perf_counter(), time.process_time(); n = 0
    for b in dl.create_batches(idxs): n += len(b[0])
    return time.perf_counter() - t, n, time.process_time() - c


def time_epoch(dls):
    "Seconds for one full training epoch through fastai's iterator on the CPU (after_batch included, aug off)."
    t, c = time.perf_counter(), time.process_time(); n = 0
    for xb, yb in dls.train: n += len(xb)
    return time.perf_counter() - t, n, time.process_time() - c


def identical(items, size, bs, cache_dir, aug):
    "Every batch equal (values, dtype and fastai type) between the two paths for seed 0."
    import torch
    def epoch(cd):   # build and iterate one path at a time: augmentation draws from the global RNGs
        d = dls_for(items, size, bs, cd, aug); return list(d.train) + ([] if aug else list(d.valid))
    pairs = list(zip(epoch(None), epoch(cache_dir)))
    ok = all(type(u) is type(v) and u.dtype == v.dtype and torch.equal(u, v) for p, q in pairs for u, v in zip(p, q))
    return ok, len(pairs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=512); ap.add_argument('--size', type=int, default=299)
    ap.add_argument('--bs', type=int, default=64); ap.add_argument('--blocks', type=int, default=3)
    ap.add_argument('--work', default=None); ap.add_argument('--out', default=None, help='CSV of the per-block timings')
    a = ap.parse_args(argv)
    import torch; torch.set_num_threads(1)
    work = Path(a.work or tempfile.mkdtemp(prefix='bench_data_'))
    files = make_images(work / f'imgs{a.size}', a.n, a.size)
    items = items_for(files); cache = work / 'cache'
    import shutil; shutil.rmtree(cache, ignore_errors=True)   # the one-off decode is timed from scratch
    import fastai.vision.all  # noqa: F401  (imported before the one-off build is timed)
    print(f'load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {a.n} images {a.size}x{a.size} JPEG, bs {a.bs}, 1 thread')
    t = time.perf_counter(); dls_for(items, a.size, a.bs, cache); tb = time.perf_counter() - t
    print(f'cache build (one-off decode + resize, 2 threads, incl. DataLoaders): {tb:.2f} s ({a.n / tb:.0f} img/s)')
    same_off, n_off = identical(items, a.size, a.bs, cache, aug=False)
    same_on, n_on = identical(items, a.size, a.bs, cache, aug=True)
    print(f'identical batches, seed 0: augmentation off {same_off} ({n_off} train+valid batches); '
          f'augmentation on {same_on} ({n_on} train batches)')
    rows = []
    for blk in range(a.blocks):
        for path, cd in (('fastai', None), ('cache', cache)):
            dls = dls_for(items, a.size, a.bs, cd)
            for what, fn in (('loader', time_loader), ('epoch', time_epoch)):
                s, n, c = fn(dls)
                rows.append({'block': blk, 'path': path, 'what': what, 'seconds': s, 'cpu_seconds': c, 'images': n, 'img_per_s': n / s, 'img_per_cpu_s': n / c})
    df = pd.DataFrame(rows)
    if a.out: df.to_csv(a.out, index=False)
    print(f'load average after: {os.getloadavg()[0]:.2f}')
    for what in ('loader', 'epoch'):
        for col, unit in (('img_per_s', 'img/s (wall)'), ('img_per_cpu_s', 'img per CPU-s (= img/s/core)')):
            d = df[df.what == what].pivot(index='block', columns='path', values=col)
            r = d['cache'] / d['fastai']
            print(f'{what:6s} {unit:28s}: fastai {d.fastai.median():7.0f}, cache {d.cache.median():7.0f}, '
                  f'ratio median {r.median():.2f}x (blocks {", ".join(f"{x:.2f}" for x in r)})' + ('  (target >= 3x)' if what == 'loader' else ''))
    if not (same_off and same_on): sys.exit('batches differ between the two paths')
    return {'timings': df, 'identical_aug_off': same_off, 'identical_aug_on': same_on, 'build_s': tb}


if __name__ == '__main__':
    main()
