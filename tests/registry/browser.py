"""A minimal headless-Chromium driver over the DevTools protocol (``websocket-client``), for the
MLflow UI test: navigate, wait until the JS app has rendered what we need, read the DOM, take a
screenshot. No browser download: the system ``chromium`` (scripts/system_deps.sh)."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars"]

# Reads MLflow's compare-runs page: run ids / names per column and the metrics grid
# (metric name -> cell text per column). The metric grid is virtualised: names in one grid
# (anchors "Plot chart"), values in the next grid, cells positioned by style top/left.
COMPARE_JS = r"""
(() => {
  const row = (label) => {
    for (const tr of document.querySelectorAll('tr')) {
      const h = tr.querySelector('.head-value');
      if (h && h.textContent.trim() === label)
        return [...tr.querySelectorAll('.data-value')].map(e => e.textContent.trim());
    }
    return [];
  };
  const out = {runIds: row('Run ID:'), runNames: row('Run Name:'), metrics: {}, params: {}};
  const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
  for (let i = 0; i + 1 < grids.length; i++) {
    const anchors = [...grids[i].querySelectorAll('a[title="Plot chart"]')];
    if (!anchors.length) continue;
    const names = {};
    for (const a of anchors) { const c = a.closest('div[style*="top"]'); if (c) names[c.style.top] = a.textContent.trim(); }
    const cells = [...grids[i + 1].querySelectorAll('div[style*="top"]')].filter(d => d.style.left !== '');
    const lefts = [...new Set(cells.map(c => parseFloat(c.style.left)))].sort((a, b) => a - b);
    for (const c of cells) {
      const name = names[c.style.top];
      if (!name) continue;
      (out.metrics[name] = out.metrics[name] || [])[lefts.indexOf(parseFloat(c.style.left))] = c.textContent.trim();
    }
  }
  return out;
})()
"""


class Chromium:
    def __init__(self, user_data_dir: Path, width: int = 1500, height: int = 2200, binary: str | None = None):
        import websocket  # websocket-client

        self.binary = binary or shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
        self.dir = Path(user_data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        port_file = self.dir / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        self.log = open(self.dir / "chromium.log", "w")
        self.proc = subprocess.Popen([self.binary, *FLAGS, f"--user-data-dir={self.dir}", "--remote-debugging-port=0",
                                      "--remote-allow-origins=*", f"--window-size={width},{height}", "about:blank"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"chromium did not start: {(self.dir / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        targets = []
        while time.time() < deadline:
            targets = [t for t in json.loads(opener.open(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
                       if t.get("type") == "page"]
            if targets:
                break
            time.sleep(0.2)
        self.ws = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=120, suppress_origin=True)
        self._id = 0
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def send(self, method: str, params: dict | None = None) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if res.get("exceptionDetails"):
            raise RuntimeError(f"JS error: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def wait_for(self, predicate_js: str, timeout: float = 180, poll: float = 0.5) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.evaluate(predicate_js):
                    return
            except RuntimeError:
                pass
            time.sleep(poll)
        text = self.evaluate("document.body ? document.body.innerText.slice(0, 3000) : ''")
        raise TimeoutError(f"page never satisfied {predicate_js!r} within {timeout}s; page text:\n{text}")

    def html(self) -> str:
        return self.evaluate("document.documentElement.outerHTML")

    def text(self) -> str:
        return self.evaluate("document.body.innerText")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:  # noqa: BLE001
            pass
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_compare_view(browser: Chromium, settle: float = 0.7) -> dict:
    """:data:`COMPARE_JS` over the whole (virtualised) metric list: scroll it page by page and merge."""
    page = browser.evaluate(COMPARE_JS)
    sizes = browser.evaluate("[...document.querySelectorAll('.ReactVirtualized__Grid')]"
                             ".map(g => [g.scrollHeight, g.clientHeight])")
    height = max([s[0] for s in sizes] + [0])
    step = max(1, min([s[1] for s in sizes if s[1] > 0] + [300]))
    y = step
    while y < height + step:
        scroll_metric_grid(browser, y)
        time.sleep(settle)
        more = browser.evaluate(COMPARE_JS)
        for name, values in more["metrics"].items():
            page["metrics"].setdefault(name, values)
        y += step
    scroll_metric_grid(browser, 0)
    time.sleep(settle)
    return page


SCROLL_JS = """
(() => {
  for (const g of document.querySelectorAll('.ReactVirtualized__Grid'))
    if (!g.querySelector('a[title="Plot chart"]')) { g.scrollTop = %s; g.dispatchEvent(new Event('scroll')); }
  return true;
})()
"""


def scroll_metric_grid(browser: Chromium, y: float) -> None:
    """Scroll the metric *values* grid; MLflow syncs the names column from its scroll event."""
    browser.evaluate(SCROLL_JS % float(y))


CLICK_TEXT_JS = """
(() => {
  const hits = [...document.querySelectorAll('*')].filter(e => e.textContent.trim() === %s &&
      ![...e.children].some(c => c.textContent.trim() === %s));
  if (hits.length) hits[0].click();
  return hits.length;
})()
"""


def click_text(browser: Chromium, text: str) -> int:
    """Click the innermost element whose whole text is ``text``; returns how many there were."""
    quoted = json.dumps(text)
    return browser.evaluate(CLICK_TEXT_JS % (quoted, quoted))


def close_assistant(browser: Chromium) -> None:
    """Close MLflow's assistant side panel (it covers part of the page in screenshots)."""
    browser.evaluate("(() => { const b = [...document.querySelectorAll('button')]"
                     ".find(x => x.getAttribute('aria-label') === 'Close'); if (b) b.click(); return true; })()")
