"""The `mugshotrace` command: every subcommand explains itself, bad input is one line and a non-zero exit, and the
README's two commands are the ones CI runs."""
import re, subprocess, sys
from pathlib import Path
import pytest
from mugshotrace.cli import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]

def run(*args, timeout=300):
    return subprocess.run([sys.executable, '-m', 'mugshotrace.cli', *args], capture_output=True, text=True, timeout=timeout)

@pytest.mark.parametrize('cmd', list(SUBCOMMANDS))
def test_every_subcommand_has_help(cmd):
    r = run(cmd, '--help')
    assert r.returncode == 0, r.stderr
    assert f'mugshotrace {cmd}' in r.stdout and len(r.stdout.splitlines()) > 4

@pytest.mark.parametrize('cmd,args', [
    ('synth', ['--out', '{tmp}/s', '--people', '0']),
    ('preprocess', ['--images', '{tmp}/nope', '--table', '{tmp}/nope.csv', '--variant', 'resized', '--out', '{tmp}/o']),
    ('run', ['{tmp}/missing.yaml']),
    ('audit', ['{tmp}/no_runs']),
    ('explain', ['{tmp}/no_runs']),
    ('label', ['{tmp}/no_model', '--images', '{tmp}/no_images', '--out', '{tmp}/x.csv']),
    ('confound', ['{tmp}/no_runs']),
    ('report', ['{tmp}/no_runs']),
])
def test_bad_input_is_one_line_and_exit_2(cmd, args, tmp_path):
    r = run(cmd, *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith('mugshotrace: error:') and 'Traceback' not in r.stderr, r.stderr

def test_readme_has_the_two_commands_ci_runs():
    readme = (ROOT/'README.md').read_text()
    cmds = re.findall(r'```sh\n(.*?)\n```', readme, re.S)
    assert len(cmds) == 2, cmds
    assert 'mugshotrace demo' in cmds[0] and cmds[0].startswith('pip install')
    assert cmds[1].startswith('pip install -e ".[dev]"') and 'pytest' in cmds[1]
    assert "grep -m1 -E '^pip install -e \"\\.\\[dev\\]\"' README.md" in (ROOT/'.ci'/'run').read_text()
