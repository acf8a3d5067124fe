"""Benchmarks of `mugshotrace.faces.preprocess`, each a ratio against a baseline run in the same invocation.

1. openface: `preprocess(workers=W)` (process pool) vs a naive single-process loop producing the same files, in this
   process (alternating slices) and cold (`cold`: each side in a fresh interpreter, every start-up cost counted);
2. mtcnn: batched detection (`faces_mtcnn.mtcnn_detect`, equal-size batches; one batch at a time, and two at a time
   in threads as `preprocess` runs it on the CPU) vs one facenet-pytorch `MTCNN.detect` call per image, on the same
   images, checking the boxes agree;
3. openface detection on a downscaled copy (`detect_max_side`, landmarks still on the full image) vs the faithful
   full-image detection: speed and what changes in the output (status, box, landmarks, pixels).

Images: the synth benchmark (`mugshotrace.synth.benchmark.make_benchmark`) when that module exists, else mugshot-sized
(480x600) rotations/scalings/brightness changes of the two real photos shipped with matplotlib and scikit-image.

    python bench/bench_faces.py [--n 500] [--workers 2] [--batch-size 16] [--n-mtcnn N] [--out DIR] [--only pool,cold,mtcnn,downscale]
"""
import argparse, os, shutil, sys, tempfile, time
from pathlib import Path
import numpy as np, pandas as pd
from PIL import Image

def make_images(d:Path, n:int, seed:int=0)->tuple[pd.DataFrame, Path, str]:
    "n images in `d` and their table; (table, images_root, source description)."
    try:
        from mugshotrace.synth.benchmark import make_benchmark, SynthConfig
        people = int(n / 1.7 * 1.15) + 2                     # ~1.7 bookings per person by default
        while True:
            root = make_benchmark(d/f'synth{people}', SynthConfig(people=people, seed=seed), workers=2, progress=False)
            lab = pd.read_csv(Path(root)/'labels.csv', dtype={'image_id': str})
            if len(lab) >= n: break
            people *= 2
        return lab[['image_id', 'path']].head(n).reset_index(drop=True), Path(root), f'synth benchmark ({len(lab)} made, first {n})'
    except ImportError: pass
    import cv2
    from mugshotrace.core import sample_face_photos
    rng = np.random.default_rng(seed); (d/'img').mkdir(parents=True, exist_ok=True); rows = []
    srcs = [np.asarray(Image.open(p).convert('RGB')) for p in sample_face_photos().values()]
    for k in range(n):
        a = srcs[k % 2]; h, w = a.shape[:2]
        M = cv2.getRotationMatrix2D((w / 2 + rng.normal(0, 10), h / 2 + rng.normal(0, 10)), rng.uniform(-15, 15), rng.uniform(0.8, 1.15))
        b = cv2.warpAffine(a, M, (w, h), borderMode=cv2.BORDER_REFLECT)
        b = np.clip(b * rng.uniform(0.7, 1.2) + rng.normal(0, 3, b.shape), 0, 255).astype(np.uint8)
        Image.fromarray(cv2.resize(b, (480, 600), interpolation=cv2.INTER_AREA)).save(d/'img'/f'im{k:04d}.jpg', quality=92)
        rows.append((f'im{k:04d}', f'im{k:04d}.jpg'))
    return pd.DataFrame(rows, columns=['image_id', 'path']), d/'img', 'warped real photos (grace_hopper, astronaut), 480x600'

def naive_openface(tab, root, out:Path, size):
    "The baseline: a plain loop, one process, writing the same files as `preprocess`."
    import cv2
    from mugshotrace.core import load_rgb, ImageError
    from mugshotrace.faces.align import align_openface
    from mugshotrace.faces.preprocess import output_name
    (out/'images').mkdir(parents=True, exist_ok=True); n_ok = 0
    for iid, p in zip(tab.image_id, tab.path):
        try: fc = align_openface(load_rgb(root/p, min_size=20)[0], size)
        except ImageError: continue
        cv2.imwrite(str(out/'images'/output_name(iid)), fc.image[..., ::-1]); n_ok += 1
    return n_ok

def bench_pool(tab, root, tmp, workers, size, blocks=5):
    "Alternate naive and pooled runs over `blocks` slices of the table, so that drifting load hits both alike."
    from mugshotrace.faces.preprocess import preprocess
    t_naive = t_pool = 0.; n_ok_naive = n_ok_pool = 0; same = True
    for k, sl in enumerate(np.array_split(np.arange(len(tab)), blocks)):
        part = tab.iloc[sl]
        t = time.perf_counter(); n_ok_naive += naive_openface(part, root, tmp/'naive', size); t_naive += time.perf_counter() - t
        t = time.perf_counter(); m = preprocess(part, root, 'openface', tmp/f'pool{k}', size=size, workers=workers, progress=False); t_pool += time.perf_counter() - t
        n_ok_pool += int((m.status == 'ok').sum())
        same &= all((tmp/'naive'/'images'/Path(f).name).read_bytes() == (tmp/f'pool{k}'/'openface'/f).read_bytes() for f in m.out_path.dropna())
    print(f'openface  naive loop      {len(tab) / t_naive:7.2f} img/s  ({t_naive:.1f} s, {n_ok_naive} ok)')
    print(f'openface  pool ({workers} procs)  {len(tab) / t_pool:7.2f} img/s  ({t_pool:.1f} s incl. pool start-up x{blocks}, {n_ok_pool} ok, same files: {same})')
    print(f'RATIO pool / naive = {t_naive / t_pool:.2f}x   (target >= 1.8x on 2 free cores)')
    return t_naive / t_pool

def bench_pool_cold(tab, root, tmp, workers, size):
    """Both sides in a fresh interpreter, as a user runs them once: imports, dlib's model loading and the fork server's
    start-up all counted. Baseline: a script running the naive loop; candidate: `mugshotrace preprocess --workers W`."""
    import subprocess
    tab.to_csv(tmp/'cold.csv', index=False)
    naive = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; import pandas as pd; "
             f"from bench_faces import naive_openface; naive_openface(pd.read_csv({str(tmp/'cold.csv')!r}, dtype={{'image_id': str}}), "
             f"Path({str(root)!r}), Path({str(tmp/'cold_naive')!r}), {size})")
    cli = ['-c', 'import sys; from mugshotrace.cli import main; sys.exit(main())', 'preprocess', '--images', str(root),
           '--table', str(tmp/'cold.csv'), '--variant', 'openface', '--out', str(tmp/'cold_pool'), '--size', str(size),
           '--workers', str(workers), '--quiet']
    t = time.perf_counter(); subprocess.run([sys.executable, '-c', naive], check=True); t_naive = time.perf_counter() - t
    t = time.perf_counter(); subprocess.run([sys.executable, *cli], check=True); t_pool = time.perf_counter() - t
    m = pd.read_csv(tmp/'cold_pool'/'openface'/'manifest.csv')
    same = all((tmp/'cold_naive'/'images'/Path(f).name).read_bytes() == (tmp/'cold_pool'/'openface'/f).read_bytes() for f in m.out_path.dropna())
    print(f'openface cold: naive script {len(tab) / t_naive:7.2f} img/s ({t_naive:.1f} s) | `mugshotrace preprocess --workers {workers}` '
          f'{len(tab) / t_pool:7.2f} img/s ({t_pool:.1f} s), same files: {same}')
    print(f'RATIO cold pool / naive = {t_naive / t_pool:.2f}x   (target >= 1.8x on 2 free cores)')
    return t_naive / t_pool

def bench_mtcnn(tab, root, batch_size, streams=2):
    """Per-image facenet-pytorch `detect` vs `mtcnn_detect` on equal-size batches, one batch at a time and -- what
    `preprocess` does on the CPU -- `streams` batches at a time in threads sharing torch's threads."""
    from concurrent.futures import ThreadPoolExecutor
    from facenet_pytorch import MTCNN
    from mugshotrace.core import load_rgb
    from mugshotrace.faces.mtcnn import mtcnn_detect, mtcnn_model, default_device, split_torch_threads
    imgs = [load_rgb(root/p)[0] for p in tab.path]
    shape = max({a.shape for a in imgs}, key=[a.shape for a in imgs].count); imgs = [a for a in imgs if a.shape == shape]
    dev = default_device(); mt = MTCNN(select_largest=True, keep_all=True, device=dev); mtcnn_model(device=dev)
    mt.detect(Image.fromarray(imgs[0])); mtcnn_detect(imgs[:2], device=dev)             # warm up
    n_streams = streams if dev == 'cpu' else 1
    t_single = t_batch = t_conc = 0.; single, batched, conc = [], [], []
    for i in range(0, len(imgs), 2 * n_streams * batch_size):   # alternate the three, so drifting load hits all alike
        chunk = imgs[i:i + 2 * n_streams * batch_size]; parts = [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
        t = time.perf_counter(); single += [mt.detect(Image.fromarray(a), landmarks=True) for a in chunk]; t_single += time.perf_counter() - t
        t = time.perf_counter()
        for b in parts: batched += mtcnn_detect(b, device=dev)
        t_batch += time.perf_counter() - t
        t = time.perf_counter()
        with split_torch_threads(n_streams), ThreadPoolExecutor(n_streams) as ex:
            for r in ex.map(lambda b: mtcnn_detect(b, device=dev), parts): conc += r
        t_conc += time.perf_counter() - t
    def agree(res): return sum((s[0] is None and b is None) or (s[0] is not None and b is not None and np.allclose(np.asarray(s[0][0], float), b[0][0], atol=0.05))
                               for s, b in zip(single, res))
    print(f'mtcnn     per-image detect {len(imgs) / t_single:7.2f} img/s  ({t_single:.1f} s, device {dev}, {len(imgs)} images {shape[1]}x{shape[0]})')
    print(f'mtcnn     batched ({batch_size:3d})     {len(imgs) / t_batch:7.2f} img/s  ({t_batch:.1f} s, one batch at a time; largest box agrees on {agree(batched)}/{len(imgs)})')
    print(f'mtcnn     batched, {n_streams} streams {len(imgs) / t_conc:7.2f} img/s  ({t_conc:.1f} s, as preprocess runs it; largest box agrees on {agree(conc)}/{len(imgs)})')
    print(f'RATIO batched / per-image = {t_single / t_batch:.2f}x (one stream), {t_single / t_conc:.2f}x ({n_streams} streams, as preprocess)   (target >= 2x on the CPU)')
    return t_single / t_conc

def bench_downscale(tab, root, sides=(320,), upscale=(1, 2.5)):
    "Faithful full-image detection vs detection on a downscaled copy (landmarks on the full image)."
    import cv2
    from mugshotrace.core import load_rgb, ImageError
    from mugshotrace.faces.align import align_openface
    base = [load_rgb(root/p)[0] for p in tab.path]
    for up in upscale:
        imgs = base if up == 1 else [cv2.resize(a, None, fx=up, fy=up, interpolation=cv2.INTER_CUBIC) for a in base]
        def run(side):
            t = time.perf_counter(); res = []
            for a in imgs:
                try: res.append(align_openface(a, 299, detect_max_side=side))
                except ImageError: res.append(None)
            return time.perf_counter() - t, res
        t_full, full = run(None)
        for side in sides:
            t_small, small = run(side)
            both = [(f, s) for f, s in zip(full, small) if f is not None and s is not None]
            def iou(a, b):
                w = max(0, min(a[2], b[2]) - max(a[0], b[0])); h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
                return w * h / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h)
            same = [(f, s) for f, s in both if iou(f.box, s.box) > 0.5]
            lm = np.median([np.abs(f.landmarks - s.landmarks).mean() for f, s in same]) if same else np.nan
            lm_rel = np.median([np.abs(f.landmarks - s.landmarks).mean() / (f.box[2] - f.box[0]) for f, s in same]) if same else np.nan
            px = np.median([np.abs(f.image.astype(float) - s.image.astype(float)).mean() for f, s in same]) if same else np.nan
            same_px = np.mean([np.array_equal(f.image, s.image) for f, s in same]) if same else np.nan
            print(f'downscale images {imgs[0].shape[1]}x{imgs[0].shape[0]}, detect on longer side {side}: '
                  f'{t_full / t_small:.2f}x faster; ok full {sum(f is not None for f in full)} vs downscaled {sum(s is not None for s in small)}; '
                  f'same face chosen (IoU>0.5) {len(same)}/{len(both)}; among those: identical outputs {same_px:.0%}, '
                  f'median landmark shift {lm:.2f} px ({lm_rel:.1%} of face width), median mean |pixel diff| {px:.2f}/255')

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=500); ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--batch-size', type=int, default=16); ap.add_argument('--size', type=int, default=299)
    ap.add_argument('--n-downscale', type=int, default=40, help='images for the downscale comparison')
    ap.add_argument('--blocks', type=int, default=5, help='alternate naive/pool over this many slices (cancels load drift)')
    ap.add_argument('--n-mtcnn', type=int, help='images for the mtcnn comparison (default: all)')
    ap.add_argument('--out', help='work folder (default: a temp folder, removed)')
    ap.add_argument('--only', default='pool,cold,mtcnn,downscale')
    a = ap.parse_args(argv)
    tmp = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix='bench_faces_'))
    try:
        tab, root, what = make_images(tmp/'data', a.n)
        print(f'{len(tab)} images: {what}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}')
        only = a.only.split(',')
        if 'pool' in only: bench_pool(tab, root, tmp, a.workers, a.size, a.blocks)
        if 'cold' in only: bench_pool_cold(tab, root, tmp, a.workers, a.size)
        if 'mtcnn' in only: bench_mtcnn(tab.head(a.n_mtcnn or len(tab)), root, a.batch_size)
        if 'downscale' in only: bench_downscale(tab.head(a.n_downscale), root)
        print(f'load average at the end {os.getloadavg()[0]:.1f} (other processes share these cores)')
    finally:
        if not a.out: shutil.rmtree(tmp, ignore_errors=True)

if __name__ == '__main__': main()
