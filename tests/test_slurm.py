"""The grid on a real one-node SLURM cluster (tools/slurm_local.sh; issue 18): one job array with 2 tasks at a time,
pre-emption (`scontrol requeue`) and a time limit survived with results identical to uninterrupted runs, failures
(an exception, a killed task) recorded with their reason and rerun alone by --retry-failed, and `status`.

The array is checked in `squeue` while it runs, and after in the job-completion log (`jobcomp/filetxt`) and, when the
script started the cluster with accounting (slurmdbd on a private MariaDB; it prints `SLURM_ACCOUNTING=1`), in `sacct`,
which also answers `job_exit_info` for a job `scontrol` no longer knows. Without accounting the sacct checks skip."""
import os, re, shutil, signal, subprocess, threading, time
from pathlib import Path
import pandas as pd, pytest, yaml
from mugshotrace.core import read_json
from mugshotrace.study.grid import run_grid, load_study
from mugshotrace.study.runner import read_state, PAUSE_FILE
from mugshotrace.study.slurm import squeue_jobs, read_job_record, job_exit_info
from mugshotrace.study.status import status
from test_experiments import make_toy, toy_study

pytestmark = pytest.mark.slurm

EXECUTOR = {'name': 'submitit', 'cluster': 'slurm', 'slurm_array_parallelism': 2, 'cpus_per_task': 1, 'mem_gb': 2,
            'timeout_min': 10, 'slurm_signal_delay_s': 120, 'slurm_max_num_timeout': 3}
GRID = {'arch': ['tiny_cnn'], 'label_source': ['court', 'student'], 'seed': [0, 1]}   # 4 runs

def _study(root, runs):
    p = toy_study(root, runs, grid=GRID, epochs=3)
    d = yaml.safe_load(p.read_text()); d['executor'] = dict(EXECUTOR); p.write_text(yaml.safe_dump(d)); return p

_SCRIPT = Path(__file__).resolve().parent.parent/'tools'/'slurm_local.sh'

def _accounting()->bool:
    "The local cluster runs with accounting (slurmdbd): the script says so and slurmctld's config agrees."
    r = subprocess.run(['bash', str(_SCRIPT), 'status'], capture_output=True, text=True, timeout=60)
    if 'SLURM_ACCOUNTING=1' not in r.stdout.splitlines(): return False
    conf = _sh('scontrol', 'show', 'config').stdout
    assert re.search(r'AccountingStorageType\s*=\s*accounting_storage/slurmdbd', conf), 'script says accounting, slurmctld does not'
    return True

def _sh(*cmd): return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)

def _wait(cond, timeout=300, every=0.5, what=''):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v: return v
        time.sleep(every)
    raise AssertionError(f'timed out waiting for {what}')

def _epochs_done(run_dir)->int:
    try: return int(read_json(Path(run_dir)/'.checkpoint'/'progress.json')['epoch'])
    except (OSError, ValueError, KeyError): return 0

def _run_seconds(info:str)->int:
    "RunTime=[d-]hh:mm:ss of `scontrol show job -o` in seconds."
    d, h, m, s = re.search(r'RunTime=(?:(\d+)-)?(\d+):(\d+):(\d+)', info).groups()
    return ((int(d or 0) * 24 + int(h)) * 60 + int(m)) * 60 + int(s)

def _alive(pid)->bool:
    try: os.kill(pid, 0); return True
    except ProcessLookupError: return False
    except PermissionError: return True

def _restarts(job_id)->int: return job_exit_info(job_id).get('restarts', 0)

def _same_results(a, b):
    "Predictions and weights of two run folders are identical."
    from safetensors.torch import load_file
    import torch
    pa, pb = sorted((a/'preds').rglob('*.csv')), sorted((b/'preds').rglob('*.csv'))
    assert [p.relative_to(a) for p in pa] == [p.relative_to(b) for p in pb] and pa
    for x, y in zip(pa, pb): pd.testing.assert_frame_equal(pd.read_csv(x), pd.read_csv(y))
    wa, wb = load_file(str(a/'model.safetensors')), load_file(str(b/'model.safetensors'))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

class _Watch(threading.Thread):
    "Polls squeue and `status` while the array runs: the largest number of tasks running at once, the states seen."
    def __init__(self, runs_root):
        super().__init__(daemon=True); self.runs_root, self.stop, self.max_running, self.states, self.lines = runs_root, threading.Event(), 0, set(), set()
    def run(self):
        while not self.stop.is_set():
            jobs = squeue_jobs() or {}
            self.max_running = max(self.max_running, sum(j['state'] == 'RUNNING' for j in jobs.values()))
            self.lines |= set(jobs)
            try: self.states |= {r['state'] for r in status(self.runs_root).runs}
            except Exception: pass
            time.sleep(0.5)

@pytest.fixture(scope='module')
def grid(tmp_path_factory):
    "The toy data and an uninterrupted grid of 4 runs, run as one array on the cluster, 2 tasks at a time."
    root = make_toy(tmp_path_factory.mktemp('slurm'), n_people=32)
    study = _study(root, 'ref'); runs = root/'ref'
    from mugshotrace.cli import main
    runs.mkdir(); w = _Watch(runs); w.start(); t0 = time.time()
    rc = main(['run', str(study), '--executor', 'submitit', '--cluster', 'slurm', '--array-parallelism', '2', '--no-progress'])
    w.stop.set(); w.join()
    print(f'reference grid on SLURM: {time.time() - t0:.0f} s')
    return root, study, runs, rc, w

def test_grid_is_one_array_two_at_a_time(grid, monkeypatch):
    root, study, runs, rc, w = grid
    st = load_study(study); ids = [d.name for d in sorted(runs.iterdir()) if (d/'config.json').exists()]
    assert rc == 0 and len(ids) == 4 and all(read_state(runs, i)['state'] == 'done' for i in ids)
    jobs = [read_job_record(runs/i)['job_id'] for i in ids]
    arrays = {j.split('_')[0] for j in jobs}
    assert len(arrays) == 1 and sorted(int(j.split('_')[1]) for j in jobs) == [0, 1, 2, 3]   # one array, one task per run
    aid = arrays.pop()
    assert w.max_running == 2 and {j for j in w.lines if j.startswith(f'{aid}_')} >= set(jobs)   # squeue showed the array, 2 at a time
    assert {'running', 'queued'} <= w.states                      # status saw tasks running and tasks waiting
    comp = Path(os.environ['SLURM_CONF']).parent/'log'/'jobcomp.txt'   # the job-completion log: each task COMPLETED
    lines = lambda: [l for l in comp.read_text().splitlines() if f'ArrayJobId={aid} ' in l]
    done = _wait(lambda: len(lines()) >= 4 and lines(), 60, what='4 tasks in the job-completion log')   # written as each task ends
    assert len(done) == 4 and all('JobState=COMPLETED' in l and 'ExitCode=0:0' in l for l in done)
    if _accounting():   # sacct lists every array task COMPLETED (slurmctld sends each end to slurmdbd: may lag)
        def tasks():
            out = _sh('sacct', '-j', aid, '--format=JobID,State,ExitCode', '-P', '-n').stdout.splitlines()
            rows = {l.split('|')[0]: l.split('|')[1:] for l in out if l.count('|') == 2 and '.' not in l.split('|')[0]}
            return rows if set(rows) >= set(jobs) and all(v[0] == 'COMPLETED' for v in rows.values()) else None
        rows = _wait(tasks, 60, every=1, what=f'sacct to list the 4 tasks of {aid} COMPLETED')
        assert set(rows) == set(jobs) and all(v == ['COMPLETED', '0:0'] for v in rows.values())
        # job_exit_info falls back to sacct for a job scontrol has forgotten (MinJobAge): scontrol made to answer nothing
        import mugshotrace.study.slurm as ms
        real = ms._run
        monkeypatch.setattr(ms, '_run', lambda cmd, timeout=30: real(['true'] if cmd[0] == 'scontrol' else cmd, timeout))
        info = job_exit_info(jobs[0])
        assert info['source'] == 'sacct' and info['job_id'] == jobs[0] and info['state'] == 'COMPLETED' and info['exit_code'] == '0:0'
        monkeypatch.undo()
    else: print('no accounting on the local cluster: sacct not checked')
    logs = list((root/'logs'/'submitit').glob(f'{aid}_*/*_log.out'))   # logs under the study folder
    assert len(logs) == 4
    res = status(runs); assert res.counts == {'done': 4}
    assert all(r['epoch'] == r['epochs'] == 3 and r['job_id'] in jobs for r in res.runs)

def test_requeue_time_limit_and_failures(grid):
    "A: pre-empted (`scontrol requeue`) after epoch 1; B: hits a shortened time limit after epoch 1 (SIGUSR2 →"
    " submitit checkpoint → requeue); C: raises; D: killed (SIGKILL, as the OOM killer does). A, B resume and equal"
    " the uninterrupted runs; C, D are failed with reasons; --retry-failed reruns just C and D."
    root, study_ref, ref, *_ = grid
    study = _study(root, 'int'); runs = root/'int'
    a, b, c, d = sorted(i.name for i in ref.iterdir() if (i/'config.json').exists())
    for i in (a, b, d): (runs/i).mkdir(parents=True); (runs/i/PAUSE_FILE).touch()   # wait after each epoch while it exists
    (runs/c).mkdir(parents=True); (runs/c/'sample.json').mkdir()                  # writing sample.json fails: IsADirectoryError
    out = {}
    th = threading.Thread(target=lambda: out.update(df=run_grid(study, progress=False)), daemon=True); th.start()
    job = lambda i: _wait(lambda: read_job_record(runs/i).get('job_id'), 60, what=f'job.json of {i}')
    t0 = time.time(); todo = {'a', 'b', 'd'}; seen_status = set()
    while todo:   # act on each run as it reaches the end of its first epoch, in whatever order SLURM starts them
        assert time.time() - t0 < 600 and th.is_alive(), 'the array did not progress'
        seen_status |= {r['state'] for r in status(runs).runs}
        if 'a' in todo and _epochs_done(runs/a) >= 1:
            ja = job(a); pa = read_state(runs, a)['pid']; assert _sh('scontrol', 'requeue', ja).returncode == 0
            # the old task lives on until SLURM kills it (submitit ignores the SIGTERM; KillWait later, SIGKILL): unpaused
            # before that, it could finish its epochs in the old allocation and the requeue would test nothing
            _wait(lambda: _restarts(ja) >= 1 and not _alive(pa), 60, what='A requeued and its old task gone')
            (runs/a/PAUSE_FILE).unlink(); todo.discard('a')
        if 'b' in todo and _epochs_done(runs/b) >= 1:
            jb = job(b); pb = read_state(runs, b)['pid']; run_s = _run_seconds(_sh('scontrol', 'show', 'job', '-o', jb).stdout)
            limit = -(-run_s // 60) + 1   # minutes: 1-2 min left, within the 120 s signal delay, so SLURM signals at its next check
            assert _sh('scontrol', 'update', f'JobId={jb}', f'TimeLimit={limit}').returncode == 0
            _wait(lambda: _restarts(jb) >= 1 and not _alive(pb), 120, what='B signalled, requeued by submitit, old task gone')
            _sh('scontrol', 'update', f'JobId={jb}', 'TimeLimit=10')   # the next allocation gets the study's limit again
            (runs/b/PAUSE_FILE).unlink(); todo.discard('b')
        if 'd' in todo and _epochs_done(runs/d) >= 1:
            pid = read_state(runs, d)['pid']; os.kill(pid, signal.SIGKILL); (runs/d/PAUSE_FILE).unlink(); todo.discard('d')
        time.sleep(0.5)
    th.join(600); df = out['df'].set_index('run_id')
    assert df.loc[a, 'state'] == df.loc[b, 'state'] == 'done'
    for i in (a, b):   # resumed after their first epoch, in a new allocation, with the uninterrupted results
        s = read_state(runs, i); m = read_json(runs/i/'metrics.json')
        assert s['attempts'] == 2 and m['train']['resumed_from']['epoch'] >= 1 and s['job']['restarts'] >= 1
        _same_results(runs/i, ref/i)
    blog = (root/'logs'/'submitit'/read_job_record(runs/b)['job_id']/f"{read_job_record(runs/b)['job_id']}_0_log.err").read_text()
    assert 'this job is timed-out' in blog   # submitit's handler saw SLURM's signal before the time limit
    assert read_state(runs, c)['state'] == 'failed' and 'IsADirectoryError' in read_state(runs, c)['error']
    sd = read_state(runs, d)
    assert sd['state'] == 'failed' and sd['error'].startswith('JobDied') and sd['job_exit']['state'] in ('FAILED', 'CANCELLED')
    assert 'running' in seen_status and status(runs).counts == {'done': 2, 'failed': 2}
    # the failed ones, and only they, go again: one new array of 2 tasks; C's obstacle removed, D resumes its checkpoint
    (runs/c/'sample.json').rmdir()
    before = {i: read_state(runs, i)['history'] for i in (a, b)}
    df2 = run_grid(study, retry_failed=True, progress=False).set_index('run_id')
    assert (df2.state == 'done').all() and {i: read_state(runs, i)['history'] for i in (a, b)} == before
    new = {read_job_record(runs/i)['job_id'].split('_')[0] for i in (c, d)}
    assert len(new) == 1 and new != {read_job_record(runs/a)['job_id'].split('_')[0]}
    for i in (c, d): _same_results(runs/i, ref/i)

def test_status_shows_lost_runs(grid):
    "A run whose state says running, whose heartbeat is stale and whose job has left the queue is lost."
    root, study, ref, *_ = grid
    runs = root/'lost'; src = next(i for i in sorted(ref.iterdir()) if (i/'config.json').exists())
    dst = runs/src.name; dst.mkdir(parents=True); shutil.copy(src/'config.json', dst/'config.json'); shutil.copy(src/'job.json', dst/'job.json')
    st = read_json(src/'state.json'); st['state'] = 'running'
    (dst/'state.json').write_text(__import__('json').dumps(st)); (dst/'heartbeat').write_text('0')
    os.utime(dst/'heartbeat', (time.time() - 600,) * 2)
    assert squeue_jobs() is not None and read_job_record(dst)['job_id'] not in squeue_jobs()
    assert status(runs).runs[0]['state'] == 'lost'
    os.utime(dst/'heartbeat')                  # a fresh heartbeat: running (a worker outside SLURM, say)
    assert status(runs).runs[0]['state'] == 'running'

def test_slurm_tutorial_runs_on_the_cluster():
    "nbs/tutorials/03_slurm: its `slurm` cells (a tiny grid as one array, status, --retry-failed) run against the test cluster."
    from nbdev.test import test_nb
    from mugshotrace import cli
    cli.SUBCOMMANDS.setdefault('status', ('one table of every run of a study: state, SLURM job, epoch, heartbeat, time left',
                                          'mugshotrace.study.status', 'add_status_parser'))   # no-op once the CLI lists it
    nb = Path(__file__).resolve().parent.parent/'nbs'/'tutorials'/'03_slurm.ipynb'
    t0 = time.time()
    ok, _ = test_nb(nb, skip_flags=['slow', 'cuda'], force_flags=['slurm'])
    print(f'tutorial on SLURM: {time.time() - t0:.0f} s')
    assert ok
