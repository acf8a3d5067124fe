"""The `mugshotrace` command: every subcommand explains itself, bad input is one line and a non-zero exit, and the
README's two commands are the ones CI runs."""
import dataclasses, re, subprocess, sys
from pathlib import Path
import pytest
from mugshotrace.cli import SUBCOMMANDS, build_parser

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
    ('run', ['phase2']),                       # a shipped study needs --data DIR
    ('run', ['phase2', '--data', '{tmp}', '--dry-run', '--train', 'epochs']),
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


def test_unknown_subcommand_with_help_is_named_and_exit_2():
    "An unknown subcommand with `--help` (e.g. `mugshotrace sentence --help`) used to print the main help and exit 0."
    for args in (['sentence', '--help'], ['frobnicate'], ['--help', 'frobnicate']):
        r = run(*args)
        assert r.returncode == 2, (args, r.returncode, r.stdout)
        assert f"unknown subcommand '{[a for a in args if not a.startswith('-')][0]}'" in r.stderr
    assert run('--help').returncode == 0

# every subcommand writes somewhere except `run`, whose outputs go where its study file says
WRITES = set(SUBCOMMANDS) - {'run', 'status'}   # run writes into the study; status only reads

def _subparser(cmd):
    p = build_parser(only=cmd)
    return next(a for a in p._actions if a.dest == 'command').choices[cmd]

@pytest.mark.parametrize('cmd', list(SUBCOMMANDS))
def test_every_subcommand_has_the_common_options(cmd):
    "The options of `config.add_common_arguments`: `--no-progress` everywhere, `--out` where the subcommand writes."
    flags = {o for a in _subparser(cmd)._actions for o in a.option_strings}
    assert '--no-progress' in flags, f'{cmd}: no --no-progress (use config.add_common_arguments)'
    if cmd in WRITES: assert '--out' in flags, f'{cmd}: no --out'
    assert {a.dest for a in _subparser(cmd)._actions if '--no-progress' in a.option_strings} == {'progress'}

def _minimal_args(sp):
    "Values for the required arguments of subparser `sp` (first choice, else 'x'), and their dests."
    argv, given = [], set()
    for a in sp._actions:
        if not a.required: continue
        v = str(list(a.choices)[0]) if a.choices else 'x'
        argv += ([a.option_strings[0]] if a.option_strings else []) + [v]; given.add(a.dest)
    return argv, given

def _default(f):
    if f.default is not dataclasses.MISSING: return f.default
    if f.default_factory is not dataclasses.MISSING: return f.default_factory()
    return dataclasses.MISSING

@pytest.mark.parametrize('cmd', list(SUBCOMMANDS))
def test_each_cli_default_equals_its_config_default(cmd):
    "A subcommand whose flags come from a config (`set_defaults(config_cls=XConfig)`) parses `[]` + its required arguments to the config's defaults."
    sp = _subparser(cmd)
    cls = sp.get_default('config_cls')
    if cls is None: pytest.skip(f'{cmd} declares no config_cls')
    argv, given = _minimal_args(sp)
    ns = sp.parse_args(argv)
    bad = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in given or not hasattr(ns, f.name): continue
        v, d = getattr(ns, f.name), _default(f)
        if isinstance(v, list): v = tuple(v)
        if d is dataclasses.MISSING or v != d: bad.append(f'--{f.name.replace("_", "-")}: CLI {v!r} != {cls.__name__} {d!r}')
    assert not bad, f'{cmd}: CLI defaults differ from the config\'s:\n' + '\n'.join(bad)
