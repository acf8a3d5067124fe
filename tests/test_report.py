"""Model cards (schema, completeness), the study report (self-contained, privacy: registered figures only, blur, explicit
synthetic record, escaping, owner-only files; headless Chromium), and the CLI."""
import base64, hashlib, html, html.parser, io, json, os, re, shutil, stat, subprocess, tempfile
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image

from mugshotrace.core import (sample_face_photos, write_json, register_figure, registered_figures, mark_synthetic,
                              write_study_record, PRIVATE_FILE_MODE)
from mugshotrace.report.cards import example_study, load_audit, model_card
from mugshotrace.study.folder import find_runs
from mugshotrace.report.html import study_report
from mugshotrace.cli import main

# The Model Card Toolkit JSON schema (v0.0.2, model_card_toolkit/schema/v0.0.2/model_card.schema.json), transcribed
# for the parts a card uses, with the `confidence_interval` of later versions on performance metrics.
_STR = {'type': 'string'}
_DESC = {'type': 'object', 'properties': {'description': _STR}}
MCT_SCHEMA = {
    '$schema': 'http://json-schema.org/draft-07/schema#', 'type': 'object', 'additionalProperties': False,
    'properties': {
        'schema_version': _STR,
        'model_details': {'type': 'object', 'properties': {
            'name': _STR, 'overview': _STR, 'documentation': _STR,
            'owners': {'type': 'array', 'items': {'type': 'object', 'properties': {'name': _STR, 'contact': _STR}}},
            'version': {'type': 'object', 'properties': {'name': _STR, 'date': {'type': 'string', 'format': 'date'}, 'diff': _STR}},
            'licenses': {'type': 'array', 'items': {'type': 'object', 'properties': {'identifier': _STR, 'custom_text': _STR},
                                                     'oneOf': [{'required': ['identifier']}, {'required': ['custom_text']}]}},
            'references': {'type': 'array', 'items': {'type': 'object', 'properties': {'reference': _STR}}},
            'citations': {'type': 'array', 'items': {'type': 'object', 'properties': {'style': _STR, 'citation': _STR}}}}},
        'model_parameters': {'type': 'object', 'properties': {
            'model_architecture': _STR, 'input_format': _STR, 'output_format': _STR,
            'data': {'type': 'array', 'items': {'type': 'object', 'properties': {
                'name': _STR, 'link': _STR, 'description': _STR,
                'sensitive': {'type': 'object', 'properties': {'sensitive_data': {'type': 'array', 'items': _STR}}}}}}}},
        'quantitative_analysis': {'type': 'object', 'properties': {
            'performance_metrics': {'type': 'array', 'items': {'type': 'object', 'required': ['type', 'value', 'slice', 'confidence_interval'],
                'properties': {'type': _STR, 'value': {'type': 'number'}, 'slice': _STR,
                               'confidence_interval': {'type': 'object', 'required': ['lower_bound', 'upper_bound'],
                                                       'properties': {'lower_bound': {'type': 'number'}, 'upper_bound': {'type': 'number'}}}}}}}},
        'considerations': {'type': 'object', 'properties': {
            'users': {'type': 'array', 'items': _DESC}, 'use_cases': {'type': 'array', 'items': _DESC},
            'limitations': {'type': 'array', 'items': _DESC}, 'tradeoffs': {'type': 'array', 'items': _DESC},
            'ethical_considerations': {'type': 'array', 'items': {'type': 'object', 'properties': {'name': _STR, 'mitigation_strategy': _STR}}}}}}}


def _confounding(root):
    "A confounding table in the probe's format inside run r1's folder."
    d = pd.DataFrame({'target_label': ['all', 'Black', 'White'], 'group': ['all', 'all', 'all'], 'metric': 'confounding',
                      'value': [.43, .5, .36], 'ci_low': [.38, .42, .29], 'ci_high': [.48, .58, .43], 'n': [400, 200, 200]})
    (root / 'runs' / 'r1' / 'confounding').mkdir(parents=True, exist_ok=True)
    d.to_csv(root / 'runs' / 'r1' / 'confounding' / 'confounding.csv', index=False)


def _face_png(path, size=(240, 300), register=True, which='grace_hopper'):
    "A face photo at `path`, registered as a report figure that may show a face (as the interpretation stage does)."
    im = Image.open(sample_face_photos()[which]).convert('RGB').resize(size)
    path.parent.mkdir(parents=True, exist_ok=True); im.save(path)
    if register: register_figure(path, may_show_face=True, caption='best and worst images')
    return im


def _embedded(html, alt):
    m = re.search(r"<img alt='" + re.escape(alt) + r"' src='data:image/png;base64,([^']+)'", html)
    return Image.open(io.BytesIO(base64.b64decode(m.group(1)))).convert('L')


def _sharpness(im):
    a = np.asarray(im, float); return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


@pytest.fixture(scope='module')
def audited(tmp_path_factory):
    "A runs folder in the contract format audited by the real self-audit (audit.csv, summaries, figures)."
    selfaudit = pytest.importorskip('mugshotrace.audit.selfaudit')
    root = selfaudit.fabricate_runs(tmp_path_factory.mktemp('audited'), archs=('tiny_cnn',), variants=('resized',))
    selfaudit.run_selfaudit(root, n_boot=100, progress=False)
    _face_png(root / 'runs' / 'tiny_cnn-resized-court' / 'interp' / 'figures' / 'best_worst' / 'court__Black.png')
    return root


def test_cards_from_the_real_selfaudit(audited):
    "Every card of an audited study carries accuracy with an interval for every test set × group of the audit."
    p = study_report(audited)
    audit = pd.read_csv(audited / 'audit' / 'audit.csv')
    for run in find_runs(audited):
        card = json.loads((run.path / 'model_card.json').read_text())
        pm = {(m['slice'], m['type']): m for m in card['quantitative_analysis']['performance_metrics']}
        a = audit[(audit.run_id == run.run_id) & (audit.metric == 'accuracy')]
        assert len(a) >= 20 and a.test_set.nunique() == 3
        for r in a.itertuples():
            m = pm[(f'test_set={r.test_set} | group={r.group}', 'accuracy')]
            assert m['confidence_interval']['lower_bound'] == pytest.approx(r.ci_low) and m['value'] == pytest.approx(r.value)
        assert '## Quantitative analyses' in (run.path / 'model_card.md').read_text()
    h = p.read_text()
    assert 'heatmap_accuracy_race' in h and 'design_factors.csv' in h and "alt='court__Black'" in h


@pytest.fixture
def study(tmp_path):
    root = example_study(tmp_path / 'study', runs=('r1', 'r2', 'r3'), tests=('court/Black', 'court/White', 'student/Black'))
    _confounding(root)
    _face_png(root / 'runs' / 'r1' / 'interp' / 'best_worst.png')
    return root


def test_every_card_is_valid_and_complete(study):
    jsonschema = pytest.importorskip('jsonschema')
    audit = load_audit(study)
    for run in find_runs(study):
        card = model_card(run, audit)
        jsonschema.validate(card, MCT_SCHEMA, format_checker=jsonschema.FormatChecker())
        pm = card['quantitative_analysis']['performance_metrics']
        a = audit[audit.run_id == run.run_id]
        want = {f'test_set={t} | group={g}' for t, g in zip(a.test_set, a.group)}
        assert want == {m['slice'] for m in pm}  # every test set × group, each with an interval
        for m in pm:
            r = a[(a.test_set == m['slice'].split(' | ')[0][9:]) & (a.group == m['slice'].split('=')[-1])].iloc[0]
            assert (m['value'], m['confidence_interval']['lower_bound'], m['confidence_interval']['upper_bound']) == (r.value, r.ci_low, r.ci_high)
    # a test set that lost its intervals makes the card fail loudly
    bad = audit.copy(); bad.loc[(bad.run_id == 'r2') & (bad.test_set == 'student/Black'), ['ci_low', 'ci_high']] = np.nan
    with pytest.raises(Exception, match='student/Black'): model_card(study / 'runs' / 'r2', bad)


def test_report_self_contained_links_cards_and_blurs_faces(study):
    pd.DataFrame({'image_id': ['a', 'b', 'c'], 'person_id': ['p', 'p', 'q'], 'race_court': ['Black', 'White', '']}).to_csv(study / 'labels.csv', index=False)
    (study / 'faces' / 'openface').mkdir(parents=True)
    pd.DataFrame({'image_id': ['a', 'b', 'c'], 'variant': 'openface', 'status': ['ok', 'no_face', 'ok']}).to_csv(study / 'faces' / 'openface' / 'manifest.csv', index=False)
    p = study_report(study, out=study / 'out' / 'report.html')
    sheet = (study / 'out' / 'datasheet.md').read_text()
    assert '3 images of 2 persons.' in sheet and 'race_court: 1 missing' in sheet and 'openface: no_face 1, ok 2' in sheet
    h = p.read_text()
    assert not re.search(r"""(src|href)=['"]?(https?:|//)""", h) and 'http://' not in h.split('</style>')[0]
    for r in ('r1', 'r2', 'r3'):
        assert f"href='../runs/{r}/model_card.html'" in h and (study / 'runs' / r / 'model_card.md').exists()
    assert json.loads((study / 'runs' / 'r1' / 'model_card.json').read_text())['considerations']['tradeoffs'][0]['description'].startswith('xGEM')
    assert 'confounding' in h and '0.430 [0.380, 0.480]' in h
    assert (study / 'out' / 'datasheet.md').exists()
    orig = Image.open(study / 'runs' / 'r1' / 'interp' / 'best_worst.png').convert('L')
    blurred = _embedded(h, 'best_worst')
    assert _sharpness(blurred) < 0.35 * _sharpness(orig)  # real data: blurred by default
    h2 = study_report(study, out=study / 'out' / 'faces.html', show_faces=True).read_text()
    assert np.array_equal(np.asarray(_embedded(h2, 'best_worst')), np.asarray(orig))  # explicit opt-in: as it is
    (study / 'truth.json').write_text('{}')  # a truth.json means nothing: still real data, still blurred
    h3 = study_report(study, out=study / 'out' / 'truth.html').read_text()
    assert _sharpness(_embedded(h3, 'best_worst')) < 0.35 * _sharpness(orig) and 'synthetic data' not in h3
    bench = study.parent / 'bench'; (bench / 'images').mkdir(parents=True)  # the study record of a marked benchmark
    mark_synthetic(bench); mark_synthetic(bench / 'images')
    write_study_record(study, 'synth', bench / 'labels.csv', bench / 'images', study / 'faces')
    h4 = study_report(study, out=study / 'out' / 'synth.html').read_text()
    assert np.array_equal(np.asarray(_embedded(h4, 'best_worst')), np.asarray(orig)) and 'synthetic data' in h4


def test_cli_report(study, capsys):
    assert main(['report', str(study), '--out', str(study / 'cli.html')]) == 0
    assert (study / 'cli.html').exists() and 'report:' in capsys.readouterr().out
    assert main(['report', str(study / 'missing')]) == 2
    empty = study / 'empty'; empty.mkdir()
    assert main(['report', str(empty)]) == 2 and 'no run folders' in capsys.readouterr().err


def _chromium():
    for n in ('chromium', 'chromium-browser', 'google-chrome'):
        if shutil.which(n): return shutil.which(n)
    return None


def chromium_probe(page, tmp_path, budget_ms=10000):
    "Load a copy of `page` with a probe script in headless Chromium: (probe dict, seconds, stderr)."
    import time
    # a probe script appended to a copy (the report itself has no script): counts after load
    probe = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "const bad=[...document.querySelectorAll('a[href^=\"#\"]')].filter(a=>!document.getElementById(a.getAttribute('href').slice(1)));"
             "document.body.setAttribute('data-probe',JSON.stringify({imgs:im.length,broken:im.filter(i=>!i.complete||i.naturalWidth===0).length,"
             "tables:document.querySelectorAll('table').length,sections:document.querySelectorAll('section').length,"
             "first:document.querySelector('section')&&document.querySelector('section').id,"
             "links:document.querySelectorAll('a[href^=\"#\"]').length,unresolved:bad.map(a=>a.getAttribute('href'))}));});</script>")
    probed = tmp_path / 'probed.html'; probed.write_text(Path(page).read_text().replace('</body>', probe + '</body>'))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as prof:
        r = subprocess.run([_chromium(), '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                            '--disable-component-update', '--disable-sync', '--no-first-run', f'--user-data-dir={prof}',
                            f'--virtual-time-budget={budget_ms}', '--enable-logging=stderr', '--v=0', '--dump-dom', probed.as_uri()],
                           capture_output=True, text=True, timeout=180)
    secs = time.time() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"data-probe=\"([^\"]+)\"", r.stdout)
    assert m, 'the page did not finish loading'
    return json.loads(m.group(1).replace('&quot;', '"')), secs, r.stderr


@pytest.mark.skipif(_chromium() is None, reason='headless Chromium is not installed (apt-get install chromium; .ci/run installs it)')
def test_report_renders_in_headless_chromium(audited, tmp_path):
    p = study_report(audited, out=tmp_path / 'report.html')
    figs = registered_figures(audited)
    n_png = int(((figs.status == 'ok') & ~figs.file.str.contains('model_card')).sum())   # cards keep their own figure
    info, _, err = chromium_probe(p, tmp_path)
    assert info['imgs'] == 1 + n_png and info['broken'] == 0  # the caterpillar plot and every stage figure
    # findings, the seed's tables per label source (court, student), runs, groups, tests, table, stages, figures
    assert info['tables'] >= 6 and info['sections'] == 9 and info['first'] == 'findings'
    assert info['links'] >= 9 and info['unresolved'] == []    # the contents and every finding's link resolve
    assert 'Uncaught' not in err and 'Failed to load resource' not in err


# ---------------------------------------------------------------- privacy over a realistic real-data layout
class _Tags(html.parser.HTMLParser):
    "Every start tag with its attributes."
    def __init__(self):
        super().__init__(); self.tags = []
    def handle_starttag(self, tag, attrs): self.tags.append((tag, dict(attrs)))

def _tags(text):
    p = _Tags(); p.feed(text); p.close(); return p.tags

def _live_markup(text, allowed_img=('data:image/png;base64,',)):
    "Markup in an HTML page that did not come from mugshotrace: script/svg/iframe elements, on* attributes, foreign images."
    bad = []
    for tag, attrs in _tags(text):
        if tag in ('script', 'svg', 'iframe', 'object', 'embed', 'math'): bad.append(tag)
        bad += [f'{tag} {k}' for k in attrs if k.lower().startswith('on')]
        if tag == 'img' and not str(attrs.get('src', '')).startswith(allowed_img): bad.append(f'img {attrs.get("src")}')
        bad += [f'{tag} {k}=javascript' for k, v in attrs.items() if 'javascript:' in str(v).lower()]
    return bad

def _img_payloads(text):
    "Decoded pixels (RGB arrays) of every embedded image, keyed by alt text."
    return {a.get('alt'): np.asarray(Image.open(io.BytesIO(base64.b64decode(a['src'].split(',', 1)[1]))).convert('RGB'))
            for t, a in _tags(text) if t == 'img'}

def _pixel_hash(a): return hashlib.sha256(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()


@pytest.fixture
def real_layout(tmp_path):
    """The GPU tutorial's layout of a real study, with a marked synth benchmark in a parent folder: face crops, raw
    photos, a confound paths.png and explanation figures inside the reported folder."""
    from mugshotrace.core import save_figure
    from mugshotrace.report.html import caterpillar
    project = tmp_path / 'project'
    (project / 'images').mkdir(parents=True)                # a synth benchmark right above the study: marked, with truth
    mark_synthetic(project); mark_synthetic(project / 'images'); (project / 'truth.json').write_text('{"images": {}}')
    root = example_study(project / 'study', runs=('r1', 'r2'))
    raw = {}
    for i, which in enumerate(['grace_hopper', 'grace_hopper', *sample_face_photos()][:3]):
        raw[f'crop{i}'] = _face_png(root / 'faces' / 'openface' / 'images' / f'crop{i}.png', (96, 96), register=False, which=which)
        raw[f'photo{i}'] = _face_png(root / 'images' / f'photo{i}.png', (240, 300), register=False, which=which)
    pd.DataFrame({'image_id': ['crop0'], 'variant': 'openface', 'status': 'ok'}).to_csv(root / 'faces' / 'openface' / 'manifest.csv', index=False)
    # registered figures: faces (explain best/worst, confound paths), numbers (region bars), one changed after registration
    faces = {'best_worst': _face_png(root / 'runs' / 'r1' / 'explain' / 'figures' / 'best_worst' / 'court__Black.png'),
             'paths': _face_png(root / 'runs' / 'r1' / 'confound' / 'paths.png', (300, 200))}
    d = pd.DataFrame({'run_id': ['r1'], 'test_set': ['t'], 'group': ['BH'], 'metric': 'accuracy', 'value': [.8], 'ci_low': [.7], 'ci_high': [.9]})
    save_figure(caterpillar(d), root / 'runs' / 'r1' / 'explain' / 'figures' / 'regions_by_group.png', may_show_face=False, close=True)
    _face_png(root / 'runs' / 'r2' / 'explain' / 'figures' / 'best_worst' / 'changed.png')
    _face_png(root / 'runs' / 'r2' / 'explain' / 'figures' / 'best_worst' / 'changed.png', register=False, which='grace_hopper')
    Image.fromarray(np.asarray(raw['photo0'])[::-1].copy()).save(root / 'runs' / 'r2' / 'explain' / 'figures' / 'best_worst' / 'changed.png')
    _face_png(root / 'runs' / 'r2' / 'interp' / 'unregistered_face.png', register=False)   # name looks harmless/face: never embedded
    _face_png(root / 'runs' / 'r2' / 'interp' / 'heatmap.png', register=False)
    return root, raw, faces


def test_report_of_a_real_layout_embeds_only_registered_figures_blurred(real_layout):
    root, raw, faces = real_layout
    p = study_report(root)
    h = p.read_text()
    imgs = _img_payloads(h)
    # embedded: the caterpillar plot and the three registered, unchanged figures; nothing else under the folder
    assert set(imgs) == {'accuracy per group with intervals', 'court__Black', 'paths', 'regions_by_group'}, set(imgs)
    assert 'changed.png (changed since it was registered)' in h
    assert 'unregistered_face' not in h and 'heatmap' not in h and 'crop0' not in h and 'photo0' not in h
    # every face-bearing figure measurably blurred (real data: the benchmark's marker and truth.json above do not count)
    for alt, im in faces.items():
        assert _sharpness(Image.fromarray(imgs['court__Black' if alt == 'best_worst' else alt]).convert('L')) < 0.35 * _sharpness(im.convert('L')), alt
    # no raw crop or photo anywhere in the page: neither its file's base64 nor its pixels (at any embedded size)
    for k, im in raw.items():
        f = next(root.rglob(f'{k}.png'))
        assert base64.b64encode(f.read_bytes()).decode()[:200] not in h
        assert _pixel_hash(np.asarray(im)) not in {_pixel_hash(a) for a in imgs.values()}, k
    assert 'synthetic data' not in h and 'blurred' in h and 'owner-only' in h
    # owner-only: the report, the datasheet and the model cards of a real study
    for f in [p, root / 'datasheet.md', *root.glob('runs/*/model_card.*')]:
        assert stat.S_IMODE(f.stat().st_mode) == PRIVATE_FILE_MODE, f
    assert not _live_markup(h)
    # opting in shows the faces as they are; --shareable widens the permissions
    h2 = study_report(root, out=root / 'faces.html', show_faces=True, private=False)
    assert np.array_equal(_img_payloads(h2.read_text())['paths'], np.asarray(faces['paths']))
    um = os.umask(0); os.umask(um)
    assert stat.S_IMODE(h2.stat().st_mode) == 0o666 & ~um


def test_cli_report_private_by_default_and_shareable(real_layout, capsys):
    root, _, _ = real_layout
    assert main(['report', str(root), '--out', str(root / 'a.html')]) == 0
    assert stat.S_IMODE((root / 'a.html').stat().st_mode) == PRIVATE_FILE_MODE
    assert main(['report', str(root), '--out', str(root / 'b.html'), '--shareable']) == 0
    assert stat.S_IMODE((root / 'b.html').stat().st_mode) != PRIVATE_FILE_MODE
    assert main(['report', str(root), '--out', str(root / 'c.html'), '--synthetic']) == 0   # explicit: shown as they are
    assert 'synthetic data' in (root / 'c.html').read_text()


# ---------------------------------------------------------------- hostile text in every free-text field
EVIL = ['<script>alert(1)</script>', '<img src=x onerror=alert(1)>', '"><svg onload=alert(1)>', "'><svg/onload=alert(2)>",
        '<a href="javascript:alert(3)">x</a>']

def _evil(i): return f'x{i}{EVIL[i % len(EVIL)]}'

def test_hostile_markup_in_every_field_stays_inert(tmp_path):
    "Markup planted in every free-text field a study, label table or bundle can carry is never live in the outputs."
    mdit = pytest.importorskip('markdown_it')
    root = tmp_path / 'study'; rows = []; rng = np.random.default_rng(0)
    rid, arch, var, src, task, ts, grp = _evil(0), _evil(1), _evil(2), _evil(3), _evil(4), _evil(5), _evil(6)
    run = root / 'runs' / 'r1'
    write_json(run / 'config.json', {'run_id': rid, 'name': _evil(7), 'arch': arch, 'variant': var, 'label_source': src,
                                     'task': {'name': task, 'classes': [_evil(8), _evil(9)]}, 'init': '/models/' + _evil(10) + '.safetensors',
                                     'sampling': {'note': _evil(11)}, 'study': {'name': _evil(12), 'description': _evil(13)}})
    write_json(run / 'state.json', {'state': _evil(14)})
    write_json(run / 'model.json', {'arch': arch, 'classes': [_evil(8), _evil(9)], 'input_size': _evil(15), 'mean': _evil(16),
                                    'std': [.5] * 3, 'weights_sha256': _evil(17), 'mugshotrace_version': _evil(18), 'created': _evil(19),
                                    'training_data': {'source': _evil(20), 'labels': [_evil(21)]}, 'variant': var, 'init': _evil(22)})
    for g in ('all', grp, _evil(23)):
        for m in ('accuracy', f'recall:{_evil(8)}'):
            v = rng.uniform(.6, .9)
            rows.append(dict(run_id=rid, arch=arch, variant=var, label_source=src, task=task, test_set=ts, group=g, metric=m,
                             value=v, ci_low=v - .05, ci_high=v + .05, n=50, p_value=.01 if g != 'all' else np.nan, q_value=.02 if g != 'all' else np.nan))
    (root / 'audit').mkdir(parents=True); pd.DataFrame(rows).to_csv(root / 'audit' / 'audit.csv', index=False)
    pd.DataFrame({'target_label': [_evil(24)], 'group': [_evil(25)], 'metric': 'confounding', 'value': [.4], 'ci_low': [.3],
                  'ci_high': [.5], 'n': [10]}).to_csv(run / 'confound.csv', index=False)
    pd.DataFrame({'region': [_evil(26)], _evil(27): [_evil(28)]}).to_csv(run / 'region_differences.csv', index=False)
    pd.DataFrame({'image_id': ['a', 'b'], 'person_id': [_evil(29), 'p'], f'race_{_evil(30)}': [_evil(31), 'White'],
                  'ethnicity_court': [_evil(32), '']}).to_csv(root / 'labels.csv', index=False)
    (root / 'faces' / _evil(33).replace('/', '')).mkdir(parents=True)
    pd.DataFrame({'variant': [_evil(33)], 'status': [_evil(34)]}).to_csv(next((root / 'faces').iterdir()) / 'manifest.csv', index=False)
    write_json(run / 'bulk.csv.agreement.json', {'n': 3, 'accuracy': .5, 'label_col': _evil(35), 'kappa': {}})
    fig = run / 'explain' / 'figures' / 'f.png'; _face_png(fig, register=False); register_figure(fig, may_show_face=False, caption=_evil(36))
    p = study_report(root, title=_evil(37))
    outs = {'report': p.read_text(), 'card': (run / 'model_card.html').read_text()}
    md = mdit.MarkdownIt('commonmark')     # html on, as a lax viewer renders it
    outs['card.md'] = md.render((run / 'model_card.md').read_text()); outs['datasheet'] = md.render((root / 'datasheet.md').read_text())
    for name, text in outs.items():
        ok_img = ('data:image/png;base64,', 'model_card_accuracy.png')   # our own figures only
        assert not _live_markup(text, ok_img), (name, _live_markup(text, ok_img))
        assert '&lt;script&gt;' in text or '&lt;img' in text or '&lt;svg' in text, name    # the text is there, escaped
    rep = outs['report']
    for i in (0, 1, 3, 10, 14, 36, 37):   # run id, arch, label source, init path, state, figure caption, title reach the report
        esc = (_evil(i).replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;').split('"')[0],   # as pandas escapes
               html.escape(_evil(i)).split('&quot;')[0])                                            # as html.escape does
        assert any(x in rep for x in esc), i
    assert 'x31' in outs['datasheet'] and 'x30' in outs['datasheet']


def test_report_front_door_and_flags(study):
    "`report(source, out, cfg)` returns a `ReportResult`; every `mugshotrace report` default is `ReportConfig`'s."
    import argparse
    from mugshotrace.report.html import report, ReportConfig, ReportResult, add_report_parser
    from mugshotrace.config import config_from_args
    from mugshotrace.study.folder import Study
    r = report(study, study / 'fd' / 'r.html', ReportConfig(title='front door'))
    assert isinstance(r, ReportResult) and r.out.exists() and r.n_runs == 3 and len(r.cards) == 3 and r.private and not r.synthetic
    assert r.datasheet == study / 'fd' / 'datasheet.md' and 'front door' in r.out.read_text()
    assert (r.out.stat().st_mode & 0o777) == 0o600
    p = add_report_parser(argparse.ArgumentParser().add_subparsers())
    a = p.parse_args([str(study)])
    assert config_from_args(ReportConfig, a) == ReportConfig() and a.progress is True and a.out is None
    for flag in ('--show-faces', '--synthetic', '--shareable', '--title', '--labels', '--faces', '--out', '--no-progress'):
        assert flag in p.format_help(), flag
