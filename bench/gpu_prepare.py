"""Prepare the folder `.gpu/` (git-ignored) that a device session carries to the GPU machine (issue 19):

- `.gpu/whl/`: wheels of the Python packages the benchmark imports that the device image lacks (fastai and its
  fast.ai dependencies, the packages fastprogress's HTML output pulls in), for Python 3.12 on x86-64, pinned to the
  versions installed here;
- `.gpu/fidelity/`: a small semi-synthetic benchmark (`mugshotrace.synth`, 160 × 200 JPEGs, the true race as the
  label, person ids for the split) for the fidelity check of `bench/bench_gpu.py` (the device has no dlib to render
  it there).

    python bench/gpu_prepare.py            # then: the device `run` with carry ['.gpu'] and `bash bench/gpu_session.sh`
"""
import argparse, importlib.metadata as md, shutil, subprocess, sys, tempfile
from pathlib import Path

# imported by bench/bench_gpu.py (and the cuda tests) but absent from the device image's package list
# (/work/.library/device/KINDS.md, 'Python packages already there')
MISSING_ON_DEVICE = ('fastai', 'fastcore', 'fastprogress', 'fasttransform', 'fastdownload', 'plum-dispatch', 'beartype',
                     'python-fasthtml', 'starlette', 'python-multipart', 'itsdangerous', 'httpx2', 'httpcore2', 'trio',
                     'outcome', 'sniffio', 'truststore', 'defusedxml', 'narwhals')
PLATFORMS = ('manylinux_2_28_x86_64', 'manylinux_2_17_x86_64', 'manylinux2014_x86_64')


def wheels(dest:Path)->list:
    "Download the pinned wheels (no dependencies: each one is listed) for CPython 3.12 on x86-64."
    pins = [f'{d}=={md.version(d)}' for d in MISSING_ON_DEVICE]
    cmd = [sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '--only-binary=:all:', '--python-version', '3.12',
           '--implementation', 'cp', *[a for p in PLATFORMS for a in ('--platform', p)], '-d', str(dest), *pins]
    subprocess.run(cmd, check=True)
    return sorted(p.name for p in dest.glob('*.whl'))


def fidelity_set(dest:Path, people:int=600)->int:
    "A small synth benchmark with `labels.csv` (image_id, person_id, label = true race) for the fidelity check."
    import pandas as pd
    from mugshotrace.synth.benchmark import SynthConfig, make_benchmark, load_truth
    bench = Path(tempfile.mkdtemp(prefix='gpu_fidelity_')) / 'bench'   # the render folder stays behind
    make_benchmark(bench, SynthConfig(people=people, width=160, height=200), workers=2, progress=False)
    t = load_truth(bench)
    (dest / 'images').mkdir(parents=True, exist_ok=True)
    for i in t.image_id:
        f = dest / 'images' / f'{i}.jpg'
        if not f.exists(): f.write_bytes((bench / 'images' / f'{i}.jpg').read_bytes())
    pd.DataFrame({'image_id': t.image_id, 'person_id': t.person_id, 'label': t.race}).to_csv(dest / 'labels.csv', index=False)
    shutil.rmtree(bench.parent); return len(t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--dest', default='.gpu'); ap.add_argument('--people', type=int, default=600)
    a = ap.parse_args(argv); dest = Path(a.dest)
    print('wheels:', ', '.join(wheels(dest / 'whl')))
    print('fidelity images:', fidelity_set(dest / 'fidelity', a.people))
    size = sum(f.stat().st_size for f in dest.rglob('*') if f.is_file())
    print(f'{dest}: {size / 2**20:.1f} MiB to carry (the limit is 64 MiB with the working tree)')


if __name__ == '__main__':
    main()
