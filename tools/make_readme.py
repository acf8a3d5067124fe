"""Render nbs/index.ipynb to README.md without Quarto (nbdev-readme needs Quarto, which cannot be installed
offline). Markdown cells are copied, visible code cells become ```python blocks. `--check` exits 1 when
README.md is out of date."""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]

def render(nb_path=root/'nbs'/'index.ipynb'):
    nb = json.loads(Path(nb_path).read_text(encoding='utf-8'))
    out = ['<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n']
    for c in nb['cells']:
        src = ''.join(c['source']).strip('\n')
        if not src: continue
        if c['cell_type'] == 'markdown': out.append(src + '\n')
        elif c['cell_type'] == 'code':
            lines = src.splitlines()
            if any(l.strip() in ('#| hide', '#|hide') for l in lines): continue
            lines = [l for l in lines if not l.startswith('#|')]
            if lines: out.append('```python\n' + '\n'.join(lines) + '\n```\n')
    return '\n'.join(out)

if __name__ == '__main__':
    txt, dest = render(), root/'README.md'
    if '--check' in sys.argv:
        if not dest.exists() or dest.read_text(encoding='utf-8') != txt:
            print('README.md is out of date: run `python tools/make_readme.py`', file=sys.stderr); sys.exit(1)
    else: dest.write_text(txt, encoding='utf-8'); print(f'wrote {dest}')
