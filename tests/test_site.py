"""The rendered study. `dmstudy report` renders the project twice: through the Quarto path with a stand-in `quarto`
that reads every page as Quarto does (cell options as one YAML block, front matter, `_quarto.yml`) and fails loudly
on anything Quarto would reject, and through the nbconvert fallback. Then the fallback site is opened in Debian's
Chromium through Playwright: every image loads, every link resolves, the navigation bar works, nothing is logged as
an error. Screenshots go to $DMSTUDY_SCREENSHOTS (default: a temporary folder, printed).

The browser tests need Chromium (`/usr/bin/chromium`, or $CHROMIUM): `.ci/run` installs it. Where it is missing they
fail when $CI is set (a CI machine must have it) and are skipped, with that sentence, on a developer's machine."""
import json, os, re, shutil, subprocess, sys, textwrap
from pathlib import Path
from urllib.parse import unquote, urlparse
import pytest, yaml

ROOT = Path(__file__).resolve().parents[1]

# What a Quarto cell option may be called: Quarto's own cell options, and the directives nbdev passes on to Quarto
# as `key: true` lines (`exports`, the test flags). The cells of `export`, `exporti`, `hide` and `default_exp` must be
# gone before Quarto sees a page.
QUARTO_OPTIONS = {
    'label', 'echo', 'eval', 'output', 'warning', 'error', 'include', 'message', 'code-fold', 'code-summary',
    'code-overflow', 'code-line-numbers', 'code-tools', 'fig-cap', 'fig-subcap', 'fig-alt', 'fig-align', 'fig-width',
    'fig-height', 'fig-format', 'fig-dpi', 'fig-pos', 'fig-env', 'fig-cap-location', 'tbl-cap', 'tbl-subcap',
    'tbl-colwidths', 'tbl-cap-location', 'cap-location', 'layout', 'layout-ncol', 'layout-nrow', 'layout-align',
    'classes', 'panel', 'column', 'output-location', 'tags', 'filename', 'lst-label', 'lst-cap', 'html-table-processing'}
NBDEV_PASSED = {'exports', 'exec_doc', 'filter_stream', 'slow', 'gpu', 'notest'}
NBDEV_REMOVED = {'export', 'exporti', 'hide', 'default_exp'}

STANDIN = textwrap.dedent(f'''\
    #!{sys.executable}
    """A stand-in for `quarto render`: reads what Quarto reads, the way Quarto reads it, and writes stub pages."""
    import glob, json, sys, yaml
    from pathlib import Path
    OPTIONS, REMOVED = {sorted(QUARTO_OPTIONS | NBDEV_PASSED)!r}, {sorted(NBDEV_REMOVED)!r}
    def fail(msg): sys.exit(f"ERROR: {{msg}}")
    args = sys.argv[1:]
    if not args or args[0] != 'render': fail(f"the stand-in only renders, got {{args}}")
    out = Path(args[args.index('--output-dir') + 1]) if '--output-dir' in args else Path('_site')
    try: cfg = yaml.safe_load(open('_quarto.yml'))
    except yaml.YAMLError as e: fail(f"_quarto.yml: {{e}}")
    def check_nav(items, where):
        for it in items:
            if isinstance(it, str):
                if any(c in it for c in '*?['): fail(f"{{where}}: the glob {{it!r}} would be shown as text; write it as `- auto: {{it!r}}`")
                if not Path(it).exists(): fail(f"{{where}}: {{it}} does not exist")
            elif 'auto' in it:
                if not glob.glob(it['auto']): fail(f"{{where}}: auto {{it['auto']!r}} matches nothing")
            elif 'href' in it:
                if not Path(it['href']).exists(): fail(f"{{where}}: {{it['href']}} does not exist")
            else: check_nav(it.get('contents') or it.get('menu') or [], where)
    web = cfg.get('website') or {{}}
    check_nav((web.get('navbar') or {{}}).get('left') or [], 'navbar'); check_nav((web.get('sidebar') or {{}}).get('contents') or [], 'sidebar')
    keep_md = ((cfg.get('format') or {{}}).get('html') or {{}}).get('keep-md')
    pages = [p for pat in cfg['project']['render'] for p in sorted(glob.glob(pat))]
    if not pages: fail("project.render matches no file")
    for i, p in enumerate(pages, 1):
        print(f"[{{i}}/{{len(pages)}}] {{p}}", file=sys.stderr)
        nb = json.load(open(p)); fm = {{}}
        for k, c in enumerate(nb['cells']):
            src = ''.join(c['source'])
            if k == 0 and c['cell_type'] == 'raw' and src.startswith('---'):
                fm = yaml.safe_load(src.split('---')[1])
                if not isinstance(fm, dict): fail(f"{{p}}: front matter is not a mapping")
            if c['cell_type'] != 'code': continue
            lines = src.splitlines(); n = 0
            while n < len(lines) and lines[n].startswith('#|'): n += 1
            if not n: continue
            block = '\\n'.join(l[2:].removeprefix(' ') for l in lines[:n])
            try: opts = yaml.safe_load(block)
            except yaml.YAMLError as e: fail(f"{{p}}, cell {{k}}: YAMLException: {{e}}\\n{{block}}")
            if not isinstance(opts, dict): fail(f"{{p}}, cell {{k}}: cell options are not a YAML mapping:\\n{{block}}")
            bad = set(opts) - set(OPTIONS)
            if bad & set(REMOVED): fail(f"{{p}}, cell {{k}}: an nbdev {{sorted(bad & set(REMOVED))}} cell reached Quarto")
            if bad: fail(f"{{p}}, cell {{k}}: unknown cell options {{sorted(bad)}}")
        d = out/Path(p).parent/(fm.get('output-file') or Path(p).stem + '.html')
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_text(f"<!DOCTYPE html><html><head><title>{{fm.get('title', Path(p).stem)}}</title></head><body></body></html>")
        if keep_md: d.with_name(d.name + '.md').write_text(f"# {{fm.get('title', '')}}\\n")
    ''')


@pytest.fixture(scope='session')
def standin(tmp_path_factory):
    "A directory holding the stand-in `quarto`."
    d = tmp_path_factory.mktemp('bin')
    (d/'quarto').write_text(STANDIN); (d/'quarto').chmod(0o755)
    return d


@pytest.fixture(scope='session')
def quarto_site(standin, tmp_path_factory):
    "`dmstudy report --backend quarto --no-execute` with the stand-in on the PATH (the `site` fixture executes the pages)."
    from dmstudy.cli import main
    out = tmp_path_factory.mktemp('qsite')/'_site'
    old = os.environ['PATH']; os.environ['PATH'] = f'{standin}{os.pathsep}{old}'
    try: assert main(['report', '--root', str(ROOT), '--out', str(out), '--backend', 'quarto', '--no-execute']) == 0
    finally: os.environ['PATH'] = old
    return out


@pytest.fixture(scope='session')
def site(tmp_path_factory):
    "The fallback site, rendered without Quarto."
    from dmstudy.site import render_site
    out = tmp_path_factory.mktemp('site')/'_site'
    return render_site(ROOT, out, backend='fallback', jobs=2, quiet=True).parent


def doc_pages():
    "The pages nbdev's doc links name: `<module>.html` for every module of `_modidx.py`, and the `Docs:` URL of each module."
    from dmstudy._modidx import d
    base = d['settings']['doc_host'] + d['settings']['doc_baseurl'] + '/'
    pages = {loc.partition('#')[0] for syms in d['syms'].values() for loc, _ in syms.values()}
    for f in (ROOT/'dmstudy').glob('*.py'):
        pages |= {u[len(base):] for u in re.findall(r'Docs: (\S+?\.html(?:\.md)?)', f.read_text()) if u.startswith(base)}
    return sorted(pages)


def test_standin_rejects_what_quarto_rejects(standin, tmp_path):
    "The stand-in fails, as Quarto 1.7 did, on an unprocessed chapter (`#| export` then `#| eval: false`) and on a literal sidebar glob."
    (tmp_path/'_quarto.yml').write_text(yaml.safe_dump({'project': {'render': ['09_cli.ipynb']}}))
    shutil.copy(ROOT/'nbs'/'09_cli.ipynb', tmp_path/'09_cli.ipynb')
    nb = json.loads((tmp_path/'09_cli.ipynb').read_text())
    nb['cells'].append({'cell_type': 'code', 'metadata': {}, 'outputs': [], 'execution_count': None, 'source': '#| export\n#| eval: false\nx = 1'})
    (tmp_path/'09_cli.ipynb').write_text(json.dumps(nb))
    r = subprocess.run([standin/'quarto', 'render'], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and ('YAMLException' in r.stderr or 'reached Quarto' in r.stderr or 'not a YAML mapping' in r.stderr), r.stderr
    (tmp_path/'_quarto.yml').write_text(yaml.safe_dump({'project': {'render': ['x.ipynb']}, 'website': {'sidebar': {'contents': ['0*.ipynb']}}}))
    r = subprocess.run([standin/'quarto', 'render'], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and 'would be shown as text' in r.stderr, r.stderr


def test_quarto_path_renders_every_page(quarto_site):
    "Every page of project.render reached the stand-in and was written where nbdev's doc links point."
    cfg = yaml.safe_load((ROOT/'nbs'/'_quarto.yml').read_text())
    n = sum(len(list((ROOT/'nbs').glob(p))) for p in cfg['project']['render'])
    got = sorted(p.relative_to(quarto_site).as_posix() for p in quarto_site.rglob('*.html'))
    assert len(got) == n, got
    assert 'index.html' in got and 'report/demo.html' in got and 'analysis.html' in got, got
    missing = [p for p in doc_pages() if not (quarto_site/p).exists()]
    assert not missing, f"doc links to pages the site does not build: {missing}"


def test_fallback_doc_links_and_titles(site):
    "The fallback writes the same pages: nbdev's doc links resolve, and no two pages share a title."
    from bs4 import BeautifulSoup
    missing = [p for p in doc_pages() if not (site/p).exists()]
    assert not missing, f"doc links to pages the site does not build: {missing}"
    titles = {}
    for p in sorted(site.rglob('*.html')):
        t = BeautifulSoup(p.read_text(), 'html.parser').title.string
        titles.setdefault(t, []).append(p.relative_to(site).as_posix())
    dup = {t: ps for t, ps in titles.items() if len(ps) > 1}
    assert not dup, f"pages with the same title: {dup}"


def test_every_page_links_resolve(site):
    "Every relative link of every page points to a file of the site, and a fragment to an id in it."
    from bs4 import BeautifulSoup
    pages = sorted(site.rglob('*.html'))
    assert len(pages) >= 20, [p.name for p in pages]
    soups = {p.resolve(): BeautifulSoup(p.read_text(), 'html.parser') for p in pages}  # each page parsed once
    ids = {}
    def has_id(target, frag):
        target = target.resolve()
        if target not in ids:
            soup = soups[target] if target in soups else BeautifulSoup(target.read_text(), 'html.parser')
            ids[target] = {el['id'] for el in soup.find_all(id=True)}
        return frag in ids[target]
    bad = []
    for p in pages:
        soup = soups[p.resolve()]
        for a in soup.find_all('a', href=True):
            h = a['href']
            if re.match(r'^[a-z][a-z0-9+.-]*:', h, re.I): continue
            path, _, frag = h.partition('#')
            target = (p.parent/unquote(path)).resolve() if path else p
            if not target.is_file(): bad.append(f'{p.relative_to(site)} -> {h} (missing)'); continue
            if frag and target.suffix == '.html' and not has_id(target, frag):
                bad.append(f'{p.relative_to(site)} -> {h} (no such anchor)')
    assert not bad, '\n'.join(bad)


def test_pages_explain_themselves(site):
    "No page points to a file outside the project, the demo page defines its axis, and no page shows internal column names."
    from bs4 import BeautifulSoup
    def shown(p):  # what a reader sees, code cells left out
        soup = BeautifulSoup(p.read_text(), 'html.parser')
        for el in soup.select('.jp-CodeCell .jp-InputArea'): el.decompose()
        return soup.get_text(' ')
    text = {p.relative_to(site).as_posix(): shown(p) for p in site.rglob('*.html')}
    assert not [p for p, t in text.items() if 'STUDY.md' in t]
    assert 'Definitions' in text['report/demo.html'] and 'normalized step' in text['report/definitions.html']
    for col in ('boot_crossing', 'n_star_logit', 'bracketed'): assert col not in text['report/theory.html'], col
    before = text['report/before_tau.html']  # the verdicts, or the note that the sweep is not collected yet
    assert 'No results yet' in before or 'of 6 statements' in before, before[:500]  # (a), (a′), (b), (b′), (c), (d)
    for col in ('pre_slope', 'falls_before', 'first_run', 'ratio_lo'): assert col not in before, col
    assert 'not measured' not in text['index.html']


# --- the browser -------------------------------------------------------------------------------------------------

def chromium():
    "Debian's Chromium, or a failure in CI, or a skip on a developer's machine without it."
    exe = os.environ.get('CHROMIUM') or '/usr/bin/chromium'
    if Path(exe).exists(): return exe
    msg = f"Chromium is not installed at {exe} (Debian: apt-get install chromium; .ci/run installs it; $CHROMIUM names another)."
    if os.environ.get('DMSTUDY_CI') == '1': pytest.fail(msg)  # .ci/run sets it: there a missing browser is a failure
    pytest.skip(msg)


@pytest.fixture(scope='session')
def page():
    exe = chromium()
    from playwright.sync_api import sync_playwright  # in the dev extra: its absence is an error, not a skip
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=['--no-sandbox', '--disable-gpu', '--disable-background-networking',
                                                                  '--disable-component-update', '--no-first-run'])
        pg = browser.new_page(viewport={'width': 1280, 'height': 900})
        pg.errors = []
        pg.on('console', lambda m: m.type == 'error' and pg.errors.append(f'console: {m.text}'))
        pg.on('pageerror', lambda e: pg.errors.append(f'exception: {e}'))
        pg.on('requestfailed', lambda r: pg.errors.append(f'failed load: {r.url}'))
        yield pg
        browser.close()


@pytest.fixture(scope='session')
def shots(tmp_path_factory):
    d = Path(os.environ.get('DMSTUDY_SCREENSHOTS') or tmp_path_factory.mktemp('screenshots'))
    d.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {d}")
    return d


def local_errors(errors):
    "The errors that concern the site itself: the offline browser cannot load MathJax from its CDN, which is expected."
    return [e for e in errors if not re.search(r'https?://|net::ERR_|Failed to load resource', e)]


def test_pages_in_chromium(site, page, shots):
    "Home and study pages: images loaded, internal links resolve, no errors; a full-page screenshot each."
    rels = ['index.html', *sorted(p.relative_to(site).as_posix() for p in (site/'report').glob('*.html'))]
    assert len(rels) >= 8, rels
    for rel in rels:
        page.errors.clear()
        page.goto((site/rel).as_uri(), wait_until='load')
        page.wait_for_function('[...document.images].every(i => i.complete)', timeout=15_000)
        info = page.evaluate("""() => ({nav: document.querySelectorAll('nav.dm-nav a').length,
            images: [...document.images].map(i => ({src: i.currentSrc.slice(0, 60), ok: i.naturalWidth > 0})),
            links: [...document.querySelectorAll('a[href]')].map(a => a.href).filter(h => h.startsWith('file:')),
            text: document.body.innerText})""")
        page.screenshot(path=shots/f"{rel.replace('/', '_').removesuffix('.html')}.png", full_page=True)
        assert info['nav'] >= 8, f"{rel}: navigation bar missing ({info['nav']} links)"
        assert len(info['text']) > 200, f"{rel}: the page is nearly empty"
        broken = [i['src'] for i in info['images'] if not i['ok']]
        assert not broken, f"{rel}: images that did not load: {broken}"
        for h in info['links']:
            assert Path(unquote(urlparse(h).path)).is_file(), f"{rel}: link to a missing file {h}"
        errs = local_errors(page.errors)
        assert not errs, f"{rel}: errors in the browser: {errs}"
        if rel == 'report/demo.html':
            assert len(info['images']) >= 4, f"the demo page shows only {len(info['images'])} figures; are results/demo.parquet and results/demo/ committed?"
            assert 'τ_mem increases with N' in info['text'], "the demo page does not show τ_mem increasing with N"


def test_navigation_bar(site, page, shots):
    "Clicking through the navigation bar reaches each page, marks it as current, and the title leads home."
    page.goto((site/'index.html').as_uri())
    assert page.locator('nav.dm-nav a.dm-current').count() == 0, "the home page marks a navigation item as current"
    for text in ('CPU demo', 'Definitions', 'Dataset size', 'Theory', 'Before τ_mem'):
        page.locator('nav.dm-nav > a', has_text=text).first.click()
        page.wait_for_load_state('load')
        cur = page.locator('nav.dm-nav a.dm-current').all_inner_texts()
        assert cur == [text], f"after clicking {text!r} the marked items are {cur} ({page.url})"
    page.locator('nav.dm-nav a.dm-brand').click(); page.wait_for_load_state('load')
    assert page.url.endswith('/index.html'), page.url
    page.locator('nav.dm-nav details summary').click()
    items = page.locator('nav.dm-nav .dm-menu a').all_inner_texts()
    assert len(items) >= 13, items
    page.screenshot(path=shots/'navigation_reference_menu.png')
    page.locator('nav.dm-nav .dm-menu a', has_text='Analysis').first.click(); page.wait_for_load_state('load')
    assert page.url.endswith('/analysis.html'), page.url


# --- the study pages' two parts and the claims table ---------------------------------------------------------------

SWEEP_PAGES = {'dataset_size': 'dataset-size', 'model_size': 'model-size', 'batch_size': 'batch-size', 'learning_rate': 'learning-rate'}


def shown_text(path):
    "What a reader sees of a page: its text without the code cells."
    from bs4 import BeautifulSoup
    soup = BeautifulSoup(path.read_text(), 'html.parser')
    for el in soup.select('.jp-CodeCell .jp-InputArea'): el.decompose()
    return soup, ' '.join(soup.get_text(' ').split())


def test_paper_values_are_package_data():
    "The paper's values file ships with the package, as the sweep files do."
    import fnmatch, tomllib
    from dmstudy.claims import paper_values_path
    globs = tomllib.loads((ROOT/'pyproject.toml').read_text())['tool']['setuptools']['package-data']['dmstudy']
    rel = paper_values_path().relative_to(ROOT/'dmstudy').as_posix()
    assert any(fnmatch.fnmatch(rel, g) for g in globs), (rel, globs)


def test_sweep_pages_have_both_scales(site):
    "Each sweep page: the paper-scale commands, cost and the paper's values beside dmstudy's ('not yet run' without results), then the CPU-scale part."
    from dmstudy.claims import fmt_num, paper_values, results_path
    for page, name in SWEEP_PAGES.items():
        soup, text = shown_text(site/'report'/f'{page}.html')
        assert 'Paper scale' in text and 'CPU scale' in text, page
        assert text.index('Paper scale') < text.index('CPU scale'), page
        assert f'dmstudy sweep paper-{name} --executor slurm' in text and f'dmstudy collect paper-{name}' in text, page
        assert 'sampling network evaluations' in text and 'total' in text, f"{page}: no cost table"
        pv, meta = paper_values(page)
        assert meta['figure'] in text, page
        tables = [t for t in soup.find_all('table') if 'paper' in t.get_text(' ') and 'dmstudy' in t.get_text(' ')]
        assert tables, f"{page}: no table of the paper's values"
        cells = [td.get_text(strip=True) for td in tables[0].find_all('td')]
        for v in pv.iloc[:, 0]:  # the first quantity of every row, as the page writes it
            assert (fmt_num(v) if isinstance(v, float) else str(v)) in cells, (page, v, cells)
        if not results_path(f'paper-{name}', ROOT).exists(): assert cells.count('not yet run') == pv.size, page
        cpu = text[text.index('CPU scale'):]
        if results_path(f'cpu-{name}', ROOT).exists():
            assert 'What the data say' in cpu and 'Derived quantities' in cpu and '95% CI' in cpu, page
        else: assert 'No results yet' in cpu and f'dmstudy sweep cpu-{name}' in cpu, page


def test_index_claims_table(site):
    "The home page sets every claim beside its CPU-scale and paper-scale verdicts, each linked to its page."
    from dmstudy.claims import CLAIMS, results_path
    soup, text = shown_text(site/'index.html')
    table = next((t for t in soup.find_all('table') if 'CPU scale' in t.get_text(' ') and 'Paper scale' in t.get_text(' ')), None)
    assert table is not None, "the home page has no claims table"
    rows = table.find_all('tr')[1:]
    assert [r.find('td').get_text(' ', strip=True).split('.')[0] for r in rows] == [str(c) for c in CLAIMS], rows
    links = {a['href'] for a in table.find_all('a', href=True)}
    assert {f'report/{p}.html' for p in SWEEP_PAGES} <= links, links
    for r in rows:
        cpu, paper = (td.get_text(' ', strip=True) for td in r.find_all('td')[1:3])
        assert cpu, r
        if not any(results_path(f'paper-{n}', ROOT).exists() for n in SWEEP_PAGES.values()): assert paper == 'not yet run', paper
    if results_path('cpu-dataset-size', ROOT).exists():
        four = rows[3].find_all('td')[1].get_text(' ')
        assert 'τ_mem ∝ N' in four and ('exponent' in four or 'undecided' in four), four
