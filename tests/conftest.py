import os, pytest

os.environ.setdefault('MPLBACKEND', 'Agg')

def pytest_addoption(parser):
    parser.addoption('--runslow', action='store_true', default=False, help='run tests marked slow')
    parser.addoption('--runcuda', action='store_true', default=False, help='run tests that need a GPU')

def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason='slow: run with --runslow')
    skip_cuda = pytest.mark.skip(reason='needs a GPU: run with --runcuda on a CUDA machine')
    for it in items:
        if 'slow' in it.keywords and not config.getoption('--runslow'): it.add_marker(skip_slow)
        if 'cuda' in it.keywords and not config.getoption('--runcuda'): it.add_marker(skip_cuda)
