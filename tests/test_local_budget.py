"""Several runs share one GPU up to a memory budget (issue 19): the local executor never lets the runs on a GPU need
more together than its budget, still runs them concurrently, runs a run larger than the whole budget alone, and
replaces the estimate by a finished twin's measured footprint. A fake GPU (a budget of 10 units) and a fake worker
that sleeps and records when each run started and ended; no CUDA needed."""
import json, math, time
from pathlib import Path
import pytest
from mugshotrace.study.config import RunConfig
from mugshotrace.study.local import run_local, memory_key
from mugshotrace.train.memory import MEASURED_MARGIN

def fake_worker(cfg, data, runs_root, retry_failed, gpu, force_resume=False):
    """Test-only worker target (spawned: importable at module level): record the start, wait until `rendezvous[run id]`
    runs have started (so runs scheduled together overlap however slowly the worker processes start; at most 60 s),
    sleep, record the end; answer a fake footprint."""
    d = Path(data['dir']); t0 = time.time()
    (d/f'{cfg.run_id}.start').write_text(str(t0))
    while len(list(d.glob('*.start'))) < data.get('rendezvous', {}).get(cfg.run_id, 0) and time.time() - t0 < 60: time.sleep(0.02)
    time.sleep(data['sleep'])
    (d/f'{cfg.run_id}.json').write_text(json.dumps({'start': t0, 'end': time.time(), 'gpu': gpu}))
    return data.get('footprint')

def _configs(needs, same_key:bool=False):
    "One config per need; each with its own memory key (batch size) unless `same_key`."
    return [RunConfig('tiny_cnn', seed=i, bs=8 if same_key else 8 + i) for i in range(len(needs))]

def _intervals(d, todo):
    return {c.run_id: json.loads((d/f'{c.run_id}.json').read_text()) for c in todo}

def _running_at(iv, t): return [r for r, v in iv.items() if v['start'] <= t < v['end']]

def test_runs_share_a_gpu_up_to_its_budget(tmp_path, capsys):
    needs = [6, 6, 3, 3, 3, 1, 12, None]                 # 12: more than the whole GPU; None: its estimate fails
    todo = _configs(needs); need = {c.run_id: math.inf if n is None else n for c, n in zip(todo, needs)}
    def est(c):
        if need[c.run_id] == math.inf: raise ValueError('cannot build it')
        return need[c.run_id]
    first_wave = {todo[i].run_id: 3 for i in (0, 2, 5)}   # 6 + 3 + 1: what the scheduler starts first (then nothing fits)
    rows = run_local(todo, {'dir': str(tmp_path), 'sleep': 0.3, 'rendezvous': first_wave}, tmp_path/'runs', workers=4, worker=fake_worker,
                     gpu_budgets=[10], need=est)
    iv = _intervals(tmp_path, todo)
    assert len(iv) == len(todo) and all(v['gpu'] == 0 for v in iv.values())          # every run ran, on the fake GPU 0
    peak_sum, peak_n = 0, 0
    for r, v in iv.items():                               # the load only rises when a run starts: check every start
        on = _running_at(iv, v['start'])
        peak_sum, peak_n = max(peak_sum, sum(need[x] for x in on if need[x] <= 10)), max(peak_n, len(on))
        if need[r] > 10: assert on == [r], on            # larger than the budget: alone on the GPU
        else: assert sum(need[x] for x in on) <= 10, [need[x] for x in on]
    assert peak_n >= 3 and peak_sum == 10, (peak_n, peak_sum)   # not serialised: 6+3+1 ran together
    assert [r['need'] for r in rows] == [need[c.run_id] for c in todo] and all(r['gpu'] == 0 for r in rows)
    assert [r['need_basis'] for r in rows] == ['estimate'] * 7 + ['unknown']
    err = capsys.readouterr().err
    assert 'on GPU 0: needs 12 (estimate); 12 of 10 in use (more than the budget: alone on the GPU)' in err, err
    assert 'no memory estimate (ValueError: cannot build it); it runs alone on its GPU' in err, err

def test_a_measured_footprint_replaces_the_estimate(tmp_path):
    todo = _configs([0] * 5, same_key=True)
    assert len({memory_key(c) for c in todo}) == 1       # same arch, size, batch and precision: one memory key
    together = {c.run_id: 4 for c in todo[1:4]}            # after the first (alone), three at a time
    rows = run_local(todo, {'dir': str(tmp_path), 'sleep': 0.3, 'footprint': 2, 'rendezvous': together}, tmp_path/'runs', workers=3, worker=fake_worker,
                     gpu_budgets=[10], need=lambda c: 6)      # estimated 6: one at a time; measured 2 (x margin): three at a time
    iv = _intervals(tmp_path, todo)
    first = min(iv, key=lambda r: iv[r]['start'])
    assert _running_at(iv, iv[first]['start']) == [first]   # on the estimate, the first ran alone
    by = {r['run_id']: r for r in rows}
    assert by[first]['need_basis'] == 'estimate' and by[first]['peak'] == 2
    later = [r for r in by.values() if r['run_id'] != first and r['need_basis'] == 'measured']
    assert len(later) == 4 and all(r['need'] == math.ceil(2 * MEASURED_MARGIN) and r['peak'] == 2 for r in later)
    assert max(len(_running_at(iv, v['start'])) for v in iv.values()) == 3   # measured small: now three share the GPU

def test_no_budget_keeps_the_old_rule(tmp_path):
    "Without a budget (a CPU machine, or gpu_memory_fraction None) no need is computed and every worker takes a run."
    import torch
    if torch.cuda.is_available(): pytest.skip('a CPU machine has no budget; here a GPU is present')
    todo = _configs([0] * 3)
    def no_need(c): raise AssertionError('no need is computed without a budget')
    data = {'dir': str(tmp_path), 'sleep': 0.3, 'rendezvous': {c.run_id: 3 for c in todo}}
    rows = run_local(todo, data, tmp_path/'runs', workers=3, worker=fake_worker, need=no_need)
    iv = _intervals(tmp_path, todo)
    assert max(len(_running_at(iv, v['start'])) for v in iv.values()) == 3 and all(v['gpu'] is None for v in iv.values())
    assert all('need' not in r for r in rows)
