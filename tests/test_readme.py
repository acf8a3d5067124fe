"""The README's Python quick start runs as written (in a temporary folder) and does what it says."""
import re, subprocess, sys
from pathlib import Path

README = Path(__file__).resolve().parents[1]/'README.md'


def test_python_quick_start_runs(tmp_path):
    blocks = re.findall(r'```python\n(.*?)```', README.read_text(encoding='utf-8'), re.S)
    code = next(b for b in blocks if 'from mugshotrace' in b)
    assert len(code.strip().splitlines()) <= 14, 'the quick start should stay short'
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r'(\d+) runs, (\d+) gaps flagged after correction; report: (\S+)', r.stdout)
    assert m and int(m.group(1)) == 2, r.stdout
    report = Path(m.group(3))
    assert report.is_file() and report.is_relative_to(tmp_path/'quickstart')
    assert (tmp_path/'quickstart'/'audit'/'audit.csv').is_file() and (tmp_path/'quickstart'/'study.json').is_file()
