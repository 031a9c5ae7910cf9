"""The rendered study in a real browser: render the site from the committed results (nbconvert fallback), open the
home page and every report page in headless Chromium through the DevTools protocol, and check that every image
loaded, every internal link resolves, the navigation bar works, and nothing was logged as an error. Screenshots go
to $DMSTUDY_SCREENSHOTS (default: a temporary folder, printed)."""
import base64, json, os, shutil, socket, subprocess, tempfile, time, urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse
import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--hide-scrollbars', '--window-size=1280,900']


def chromium_binary():
    for name in (os.environ.get('CHROMIUM'), 'chromium', 'chromium-browser', 'google-chrome'):
        if name and shutil.which(name): return shutil.which(name)
    return None


pytestmark = pytest.mark.skipif(chromium_binary() is None, reason="Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")


class Browser:
    "Headless Chromium on a fresh profile, driven over the DevTools protocol (one page target)."
    def __init__(self, binary, profile):
        import websocket  # websocket-client, in the dev extra: its absence is a failure, not a reason to skip
        self.proc = subprocess.Popen([binary, *FLAGS, f'--user-data-dir={profile}', '--remote-debugging-port=0', 'about:blank'],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(profile)/'DevToolsActivePort'
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip(): break
            if self.proc.poll() is not None: raise RuntimeError(f"Chromium exited with code {self.proc.returncode} before it listened.")
            time.sleep(0.1)
        else: raise RuntimeError("Chromium did not open its DevTools port within 30 s.")
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list', timeout=10).read())
        page = next(t for t in targets if t['type'] == 'page')
        self.ws = websocket.create_connection(page['webSocketDebuggerUrl'], timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []
        for domain in ('Page', 'Runtime', 'Log'): self.call(f'{domain}.enable')

    def call(self, method, **params):
        self.next_id += 1; i = self.next_id
        self.ws.send(json.dumps({'id': i, 'method': method, 'params': params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get('id') == i:
                if 'error' in msg: raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get('result', {})
            if 'method' in msg: self.events.append(msg)

    def wait_event(self, method, timeout=60):
        t0 = time.time()
        while time.time() - t0 < timeout:
            for k, e in enumerate(self.events):
                if e['method'] == method: return self.events.pop(k)
            self.ws.settimeout(max(0.1, timeout - (time.time() - t0)))
            msg = json.loads(self.ws.recv())
            if 'method' in msg: self.events.append(msg)
        raise TimeoutError(f"no {method} within {timeout} s")

    def open(self, url):
        self.events.clear()
        self.call('Page.navigate', url=url)
        self.wait_event('Page.loadEventFired')
        self.eval("new Promise(r => { const t0 = Date.now(); (function w() { "
                  "if ([...document.images].every(i => i.complete) || Date.now() - t0 > 10000) r(true); else setTimeout(w, 50); })(); })")

    def eval(self, js):
        r = self.call('Runtime.evaluate', expression=js, returnByValue=True, awaitPromise=True)
        if 'exceptionDetails' in r: raise RuntimeError(f"JavaScript failed: {r['exceptionDetails']}")
        return r['result'].get('value')

    def errors(self):
        "Console errors, uncaught exceptions and failed loads logged since the last `open`."
        self.call('Runtime.evaluate', expression='1')  # drain events that arrived meanwhile
        out = []
        for e in self.events:
            p = e['params']
            if e['method'] == 'Runtime.consoleAPICalled' and p['type'] in ('error', 'assert'):
                out.append('console.error: ' + ' '.join(str(a.get('value', a.get('description', ''))) for a in p['args']))
            elif e['method'] == 'Runtime.exceptionThrown': out.append('exception: ' + p['exceptionDetails'].get('text', ''))
            elif e['method'] == 'Log.entryAdded' and p['entry']['level'] == 'error': out.append(f"log ({p['entry']['source']}): {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def screenshot(self, path, full=True, max_height=7000):
        h = 900
        if full:
            m = self.call('Page.getLayoutMetrics')
            h = int(min(max_height, (m.get('cssContentSize') or m['contentSize'])['height']))
            self.call('Emulation.setDeviceMetricsOverride', width=1280, height=h, deviceScaleFactor=1, mobile=False)
        data = self.call('Page.captureScreenshot', format='png')['data']
        if full: self.call('Emulation.clearDeviceMetricsOverride')
        Path(path).write_bytes(base64.b64decode(data))

    def close(self):
        try: self.ws.close()
        finally:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill()


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    from dmstudy.report import render_site
    out = tmp_path_factory.mktemp('site')/'_site'
    return render_site(ROOT, out, backend='fallback', jobs=2, quiet=True).parent


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    b = Browser(chromium_binary(), tmp_path_factory.mktemp('chromium-profile'))
    yield b
    b.close()


@pytest.fixture(scope='module')
def shots(tmp_path_factory):
    d = Path(os.environ.get('DMSTUDY_SCREENSHOTS') or tmp_path_factory.mktemp('screenshots'))
    d.mkdir(parents=True, exist_ok=True)
    print(f"screenshots: {d}")
    return d


def report_pages(site):
    return ['index.html', *sorted(p.relative_to(site).as_posix() for p in (site/'nbs'/'report').glob('*.html'))]


def local_target(url):
    "The file a file:// URL points to and its fragment."
    u = urlparse(url)
    return Path(unquote(u.path)), unquote(u.fragment)


def test_every_page_links_resolve(site):
    "Every relative link of every page (API pages too) points to a file of the site, and a fragment to an id in it."
    from bs4 import BeautifulSoup
    pages = sorted(site.rglob('*.html'))
    assert len(pages) >= 8, [p.name for p in pages]
    bad = []
    for p in pages:
        soup = BeautifulSoup(p.read_text(), 'html.parser')
        for a in soup.find_all('a', href=True):
            h = a['href']
            if h.startswith(('http:', 'https:', 'mailto:', 'data:')): continue
            path, _, frag = h.partition('#')
            target = (p.parent/unquote(path)).resolve() if path else p
            if not target.is_file(): bad.append(f'{p.relative_to(site)} -> {h} (missing)'); continue
            if frag and target.suffix == '.html' and f'id="{frag}"' not in target.read_text(): bad.append(f'{p.relative_to(site)} -> {h} (no such anchor)')
    assert not bad, '\n'.join(bad)


def test_pages_in_chromium(site, browser, shots):
    "Home and report pages: images loaded, internal links resolve, no console errors; a full-page screenshot each."
    for rel in report_pages(site):
        url = (site/rel).as_uri()
        browser.open(url)
        info = browser.eval("""({title: document.title,
            nav: document.querySelectorAll('nav.dm-nav a').length,
            images: [...document.images].map(i => ({src: i.currentSrc.slice(0, 60), w: i.naturalWidth, ok: i.complete && i.naturalWidth > 0})),
            links: [...document.querySelectorAll('a[href]')].map(a => a.href).filter(h => h.startsWith('file:')),
            text: document.body.innerText.length})""")
        name = rel.replace('/', '_').removesuffix('.html')
        browser.screenshot(shots/f'{name}.png')
        assert info['nav'] >= 8, f"{rel}: navigation bar missing ({info['nav']} links)"
        assert info['text'] > 200, f"{rel}: the page is nearly empty"
        broken = [i['src'] for i in info['images'] if not i['ok']]
        assert not broken, f"{rel}: images that did not load: {broken}"
        for h in info['links']:
            path, frag = local_target(h)
            assert path.is_file(), f"{rel}: link to a missing file {h}"
        errs = browser.errors()
        assert not errs, f"{rel}: errors in the browser console: {errs}"
        if rel == 'nbs/report/demo.html':
            assert len(info['images']) >= 4, f"the demo page shows only {len(info['images'])} figures; are results/demo.parquet and results/demo/ committed?"
            assert 'τ_mem increases with N' in browser.eval('document.body.innerText'), "the demo page does not show τ_mem increasing with N"


def test_navigation_bar(site, browser, shots):
    "Clicking through the navigation bar reaches each report page and comes back home."
    browser.open((site/'index.html').as_uri())
    for text in ('CPU demo', 'Dataset size', 'Theory', 'dmstudy'):
        browser.events.clear()
        ok = browser.eval(f"(() => {{ const a = [...document.querySelectorAll('nav.dm-nav > a')].find(a => a.textContent.trim() === {json.dumps(text)}); "
                          "if (!a) return false; a.click(); return true; })()")
        assert ok, f"no navigation link {text!r}"
        browser.wait_event('Page.loadEventFired')
        here = browser.eval('location.href')
        cur = browser.eval("(document.querySelector('nav.dm-nav a.dm-current') || {}).textContent")
        assert cur == text, f"after clicking {text!r} the current page is {here} (marked {cur!r})"
    assert browser.eval('location.href').endswith('/index.html')
    browser.eval("document.querySelector('nav.dm-nav details').open = true")
    items = browser.eval("[...document.querySelectorAll('nav.dm-nav .dm-menu a')].map(a => a.textContent)")
    assert len(items) >= 10, items
    browser.screenshot(shots/'navigation_reference_menu.png', full=False)
