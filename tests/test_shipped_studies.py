"""Shipped studies (`mugshotrace/studies/*.yaml`) run by name on a data folder: `--list-studies`, `--dry-run` counts
and work, a real (tiny) run of a shipped study through `--data`, done-counting afterwards, a column mapping, and a
wheel that carries every subpackage and the study files."""
import re, shutil, subprocess, sys, zipfile
from pathlib import Path
import pandas as pd, pytest, yaml
from mugshotrace.cli import main
from mugshotrace.study.config import shipped_studies, load_study, expand_grid, BUILTIN_GRIDS
from mugshotrace.synth.benchmark import SynthConfig, synth
from mugshotrace.train.archs import PHASE1_ARCHS, PHASE2_ARCHS

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    "A tiny semi-synthetic benchmark (the benchmark's tidy label layout is what the shipped studies expect)."
    out = tmp_path_factory.mktemp('shipped')/'bench'
    synth(out, SynthConfig(people=40, seed=3, width=240, height=300), progress=False)
    return out

def _cli(capsys, *args):
    rc = main([str(a) for a in args]); o = capsys.readouterr()
    return rc, o.out, o.err

def _count(out:str)->tuple:
    m = re.search(r'^(\d+) run\(s\): (\d+) done, (\d+) failed, (\d+) to run$', out, re.M)
    assert m, out
    return tuple(int(x) for x in m.groups())

def test_shipped_files_are_the_seed_designs():
    "phase2 = the built-in phase2 grid (7 archs x resized/openface/mtcnn x court/student); phase1 = 84 runs whose balanced 2-class part is the built-in phase1."
    s = shipped_studies()
    assert set(s) >= {'phase1', 'phase2', 'demo'}
    p1, p2 = load_study(s['phase1']).runs, load_study(s['phase2']).runs
    assert len(p2) == 42 and [r.run_id for r in p2] == [r.run_id for r in expand_grid('phase2', **yaml.safe_load(s['phase2'].read_text())['train'])]
    assert {r.arch for r in p2} == set(PHASE2_ARCHS) and {r.variant for r in p2} == {'resized', 'openface', 'mtcnn'}
    assert len(p1) == 84 and {r.arch for r in p1} == set(PHASE1_ARCHS) and {r.variant for r in p1} == {'resized', 'openface'}
    cells = pd.Series([(r.task, r.sampling, r.label_source) for r in p1]).value_counts()
    want = {(t, 'balanced', s): 14 for t in ('race2', 'race_eth4') for s in ('court', 'student')}
    want.update({(t, 'imbalanced', 'court'): 14 for t in ('race2', 'race_eth4')})
    assert cells.to_dict() == want                                 # 7 archs x 2 variants in each of the 6 cells
    bal2 = {r.run_id for r in p1 if r.task == 'race2' and r.sampling == 'balanced'}
    assert bal2 == {r.run_id for r in expand_grid('phase1', **yaml.safe_load(s['phase1'].read_text())['train'])}
    for p in s.values():                                           # relative data paths, the benchmark's tidy columns
        d = yaml.safe_load(p.read_text())
        assert not Path(d['data']['labels']['table']).is_absolute() and d['data']['labels']['columns']['court']['race'] == 'race_court'
    assert all(v in ('resized', 'openface', 'mtcnn') for g in BUILTIN_GRIDS.values() for v in g['variant'])

def test_list_studies(capsys):
    rc, out, _ = _cli(capsys, 'run', '--list-studies')
    assert rc == 0
    rows = {l.split()[0]: int(l.split()[1]) for l in out.splitlines() if l.split() and l.split()[0] in shipped_studies()}
    assert rows == {'demo': 8, 'phase1': 84, 'phase2': 42}, out
    assert "The seed's Phase 2" in out and 'mugshotrace run NAME --data DIR' in out
    rc, _, err = _cli(capsys, 'run')                                # STUDY is optional only with --list-studies
    assert rc == 2 and 'mugshotrace run --list-studies' in err

def test_dry_run_counts(bench, capsys, tmp_path):
    "phase2 prints 42 runs, phase1 84, a study of two overlapping grids each shared run once; nothing is written."
    before = sorted(p.name for p in bench.iterdir())
    rc, out, _ = _cli(capsys, 'run', 'phase2', '--data', bench, '--dry-run')
    assert rc == 0 and _count(out) == (42, 0, 0, 42) and f'runs folder {bench}/phase2/runs' in out
    assert 'cannot draw their sample' in out and 'need n=1000' in out      # the tiny benchmark cannot give 1,000 per class
    rc, out, _ = _cli(capsys, 'run', 'phase1', '--data', bench, '--dry-run', '--train', 'n_per_class=4')
    assert rc == 0 and _count(out) == (84, 0, 0, 84) and 'cannot draw' not in out and 'PFLOP' in out
    assert len([l for l in out.splitlines() if '-race_eth4-imbalanced-' in l]) == 14
    two = yaml.safe_load(shipped_studies()['phase2'].read_text())
    two['grid'] = [{'arch': ['alexnet', 'resnet50'], 'variant': 'resized'}, {'arch': 'alexnet', 'variant': ['resized', 'openface']}]
    (tmp_path/'two.yaml').write_text(yaml.safe_dump(two))
    rc, out, _ = _cli(capsys, 'run', tmp_path/'two.yaml', '--data', bench, '--dry-run')
    assert rc == 0 and _count(out) == (3, 0, 0, 3)
    assert sum(l.split()[0] == 'alexnet-resized-court-race2-balanced-imagenet' for l in out.splitlines() if l.split()) == 1
    assert sorted(p.name for p in bench.iterdir()) == before     # no faces/, no runs folder
    rc, _, err = _cli(capsys, 'run', 'phase2', '--dry-run')
    assert rc == 2 and '--data' in err
    rc, _, err = _cli(capsys, 'run', 'phase2', '--data', bench, '--dry-run', '--train', 'arch=alexnet')
    assert rc == 2 and 'grid axis' in err

def test_labels_spec_maps_another_layout(bench, capsys, tmp_path):
    "The same table under other column names and codes, mapped with --labels-spec: the same samples (sizes) as the tidy layout."
    lab = pd.read_csv(bench/'labels.csv', dtype=str)
    code = {'Black': 'B', 'White': 'W', 'Hispanic': 'H', 'NonHispanic': 'N'}
    mine = pd.DataFrame({'booking': lab.image_id, 'photo': lab.path, 'who': lab.person_id, 'RACE': lab.race_court.map(code),
                         'ETH': lab.ethnicity_court.map(code), 'r2': lab.race_student.map(code), 'e2': lab.ethnicity_student.map(code)})
    mine.to_csv(tmp_path/'mine.csv', index=False)
    spec = {'labels': {'table': str(tmp_path/'mine.csv'), 'id': 'booking', 'path': 'photo', 'person': 'who',
                       'columns': {'court': {'race': 'RACE', 'ethnicity': 'ETH'}, 'student': {'race': 'r2', 'ethnicity': 'e2'}},
                       'values': {'race': {'B': 'Black', 'W': 'White'}, 'ethnicity': {'H': 'Hispanic', 'N': 'NonHispanic'}}}}
    (tmp_path/'spec.yaml').write_text(yaml.safe_dump(spec))
    args = ['run', 'phase1', '--data', bench, '--dry-run', '--train', 'n_per_class=4']
    rc, a, _ = _cli(capsys, *args)
    rc2, b, _ = _cli(capsys, *args, '--labels-spec', tmp_path/'spec.yaml')
    assert rc == rc2 == 0 and _count(b) == (84, 0, 0, 84)
    sizes = lambda out: [l.split()[3] for l in out.splitlines() if l.split() and l.split()[0].startswith(PHASE1_ARCHS)]
    assert sizes(a) == sizes(b) and len(sizes(a)) == 84
    (tmp_path/'bad.yaml').write_text(yaml.safe_dump({'columns': {}}))
    rc, _, err = _cli(capsys, *args, '--labels-spec', tmp_path/'bad.yaml')
    assert rc == 2 and 'one `labels:` section' in err

def test_shipped_study_runs_on_the_data_folder_then_counts_as_done(bench, capsys):
    "One run of the shipped phase2, at tiny settings, through --data/--only/--train; the dry run then counts it done."
    tiny = ['--train', 'init=random', '--train', 'epochs=1', '--train', 'size=64', '--train', 'n_per_class=8', '--train', 'bs=8',
            '--train', 'aug=false']
    only = ['--only', 'alexnet-resized-court-*']
    rc, out, err = _cli(capsys, 'run', 'phase2', '--data', bench, *only, *tiny, '--no-progress')
    assert rc == 0, err
    runs = bench/'phase2'/'runs'
    assert f'runs folder {runs}' in err                          # says where the runs go
    done = [p for p in runs.iterdir() if (p/'metrics.json').exists()]
    assert len(done) == 1 and (bench/'faces'/'resized'/'manifest.csv').exists() and (bench/'phase2'/'study.json').exists()
    cfg = yaml.safe_load((done[0]/'config.json').read_text())
    assert (cfg['arch'], cfg['variant'], cfg['label_source'], cfg['epochs'], cfg['init']) == ('alexnet', 'resized', 'court', 1, 'random')
    rc, out, _ = _cli(capsys, 'run', 'phase2', '--data', bench, '--dry-run', *tiny)
    assert rc == 0 and _count(out) == (42, 1, 0, 41)
    line = next(l for l in out.splitlines() if l.startswith('alexnet-resized-court-race2-balanced-random'))
    assert done[0].name in line and ' done ' in line
    assert sum(l.split()[1] != '-' for l in out.splitlines()[2:44]) == 14           # the resized runs' ids are known now
    assert 'variant openface is not preprocessed yet' in out and 'variant resized' not in out
    rc, out, _ = _cli(capsys, 'run', 'phase2', '--data', bench, '--dry-run', *tiny, '--only', done[0].name)   # --only by run id
    assert _count(out) == (1, 1, 0, 0) and 'work to run: none' in out
    rc, out, _ = _cli(capsys, 'run', 'phase2', '--data', bench, '--dry-run')      # other recipe, other runs: none done
    assert _count(out)[:2] == (42, 0)

def test_wheel_has_every_subpackage_and_the_study_files(tmp_path):
    "The wheel (built offline, as pip would, from a copy of the sources: setuptools writes build/ beside them) carries every subpackage and `mugshotrace/studies/*.yaml`."
    src = tmp_path/'src'
    shutil.copytree(ROOT/'mugshotrace', src/'mugshotrace', ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    for f in ('pyproject.toml', 'README.md'): shutil.copy(ROOT/f, src/f)
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q', '-w', str(tmp_path/'dist'), str(src)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    whl, = (tmp_path/'dist').glob('mugshotrace-*.whl')
    names = set(zipfile.ZipFile(whl).namelist())
    pkgs = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT/'mugshotrace').rglob('__init__.py'))
    assert len(pkgs) > 10 and all(f'{p}/__init__.py' in names for p in pkgs), sorted(set(pkgs) - {n.rsplit('/', 1)[0] for n in names})
    assert {f'mugshotrace/{p.relative_to(ROOT/"mugshotrace")}' for p in (ROOT/'mugshotrace').rglob('*.py') if '__pycache__' not in p.parts} <= names
    studies = {f'mugshotrace/studies/{p.name}' for p in (ROOT/'mugshotrace'/'studies').glob('*.yaml')}
    assert {'mugshotrace/studies/phase1.yaml', 'mugshotrace/studies/phase2.yaml', 'mugshotrace/studies/demo.yaml'} <= studies <= names
    assert 'mugshotrace/data/openface_template.csv' in names
