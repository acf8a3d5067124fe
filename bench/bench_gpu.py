"""The GPU benchmark of issue 19, one command within a time budget. Per registered architecture: steady training
images/s of each recipe (fastai's fp32 default, bf16 + channels_last, and variants: bf16 alone, channels_last alone,
TF32, `torch.compile`), compute-bound (random uint8 images already on the device, `fit_one_cycle` through fastai,
random init, the recipe applied as the runner applies it); a plain PyTorch loop (what fastai's per-batch callbacks
cost); the per-run fixed costs (model build, first epoch minus a steady one, a second run's warm-up in the same
process, saving, predictions, starting a worker process); peak device memory; the data path alone (today's fastai
loader vs the decode-once cache, augmentation on the device); several runs sharing one device; the fidelity of each
chosen recipe (held-out accuracy against fp32, same data and seeds); and the balanced Phase 2 grid (42 runs)
projected from the measured per-run costs, before (fastai fp32, a fresh process and warm-up per run) and after
(each architecture's fastest measured recipe, warm workers).

Parts run in order of importance and each unit checks the time budget first (`--budget-s`), so a device session
that must end gets the most important numbers; every table is rewritten after each unit (a killed run leaves what
it measured). Writes `results.csv`, `data_path.csv`, `share.csv`, `fidelity.csv`, `projection.csv`, `env.json`,
`results.md` and `gpu_measured.txt` (the measured table in the form of `mugshotrace.train.archs.GPU_MEASURED`).

Full size wherever CUDA is present; `--toy` (the default without CUDA) runs tiny images, small architectures and a
few batches on the CPU so that CI keeps the script working (`tests/test_bench.py`).

    python bench/bench_gpu.py                               # CUDA: the 7 Phase 2 architectures, all parts, 400 s budget
    python bench/bench_gpu.py --parts table,data --archs resnet50,alexnet
    python bench/bench_gpu.py --toy --out /tmp/gpu_toy      # CPU smoke run
"""
import argparse, os, sys, tempfile, time, traceback
from pathlib import Path
import numpy as np, pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_parts as P

PARTS = ('table', 'warm', 'data', 'variants', 'fidelity', 'share', 'compile', 'profile')   # in order of importance
# the balanced run of bench/phase2_plan.md §2: fine_tune = 1 frozen + 4 unfrozen epochs of 3,200 training images
# (the frozen epoch counted as a full training epoch: an upper bound), 5 × 800 validation + 4 × 1,000 test predictions
BALANCED_RUN = dict(train_images=5 * 3200, predict_images=5 * 800 + 4 * 1000, runs_per_arch=6)
BASELINE, OLD_RECIPE = 'fp32', 'bf16+cl'
INT_ARGS = {'bs', 'n-train', 'n-valid', 'epochs', 'size', 'workers', 'blocks', 'data-n', 'data-size', 'data-bs',
            'fid-size', 'fid-n', 'fid-seeds', 'fid-epochs', 'fid-bs'}


def defaults(toy:bool, ncpu:int)->dict:
    from mugshotrace.train.archs import PHASE2_ARCHS
    if toy:
        return dict(archs='tiny_cnn,resnet18', bs=8, n_train=16, n_valid=8, epochs=2, size=32, workers=0, blocks=1, data_n=24,
                    data_size=32, data_bs=8, budget_s=0, parts='table,data,variants,warm,share,fidelity', variant_archs='tiny_cnn',
                    variants='bf16,fp32+cl,tf32', plain_archs='tiny_cnn', warm_archs='tiny_cnn', share_arch='tiny_cnn', share_k='1,2',
                    fid_archs='tiny_cnn', fid_size=32, fid_n=96, fid_seeds=2, fid_epochs=3, fid_bs=16, fid_lr=1e-2,
                    compile_archs='tiny_cnn', profile_arch='tiny_cnn')
    return dict(archs=','.join(PHASE2_ARCHS), bs=128, n_train=2048, n_valid=1024, epochs=3, size=None, workers=min(15, ncpu - 1),
                blocks=2, data_n=2048, data_size=299, data_bs=128, budget_s=400, parts=','.join(PARTS),
                variant_archs='alexnet,legacy_seresnet50', variants='bf16,fp32+cl,tf32', plain_archs='alexnet,resnet50',
                warm_archs='resnet50,densenet161', share_arch='alexnet', share_k='1,2,4', fid_archs='resnet50,vgg19_bn',
                fid_size=128, fid_n=0, fid_seeds=2, fid_epochs=5, fid_bs=64, fid_lr=2e-3, compile_archs='resnet50', profile_arch='legacy_seresnet50')


def best_recipes(res:pd.DataFrame, compile_s:dict|None=None)->dict:
    "Per arch, the recipe the package would choose from these measurements (`train.archs.choose_recipe`)."
    from mugshotrace.train.archs import choose_recipe
    if not len(res): return {}
    d = res[res['mode'] == res['recipe']]
    return {a: choose_recipe(dict(zip(g.recipe, g.train_img_s)), (compile_s or {}).get(a)) for a, g in d.groupby('arch')}


def project(res:pd.DataFrame, start_s:float=float('nan'))->pd.DataFrame:
    "The balanced Phase 2 grid's wall time, one device, runs one after another, from the measured per-run costs."
    r, out = BALANCED_RUN, []
    main = res[res['mode'] == res['recipe']].set_index(['arch', 'recipe'])
    again = res[res['mode'].str.endswith(':again')].set_index('arch')
    start = 0.0 if np.isnan(start_s) else start_s
    def cost(row): return r['train_images'] / row.train_img_s + r['predict_images'] / row.predict_img_s + row.build_s + row.save_s
    plans = {'before: fastai fp32, fresh process per run': {a: BASELINE for a in res.arch.unique()},
             'old recipe: bf16+cl for all, fresh process per run': {a: OLD_RECIPE for a in res.arch.unique()},
             'after: fastest measured recipe, warm workers': best_recipes(res)}
    for name, pick in plans.items():
        warm = name.startswith('after'); tot = comp = fixed = 0.0; n = 0; missing = []
        for a, rec in pick.items():
            if (a, rec) not in main.index: missing.append(f'{a}:{rec}'); continue
            row = main.loc[(a, rec)]; w = max(row.warmup_s, 0.0); k = r['runs_per_arch']; n += k
            comp += k * (r['train_images'] / row.train_img_s + r['predict_images'] / row.predict_img_s)
            if warm:   # one process per arch: start and first warm-up once, the other runs pay a second run's warm-up
                w2 = max(again.loc[a, 'warmup_s'], 0.0) if a in again.index else w
                fixed += start + w + (k - 1) * w2 + k * (row.build_s + row.save_s)
            else: fixed += k * (start + w + row.build_s + row.save_s)
        out.append({'plan': name, 'runs': n, 'compute_min': comp / 60, 'fixed_min': fixed / 60, 'total_min': (comp + fixed) / 60,
                    'process_start_s': start_s, 'missing': ';'.join(missing)})
    df = pd.DataFrame(out)
    if len(df) and df.total_min.iloc[-1] > 0: df['speedup_vs_before'] = df.total_min.iloc[0] / df.total_min
    return df


def gpu_measured_text(res:pd.DataFrame, compile_s:dict)->str:
    "The measured table in the form of `train.archs.GPU_MEASURED` / `GPU_COMPILE_S` (to paste after a full-size run)."
    d = res[res['mode'] == res['recipe']]
    m = {a: {r.recipe: int(round(r.train_img_s)) for r in g.itertuples()} for a, g in d.groupby('arch', sort=False)}
    return f'GPU_MEASURED = {m!r}\nGPU_COMPILE_S = {compile_s!r}\n'


def tab(df:pd.DataFrame, fmt='.2f')->str:
    if df is None or not len(df): return '(not measured)'
    cols = list(df.columns); rows = ['| ' + ' | '.join(map(str, cols)) + ' |', '|' + '---|' * len(cols)]
    for _, r in df.iterrows(): rows.append('| ' + ' | '.join(f'{v:{fmt}}' if isinstance(v, float) else str(v) for v in r) + ' |')
    return '\n'.join(rows)


def markdown(S)->str:
    res, env = S['res'], S['env']
    parts = [f"# GPU benchmark ({env['device']}, {env['when']})", f"torch {env['torch']}, fastai {env['fastai']}; {env['note']}; "
             f"elapsed {S['elapsed']():.0f} s of a {env['args']['budget_s']} s budget; skipped: {', '.join(S['skipped']) or 'nothing'}; "
             f"failed: {'; '.join(S['errors']) or 'nothing'}"]
    if len(res):
        main = res[res['mode'] == res['recipe']]
        piv = main.pivot(index='arch', columns='recipe', values='train_img_s')
        if BASELINE in piv:
            for c in [c for c in piv.columns if c != BASELINE]: piv[f'{c}/fp32'] = piv[c] / piv[BASELINE]
            best = best_recipes(res); piv['fastest'] = pd.Series(best)
            piv['fastest/fp32'] = [piv.loc[a, best[a]] / piv.loc[a, BASELINE] if a in best else np.nan for a in piv.index]
            rng = main.set_index(['arch', 'recipe'])
            def verdict(a):   # against the spread of the steady epochs: the fastest's slowest epoch vs fp32's fastest one
                if a not in best or (a, BASELINE) not in rng.index: return ''
                f, b = rng.loc[(a, best[a])], rng.loc[(a, BASELINE)]
                return 'fp32' if best[a] == BASELINE else 'faster' if f.train_img_s_low > b.train_img_s_high else \
                       'slower' if f.train_img_s_high < b.train_img_s_low else 'within epoch spread'
            piv['fastest vs fp32'] = [verdict(a) for a in piv.index]
        plain = res[res['mode'].str.startswith('plain:')]
        for r in plain.itertuples():
            if r.arch in piv.index and r.recipe in piv: piv.loc[r.arch, f'fastai overhead ({r.recipe}: plain/fastai)'] = r.train_img_s / piv.loc[r.arch, r.recipe]
        parts += ['## Training images/s (steady epoch, data on the device)', tab(piv.reset_index()),
                  '## Per-run costs (seconds; `:again` = a second run of the arch in the same process)', tab(res.drop(columns=['device']))]
    if S['start_s'] == S['start_s']: parts.append(f"Starting a worker process (imports + first device touch): {S['start_s']:.1f} s")
    if S['data'] is not None:
        data = S['data']; dp = data.groupby('path').img_per_s.median()
        parts += [f"## Data path alone ({int(data.workers.iloc[0])} workers, {int(data['size'].iloc[0])} px, augmentation on the device; "
                  f"identical batches: {bool(data.identical_batches.all())})",
                  f"median img/s: fastai {dp.get('fastai', np.nan):.0f}, cache {dp.get('cache', np.nan):.0f}, ratio {dp.get('cache', np.nan) / dp.get('fastai', np.nan):.2f}x"]
    if len(S['share']): parts += ['## Runs sharing one device (separate processes, summed images/s)', tab(pd.DataFrame(S['share']))]
    if len(S['fid']): parts += ['## Fidelity: held-out accuracy per recipe (Wilson 95%); difference to fp32 (Newcombe 95%)', tab(P.fidelity_summary(pd.DataFrame(S['fid'])), '.3f')]
    if S['compile_s']: parts += ['## torch.compile: one-off seconds added to the first epoch', tab(pd.DataFrame([{'arch': k, 'compile_s': v} for k, v in S['compile_s'].items()]))]
    if len(res): parts += ['## Balanced Phase 2 grid projected from these per-run costs (minutes; one device, runs one after another)', tab(project(res, S['start_s']))]
    if S['profile']: parts += [f"## Profiler: {S['profile'][0]}", '```\n' + S['profile'][1] + '\n```']
    return '\n\n'.join(parts) + '\n'


def flush(S, out:Path):
    from mugshotrace.core import write_csv, write_text, write_json
    res = S['res']
    if len(res): write_csv(out / 'results.csv', res); write_csv(out / 'projection.csv', project(res, S['start_s']))
    if S['data'] is not None: write_csv(out / 'data_path.csv', S['data'])
    if len(S['share']): write_csv(out / 'share.csv', pd.DataFrame(S['share']))
    if len(S['fid']): write_csv(out / 'fidelity.csv', P.fidelity_summary(pd.DataFrame(S['fid'])))
    if len(res): write_text(out / 'gpu_measured.txt', gpu_measured_text(res, S['compile_s']))
    S['env']['load_average_now'] = os.getloadavg()[0]; S['env']['skipped'] = S['skipped']; S['env']['errors'] = S['errors']
    write_json(out / 'env.json', S['env']); write_text(out / 'results.md', markdown(S))


def main(argv=None):
    import torch, fastai
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--toy', action='store_true', help='tiny sizes on the CPU (the default without CUDA)')
    ap.add_argument('--device', default=None); ap.add_argument('--out', default=None); ap.add_argument('--work', default=None)
    ap.add_argument('--aug', action='store_true', help='augmentation on the device during the training measurement')
    ap.add_argument('--fidelity-data', default=None, help='a folder with images/*.jpg and labels.csv (image_id, person_id, label); default: a colour task')
    for k, h in (('parts', 'comma-separated, of ' + ','.join(PARTS)), ('archs', 'the table\'s architectures'), ('budget-s', 'seconds; 0: no budget'),
                 ('bs', None), ('n-train', None), ('n-valid', None), ('epochs', None), ('size', 'input side (default: each arch\'s own)'),
                 ('workers', 'loader workers (data part)'), ('blocks', None), ('data-n', None), ('data-size', None), ('data-bs', None),
                 ('variant-archs', None), ('variants', 'recipes measured on the variant archs'), ('plain-archs', None), ('warm-archs', None),
                 ('share-arch', None), ('share-k', None), ('fid-archs', None), ('fid-size', None), ('fid-n', None), ('fid-seeds', None),
                 ('fid-epochs', None), ('fid-bs', None), ('fid-lr', None), ('compile-archs', None), ('profile-arch', None)):
        typ = float if k in ('fid-lr', 'budget-s') else int if k in INT_ARGS else str
        ap.add_argument('--' + k, default=None, type=typ, help=h)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and a.device != 'cpu'
    toy = a.toy or not cuda
    device = torch.device(a.device or ('cuda' if cuda else 'cpu'))
    for k, v in defaults(toy, os.cpu_count() or 2).items():
        if getattr(a, k) is None: setattr(a, k, v)
    if toy:
        torch.set_num_threads(1)
        import warnings; warnings.filterwarnings('ignore', message='.*CUDA is not available.*')   # to_bf16 on the CPU
    out = Path(a.out or f'bench/results/gpu-{time.strftime("%Y%m%d-%H%M%S")}'); work = Path(a.work or tempfile.mkdtemp(prefix='bench_gpu_'))
    t0 = time.perf_counter()
    env = {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({os.cpu_count()} cores)',
           'when': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'torch': torch.__version__, 'fastai': fastai.__version__,
           'toy': toy, 'load_average': os.getloadavg()[0], 'args': dict(vars(a)),
           'note': 'toy size (CPU smoke run: the numbers are not a GPU measurement)' if toy else 'full size'}
    S = dict(res=pd.DataFrame(), data=None, share=[], fid=[], compile_s={}, profile=None, start_s=float('nan'), skipped=[], errors=[], env=env,
             elapsed=lambda: time.perf_counter() - t0)
    def unit(what:str, fn):
        "Run one unit while the budget lasts; a unit that fails is recorded and the benchmark goes on."
        if a.budget_s and S['elapsed']() > a.budget_s:
            S['skipped'].append(what); print(f'skipped (time budget): {what}', flush=True); return None
        try: return fn()
        except Exception as e:
            S['errors'].append(f'{what}: {type(e).__name__}: {e}'[:400]); traceback.print_exc()
            if device.type == 'cuda': torch.cuda.empty_cache()
            flush(S, out); return None
    def add(row):
        S['res'] = pd.concat([S['res'], pd.DataFrame([row])], ignore_index=True); flush(S, out)
        print(f"{S['elapsed']():6.0f}s {row['arch']:26s} {row['mode']:22s} {row['train_img_s']:9.1f} img/s  warm-up {row['warmup_s']:6.2f} s", flush=True)
    def note(msg): flush(S, out); print(f"{S['elapsed']():6.0f}s {msg}", flush=True)
    parts = [p for p in a.parts.split(',') if p]
    bad = set(parts) - set(PARTS)
    if bad: raise SystemExit(f'unknown parts: {sorted(bad)}; choose from {PARTS}')
    for part in [p for p in PARTS if p in parts]:
        best = best_recipes(S['res'])
        if part == 'table':
            for arch in a.archs.split(','):
                for rec in (BASELINE, OLD_RECIPE): unit(f'table {arch} {rec}', lambda: add(P.train_row(arch, rec, a, device, work)))
                if arch in a.plain_archs.split(','): unit(f'plain {arch}', lambda: add(P.plain_row(arch, OLD_RECIPE, a, device)))
        elif part == 'warm':
            def start(): S['start_s'] = P.process_start_s(device); note(f"process start {S['start_s']:.1f} s")
            unit('process start', start)
            for arch in a.warm_archs.split(','):
                unit(f'warm {arch}', lambda: add(P.train_row(arch, best.get(arch, OLD_RECIPE), a, device, work, tag=':again')))
        elif part == 'data':
            def data(): S['data'] = P.data_path(a, device, work); note('data path done')
            unit('data path', data)
        elif part == 'variants':
            for arch in a.variant_archs.split(','):
                for rec in a.variants.split(','): unit(f'variant {arch} {rec}', lambda: add(P.train_row(arch, rec, a, device, work)))
        elif part == 'fidelity':
            fdata = unit('fidelity data', lambda: P.fidelity_data(a.fidelity_data, a.fid_size, device.type) if a.fidelity_data
                         else P.colour_task(a.fid_n or 2000, a.fid_size))
            for arch in a.fid_archs.split(',') if fdata is not None else []:
                recs = list(dict.fromkeys([BASELINE, best.get(arch, OLD_RECIPE), OLD_RECIPE]))
                def fid(): S['fid'] += P.fidelity_rows(arch, recs, a, device, fdata); note(f'fidelity {arch} done')
                unit(f'fidelity {arch}', fid)
        elif part == 'share':
            for k in map(int, a.share_k.split(',')):
                def share(): S['share'].append(P.share_row(a.share_arch, best.get(a.share_arch, OLD_RECIPE), k, a, device)); note(f"share x{k}: {S['share'][-1]['img_s_total']:.0f} img/s")
                unit(f'share {a.share_arch} x{k}', share)
        elif part == 'compile':
            for arch in a.compile_archs.split(','):
                rec = best.get(arch, OLD_RECIPE)
                def comp():
                    add(P.train_row(arch, rec + '+compile', a, device, work))
                    res = S['res']; eager = res[(res.arch == arch) & res['mode'].isin([rec + ':again', rec])].sort_values('mode')
                    # against an eager run of the same recipe later in the process (its autotuning already paid) where there is one
                    if len(eager): S['compile_s'][arch] = round(float(res.iloc[-1].warmup_s - eager.warmup_s.iloc[-1]), 1); note(f'compile {arch}')
                unit(f'compile {arch}', comp)
        elif part == 'profile':
            rec = best.get(a.profile_arch, OLD_RECIPE)
            def prof(): S['profile'] = (f'{a.profile_arch} ({rec}, 13 batches)', P.profile_table(a.profile_arch, rec, a, device)); note('profile done')
            unit('profile', prof)
    flush(S, out)
    print((out / 'results.md').read_text()); print(f'\nwritten: {out}')
    return out


if __name__ == '__main__':
    main()
