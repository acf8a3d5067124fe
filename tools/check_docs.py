"""Offline check of the documentation site. Quarto cannot be installed without internet access, so CI cannot run
`nbdev-docs`; this runs everything before Quarto and a stand-in for it:

1. nbdev's own doc processing (`nbdev-proc-nbs --force`, the step `nbdev-docs` runs before Quarto) on every notebook:
   it executes the exported, import and `show_doc` cells and fails on any error in them;
2. every processed notebook rendered to one HTML page (markdown-it, offline, no Quarto);
3. every page loaded in headless Chromium: the page must load, carry the notebook's title, and raise no script error.

Exit status 1 with one line per failure. `--skip-browser` stops after step 2 (a machine without Chromium)."""
import argparse, html, json, re, shutil, subprocess, sys, tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
                  '--disable-component-update', '--disable-sync', '--no-first-run', '--virtual-time-budget=5000',
                  '--enable-logging=stderr', '--v=0']

def chromium():
    "Path of a headless-capable Chromium, or None."
    return next((shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(n)), None)

def process(root:Path, n_workers:int=2)->list[str]:
    "Run nbdev's doc processing on every notebook into `_proc/`; return failures."
    r = subprocess.run(['nbdev-proc-nbs', '--force', '--n-workers', str(n_workers)], cwd=root, capture_output=True, text=True)
    if r.returncode == 0: return []
    msg = [l for l in (r.stderr + r.stdout).splitlines() if l.strip()]
    err = next((l for l in msg if l.startswith('Exception: Error in notebook')), msg[-1] if msg else 'unknown error')
    tail = next((l for l in reversed(msg) if re.match(r'^\w+Error', l)), '')
    return [f'doc processing failed: {err} {tail}'.strip()]

def notebooks(root:Path)->list[Path]:
    "The processed notebooks (everything nbdev-docs would render)."
    return sorted(p for p in (root/'_proc').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)

def title_of(nb:Path)->str:
    "The notebook's first level-1 heading (Quarto's page title), or its file name."
    for c in json.loads(nb.read_text(encoding='utf-8'))['cells']:
        src = _text(c.get('source'))
        m = re.search(r'^title:\s*(.+)$', src, re.M) if c['cell_type'] == 'raw' else re.search(r'^#\s+(.+)$', src, re.M) if c['cell_type'] == 'markdown' else None
        if m: return m.group(1).strip().strip('"\'')
    return nb.stem

def _text(x)->str: return ''.join(x) if isinstance(x, list) else str(x or '')

def _output_html(o:dict, md)->str:
    "One cell output as HTML (markdown, html, png, plain text, streams, errors)."
    if o.get('output_type') == 'stream': return f"<pre>{html.escape(_text(o.get('text')))}</pre>"
    if o.get('output_type') == 'error': return f"<pre class='error'>{html.escape(o.get('ename', ''))}: {html.escape(o.get('evalue', ''))}</pre>"
    d = o.get('data', {})
    if 'text/markdown' in d: return md.render(_text(d['text/markdown']))
    if 'text/html' in d: return _text(d['text/html'])
    if 'image/png' in d: return f"<img alt='figure' src='data:image/png;base64,{_text(d['image/png']).strip()}'>"
    return f"<pre>{html.escape(_text(d.get('text/plain', '')))}</pre>"

def notebook_html(nb:dict)->str:
    "A processed notebook as the body of one HTML page: markdown rendered, code shown, outputs embedded."
    from markdown_it import MarkdownIt
    md = MarkdownIt('commonmark', {'html': True}).enable('table')
    parts = []
    for c in nb['cells']:
        src = _text(c.get('source'))
        if c['cell_type'] == 'markdown': parts.append(md.render(src))
        elif c['cell_type'] == 'code':
            lines = src.splitlines()
            if any(re.match(r'#\|\s*(hide|echo:\s*false)', l) for l in lines): code = ''
            else: code = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
            if code: parts.append(f"<pre><code class='language-python'>{html.escape(code)}</code></pre>")
            parts += [_output_html(o, md) for o in c.get('outputs', [])]
    return '\n'.join(parts)

def render(root:Path, nb:Path, out:Path)->tuple[Path|None, str|None]:
    "Render one processed notebook to a standalone HTML page (offline: markdown-it, no Quarto)."
    rel = nb.relative_to(root/'_proc')
    try: body = notebook_html(json.loads(nb.read_text(encoding='utf-8')))
    except Exception as e: return None, f'{rel}: rendering failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    page = out/rel.with_suffix('.html'); page.parent.mkdir(parents=True, exist_ok=True)
    t = html.escape(title_of(nb))
    page.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>{t}</title></head><body><h1>{t}</h1>{body}</body></html>',
                    encoding='utf-8')
    return page, None

def load(page:Path, title:str, browser:str)->str|None:
    "Load one page in headless Chromium; None when it loaded with its title and no script error."
    with tempfile.TemporaryDirectory() as prof:
        try:
            r = subprocess.run([browser, *CHROMIUM_FLAGS, f'--user-data-dir={prof}', '--dump-dom', page.as_uri()],
                               capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired: return f'{page.name}: Chromium timed out loading the page'
    if r.returncode != 0: return f'{page.name}: Chromium exited {r.returncode}'
    if '</html>' not in r.stdout or html.escape(title) not in r.stdout: return f'{page.name}: the page did not load (no title in the DOM)'
    if 'Uncaught' in r.stderr: return f'{page.name}: script error: ' + next(l for l in r.stderr.splitlines() if 'Uncaught' in l)[-200:]
    return None

def main(argv=None)->int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--skip-browser', action='store_true', help='render but do not load the pages in Chromium')
    ap.add_argument('--n-workers', type=int, default=2, help='processes for nbdev-proc-nbs (default: %(default)s)')
    ap.add_argument('--root', default=str(ROOT), help='the nbdev project (default: this repository)')
    a = ap.parse_args(argv)
    root = Path(a.root).resolve()
    fails = process(root, a.n_workers)
    nbs = notebooks(root)
    if not nbs: fails.append('doc processing produced no notebooks in _proc/')
    out = root/'_proc'/'_html'
    pages = []
    for nb in nbs:
        page, err = render(root, nb, out)
        if err: fails.append(err)
        else: pages.append((page, title_of(nb)))
    browser = None if a.skip_browser else chromium()
    if not a.skip_browser and browser is None: fails.append('headless Chromium not found (apt-get install chromium, or --skip-browser)')
    if browser:
        with ThreadPoolExecutor(2) as ex: fails += [e for e in ex.map(lambda pt: load(*pt, browser), pages) if e]
    for f in fails: print(f'check_docs: {f}', file=sys.stderr)
    print(f'check_docs: {len(nbs)} notebooks processed, {len(pages)} pages rendered'
          + (f', {len(pages)} loaded in Chromium' if browser else '') + f'; {len(fails)} failure(s)', file=sys.stderr)
    return 1 if fails else 0

if __name__ == '__main__': sys.exit(main())
