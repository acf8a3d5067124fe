"""`mugshotrace demo --quick`, the README's first command, end to end: it finishes, writes the report, the self-audit
recovers the bias the benchmark injected (court labels of BH people flipped) with an interval that excludes zero and
finds no such gap against the clean student labels, and a re-run resumes without redoing finished work."""
import json, subprocess, sys
from pathlib import Path
import pandas as pd
import pytest

@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')/'study'
    r = subprocess.run([sys.executable, '-m', 'mugshotrace.cli', 'demo', '--quick', '--out', str(out), '--no-progress'],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r

def test_demo_writes_every_stage(demo):
    out, r = demo
    assert f'report: {out/"report.html"}' in r.stdout
    html = (out/'report.html').read_text()
    assert 'Between-group tests' in html and 'data:image/png;base64' in html
    runs = sorted(p.parent for p in (out/'runs').glob('*/state.json'))
    assert len(runs) == 2 and all(json.loads((p/'state.json').read_text())['state'] == 'done' for p in runs)
    for p in runs:
        assert (p/'model.safetensors').exists() and (p/'model_card.json').exists()
        assert (p/'explain'/'best_worst.csv').exists()
    assert any((p/'confound'/'confounding.csv').exists() for p in runs)
    assert (out/'audit'/'audit.csv').exists() and (out/'datasheet.md').exists()
    assert 'Labels at scale' in html

def test_demo_labels_at_scale(demo):
    "Bulk labels for the images no model trained on: every image accounted for, the hidden labels filled, agreement high."
    out, _ = demo
    d = out/'labels'
    bulk, table = pd.read_csv(d/'bulk_labels.csv', dtype=str), pd.read_csv(d/'label_table.csv', dtype=str, keep_default_na=False)
    assert set(bulk.image_id) == set(table.image_id) and (bulk.status == 'ok').mean() > 0.95
    ag = json.loads((d/'bulk_labels.csv.agreement.json').read_text())
    missing = (table.race_student == '').sum()
    assert ag['n'] >= 0.9 * (len(table) - missing) and 0.2 * len(table) < missing < 0.4 * len(table)
    assert ag['accuracy'] > 0.8 and ag['kappa']['ci_low'] > 0.5, ag     # race is rendered as skin tone: easy to learn
    cov = pd.read_csv(d/'bulk_labels.csv.coverage.csv').set_index('threshold')
    assert cov.loc[0.5, 'n_filled'] >= 0.9 * missing

def _bh_gaps(audit, source):
    "Accuracy gaps of BH against each other subgroup on the pooled test set of `source` (value = BH − other)."
    g = audit[(audit.metric == 'gap:accuracy') & (audit.test_set == f'{source}/pooled')]
    rows = []
    for _, x in g.iterrows():
        a, b = [s.split('=')[-1] for s in x.group.split(' vs ')]
        if 'BH' not in (a, b) or {a, b} - {'BH', 'WH', 'BnH', 'WnH'}: continue
        sign = 1 if a == 'BH' else -1
        lo, hi = sorted((sign * x.ci_low, sign * x.ci_high))
        rows.append({'other': b if a == 'BH' else a, 'gap': sign * x.value, 'ci_low': lo, 'ci_high': hi})
    return pd.DataFrame(rows)

def test_audit_recovers_the_injected_label_bias(demo):
    "Grouped by the benchmark's truth, BH is less accurate against court labels only (the bias we injected)."
    out, _ = demo
    audit = pd.read_csv(out/'validation'/'audit_truth'/'audit.csv')
    court, student = _bh_gaps(audit, 'court'), _bh_gaps(audit, 'student')
    assert len(court) == 3 and len(student) == 3, (court, student)
    # injected: court labels of BH flipped at 35% -> BH accuracy against court labels is lower, interval excludes 0
    assert (court.gap < 0).all() and (court.ci_high < 0).any(), court
    # the clean consensus labels show no such gap: every interval covers zero or is far smaller than the court gap
    assert court.gap.mean() < student.gap.mean() - 0.1, (court, student)
    assert (student.ci_low <= 0).all() or student.gap.abs().max() < 0.05, student

def test_label_grouped_audit_sees_the_bias_where_labels_moved_it(demo):
    "Grouped by court labels (all real data has), mislabelled BH people sit in WH: court WH is the least accurate group."
    out, _ = demo
    a = pd.read_csv(out/'audit'/'audit.csv')
    acc = a[(a.metric == 'accuracy') & (a.test_set == 'court/pooled')].assign(g=lambda d: d.group.str.split('=').str[-1]).set_index('g')
    assert acc.loc['WH', 'value'] == acc.loc[['BH', 'WH', 'BnH', 'WnH'], 'value'].min(), acc

def test_demo_resumes_without_redoing_work(demo):
    out, _ = demo
    states = {p: p.stat().st_mtime_ns for p in (out/'runs').glob('*/model.safetensors')}
    r = subprocess.run([sys.executable, '-m', 'mugshotrace.cli', 'demo', '--quick', '--out', str(out), '--no-progress'],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in states} == states, 'finished runs were trained again'
    assert '2 finished or failed, 0 to run' in r.stderr
