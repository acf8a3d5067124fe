"""The semi-synthetic benchmark: determinism, subgroup shares, recovered label-noise rates, detector-friendliness,
person consistency of bookings, the CLI, and (slow) learnability of the attributes at 64x64."""
import argparse, json, subprocess, sys
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from mugshotrace.core import UserError, load_rgb
from mugshotrace.labels.tables import consensus
from mugshotrace.vocab import SUBGROUPS
from mugshotrace.synth.benchmark import (SynthConfig, make_benchmark, load_truth, plan_benchmark, simulate_labels, majority_error,
                               quota_counts, add_synth_parser, config_from_args, synth, SynthResult)
from mugshotrace.vocab import SUBGROUP_ATTRS as GROUP_ATTRS

CLEAN = SynthConfig(people=14, seed=5)   # default biases off, no cue: ~24 images

@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    return make_benchmark(tmp_path_factory.mktemp('synth')/'clean', CLEAN, workers=2, progress=False)

def _se(p, n): return np.sqrt(max(p * (1 - p), 1e-4) / n)

# --- determinism ---------------------------------------------------------------------------------------------------

def test_same_seed_gives_identical_bytes_in_another_process(bench, tmp_path):
    "A fresh process (the CLI, one worker) reproduces labels.csv, votes.csv, truth.json and every JPEG byte for byte."
    out = tmp_path/'again'
    r = subprocess.run([sys.executable, '-m', 'mugshotrace.cli', 'synth', '--out', str(out), '--people', str(CLEAN.people),
                        '--seed', str(CLEAN.seed), '--no-progress'], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    files = ['labels.csv', 'votes.csv', 'truth.json'] + sorted(p.relative_to(bench).as_posix() for p in (bench/'images').glob('*.jpg'))
    assert len(files) > 3 + CLEAN.people
    for f in files: assert (bench/f).read_bytes() == (out/f).read_bytes(), f
    assert sorted(p.name for p in (out/'images').iterdir()) == sorted(p.name for p in (bench/'images').iterdir())

def test_different_seed_or_bias_changes_what_it_should():
    a, b = plan_benchmark(SynthConfig(people=50, seed=1)), plan_benchmark(SynthConfig(people=50, seed=2))
    assert not a.group.equals(b.group) or not a.render.equals(b.render)
    # label noise never changes the images; a cue changes only the cue flag of the render parameters
    c = plan_benchmark(SynthConfig(people=50, seed=1, court_noise=0.4, student_noise=0.3))
    d = plan_benchmark(SynthConfig(people=50, seed=1, cue_class='BH', cue_rate=1.0, cue_rate_other=0.0))
    assert a.render.tolist() == c.render.tolist()
    strip = lambda s: [{k: v for k, v in r.items() if k != 'cue'} for r in s]
    assert strip(a.render) == strip(d.render) and (d.cue == (d.group == 'BH')).all()

# --- population ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('underrep', [{}, {'BH': 0.3}, {'WnH': 0.0, 'WH': 2.0}])
def test_subgroup_shares_within_tolerance(underrep):
    cfg = SynthConfig(people=3000, seed=4, underrep=underrep)
    plan = plan_benchmark(cfg)
    base = {g: SynthConfig().shares[g] * cfg.underrep[g] for g in SUBGROUPS}
    want = {g: base[g] / sum(base.values()) for g in SUBGROUPS}                 # computed here, independently
    people = plan.drop_duplicates('person_id').group.value_counts(normalize=True).reindex(list(SUBGROUPS), fill_value=0)
    images = plan.group.value_counts(normalize=True).reindex(list(SUBGROUPS), fill_value=0)
    for g in SUBGROUPS:
        assert abs(people[g] - want[g]) <= 1 / cfg.people + 1e-12, (g, people[g], want[g])   # exact quotas
        assert abs(images[g] - want[g]) < 0.02, (g, images[g], want[g])                       # bookings are random
    if underrep.get('BH') == 0.3: assert abs(want['BH'] - 0.0918 * 0.3 / (0.9998 - 0.0918 * 0.7)) < 1e-9
    # the default shares are the seed's arrestee shares
    assert SynthConfig().shares == {'BH': 0.0918, 'WH': 0.3970, 'BnH': 0.3796, 'WnH': 0.1314}
    nb = plan.groupby('person_id').size().value_counts(normalize=True).sort_index()
    assert np.allclose(nb.values, cfg.bookings, atol=0.03)

@pytest.mark.parametrize('cls,col', [('Hispanic', 'ethnicity'), ('White', 'race'), ('BnH', 'group')])
def test_spurious_cue_rates_match(cls, col):
    cfg = SynthConfig(people=3000, seed=6, cue_class=cls, cue_rate=0.8, cue_rate_other=0.15)
    plan = plan_benchmark(cfg)
    inside = (plan[col] == cls).values
    for m, p in ((inside, 0.8), (~inside, 0.15)):
        assert abs(plan.cue.values[m].mean() - p) < 4 * _se(p, m.sum()), (cls, p, plan.cue.values[m].mean())
    assert all(r['cue'] == c for r, c in zip(plan.render, plan.cue))
    assert not plan_benchmark(SynthConfig(people=300, seed=6)).cue.any()      # off by default

def test_quota_counts_sum_and_round():
    for n in (1, 7, 99, 1000):
        c = quota_counts(SynthConfig().effective_shares, n)
        assert sum(c.values()) == n and all(abs(c[g] - n * SynthConfig().effective_shares[g]) < 1 for g in SUBGROUPS)

# --- labels --------------------------------------------------------------------------------------------------------

NOISE = {'BH': 0.30, 'WH': 0.10, 'BnH': 0.0, 'WnH': 0.20}

@pytest.fixture(scope='module')
def noisy():
    cfg = SynthConfig(people=6000, seed=9, shares={g: .25 for g in SUBGROUPS}, court_noise=NOISE,
                      student_noise={'BH': 0.25, 'WH': 0.05, 'BnH': 0.15, 'WnH': 0.0}, student_raters=7, bookings=(0.7, 0.3))
    plan = plan_benchmark(cfg)
    labels, votes = simulate_labels(plan, cfg)
    return cfg, plan, labels, votes

def test_court_noise_rates_match_per_subgroup(noisy):
    cfg, plan, labels, _ = noisy
    for g in SUBGROUPS:
        m = (plan.group == g).values
        for attr in ('race', 'ethnicity'):
            rate = (labels[f'{attr}_court'].values[m] != plan[attr].values[m]).mean()
            assert abs(rate - NOISE[g]) < 4 * _se(NOISE[g], m.sum()), (g, attr, rate)
        both = ((labels.race_court.values[m] != plan.race.values[m]) & (labels.ethnicity_court.values[m] != plan.ethnicity.values[m])).mean()
        assert abs(both - NOISE[g] ** 2) < 4 * _se(NOISE[g] ** 2, m.sum())      # attributes flip independently

def test_student_votes_and_majority_match_requested_noise(noisy):
    cfg, plan, labels, votes = noisy
    t = plan.set_index('image_id')
    v = votes.join(t[['race', 'ethnicity', 'group']], on='image_id')
    v['wrong'] = np.where(v.attribute == 'race', v.value != v.race, v.value != v.ethnicity)
    assert len(votes) == len(plan) * 7 * 2 and votes.rater_id.nunique() == 7
    for g, rate in v.groupby('group').wrong.mean().items():
        p = cfg.student_noise[g]; assert abs(rate - p) < 4 * _se(p, (v.group == g).sum()), (g, rate, p)
    for r, rate in v[v.group == 'BH'].groupby('rater_id').wrong.mean().items():   # every rater, not just on average
        assert abs(rate - 0.25) < 4 * _se(0.25, (v[v.group == 'BH'].rater_id == r).sum())
    for g in SUBGROUPS:
        m = (plan.group == g).values
        rate = (labels.race_student.values[m] != plan.race.values[m]).mean()
        want = majority_error(cfg.student_noise[g], 7)
        assert abs(rate - want) < 4 * _se(want, m.sum()) + 1e-9, (g, rate, want)
    # an independent majority: labels.consensus over votes.csv gives the student columns exactly
    c = consensus(votes, source='student').set_index('image_id').loc[labels.image_id]
    assert (c.race_student.values == labels.race_student.values).all() and (c.ethnicity_student.values == labels.ethnicity_student.values).all()

def test_majority_error_against_simulation():
    rng = np.random.default_rng(0)
    for p, R in ((0.1, 5), (0.3, 3), (0.45, 7)):
        sim = ((rng.random((200_000, R)) < p).sum(1) > R // 2).mean()
        assert abs(sim - majority_error(p, R)) < 0.004

# --- the rendered benchmark ----------------------------------------------------------------------------------------

def test_files_follow_the_contract(bench):
    lab, votes, truth = pd.read_csv(bench/'labels.csv'), pd.read_csv(bench/'votes.csv'), load_truth(bench)
    assert list(lab.columns) == ['image_id', 'path', 'person_id', 'booking', 'race_court', 'ethnicity_court', 'race_student', 'ethnicity_student',
                                 'gender_court', 'skin_tone_court', 'gender_student', 'skin_tone_student']
    assert list(votes.columns) == ['image_id', 'rater_id', 'attribute', 'value']
    raw = json.loads((bench/'truth.json').read_text())
    assert set(raw) >= {'config', 'images'} and SynthConfig.from_dict(raw['config']) == CLEAN
    assert truth.image_id.is_unique and set(truth.image_id) == set(lab.image_id)
    assert {'race', 'ethnicity', 'group', 'cue', 'person_id', 'booking', 'source', 'render', 'gender', 'skin_tone'} <= set(truth.columns)
    assert (truth.group == [{v: k for k, v in GROUP_ATTRS.items()}[(r, e)] for r, e in zip(truth.race, truth.ethnicity)]).all()
    labels, _ = simulate_labels(plan_benchmark(CLEAN), CLEAN)
    pd.testing.assert_frame_equal(lab, labels)
    for p in lab.path:
        img, info = load_rgb(bench/p)
        assert (info.width, info.height, info.format) == (480, 600, 'JPEG')
    assert not any(p.name.startswith('.') and p.suffix == '.tmp' for p in bench.rglob('*'))   # no temp files left

def test_bookings_share_person_id_and_attributes(bench):
    truth, lab = load_truth(bench), pd.read_csv(bench/'labels.csv')
    assert truth.person_id.nunique() == CLEAN.people and (truth.groupby('person_id').size() > 1).any()
    for pid, g in truth.groupby('person_id'):
        assert sorted(g.booking) == list(range(1, len(g) + 1))
        assert g.image_id.str.startswith(pid + '_').all()
        for col in ('race', 'ethnicity', 'group', 'source'): assert g[col].nunique() == 1, (pid, col)
        r = list(g.render)
        for k in ('tone', 'geometry', 'identity', 'source'): assert all(x[k] == r[0][k] for x in r), (pid, k)
        if len(g) > 1: assert len({(x['rotation'], x['gain'], x['quality']) for x in r}) == len(g)   # bookings vary
    assert (lab.set_index('image_id').person_id == truth.set_index('image_id').person_id.loc[lab.image_id]).all()

@pytest.fixture(scope='module')
def dlib_faces(bench):
    "dlib (upsample 1, as the pipeline uses) on every clean benchmark image: image_id -> (box, 68 landmarks) or None."
    from mugshotrace.faces.landmarks import detect_faces, landmarks68
    out = {}
    for i in load_truth(bench).image_id:
        img, _ = load_rgb(bench/'images'/f'{i}.jpg')
        b = detect_faces(img, upsample=1)
        out[i] = (img, b[0], landmarks68(img, b[0])) if b else None
    return out

def test_rendered_attributes_are_measurable(bench, dlib_faces):
    "Known answer on pixels: skin at the dlib cheeks is darker for Black, the dlib jaw (px / booking scale) is wider for Hispanic."
    import cv2
    rows = []
    for r in load_truth(bench).itertuples():
        if dlib_faces[r.image_id] is None: continue
        img, _, lm = dlib_faces[r.image_id]
        L = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)[..., 0].astype(float)
        cheeks = [L[int(y) - 5:int(y) + 6, int(x) - 5:int(x) + 6].mean() for x, y in (lm[[1, 2, 31]].mean(0), lm[[15, 14, 35]].mean(0))]
        rows.append(dict(race=r.race, ethnicity=r.ethnicity, source=r.source, L=np.mean(cheeks), jaw=np.linalg.norm(lm[4] - lm[12]) / r.render['scale']))
    d = pd.DataFrame(rows)
    assert d.groupby('race').L.mean()['White'] - d.groupby('race').L.mean()['Black'] > 20
    for s, g in d.groupby('source'):
        if g.ethnicity.nunique() == 2: assert g.groupby('ethnicity').jaw.mean()['Hispanic'] > g.groupby('ethnicity').jaw.mean()['NonHispanic'], s

# --- detectors -----------------------------------------------------------------------------------------------------

def _mtcnn_hits(folder, ids):
    import torch
    from facenet_pytorch import MTCNN
    n = torch.get_num_threads(); torch.set_num_threads(1)   # restored below: other tests compare with subprocesses bit for bit
    try:
        mtcnn = MTCNN(keep_all=True, min_face_size=60, device='cpu')   # mugshot faces are > 150 px: skip tiny scales
        hits = []
        for i in ids:
            boxes, probs = mtcnn.detect(load_rgb(folder/'images'/f'{i}.jpg')[0])
            hits.append(boxes is not None and probs.max() > 0.9)
    finally: torch.set_num_threads(n)
    return np.array(hits)

def _dlib_hits(folder, ids):
    from mugshotrace.faces.landmarks import detect_faces
    return np.array([bool(detect_faces(load_rgb(folder/'images'/f'{i}.jpg')[0], upsample=1)) for i in ids])

def test_dlib_and_mtcnn_find_the_face(bench, dlib_faces):
    truth = load_truth(bench)
    assert not truth.cue.any()
    d, m = np.mean([v is not None for v in dlib_faces.values()]), _mtcnn_hits(bench, truth.image_id).mean()
    assert d >= 0.98 and m >= 0.98, (d, m)
    c = np.array([((v[1].x1 + v[1].x2) / 2, (v[1].y1 + v[1].y2) / 2) for v in dlib_faces.values() if v is not None])
    assert np.abs(c[:, 0] - 240).max() < 40 and np.abs(c[:, 1] - 300).max() < 50   # frontal, head centred

@pytest.mark.slow
def test_detectors_on_a_larger_benchmark_with_cues(tmp_path):
    cfg = SynthConfig(people=150, seed=21, cue_class='White', cue_kind='placard', cue_rate=0.5, cue_rate_other=0.5)
    out = make_benchmark(tmp_path/'b', cfg, workers=2, progress=False)
    truth = load_truth(out)
    d, m = _dlib_hits(out, truth.image_id), _mtcnn_hits(out, truth.image_id)
    assert d.mean() >= 0.98 and m.mean() >= 0.98, (d.mean(), m.mean())
    for g in SUBGROUPS:   # per subgroup: MTCNN finds (nearly) all; dlib's HOG misses more dark, wide faces (measured
        k = (truth.group == g).values   # BH 85-93 % vs 100 % elsewhere at this seed) — a real detector gap, kept visible
        assert d[k].mean() >= 0.8 and m[k].mean() >= 0.95, (g, d[k].mean(), m[k].mean())

# --- learnability (slow) -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_attributes_are_learnable_at_64px(tmp_path):
    "A small CNN from random init, a few CPU epochs on 64x64 images, person-disjoint: both attributes well above chance."
    import torch, torch.nn as nn, torch.nn.functional as F
    from PIL import Image
    torch.manual_seed(0)
    cfg = SynthConfig(people=240, seed=2, shares={g: .25 for g in SUBGROUPS}, width=240, height=300)   # same at 64 px, 4x faster
    out = make_benchmark(tmp_path/'b', cfg, workers=2, progress=False)
    t = load_truth(out)
    X = torch.tensor(np.stack([np.asarray(Image.open(out/'images'/f'{i}.jpg').resize((64, 64), Image.BILINEAR)) for i in t.image_id]),
                     dtype=torch.float32).permute(0, 3, 1, 2) / 255 - 0.5
    Y = torch.tensor(np.stack([(t.race == 'Black').values, (t.ethnicity == 'Hispanic').values], 1), dtype=torch.float32)
    test = torch.tensor(t.person_id.map(lambda p: int(p[1:]) % 4 == 0).values)
    def blk(i, o): return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
    net = nn.Sequential(blk(3, 16), blk(16, 32), blk(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))  # like models' tiny_cnn
    epochs, Xtr, Ytr = 20, X[~test], Y[~test]
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * len(torch.arange(len(Xtr)).split(32)))
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(Xtr)).split(32):
            xb = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, Xtr[idx], Xtr[idx].flip(3))   # horizontal flips
            opt.zero_grad(); F.binary_cross_entropy_with_logits(net(xb), Ytr[idx]).backward(); opt.step(); sched.step()
    net.eval()
    with torch.no_grad(): acc = ((net(X[test]) > 0).float() == Y[test]).float().mean(0)
    assert acc[0] > 0.9 and acc[1] > 0.8, acc

# --- CLI -----------------------------------------------------------------------------------------------------------

def _parser():
    ap = argparse.ArgumentParser(prog='mugshotrace'); add_synth_parser(ap.add_subparsers(dest='command'))
    return ap

def test_cli_options_map_to_the_config(tmp_path):
    a = _parser().parse_args(['synth', '--out', str(tmp_path/'o'), '--people', '3', '--seed', '4', '--court-noise', 'BH=0.3',
                              '--underrep', 'BH=0.3', '--cue-class', 'White', '--cue-rate', '0.9', '--cue-kind', 'placard',
                              '--raters', '7', '--quality', '80-90', '--bookings', '1', '--width', '240', '--height', '300'])
    c = config_from_args(a)
    assert (c.people, c.seed, c.court_noise['BH'], c.court_noise['WH'], c.underrep['BH'], c.cue_class, c.cue_kind) == (3, 4, 0.3, 0.05, 0.3, 'White', 'placard')
    assert (c.student_raters, c.jpeg_quality, c.bookings, c.width, c.height) == (7, (80, 90), (1.0,), 240, 300)
    a.progress = False
    assert a.func(a) == 0
    lab = pd.read_csv(tmp_path/'o'/'labels.csv'); assert len(lab) == 3
    assert load_rgb(tmp_path/'o'/lab.path[0])[1].width == 240

@pytest.mark.parametrize('args,msg', [(['--people', '0'], 'people'), (['--court-noise', 'XX=0.1'], 'unknown subgroup'),
                                      (['--court-noise', 'BH=1.5'], r'within \[0, 1\]'), (['--raters', '4'], 'odd'),
                                      (['--quality', 'high'], 'LO-HI'), (['--cue-class', 'Green'], 'cue_class')])
def test_cli_bad_input_is_a_user_error(args, msg, tmp_path):
    a = _parser().parse_args(['synth', '--out', str(tmp_path/'o'), *args])
    with pytest.raises(UserError, match=msg): a.func(a)

def test_cli_help_explains_itself():
    h = add_synth_parser(argparse.ArgumentParser(prog='mugshotrace').add_subparsers()).format_help()
    assert h.startswith('usage: mugshotrace synth')
    for s in ('--court-noise', '--underrep', '--cue-class', '--people', '--seed', 'truth.json', 'BH=0.3'): assert s in h

def test_cli_defaults_are_the_config_defaults_and_the_common_options_exist():
    "`mugshotrace synth --out X` means `SynthConfig()`; --no-progress and --seed are there."
    a = _parser().parse_args(['synth', '--out', 'x'])
    assert config_from_args(a) == SynthConfig() and a.progress is True
    assert _parser().parse_args(['synth', '--out', 'x', '--no-progress']).progress is False
    with pytest.raises(TypeError): SynthConfig(3)                      # keyword-only

def test_front_door_returns_a_result(tmp_path):
    r = synth(tmp_path/'o', SynthConfig(people=2, seed=3, bookings=(1.0,)), progress=False)
    assert isinstance(r, SynthResult) and r.path == tmp_path/'o' and r.images == 2 == sum(r.per_group.values())
    assert r.to_dict()['path'] == str(tmp_path/'o') and len(r.config_hash) > 8

def test_refuses_to_mix_configs(tmp_path):
    make_benchmark(tmp_path/'o', SynthConfig(people=1, seed=1, bookings=(1.0,)), progress=False)
    with pytest.raises(UserError, match='another config'): make_benchmark(tmp_path/'o', SynthConfig(people=1, seed=2), progress=False)
    (tmp_path/'x').mkdir(); (tmp_path/'x'/'keep.txt').write_text('mine')
    with pytest.raises(UserError, match='not empty'): make_benchmark(tmp_path/'x', SynthConfig(people=1), progress=False)

def test_benchmark_carries_the_explicit_synthetic_marker(bench, tmp_path):
    "synth marks the benchmark and its images/ (the only way data count as synthetic); a study built from it records it."
    from mugshotrace.core import SYNTH_MARKER, is_marked_synthetic, write_study_record, study_is_synthetic
    assert is_marked_synthetic(bench) and is_marked_synthetic(bench/'labels.csv') and is_marked_synthetic(bench/'images')
    info = json.loads((bench/SYNTH_MARKER).read_text())
    assert info['synthetic'] is True and info['config_hash']
    rec = write_study_record(tmp_path/'study', 'from-synth', bench/'labels.csv', bench, tmp_path/'faces')
    assert rec['synthetic'] is True and study_is_synthetic(tmp_path/'study')
    # a look-alike (same files, a truth.json, but no marker) is real data: fails closed
    fake = tmp_path/'fake'; (fake/'images').mkdir(parents=True)
    (fake/'truth.json').write_text((bench/'truth.json').read_text()); (fake/'labels.csv').write_text((bench/'labels.csv').read_text())
    assert not is_marked_synthetic(fake) and not write_study_record(tmp_path/'s2', 'x', fake/'labels.csv', fake, tmp_path/'f')['synthetic']

# --- case outcomes and surnames (synth.outcomes) ---------------------------------------------------------------------

def test_outcomes_leave_images_labels_and_truth_unchanged(tmp_path):
    """Outcomes come from their own random streams: labels, votes and truth hash as recorded (they do not depend on outcomes), and
    another outcome config changes cases.csv only (surnames depend on the seed alone)."""
    import hashlib
    from mugshotrace.synth.outcomes import OutcomeConfig, load_cases
    cfg = SynthConfig(people=6, seed=5, width=64, height=80)
    make_benchmark(tmp_path/'a', cfg, progress=False)
    make_benchmark(tmp_path/'b', cfg, progress=False, outcomes=OutcomeConfig(detention=0.9, bail_log_mean={'BH': 5.0}))
    h = hashlib.sha256()
    for f in ('labels.csv', 'votes.csv', 'truth.json'): h.update(f.encode()); h.update((tmp_path/'a'/f).read_bytes())
    # made by the code of #17 (labels.csv and truth.json gained gender and skin tone; before: 74240649…; test_synth_attrs
    # checks that removing the new columns gives the files of before byte for byte)
    assert h.hexdigest() == 'd2e8e3354a896e4d0b0c8a13244278718f0b66dc3cd4929a498b066aa24065a8'
    files = ['labels.csv', 'votes.csv', 'truth.json'] + sorted(p.relative_to(tmp_path/'a').as_posix() for p in (tmp_path/'a'/'images').glob('*.jpg'))
    for f in files: assert (tmp_path/'a'/f).read_bytes() == (tmp_path/'b'/f).read_bytes(), f
    (ca, ta), (cb, tb) = load_cases(tmp_path/'a'), load_cases(tmp_path/'b')
    assert ca.surname.tolist() == cb.surname.tolist() and ca.image_id.tolist() == load_truth(tmp_path/'a').image_id.tolist()
    assert tb['config']['detention']['WnH'] == 0.9 and ta['config']['detention']['WnH'] == 0.25

def test_outcome_effects_recovered_and_recorded():
    "Large population: the injected detention rates and log-bail means come back per subgroup, within 4 standard errors."
    from mugshotrace.synth.outcomes import OutcomeConfig, simulate_cases, case_truth
    cfg = SynthConfig(people=8000, seed=3, shares={g: .25 for g in SUBGROUPS}, bookings=(1.0,))
    plan = plan_benchmark(cfg); oc = OutcomeConfig()
    c = simulate_cases(plan, cfg.seed, oc); t = case_truth(c, plan, oc)
    for g in SUBGROUPS:
        sel = plan.group.to_numpy() == g; p = oc.detention[g]
        assert abs(c.detained[sel].mean() - p) < 4 * np.sqrt(p * (1 - p) / sel.sum())
        assert abs(np.log(c.bail[sel]).mean() - oc.bail_log_mean[g]) < 4 * oc.bail_log_sd / np.sqrt(sel.sum())
        assert abs(t['realised_means']['group']['detained'][g] - c.detained[sel].mean()) < 1e-6
