"""The HTML report works in a real browser: headless Chromium loads the bundled report and
every image decodes (non-zero natural size), every internal link resolves and the console
stays free of errors.

Chromium is driven through the Chrome DevTools Protocol over ``--remote-debugging-pipe``
(file descriptors 3 and 4, messages separated by a NUL byte), so the test needs no Python
package beyond the standard library. It skips, saying why, when no Chromium is installed
(CI installs Debian's ``chromium`` package in ``.ci/run``; set ``CHROMIUM`` to use another
binary).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from captum_ext.cli import main

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
BROWSER_TIMEOUT_S = 300  # generous: a loaded CI machine starts Chromium slowly
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--remote-debugging-pipe",
)

# Runs in the page once it has loaded: scroll through it (so that lazily loaded images would
# load too), wait for every image to settle, then describe images, links and anchors.
INSPECT_PAGE = """
(async () => {
  const step = Math.max(200, window.innerHeight);
  for (let y = 0; y < document.documentElement.scrollHeight; y += step) {
    window.scrollTo(0, y);
    await new Promise((resolve) => setTimeout(resolve, 0));
  }
  window.scrollTo(0, 0);
  const images = Array.from(document.images);
  await Promise.all(images.map((img) => img.decode().catch(() => null)));
  const ids = new Set(Array.from(document.querySelectorAll("[id]"), (e) => e.id));
  const names = new Set(Array.from(document.querySelectorAll("a[name]"), (e) => e.name));
  return JSON.stringify({
    url: document.URL,
    title: document.title,
    images: images.map((img) => ({
      src: img.getAttribute("src"),
      url: img.currentSrc || img.src,
      complete: img.complete,
      width: img.naturalWidth,
      height: img.naturalHeight,
    })),
    links: Array.from(document.querySelectorAll("a[href], link[href]"), (a) => ({
      href: a.getAttribute("href"),
      url: a.href,
    })),
    anchors: Array.from(new Set([...ids, ...names])),
  });
})()
"""


def find_chromium() -> str | None:
    configured = os.environ.get("CHROMIUM")
    if configured:
        return shutil.which(configured) or (configured if Path(configured).is_file() else None)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class DevToolsPipe:
    """A Chromium process and a minimal DevTools Protocol client over its debugging pipe."""

    def __init__(self, executable: str, profile: Path):
        if sys.platform == "win32":  # pragma: no cover - pass_fds is POSIX only
            pytest.skip("the DevTools pipe needs POSIX file descriptors")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        profile.mkdir(parents=True, exist_ok=True)
        self._log_path = profile.parent / f"{profile.name}-chromium.log"  # a file cannot fill up
        self._log = self._log_path.open("wb")
        # the protocol reads commands on fd 3 and writes replies on fd 4: a small Python
        # trampoline puts the pipe ends there and then becomes Chromium
        trampoline = (
            "import os, sys; r, w = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2])); "
            "os.dup2(r, 3); os.dup2(w, 4); os.set_inheritable(3, True); "
            "os.set_inheritable(4, True); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", trampoline, str(to_browser_read), str(from_browser_write)]
            + [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            pass_fds=(to_browser_read, from_browser_write),
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def close(self) -> str:
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()
        return self._log_path.read_text(encoding="utf-8", errors="replace")[-5000:]

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no reply from Chromium in time")
            ready, _, _ = select.select([self._from_browser], [], [], min(remaining, 1.0))
            if not ready:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"Chromium exited with code {self.process.returncode}: {self.close()}"
                    )
                continue
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe: {self.close()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and wait for its reply; events meanwhile go to ``self.events``."""
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        os.write(self._to_browser, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, session: str | None = None) -> dict:
        """The first event ``method`` (already received or still to come)."""
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            self.events.append(self._read_message(deadline))


def load_in_chromium(executable: str, url: str, profile: Path) -> tuple[dict, list[str], str]:
    """Open ``url`` in headless Chromium; the page's description and its console errors."""
    browser = DevToolsPipe(executable, profile)
    log = ""
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.events.clear()  # only what happens on the page under test
        browser.send("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired", session=session)
        result = browser.send(
            "Runtime.evaluate",
            {"expression": INSPECT_PAGE, "awaitPromise": True, "returnByValue": True},
            session=session,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"inspecting the page failed: {result['exceptionDetails']}")
        page = json.loads(result["result"]["value"])
        errors = console_errors(browser.events, session)
    finally:
        log = browser.close()
    return page, errors, log


# Runs in the page: its size, with every <details> closed as written and then opened, and the
# images, tables and code blocks that stick out of the viewport (one inside an element that
# scrolls sideways, e.g. a wide table in its wrapper, counts when that element sticks out);
# and the code blocks whose lines are partly hidden (wider than the block: a scrollbar).
INSPECT_LAYOUT = """
(async () => {
  const images = Array.from(document.images);
  await Promise.all(images.map((img) => img.decode().catch(() => null)));
  const root = document.documentElement;
  const closedHeight = root.scrollHeight;
  const details = Array.from(document.querySelectorAll("details"));
  const closedDetails = details.filter((d) => !d.open).length;
  details.forEach((d) => { d.open = true; });
  await new Promise((resolve) => requestAnimationFrame(() => resolve()));
  const viewport = root.clientWidth;
  const box = (e) => {
    for (let a = e.parentElement; a && a !== document.body; a = a.parentElement) {
      const x = getComputedStyle(a).overflowX;
      if (x === "auto" || x === "scroll" || x === "hidden") return a;
    }
    return e;
  };
  const cutOff = [];
  for (const e of document.querySelectorAll("img, table, pre")) {
    const r = box(e).getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    if (r.left < -0.5 || r.right > viewport + 0.5) {
      cutOff.push(`${e.tagName.toLowerCase()}${e.className ? "." + e.className : ""} ` +
                  `[${Math.round(r.left)}, ${Math.round(r.right)}] of ${viewport}px`);
    }
  }
  return JSON.stringify({
    innerWidth: window.innerWidth,
    scrollWidth: root.scrollWidth,
    closedHeight: closedHeight,
    openHeight: root.scrollHeight,
    details: details.length,
    closedDetails: closedDetails,
    cutOff: cutOff,
    hiddenCode: Array.from(document.querySelectorAll("pre"))
      .filter((e) => e.scrollWidth > e.clientWidth + 1)
      .map((e) => `${e.scrollWidth} > ${e.clientWidth}px: ${e.textContent.slice(0, 60)}`),
  });
})()
"""


def artefact_dir(tmp_path: Path) -> Path:
    """Where screenshots go: ``$CAPTUM_EXT_TEST_ARTEFACTS`` if set, else ``tmp_path``."""
    folder = os.environ.get("CAPTUM_EXT_TEST_ARTEFACTS")
    path = Path(folder) if folder else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    return path


def layout_in_chromium(
    executable: str, url: str, profile: Path, width: int, screenshot: Path, height: int = 900
) -> dict:
    """Open ``url`` in headless Chromium at a viewport ``width`` x ``height`` CSS pixels,
    save a screenshot of the top of the page to ``screenshot`` (PNG) and describe its layout
    (see ``INSPECT_LAYOUT``)."""
    browser = DevToolsPipe(executable, profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        browser.send("Page.enable", session=session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600},
            session=session,
        )
        browser.events.clear()
        browser.send("Page.navigate", {"url": url}, session=session)
        browser.wait_for("Page.loadEventFired", session=session)
        result = browser.send(
            "Runtime.evaluate",
            {"expression": INSPECT_LAYOUT, "awaitPromise": True, "returnByValue": True},
            session=session,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"inspecting the layout failed: {result['exceptionDetails']}")
        layout = json.loads(result["result"]["value"])
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
    return layout


def console_errors(events: list[dict], session: str) -> list[str]:
    """Console errors, uncaught exceptions and browser log errors (failed loads, CSP, ...)."""
    errors = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            errors.append(f"uncaught exception: {text}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
    return errors


class _Anchors(HTMLParser):
    def __init__(self):
        super().__init__()
        self.anchors: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if value and (key == "id" or (tag == "a" and key == "name")):
                self.anchors.add(value)


def file_path(url: str) -> Path:
    parsed = urllib.parse.urlsplit(url)
    return Path(urllib.request.url2pathname(parsed.path))


def broken_internal_links(page: dict, out: Path) -> list[str]:
    """Links that point into the report and do not resolve: a missing file or fragment."""
    broken = []
    here = urllib.parse.urlsplit(page["url"])
    for link in page["links"]:
        target = urllib.parse.urlsplit(link["url"])
        if target.scheme != "file":  # http(s), mailto, ...: not part of the report
            continue
        same_page = (target.path, target.query) == (here.path, here.query)
        if same_page:
            anchors = set(page["anchors"])
        else:
            path = file_path(link["url"])
            if not path.is_file():
                broken.append(f"{link['href']}: no file {path}")
                continue
            if not path.resolve().is_relative_to(out.resolve()):
                broken.append(f"{link['href']}: points outside the report folder")
                continue
            anchors = set()
            if target.fragment and path.suffix in (".html", ".htm"):
                parser = _Anchors()
                parser.feed(path.read_text(encoding="utf-8", errors="replace"))
                anchors = parser.anchors
        fragment = urllib.parse.unquote(target.fragment)
        if fragment and fragment not in anchors:
            broken.append(f"{link['href']}: no element with id {fragment!r}")
    return broken


@pytest.fixture(scope="module")
def chromium() -> str:
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            "headless Chromium not found (install Debian's `chromium` package, as .ci/run "
            "does, or set CHROMIUM=/path/to/chrome); the report was not checked in a browser"
        )
    return executable


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("jinja2")
    out = tmp_path_factory.mktemp("browser") / "report with spaces & more"
    code = main(["report", "--limit", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    index = out / "index.html"
    assert index.is_file()
    return index


@pytest.fixture(scope="module")
def loaded(chromium: str, report: Path, tmp_path_factory: pytest.TempPathFactory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    try:
        return load_in_chromium(chromium, report.as_uri(), profile)
    except (RuntimeError, TimeoutError, OSError) as error:
        pytest.fail(f"headless Chromium could not load the report: {error}", pytrace=False)


@pytest.mark.slow
def test_report_images_load_in_chromium(loaded, report: Path):
    page, _, _ = loaded
    assert page["title"], "the page has no title"
    images = page["images"]
    srcs = {image["src"] for image in images}
    expected = set(_img_sources(report.read_text(encoding="utf-8")))
    assert expected and srcs == expected, "Chromium saw other images than the HTML holds"
    bad = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert not bad, f"{len(bad)} of {len(images)} images did not load: {bad[:5]}"


@pytest.mark.slow
def test_report_internal_links_resolve_in_chromium(loaded, report: Path):
    page, _, _ = loaded
    internal = [link for link in page["links"] if link["url"].startswith("file:")]
    assert any(link["href"].startswith("#") for link in internal), "no table-of-contents links"
    broken = broken_internal_links(page, report.parent)
    assert not broken, "\n".join(broken)


@pytest.mark.slow
def test_report_has_no_console_errors_in_chromium(loaded):
    _, errors, _ = loaded
    assert not errors, "\n".join(errors)


def _img_sources(html: str) -> list[str]:
    class Images(HTMLParser):
        def __init__(self):
            super().__init__()
            self.sources: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.sources.append(dict(attrs).get("src") or "")

    parser = Images()
    parser.feed(html)
    return parser.sources


def test_link_checker_finds_broken_links(tmp_path: Path):
    """The checker itself, without a browser: missing files and missing fragments are found."""
    (tmp_path / "other.html").write_text('<p id="there">x</p>', encoding="utf-8")
    base = (tmp_path / "index.html").as_uri()
    page = {
        "url": base,
        "anchors": ["top"],
        "links": [
            {"href": "#top", "url": base + "#top"},
            {"href": "#nowhere", "url": base + "#nowhere"},
            {"href": "other.html#there", "url": (tmp_path / "other.html").as_uri() + "#there"},
            {"href": "other.html#gone", "url": (tmp_path / "other.html").as_uri() + "#gone"},
            {"href": "missing.png", "url": (tmp_path / "missing.png").as_uri()},
            {"href": "https://captum.ai", "url": "https://captum.ai/"},
        ],
    }
    broken = broken_internal_links(page, tmp_path)
    assert [b.split(":")[0] for b in broken] == ["#nowhere", "other.html#gone", "missing.png"]


def test_console_errors_are_collected():
    events = [
        {
            "sessionId": "s",
            "method": "Runtime.consoleAPICalled",
            "params": {"type": "error", "args": [{"value": "boom"}]},
        },
        {
            "sessionId": "s",
            "method": "Runtime.consoleAPICalled",
            "params": {"type": "log", "args": [{"value": "fine"}]},
        },
        {
            "sessionId": "s",
            "method": "Log.entryAdded",
            "params": {"entry": {"level": "error", "source": "network", "text": "404", "url": "u"}},
        },
        {"sessionId": "other", "method": "Runtime.exceptionThrown", "params": {}},
    ]
    assert console_errors(events, "s") == ["console.error: boom", "network: 404 u"]


@pytest.mark.slow
def test_chromium_check_catches_a_broken_page(chromium: str, tmp_path: Path):
    """End to end on a page with a missing image, a dead fragment and a script error."""
    Image = pytest.importorskip("PIL.Image")
    Image.new("L", (3, 2), 255).save(tmp_path / "ok.png")
    (tmp_path / "index.html").write_text(
        '<!doctype html><html><head><title>t</title></head><body><h1 id="top">t</h1>'
        '<a href="#top">up</a><a href="#missing">down</a><a href="gone.html">gone</a>'
        '<img src="ok.png" alt="ok"><img src="missing.png" alt="missing">'
        '<script>console.error("deliberate"); undefinedFunction();</script></body></html>',
        encoding="utf-8",
    )
    page, errors, _ = load_in_chromium(
        chromium, (tmp_path / "index.html").as_uri(), tmp_path / "profile"
    )
    sizes = {image["src"]: (image["width"], image["height"]) for image in page["images"]}
    assert sizes == {"ok.png": (3, 2), "missing.png": (0, 0)}
    broken = broken_internal_links(page, tmp_path)
    assert [b.split(":")[0] for b in broken] == ["#missing", "gone.html"]
    assert any("deliberate" in e for e in errors), errors
    assert any("undefinedFunction" in e for e in errors), errors
    assert any("missing.png" in e for e in errors), errors


@pytest.mark.slow
@pytest.mark.parametrize("width", [1400, 390])
def test_report_fits_the_viewport_in_chromium(chromium: str, report: Path, tmp_path: Path, width):
    """At a desktop and a phone width nothing is cut off: no sideways scrolling of the page,
    and every image, table and code block fits the viewport or scrolls inside its box.
    Screenshots are kept (``$CAPTUM_EXT_TEST_ARTEFACTS`` or the test's tmp dir)."""
    shot = artefact_dir(tmp_path) / f"report-{width}px.png"
    layout = layout_in_chromium(chromium, report.as_uri(), tmp_path / "profile", width, shot)
    assert shot.stat().st_size > 0
    assert layout["innerWidth"] == width
    assert layout["scrollWidth"] <= layout["innerWidth"], layout
    assert not layout["cutOff"], "\n".join(layout["cutOff"])
    # the per-image rows are folded: a closed <details> per section that has them
    assert layout["details"] > 0 and layout["closedDetails"] == layout["details"]
    assert layout["closedHeight"] < layout["openHeight"]
