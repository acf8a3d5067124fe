"""The offline docs check (`tools/check_docs.py`, run by `.ci/run`): it passes on a good nbdev project and fails
when a notebook's doc processing fails — on a tiny project made here, so the test takes seconds."""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = '''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"
[project]
name = "tinypkg"
version = "0.0.1"
[tool.nbdev]
title = "tinypkg"
jupyter_hooks = false
update_pyproject = false
'''


def _nb(cells):
    return {'cells': [{'cell_type': t, 'metadata': {}, 'source': s, **({'outputs': [], 'execution_count': None} if t == 'code' else {})}
                      for t, s in cells], 'metadata': {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}},
            'nbformat': 4, 'nbformat_minor': 5}


def _project(tmp_path, broken:bool)->Path:
    (tmp_path/'nbs').mkdir(); (tmp_path/'pyproject.toml').write_text(PYPROJECT)
    good = [('markdown', '# tiny\n\n> A tiny module.'), ('code', '#| default_exp tiny'), ('code', '#| export\ndef f(x): "Double x." ; return 2 * x')]
    (tmp_path/'nbs'/'00_tiny.ipynb').write_text(json.dumps(_nb(good)))
    if broken:   # a cell with an import is executed by the doc processing: here it fails
        bad = [('markdown', '# broken'), ('code', '#| default_exp broken'), ('code', '#| export\ndef g(): pass'),
               ('code', 'import json\nundefined_name + 1')]
        (tmp_path/'nbs'/'01_broken.ipynb').write_text(json.dumps(_nb(bad)))
    return tmp_path


@pytest.mark.parametrize('broken', [False, True])
def test_docs_check_fails_exactly_when_doc_processing_fails(tmp_path, broken):
    root = _project(tmp_path, broken)
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'check_docs.py'), '--root', str(root), '--skip-browser', '--n-workers', '1'],
                       capture_output=True, text=True, timeout=300)
    assert (r.returncode != 0) == broken, r.stderr[-2000:]
    if broken: assert 'doc processing failed' in r.stderr and 'notebook: broken' in r.stderr and 'NameError' in r.stderr
    else: assert (root/'_proc'/'_html'/'00_tiny.html').is_file()


@pytest.mark.skipif(shutil.which('chromium') is None, reason='headless Chromium is not installed (.ci/run installs it)')
def test_docs_check_loads_pages_in_chromium(tmp_path):
    root = _project(tmp_path, broken=False)
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'check_docs.py'), '--root', str(root), '--n-workers', '1'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and '1 loaded in Chromium' in r.stderr, r.stderr[-2000:]
