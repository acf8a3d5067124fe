"""CPU training throughput (images/second): mugshotrace's data path vs plain fastai reading the original files.

Both sides train the same architecture (resnet18, random init, one-cycle) for the same number of epochs on the
same images and labels at the same input size. The baseline is what a fastai user writes first:
`ImageDataLoaders.from_df` over the original mugshot-sized JPEGs (decode + resize every epoch) and
`vision_learner`. The package side preprocesses once (`faces.preprocess(variant='resized')`, the seed's
"original resized" variant, written as small files) and trains through `data.face_dataloaders` + `models.face_learner`.
The preprocessing time is reported separately: it is paid once per study, not per run.

    python bench/bench_train.py [--n 256] [--size 64] [--epochs 1] [--bs 32]
"""
import argparse, shutil, sys, tempfile, time
from pathlib import Path
import numpy as np, pandas as pd
from PIL import Image


def make_images(out: Path, n: int, seed: int = 0) -> pd.DataFrame:
    "n mugshot-sized (480x600) JPEGs with a class-dependent brightness; the synth benchmark is used when present."
    try:
        from mugshotrace.synth import benchmark as synth
        root = synth.make_benchmark(out/'synth', synth.SynthConfig(), progress=False)
        df = pd.read_csv(Path(root)/'labels.csv').head(n)
        return df.assign(label=df.race_court, root=str(root))
    except Exception as e:
        print(f'(synth benchmark unavailable: {type(e).__name__}; using generated 480x600 JPEGs)', file=sys.stderr)
    rng = np.random.default_rng(seed); rows = []
    (out/'images').mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lab = ('Black', 'White')[i % 2]
        small = rng.normal(80 if lab == 'Black' else 170, 30, (60, 48, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(small).resize((480, 600), Image.BILINEAR).save(out/'images'/f'{i:05d}.jpg', quality=90)
        rows.append(dict(image_id=f'{i:05d}', path=f'images/{i:05d}.jpg', label=lab))
    return pd.DataFrame(rows).assign(root=str(out))


def fit_throughput(learn, epochs: int, n_train: int) -> float:
    with learn.no_bar(), learn.no_logging():
        t = time.perf_counter(); learn.fit_one_cycle(epochs, 1e-3); dt = time.perf_counter() - t
    return epochs * n_train / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=256); ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--epochs', type=int, default=1); ap.add_argument('--bs', type=int, default=32)
    a = ap.parse_args()
    import torch
    from fastai.vision.all import ImageDataLoaders, Resize, ResizeMethod, vision_learner, aug_transforms, accuracy, Normalize, imagenet_stats
    from torchvision.models import resnet18
    from mugshotrace.faces import preprocess as faces; from mugshotrace.train import data as D
    from mugshotrace.train.models import face_learner, get_arch
    from mugshotrace.core import seed_everything
    tmp = Path(tempfile.mkdtemp(prefix='bench_train_'))
    try:
        df = make_images(tmp, a.n); root = Path(df.root.iloc[0])
        df = df.assign(is_valid=[i % 5 == 0 for i in range(len(df))])
        n_train = int((~df.is_valid).sum())
        # baseline: plain fastai on the original files
        seed_everything(0)
        dls0 = ImageDataLoaders.from_df(df, path=root, fn_col='path', label_col='label', valid_col='is_valid', bs=a.bs,
                                        item_tfms=Resize(a.size, method=ResizeMethod.Squish),
                                        batch_tfms=[*aug_transforms(), Normalize.from_stats(*imagenet_stats)], num_workers=0)
        learn0 = vision_learner(dls0, resnet18, pretrained=False, metrics=accuracy)
        base = fit_throughput(learn0, a.epochs, n_train)
        # mugshotrace: preprocess once, then the package's data path and learner
        t = time.perf_counter()
        faces.preprocess(df[['image_id', 'path']], root, 'resized', tmp/'faces', size=a.size, progress=False)
        prep = time.perf_counter() - t
        man = faces.load_manifest(tmp/'faces', 'resized')
        items = D.items_from(man, df.set_index('image_id').label, df.image_id, df.image_id[df.is_valid])
        spec = get_arch('resnet18')
        dls1 = D.face_dataloaders(items, a.size, spec.mean, spec.std, bs=a.bs, seed=0, classes=['Black', 'White'])
        learn1 = face_learner(dls1, 'resnet18', init='random', seed=0)
        ours = fit_throughput(learn1, a.epochs, n_train)
        print(f'images: {len(df)} ({n_train} train), input {a.size}px, resnet18, {a.epochs} epoch(s), torch threads {torch.get_num_threads()}')
        print(f'plain fastai, original files : {base:8.1f} img/s')
        print(f'mugshotrace data path        : {ours:8.1f} img/s')
        print(f'ratio mugshotrace / fastai   : {ours / base:8.2f}x')
        print(f'one-off preprocessing        : {prep:8.1f} s ({len(df) / prep:.1f} img/s), amortised over every run of a study')
    finally: shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__': main()
