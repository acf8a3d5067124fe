"Model cards (schema, completeness), the study report (self-contained, privacy blur, headless Chromium), and the CLI."
import base64, io, json, re, shutil, subprocess, tempfile
from pathlib import Path
import numpy as np, pandas as pd, pytest
from PIL import Image

from mugshotrace.core import sample_face_photos, write_json
from mugshotrace.model_cards import example_study, load_audit, model_card, find_runs
from mugshotrace.report import study_report
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


def _face_png(path, size=(240, 300)):
    im = Image.open(sample_face_photos()['grace_hopper']).convert('RGB').resize(size)
    path.parent.mkdir(parents=True, exist_ok=True); im.save(path); return im


def _embedded(html, alt):
    m = re.search(r"<img alt='" + re.escape(alt) + r"' src='data:image/png;base64,([^']+)'", html)
    return Image.open(io.BytesIO(base64.b64decode(m.group(1)))).convert('L')


def _sharpness(im):
    a = np.asarray(im, float); return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


@pytest.fixture(scope='module')
def audited(tmp_path_factory):
    "A runs folder in the contract format audited by the real self-audit (audit.csv, summaries, figures)."
    selfaudit = pytest.importorskip('mugshotrace.selfaudit')
    root = selfaudit.fabricate_runs(tmp_path_factory.mktemp('audited'), archs=('tiny_cnn',), variants=('resized',))
    selfaudit.run_selfaudit(root, n_boot=100, progress=False)
    _face_png(root / 'runs' / 'tiny_cnn-resized-court' / 'interp' / 'figures' / 'best_worst' / 'court__Black.png')
    return root


def test_cards_from_the_real_selfaudit(audited):
    "Every card of an audited study carries accuracy with an interval for every test set × group of the audit."
    p = study_report(audited)
    audit = pd.read_csv(audited / 'audit' / 'audit.csv')
    for run in find_runs(audited):
        card = json.loads((run / 'model_card.json').read_text())
        pm = {(m['slice'], m['type']): m for m in card['quantitative_analysis']['performance_metrics']}
        a = audit[(audit.run_id == run.name) & (audit.metric == 'accuracy')]
        assert len(a) >= 20 and a.test_set.nunique() == 3
        for r in a.itertuples():
            m = pm[(f'test_set={r.test_set} | group={r.group}', 'accuracy')]
            assert m['confidence_interval']['lower_bound'] == pytest.approx(r.ci_low) and m['value'] == pytest.approx(r.value)
        assert '## Quantitative analyses' in (run / 'model_card.md').read_text()
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
        a = audit[audit.run_id == run.name]
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
    (study / 'truth.json').write_text('{}')  # the synthetic benchmark: shown as it is
    h3 = study_report(study, out=study / 'out' / 'synth.html').read_text()
    assert np.array_equal(np.asarray(_embedded(h3, 'best_worst')), np.asarray(orig)) and 'synthetic data' in h3


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


@pytest.mark.skipif(_chromium() is None, reason='headless Chromium is not installed (apt-get install chromium; .ci/run installs it)')
def test_report_renders_in_headless_chromium(audited, tmp_path):
    p = study_report(audited, out=tmp_path / 'report.html')
    n_png = len([f for f in audited.rglob('*.png') if not f.name.startswith('model_card')])   # cards keep their own figure
    # a probe script appended to a copy (the report itself has no script): counts tables and broken images after load
    probe = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "document.body.setAttribute('data-probe',JSON.stringify({imgs:im.length,broken:im.filter(i=>!i.complete||i.naturalWidth===0).length,"
             "tables:document.querySelectorAll('table').length,sections:document.querySelectorAll('section').length}));});</script>")
    probed = tmp_path / 'probed.html'; probed.write_text(p.read_text().replace('</body>', probe + '</body>'))
    with tempfile.TemporaryDirectory() as prof:
        r = subprocess.run([_chromium(), '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                            '--disable-component-update', '--disable-sync', '--no-first-run', f'--user-data-dir={prof}',
                            '--virtual-time-budget=10000', '--enable-logging=stderr', '--v=0', '--dump-dom', probed.as_uri()],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"data-probe=\"([^\"]+)\"", r.stdout)
    assert m, 'the page did not finish loading'
    info = json.loads(m.group(1).replace('&quot;', '"'))
    assert info['imgs'] == 1 + n_png and info['broken'] == 0  # the caterpillar plot and every stage figure
    assert info['tables'] >= 6 and info['sections'] == 7  # runs, groups, extremes, tests, table, stages, figures
    assert 'Uncaught' not in r.stderr and 'Failed to load resource' not in r.stderr
