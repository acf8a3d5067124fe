"Tests of `mugshotrace explain STUDY --extremes k` (`interp.extremes`, `interp.explain.explain_study`): selection on a CPU-scale study, pooled per-race tables, the between-race test's size and power."
import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest

from mugshotrace.core import load_rgb, sample_face_photos, write_csv, write_json, write_study_record
from mugshotrace.interp.extremes import (select_extremes, pooled_by_group, simulate_region_rows, by_race_table, permutation_pvalues,
                                         _cluster_sums)
from mugshotrace.audit.study import fabricate_study_audit

RACES = ('Black', 'White')
N = 4   # images per race (2 persons of 2 images each)
# correct predictions out of N per (label source, run variant, test variant, race): the known answer of the selection
CORRECT = {('student', 'openface', 'openface', 'Black'): 2, ('student', 'openface', 'resized', 'Black'): 1,
           ('student', 'resized', 'resized', 'Black'): 3, ('student', 'resized', 'openface', 'Black'): 4,
           ('student', 'openface', 'openface', 'White'): 3, ('student', 'openface', 'resized', 'White'): 1,
           ('student', 'resized', 'resized', 'White'): 2, ('student', 'resized', 'openface', 'White'): 2,
           ('court', 'openface', 'openface', 'Black'): 3, ('court', 'openface', 'resized', 'Black'): 1,
           ('court', 'openface', 'openface', 'White'): 1, ('court', 'openface', 'resized', 'White'): 3}
RUNS = (('openface', 'student'), ('resized', 'student'), ('openface', 'court'))


def _toy_study(tmp:Path, size=96):
    """A study folder with three finished tiny_cnn runs (two student, one court), two preprocessing variants and every
    run tested on both variants' images (cross-variant test sets) and on both label sources' test sets. The openface
    images are aligned faces with landmarks; the resized images are noise with no face and no landmarks file, so a
    scenario's rows have landmarks exactly when its images come from the openface variant."""
    from PIL import Image
    from mugshotrace.faces.align import align_openface
    from mugshotrace.train.models import build_model, save_bundle
    study = tmp/'study'; faces = study/'faces'; rng = np.random.default_rng(0)
    man = {v: [] for v in ('openface', 'resized')}; lms, labels = [], []
    for race, (_, p) in zip(RACES, sample_face_photos().items()):
        fc = align_openface(load_rgb(p)[0], size)
        for j in range(N):
            iid = f'{race[0]}{j}'
            im = np.clip(fc.image.astype(float) * rng.uniform(0.7, 1.3) + rng.normal(0, 8, fc.image.shape), 0, 255).astype(np.uint8)
            for v, a in (('openface', im), ('resized', rng.integers(0, 255, im.shape, dtype=np.uint8))):
                (faces/v/'images').mkdir(parents=True, exist_ok=True); Image.fromarray(a).save(faces/v/'images'/f'{iid}.png')
                man[v].append(dict(image_id=iid, variant=v, status='ok', reason='', out_path=f'images/{iid}.png'))
            lms += [dict(image_id=iid, point=q, x=a[0], y=a[1], out_x=b[0], out_y=b[1]) for q, (a, b) in enumerate(zip(fc.landmarks, fc.landmarks_out))]
            labels.append(dict(image_id=iid, person_id=f'p{race[0]}{j // 2}', path=f'images/{iid}.png', race_court=race, race_student=race))
    for v in man: write_csv(faces/v/'manifest.csv', pd.DataFrame(man[v]))
    write_csv(faces/'openface'/'landmarks.csv', pd.DataFrame(lms))
    write_csv(study/'labels.csv', pd.DataFrame(labels))
    write_study_record(study, 'toy', study/'labels.csv', study/'images', faces, runs=str(study/'runs'))
    ids = {r: [f'{r[0]}{j}' for j in range(N)] for r in RACES}
    for i, (variant, source) in enumerate(RUNS):
        rid = f'tiny_cnn-{variant}-{source}'; run = study/'runs'/rid
        info = save_bundle(build_model('tiny_cnn', 2, 'random', seed=i).eval(), run,
                           dict(arch='tiny_cnn', classes=list(RACES), input_size=64, variant=variant))
        write_json(run/'config.json', dict(run_id=rid, arch='tiny_cnn', variant=variant, label_source=source, task='race2',
                                           sampling='balanced', init='random', seed=0))
        write_json(run/'state.json', dict(run_id=rid, state='done'))
        for tv in ('openface', 'resized'):
            for src in ('court', 'student'):
                for race in RACES:
                    # the other label source's sets are extreme on purpose: picking them would change every selection
                    k = CORRECT[(source, variant, tv, race)] if src == source else (N if race == 'Black' else 0)
                    other = RACES[1 - RACES.index(race)]
                    pred = [race] * k + [other] * (N - k); conf = rng.uniform(0.55, 0.99, N)
                    df = pd.DataFrame({'image_id': ids[race], 'Black_Prob': np.where(np.array(pred) == 'Black', conf, 1 - conf)})
                    df['White_Prob'] = 1 - df['Black_Prob']
                    df = df.assign(Prediction=pred, label=race, race=race, ethnicity='nonHispanic', group=f'{race[0]}nH')
                    pdir = run/'preds' if tv == variant else run/'preds'/'variants'/tv
                    write_csv(pdir/f'{src}__{race}.csv', df)
                    write_json(pdir/f'{src}__{race}.json', dict(run_id=rid, dataset=f'{src}/{race}', label_source=src, variant=tv,
                                                               model_sha256=info['weights_sha256'], inverted=False, n=N))
    return study


@pytest.fixture(scope='module')
def explained(tmp_path_factory):
    import torch
    from mugshotrace.cli import main
    study = _toy_study(tmp_path_factory.mktemp('extremes')); threads = torch.get_num_threads(); torch.set_num_threads(1)
    try: assert main(['explain', str(study), '--extremes', '1', '--bs', '8', '--n-boot', '200', '--n-perm', '199', '--no-progress']) == 0
    finally: torch.set_num_threads(threads)
    return study, study/'explain'


def test_extremes_cover_cross_variant_and_only_the_own_label_source(explained):
    study, out = explained
    ext = pd.read_csv(out/'extremes.csv', dtype={'best_image': str, 'worst_image': str})
    assert len(ext) == 2 * 2 * 2                                         # label sources × races × ends, k = 1
    assert all(t.split(':')[-1].startswith(f'{s}/') for s, t in zip(ext.label_source, ext.test_set))
    assert all(r.endswith('-' + s) for r, s in zip(ext.run_id, ext.label_source))
    got = {(r.label_source, r.race, r.end): (r.run_id, r.test_set) for r in ext.itertuples()}
    assert got == {('student', 'Black', 'high'): ('tiny_cnn-resized-student', 'openface:student/Black'),
                   ('student', 'Black', 'low'): ('tiny_cnn-openface-student', 'resized:student/Black'),
                   ('student', 'White', 'high'): ('tiny_cnn-openface-student', 'student/White'),
                   ('student', 'White', 'low'): ('tiny_cnn-openface-student', 'resized:student/White'),
                   ('court', 'Black', 'high'): ('tiny_cnn-openface-court', 'court/Black'),
                   ('court', 'Black', 'low'): ('tiny_cnn-openface-court', 'resized:court/Black'),
                   ('court', 'White', 'high'): ('tiny_cnn-openface-court', 'resized:court/White'),
                   ('court', 'White', 'low'): ('tiny_cnn-openface-court', 'court/White')}
    acc = {(r.label_source, r.race, r.end): r.accuracy for r in ext.itertuples()}
    assert acc[('student', 'Black', 'high')] == 1.0 and acc[('student', 'White', 'low')] == pytest.approx(1 / N)
    assert ext.cross_variant.sum() == 5 and (ext.m[ext.label_source == 'student'] == 4).all()
    assert ((ext.ci_low <= ext.accuracy) & (ext.accuracy <= ext.ci_high)).all()
    # best / worst per selected scenario, and its figure
    assert ext.loc[ext.accuracy == 1.0, 'worst_image'].isna().all() and ext.best_image.notna().all()
    assert ((ext.best_confidence >= 0.5) & (ext.best_confidence <= 1)).all()
    for f in ext.figure: assert (out/f).stat().st_size > 1000
    # cross-variant scenarios were explained on the test variant's images: only openface images have landmarks
    ex = pd.read_csv(out/'explained.csv', dtype={'image_id': str})
    assert set(ex.test_variant) == {'openface', 'resized'}
    assert (ex.has_landmarks == (ex.test_variant == 'openface')).all()
    assert all(t.split(':')[-1].startswith(f'{s}/') for s, t in zip(ex.label_source, ex.test_set))
    assert {'openface:student/Black', 'openface:student/White'} <= set(ex.test_set[ex.run_id == 'tiny_cnn-resized-student'])  # paired
    assert set(ex.person_id) == {f'p{r[0]}{j}' for r in RACES for j in range(N // 2)}
    info = json.loads((out/'extremes.json').read_text())
    assert info['audit'] == 'computed' and info['clusters'] == 'person_id' and info['show_faces'] is False and info['cross_variant_selected'] == 5


def test_pooled_region_and_faithfulness_tables(explained):
    from mugshotrace.interp.regions import REGIONS, COARSE_REGIONS
    from mugshotrace.core import registered_figures
    _, out = explained
    reg = pd.read_csv(out/'regions_by_race.csv')
    assert set(reg.region) == set(REGIONS) and set(reg.race) == set(RACES) and set(reg.label_source) == {'court', 'student'}
    for (src, race), d in reg.groupby(['label_source', 'race']): assert d.share.sum() == pytest.approx(1.0)   # shares pooled over images sum to 1
    st = reg[reg.label_source == 'student']
    assert (st.n_models == 2).all() and (st.n_images == N).all() and (st.n_persons == N // 2).all() and (st.n_rows == 2 * N).all()
    assert ((reg.ci_low <= reg.share + 1e-12) & (reg.share <= reg.ci_high + 1e-12)).all()
    assert reg.p_between_race.between(1 / 200, 1).all() and (reg.q_between_race >= reg.p_between_race - 1e-12).all()
    coarse = pd.read_csv(out/'regions_by_race_coarse.csv')
    assert set(coarse.region) == set(COARSE_REGIONS)
    a = coarse.set_index(['label_source', 'race', 'region']).share; b = reg.set_index(['label_source', 'race', 'region']).share
    for src in ('court', 'student'):
        for race in RACES: assert a[(src, race, 'nose')] == pytest.approx(b[(src, race, 'mid_nose')] + b[(src, race, 'lower_nose')])
    fa = pd.read_csv(out/'faithfulness_by_race.csv')
    assert set(fa.metric) == {'deletion_gain', 'insertion_gain'} and set(fa.race) == set(RACES)
    assert (fa.n_rows[fa.label_source == 'student'] == 3 * N).all()        # every explained row, with or without landmarks
    figs = registered_figures(out).set_index('file')
    assert not figs.loc[str(out/'figures'/'regions_by_race_student.png'), 'may_show_face']


def test_rerun_reuses_the_per_run_work(explained):
    from mugshotrace.interp.explain import explain, ExplainConfig
    from mugshotrace.study.folder import Study
    study, out = explained
    pngs = sorted((out/'runs').rglob('figures/best_worst/*.png')); stamp = {p: p.stat().st_mtime_ns for p in pngs}
    from mugshotrace.audit.frame import AuditFrame
    before = pd.read_csv(out/'extremes.csv')
    AuditFrame.from_runs(Study.open(study)).to_csv(study/'audit'/'audit.csv')       # the study's own audit table is used when there
    r = explain(Study.open(study), cfg=ExplainConfig(extremes=1, bs=8, n_boot=200, n_perm=199), progress=False)
    assert r.out == out and len(r.scenarios) == 8 and all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    assert json.loads((out/'extremes.json').read_text())['audit'] == str(study/'audit'/'audit.csv')
    after = pd.read_csv(out/'extremes.csv')
    assert list(after.run_id) == list(before.run_id) and list(after.test_set) == list(before.test_set)


def test_a_study_without_extremes_is_refused(tmp_path, capsys):
    from mugshotrace.cli import main
    from mugshotrace.core import write_study_record
    write_study_record(tmp_path, 'empty', tmp_path/'labels.csv', tmp_path/'images', tmp_path/'faces')
    assert main(['explain', str(tmp_path)]) == 2
    assert '--extremes' in capsys.readouterr().err


def test_selection_known_answer_on_a_fabricated_phase2_audit():
    "42 runs × 6 test sets; accuracies a known function of the design: the selection equals the answer, per label source."
    archs = ('alexnet', 'densenet161', 'inceptionv4', 'resnet50', 'se_resnet50', 'se_resnext50', 'vgg19')
    def acc(a, v, s, tv, r):
        x = 0.5 + 0.01 * archs.index(a) + 0.1 * ('resized', 'openface', 'mtcnn').index(tv) + (0.003 if s == 'court' else 0)
        return x if r == 'Black' else 1.3 - x
    ex = select_extremes(fabricate_study_audit(acc), k=5)
    assert len(ex) == 2 * 2 * 2 * 5 and (ex.m == 63).all()
    for src in ('court', 'student'):
        hb = ex[(ex.label_source == src) & (ex.race == 'Black') & (ex.end == 'high')]
        assert list(hb.arch) == ['vgg19'] * 3 + ['se_resnext50'] * 2 and (hb.test_variant == 'mtcnn').all()
        assert list(hb.variant) == ['mtcnn', 'openface', 'resized', 'mtcnn', 'openface']      # ties by run id
        assert list(hb.cross_variant) == [False, True, True, False, True]
        assert list(hb['rank']) == [1, 2, 3, 4, 5] and hb.accuracy.is_monotonic_decreasing
        assert hb.accuracy.to_numpy() == pytest.approx([0.763] * 3 + [0.753] * 2 if src == 'court' else [0.76] * 3 + [0.75] * 2)
        lw = ex[(ex.label_source == src) & (ex.race == 'White') & (ex.end == 'low')]
        assert list(lw.arch) == ['vgg19'] * 3 + ['se_resnext50'] * 2 and lw.accuracy.is_monotonic_increasing
        assert (ex.run_id[ex.label_source == src].str.endswith(src)).all()
    assert ex.cross_variant.any()


# ---------------------------------------------------------------- the between-race test: power and size
def test_planted_region_difference_is_found():
    "Race A's maps concentrate on the mouth, race B's on the forehead: both regions flagged with the right sign."
    rows = simulate_region_rows(effect=0.08, seed=3).assign(label_source='court')
    t = by_race_table(rows, ['forehead', 'eyes', 'mouth', 'jaw'], n_boot=300, n_perm=299).set_index(['region', 'race'])
    assert t.loc[('mouth', 'A')].share > t.loc[('mouth', 'B')].share and t.loc[('mouth', 'A')].q_between_race < 0.05
    assert t.loc[('forehead', 'A')].share < t.loc[('forehead', 'B')].share and t.loc[('forehead', 'A')].q_between_race < 0.05
    assert t.loc[('mouth', 'A')].ci_low > t.loc[('mouth', 'B')].ci_high


def _null_rates(reps, n_perm, seed0=0, naive=False):
    regs = ['forehead', 'eyes', 'mouth', 'jaw']; hits, any_hit = 0, 0
    for s in range(reps):
        d = simulate_region_rows(n_persons=20, models=3, effect=0.0, person_sd=30., seed=seed0 + s)
        cl = d.index.astype(str) if naive else d.person_id
        S, n, lab = _cluster_sums(d.assign(cl=cl), regs, 'race', 'cl')
        p = permutation_pvalues(S, n, lab, n_perm, seed=s)
        hits += p[regs.index('mouth')] <= 0.05
        from mugshotrace.audit.stats import adjust_pvalues
        any_hit += (adjust_pvalues(p, 'fdr_bh') <= 0.05).any()
    return hits / reps, any_hit / reps


def test_no_planted_difference_rejects_at_the_nominal_rate():
    "Strong person effects seen by 3 models, no race effect: the person-level test rejects ≈5%; a row-level test would not."
    rate, any_rate = _null_rates(300, 99)
    se = np.sqrt(0.05 * 0.95 / 300)
    assert rate <= 0.05 + 3 * se and any_rate <= 0.05 + 3 * se, (rate, any_rate)
    naive, _ = _null_rates(200, 99, naive=True)
    print(f'null rejection: person-level {rate:.3f} (any region {any_rate:.3f}), row-level {naive:.3f}')
    assert naive > 0.10, naive                  # treating the 3 maps of a person as independent over-rejects


@pytest.mark.slow
def test_between_race_test_size_and_power_simulation():
    rate, any_rate = _null_rates(2000, 199, seed0=10_000)
    print(f'null: mouth rejected {rate:.4f}, any region (BH) {any_rate:.4f} over 2000 studies')
    se = np.sqrt(0.05 * 0.95 / 2000)
    assert abs(rate - 0.05) <= 3 * se and any_rate <= 0.05 + 3 * se
    power = np.mean([by_race_table(simulate_region_rows(n_persons=40, effect=0.08, seed=s).assign(label_source='x'),
                                   ['forehead', 'eyes', 'mouth', 'jaw'], n_boot=50, n_perm=199).set_index(['region', 'race'])
                     .loc[('mouth', 'A')].q_between_race <= 0.05 for s in range(200)])
    print(f'power at an 8-point shift, 40 persons per race: {power:.3f}')
    assert power > 0.9


@pytest.mark.slow
def test_explain_extremes_on_a_synth_study(tmp_path):
    """synth → two preprocessing variants → 4 real tiny_cnn runs (run_grid) → audit → `explain STUDY --extremes 2`: with 2 runs × 2
    test variants per label source and race, the 2 highest and 2 lowest cover every scenario, cross-variant ones included."""
    import yaml
    from mugshotrace.cli import main
    from mugshotrace.study.grid import run_grid
    synth = pytest.importorskip('mugshotrace.synth.benchmark')
    bench = synth.make_benchmark(tmp_path/'bench', synth.SynthConfig(people=40, seed=2, width=240, height=300), progress=False)
    cols = {s: {'race': f'race_{s}', 'ethnicity': f'ethnicity_{s}'} for s in ('court', 'student')}
    study = {'name': 'mini', 'data': {'labels': {'table': str(bench/'labels.csv'), 'columns': cols}, 'images': str(bench),
                                      'preprocessed': str(tmp_path/'faces'), 'preprocess': {'size': 96, 'progress': False}, 'truth': str(bench)},
             'train': {'epochs': 1, 'size': 64, 'bs': 8, 'n_per_class': 6, 'init': 'random', 'aug': False},
             'grid': {'arch': ['tiny_cnn'], 'variant': ['openface', 'resized'], 'label_source': ['court', 'student']}, 'runs': str(tmp_path/'runs')}
    sp = tmp_path/'study.yaml'; sp.write_text(yaml.safe_dump(study))
    df = run_grid(sp, progress=False); assert (df.state == 'done').all(), df
    assert main(['audit', str(tmp_path), '--n-boot', '50', '--no-progress']) == 0
    assert main(['explain', str(tmp_path), '--extremes', '2', '--max-images', '6', '--n-boot', '200', '--n-perm', '199', '--no-progress']) == 0
    out = tmp_path/'explain'
    ext = pd.read_csv(out/'extremes.csv')
    print(ext[['label_source', 'race', 'end', 'run_id', 'test_set', 'accuracy', 'ci_low', 'ci_high']].to_string())
    assert len(ext) == 16 and ext.cross_variant.sum() == 8 and all(t.split(':')[-1].startswith(f'{s}/') for s, t in zip(ext.label_source, ext.test_set))
    assert (ext.m == 4).all()                                     # 2 runs × 2 test variants per label source and race
    ex = pd.read_csv(out/'explained.csv', dtype={'image_id': str})
    assert set(ex.test_variant) == {'openface', 'resized'} and ex.test_set.str.contains(':').any()   # cross-variant covered
    reg = pd.read_csv(out/'regions_by_race.csv'); print(reg.to_string())
    assert set(reg.label_source) == {'court', 'student'} and (reg.n_models >= 1).all() and reg.groupby(['label_source', 'race']).share.sum().round(6).eq(1).all()
    assert json.loads((out/'extremes.json').read_text())['synthetic'] is True
