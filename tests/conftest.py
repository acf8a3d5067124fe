import os, subprocess, pytest
from pathlib import Path

os.environ.setdefault('MPLBACKEND', 'Agg')
_SLURM_SCRIPT = Path(__file__).resolve().parent.parent/'tools'/'slurm_local.sh'

def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False, help='run tests marked slow')
    parser.addoption('--runcuda', action='store_true', default=False, help='run tests that need a GPU')

def slurm_cluster()->str|None:
    "None when the local test cluster (tools/slurm_local.sh) is up (SLURM_CONF then set), else why it is not."
    if not hasattr(slurm_cluster, 'why'):
        def call(cmd):
            try: return subprocess.run(['bash', str(_SLURM_SCRIPT), cmd], capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as e: return subprocess.CompletedProcess(cmd, 1, '', f'{cmd}: {e}')
        r = call('status')
        if r.returncode != 0 and os.environ.get('MUGSHOTRACE_SLURM_AUTOSTART', '1') == '1': r = call('start')   # .ci/run starts it first
        conf = [l.split('=', 1)[1] for l in r.stdout.splitlines() if l.startswith('SLURM_CONF=')]
        if r.returncode == 0 and conf: os.environ['SLURM_CONF'] = conf[-1]; slurm_cluster.why = None
        else: slurm_cluster.why = 'no local SLURM cluster: ' + ((r.stderr or r.stdout).strip().splitlines() or ['tools/slurm_local.sh start failed'])[-1]
    return slurm_cluster.why

def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason='slow: run with --runslow')
    skip_cuda = pytest.mark.skip(reason='needs a GPU: run with --runcuda on a CUDA machine')
    for it in items:
        if 'slow' in it.keywords and not config.getoption('--runslow'): it.add_marker(skip_slow)
        if 'cuda' in it.keywords and not config.getoption('--runcuda'): it.add_marker(skip_cuda)
        if 'slurm' in it.keywords and (why := slurm_cluster()) is not None: it.add_marker(pytest.mark.skip(reason=why))
